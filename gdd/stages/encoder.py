"""The distilled DDIM encoder: GD's progressive distillation for encoding.

Deterministic DDIM encoding maps data x at t = 0 to z_1 at t = 1
(`diffusion.encoding`, method.md §9). Halving rounds distil it as stage
two distils the sampler: an N-step student takes one encoding step
t → t + 2/N where its 2N-step teacher takes two. The first teacher is the
stage-one student, a continuous-time model, viewed as an
`initial_num_steps`-step encoder; each round's student starts as a copy of
its teacher, with a fresh optimiser and the learning rate annealed over the
round (`config.encoder`, scheduled like `config.distill`). The network is
the stage-one student's, always run at one guidance strength,
`config.encoder.w` (why 0 by default: `config_lib._encoder_config`).

`--mode=encoder` trains it from a finished 'guided' stage; it is not part
of `--mode=all`. It samples nothing: `gdd.encode.load_encoder` serves it.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from gdd import data, denoisers, sampling, workdir_lib
from gdd.diffusion import encoding, schedules
from gdd.stages import Stage, StageKind, common, guided, progressive

NAME = 'encoder'


def loss_fn(
  params,
  teacher_params,
  batch,
  rng: jax.Array,
  *,
  network,
  cond_kind,
  teacher_num_steps: int,
  config: ml_collections.ConfigDict,
):
  """ε-MSE between the student's ε̂ at z_t and the two-teacher-step ε̃.

  t = i/N on the teacher's grid with i uniform in [0, N − 2] (so t'' =
  t + 2/N ≤ 1), z_t = α_t x + σ_t ε from the data: the marginal the ODE
  carries x to, as in distill's rounds. Both networks run at
  config.encoder.w.

  **Choice (weighting):** the plain ε-MSE, the same weight at every t. ε̃ is
  O(1) at every grid time, and an error δ in ε̂ moves the student's z_{t''}
  by (σ_{t''} − (α_{t''}/α_t) σ_t) δ, a factor in (0, 1]: the ε-MSE bounds
  every step's error alike. `diffusion.loss_weighting`'s snr_trunc is
  max(1, 1/SNR) times the ε-MSE, which would weight the steps just before
  t = 1 by up to 1/SNR ≈ e^11.5 (N = 1024) for no such reason.
  """
  x, cond = batch['image'], cond_kind.from_batch(batch)
  grid_rng, noise_rng = jax.random.split(rng)
  index = jax.random.randint(grid_rng, (x.shape[0],), 0, teacher_num_steps - 1)
  schedule = common.logsnr_fn(config)
  logsnr = schedule(index.astype(jnp.float32) / teacher_num_steps)
  z = schedules.diffuse(
    x, jax.random.normal(noise_rng, x.shape, jnp.float32), logsnr
  )
  eps_of = functools.partial(
    denoisers.plain, network, cond=cond, w=config.encoder.w, estimate='eps'
  )
  target = jax.lax.stop_gradient(
    encoding.encoding_two_step_target(
      eps_of(teacher_params),
      z,
      index,
      teacher_num_steps=teacher_num_steps,
      logsnr_fn=schedule,
    )
  )
  loss = jnp.mean(jnp.square(eps_of(params)(z, logsnr) - target))
  return loss, {'loss': loss}


def make_stage(
  config: ml_collections.ConfigDict,
  info: data.DatasetInfo,
  teacher_params,
  *,
  student_num_steps: int,
) -> Stage:
  """The round that distils a 2N-step encoder into an N-step one.

  No sample grids: an encoder's outputs are noise, and showing how well it
  inverts the sampler takes data, which grids do not draw.
  """
  return progressive.round_stage(
    config,
    name=workdir_lib.round_name(NAME, student_num_steps),
    section=KIND.section,
    loss_fn=functools.partial(
      loss_fn,
      network=guided.build_student(config, info),
      cond_kind=common.build_conditioning(config, info),
      teacher_num_steps=2 * student_num_steps,
      config=config,
    ),
    teacher_params=teacher_params,
    sample_panels={},
    sample_ws=(),
  )


def round_folder(workdir, num_steps: int) -> str:
  """The finished round of an N-step encoder; the error lists the others."""
  return progressive.round_folder(workdir, NAME, num_steps, 'ddim', None)


def _train(ctx, load_input):
  """The encoder's rounds, from the stage-one student's params."""
  config, info = ctx.config, ctx.info
  return progressive.train_rounds(
    ctx,
    load_input(),
    kind=NAME,
    section=KIND.section,
    w=None,
    first_teacher=KIND.needs,
    make_stage=functools.partial(make_stage, config, info),
    abstract_params=common.abstract_params(guided.build_student(config, info)),
    record={'w': config.encoder.w},
  )


def _sampler_folder(workdir, num_steps: int, sampler: str, w) -> str:
  del sampler, w
  raise sampling.SampleRequestError(
    "stage='encoder' maps images to noise and samples nothing; encode "
    f"with gdd.encode.load_encoder(workdir, 'encoder', num_steps={num_steps})"
    f' (encoder step counts: {finished_rounds(workdir) or "none"}).'
  )


def finished_rounds(workdir) -> list[int]:
  """Step counts of the workdir's finished encoder rounds, descending."""
  return workdir_lib.finished_rounds(workdir, NAME)


def _summary(config, workdir) -> str:
  del config
  root = workdir_lib.rounds_dir(workdir, NAME)
  return f'encoder finished: step counts {finished_rounds(workdir)} in {root}'


KIND = StageKind(
  name=NAME,
  mode='encoder',
  section='encoder',
  needs='guided',
  in_chain=False,
  nfe_per_step=1,
  samplers=(),
  train=_train,
  sampler_folder=_sampler_folder,
  sampler_model=guided.sampler_model,
  w_range=lambda config, trained_w: (config.encoder.w, config.encoder.w),
  eval_rows=lambda ev, workdir: [],
  series={},
  summary=_summary,
)
