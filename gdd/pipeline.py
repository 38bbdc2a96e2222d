"""The stage chain behind `gdd.main`: what runs for each --mode.

Each stage lives in its workdir folder with the config it was trained with
(`config.json`); re-running resumes an unfinished stage from its latest
checkpoint and skips a finished one. A changed config that would silently
mix two trainings is refused.
"""

import functools
import json
import os
import time
from collections.abc import Callable

import jax
import ml_collections
from absl import logging
from etils import epath

from gdd import config_lib, data, errors, paths, plan, sample, workdir_lib
from gdd.evaluation import evaluate
from gdd.stages import Stage, common, guided, progressive, teacher
from gdd.train import checkpointing, lock, loop, preemption, sharding

MODES = (
  'all',
  'teacher',
  'guided',
  'distill',
  'distill_single_w',
  'sample',
  'evaluate',
  'plan',
)


class ConfigMismatchError(config_lib.ConfigError):
  """The workdir holds a stage trained with a different config."""


def record_stage_config(
  config: ml_collections.ConfigDict,
  stage_dir: epath.PathLike,
  kind: str,
  trained_from: dict | None = None,
) -> None:
  """Writes `config.json` (+ `stage.json`), or checks the config there.

  `trained_from` records the stage's inputs (teacher folder, step counts,
  w range) in `stage.json` for people and tools reading the workdir.
  """
  stage_dir = paths.resolve(stage_dir)
  current = json.loads(config.to_json())
  stored = workdir_lib.read_config_record(stage_dir)
  if stored is not None:
    old = config_lib.training_keys(stored, kind)
    new = config_lib.training_keys(current, kind)
    diffs = [
      f'config.{k}: {old.get(k)!r} in the workdir, {new.get(k)!r} now'
      for k in sorted(set(old) | set(new))
      if old.get(k) != new.get(k)
    ]
    if diffs:
      raise ConfigMismatchError(
        f'The stage in {stage_dir} was trained with another '
        'config:\n  ' + '\n  '.join(diffs) + '\nUse a new --workdir, or '
        'restore those values to resume.'
      )
    return
  if jax.process_index() == 0:
    workdir_lib.write_config_record(stage_dir, config)
    if trained_from is not None:
      workdir_lib.write_stage_record(stage_dir, trained_from)


def _run_stage(
  config: ml_collections.ConfigDict,
  workdir: epath.PathLike,
  kind: str,
  make_stage: Callable[[], Stage],
  *,
  name: str,
  abstract_params,
  trained_from: dict | None = None,
):
  """Trains (or resumes) one stage unless finished; returns its params.

  Holds the stage folder's lock throughout, so a second run on the same
  folder fails at once instead of writing the same checkpoints.
  """
  stage_dir = workdir_lib.stage_dir(workdir, name)
  preemption.raise_if_requested(f'stage {name}')
  with lock.hold(stage_dir):
    record_stage_config(config, stage_dir, kind, trained_from)
    params = _load_export(stage_dir, abstract_params)
    if params is not None:
      logging.info('%s: already finished (%s); skipping.', name, stage_dir)
      return params
    start = time.perf_counter()
    params = loop.train_stage(
      make_stage(),
      config,
      stage_dir,
      replace_export=workdir_lib.params_dir(stage_dir).exists(),
    )
  logging.info('%s: finished in %.0f s.', name, time.perf_counter() - start)
  return params


def _load_export(stage_dir: epath.Path, abstract_params):
  """A finished stage's params, or None when it must train or export again.

  An export that cannot be read stays where it is for now: training
  restores the stage's final checkpoint and only then replaces it.
  """
  if not workdir_lib.params_dir(stage_dir).exists():
    return None
  try:
    return loop.load_exported_params(stage_dir, abstract_params)
  except checkpointing.UnreadableCheckpointError as error:
    logging.warning(
      'The params export of %s cannot be read (%s); exporting it again from '
      'the final checkpoint.',
      stage_dir,
      errors.first_line(error.__cause__ or error),
    )
    return None


