"""The stage chain behind `gdd.main`: what runs for each --mode.

Each stage lives in its workdir folder with the config it was trained with
(`config.json`); re-running resumes an unfinished stage from its latest
checkpoint and skips a finished one. A changed config that would silently
mix two trainings is refused.
"""

import dataclasses
import functools
import json
import time
from collections.abc import Callable

import jax
import ml_collections
from absl import logging
from etils import epath

from gdd import (
  config_lib,
  data,
  edit,
  errors,
  export,
  paths,
  plan,
  sample,
  workdir_lib,
)
from gdd.evaluation import evaluate
from gdd.stages import (
  Stage,
  StageKind,
  autoencoder,
  common,
  pretrained,
  registry,
)
from gdd.train import checkpointing, lock, loop, preemption, sharding

MODES = (
  *registry.training_modes(),
  'sample',
  *edit.MODES,
  export.MODE,
  'evaluate',
  'plan',
)


class ConfigMismatchError(config_lib.ConfigError):
  """The workdir holds a stage trained with a different config."""


def record_stage_config(
  config: ml_collections.ConfigDict,
  stage_dir: epath.PathLike,
  kind: str,
  trained_from: dict | None = None,
) -> None:
  """Writes `config.json` (+ `stage.json`), or checks the config there.

  `trained_from` records the stage's inputs (teacher folder, step counts,
  w range) in `stage.json` for people and tools reading the workdir.
  """
  stage_dir = paths.resolve(stage_dir)
  if check_recorded_config(config, stage_dir, kind):
    return
  if jax.process_index() == 0:
    workdir_lib.write_config_record(stage_dir, config)
    if trained_from is not None:
      workdir_lib.write_stage_record(stage_dir, trained_from)


def check_recorded_config(
  config: ml_collections.ConfigDict, stage_dir: epath.PathLike, kind: str
) -> bool:
  """Whether `stage_dir` has a config record; raises if it trains otherwise.

  Compares the training keys of `kind` only, so cadence or sampling
  settings may change between runs.
  """
  stored = workdir_lib.read_config_record(stage_dir)
  if stored is None:
    return False
  old = config_lib.training_keys(stored, kind)
  new = config_lib.training_keys(json.loads(config.to_json()), kind)
  diffs = [
    f'config.{k}: {old.get(k)!r} in the workdir, {new.get(k)!r} now'
    for k in sorted(set(old) | set(new))
    if old.get(k) != new.get(k)
  ]
  if diffs:
    raise ConfigMismatchError(
      f'The stage in {stage_dir} was trained with another '
      'config:\n  ' + '\n  '.join(diffs) + '\nUse a new --workdir, or '
      'restore those values to resume.'
    )
  return True


def _run_stage(
  config: ml_collections.ConfigDict,
  workdir: epath.PathLike,
  kind: str,
  make_stage: Callable[[], Stage],
  *,
  name: str,
  abstract_params,
  trained_from: dict | None = None,
):
  """Trains (or resumes) one stage unless finished; returns its params.

  Holds the stage folder's lock throughout, so a second run on the same
  folder fails at once instead of writing the same checkpoints.
  """
  stage_dir = workdir_lib.stage_dir(workdir, name)
  preemption.raise_if_requested(f'stage {name}')
  with lock.hold(stage_dir):
    record_stage_config(config, stage_dir, kind, trained_from)
    params = _load_export(stage_dir, abstract_params)
    if params is not None:
      logging.info('%s: already finished (%s); skipping.', name, stage_dir)
      return params
    start = time.perf_counter()
    params = loop.train_stage(
      make_stage(),
      config,
      stage_dir,
      replace_export=workdir_lib.params_dir(stage_dir).exists(),
    )
  logging.info('%s: finished in %.0f s.', name, time.perf_counter() - start)
  return params


