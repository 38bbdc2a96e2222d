"""Peak FLOP/s table, FLOPs from XLA's cost analysis, MFU arithmetic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gdd.train import throughput


def test_mfu_is_achieved_flops_over_peak():
  # 3 TFLOP per step, 10 steps in 6 s: 5 TFLOP/s, half of a 10 TFLOP/s peak.
  meter = throughput.Throughput(flops_per_step=3e12, peak_flops=10e12)
  assert meter.report(steps=10, seconds=6.0) == pytest.approx(
    {'tflops_per_device': 5.0, 'mfu': 0.5}
  )
  assert throughput.mfu(2e12, 4.0, 1e12) == pytest.approx(0.5)


def test_unknown_peak_reports_tflops_only():
  meter = throughput.Throughput(flops_per_step=1e12, peak_flops=None)
  assert meter.report(steps=2, seconds=1.0) == {'tflops_per_device': 2.0}


@pytest.mark.parametrize(
  'device_kind, dtype, peak',
  [
    ('NVIDIA H100 80GB HBM3', 'bfloat16', 989e12),
    ('NVIDIA H100 80GB HBM3', 'float32', 494.5e12),  # TF32.
    ('NVIDIA H100 PCIe', 'bfloat16', 756e12),
    ('NVIDIA A100-SXM4-80GB', 'float32', 156e12),
    ('NVIDIA L4', 'bfloat16', 121e12),
    ('NVIDIA L40S', 'bfloat16', None),  # Not an L4.
    ('Tesla V100-SXM2-16GB', 'float32', 15.7e12),
    ('Tesla V100-SXM2-16GB', 'bfloat16', None),
    ('TPU v4', 'bfloat16', 275e12),
    ('TPU v5 lite', 'bfloat16', 197e12),
    ('TPU v5p', 'float32', 459e12),  # One bfloat16 pass by default.
    ('TPU v6 lite', 'bfloat16', 918e12),
    ('Some future chip', 'bfloat16', None),
  ],
)
def test_peak_table_lookup(device_kind, dtype, peak):
  assert throughput.table_peak_flops(device_kind, dtype) == peak


def test_cpu_peak_is_a_measured_rate_for_every_dtype():
  device = jax.devices('cpu')[0]
  peak = throughput.peak_flops_per_second(device, 'float32')
  assert peak > 0
  assert throughput.peak_flops_per_second(device, 'bfloat16') == peak


def _matmul_structs(m: int, k: int, n: int):
  return (
    jax.ShapeDtypeStruct((m, k), jnp.float32),
    jax.ShapeDtypeStruct((k, n), jnp.float32),
  )


def test_matmul_flops_are_2mnk():
  m, k, n = 64, 48, 40
  compiled = jax.jit(jnp.matmul).lower(*_matmul_structs(m, k, n)).compile()
  assert throughput.step_flops(compiled) == 2 * m * n * k


def test_flops_are_per_device_when_the_batch_is_split():
  m, k, n = 64, 48, 40
  mesh = Mesh(np.asarray(jax.devices()), ('batch',))
  rows = NamedSharding(mesh, PartitionSpec('batch'))
  whole = NamedSharding(mesh, PartitionSpec())
  compiled = (
    jax.jit(jnp.matmul, in_shardings=(rows, whole))
    .lower(*_matmul_structs(m, k, n))
    .compile()
  )
  assert jax.device_count() == 8
  assert throughput.step_flops(compiled) == 2 * m * n * k / 8
