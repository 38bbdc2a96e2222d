"""FLOPs per step, peak FLOP/s per device and model FLOP utilisation (MFU).

MFU = FLOPs a step executes / (seconds per step × the device's peak FLOP/s).
The FLOPs come from XLA's cost analysis of the compiled program, so they are
what the hardware executes: with `memory.remat` on, the recomputed forward
pass is counted too (strictly, hardware FLOP utilisation). Peaks are the
vendors' dense (no sparsity) figures for the compute dtype; on CPU there is
no published peak, so the rate of a float32 matmul is measured once per
process instead.

The train loop logs `tflops_per_device` and `mfu` with `Throughput`:

  compiled = step.lower(state, frozen_params, batch).compile()
  meter = throughput.Throughput.of(compiled, device, config.model.dtype)
  ... every log_every steps, after the metrics reach the host:
  scalars.update(meter.report(steps_since_last_log, seconds_since_last_log))
"""

import dataclasses
import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

# Peak dense FLOP/s per JAX device: (regex on the lowercased `device_kind`,
# bfloat16 peak, float32 peak); the first match wins, so a specific kind comes
# before a general one. float32 means JAX's default matmul precision, which
# is TF32 on Ampere and later GPUs and one bfloat16 pass on TPUs
# (docs.jax.dev/en/latest/201/precision.html). NVIDIA's datasheets list
# tensor-core rates with 2:4 sparsity; the dense rate is half of that. A TPU
# v4 or v5p chip is one JAX device (its two TensorCores act as one).
_PEAKS = (
  # H100 datasheet: PCIe BF16 1,513 and TF32 756 TFLOPS (sparse).
  (r'h100.*pcie', 756e12, 378e12),
  # H100 SXM5 ('NVIDIA H100 80GB HBM3'): BF16 1,979, TF32 989 (sparse).
  (r'h100', 989e12, 494.5e12),
  # H200 SXM datasheet: the H100 SXM5 tensor-core rates.
  (r'h200', 989e12, 494.5e12),
  # A100 datasheet (SXM4 and PCIe alike): BF16 312, TF32 156 (dense).
  (r'a100', 312e12, 156e12),
  # L4 datasheet: BF16 242.5, TF32 120 (sparse). '\b' keeps L40S out.
  (r'\bl4\b', 121e12, 60e12),
  # V100 datasheet: FP32 15.7 (SXM2), 14 (PCIe); no bfloat16 tensor cores.
  (r'v100.*pcie', None, 14e12),
  (r'v100', None, 15.7e12),
  # Cloud TPU docs (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e): peak
  # bf16 compute per chip 275, 197, 459 and 918 TFLOPs.
  (r'tpu v4', 275e12, 275e12),
  (r'tpu v5 ?lite|tpu v5e', 197e12, 197e12),
  (r'tpu v5', 459e12, 459e12),
  (r'tpu v6 ?lite|tpu v6e', 918e12, 918e12),
)
# The CPU rate is measured on a square float32 matmul of this size.
_CPU_MATMUL_SIZE = 1024
_CPU_MATMUL_REPEATS = 10


def table_peak_flops(device_kind: str, dtype: str) -> float | None:
  """The vendor's peak dense FLOP/s of one device of `device_kind`.

  None when the kind is not in the table, or the table has no rate for
  `dtype` (e.g. 'bfloat16' on a V100, which has no bfloat16 tensor cores).
  """
  kind = device_kind.lower()
  for pattern, bfloat16, float32 in _PEAKS:
    if re.search(pattern, kind):
      peaks = {'bfloat16': bfloat16, 'float32': float32}
      return peaks.get(jnp.dtype(dtype).name)
  return None


@functools.cache
def _measured_cpu_flops() -> float:
  """FLOP/s of a jitted float32 matmul on the first CPU device (best of N).

  XLA:CPU computes bfloat16 matmuls in float32, so the rate serves for both.
  """
  n = _CPU_MATMUL_SIZE
  device = jax.local_devices(backend='cpu')[0]
  matrix = jax.device_put(np.ones((n, n), np.float32), device)
  matmul = jax.jit(lambda a: a @ a)
  matmul(matrix).block_until_ready()  # Compiles.
  seconds = []
  for _ in range(_CPU_MATMUL_REPEATS):
    start = time.perf_counter()
    matmul(matrix).block_until_ready()
    seconds.append(time.perf_counter() - start)
  return 2 * n**3 / min(seconds)


def peak_flops_per_second(device: jax.Device, dtype: str) -> float | None:
  """Peak FLOP/s of `device` for compute in `dtype`, or None if unknown.

  Accelerators: the vendor figure (`table_peak_flops`). CPU devices: the
  measured matmul rate, split evenly over this process's CPU devices, which
  share the host's cores (8 fake devices in tests are one CPU).
  """
  if device.platform == 'cpu':
    return _measured_cpu_flops() / len(jax.local_devices(backend='cpu'))
  return table_peak_flops(device.device_kind, dtype)


def step_flops(compiled: jax.stages.Compiled) -> float:
  """FLOPs one call of `compiled` executes on each device.

  XLA's cost analysis of the partitioned program, which is per device: a
  batch split over 8 devices reports an eighth of the whole step's FLOPs.
  In jax 0.10 `cost_analysis()` returns one dict.
  """
  return float(compiled.cost_analysis()['flops'])


def mfu(flops_per_device: float, seconds: float, peak_flops: float) -> float:
  """Achieved FLOP/s per device over the peak, e.g. 0.4 for 40%."""
  return flops_per_device / seconds / peak_flops


@dataclasses.dataclass(frozen=True)
class Throughput:
  """Turns step counts and wall time into TFLOP/s per device and MFU.

  Attributes:
    flops_per_step: FLOPs one step executes on each device (`step_flops`).
    peak_flops: peak FLOP/s of one device, or None when unknown (then only
      TFLOP/s are reported).
  """

  flops_per_step: float
  peak_flops: float | None

  @classmethod
  def of(
    cls, compiled: jax.stages.Compiled, device: jax.Device, dtype: str
  ) -> 'Throughput':
    """For a compiled step running on devices like `device` in `dtype`."""
    return cls(step_flops(compiled), peak_flops_per_second(device, dtype))

  def report(self, steps: int, seconds: float) -> dict[str, float]:
    """{'tflops_per_device', 'mfu'} over `steps` steps that took `seconds`.

    Time the steps only once their results are on the host (after a
    device_get): dispatch is asynchronous.
    """
    flops = self.flops_per_step * steps
    scalars = {'tflops_per_device': flops / seconds / 1e12}
    if self.peak_flops:
      scalars['mfu'] = mfu(flops, seconds, self.peak_flops)
    return scalars
