"""FSDP layouts and gradient accumulation compute what plain data parallelism
computes; checkpoints move between layouts."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from gdd import config_lib, data
from gdd.stages import Stage, teacher
from gdd.train import checkpointing, loop, sharding
from gdd.train.state import TrainState
from tests import helpers


def _memory(fsdp_min_size=0, rules=(('.*', 'fsdp'),)):
  memory = config_lib.base_config().memory
  memory.update(fsdp_min_size=fsdp_min_size, fsdp_rules=rules)
  return memory


def test_fsdp_rule_splits_the_largest_divisible_axis():
  spec = lambda shape, **kw: sharding.fsdp_spec(
    'a/kernel',
    shape,
    **{'fsdp': 4, 'min_size': 0, 'rules': (('.*', 'fsdp'),), **kw},
  )
  assert spec((3, 3, 64, 128)) == PartitionSpec(None, None, None, 'fsdp')
  assert spec((64, 64)) == PartitionSpec('fsdp', None)  # First of equals.
  assert spec((3, 5)) == PartitionSpec()  # No axis divisible by 4.
  assert spec((64, 128), min_size=64 * 128 + 1) == PartitionSpec()
  assert spec((64, 128), fsdp=1) == PartitionSpec()
  replicate_kernels = (('.*kernel', 'replicate'), ('.*', 'fsdp'))
  assert spec((64, 128), rules=replicate_kernels) == PartitionSpec()


def test_bytes_per_device_counts_each_split():
  tree = {
    'a': jax.ShapeDtypeStruct((8, 16), jnp.float32),
    'b': jax.ShapeDtypeStruct((3,), jnp.float32),
  }
  specs = sharding.tree_specs(tree, _memory(), fsdp=4)
  assert specs['a'] == PartitionSpec(None, 'fsdp')
  assert sharding.bytes_per_device(tree, specs, {'data': 2, 'fsdp': 4}) == (
    8 * 16 * 4 // 4 + 3 * 4
  )


def test_fsdp_train_step_equals_the_data_parallel_step():
  config = helpers.quick_config()
  stage = teacher.make_stage(config, data.get_info(config.data))
  fsdp_mesh = sharding.make_mesh(fsdp=4)
  assert dict(fsdp_mesh.shape) == {'data': 2, 'fsdp': 4}
  data_parallel, dp_metrics = helpers.train_steps(
    stage, sharding.make_mesh(), 3
  )
  fsdp, fsdp_metrics = helpers.train_steps(
    stage, fsdp_mesh, 3, memory_config=_memory()
  )
  chex.assert_trees_all_close(
    data_parallel.params, fsdp.params, atol=1e-5, rtol=1e-4
  )
  chex.assert_trees_all_close(
    data_parallel.ema_params, fsdp.ema_params, atol=1e-5, rtol=1e-4
  )
  np.testing.assert_allclose(dp_metrics['loss'], fsdp_metrics['loss'], 1e-5)


def test_fsdp_layout_splits_params_optimizer_state_and_ema():
  config = helpers.quick_config()
  stage = teacher.make_stage(config, data.get_info(config.data))
  tx, _, layout = loop.build_train_step(
    stage,
    sharding.make_mesh(fsdp=4),
    jax.random.PRNGKey(0),
    memory_config=_memory(),
  )
  kernel = layout.state.params['conv_in']['kernel']
  assert kernel.spec == PartitionSpec(None, None, None, 'fsdp')
  assert layout.state.ema_params['conv_in']['kernel'] == kernel
  adam_specs = [
    s.spec for s in jax.tree.leaves(layout.state.opt_state) if 'fsdp' in s.spec
  ]
  # mu and nu of every split param.
  split_params = [
    s for s in jax.tree.leaves(layout.state.params) if 'fsdp' in s.spec
  ]
  assert len(adam_specs) == 2 * len(split_params) > 0
  assert layout.state.step.spec == PartitionSpec()


def _toy_stage(batch_size: int, grad_accum_steps: int) -> Stage:
  """A deterministic loss (no random numbers), so any batching must agree."""
  train_config = config_lib.train_config(
    batch_size=batch_size, grad_accum_steps=grad_accum_steps, ema_decay=0.5
  )

  def loss_fn(params, frozen_params, batch, rng):
    del frozen_params, rng
    images = batch['image'].reshape(batch['image'].shape[0], -1)
    prediction = jnp.tanh(images @ params['w']) @ params['v']
    target = jax.nn.one_hot(batch['label'], 10)
    loss = jnp.mean((prediction - target) ** 2)
    return loss, {'loss': loss}

  def init_params(rng, frozen_params):
    del frozen_params
    w_rng, v_rng = jax.random.split(rng)
    return {
      'w': jax.random.normal(w_rng, (64, 32)) * 0.1,
      'v': jax.random.normal(v_rng, (32, 10)) * 0.1,
    }

  return Stage(
    name='toy',
    train_config=train_config,
    init_params=init_params,
    loss_fn=loss_fn,
    frozen_params=None,
    sample_panels={},
    sample_ws=(),
  )


@pytest.mark.parametrize('fsdp', [1, 4])
def test_accumulation_equals_one_step_on_the_full_batch(fsdp):
  mesh = sharding.make_mesh(fsdp=fsdp)
  full, full_metrics = helpers.train_steps(
    _toy_stage(64, 1), mesh, 3, memory_config=_memory()
  )
  accumulated, accumulated_metrics = helpers.train_steps(
    _toy_stage(64, 4), mesh, 3, memory_config=_memory()
  )
  np.testing.assert_allclose(
    full_metrics['loss'], accumulated_metrics['loss'], rtol=1e-6
  )
  np.testing.assert_allclose(
    full_metrics['grad_norm'], accumulated_metrics['grad_norm'], rtol=1e-5
  )
  chex.assert_trees_all_close(
    full.params, accumulated.params, atol=1e-6, rtol=1e-5
  )


def test_batch_must_split_into_micro_batches_on_every_device():
  with helpers.raises_user_error(ValueError, 'grad_accum_steps'):
    sharding.check_batch_size(
      32, sharding.make_mesh(), 'teacher.batch_size', num_micro_batches=8
    )
  config = helpers.quick_config()
  config.teacher.grad_accum_steps = 3
  with helpers.raises_user_error(ValueError, 'teacher.grad_accum_steps=3'):
    config_lib.validate(config)


def test_fsdp_must_divide_the_devices():
  with helpers.raises_user_error(ValueError, r'memory\.fsdp=3'):
    sharding.make_mesh(fsdp=3)


def _state_on(mesh, memory, stage, tx):
  layout = loop.layout_for(stage, tx, mesh, memory)
  return layout, jax.jit(
    lambda rng: TrainState.create(stage.init_params(rng, None), tx),
    out_shardings=layout.state,
  )(jax.random.PRNGKey(3))


@pytest.mark.parametrize('save_fsdp, restore_fsdp', [(4, 1), (1, 8)])
def test_checkpoint_restores_under_another_layout(
  tmp_path, save_fsdp, restore_fsdp
):
  config = helpers.quick_config()
  stage = teacher.make_stage(config, data.get_info(config.data))
  tx, _, _ = loop.build_train_step(
    stage, sharding.make_mesh(), jax.random.PRNGKey(0)
  )
  memory = _memory()
  _, state = _state_on(sharding.make_mesh(fsdp=save_fsdp), memory, stage, tx)
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'ckpt'), max_to_keep=1)
  ckpt.save(1, state)
  ckpt.wait_until_finished()

  layout, fresh = _state_on(
    sharding.make_mesh(fsdp=restore_fsdp), memory, stage, tx
  )
  restored = ckpt.restore_latest(sharding.abstract(fresh, layout.state))
  ckpt.close()
  kernel = restored.params['conv_in']['kernel']
  assert kernel.sharding == layout.state.params['conv_in']['kernel']
  chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))


def test_memory_config_is_validated():
  config = helpers.quick_config()
  config.memory.fsdp_rules = (('(', 'fsdp'),)
  with helpers.raises_user_error(ValueError, 'memory.fsdp_rules'):
    config_lib.validate(config)
  config.memory.fsdp_rules = (('.*', 'shard'),)
  with helpers.raises_user_error(ValueError, 'memory.fsdp_rules'):
    config_lib.validate(config)
