"""Stage one: one student for every guidance strength w (GD §3.1, method §5).

The student x̂_η(z, c, w) starts as a copy of the teacher's EMA params plus a
zero-initialised w-embedding, so at step 0 it computes exactly the
conditional teacher. It learns to match the teacher's guided prediction
(1 + w) x̂(z, c) − w x̂(z, ∅) on real data for w ~ U[w_min, w_max].
"""

import functools
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections

from gdd import data, denoisers, sampling, workdir_lib
from gdd.diffusion import losses, schedules
from gdd.models import UNet
from gdd.stages import Stage, StageKind, common

NAME = 'guided'


def build_student(
  config: ml_collections.ConfigDict, info: data.DatasetInfo
) -> UNet:
  """The w-conditioned student; dropout 0 (method.md §5, a choice).

  Its parameterisation is `config_lib.student_mean_type`: the teacher's, or
  another reading of the same output channels (a v-student of an ε-teacher
  starts from the ε weights and learns to output v).
  """
  student_config = ml_collections.ConfigDict(config.to_dict())
  student_config.model.dropout = 0.0
  return common.build_model(
    student_config,
    info,
    use_w_embedding=True,
    w_max=config.guided.w_max,
    student=True,
  )


def init_from_teacher(student: UNet, rng: jax.Array, teacher_params) -> dict:
  """Student params: the teacher's everywhere, fresh only in `w_embedding`.

  (At the top of the tree for the pixel U-Net, under 'unet' for a
  text-conditional network.)
  """
  fresh = flax.traverse_util.flatten_dict(common.init_params(student, rng))
  teacher_flat = flax.traverse_util.flatten_dict(teacher_params)
  extra = {k for k in fresh if k not in teacher_flat}
  if any('w_embedding' not in k[:2] for k in extra) or set(teacher_flat) - set(
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


def w_loss_weight(w: jnp.ndarray, config) -> jnp.ndarray:
  """Per-example loss weight (1 + w)^-p, p = `config.guided.w_loss_power`.

  The guided target (1 + w) x̂_c − w x̂_∅ and the student's error on it grow
  with w, so under the paper's unweighted loss (p = 0) the largest w decide
  most of each update and the student drifts from its teacher at w = 0.
  p > 0 evens that out (a deviation from the paper, measured in the README's
  "Why this schedule").
  """
  return jnp.power(1.0 + w, -config.guided.w_loss_power)


def loss_fn(
  params,
  teacher_params,
  batch,
  rng: jax.Array,
  *,
  student: UNet,
  teacher: UNet,
  cond_kind,
  config: ml_collections.ConfigDict,
):
  """snr_trunc loss between the student and the teacher's guided x̂^w."""
  x, cond = batch['image'], cond_kind.from_batch(batch)
  t_rng, noise_rng, w_rng = jax.random.split(rng, 3)
  batch_size = x.shape[0]
  logsnr = common.logsnr_fn(config)(jax.random.uniform(t_rng, (batch_size,)))
  z = schedules.diffuse(
    x, jax.random.normal(noise_rng, x.shape, jnp.float32), logsnr
  )
  w = sample_w(w_rng, batch_size, config)
  # Teacher in eval mode, unclipped, outside the gradient.
  teacher_x = denoisers.guided(teacher, cond_kind, teacher_params, cond, w)
  target = jax.lax.stop_gradient(teacher_x(z, logsnr))
  x_pred = denoisers.predict_x(student, params, z, logsnr, cond, w)
  loss = jnp.mean(
    w_loss_weight(w, config)
    * losses.weighted_loss(
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
  cond_kind = common.build_conditioning(config, info)
  space = common.build_space(config, info)
  num_steps = config.grids.teacher_num_steps
  student_sample = sampling.make_sample_fn(
    config,
    space,
    functools.partial(denoisers.plain, student),
    num_steps=num_steps,
  )
  teacher_sample = sampling.make_sample_fn(
    config,
    space,
    functools.partial(denoisers.guided, teacher, cond_kind),
    num_steps=num_steps,
  )
  return Stage(
    name=NAME,
    train_config=config.guided,
    init_params=functools.partial(init_from_teacher, student),
    loss_fn=functools.partial(
      loss_fn,
      student=student,
      teacher=teacher,
      cond_kind=cond_kind,
      config=config,
    ),
    frozen_params=teacher_params,
    sample_ws=tuple(config.grids.sample_ws),
    sample_panels={
      f'teacher_{num_steps}step_ddim': common.panel(
        teacher_sample, of='frozen'
      ),
      f'student_{num_steps}step_ddim': common.panel(
        student_sample, of='params'
      ),
    },
    frozen_subtrees=common.frozen_subtrees(config),
  )


def _train(ctx, load_input):
  """Trains (or loads) stage one; the teacher's params load only if needed."""
  config, info = ctx.config, ctx.info
  return ctx.run_stage(
    NAME,
    lambda: make_stage(config, info, load_input()),
    name=NAME,
    abstract_params=common.abstract_params(build_student(config, info)),
    trained_from={
      'teacher': os.fspath(workdir_lib.stage_dir(ctx.workdir, KIND.needs)),
      'w_range': [config.guided.w_min, config.guided.w_max],
    },
  )


def sampler_model(config: ml_collections.ConfigDict, info: data.DatasetInfo):
  """The w-conditioned student and its plain denoiser (1 NFE per step)."""
  model = build_student(config, info)
  return model, functools.partial(denoisers.plain, model)


def w_range(config: ml_collections.ConfigDict, trained_w=None):
  """The w range stage one (and every halving round) was trained for."""
  del trained_w
  return (config.guided.w_min, config.guided.w_max)


def _eval_rows(ev: ml_collections.ConfigDict, workdir):
  if not workdir_lib.is_finished(workdir_lib.stage_dir(workdir, NAME)):
    return []
  return [('ddim', n, None) for n in ev.guided_num_steps]


def _plan_stage(config: ml_collections.ConfigDict, info: data.DatasetInfo):
  """Stage one with its teacher's params as shapes only."""
  teacher_params = common.abstract_params(common.build_model(config, info))
  return make_stage(config, info, teacher_params)


KIND = StageKind(
  name=NAME,
  mode='guided',
  section='guided',
  needs='teacher',
  in_chain=True,
  nfe_per_step=1,
  samplers=('ddim', 'stochastic', 'ancestral'),
  train=_train,
  sampler_folder=lambda workdir, num_steps, sampler, w: NAME,
  sampler_model=sampler_model,
  w_range=w_range,
  eval_rows=_eval_rows,
  series={'ddim': ('stage-one student, DDIM', 'Oranges')},
  plan_stage=_plan_stage,
)
