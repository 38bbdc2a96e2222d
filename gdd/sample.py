"""Sampling a trained stage: the Python API and the `--mode=sample` CLI.

`load_sampler(workdir, 'teacher', num_steps=256)` rebuilds the network from
the stage's recorded config, loads its params export and returns a
`sampling.Sampler`: `sampler(rng, cond, w)` (or `sampler(rng, labels, w)`)
→ images, jitted with its batch split over all devices.
"""

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from gdd import (
  conditioning,
  config_lib,
  data,
  denoisers,
  errors,
  images,
  paths,
  sampling,
  workdir_lib,
)
from gdd.evaluation import npz
from gdd.stages import autoencoder, common, registry
from gdd.train import loop, sharding

# The PNG next to an npz shows at most this many samples; a text model's,
# at most this many captions (a row each).
MAX_PNG_SAMPLES = 100
MAX_CAPTION_ROWS = 16


class StageNotFoundError(errors.UserError, FileNotFoundError):
  """The workdir has no trained stage where a request needs one."""


def load_stage_config(
  workdir: epath.PathLike, stage: str
) -> ml_collections.ConfigDict:
  """The config a stage was trained with (its `config.json`)."""
  stage_dir = workdir_lib.stage_dir(workdir, stage)
  record = workdir_lib.read_config_record(stage_dir)
  if record is None:
    raise StageNotFoundError(
      f'No {stage!r} stage in {workdir} '
      f'({workdir_lib.config_record(stage_dir)} is missing). Train it first: '
      f'python -m gdd.main --config=... --workdir={workdir} --mode={stage}'
    )
  return config_lib.from_record(record)


def _resolve(
  workdir: epath.PathLike,
  stage: str,
  num_steps: int,
  sampler: str,
  w: float | None,
) -> str:
  """The stage folder that serves a request; errors name what exists.

  A kind that samples nothing (no `samplers`) explains itself in its
  `sampler_folder`.
  """
  kind = registry.get(stage)
  if kind.samplers and sampler not in kind.samplers:
    raise sampling.SampleRequestError(
      f'sampler={sampler!r} is not available for stage {stage!r}; '
      f'allowed: {kind.samplers}.'
    )
  return kind.sampler_folder(workdir, num_steps, sampler, w)


@dataclasses.dataclass(frozen=True)
class LoadedStage:
  """A finished stage folder's network and params, as sampling uses them.

  What `load_sampler` wraps into a `sampling.Sampler`; for code that runs
  the pieces itself (e.g. timing the text encoder, the U-Net steps and the
  decoder apart: benchmarks/sampling_speed.py).

  Attributes:
    config: the config the folder was trained with.
    model: its network (`common.build_model`'s kind, a student's with its
      w-embedding).
    make_denoiser: (params, cond, w) -> (z, λ) -> x̂ of the stage (the CFG
      pair for the teacher: `StageKind.nfe_per_step` network evaluations).
    params: the folder's exported params, on the devices.
    cond_kind: its conditioning (`conditioning.ClassConditioning` or
      `TextConditioning`).
    space: where it diffuses (`spaces.PixelSpace` or `LatentSpace`).
    space_params: the frozen autoencoder's params in a latent space, else
      None.
  """

  config: ml_collections.ConfigDict
  model: Any
  make_denoiser: denoisers.DenoiserFactory
  params: Any
  cond_kind: Any
  space: Any
  space_params: Any


def load_stage(
  workdir: epath.PathLike,
  stage: str,
  *,
  num_steps: int,
  sampler: str = 'ddim',
  w: float | None = None,
) -> LoadedStage:
  """The folder that serves `load_sampler`'s request, loaded; same args."""
  return load_folder(
    workdir, stage, _resolve(workdir, stage, num_steps, sampler, w)
  )


