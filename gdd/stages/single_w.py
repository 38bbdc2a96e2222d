"""The paper's single-w baseline (method.md §8.3): halving rounds at one w.

The same rounds as stage two (`progressive.py`) at one fixed w =
config.single_w.w, without stage one: the first teacher is the CFG teacher
itself (2 NFE per step), and each w needs its own chain of students.
`--mode=distill_single_w` trains it; it is not part of `--mode=all`.
"""

import functools

import ml_collections

from gdd import data, denoisers, sampling, workdir_lib
from gdd.stages import Stage, StageKind, common, progressive

NAME = 'single_w'


def make_stage(
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
  model = common.build_model(config, info, student=True)
  if from_cfg_teacher:
    teacher_denoiser = functools.partial(
      denoisers.guided,
      common.build_model(config, info),
      common.build_conditioning(config, info),
    )
  else:
    teacher_denoiser = functools.partial(denoisers.plain, model)
  w = config.single_w.w
  return progressive.make_round(
    config,
    name=workdir_lib.round_name(NAME, student_num_steps, w),
    student=model,
    teacher_denoiser=teacher_denoiser,
    info=info,
    teacher_params=teacher_params,
    student_num_steps=student_num_steps,
    sample_ws=(w,),
    fixed_w=w,
  )


def _train(ctx, load_input):
  """The rounds at config.single_w.w from the CFG teacher's params."""
  config, info = ctx.config, ctx.info
  w = config.single_w.w
  first_round = progressive.round_step_counts(config.distill)[0]

  def round_stage(teacher_params, *, student_num_steps):
    return make_stage(
      config,
      info,
      teacher_params,
      student_num_steps=student_num_steps,
      from_cfg_teacher=student_num_steps == first_round,
    )

  return progressive.train_rounds(
    ctx,
    load_input(),
    kind=NAME,
    section=KIND.section,
    w=w,
    first_teacher=KIND.needs,
    make_stage=round_stage,
    abstract_params=common.abstract_params(common.build_model(config, info)),
    record={'w': w, 'time_grid': config.distill.time_grid},
  )


def _sampler_folder(workdir, num_steps: int, sampler: str, w) -> str:
  if w is None:
    raise sampling.SampleRequestError(
      "stage='single_w' needs w: each single-w model is trained for one "
      f'w; trained: {workdir_lib.single_w_values(workdir) or "none"}.'
    )
  return progressive.round_folder(workdir, NAME, num_steps, sampler, w)


def _sampler_model(config: ml_collections.ConfigDict, info: data.DatasetInfo):
  """The teacher's architecture without w input; its w is fixed."""
  model = common.build_model(config, info, student=True)
  return model, functools.partial(denoisers.plain, model)


def _eval_rows(ev: ml_collections.ConfigDict, workdir):
  del ev
  return [
    ('ddim', n, w)
    for w in workdir_lib.single_w_values(workdir)
    for n in workdir_lib.finished_rounds(workdir, NAME, w=w)
  ]


def _summary(config, workdir) -> str:
  w = config.single_w.w
  rounds = workdir_lib.finished_rounds(workdir, NAME, w=w)
  root = workdir_lib.rounds_dir(workdir, NAME, w)
  return f'single-w chain finished: step counts {rounds} in {root}'


KIND = StageKind(
  name=NAME,
  mode='distill_single_w',
  # Its rounds reuse the distill schedule (steps, optimiser, step counts).
  section='distill',
  needs='teacher',
  in_chain=False,
  nfe_per_step=1,
  samplers=('ddim', 'stochastic'),
  on_grid=True,
  train=_train,
  sampler_folder=_sampler_folder,
  sampler_model=_sampler_model,
  w_range=lambda config, trained_w: (trained_w, trained_w),
  eval_rows=_eval_rows,
  series={'ddim': ('single-w baseline', None)},
  summary=_summary,
)
