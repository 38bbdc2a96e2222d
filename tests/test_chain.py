"""The whole chain on digits: teacher → stage one → 4 → 2 → 1, then reruns.

Uses the session's `chain_workdir` (conftest), shared with the evaluation
and notebook tests, which therefore run on the same pytest-xdist worker.
"""

import json
import logging
import os
import shutil

import chex
import jax
import numpy as np
import pytest
from PIL import Image

from gdd import data, pipeline, sample, workdir_lib
from gdd.train import checkpointing
from tests import helpers


def _params(stage_dir):
  return jax.device_get(
    checkpointing.load_params(workdir_lib.params_dir(stage_dir))
  )


def test_chain_writes_every_stage_with_its_record(chain_workdir):
  assert workdir_lib.finished_rounds(chain_workdir) == [4, 2, 1]
  with open(
    os.path.join(chain_workdir, 'distill', '2steps', 'stage.json')
  ) as f:
    record = json.load(f)
  assert record['teacher'].endswith(os.path.join('distill', '4steps'))
  assert record['teacher_num_steps'] == 4
  assert record['student_num_steps'] == 2
  with open(os.path.join(chain_workdir, 'guided', 'stage.json')) as f:
    assert json.load(f)['w_range'] == [0.0, 4.0]


def test_finished_chain_rerun_does_nothing(chain_workdir, capsys, caplog):
  with caplog.at_level(logging.INFO):
    pipeline.run(helpers.quick_config(num_train_steps=2), chain_workdir, 'all')
  assert caplog.text.count('already finished') == 5
  # Progress goes to the log; the output is what the chain holds.
  out = capsys.readouterr().out
  assert 'already finished' not in out
  assert 'distilled step counts [4, 2, 1]' in out


def test_changed_guidance_range_invalidates_students(chain_workdir):
  config = helpers.quick_config(num_train_steps=2)
  config.guided.w_max = 2.0
  with pytest.raises(pipeline.ConfigMismatchError, match='guided.w_max'):
    pipeline.run(config, chain_workdir, 'all')


@pytest.mark.parametrize(
  'num_steps, sampler', [(4, 'ddim'), (1, 'ddim'), (4, 'stochastic')]
)
def test_distilled_students_sample(chain_workdir, num_steps, sampler):
  sampler_fn = sample.load_sampler(
    chain_workdir, 'distill', num_steps=num_steps, sampler=sampler
  )
  images = sampler_fn(jax.random.PRNGKey(0), np.arange(4), 2.0)
  assert images.shape == (4, 8, 8, 1)
  assert np.isfinite(np.asarray(images)).all()


def test_guided_student_samples_at_any_step_count(chain_workdir):
  sampler_fn = sample.load_sampler(chain_workdir, 'guided', num_steps=3)
  assert sampler_fn(jax.random.PRNGKey(0), np.arange(2), 0.5).shape[0] == 2


def test_undistilled_requests_are_rejected(chain_workdir):
  with helpers.raises_user_error(
    ValueError, match=r'distilled step counts: \[4, 2, 1\]'
  ):
    sample.load_sampler(chain_workdir, 'distill', num_steps=8)
  with helpers.raises_user_error(ValueError, match='even step count'):
    sample.load_sampler(
      chain_workdir, 'distill', num_steps=3, sampler='stochastic'
    )
  sampler_fn = sample.load_sampler(chain_workdir, 'distill', num_steps=2)
  with pytest.raises(ValueError, match=r'outside the range .* \[0, 4\]'):
    sampler_fn(jax.random.PRNGKey(0), np.arange(2), 5.0)


