"""Sampling a trained stage: the Python API and the `--mode=sample` CLI.

`load_sampler(workdir, 'teacher', num_steps=256)` rebuilds the network from
the stage's recorded config, loads its params export and returns a jitted
`(rng, labels, w) -> images` function whose batch is split over all devices.
"""

import functools
import json
import math
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gdd import data, errors, images
from gdd.stages import common, guided, progressive, teacher
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


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def load_stage_config(workdir: str, stage: str) -> ml_collections.ConfigDict:
  """The config a stage was trained with (its `config.json`)."""
  path = os.path.join(stage_dir(workdir, stage), 'config.json')
  if not os.path.exists(path):
    raise StageNotFoundError(
      f'No {stage!r} stage in {workdir} ({path} is missing). Train it first: '
      f'python -m gdd.main --config=... --workdir={workdir} --mode={stage}'
    )
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _resolve(
  workdir: str, stage: str, num_steps: int, sampler: str, w: float | None
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
  if stage == 'distill':
    root, stage_name = 'distill', progressive.stage_name
  else:
    if w is None:
      raise SampleRequestError(
        "stage='single_w' needs w: each single-w model is trained for one "
        f'w; trained: {single_w_values(workdir) or "none"}.'
      )
    root = progressive.single_w_root(w)
    stage_name = functools.partial(progressive.single_w_stage_name, w)
  # The stochastic N-step sampler jumps with the N/2-step model (§7).
  model_steps = num_steps // 2 if sampler == 'stochastic' else num_steps
  folder = stage_name(model_steps)
  if sampler == 'stochastic' and num_steps % 2:
    raise SampleRequestError(
      f'num_steps={num_steps}: the stochastic sampler needs an even step '
      'count (it uses the model distilled for num_steps / 2).'
    )
  if not os.path.isdir(loop.params_dir(stage_dir(workdir, folder))):
    distilled = finished_rounds(workdir, root)
    raise SampleRequestError(
      f'No finished distillation round for {model_steps} steps in '
      f'{os.path.join(workdir, root)}; distilled step counts: '
      f'{distilled or "none"}. '
      + (
        'The stochastic sampler needs the round for num_steps / 2.'
        if sampler == 'stochastic'
        else ''
      )
    )
  return folder


def finished_rounds(workdir: str, root: str = 'distill') -> list[int]:
  """Student step counts of the finished rounds under `root`, descending."""
  root = stage_dir(workdir, root)
  if not os.path.isdir(root):
    return []
  counts = [
    int(name.removesuffix('steps'))
    for name in os.listdir(root)
    if name.endswith('steps')
    and os.path.isdir(loop.params_dir(os.path.join(root, name)))
  ]
  return sorted(counts, reverse=True)


def single_w_values(workdir: str) -> list[float]:
  """The w of every single-w chain in the workdir."""
  root = stage_dir(workdir, 'single_w')
  if not os.path.isdir(root):
    return []
  return sorted(float(name[1:]) for name in os.listdir(root))


def load_sampler(
  workdir: str,
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
  if stage == 'teacher':
    model = common.build_model(config, info)
    make_denoiser = functools.partial(teacher.guided_denoiser, model)
    w_range = (0.0, float('inf'))
  elif stage == 'single_w':
    model = common.build_model(config, info)
    make_denoiser = functools.partial(common.plain_denoiser, model)
    w_range = (w, w)
  else:
    model = guided.build_student(config, info)
    make_denoiser = functools.partial(common.plain_denoiser, model)
    w_range = (config.guided.w_min, config.guided.w_max)
  sample_fn = common.make_sample_fn(
    config, model, make_denoiser, num_steps=num_steps, sampler=sampler
  )
  params = loop.load_exported_params(
    stage_dir(workdir, folder), common.abstract_params(model)
  )
  mesh = sharding.make_mesh()
  rep = sharding.replicated(mesh)
  jitted = jax.jit(
    sample_fn,
    in_shardings=(rep, rep, sharding.batch_sharded(mesh), rep),
    out_shardings=sharding.batch_sharded(mesh),
  )
  num_devices = mesh.devices.size
  executables = {}

  def executable(padded_size: int):
    """The compiled sampler for one padded batch size (compiled once)."""
    if padded_size not in executables:
      executables[padded_size] = jitted.lower(
        params,
        jax.random.PRNGKey(0),
        np.zeros(padded_size, np.int32),
        jnp.float32(0),
      ).compile()
    return executables[padded_size]

  def compile_for(batch_size: int) -> float:
    """Compiles for `batch_size` now; returns the seconds it took."""
    start = time.perf_counter()
    executable(batch_size + -batch_size % num_devices)
    return time.perf_counter() - start

  def sample(rng: jax.Array, labels, w) -> jnp.ndarray:
    rng = _raw_key(rng)
    labels = np.asarray(labels, np.int32)
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
    n = len(labels)
    padded = np.pad(labels, (0, -n % num_devices), mode='edge')
    return executable(len(padded))(params, rng, padded, jnp.float32(w))[:n]

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


def default_output(workdir: str, sample_config) -> str:
  c = sample_config
  name = f'{c.stage}_{c.sampler}_{c.num_steps}steps_w{c.w:g}.npz'
  return os.path.join(workdir, 'samples', name)


def sample_to_files(config: ml_collections.ConfigDict, workdir: str) -> str:
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
    chunks.append(images.to_uint8(jax.device_get(batch)))
  samples = np.concatenate(chunks)

  output = c.output or default_output(workdir, c)
  # np.savez would add the suffix itself; add it here so the path returned
  # is the file written.
  if not output.endswith('.npz'):
    output += '.npz'
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  np.savez(output, images=samples, labels=labels)
  shown = samples[:MAX_PNG_SAMPLES]
  num_cols = min(info.num_classes, 10, len(shown))
  images.save_png(
    os.path.splitext(output)[0] + '.png',
    images.make_grid(shown, num_rows=math.ceil(len(shown) / num_cols)),
    upscale=images.display_scale(info.image_shape[0]),
  )
  return output
