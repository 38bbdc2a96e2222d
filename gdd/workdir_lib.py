"""The workdir layout: the one module that names a run's folders and files.

```
WORKDIR/
  autoencoder/               latent-space configs only: the frozen autoencoder
  teacher/, guided/          one folder per stage (`stage_dir`)
  distill/<N>steps/          one per halving round (`round_name`)
  single_w/w<w>/<N>steps/    the single-w baseline's rounds
  encoder/<N>steps/          the distilled encoder's rounds
  samples/                   --mode=sample outputs (`samples_file`)
  edits/                     --mode=edit|inpaint|translate outputs
  eval/                      --mode=evaluate results and caches (`eval_dir`)
```

Each stage folder holds `config.json` (the config it was trained with),
`stage.json` (what a student was trained from), `lock`, `checkpoints/`,
`params/` (the params-only export; its presence means "finished"),
`unreadable/`, `samples/` (training's sample grids), `profile/` and the
TensorBoard event files. The autoencoder's folder also holds `latent.json`
(its latent scaling factor and held-out PSNR) and `reconstructions.png`.

The layout is stable: users' workdirs and the tests rely on it. Every path
goes through `paths.resolve`, so a workdir may be a gs:// URL. The module
is named `workdir_lib` (like `config_lib`) because the functions that use
it take an argument named `workdir`.
"""

import json

import ml_collections
from etils import epath

from gdd import paths

_CONFIG_RECORD = 'config.json'
_STAGE_RECORD = 'stage.json'
_LATENT_RECORD = 'latent.json'
_ROUND_SUFFIX = 'steps'
# The stage kinds whose rounds live under one folder per student step count.
_ROUND_KINDS = ('distill', 'single_w', 'encoder')


def stage_dir(workdir: epath.PathLike, name: str) -> epath.Path:
  """The folder of the stage `name` ('teacher', `round_name(...)`, …)."""
  return paths.resolve(workdir) / name


def stage_kind(name: str) -> str:
  """The stage kind ('teacher', 'distill', …) of a stage name."""
  return name.split('/')[0]


def _rounds_root(kind: str, w: float | None = None) -> str:
  """The folder (under the workdir) of a chain's halving rounds.

  Args:
    kind: 'distill' (the w-conditioned chain), 'single_w' (the baseline,
      one chain per w) or 'encoder' (the distilled encoder).
    w: the single-w chain's guidance strength; None for the others.
  """
  if kind not in _ROUND_KINDS:
    raise ValueError(f'kind={kind!r}; allowed: {_ROUND_KINDS}.')
  if (kind == 'single_w') != (w is not None):
    raise ValueError(f'w={w!r}: single_w rounds need a w, the others none.')
  return kind if w is None else f'{kind}/w{w:g}'


def round_name(kind: str, num_steps: int, w: float | None = None) -> str:
  """The stage name (and folder) of the round training an N-step student."""
  return f'{_rounds_root(kind, w)}/{num_steps}{_ROUND_SUFFIX}'


def rounds_dir(
  workdir: epath.PathLike, kind: str, w: float | None = None
) -> epath.Path:
  """The folder holding a chain's round folders (see `round_name`)."""
  return stage_dir(workdir, _rounds_root(kind, w))


def params_dir(stage_dir: epath.PathLike) -> epath.Path:
  """Where a finished stage's params-only (EMA) export lives."""
  return paths.resolve(stage_dir) / 'params'


def is_finished(stage_dir: epath.PathLike) -> bool:
  """True once the stage has written its params export."""
  return params_dir(stage_dir).is_dir()


def finished_rounds(
  workdir: epath.PathLike, kind: str = 'distill', *, w: float | None = None
) -> list[int]:
  """Student step counts of a chain's finished rounds, descending.

  Args:
    workdir: the run's workdir.
    kind: 'distill', 'single_w' or 'encoder' (see `round_name`).
    w: the single-w chain's guidance strength; None for the others.
  """
  root = rounds_dir(workdir, kind, w)
  if not root.is_dir():
    return []
  counts = [
    int(folder.name.removesuffix(_ROUND_SUFFIX))
    for folder in root.iterdir()
    if folder.name.endswith(_ROUND_SUFFIX) and is_finished(folder)
  ]
  return sorted(counts, reverse=True)


def single_w_values(workdir: epath.PathLike) -> list[float]:
  """The w of every single-w chain in the workdir (finished or not)."""
  root = stage_dir(workdir, 'single_w')
  if not root.is_dir():
    return []
  return sorted(
    float(folder.name.removeprefix('w')) for folder in root.iterdir()
  )


def checkpoints_dir(stage_dir: epath.PathLike) -> epath.Path:
  """The stage's Orbax train-state checkpoints."""
  return paths.resolve(stage_dir) / 'checkpoints'