def load_folder(
  workdir: epath.PathLike, stage: str, folder: str
) -> LoadedStage:
  """A finished folder of the stage kind `stage`, loaded (see `LoadedStage`).

  `folder` is the workdir's stage folder, e.g. 'distill/4steps'.
  """
  config = load_stage_config(workdir, folder)
  info = data.get_info(config.data)
  model, make_denoiser = registry.get(stage).sampler_model(config, info)
  return LoadedStage(
    config=config,
    model=model,
    make_denoiser=make_denoiser,
    params=loop.load_exported_params(
      workdir_lib.stage_dir(workdir, folder), common.abstract_params(model)
    ),
    cond_kind=common.build_conditioning(config, info),
    space=common.build_space(config, info),
    space_params=autoencoder.load_space_params(config, workdir),
  )


def load_sampler(
  workdir: epath.PathLike,
  stage: str,
  *,
  num_steps: int,
  sampler: str = 'ddim',
  w: float | None = None,
  off_grid: str = 'step',
) -> sampling.Sampler:
  """The sampler of a finished stage.

  Args:
    workdir: the run's workdir.
    stage: 'teacher' (the CFG teacher, 2 NFE per step), 'guided' (the
      stage-one student, any step count), 'distill' (the distilled student;
      num_steps picks the round) or 'single_w' (the single-w baseline; w
      picks the chain, num_steps the round).
    num_steps: sampler steps N.
    sampler: 'ddim' (deterministic), 'stochastic' (students; GD Eq. 5, uses
      the N/2-step model) or 'ancestral' (teacher and stage-one student).
    w: only for 'single_w': the w its chain was trained for; the returned
      sampler then accepts only that w.
    off_grid: how a distilled round starts from a t_start between its grid
      points, 'step' or 'floor' (`sampling.start_steps`).

  Returns:
    A `sampling.Sampler`: `sampler(rng, cond, w)` → images [B, H, W, C] in
    [−1, 1], with cond {'label': int [B]} or the labels themselves (class
    models), or the captions (a list of strings; text models), w GD's
    guidance strength (diffusers' guidance_scale is 1 + w); `init`,
    `t_start` and `mask` start from an image (see `Sampler.__call__`; a
    distilled round takes its grid steps from the grid point at or below
    t_start: `sampler.start(t_start)` says where and with how many; a mask
    replaces for a plain model and conditions an inpainting one, as the
    stage's recorded `model.inpainting` says).
    Each batch size compiles once, on its first call or ahead of time with
    `sampler.compile(B)`.
  """
  loaded = load_stage(workdir, stage, num_steps=num_steps, sampler=sampler, w=w)
  return sampling.Sampler(
    functools.partial(
      sampling.make_sample_fn,
      loaded.config,
      loaded.space,
      loaded.make_denoiser,
      sampler=sampler,
    ),
    loaded.params,
    loaded.cond_kind,
    loaded.space,
    num_steps=num_steps,
    start_rule=functools.partial(
      sampling.start_steps,
      num_steps=num_steps,
      on_grid=registry.get(stage).on_grid,
      sampler=sampler,
      off_grid=off_grid,
    ),
    check_w=functools.partial(
      check_w,
      stage=stage,
      w_range=registry.get(stage).w_range(loaded.config, w),
    ),
    space_params=loaded.space_params,
  )


def check_w(w: float, *, stage: str, w_range: tuple[float, float]) -> None:
  """Raises SampleRequestError unless the stage can sample (encode) at w."""
  if not w_range[0] <= w <= w_range[1]:
    raise sampling.SampleRequestError(
      f'w={w!r} is outside the range this {stage} model allows '
      f'[{w_range[0]:g}, {w_range[1]:g}]; students are trained for '
      'config.guided.w_min..w_max only, a single-w model and an encoder for '
      'their one w.'
    )