def _load_export(stage_dir: epath.Path, abstract_params):
  """A finished stage's params, or None when it must train or export again.

  An export that cannot be read stays where it is for now: training
  restores the stage's final checkpoint and only then replaces it.
  """
  if not workdir_lib.params_dir(stage_dir).exists():
    return None
  try:
    return loop.load_exported_params(stage_dir, abstract_params)
  except checkpointing.UnreadableCheckpointError as error:
    logging.warning(
      'The params export of %s cannot be read (%s); exporting it again from '
      'the final checkpoint.',
      stage_dir,
      errors.first_line(error.__cause__ or error),
    )
    return None


@dataclasses.dataclass(frozen=True)
class TrainContext:
  """What a stage kind's `train` gets: the run, and a way to run a folder."""

  config: ml_collections.ConfigDict
  workdir: epath.Path
  info: data.DatasetInfo

  def run_stage(
    self,
    kind: str,
    make_stage: Callable[[], Stage],
    *,
    name: str,
    abstract_params,
    trained_from: dict | None = None,
  ):
    """Trains (or resumes, or loads) the folder `name`; returns its params.

    A kind that diffuses in the config's space (`StageKind.in_space`)
    trains on batches encoded there, with random masks for an inpainting
    chain (`common.as_trained`).
    """
    if registry.get(kind).in_space:
      # Loaded first: a missing autoencoder fails before anything is written.
      build, space_params = make_stage, self.space_params()
      make_stage = lambda: common.as_trained(
        build(), self.config, self.space, space_params
      )
    return _run_stage(
      self.config,
      self.workdir,
      kind,
      make_stage,
      name=name,
      abstract_params=abstract_params,
      trained_from=trained_from,
    )

  def import_stage(
    self, kind: str, *, name: str, load: Callable[[], object], abstract_params
  ):
    """The folder `name` with imported (pretrained) params; returns them.

    `load` gives host params of `abstract_params`' structure; they are
    exported once, as a trained stage's, under the folder's lock and with
    its config record, and loaded like any finished stage afterwards.
    """
    stage_dir = workdir_lib.stage_dir(self.workdir, name)
    preemption.raise_if_requested(f'stage {name}')
    with lock.hold(stage_dir):
      record_stage_config(self.config, stage_dir, kind)
      params = _load_export(stage_dir, abstract_params)
      if params is not None:
        logging.info('%s: already imported (%s); skipping.', name, stage_dir)
      else:
        imported = jax.tree.map(jax.numpy.asarray, load())
        checkpointing.export_params(workdir_lib.params_dir(stage_dir), imported)
        params = loop.load_exported_params(stage_dir, abstract_params)
        logging.info('%s: imported into %s.', name, stage_dir)
    return params

  @functools.cached_property
  def space(self):
    """The space the chain's diffusion models work in."""
    return common.build_space(self.config, self.info)

  def space_params(self):
    """The space's frozen params (None in pixel space), read only."""
    return autoencoder.load_space_params(self.config, self.workdir)

  def input_loader(self, name: str | None) -> Callable[[], object]:
    """() -> the finished params of kind `name`, loaded when called."""
    if name is None:
      return lambda: None
    return functools.partial(self._load_finished, registry.get(name))

  def _load_finished(self, kind: StageKind):
    """A finished input's params, read only: no lock, never trained here.

    Its recorded config must train as the current one does, or the stage
    built on it would mix two trainings.
    """
    stage_dir = workdir_lib.stage_dir(self.workdir, kind.name)
    check_recorded_config(self.config, stage_dir, kind.name)
    model, _ = kind.sampler_model(self.config, self.info)
    return loop.load_exported_params(stage_dir, common.abstract_params(model))


def _require_input(workdir: epath.PathLike, mode: str, kind: StageKind) -> None:
  """The kind a partial --mode starts from must be finished."""
  if mode == 'all' or kind.needs is None:
    return
  if not workdir_lib.is_finished(workdir_lib.stage_dir(workdir, kind.needs)):
    needed = registry.get(kind.needs)
    raise checkpointing.MissingExportError(
      f'--mode={mode} needs a finished {needed.name!r} stage in {workdir}; '
      f'run --mode={needed.mode} (or the default --mode=all) first.'
    )


