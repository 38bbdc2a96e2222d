"""Stage one: one student for every guidance strength w (GD §3.1, method §5).

The student x̂_η(z, c, w) starts as a copy of the teacher's EMA params plus a
zero-initialised w-embedding, so at step 0 it computes exactly the
conditional teacher. It learns to match the teacher's guided prediction
(1 + w) x̂(z, c) − w x̂(z, ∅) on real data for w ~ U[w_min, w_max].
"""

import functools

import flax
import jax
import jax.numpy as jnp
import ml_collections

from gdd import data
from gdd.diffusion import guidance, losses, schedules
from gdd.models import UNet
from gdd.stages import Stage, common
from gdd.stages import teacher as teacher_stage

NAME = 'guided'


def build_student(
  config: ml_collections.ConfigDict, info: data.DatasetInfo
) -> UNet:
  """The w-conditioned student; dropout 0 (method.md §5, a choice)."""
  student_config = ml_collections.ConfigDict(config.to_dict())
  student_config.model.dropout = 0.0
  return common.build_model(
    student_config, info, use_w_embedding=True, w_max=config.guided.w_max
  )


def init_from_teacher(student: UNet, rng: jax.Array, teacher_params) -> dict:
  """Student params: the teacher's everywhere, fresh only in `w_embedding`."""
  fresh = flax.traverse_util.flatten_dict(common.init_params(student, rng))
  teacher_flat = flax.traverse_util.flatten_dict(teacher_params)
  extra = {k for k in fresh if k not in teacher_flat}
  if any(k[0] != 'w_embedding' for k in extra) or set(teacher_flat) - set(
    fresh
  ):
    raise ValueError(
      'The teacher params do not fit the student network: only the '
      f'w_embedding may differ, but the student has extra {sorted(extra)} '
      f'and lacks {sorted(set(teacher_flat) - set(fresh))}. Was the teacher '
      'trained with the same config.model?'
    )
  merged = {k: teacher_flat.get(k, v) for k, v in fresh.items()}
  return flax.traverse_util.unflatten_dict(merged)


def sample_w(rng: jax.Array, batch_size: int, config) -> jnp.ndarray:
  """w ~ U[w_min, w_max] per example."""
  return jax.random.uniform(
    rng,
    (batch_size,),
    minval=config.guided.w_min,
    maxval=config.guided.w_max,
  )


def loss_fn(
  params,
  teacher_params,
  batch,
  rng: jax.Array,
  *,
  student: UNet,
  teacher: UNet,
  config: ml_collections.ConfigDict,
):
  """snr_trunc loss between the student and the teacher's guided x̂^w."""
  x, labels = batch['image'], batch['label']
  t_rng, noise_rng, w_rng = jax.random.split(rng, 3)
  batch_size = x.shape[0]
  logsnr = common.logsnr_fn(config)(jax.random.uniform(t_rng, (batch_size,)))
  z = schedules.diffuse(
    x, jax.random.normal(noise_rng, x.shape, jnp.float32), logsnr
  )
  w = sample_w(w_rng, batch_size, config)
  # Teacher in eval mode, unclipped, outside the gradient.
  teacher_x = functools.partial(common.predict_x, teacher, teacher_params)
  target = jax.lax.stop_gradient(
    guidance.guided_x(
      teacher_x, z, logsnr, labels, w, null_label=teacher.config.num_classes
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
  config: ml_collections.ConfigDict, info: data.DatasetInfo, teacher_params
) -> Stage:
  """The stage-one `Stage`; `teacher_params` are the teacher's EMA params."""
  student = build_student(config, info)
  teacher = common.build_model(config, info)
  num_steps = config.grids.teacher_num_steps
  student_sample = common.make_sample_fn(
    config,
    student,
    functools.partial(common.plain_denoiser, student),
    num_steps=num_steps,
  )
  teacher_sample = common.make_sample_fn(
    config,
    teacher,
    functools.partial(teacher_stage.guided_denoiser, teacher),
    num_steps=num_steps,
  )
  return Stage(
    name=NAME,
    train_config=config.guided,
    init_params=functools.partial(init_from_teacher, student),
    loss_fn=functools.partial(
      loss_fn, student=student, teacher=teacher, config=config
    ),
    frozen_params=teacher_params,
    sample_ws=tuple(config.grids.sample_ws),
    sample_panels={
      f'teacher_{num_steps}step_ddim': lambda params, frozen, rng, labels, w: (
        teacher_sample(frozen, rng, labels, w)
      ),
      f'student_{num_steps}step_ddim': lambda params, frozen, rng, labels, w: (
        student_sample(params, rng, labels, w)
      ),
    },
  )
