"""End to end: the teacher on digits and on mocked TFDS data, then sampling."""

import json
import logging
import os
import shutil
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from gdd import data, pipeline, sample
from gdd.train import checkpointing, loop
from tests import helpers


def _teacher_config():
  return helpers.quick_config(num_train_steps=4)


@pytest.fixture(scope='module')
def digits_workdir(tmp_path_factory):
  """A workdir with a 4-step digits teacher, trained once for this module.

  Four steps, not two: with one warm-up step (lr 0) and zero-initialised
  output layers, the class embedding only starts to matter at step 4.
  """
  workdir = str(tmp_path_factory.mktemp('digits'))
  pipeline.run(_teacher_config(), workdir, 'teacher')
  return workdir


def test_teacher_run_writes_the_workdir_layout(digits_workdir):
  stage_dir = os.path.join(digits_workdir, 'teacher')
  assert os.path.isdir(loop.params_dir(stage_dir))
  assert os.path.isdir(loop.checkpoints_dir(stage_dir))
  with open(os.path.join(stage_dir, 'config.json')) as f:
    assert json.load(f)['teacher']['num_train_steps'] == 4


def test_rerunning_a_finished_stage_does_nothing(digits_workdir, caplog):
  with caplog.at_level(logging.INFO):
    pipeline.run(_teacher_config(), digits_workdir, 'teacher')
  assert 'already finished' in caplog.text


def test_changed_training_config_is_reported(digits_workdir):
  config = _teacher_config()
  config.teacher.optimizer.learning_rate = 0.5
  config.model.ch = 8
  with pytest.raises(pipeline.ConfigMismatchError) as error:
    pipeline.run(config, digits_workdir, 'teacher')
  message = str(error.value)
  assert 'config.teacher.optimizer.learning_rate' in message
  assert 'config.model.ch: 16 in the workdir, 8 now' in message


def test_logging_cadence_may_change_on_resume(digits_workdir):
  config = _teacher_config()
  config.teacher.log_every = 1
  pipeline.run(config, digits_workdir, 'teacher')


def test_sample_cli_writes_the_npz_contract(digits_workdir, tmp_path):
  output = tmp_path / 'out' / 'teacher.npz'
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'gdd.main',
      '--config=configs/digits.py:quick',
      f'--workdir={digits_workdir}',
      '--mode=sample',
      '--config.sample.stage=teacher',
      '--config.sample.num_steps=3',
      '--config.sample.w=1.5',
      '--config.sample.sampler=ddim',
      '--config.sample.num_samples=13',
      '--config.sample.batch_size=8',
      f'--config.sample.output={output}',
    ],
    cwd=helpers.REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == str(output)
  with np.load(output) as npz:
    assert npz['images'].dtype == np.uint8
    assert npz['images'].shape == (13, 8, 8, 1)
    np.testing.assert_array_equal(npz['labels'], np.arange(13) % 10)
  assert os.path.exists(tmp_path / 'out' / 'teacher.png')


def test_load_sampler_is_jitted_and_deterministic(digits_workdir):
  sampler = sample.load_sampler(digits_workdir, 'teacher', num_steps=2)
  labels = np.array([0, 1, 2, 3, 4])
  first = sampler(jax.random.PRNGKey(0), labels, 1.0)
  assert first.shape == (5, 8, 8, 1)
  assert float(np.abs(first).max()) <= 1.0
  second = sampler(jax.random.PRNGKey(0), labels, 4.0)
  again = sampler(jax.random.PRNGKey(0), labels, 1.0)
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, second)
  # w is traced: one executable per (device-padded) batch size serves every w.
  padded = lambda n: n + -n % jax.device_count()
  assert sampler.compiled_batch_sizes() == [padded(5)]
  assert sampler.compile(11) > 0
  assert sampler.compiled_batch_sizes() == [padded(5), padded(11)]
  sampler(jax.random.PRNGKey(0), np.arange(11) % 10, 2.0)
  assert sampler.compiled_batch_sizes() == [padded(5), padded(11)]


def test_load_sampler_rejects_bad_requests(digits_workdir, tmp_path):
  with helpers.raises_user_error(FileNotFoundError, match='Train it first'):
    sample.load_sampler(str(tmp_path), 'teacher', num_steps=2)
  with helpers.raises_user_error(ValueError, match="stage='student'"):
    sample.load_sampler(digits_workdir, 'student', num_steps=2)
  sampler = sample.load_sampler(digits_workdir, 'teacher', num_steps=2)
  with helpers.raises_user_error(ValueError, match='labels'):
    sampler(jax.random.PRNGKey(0), np.array([10]), 1.0)
  with helpers.raises_user_error(ValueError, match='w=-1'):
    sampler(jax.random.PRNGKey(0), np.array([1]), -1.0)
  keys = jax.random.split(jax.random.PRNGKey(0))
  with helpers.raises_user_error(ValueError, match=r'uint32\[2, 2\]'):
    sampler(keys, np.array([1]), 1.0)


