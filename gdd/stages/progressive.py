"""Stage two: progressive halving with w (GD §3.2, method.md §6).

Round N → N/2: the student starts as a copy of the N-step teacher (the
stage-one model for the first round), and learns to take one DDIM step of
length 2/N where the teacher takes two of length 1/N, at the same w.

Also the paper's "single-w" baseline (method.md §8.3): the same rounds at one
fixed w without stage one, so the first teacher is the CFG teacher itself
(2 NFE per step) and each w needs its own chain of students.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from gdd import conditioning, config_lib, data, denoisers, sampling, workdir_lib
from gdd.diffusion import distillation, losses, schedules
from gdd.stages import Stage, common, guided


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
  raise ValueError(
    f'time_grid={time_grid!r}; allowed: {config_lib.TIME_GRIDS}.'
  )


def loss_fn(
  params,
  teacher_params,
  batch,
  rng: jax.Array,
  *,
  student,
  teacher_denoiser: denoisers.DenoiserFactory,
  cond_kind,
  teacher_num_steps: int,
  config: ml_collections.ConfigDict,
  fixed_w: float | None = None,
):
  """Student x̂ at z_t against the exact two-teacher-step target x̃.

  w ~ U[w_min, w_max] per example, or `fixed_w` for the single-w baseline.
  """
  x, cond = batch['image'], cond_kind.from_batch(batch)
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
  if fixed_w is None:
    w = guided.sample_w(w_rng, batch_size, config)
  else:
    w = jnp.full((batch_size,), fixed_w, jnp.float32)
  target = jax.lax.stop_gradient(
    distillation.two_step_target(
      teacher_denoiser(teacher_params, cond, w),
      z,
      index,
      teacher_num_steps=teacher_num_steps,
      logsnr_fn=schedule,
    )
  )
  x_pred = denoisers.plain(student, params, cond, w)(z, logsnr)
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
  return _make_round(
    config,
    name=workdir_lib.round_name('distill', student_num_steps),
    student=student,
    teacher_denoiser=functools.partial(denoisers.plain, student),
    info=info,
    teacher_params=teacher_params,
    student_num_steps=student_num_steps,
    sample_ws=tuple(config.grids.sample_ws),
  )


def make_single_w_stage(
  config: ml_collections.ConfigDict,
  info: data.DatasetInfo,
  teacher_params,
  *,
  student_num_steps: int,
  from_cfg_teacher: bool,
) -> Stage:
  """A single-w round at w = config.single_w.w.

  The student has the teacher's architecture (no w input). The first round
  (`from_cfg_teacher`) distils the CFG teacher, whose guided x̂ costs two
  evaluations; later rounds distil the previous single-w student.
  """
  model = common.build_model(config, info)
  if from_cfg_teacher:
    teacher_denoiser = functools.partial(
      denoisers.guided, model, conditioning.for_data(info)
    )
  else:
    teacher_denoiser = functools.partial(denoisers.plain, model)
  w = config.single_w.w
  return _make_round(
    config,
    name=workdir_lib.round_name('single_w', student_num_steps, w),
    student=model,
    teacher_denoiser=teacher_denoiser,
    info=info,
    teacher_params=teacher_params,
    student_num_steps=student_num_steps,
    sample_ws=(w,),
    fixed_w=w,
  )


def _make_round(
  config,
  *,
  name,
  student,
  teacher_denoiser,
  info,
  teacher_params,
  student_num_steps,
  sample_ws,
  fixed_w=None,
) -> Stage:
  return Stage(
    name=name,
    train_config=config.distill,
    # The student starts as a copy of its teacher.
    init_params=lambda rng, frozen: jax.tree.map(jnp.copy, frozen),
    loss_fn=functools.partial(
      loss_fn,
      student=student,
      teacher_denoiser=teacher_denoiser,
      cond_kind=conditioning.for_data(info),
      teacher_num_steps=2 * student_num_steps,
      config=config,
      fixed_w=fixed_w,
    ),
    frozen_params=teacher_params,
    sample_panels=_sample_panels(
      config,
      common.build_space(config, info),
      student,
      teacher_denoiser,
      student_num_steps,
    ),
    sample_ws=sample_ws,
  )


def _sample_panels(config, space, student, teacher_denoiser, student_num_steps):
  """Grid panels of an N-step round, all from the same noise.

  The round's teacher at 2N DDIM steps, the student at N DDIM steps, and the
  stochastic 2N-step sampler that this N-step model drives (method.md §7).
  """
  n = student_num_steps
  student_denoiser = functools.partial(denoisers.plain, student)

  def panel(num_steps, sampler, use_teacher):
    sample_fn = sampling.make_sample_fn(
      config,
      space,
      teacher_denoiser if use_teacher else student_denoiser,
      num_steps=num_steps,
      sampler=sampler,
    )
    return lambda params, frozen, rng, cond, w: sample_fn(
      frozen if use_teacher else params, rng, cond, w
    )

  return {
    f'teacher_{2 * n}step_ddim': panel(2 * n, 'ddim', use_teacher=True),
    f'student_{n}step_ddim': panel(n, 'ddim', use_teacher=False),
    f'student_{2 * n}step_stochastic': panel(
      2 * n, 'stochastic', use_teacher=False
    ),
  }
