"""Sampling a trained stage: the Python API and the `--mode=sample` CLI.

`load_sampler(workdir, 'teacher', num_steps=256)` rebuilds the network from
the stage's recorded config, loads its params export and returns a jitted
`(rng, labels, w) -> images` function whose batch is split over all devices.
"""

import functools
import json
import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gdd import data, images
from gdd.stages import common, teacher
from gdd.train import checkpointing, loop, sharding

SamplerFn = Callable[[jax.Array, jnp.ndarray, float], jnp.ndarray]
# The PNG next to an npz shows at most this many samples.
MAX_PNG_SAMPLES = 100


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def load_stage_config(workdir: str, stage: str) -> ml_collections.ConfigDict:
  """The config a stage was trained with (its `config.json`)."""
  path = os.path.join(stage_dir(workdir, stage), 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(
      f'No {stage!r} stage in {workdir} ({path} is missing). Train it first: '
      f'python -m gdd.main --config=... --workdir={workdir} --mode={stage}'
    )
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_sampler(
  workdir: str, stage: str, *, num_steps: int, sampler: str = 'ddim'
) -> SamplerFn:
  """A jitted sampler of a finished stage.

  Args:
    workdir: the run's workdir (holding `<stage>/params`).
    stage: 'teacher'.
    num_steps: sampler steps N (the guided teacher costs 2N NFE).
    sampler: 'ddim' (deterministic) or 'ancestral' (teacher only).

  Returns:
    `(rng, labels, w) -> images`: labels int [B] in [0, num_classes), w the
    guidance strength (GD's w; diffusers' guidance_scale is 1 + w), images
    [B, H, W, C] float32 in [−1, 1]. The first call for a batch size
    compiles; later calls with that size do not.
  """
  if stage != teacher.NAME:
    raise ValueError(f'stage={stage!r}; allowed: {teacher.NAME!r}.')
  if sampler not in ('ddim', 'ancestral'):
    raise ValueError(
      f"sampler={sampler!r}; the teacher allows 'ddim' or 'ancestral'."
    )
  config = load_stage_config(workdir, stage)
  info = data.get_info(config.data)
  model = common.build_model(config, info)
  mesh = sharding.make_mesh()
  rep = sharding.replicated(mesh)
  target = jax.eval_shape(
    functools.partial(common.init_params, model), jax.random.PRNGKey(0)
  )
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), target
  )
  params = checkpointing.load_params(
    loop.params_dir(stage_dir(workdir, stage)), target
  )
  sample_fn = teacher.make_sample_fn(
    config, model, num_steps=num_steps, sampler=sampler
  )
  jitted = jax.jit(
    sample_fn,
    in_shardings=(rep, rep, sharding.batch_sharded(mesh), rep),
    out_shardings=sharding.batch_sharded(mesh),
  )
  num_devices = mesh.devices.size

  def sample(rng: jax.Array, labels, w) -> jnp.ndarray:
    labels = np.asarray(labels, np.int32)
    if labels.ndim != 1 or labels.min() < 0 or labels.max() >= info.num_classes:
      raise ValueError(
        f'labels must be a 1-D int array in [0, {info.num_classes}); got '
        f'shape {labels.shape}, range [{labels.min()}, {labels.max()}].'
      )
    if not w >= 0:
      raise ValueError(f'w={w!r}; the guidance strength w must be >= 0.')
    n = len(labels)
    padded = np.pad(labels, (0, -n % num_devices), mode='edge')
    return jitted(params, rng, padded, jnp.float32(w))[:n]

  sample.jitted = jitted
  return sample


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
    workdir, c.stage, num_steps=c.num_steps, sampler=c.sampler
  )
  info = data.get_info(load_stage_config(workdir, c.stage).data)
  labels = np.arange(c.num_samples, dtype=np.int32) % info.num_classes
  rng = jax.random.PRNGKey(c.seed)
  chunks = []
  for index, start in enumerate(range(0, c.num_samples, c.batch_size)):
    batch_labels = labels[start : start + c.batch_size]
    batch = sampler(jax.random.fold_in(rng, index), batch_labels, c.w)
    chunks.append(images.to_uint8(jax.device_get(batch)))
  samples = np.concatenate(chunks)

  output = c.output or default_output(workdir, c)
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
