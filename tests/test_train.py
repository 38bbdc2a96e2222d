"""The train loop: sharding, checkpoints, resume, non-finite losses."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gdd import data, workdir_lib
from gdd.stages import teacher
from gdd.train import checkpointing, loop, optim, sharding, state
from tests import helpers


def test_sharded_step_on_8_devices_equals_one_device():
  assert jax.device_count() == 8
  config = helpers.quick_config()
  stage = teacher.make_stage(config, data.get_info(config.data))
  one, metrics_one = helpers.train_steps(
    stage, sharding.make_mesh(jax.devices()[:1]), 3
  )
  eight, metrics_eight = helpers.train_steps(stage, sharding.make_mesh(), 3)
  assert int(eight.step) == 3
  chex.assert_trees_all_close(one.params, eight.params, atol=1e-5, rtol=1e-4)
  chex.assert_trees_all_close(
    one.ema_params, eight.ema_params, atol=1e-5, rtol=1e-4
  )
  np.testing.assert_allclose(
    metrics_one['loss'], metrics_eight['loss'], rtol=1e-5
  )


def test_batch_size_not_divisible_by_devices_is_rejected():
  with pytest.raises(ValueError, match='teacher.batch_size=12'):
    sharding.check_batch_size(12, sharding.make_mesh(), 'teacher.batch_size')


def test_checkpoint_restores_onto_a_different_mesh(tmp_path):
  mesh8 = sharding.make_mesh()
  tree = {
    'w': jax.device_put(
      jnp.arange(32.0).reshape(8, 4), sharding.batch_sharded(mesh8)
    ),
    'b': jax.device_put(jnp.ones(3), sharding.replicated(mesh8)),
  }
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'ckpt'), max_to_keep=1)
  ckpt.save(7, tree)
  ckpt.wait_until_finished()
  assert ckpt.latest_step() == 7

  mesh2 = sharding.make_mesh(jax.devices()[2:4])
  target = {
    'w': jax.device_put(jnp.zeros((8, 4)), sharding.replicated(mesh2)),
    'b': jax.device_put(jnp.zeros(3), sharding.replicated(mesh2)),
  }
  restored = ckpt.restore(7, target)
  ckpt.close()
  assert restored['w'].sharding.mesh.devices.size == 2
  chex.assert_trees_all_close(jax.device_get(restored), jax.device_get(tree))


def test_params_export_is_never_overwritten(tmp_path):
  path = str(tmp_path / 'params')
  checkpointing.export_params(path, {'a': jnp.ones(2)})
  with pytest.raises(FileExistsError, match='never overwritten'):
    checkpointing.export_params(path, {'a': jnp.zeros(2)})
  np.testing.assert_array_equal(checkpointing.load_params(path)['a'], 1.0)


def test_missing_params_export_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match='Train the stage first'):
    checkpointing.load_params(str(tmp_path / 'nothing'))


def test_learning_rate_schedules():
  config = helpers.quick_config().teacher.optimizer
  config.warmup_steps = 10
  for decay, at_end in (('constant', 1e-3), ('cosine', 0.0), ('linear', 0.0)):
    config.decay = decay
    schedule = optim.learning_rate_schedule(config, 110)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(schedule(10), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(schedule(110), at_end, atol=1e-9)


def test_ema_warmup_decay_follows_the_formula_up_to_ema_decay():
  for n in (0, 1, 10, 100, 1000):
    np.testing.assert_allclose(
      state.ema_decay_at(0.9999, n, warmup=True), (1 + n) / (10 + n), rtol=1e-6
    )
  # (1 + n)/(10 + n) reaches 0.995 at n = 1790: capped from there on.
  assert state.ema_decay_at(0.995, 1789, warmup=True) < 0.995
  for n in (1790, 1791, 10**6):
    assert float(state.ema_decay_at(0.995, n, warmup=True)) == np.float32(0.995)
  # Traced step counts, as in the jitted train step.
  decays = jax.jit(jax.vmap(lambda n: state.ema_decay_at(0.5, n, True)))(
    jnp.arange(3)
  )
  np.testing.assert_allclose(decays, [0.1, 2 / 11, 0.25], rtol=1e-6)


def test_ema_without_warmup_is_the_plain_update():
  # The Python float itself: the jitted step traces what it did before
  # `ema_warmup` existed.
  decay = state.ema_decay_at(0.9, jnp.int32(5), warmup=False)
  assert isinstance(decay, float) and decay == 0.9
  ema, params = {'a': jnp.arange(3.0)}, {'a': jnp.ones(3)}
  np.testing.assert_array_equal(
    state.update_ema(ema, params, decay)['a'], 0.9 * ema['a'] + 0.1
  )


def test_train_step_applies_the_ema_warmup():
  config = helpers.quick_config()
  mesh = sharding.make_mesh(jax.devices()[:1])
  stage = _tiny_teacher(config)
  init = jax.device_get(
    stage.init_params(jax.random.PRNGKey(0), stage.frozen_params)
  )
  emas = {}
  for warmup in (False, True):
    config.teacher.ema_warmup = warmup
    after, _ = helpers.train_steps(_tiny_teacher(config), mesh, 1)
    emas[warmup] = after.ema_params
  # Update 0 decays by min(0.9, 1/10) with the warm-up, 0.9 without.
  for warmup, decay in ((False, 0.9), (True, 0.1)):
    expected = optax.incremental_update(after.params, init, 1 - decay)
    chex.assert_trees_all_close(emas[warmup], expected, atol=1e-6)


def _final_params(stage_dir):
  return jax.device_get(
    checkpointing.load_params(workdir_lib.params_dir(stage_dir))
  )


def _tiny_teacher(config):
  return teacher.make_stage(config, data.get_info(config.data))


def test_kill_and_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
  config = helpers.quick_config(num_train_steps=8)
  config.teacher.checkpoint_every = 2
  config.teacher.max_checkpoints_to_keep = 10
  stage = _tiny_teacher(config)
  loop.train_stage(stage, config, str(tmp_path / 'straight'))

  real_batches = data.train_batches

  def dying_batches(*args, **kwargs):
    for index, batch in enumerate(real_batches(*args, **kwargs)):
      if index == 5:  # Dies while computing step 6 (after checkpoint 4).
        raise KeyboardInterrupt('killed')
      yield batch

  killed_dir = str(tmp_path / 'killed')
  monkeypatch.setattr(data, 'train_batches', dying_batches)
  with pytest.raises(KeyboardInterrupt):
    loop.train_stage(stage, config, killed_dir)
  monkeypatch.setattr(data, 'train_batches', real_batches)
  assert not os.path.exists(workdir_lib.params_dir(killed_dir))
  ckpt = checkpointing.Checkpointer(killed_dir, max_to_keep=10)
  assert ckpt.latest_step() == 4
  ckpt.close()

  loop.train_stage(stage, config, killed_dir)
  chex.assert_trees_all_equal(
    _final_params(killed_dir), _final_params(str(tmp_path / 'straight'))
  )


def test_non_finite_data_stops_and_keeps_the_good_state(tmp_path, monkeypatch):
  config = helpers.quick_config(num_train_steps=8)
  config.teacher.update(checkpoint_every=2, log_every=2)
  real_batches = data.train_batches

  def poisoned_batches(*args, **kwargs):
    for index, batch in enumerate(real_batches(*args, **kwargs)):
      if index >= 4:  # Step 5 on sees NaN images.
        image = np.full(batch['image'].shape, np.nan, np.float32)
        batch = dict(batch, image=image)
      yield batch

  monkeypatch.setattr(data, 'train_batches', poisoned_batches)
  stage_dir = str(tmp_path / 'nan')
  # Step 4's params are fine; the batch of step 5 is not: the data is
  # blamed, and checkpoint 4 is kept.
  with pytest.raises(
    loop.NonFiniteLossError, match='batch of step 5 holds NaN.*Checkpoint 4'
  ):
    loop.train_stage(_tiny_teacher(config), config, stage_dir)
  assert helpers.checkpoint_steps(stage_dir) == [2, 4]
  ckpt = checkpointing.Checkpointer(stage_dir, max_to_keep=3)
  state = jax.device_get(ckpt.restore(4, None))
  ckpt.close()
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))
  assert not os.path.exists(workdir_lib.params_dir(stage_dir))


def test_train_stage_writes_logs_and_sample_grids(tmp_path):
  config = helpers.quick_config(num_train_steps=4)
  stage_dir = str(tmp_path / 'teacher')
  loop.train_stage(_tiny_teacher(config), config, stage_dir)
  files = os.listdir(stage_dir)
  assert any(f.startswith('events.out.tfevents') for f in files)
  grids = sorted(os.listdir(os.path.join(stage_dir, 'samples')))
  assert grids == [f'step4_w{w:g}.png' for w in sorted(config.grids.sample_ws)]