# The stage each partial --mode starts from, which must be finished.
_MODE_INPUTS = {
  'guided': teacher.NAME,
  'distill': guided.NAME,
  'distill_single_w': teacher.NAME,
}


def _require_input(workdir: epath.PathLike, mode: str) -> None:
  name = _MODE_INPUTS.get(mode)
  if name and not workdir_lib.is_finished(workdir_lib.stage_dir(workdir, name)):
    raise checkpointing.MissingExportError(
      f'--mode={mode} needs a finished {name!r} stage in {workdir}; run '
      f'--mode={"teacher" if name == "teacher" else "guided"} (or the '
      'default --mode=all) first.'
    )


def run_chain(
  config: ml_collections.ConfigDict, workdir: epath.PathLike, mode: str
) -> None:
  """Teacher → guided student → halving rounds, or the part `mode` names."""
  info = data.get_info(config.data)
  teacher_model = common.build_model(config, info)
  student_model = guided.build_student(config, info)
  _require_input(workdir, mode)
  if mode == 'distill_single_w':
    _run_single_w_rounds(config, workdir, info, teacher_model)
    return

  teacher_params = None
  if mode in ('all', 'teacher', 'guided'):
    teacher_params = _run_stage(
      config,
      workdir,
      'teacher',
      lambda: teacher.make_stage(config, info),
      name=teacher.NAME,
      abstract_params=common.abstract_params(teacher_model),
    )
  if mode == 'teacher':
    return
  student_abstract = common.abstract_params(student_model)

  params = _run_stage(
    config,
    workdir,
    'guided',
    functools.partial(
      _guided_stage, config, workdir, info, teacher_model, teacher_params
    ),
    name=guided.NAME,
    abstract_params=student_abstract,
    trained_from={
      'teacher': os.fspath(workdir_lib.stage_dir(workdir, teacher.NAME)),
      'w_range': [config.guided.w_min, config.guided.w_max],
    },
  )
  if mode == 'guided':
    return
  _run_rounds(
    config,
    workdir,
    params,
    first_teacher=guided.NAME,
    kind='distill',
    w=None,
    make_stage=functools.partial(progressive.make_stage, config, info),
    abstract_params=student_abstract,
    w_record={'w_range': [config.guided.w_min, config.guided.w_max]},
  )
  print(f'chain finished: {finished_summary(workdir)}')


def _guided_stage(config, workdir, info, teacher_model, teacher_params):
  """Stage one; --mode=distill loads the teacher only if stage one must
  export again (its `teacher_params` are None)."""
  if teacher_params is None:
    teacher_params = loop.load_exported_params(
      workdir_lib.stage_dir(workdir, teacher.NAME),
      common.abstract_params(teacher_model),
    )
  return guided.make_stage(config, info, teacher_params)


def _run_single_w_rounds(config, workdir, info, teacher_model) -> None:
  """The single-w baseline: halving rounds at w = config.single_w.w."""
  w = config.single_w.w
  teacher_params = loop.load_exported_params(
    workdir_lib.stage_dir(workdir, teacher.NAME),
    common.abstract_params(teacher_model),
  )
  first_round = progressive.round_step_counts(config)[0]

  def make_stage(teacher_params, *, student_num_steps):
    return progressive.make_single_w_stage(
      config,
      info,
      teacher_params,
      student_num_steps=student_num_steps,
      from_cfg_teacher=student_num_steps == first_round,
    )

  _run_rounds(
    config,
    workdir,
    teacher_params,
    first_teacher=teacher.NAME,
    kind='single_w',
    w=w,
    make_stage=make_stage,
    abstract_params=common.abstract_params(teacher_model),
    w_record={'w': w},
  )
  rounds = workdir_lib.finished_rounds(workdir, 'single_w', w=w)
  root = workdir_lib.rounds_dir(workdir, 'single_w', w)
  print(f'single-w chain finished: step counts {rounds} in {root}')


