"""Stage 0: the classifier-free-guided teacher (method.md §4).

One network learns both x̂(z, c) and x̂(z, ∅): each condition is replaced by
the null condition (for classes, the null label) with probability p_uncond
(`conditioning`). At sampling time the two are combined
as x̂^w = (1 + w) x̂_c − w x̂_∅ in one batch of 2B (2 NFE per step).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from gdd import data, denoisers, sampling, workdir_lib
from gdd.diffusion import losses, schedules
from gdd.models import UNet
from gdd.stages import Stage, StageKind, common, pretrained

NAME = 'teacher'


def loss_fn(
  params,
  frozen_params,
  batch,
  rng: jax.Array,
  *,
  model: UNet,
  cond_kind,
  config: ml_collections.ConfigDict,
):
  """CFG denoising loss with condition dropout, continuous t ~ U[0, 1]."""
  del frozen_params  # The teacher learns from data alone.
  x, cond = batch['image'], cond_kind.from_batch(batch)
  t_rng, noise_rng, drop_rng, dropout_rng = jax.random.split(rng, 4)
  batch_size = x.shape[0]
  logsnr = common.logsnr_fn(config)(jax.random.uniform(t_rng, (batch_size,)))
  noise = jax.random.normal(noise_rng, x.shape, jnp.float32)
  z = schedules.diffuse(x, noise, logsnr)
  cond = cond_kind.drop_to_null(cond, drop_rng, config.teacher.p_uncond)
  x_pred = denoisers.predict_x(
    model, params, z, logsnr, cond, train=True, dropout_rng=dropout_rng
  )
  per_example = losses.weighted_loss(
    x_pred, x, logsnr, weighting=config.diffusion.loss_weighting
  )
  loss = jnp.mean(per_example)
  return loss, {'loss': loss}


def make_stage(config: ml_collections.ConfigDict, info: data.DatasetInfo):
  """The teacher `Stage`: fresh init, CFG loss, guided DDIM sample grids."""
  model = common.build_model(config, info)
  cond_kind = common.build_conditioning(config, info)
  num_steps = config.grids.teacher_num_steps
  sample_fn = sampling.make_sample_fn(
    config,
    common.build_space(config, info),
    functools.partial(denoisers.guided, model, cond_kind),
    num_steps=num_steps,
  )
  return Stage(
    name=NAME,
    train_config=config.teacher,
    init_params=lambda rng, frozen: common.init_params(model, rng),
    loss_fn=functools.partial(
      loss_fn, model=model, cond_kind=cond_kind, config=config
    ),
    frozen_params=None,
    sample_ws=tuple(config.grids.sample_ws),
    sample_panels={
      f'teacher_{num_steps}step_ddim': common.panel(sample_fn, of='params')
    },
    frozen_subtrees=common.frozen_subtrees(config, teacher=True),
  )


def _train(ctx, load_input):
  """Trains (or loads) the teacher; it needs no finished stage.

  With `config.pretrained.folder`, Stable Diffusion is the teacher: its
  weights are imported instead (`stages.pretrained`).
  """
  del load_input
  config, info = ctx.config, ctx.info
  abstract = common.abstract_params(common.build_model(config, info))
  if pretrained.enabled(config):
    pretrained.check(config, info)
    return ctx.import_stage(
      NAME,
      name=NAME,
      load=lambda: pretrained.teacher_params(config),
      abstract_params=abstract,
    )
  return ctx.run_stage(
    NAME, lambda: make_stage(config, info), name=NAME, abstract_params=abstract
  )


def _sampler_model(config: ml_collections.ConfigDict, info: data.DatasetInfo):
  model = common.build_model(config, info)
  cond_kind = common.build_conditioning(config, info)
  return model, functools.partial(denoisers.guided, model, cond_kind)


def _eval_rows(ev: ml_collections.ConfigDict, workdir):
  """Many DDIM steps (the reference) and few (the paper's DDIM baseline)."""
  if not workdir_lib.is_finished(workdir_lib.stage_dir(workdir, NAME)):
    return []
  return [('ddim', n, None) for n in ev.teacher_num_steps]


KIND = StageKind(
  name=NAME,
  mode='teacher',
  section='teacher',
  needs=None,
  in_chain=True,
  nfe_per_step=2,  # x̂(z, c) and x̂(z, ∅) at every step.
  samplers=('ddim', 'ancestral'),
  train=_train,
  sampler_folder=lambda workdir, num_steps, sampler, w: NAME,
  sampler_model=_sampler_model,
  w_range=lambda config, trained_w: (0.0, float('inf')),
  eval_rows=_eval_rows,
  series={'ddim': ('CFG teacher, DDIM', 'Blues')},
  plan_stage=make_stage,
  trains=lambda config: not pretrained.enabled(config),
)