def unreadable_dir(stage_dir: epath.PathLike) -> epath.Path:
  """Where checkpoints and exports that cannot be read are moved aside."""
  return paths.resolve(stage_dir) / 'unreadable'


def lock_file(stage_dir: epath.PathLike) -> epath.Path:
  """The file a run training the stage holds (`gdd.train.lock`)."""
  return paths.resolve(stage_dir) / 'lock'


def events_dir(stage_dir: epath.PathLike) -> epath.Path:
  """Where the stage's TensorBoard event files go: the folder itself."""
  return paths.resolve(stage_dir)


def grids_dir(stage_dir: epath.PathLike) -> epath.Path:
  """The sample grids written while the stage trains."""
  return paths.resolve(stage_dir) / 'samples'


def grid_file(stage_dir: epath.PathLike, step: int, w: float) -> epath.Path:
  """The PNG of the sample grids at `step` for guidance strength w."""
  return grids_dir(stage_dir) / f'step{step}_w{w:g}.png'


def profile_dir(stage_dir: epath.PathLike) -> epath.Path:
  """Where profiler traces of the stage's steps go."""
  return paths.resolve(stage_dir) / 'profile'


def config_record(stage_dir: epath.PathLike) -> epath.Path:
  """`config.json`: the config the stage was trained with."""
  return paths.resolve(stage_dir) / _CONFIG_RECORD


def read_config_record(stage_dir: epath.PathLike) -> dict | None:
  """The stage's recorded config as a dict, or None if there is none."""
  path = config_record(stage_dir)
  if not path.exists():
    return None
  return json.loads(path.read_text())


def write_config_record(
  stage_dir: epath.PathLike, config: ml_collections.ConfigDict
) -> None:
  """Records `config` as the one the stage is trained with."""
  # Atomic: a half-written record would refuse every later run's config.
  paths.write_atomically(
    config_record(stage_dir), config.to_json(indent=2).encode()
  )


def stage_record(stage_dir: epath.PathLike) -> epath.Path:
  """`stage.json`: what a student was trained from (teacher folder, …)."""
  return paths.resolve(stage_dir) / _STAGE_RECORD


def write_stage_record(stage_dir: epath.PathLike, record: dict) -> None:
  """Records what the stage was trained from, for people and tools."""
  paths.write_atomically(
    stage_record(stage_dir), json.dumps(record, indent=2).encode()
  )


def latent_record(stage_dir: epath.PathLike) -> epath.Path:
  """`latent.json`: an autoencoder's scaling factor and held-out PSNR."""
  return paths.resolve(stage_dir) / _LATENT_RECORD


def read_latent_record(stage_dir: epath.PathLike) -> dict | None:
  """An autoencoder folder's measurements, or None before they exist."""
  path = latent_record(stage_dir)
  if not path.exists():
    return None
  return json.loads(path.read_text())


def write_latent_record(stage_dir: epath.PathLike, record: dict) -> None:
  """Records an autoencoder's measurements (the space reads s from them)."""
  paths.write_atomically(
    latent_record(stage_dir), json.dumps(record, indent=2).encode()
  )


def reconstruction_grid_file(stage_dir: epath.PathLike) -> epath.Path:
  """Held-out images (top row) and their reconstructions (bottom row)."""
  return paths.resolve(stage_dir) / 'reconstructions.png'


def samples_dir(workdir: epath.PathLike) -> epath.Path:
  """Where --mode=sample writes unless told otherwise."""
  return paths.resolve(workdir) / 'samples'


def samples_file(
  workdir: epath.PathLike,
  *,
  stage: str,
  sampler: str,
  num_steps: int,
  w: float,
) -> epath.Path:
  """The default .npz of a --mode=sample request."""
  name = f'{stage}_{sampler}_{num_steps}steps_w{w:g}.npz'
  return samples_dir(workdir) / name


def edits_file(
  workdir: epath.PathLike,
  *,
  mode: str,
  stage: str,
  sampler: str,
  num_steps: int,
  w: float,
  t_start: float,
) -> epath.Path:
  """The default .npz of a --mode=edit, inpaint or translate request
  (`mode`: translate's names its encoder too)."""
  name = f'{mode}_{stage}_{sampler}_{num_steps}steps_w{w:g}_t{t_start:g}.npz'
  return paths.resolve(workdir) / 'edits' / name


def exports_dir(workdir: epath.PathLike) -> epath.Path:
  """Where --mode=export writes diffusers folders unless told otherwise."""
  return paths.resolve(workdir) / 'exports'


def eval_dir(workdir: epath.PathLike) -> epath.Path:
  """--mode=evaluate's results, plots and cached reference statistics."""
  return paths.resolve(workdir) / 'eval'