def _run_rounds(
  config,
  workdir: epath.PathLike,
  params,
  *,
  first_teacher: str,
  kind: str,
  w: float | None,
  make_stage: Callable[..., Stage],
  abstract_params,
  w_record: dict,
) -> None:
  """Halving rounds initial_num_steps → … → final_num_steps, each resumable.

  `params` are the first teacher's (the folder `first_teacher`); each
  finished round's student is the next round's teacher. `kind` and `w`
  name the chain (`workdir_lib.round_name`).
  """
  teacher_steps = config.distill.initial_num_steps
  teacher_dir = first_teacher
  for student_steps in progressive.round_step_counts(config):
    name = workdir_lib.round_name(kind, student_steps, w)
    params = _run_stage(
      config,
      workdir,
      kind,
      functools.partial(make_stage, params, student_num_steps=student_steps),
      name=name,
      abstract_params=abstract_params,
      trained_from={
        'teacher': os.fspath(workdir_lib.stage_dir(workdir, teacher_dir)),
        'teacher_num_steps': teacher_steps,
        'student_num_steps': student_steps,
        **w_record,
        'time_grid': config.distill.time_grid,
      },
    )
    teacher_steps, teacher_dir = student_steps, name


def finished_summary(workdir: epath.PathLike) -> str:
  rounds = workdir_lib.finished_rounds(workdir)
  distill_dir = workdir_lib.rounds_dir(workdir, 'distill')
  return f'distilled step counts {rounds} in {distill_dir}'


# The config sections of the stages each training --mode trains: their
# values are checked for those stages (`config_lib.validate`), and their
# batch_size is split evenly over the devices (samplers pad their batches
# and need no check).
_MODE_SECTIONS = {
  'all': ('teacher', 'guided', 'distill'),
  'teacher': ('teacher',),
  'guided': ('guided',),
  'distill': ('distill',),
  'distill_single_w': ('distill',),
}


def _check_batch_sizes(config: ml_collections.ConfigDict, mode: str) -> None:
  """Every batch that `mode` will split over the devices, before any stage."""
  sections = _MODE_SECTIONS.get(mode, ())
  if mode == 'evaluate' and config.evaluate.feature_extractor == 'inception':
    sections = ('evaluate',)  # Inception's batches are split over devices.
  mesh = sharding.mesh_for(config)
  for section in sections:
    sharding.check_batch_size(
      config[section].batch_size,
      mesh,
      f'{section}.batch_size',
      config[section].get('grad_accum_steps', 1),
    )


def run(
  config: ml_collections.ConfigDict, workdir: epath.PathLike, mode: str
) -> None:
  """Validates everything cheap first, then runs the stages of `mode`.

  While stages train, SIGTERM/SIGINT stop the run cleanly after saving
  (`preemption.InterruptedRunError`). Stdout gets only the command's output
  (the samples' path, the evaluation folder, the chain's summary, the plan);
  progress goes to the absl log.
  """
  if mode not in MODES:
    raise config_lib.ConfigError(f'--mode={mode!r}; allowed: {MODES}.')
  config_lib.validate(config, training=_MODE_SECTIONS.get(mode, ()))
  if mode == 'plan':  # Shapes only: needs no data, workdir or writes.
    plan.print_plan(config)
    return
  workdir = paths.resolve(workdir)  # A local path, or a URL such as gs://.
  if mode == 'sample':
    print(sample.sample_to_files(config, workdir))
    return
  _check_batch_sizes(config, mode)
  data.check_available(config.data)
  if mode == 'evaluate':
    evaluate.run(config, workdir)
    print(f'evaluation written to {workdir_lib.eval_dir(workdir)}')
    return
  with preemption.catch_signals():
    run_chain(config, workdir, mode)
