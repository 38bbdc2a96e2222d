"""Stage two: progressive halving with w (GD §3.2, method.md §6).

Round N → N/2: the student starts as a copy of the N-step teacher (the
stage-one model for the first round), and learns to take one DDIM step of
length 2/N where the teacher takes two of length 1/N, at the same w.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from gdd import data
from gdd.diffusion import distillation, losses, schedules
from gdd.stages import Stage, common, guided

TIME_GRIDS = ('fine', 'student')


def stage_name(student_num_steps: int) -> str:
  """Workdir folder of the round that trains an N-step student."""
  return f'distill/{student_num_steps}steps'


def round_step_counts(config: ml_collections.ConfigDict) -> list[int]:
  """Student step counts of the rounds, e.g. [512, 256, …, 1]."""
  counts, n = [], config.distill.initial_num_steps
  while n > config.distill.final_num_steps:
    n //= 2
    counts.append(n)
  return counts


def sample_grid_index(
  rng: jax.Array, batch_size: int, teacher_num_steps: int, time_grid: str
) -> jnp.ndarray:
  """Grid indices i (t = i/N) of the training times.

  'fine': uniform over the teacher's grid {1, …, N}, so the student also
  learns the off-grid times the stochastic sampler visits (method.md §6);
  'student': uniform over the student's grid {2, 4, …, N}.
  """
  if time_grid == 'fine':
    return jax.random.randint(rng, (batch_size,), 1, teacher_num_steps + 1)
  if time_grid == 'student':
    half = teacher_num_steps // 2
    return 2 * jax.random.randint(rng, (batch_size,), 1, half + 1)
  raise ValueError(f'time_grid={time_grid!r}; allowed: {TIME_GRIDS}.')


def loss_fn(
  params,
  teacher_params,
  batch,
  rng: jax.Array,
  *,
  student,
  teacher_num_steps: int,
  config: ml_collections.ConfigDict,
):
  """Student x̂ at z_t against the exact two-teacher-step target x̃."""
  x, labels = batch['image'], batch['label']
  grid_rng, noise_rng, w_rng = jax.random.split(rng, 3)
  batch_size = x.shape[0]
  index = sample_grid_index(
    grid_rng, batch_size, teacher_num_steps, config.distill.time_grid
  )
  schedule = common.logsnr_fn(config)
  logsnr = schedule(index.astype(jnp.float32) / teacher_num_steps)
  z = schedules.diffuse(
    x, jax.random.normal(noise_rng, x.shape, jnp.float32), logsnr
  )
  w = guided.sample_w(w_rng, batch_size, config)
  teacher_x = guided.student_denoiser(student, teacher_params, labels, w)
  target = jax.lax.stop_gradient(
    distillation.two_step_target(
      teacher_x,
      z,
      index,
      teacher_num_steps=teacher_num_steps,
      logsnr_fn=schedule,
    )
  )
  x_pred = common.predict_x(student, params, z, logsnr, labels, w)
  loss = jnp.mean(
    losses.weighted_loss(
      x_pred, target, logsnr, weighting=config.diffusion.loss_weighting
    )
  )
  return loss, {'loss': loss}


def make_stage(
  config: ml_collections.ConfigDict,
  info: data.DatasetInfo,
  teacher_params,
  *,
  student_num_steps: int,
) -> Stage:
  """The round that distils a 2N-step teacher into an N-step student."""
  student = guided.build_student(config, info)
  sample_fn = guided.make_sample_fn(
    config, student, num_steps=student_num_steps
  )
  return Stage(
    name=stage_name(student_num_steps),
    train_config=config.distill,
    # The student starts as a copy of its teacher.
    init_params=lambda rng, frozen: jax.tree.map(jnp.copy, frozen),
    loss_fn=functools.partial(
      loss_fn,
      student=student,
      teacher_num_steps=2 * student_num_steps,
      config=config,
    ),
    frozen_params=teacher_params,
    sample_fn=lambda params, frozen, rng, labels, w: sample_fn(
      params, rng, labels, w
    ),
  )
