"""Sampling a trained stage: the Python API and the `--mode=sample` CLI.

`load_sampler(workdir, 'teacher', num_steps=256)` rebuilds the network from
the stage's recorded config, loads its params export and returns a jitted
`(rng, labels, w) -> images` function whose batch is split over all devices.
"""

import functools
import math
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from gdd import data, errors, images, paths, workdir_lib
from gdd.evaluation import npz
from gdd.models import UNet
from gdd.stages import common, guided, teacher
from gdd.train import loop, sharding

SamplerFn = Callable[[jax.Array, jnp.ndarray, float], jnp.ndarray]
# Which samplers each stage offers.
STAGE_SAMPLERS = {
  'teacher': ('ddim', 'ancestral'),
  'guided': ('ddim', 'stochastic', 'ancestral'),
  'distill': ('ddim', 'stochastic'),
  'single_w': ('ddim', 'stochastic'),
}
# The PNG next to an npz shows at most this many samples.
MAX_PNG_SAMPLES = 100


class SampleRequestError(errors.UserError, ValueError):
  """A sampling request the workdir's models cannot serve; says what can."""


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
  return ml_collections.ConfigDict(record)


def _resolve(
  workdir: epath.PathLike,
  stage: str,
  num_steps: int,
  sampler: str,
  w: float | None,
) -> str:
  """The stage folder that serves a request; errors name what exists."""
  if stage not in STAGE_SAMPLERS:
    raise SampleRequestError(
      f'stage={stage!r}; allowed: {tuple(STAGE_SAMPLERS)}.'
    )
  if sampler not in STAGE_SAMPLERS[stage]:
    raise SampleRequestError(
      f'sampler={sampler!r} is not available for stage {stage!r}; '
      f'allowed: {STAGE_SAMPLERS[stage]}.'
    )
  if stage in ('teacher', 'guided'):
    return stage
  if stage == 'single_w' and w is None:
    raise SampleRequestError(
      "stage='single_w' needs w: each single-w model is trained for one "
      f'w; trained: {workdir_lib.single_w_values(workdir) or "none"}.'
    )
  round_w = w if stage == 'single_w' else None
  # The stochastic N-step sampler jumps with the N/2-step model (§7).
  model_steps = num_steps // 2 if sampler == 'stochastic' else num_steps
  folder = workdir_lib.round_name(stage, model_steps, round_w)
  if sampler == 'stochastic' and num_steps % 2:
    raise SampleRequestError(
      f'num_steps={num_steps}: the stochastic sampler needs an even step '
      'count (it uses the model distilled for num_steps / 2).'
    )
  if not workdir_lib.is_finished(workdir_lib.stage_dir(workdir, folder)):
    distilled = workdir_lib.finished_rounds(workdir, stage, w=round_w)
    raise SampleRequestError(
      f'No finished distillation round for {model_steps} steps in '
      f'{workdir_lib.rounds_dir(workdir, stage, round_w)}; distilled step '
      'counts: '
      f'{distilled or "none"}. '
      + (
        'The stochastic sampler needs the round for num_steps / 2.'
        if sampler == 'stochastic'
        else ''
      )
    )
  return folder


def load_sampler(
  workdir: epath.PathLike,
  stage: str,
  *,
  num_steps: int,
  sampler: str = 'ddim',
  w: float | None = None,
) -> SamplerFn:
  """A jitted sampler of a finished stage.

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

  Returns:
    `(rng, labels, w) -> images`: rng one key (`jax.random.key(seed)` or
    `jax.random.PRNGKey(seed)`), labels int [B] in [0, num_classes), w the
    guidance strength (GD's w; diffusers' guidance_scale is 1 + w), images
    [B, H, W, C] float32 in [−1, 1]. The first call for a batch size
    compiles; later calls with that size do not. `sampler.compile(B)`
    compiles ahead of time and returns the seconds it took, so that timed
    calls measure sampling only; `sampler.compiled_batch_sizes()` lists the
    (device-padded) batch sizes compiled so far.
  """
  folder = _resolve(workdir, stage, num_steps, sampler, w)
  config = load_stage_config(workdir, folder)
  info = data.get_info(config.data)
  model, make_denoiser, w_range = _stage_model(config, info, stage, w)
  sample_fn = common.make_sample_fn(
    config, model, make_denoiser, num_steps=num_steps, sampler=sampler
  )
  params = loop.load_exported_params(
    workdir_lib.stage_dir(workdir, folder), common.abstract_params(model)
  )
  check_request = functools.partial(
    _check_request, stage=stage, w_range=w_range, info=info
  )
  return _sharded_sampler(sample_fn, params, check_request)


def _stage_model(
  config: ml_collections.ConfigDict,
  info: data.DatasetInfo,
  stage: str,
  w: float | None,
) -> tuple[UNet, common.DenoiserFactory, tuple[float, float]]:
  """(network, denoiser factory, allowed w range) of a stage kind."""
  if stage == 'teacher':
    model = common.build_model(config, info)
    return (
      model,
      functools.partial(teacher.guided_denoiser, model),
      (0.0, float('inf')),
    )
  if stage == 'single_w':
    model = common.build_model(config, info)
    return model, functools.partial(common.plain_denoiser, model), (w, w)
  model = guided.build_student(config, info)
  return (
    model,
    functools.partial(common.plain_denoiser, model),
    (config.guided.w_min, config.guided.w_max),
  )