def sample_to_files(
  config: ml_collections.ConfigDict, workdir: epath.PathLike
) -> str:
  """`--mode=sample`: writes an .npz (images uint8, labels) and a PNG grid.

  Conditions cycle through the classes 0..K−1, or for a text model through
  the held-out captions or the lines of `config.sample.prompts` (the npz
  then holds `captions`). Returns the npz path.
  """
  c = config.sample
  info = data.get_info(config.data)
  cond_kind = common.build_conditioning(config, info)
  cond = _requested_conditions(cond_kind, c)  # Checked before any loading.
  sampler = load_sampler(
    workdir,
    c.stage,
    num_steps=c.num_steps,
    sampler=c.sampler,
    w=c.w,
  )
  rng = jax.random.PRNGKey(c.seed)
  samples = images.to_uint8(
    run_batches(
      lambda index, batch_cond: sampler(
        jax.random.fold_in(rng, index), batch_cond, c.w
      ),
      c.batch_size,
      cond,
    )
  )

  output = npz_output(
    c.output,
    workdir_lib.samples_file(
      workdir, stage=c.stage, sampler=c.sampler, num_steps=c.num_steps, w=c.w
    ),
  )
  if jax.process_index() > 0:  # Every process holds the samples; one writes.
    return os.fspath(output)
  saved = cond_kind.saved_arrays(cond)
  npz.atomic_savez(output, images=samples, **saved)
  upscale = images.display_scale(info.image_shape[0])
  if 'captions' in saved:
    png = _caption_grid(samples, saved['captions'], upscale)
    upscale = 1
  else:
    shown = samples[:MAX_PNG_SAMPLES]
    num_cols = min(info.num_classes, 10, len(shown))
    png = images.make_grid(shown, num_rows=math.ceil(len(shown) / num_cols))
  images.save_png(output.with_suffix('.png'), png, upscale=upscale)
  return os.fspath(output)


def run_batches(fn: Callable[..., jax.Array], batch_size: int, *batched):
  """`fn(index, *slices)` over `batched`, `batch_size` examples at a time.

  `batched` are arrays or conds with one leading batch axis each (None
  passes through as None); the results are brought to the host and
  concatenated, so a run of any size fits the devices' memory.
  """
  num = conditioning.batch_size(batched[0])
  chunks = []
  for index, begin in enumerate(range(0, num, batch_size)):
    end = begin + batch_size
    slices = [
      None if b is None else conditioning.take(b, begin, end) for b in batched
    ]
    chunks.append(sharding.to_host(fn(index, *slices)))
  return np.concatenate(chunks)


def npz_output(output: str, default: epath.PathLike) -> epath.Path:
  """The .npz a command writes: `output` if set, else `default`, with the
  suffix np.savez would add, so that the path returned is the file written."""
  path = paths.resolve(output or default)
  if not path.name.endswith('.npz'):
    path = path.with_name(path.name + '.npz')
  return path


def _caption_grid(
  samples: np.ndarray, captions: np.ndarray, upscale: int
) -> np.ndarray:
  """One row per caption (the first 16), its first 10 samples, titled."""
  titles = list(dict.fromkeys(captions.tolist()))[:MAX_CAPTION_ROWS]
  per_row = min(10, max(int(np.sum(captions == t)) for t in titles))
  rows = []
  for title in titles:
    row = samples[captions == title][:per_row]
    pad = np.zeros((per_row - len(row), *row.shape[1:]), row.dtype)
    rows.append(np.concatenate([row, pad]))
  grid = images.make_grid(np.concatenate(rows), num_rows=len(titles))
  return images.with_row_titles(grid, titles, upscale)


def _requested_conditions(cond_kind, sample_config) -> conditioning.Cond:
  """`num_samples` conditions: the prompts file's lines cycled, or the
  conditioning's own cycle (classes, held-out captions)."""
  num = sample_config.num_samples
  if not sample_config.prompts:
    return cond_kind.cycled(num)
  if not isinstance(cond_kind, conditioning.TextConditioning):
    raise sampling.SampleRequestError(
      'config.sample.prompts is for text-conditional models; this one is '
      'class-conditional (its samples cycle through the classes).'
    )
  path = paths.resolve(sample_config.prompts)
  if not path.is_file():
    raise StageNotFoundError(
      f'config.sample.prompts={sample_config.prompts!r}: no such file '
      '(one caption per line).'
    )
  prompts = [line.strip() for line in path.read_text().splitlines()]
  prompts = [p for p in prompts if p]
  if not prompts:
    raise sampling.SampleRequestError(
      f'config.sample.prompts file {path} has no caption (one per line).'
    )
  return cond_kind.from_request([prompts[i % len(prompts)] for i in range(num)])
