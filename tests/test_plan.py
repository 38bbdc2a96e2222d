"""The planner: targets, state bytes under FSDP, activations, fit checks."""

import jax
import jax.numpy as jnp
import ml_collections
import optax
import pytest

from gdd import data, plan
from gdd.train import sharding, throughput
from tests import helpers

F32 = jnp.float32


@pytest.mark.parametrize(
  'name, num_devices, memory_bytes, peak',
  [
    # GPUs: 75% of the memory, JAX's default allocation.
    ('8xH100', 8, 0.75 * 80e9, 989e12),
    ('16xa100-40gb', 16, 0.75 * 40e9, 312e12),
    # v4 and v5p slices count TensorCores, two per chip (one JAX device).
    ('v4-32', 16, 32 * 2**30, 275e12),
    ('v5p-8', 4, 95e9, 459e12),
    # v5e and v6e slices count chips.
    ('v5e-64', 64, 16e9, 197e12),
    ('v6e-8', 8, 32e9, 918e12),
  ],
)
def test_targets_parse(name, num_devices, memory_bytes, peak):
  target = plan.parse_target(name, 'bfloat16')
  assert target.num_devices == num_devices
  assert target.memory_bytes == memory_bytes
  assert target.peak_flops == peak


def test_empty_target_is_the_devices_present():
  target = plan.parse_target('', 'float32')
  assert target.num_devices == 8
  assert target.memory_bytes is None  # CPUs report no memory size.
  assert target.peak_flops > 0  # Measured.


@pytest.mark.parametrize('name', ['8xK80', 'v9-8', 'tpu', '0xH100', 'v5e-0'])
def test_unknown_targets_name_the_known_ones(name):
  with helpers.raises_user_error(ValueError, 'not a known target') as error:
    plan.parse_target(name, 'float32')
  for known in ("'H100'", "'A100-40GB'", "'v4'", "'v5e'", "'v5p'", "'v6e'"):
    assert known in str(error.value)


def test_v4_slices_count_whole_chips():
  with helpers.raises_user_error(ValueError, 'multiple of 2'):
    plan.parse_target('v4-3', 'float32')


def test_batch_that_does_not_split_over_the_target_fails_early():
  config = helpers.load_config('digits')
  config.teacher.grad_accum_steps = 4
  target = plan.parse_target('v5e-64', 'float32')
  with helpers.raises_user_error(ValueError, 'teacher.batch_size=64 .* 256'):
    plan.check_splits(config, 'teacher', target)


def test_state_bytes_under_fsdp_are_the_hand_counted_sum():
  struct = lambda *shape: jax.ShapeDtypeStruct(shape, F32)
  params = {
    'conv': {'kernel': struct(3, 3, 64, 128)},
    'dense': {'kernel': struct(256, 512), 'bias': struct(512)},
  }
  frozen = {'kernel': struct(1024, 1024)}
  memory = ml_collections.ConfigDict(
    {
      'fsdp': 4,
      'fsdp_min_size': 1000,
      'fsdp_rules': (('.*bias', 'replicate'), ('.*', 'fsdp')),
    }
  )
  state = plan.state_bytes(
    params, frozen, optax.adam(1e-3), memory, fsdp=4, num_devices=8
  )
  # Kernels are split 4 ways along their largest axis; the bias is kept whole.
  params_bytes = 4 * (3 * 3 * 64 * 128 // 4 + 256 * 512 // 4 + 512)
  frozen_bytes = 4 * 1024 * 1024 // 4
  whole_bytes = 4 * (3 * 3 * 64 * 128 + 256 * 512 + 512 + 1024 * 1024)
  assert state == plan.StateBytes(
    params=params_bytes,
    # Adam's mu and nu mirror the params; its int32 step count is whole.
    opt_state=2 * params_bytes + 4,
    ema_params=params_bytes,
    frozen_params=frozen_bytes,
    grads=params_bytes,
    gathered=whole_bytes - params_bytes - frozen_bytes,
  )
  assert state.total(accumulating=True) - state.total(False) == params_bytes


def test_activation_estimate_matches_a_compiled_program():
  # The line through micro-batches 4 and 8 (the planner's), checked at 16.
  config = helpers.load_config('digits')
  # Dropout's random masks take a third of XLA:CPU's compile time here.
  config.model.dropout = 0.0
  info = data.get_info(config.data)
  stage = plan.build_stage(config, info, 'teacher')
  compiled = plan.compile_gradient_programs(
    stage, plan.batch_maker(config, info), (*plan.MEASURED_MICRO_BATCHES, 16)
  )
  program = plan.fit_gradient_program(plan.MEASURED_MICRO_BATCHES, compiled)
  actual = compiled[2].memory_analysis().temp_size_in_bytes
  assert program.temp_bytes(16) == pytest.approx(actual, rel=0.2)
  flops = throughput.step_flops(compiled[2])
  assert program.flops(16) == pytest.approx(flops, rel=0.01)


def _plan(memory_bytes: float | None, grad_accum_steps: int = 1):
  """A teacher on 8 devices: 1 MB of each kind of state, 0.5 GB/example."""
  target = plan.Target('test', 'NVIDIA H100 80GB HBM3', 8, memory_bytes, 1e15)
  return plan.StagePlan(
    section='teacher',
    batch_size=64,
    grad_accum_steps=grad_accum_steps,
    target=target,
    state=plan.StateBytes(*(1_000_000,) * 6),
    program=plan.GradientProgram(0.0, 0.5e9, 0.0, 1e9, 'cpu'),
    assumed_mfu=0.5,
  )


def test_too_little_memory_fails_naming_the_knobs():
  config = helpers.load_config('digits')
  # 8 examples per device need 4 GB; 1 GB less the 10% reserve is 0.9 GB.
  small = _plan(memory_bytes=1e9)
  with helpers.raises_user_error(ValueError, 'needs about 4.01 GB') as error:
    plan.require_fits(small, config)
  message = str(error.value)
  for knob in (
    'config.teacher.grad_accum_steps (now 1; 8 fits)',
    'config.memory.remat',
    'config.model.dtype',
    'config.memory.fsdp',
  ):
    assert knob in message
  assert small.max_micro_batch() == 1
  plan.require_fits(_plan(memory_bytes=1e9, grad_accum_steps=8), config)
  plan.require_fits(_plan(memory_bytes=None), config)  # Unknown: no check.


def test_check_fits_does_nothing_where_memory_is_unknown():
  config = helpers.load_config('digits')
  stage = plan.build_stage(config, data.get_info(config.data), 'teacher')
  # CPU devices report no memory size: returns before compiling anything.
  plan.check_fits(config, stage, 'teacher', sharding.make_mesh())


def test_plan_table_has_a_row_per_stage_and_flags_misfits():
  config = helpers.load_config('digits')
  plans = [_plan(1e9), _plan(1e9, grad_accum_steps=8)]
  text = plan.format_plan(config, plans[0].target, plans)
  rows = [line for line in text.splitlines() if line.startswith('| teacher')]
  assert len(rows) == 2
  assert '| NO |' in rows[0] and '| yes |' in rows[1]
  # 8 examples × 1 GFLOP per device at half of 1 PFLOP/s: 16 µs.
  assert rows[0].endswith('| 0.008 | 1.6e-05 |')
