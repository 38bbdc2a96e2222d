r"""Times the teacher's jitted train step (compile and steady state).

  python benchmarks/teacher_step_time.py --config=configs/digits.py \
      --config.model.ch=32 --steps=50

Prints compile seconds, seconds per step and images per second on this
machine's default JAX device. For choosing model sizes; no assertion.
"""

import time

import jax
from absl import app, flags
from ml_collections import config_flags

from gdd import config_lib, data
from gdd.stages import teacher
from gdd.train import loop, sharding
from gdd.train.state import TrainState

_CONFIG = config_flags.DEFINE_config_file('config', lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 30, 'Timed steps after compiling.')


def main(argv):
  del argv
  config = _CONFIG.value
  config_lib.validate(config)
  info = data.get_info(config.data)
  stage = teacher.make_stage(config, info)
  mesh = sharding.make_mesh()
  tx, step = loop.build_train_step(stage, mesh, jax.random.PRNGKey(1))
  state = jax.jit(
    lambda rng: TrainState.create(stage.init_params(rng, None), tx),
    out_shardings=sharding.replicated(mesh),
  )(jax.random.PRNGKey(0))
  train_config = config.teacher
  batches = data.train_batches(
    config.data, seed=0, global_batch_size=train_config.batch_size
  )
  batch = sharding.global_batch(next(batches), mesh)
  start = time.perf_counter()
  state, metrics = step(state, None, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = step(state, None, batch)
  jax.block_until_ready(metrics)
  per_step = (time.perf_counter() - start) / _STEPS.value
  params = sum(x.size for x in jax.tree.leaves(state.params))
  print(
    f'device={jax.devices()[0].device_kind} params={params:,} '
    f'batch={train_config.batch_size} compile+first={compile_s:.1f}s '
    f'step={per_step * 1e3:.0f}ms '
    f'images/s={train_config.batch_size / per_step:.0f}'
  )


if __name__ == '__main__':
  app.run(main)
