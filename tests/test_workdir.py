"""The workdir layout: names on disk are stable, so they are spelled out here.

Users' workdirs and tools rely on these exact paths; a change to any of them
must fail here first. The same names on a gs:// workdir are checked without
touching a store (the reads and writes on one are in test_paths.py).
"""

import json
import os

import pytest

from gdd import config_lib, workdir_lib

GCS_RUN = 'gs://bucket/run'


@pytest.fixture(params=['local', 'gcs'])
def run(request, tmp_path) -> str:
  return os.fspath(tmp_path) if request.param == 'local' else GCS_RUN


def _names(run: str, path) -> str:
  """`path` relative to the workdir `run`, as a string."""
  text = os.fspath(path)
  assert text.startswith(f'{run}/'), (text, run)
  return text.removeprefix(f'{run}/')


def test_stage_folders_and_their_contents(run):
  stage = workdir_lib.stage_dir(run, 'teacher')
  assert _names(run, stage) == 'teacher'
  assert {
    _names(run, path)
    for path in (
      workdir_lib.config_record(stage),
      workdir_lib.stage_record(stage),
      workdir_lib.lock_file(stage),
      workdir_lib.checkpoints_dir(stage),
      workdir_lib.params_dir(stage),
      workdir_lib.unreadable_dir(stage),
      workdir_lib.grid_file(stage, 40, 1.5),
      workdir_lib.profile_dir(stage),
      workdir_lib.events_dir(stage),
    )
  } == {
    'teacher/config.json',
    'teacher/stage.json',
    'teacher/lock',
    'teacher/checkpoints',
    'teacher/params',
    'teacher/unreadable',
    'teacher/samples/step40_w1.5.png',
    'teacher/profile',
    'teacher',
  }


def test_workdir_level_folders(run):
  npz = workdir_lib.samples_file(
    run, stage='distill', sampler='stochastic', num_steps=4, w=2.0
  )
  assert _names(run, npz) == 'samples/distill_stochastic_4steps_w2.npz'
  assert _names(run, workdir_lib.samples_dir(run)) == 'samples'
  assert _names(run, workdir_lib.eval_dir(run)) == 'eval'


def test_round_names():
  assert workdir_lib.round_name('distill', 4) == 'distill/4steps'
  assert workdir_lib.round_name('single_w', 2, 2.0) == 'single_w/w2/2steps'
  assert workdir_lib.round_name('single_w', 1, 0.5) == 'single_w/w0.5/1steps'
  assert workdir_lib.round_name('encoder', 8) == 'encoder/8steps'
  for name, kind in (
    ('teacher', 'teacher'),
    ('guided', 'guided'),
    ('distill/4steps', 'distill'),
    ('single_w/w2/2steps', 'single_w'),
    ('encoder/8steps', 'encoder'),
  ):
    assert workdir_lib.stage_kind(name) == kind
  with pytest.raises(ValueError, match='allowed'):
    workdir_lib.round_name('guided', 4)
  with pytest.raises(ValueError, match='single_w rounds need a w'):
    workdir_lib.round_name('single_w', 4)
  with pytest.raises(ValueError, match='single_w rounds need a w'):
    workdir_lib.round_name('distill', 4, 1.0)
  with pytest.raises(ValueError, match='single_w rounds need a w'):
    workdir_lib.round_name('encoder', 4, 0.0)


def _make(workdir: str, *folders: str) -> None:
  for folder in folders:
    os.makedirs(os.path.join(workdir, folder))


def test_finished_rounds_are_those_with_a_params_export(tmp_path):
  run = os.fspath(tmp_path)
  assert workdir_lib.finished_rounds(run) == []
  assert workdir_lib.single_w_values(run) == []
  _make(
    run,
    'distill/8steps/params',
    'distill/4steps/checkpoints',  # Unfinished.
    'distill/2steps/params',
    'distill/16steps/params',
    'distill/unrelated/params',
    'single_w/w2/4steps/params',
    'single_w/w2/2steps/params',
    'single_w/w0.5/4steps/checkpoints',
  )
  assert workdir_lib.finished_rounds(run) == [16, 8, 2]
  assert workdir_lib.finished_rounds(run, 'single_w', w=2) == [4, 2]
  assert workdir_lib.finished_rounds(run, 'single_w', w=0.5) == []
  assert workdir_lib.finished_rounds(run, 'single_w', w=3) == []
  assert workdir_lib.single_w_values(run) == [0.5, 2.0]
  assert workdir_lib.is_finished(workdir_lib.stage_dir(run, 'distill/8steps'))
  assert not workdir_lib.is_finished(
    workdir_lib.stage_dir(run, 'distill/4steps')
  )
  assert os.fspath(workdir_lib.rounds_dir(run, 'single_w', 2)) == (
    os.path.join(run, 'single_w', 'w2')
  )


def test_records_round_trip(tmp_path):
  stage = workdir_lib.stage_dir(tmp_path, 'distill/4steps')
  assert workdir_lib.read_config_record(stage) is None
  config = config_lib.base_config()
  workdir_lib.write_config_record(stage, config)
  assert workdir_lib.read_config_record(stage) == json.loads(config.to_json())
  record = {'teacher': os.fspath(tmp_path / 'guided'), 'w_range': [0, 4]}
  workdir_lib.write_stage_record(stage, record)
  with open(tmp_path / 'distill' / '4steps' / 'stage.json') as f:
    assert json.load(f) == record
  assert sorted(os.listdir(stage)) == ['config.json', 'stage.json']
