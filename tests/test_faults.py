"""Faults and bad input a long run meets, and what gdd promises for each.

Divergence, damaged checkpoints and exports, a second run on one workdir,
SIGTERM, a full disk, user errors on the command line, batch sizes that do
not split over the devices. Each test reproduces one defect found by a fault
probe and checks the promise the README's "Resuming" section makes about it.
`:quick` sizes and a few steps keep them fast.
"""

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from gdd import config_lib, data, errors, pipeline, sample, workdir_lib
from gdd.stages import teacher
from gdd.train import checkpointing, lock, loop, preemption
from tests import conftest, helpers


def _config(**teacher_overrides):
  """An 8-step `:quick` teacher that checkpoints every 2 steps, keeps all."""
  config = helpers.quick_config(num_train_steps=8)
  config.teacher.update(checkpoint_every=2, max_checkpoints_to_keep=10)
  config.teacher.update(**teacher_overrides)
  return config


def _export(stage_dir: str):
  return jax.device_get(
    checkpointing.load_params(workdir_lib.params_dir(stage_dir))
  )


def _truncate_files(folder: str) -> None:
  """Halves every file under `folder`, as a damaged disk or copy would."""
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      os.truncate(path, os.path.getsize(path) // 2)


@pytest.fixture(scope='module')
def finished_workdir(tmp_path_factory):
  """A workdir whose teacher ran 8 steps uninterrupted (the reference)."""
  workdir = str(tmp_path_factory.mktemp('straight'))
  pipeline.run(_config(), workdir, 'teacher')
  return workdir


def _copy(workdir: str, tmp_path) -> str:
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy)
  return copy


def _stage(config):
  return teacher.make_stage(config, data.get_info(config.data))


@pytest.mark.parametrize(
  'warmup_steps, kept, message',
  [
    # lr rises by 2.5e28 per step: the params after update 2 are finite
    # (~2.5e28) but step 3's loss is not, so only checkpoint 1 is good.
    (40, [1], 'checkpoint 1, the newest state known to be good, is kept'),
    # Diverged by the first update: no state may be kept.
    (0, [], 'no checkpoint was written'),
  ],
)
def test_a_diverged_state_is_never_checkpointed(
  tmp_path, warmup_steps, kept, message
):
  config = _config(checkpoint_every=1, log_every=1)
  config.teacher.optimizer.update(learning_rate=1e30, warmup_steps=warmup_steps)
  stage_dir = str(tmp_path / 'teacher')
  with pytest.raises(loop.NonFiniteLossError, match=message):
    loop.train_stage(_stage(config), config, stage_dir)
  assert helpers.checkpoint_steps(stage_dir) == kept
  for step in kept:
    ckpt = checkpointing.Checkpointer(stage_dir, max_to_keep=10)
    state = jax.device_get(ckpt.restore(step, None))
    ckpt.close()
    for leaf in jax.tree.leaves((state['params'], state['ema_params'])):
      assert np.all(np.isfinite(leaf)) and np.abs(leaf).max() < 1e6


def test_a_corrupt_latest_checkpoint_falls_back_to_the_older_one(
  finished_workdir, tmp_path, caplog
):
  stage_dir = os.path.join(_copy(finished_workdir, tmp_path), 'teacher')
  # As if the run had died after saving checkpoint 8, before exporting, and
  # checkpoint 8's files were damaged.
  shutil.rmtree(workdir_lib.params_dir(stage_dir))
  _truncate_files(os.path.join(workdir_lib.checkpoints_dir(stage_dir), '8'))

  config = _config()
  with caplog.at_level(logging.WARNING):
    loop.train_stage(_stage(config), config, stage_dir)
  assert 'Checkpoint 8 in' in caplog.text
  assert 'Resuming from checkpoint 6 instead' in caplog.text
  assert helpers.checkpoint_steps(stage_dir) == [
    2,
    4,
    6,
    8,
  ]  # 8 was trained and saved again.
  _assert_recovered(stage_dir, finished_workdir, moved=['checkpoints', '8'])