def test_kill_during_a_halving_round_then_rerun(
  chain_workdir, tmp_path, monkeypatch
):
  workdir = str(tmp_path / 'chain')
  for name in ('teacher', 'guided', os.path.join('distill', '4steps')):
    shutil.copytree(
      os.path.join(chain_workdir, name), os.path.join(workdir, name)
    )
  config = helpers.quick_config(num_train_steps=2)
  config.distill.checkpoint_every = 1
  real_batches = data.train_batches

  def dying_batches(*args, **kwargs):
    for index, batch in enumerate(real_batches(*args, **kwargs)):
      if index == 1:  # Dies in the 2-step round, after its checkpoint 1.
        raise KeyboardInterrupt('killed')
      yield batch

  monkeypatch.setattr(data, 'train_batches', dying_batches)
  with pytest.raises(KeyboardInterrupt):
    pipeline.run(config, workdir, 'all')
  monkeypatch.setattr(data, 'train_batches', real_batches)
  assert workdir_lib.finished_rounds(workdir) == [4]
  pipeline.run(config, workdir, 'all')
  for steps in (2, 1):
    name = os.path.join('distill', f'{steps}steps')
    chex.assert_trees_all_equal(
      _params(os.path.join(workdir, name)),
      _params(os.path.join(chain_workdir, name)),
    )


def test_round_grids_show_teacher_and_student_side_by_side(chain_workdir):
  samples_dir = os.path.join(chain_workdir, 'distill', '2steps', 'samples')
  config = helpers.quick_config()
  assert sorted(os.listdir(samples_dir)) == sorted(
    f'step2_w{w:g}.png' for w in config.grids.sample_ws
  )
  with Image.open(os.path.join(samples_dir, 'step2_w1.png')) as grid:
    width = grid.size[0]
  # Panels: teacher 4-step DDIM, student 2-step DDIM, student 4-step
  # stochastic; each one column of 8-px images with 1-px padding, 2-px gaps.
  panel_width, gap, upscale = 8 + 2, 2, 8
  assert width == upscale * (3 * panel_width + 2 * gap)


@pytest.fixture(scope='module')
def single_w_workdir(chain_workdir, tmp_path_factory):
  """The single-w baseline at w = 2 (rounds 4 → 2 → 1) from the chain's
  teacher: two rounds show the chaining; the chain covers three."""
  workdir = str(tmp_path_factory.mktemp('single_w'))
  shutil.copytree(
    os.path.join(chain_workdir, 'teacher'), os.path.join(workdir, 'teacher')
  )
  config = helpers.quick_config(num_train_steps=2)
  config.single_w.w = 2.0
  config.distill.initial_num_steps = 4
  pipeline.run(config, workdir, 'distill_single_w')
  return workdir


def test_single_w_baseline_runs_its_own_rounds(single_w_workdir):
  rounds = workdir_lib.finished_rounds(single_w_workdir, 'single_w', w=2)
  assert rounds == [2, 1]
  assert not os.path.exists(os.path.join(single_w_workdir, 'guided'))
  with open(
    os.path.join(single_w_workdir, 'single_w', 'w2', '2steps', 'stage.json')
  ) as f:
    record = json.load(f)
  assert record['teacher'].endswith('teacher')
  assert record['w'] == 2.0
  assert record['teacher_num_steps'] == 4


def test_single_w_sampler_accepts_only_its_w(single_w_workdir):
  sampler_fn = sample.load_sampler(
    single_w_workdir, 'single_w', num_steps=2, w=2.0
  )
  assert sampler_fn(jax.random.PRNGKey(0), np.arange(3), 2.0).shape[0] == 3
  with pytest.raises(ValueError, match='outside the range'):
    sampler_fn(jax.random.PRNGKey(0), np.arange(3), 1.0)
  with pytest.raises(ValueError, match=r'trained: \[2.0\]'):
    sample.load_sampler(single_w_workdir, 'single_w', num_steps=2)
  with pytest.raises(ValueError, match='distilled step counts'):
    sample.load_sampler(single_w_workdir, 'single_w', num_steps=2, w=1.0)


def test_single_w_mode_needs_a_teacher(tmp_path):
  with pytest.raises(FileNotFoundError, match="finished 'teacher'"):
    pipeline.run(
      helpers.quick_config(), str(tmp_path / 'run'), 'distill_single_w'
    )