def _check_request(
  labels: np.ndarray,
  w: float,
  *,
  stage: str,
  w_range: tuple[float, float],
  info: data.DatasetInfo,
) -> None:
  """Raises SampleRequestError unless the stage can sample `labels` at w."""
  if labels.ndim != 1 or labels.min() < 0 or labels.max() >= info.num_classes:
    raise SampleRequestError(
      f'labels must be a 1-D int array in [0, {info.num_classes}); got '
      f'shape {labels.shape}, range [{labels.min()}, {labels.max()}].'
    )
  if not w_range[0] <= w <= w_range[1]:
    raise SampleRequestError(
      f'w={w!r} is outside the range this {stage} model allows '
      f'[{w_range[0]:g}, {w_range[1]:g}]; students are trained for '
      'config.guided.w_min..w_max only, a single-w model for its one w.'
    )


def _sharded_sampler(
  sample_fn, params, check_request: Callable[[np.ndarray, float], None]
) -> SamplerFn:
  """`sample_fn` jitted over all devices, compiled once per batch size."""
  mesh = sharding.make_mesh()
  rep = sharding.replicated(mesh)
  batch = sharding.batch_sharded(mesh)
  # Samples come back replicated: on a multi-host mesh every process can
  # then read all of them (to save, score or show).
  jitted = jax.jit(
    sample_fn, in_shardings=(rep, rep, batch, rep), out_shardings=rep
  )
  num_devices = mesh.devices.size
  executables = {}

  def executable(padded_size: int):
    """The compiled sampler for one padded batch size (compiled once)."""
    if padded_size not in executables:
      # Shapes only: host arrays cannot be lowered with a multi-host sharding.
      executables[padded_size] = jitted.lower(
        params,
        jax.ShapeDtypeStruct((2,), np.uint32, sharding=rep),
        jax.ShapeDtypeStruct((padded_size,), np.int32, sharding=batch),
        jax.ShapeDtypeStruct((), np.float32, sharding=rep),
      ).compile()
      sharding.sync_processes('sampler_compiled')
    return executables[padded_size]

  def compile_for(batch_size: int) -> float:
    """Compiles for `batch_size` now; returns the seconds it took."""
    start = time.perf_counter()
    executable(batch_size + -batch_size % num_devices)
    return time.perf_counter() - start

  def sample(rng: jax.Array, labels, w) -> jnp.ndarray:
    rng = _raw_key(rng)
    labels = np.asarray(labels, np.int32)
    check_request(labels, w)
    n = len(labels)
    padded = np.pad(labels, (0, -n % num_devices), mode='edge')
    # Global arrays: jit refuses host arrays with a sharding on many hosts.
    samples = executable(len(padded))(
      params,
      sharding.from_host(rng, rep),
      sharding.from_host(padded, batch),
      sharding.from_host(np.float32(w), rep),
    )
    return samples[:n]

  sample.compile = compile_for
  sample.compiled_batch_sizes = lambda: sorted(executables)
  return sample


def _raw_key(rng: jax.Array) -> jax.Array:
  """`rng` as the uint32[2] raw key the sampler is compiled for.

  Accepts `jax.random.key(seed)` (typed, unwrapped here) as well as
  `jax.random.PRNGKey(seed)`, so callers need not know which one it wants.
  """
  dtype = getattr(rng, 'dtype', None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
    dtype = rng.dtype
  if dtype != np.uint32 or np.shape(rng) != (2,):
    raise SampleRequestError(
      'rng must be one key, jax.random.key(seed) or jax.random.PRNGKey(seed); '
      f'got {type(rng).__name__ if dtype is None else dtype}'
      f'{list(np.shape(rng))}.'
    )
  return rng


def sample_to_files(
  config: ml_collections.ConfigDict, workdir: epath.PathLike
) -> str:
  """`--mode=sample`: writes an .npz (images uint8, labels) and a PNG grid.

  Labels cycle through the classes 0..K−1. Returns the npz path.
  """
  c = config.sample
  sampler = load_sampler(
    workdir,
    c.stage,
    num_steps=c.num_steps,
    sampler=c.sampler,
    w=c.w if c.stage == 'single_w' else None,
  )
  info = data.get_info(config.data)
  labels = np.arange(c.num_samples, dtype=np.int32) % info.num_classes
  rng = jax.random.PRNGKey(c.seed)
  chunks = []
  for index, start in enumerate(range(0, c.num_samples, c.batch_size)):
    batch_labels = labels[start : start + c.batch_size]
    batch = sampler(jax.random.fold_in(rng, index), batch_labels, c.w)
    chunks.append(images.to_uint8(sharding.to_host(batch)))
  samples = np.concatenate(chunks)

  output = paths.resolve(
    c.output
    or workdir_lib.samples_file(
      workdir, stage=c.stage, sampler=c.sampler, num_steps=c.num_steps, w=c.w
    )
  )
  # The suffix np.savez would add to a file name, so that the path returned
  # is the file written.
  if not output.name.endswith('.npz'):
    output = output.with_name(output.name + '.npz')
  if jax.process_index() > 0:  # Every process holds the samples; one writes.
    return os.fspath(output)
  npz.atomic_savez(output, images=samples, labels=labels)
  shown = samples[:MAX_PNG_SAMPLES]
  num_cols = min(info.num_classes, 10, len(shown))
  images.save_png(
    output.with_suffix('.png'),
    images.make_grid(shown, num_rows=math.ceil(len(shown) / num_cols)),
    upscale=images.display_scale(info.image_shape[0]),
  )
  return os.fspath(output)