def _assert_recovered(stage_dir, finished_workdir, *, moved: list[str]):
  """One thing was moved aside, and the export equals the reference run's."""
  aside = os.listdir(workdir_lib.unreadable_dir(stage_dir))
  assert [name.split('_')[:2] for name in aside] == [moved]
  chex.assert_trees_all_equal(
    _export(stage_dir), _export(os.path.join(finished_workdir, 'teacher'))
  )


def test_a_broken_params_export_is_written_again(
  finished_workdir, tmp_path, caplog
):
  workdir = _copy(finished_workdir, tmp_path)
  stage_dir = os.path.join(workdir, 'teacher')
  _truncate_files(workdir_lib.params_dir(stage_dir))
  with pytest.raises(checkpointing.UnreadableCheckpointError, match='Re-run'):
    sample.load_sampler(workdir, 'teacher', num_steps=2)

  with caplog.at_level(logging.WARNING):
    pipeline.run(_config(), workdir, 'teacher')
  assert 'params export of' in caplog.text
  _assert_recovered(stage_dir, finished_workdir, moved=['teacher', 'params'])


def test_nothing_readable_is_one_error_that_names_the_folder(
  finished_workdir, tmp_path
):
  workdir = _copy(finished_workdir, tmp_path)
  checkpoints = workdir_lib.checkpoints_dir(os.path.join(workdir, 'teacher'))
  _truncate_files(checkpoints)
  _truncate_files(workdir_lib.params_dir(os.path.join(workdir, 'teacher')))
  with pytest.raises(checkpointing.UnreadableCheckpointError) as error:
    pipeline.run(_config(), workdir, 'teacher')
  assert f'No checkpoint in {checkpoints} can be read' in str(error.value)
  assert sorted(os.listdir(checkpoints)) == ['2', '4', '6', '8']
  stage_dir = os.path.join(workdir, 'teacher')
  assert os.path.isdir(workdir_lib.params_dir(stage_dir))
  assert not os.path.exists(workdir_lib.unreadable_dir(stage_dir))


def test_bad_data_between_checkpoints_is_blamed_on_the_data(
  tmp_path, monkeypatch
):
  config = _config()
  real_batches = data.train_batches

  def poisoned_batches(*args, **kwargs):
    for index, batch in enumerate(real_batches(*args, **kwargs)):
      # Feeds step 4; no save checks it beforehand (the health check at
      # checkpoint 2 looks at batch 2), so the step's own metrics must.
      if index == 3:
        image = np.full(batch['image'].shape, np.inf, np.float32)
        batch = dict(batch, image=image)
      yield batch

  monkeypatch.setattr(data, 'train_batches', poisoned_batches)
  stage_dir = str(tmp_path / 'teacher')
  with pytest.raises(
    loop.NonFiniteLossError,
    match='a batch of the steps up to 4 holds NaN or Inf.*Checkpoint 2 is kept',
  ):
    loop.train_stage(_stage(config), config, stage_dir)
  assert helpers.checkpoint_steps(stage_dir) == [2]


def test_sigterm_saves_the_current_step_and_resumes_exactly(
  finished_workdir, tmp_path, monkeypatch
):
  config = _config()
  stage_dir = str(tmp_path / 'teacher')
  real_batches = data.train_batches

  def batches_then_sigterm(*args, **kwargs):
    for index, batch in enumerate(real_batches(*args, **kwargs)):
      if index == 5:  # Fetched after step 5: between checkpoints 4 and 6.
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(data, 'train_batches', batches_then_sigterm)
  with pytest.raises(preemption.InterruptedRunError, match='after step 5'):
    loop.train_stage(_stage(config), config, stage_dir)
  monkeypatch.setattr(data, 'train_batches', real_batches)
  assert helpers.checkpoint_steps(stage_dir) == [2, 4, 5]
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

  loop.train_stage(_stage(config), config, stage_dir)
  chex.assert_trees_all_equal(
    _export(stage_dir), _export(os.path.join(finished_workdir, 'teacher'))
  )