def run_chain(
  config: ml_collections.ConfigDict, workdir: epath.PathLike, mode: str
) -> None:
  """The stage kinds of `mode`, in registry order, each from the last.

  Teacher → guided student → halving rounds for --mode=all; one kind (from
  its finished input) otherwise. A finished folder is loaded, not trained.
  """
  kinds = registry.for_mode(mode, config)
  if not kinds:
    raise config_lib.ConfigError(
      f'--mode={mode} trains nothing for this config: '
      f'{registry.for_mode(mode)[0].name!r} exists only for latent-space '
      "configs (config.space='latent')."
    )
  _require_input(workdir, mode, kinds[0])
  ctx = TrainContext(config, paths.resolve(workdir), data.get_info(config.data))
  load_input = ctx.input_loader(kinds[0].needs)
  for kind in kinds:
    params = kind.train(ctx, load_input)
    load_input = lambda params=params: params
  summary = kinds[-1].summary(config, workdir)
  if summary:
    print(summary)


# The modes that import Stable Diffusion themselves, as their chain starts.
_IMPORTING_MODES = ('all', 'autoencoder', 'teacher')


def _import_stable_diffusion(
  config: ml_collections.ConfigDict, workdir: epath.Path
) -> None:
  """SD's VAE and teacher imported into `workdir` if not yet (nothing
  trains), so `--mode=sample` and the editing modes run straight from a
  Stable Diffusion folder, without a distilled chain, and `--mode=guided`
  starts a chain."""
  ctx = TrainContext(config, workdir, data.get_info(config.data))
  for name in ('autoencoder', 'teacher'):
    registry.get(name).train(ctx, ctx.input_loader(None))


def _mode_sections(config: ml_collections.ConfigDict, mode: str):
  """The config sections of the stages a training --mode trains.

  Their values are checked for those stages (`config_lib.validate`), and
  their batch_size is split evenly over the devices (samplers pad their
  batches and need no check). Other modes: none.
  """
  if mode not in registry.training_modes():
    return ()
  return tuple(kind.section for kind in registry.for_mode(mode, config))


def _check_batch_sizes(config: ml_collections.ConfigDict, mode: str) -> None:
  """Every batch that `mode` will split over the devices, before any stage."""
  sections = _mode_sections(config, mode)
  if mode == 'evaluate' and config.evaluate.feature_extractor == 'inception':
    sections = ('evaluate',)  # Inception's batches are split over devices.
  mesh = sharding.mesh_for(config)
  for section in sections:
    sharding.check_batch_size(
      config[section].batch_size,
      mesh,
      f'{section}.batch_size',
      config[section].get('grad_accum_steps', 1),
    )


def run(
  config: ml_collections.ConfigDict, workdir: epath.PathLike, mode: str
) -> None:
  """Validates everything cheap first, then runs the stages of `mode`.

  While stages train, SIGTERM/SIGINT stop the run cleanly after saving
  (`preemption.InterruptedRunError`). Stdout gets only the command's output
  (the samples' path, the evaluation folder, the chain's summary, the plan);
  progress goes to the absl log.
  """
  if mode not in MODES:
    raise config_lib.ConfigError(f'--mode={mode!r}; allowed: {MODES}.')
  config_lib.validate(config, training=_mode_sections(config, mode))
  if mode == 'plan':  # Shapes only: needs no data, workdir or writes.
    plan.print_plan(config)
    return
  workdir = paths.resolve(workdir)  # A local path, or a URL such as gs://.
  # The imported stages are any other mode's input ('all' imports in turn).
  if pretrained.enabled(config) and mode not in _IMPORTING_MODES:
    _import_stable_diffusion(config, workdir)
  if mode == 'sample':
    print(sample.sample_to_files(config, workdir))
    return
  if mode in edit.MODES:
    print(edit.edit_to_files(config, workdir, mode))
    return
  if mode == export.MODE:
    print(export.export_to_folder(config, workdir))
    return
  _check_batch_sizes(config, mode)
  data.check_available(config.data)
  if mode == 'evaluate':
    evaluate.run(config, workdir)
    print(f'evaluation written to {workdir_lib.eval_dir(workdir)}')
    return
  with preemption.catch_signals():
    run_chain(config, workdir, mode)