def test_sampler_takes_typed_and_raw_keys_alike(digits_workdir):
  sampler = sample.load_sampler(digits_workdir, 'teacher', num_steps=2)
  labels = np.arange(4)
  np.testing.assert_array_equal(
    sampler(jax.random.key(0), labels, 1.0),
    sampler(jax.random.PRNGKey(0), labels, 1.0),
  )


def test_sample_to_files_returns_the_file_it_wrote(digits_workdir, tmp_path):
  config = _teacher_config()
  config.sample.output = str(tmp_path / 'noext')
  written = sample.sample_to_files(config, digits_workdir)
  assert written == str(tmp_path / 'noext.npz')
  assert sorted(os.listdir(tmp_path)) == ['noext.npz', 'noext.png']


@pytest.mark.parametrize('name', ['cifar10', 'imagenet64'])
def test_teacher_runs_on_mocked_tfds(name, tmp_path):
  config = helpers.quick_config(name, num_train_steps=2)
  config.teacher.batch_size = 8
  config.model.update(ch=8, emb_ch=16, head_dim=8)
  if name == 'imagenet64':
    # The paper config's memory settings (bfloat16, FSDP over 8 devices, 8
    # micro-batches), scaled down: one example per device and micro-batch,
    # and every array split (a tiny model has none of 2**20 elements).
    paper = helpers.load_config('imagenet64')
    config.model.dtype = paper.model.dtype
    config.memory.update(fsdp=paper.memory.fsdp, fsdp_min_size=0)
    config.teacher.update(
      grad_accum_steps=paper.teacher.grad_accum_steps,
      batch_size=8 * paper.teacher.grad_accum_steps,
    )
  config.data.data_dir = str(tmp_path / 'tfds')
  tfds_name = {'cifar10': 'cifar10', 'imagenet64': 'imagenet_resized/64x64'}
  builder = tfds.builder(tfds_name[name])
  # mock_data serves random examples; the builder's metadata in data_dir is
  # what makes the dataset count as prepared for check_available.
  metadata_dir = tmp_path / 'tfds' / builder.info.full_name
  metadata_dir.mkdir(parents=True)
  builder.info.write_to_directory(str(metadata_dir))
  workdir = str(tmp_path / 'run')
  num_examples = max(16, config.teacher.batch_size)
  with tfds.testing.mock_data(
    num_examples=num_examples, data_dir=config.data.data_dir
  ):
    pipeline.run(config, workdir, 'teacher')
  assert os.path.isdir(loop.params_dir(os.path.join(workdir, 'teacher')))


def test_missing_tfds_dataset_fails_before_compiling(tmp_path):
  config = helpers.quick_config('cifar10')
  config.data.data_dir = str(tmp_path / 'empty')
  with helpers.raises_user_error(
    FileNotFoundError, match=str(tmp_path / 'empty')
  ):
    pipeline.run(config, str(tmp_path / 'run'), 'teacher')
  assert not (tmp_path / 'run').exists()


def _params(stage_dir):
  return jax.device_get(checkpointing.load_params(loop.params_dir(stage_dir)))


def test_chain_writes_every_stage_with_its_record(chain_workdir):
  assert sample.finished_rounds(chain_workdir) == [4, 2, 1]
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
  assert sample.finished_rounds(workdir) == [4]
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
  """The single-w baseline at w = 2 (4 → 2 → 1) from the chain's teacher."""
  workdir = str(tmp_path_factory.mktemp('single_w'))
  shutil.copytree(
    os.path.join(chain_workdir, 'teacher'), os.path.join(workdir, 'teacher')
  )
  config = helpers.quick_config(num_train_steps=2)
  config.single_w.w = 2.0
  pipeline.run(config, workdir, 'distill_single_w')
  return workdir


def test_single_w_baseline_runs_its_own_rounds(single_w_workdir):
  assert sample.finished_rounds(single_w_workdir, 'single_w/w2') == [4, 2, 1]
  assert not os.path.exists(os.path.join(single_w_workdir, 'guided'))
  with open(
    os.path.join(single_w_workdir, 'single_w', 'w2', '4steps', 'stage.json')
  ) as f:
    record = json.load(f)
  assert record['teacher'].endswith('teacher')
  assert record['w'] == 2.0
  assert record['teacher_num_steps'] == 8


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