def _python(*args, **kwargs) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, *args],
    cwd=helpers.REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    # One CPU device: compiles faster than the tests' 8 fake devices.
    env=dict(
      os.environ,
      JAX_PLATFORMS='cpu',
      XLA_FLAGS=conftest.TEST_XLA_FLAGS,
      GDD_VERBOSE='',
    ),
    **kwargs,
  )


def _gdd(workdir, *overrides) -> subprocess.Popen:
  return _python(
    '-m',
    'gdd.main',
    '--config=configs/digits.py:quick',
    f'--workdir={workdir}',
    '--mode=teacher',
    *overrides,
  )


def test_a_second_run_on_a_workdir_fails_at_once_and_sigterm_exits_75(
  tmp_path,
):
  workdir = tmp_path / 'run'
  first = _gdd(workdir, '--config.teacher.num_train_steps=100000')
  lock_file = workdir_lib.lock_file(workdir / 'teacher')
  deadline = time.time() + 300
  while not (lock_file.exists() and lock_file.read_text()):
    assert first.poll() is None, first.communicate()
    assert time.time() < deadline
    time.sleep(0.5)

  second = _gdd(workdir)
  _, stderr = second.communicate(timeout=300)
  assert second.returncode == 1, stderr
  assert f'pid {first.pid} on host' in stderr
  assert 'Traceback' not in stderr

  first.send_signal(signal.SIGTERM)
  _, stderr = first.communicate(timeout=300)
  assert first.returncode == preemption.EXIT_CODE, stderr
  assert 'stopped by SIGTERM after step' in stderr
  step = int(stderr.split('after step ')[1].split(';')[0])
  assert helpers.checkpoint_steps(str(workdir / 'teacher'))[-1] == step


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
  stage_dir = str(tmp_path / 'teacher')
  holder = _python(
    '-c',
    'import time; from gdd.train import lock\n'
    f'with lock.hold({stage_dir!r}):\n'
    "  print('held', flush=True); time.sleep(600)",
  )
  assert holder.stdout.readline().strip() == 'held'
  held = pytest.raises(lock.LockHeldError, match=f'pid {holder.pid} on host')
  with held, lock.hold(stage_dir):
    pass
  holder.kill()  # SIGKILL: no clean-up code runs in the holder.
  holder.wait()
  with lock.hold(stage_dir):
    pass


def test_a_full_disk_is_reported_as_such():
  try:
    try:
      raise OSError(errno.ENOSPC, 'No space left on device')
    except OSError as full:
      raise ValueError('Orbax: commit failed') from full
  except ValueError as wrapped:
    message = errors.user_message(wrapped)
  assert message.startswith('No space left on device')
  assert 'resumes from the newest one' in message
  assert errors.user_message(ValueError('a bug')) is None
  try:
    try:
      raise config_lib.ConfigError('a user error')
    except config_lib.ConfigError:
      raise OSError(errno.EACCES, 'Permission denied')  # noqa: B904
  except OSError as unexpected:
    # Raised while handling a user error, not from it: keeps its traceback.
    assert errors.user_message(unexpected) is None


@pytest.mark.parametrize(
  'mode, section',
  [('all', 'distill'), ('guided', 'guided'), ('distill_single_w', 'distill')],
)
def test_every_batch_a_mode_will_use_is_checked_before_any_stage(
  tmp_path, mode, section
):
  config = helpers.quick_config()
  config[section].batch_size = 12  # Not a multiple of the 8 test devices.
  with pytest.raises(
    config_lib.ConfigError, match=f'config.{section}.batch_size=12'
  ):
    pipeline.run(config, str(tmp_path / 'run'), mode)
  assert not (tmp_path / 'run').exists()
