r"""Times the teacher's jitted train step; reports FLOPs, TFLOP/s and MFU.

  python benchmarks/teacher_step_time.py --config=configs/digits.py \
      --config.model.dtype=bfloat16 --steps=50

Prints, for this machine's devices under the config's mesh (memory.fsdp),
grad_accum_steps and dtype: compile seconds, FLOPs per step (XLA's cost
analysis), seconds per step, images per second, achieved TFLOP/s per device
and MFU against the device's peak (the vendor table, or on CPU the measured
float32 matmul rate; `gdd.train.throughput`). For choosing model sizes and
memory settings; no assertion.
"""

import time

import jax
from absl import app, flags
from ml_collections import config_flags

from gdd import config_lib, data
from gdd.stages import teacher
from gdd.train import loop, sharding, throughput
from gdd.train.state import TrainState

_CONFIG = config_flags.DEFINE_config_file('config', lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 30, 'Timed steps after compiling.')


def main(argv):
  del argv
  config = _CONFIG.value
  config_lib.validate(config)
  info = data.get_info(config.data)
  stage = teacher.make_stage(config, info)
  mesh = sharding.mesh_for(config)
  train_config = config.teacher
  sharding.check_batch_size(
    train_config.batch_size,
    mesh,
    'teacher.batch_size',
    train_config.grad_accum_steps,
  )
  tx, step, layout = loop.build_train_step(
    stage,
    mesh,
    jax.random.PRNGKey(1),
    max_pixel_value=info.max_pixel_value,
    memory_config=config.memory,
  )
  state = jax.jit(
    lambda rng: TrainState.create(stage.init_params(rng, None), tx),
    out_shardings=layout.state,
  )(jax.random.PRNGKey(0))
  batches = data.train_batches(
    config.data, seed=0, global_batch_size=train_config.batch_size
  )
  batch = sharding.global_batch(next(batches), mesh)

  start = time.perf_counter()
  compiled = step.lower(state, None, batch).compile()
  compile_s = time.perf_counter() - start
  meter = throughput.Throughput.of(
    compiled, mesh.devices.flat[0], config.model.dtype
  )
  state, metrics = compiled(state, None, batch)  # Warm-up.
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = compiled(state, None, batch)
  jax.block_until_ready(metrics)
  seconds = time.perf_counter() - start
  report = meter.report(_STEPS.value, seconds)
  per_step = seconds / _STEPS.value
  params = sum(x.size for x in jax.tree.leaves(state.params))
  mfu = f'{report["mfu"]:.1%}' if 'mfu' in report else 'unknown'
  peak = meter.peak_flops
  print(
    f'device={mesh.devices.size}x{mesh.devices.flat[0].device_kind} '
    f'fsdp={config.memory.fsdp} dtype={config.model.dtype} '
    f'remat={config.memory.remat} params={params:,} '
    f'batch={train_config.batch_size} '
    f'accum={train_config.grad_accum_steps} compile={compile_s:.1f}s '
    f'GFLOP/step/device={meter.flops_per_step / 1e9:.1f} '
    f'step={per_step * 1e3:.0f}ms '
    f'images/s={train_config.batch_size / per_step:.0f} '
    f'TFLOP/s/device={report["tflops_per_device"]:.3f} '
    f'peak={"unknown" if not peak else f"{peak / 1e12:.3f}"}TFLOP/s '
    f'MFU={mfu}'
  )


if __name__ == '__main__':
  app.run(main)
