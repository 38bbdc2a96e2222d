"""Stage two: progressive halving with w (GD §3.2, method.md §6).

Round N → N/2: the student starts as a copy of the N-step teacher (the
stage-one model for the first round), and learns to take one DDIM step of
length 2/N where the teacher takes two of length 1/N, at the same w.

The rounds' mechanics (loss, round Stage, the chain of resumable rounds,
the folder that serves a sampling request) are shared with the single-w
baseline (`single_w.py`); the chain of rounds, the round Stage and the
folder lookup also with the distilled encoder (`encoder.py`).
"""

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections

from gdd import config_lib, data, denoisers, sampling, workdir_lib
from gdd.diffusion import distillation, losses, schedules
from gdd.stages import Stage, StageKind, common, guided

NAME = 'distill'


def round_step_counts(schedule: ml_collections.ConfigDict) -> list[int]:
  """Student step counts of a halving schedule's rounds, e.g. [512, …, 1].

  `schedule` is the config section with `initial_num_steps` and
  `final_num_steps` (config.distill, config.encoder).
  """
  counts, n = [], schedule.initial_num_steps
  while n > schedule.final_num_steps:
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
    guided.w_loss_weight(w, config)
    * losses.weighted_loss(
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
  return make_round(
    config,
    name=workdir_lib.round_name(NAME, student_num_steps),
    student=student,
    teacher_denoiser=functools.partial(denoisers.plain, student),
    info=info,
    teacher_params=teacher_params,
    student_num_steps=student_num_steps,
    sample_ws=tuple(config.grids.sample_ws),
  )


def make_round(
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
  """One halving round: `student` learns two `teacher_denoiser` steps in one.

  Shared by the w-conditioned rounds and the single-w baseline (`fixed_w`).
  """
  return round_stage(
    config,
    name=name,
    section='distill',
    loss_fn=functools.partial(
      loss_fn,
      student=student,
      teacher_denoiser=teacher_denoiser,
      cond_kind=common.build_conditioning(config, info),
      teacher_num_steps=2 * student_num_steps,
      config=config,
      fixed_w=fixed_w,
    ),
    teacher_params=teacher_params,
    sample_panels=_sample_panels(
      config,
      common.build_space(config, info),
      student,
      teacher_denoiser,
      student_num_steps,
    ),
    sample_ws=sample_ws,
  )


def round_stage(
  config: ml_collections.ConfigDict,
  *,
  name: str,
  section: str,
  loss_fn,
  teacher_params,
  sample_panels: dict,
  sample_ws: tuple[float, ...],
) -> Stage:
  """A halving round's `Stage`: the student starts as a copy of its teacher.

  Trained with the schedule of `config[section]`; `teacher_params` are the
  frozen params its `loss_fn` reads.
  """
  return Stage(
    name=name,
    train_config=config[section],
    init_params=lambda rng, frozen: jax.tree.map(jnp.copy, frozen),
    loss_fn=loss_fn,
    frozen_params=teacher_params,
    sample_panels=sample_panels,
    sample_ws=sample_ws,
    frozen_subtrees=common.frozen_subtrees(config),
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
    return common.panel(sample_fn, of='frozen' if use_teacher else 'params')

  return {
    f'teacher_{2 * n}step_ddim': panel(2 * n, 'ddim', use_teacher=True),
    f'student_{n}step_ddim': panel(n, 'ddim', use_teacher=False),
    f'student_{2 * n}step_stochastic': panel(
      2 * n, 'stochastic', use_teacher=False
    ),
  }


def train_rounds(
  ctx,
  params,
  *,
  kind: str,
  section: str,
  w: float | None,
  first_teacher: str,
  make_stage,
  abstract_params,
  record: dict,
):
  """Halving rounds of `config[section]`'s schedule, each resumable.

  initial_num_steps → … → final_num_steps (`round_step_counts`). `params`
  are the first teacher's (the folder `first_teacher`); each finished
  round's student is the next round's teacher. `kind` and `w` name the
  chain (`workdir_lib.round_name`); `record` is what else each round's
  stage.json records (its w, time grid). Returns the last round's params.
  """
  teacher_steps = ctx.config[section].initial_num_steps
  teacher_dir = first_teacher
  for student_steps in round_step_counts(ctx.config[section]):
    name = workdir_lib.round_name(kind, student_steps, w)
    params = ctx.run_stage(
      kind,
      functools.partial(make_stage, params, student_num_steps=student_steps),
      name=name,
      abstract_params=abstract_params,
      trained_from={
        'teacher': os.fspath(workdir_lib.stage_dir(ctx.workdir, teacher_dir)),
        'teacher_num_steps': teacher_steps,
        'student_num_steps': student_steps,
        **record,
      },
    )
    teacher_steps, teacher_dir = student_steps, name
  return params


def round_folder(
  workdir, kind: str, num_steps: int, sampler: str, w: float | None
) -> str:
  """The finished round that serves an N-step request, or an error.

  The stochastic N-step sampler jumps with the N/2-step model (§7).
  """
  if sampler == 'stochastic' and num_steps % 2:
    raise sampling.SampleRequestError(
      f'num_steps={num_steps}: the stochastic sampler needs an even step '
      'count (it uses the model distilled for num_steps / 2).'
    )
  model_steps = num_steps // 2 if sampler == 'stochastic' else num_steps
  folder = workdir_lib.round_name(kind, model_steps, w)
  if not workdir_lib.is_finished(workdir_lib.stage_dir(workdir, folder)):
    distilled = workdir_lib.finished_rounds(workdir, kind, w=w)
    raise sampling.SampleRequestError(
      f'No finished distillation round for {model_steps} steps in '
      f'{workdir_lib.rounds_dir(workdir, kind, w)}; distilled step counts: '
      f'{distilled or "none"}. '
      + (
        'The stochastic sampler needs the round for num_steps / 2.'
        if sampler == 'stochastic'
        else ''
      )
    )
  return folder


def _train(ctx, load_input):
  """The w-conditioned rounds, from the stage-one student."""
  config, info = ctx.config, ctx.info
  return train_rounds(
    ctx,
    load_input(),
    kind=NAME,
    section=KIND.section,
    w=None,
    first_teacher=KIND.needs,
    make_stage=functools.partial(make_stage, config, info),
    abstract_params=common.abstract_params(guided.build_student(config, info)),
    record={
      'w_range': [config.guided.w_min, config.guided.w_max],
      'time_grid': config.distill.time_grid,
    },
  )


def _eval_rows(ev: ml_collections.ConfigDict, workdir):
  """Every finished round, deterministic, and stochastic up to a length."""
  rounds = workdir_lib.finished_rounds(workdir)
  return [('ddim', n, None) for n in rounds] + [
    ('stochastic', 2 * n, None)
    for n in rounds
    if 2 * n <= ev.max_stochastic_steps
  ]


def _plan_stage(config: ml_collections.ConfigDict, info: data.DatasetInfo):
  """The first round (every round has the same program), shapes only."""
  student_params = common.abstract_params(guided.build_student(config, info))
  return make_stage(
    config,
    info,
    student_params,
    student_num_steps=config.distill.initial_num_steps // 2,
  )


def _summary(config, workdir) -> str:
  del config
  rounds = workdir_lib.finished_rounds(workdir)
  distill_dir = workdir_lib.rounds_dir(workdir, NAME)
  return f'chain finished: distilled step counts {rounds} in {distill_dir}'


KIND = StageKind(
  name=NAME,
  mode='distill',
  section='distill',
  needs='guided',
  in_chain=True,
  nfe_per_step=1,
  samplers=('ddim', 'stochastic'),
  on_grid=True,
  train=_train,
  sampler_folder=lambda workdir, num_steps, sampler, w: round_folder(
    workdir, NAME, num_steps, sampler, None
  ),
  sampler_model=guided.sampler_model,
  w_range=guided.w_range,
  eval_rows=_eval_rows,
  series={
    'ddim': ('distilled, deterministic', 'Greens'),
    'stochastic': ('distilled, stochastic', 'Reds'),
  },
  plan_stage=_plan_stage,
  summary=_summary,
)
