"""Shared test fixtures: tiny configs that compile and run in seconds."""

import contextlib
import os

import ml_collections
import pytest

from gdd import config_lib, errors, workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, variant: str = '') -> ml_collections.ConfigDict:
  """`configs/<name>.py`'s get_config(variant), as config_flags loads it."""
  path = os.path.join(REPO, 'configs', f'{name}.py')
  return config_lib.load_file(f'{path}:{variant}' if variant else path)


@contextlib.contextmanager
def raises_user_error(builtin: type[Exception], match: str):
  """pytest.raises(builtin) that also wants a `gdd.errors.UserError`.

  The CLI prints a UserError's message alone; callers still catch `builtin`.
  """
  with pytest.raises(builtin, match=match) as info:
    yield info
  assert isinstance(info.value, errors.UserError), repr(info.value)


def checkpoint_steps(stage_dir: str) -> list[int]:
  """The steps of a stage's finished checkpoints, ascending.

  Orbax names a finished checkpoint by its step; an unfinished save is a
  temporary folder whose name is not a number.
  """
  folder = workdir_lib.checkpoints_dir(stage_dir)
  if not folder.exists():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def quick_config(
  name: str = 'digits', num_train_steps: int = 4
) -> ml_collections.ConfigDict:
  """The `:quick` config shrunk further: a few steps, tiny sample grids."""
  config = load_config(name, 'quick')
  for stage in ('teacher', 'guided', 'distill'):
    config[stage].update(
      num_train_steps=num_train_steps,
      batch_size=16,
      log_every=2,
      grids_every=1000,
      checkpoint_every=1000,
    )
  config.teacher.optimizer.warmup_steps = 1
  config.distill.initial_num_steps = 8
  config.grids.update(teacher_num_steps=2, samples_per_class=1)
  config.sample.update(num_steps=2, num_samples=12, batch_size=8)
  config_lib.validate(config)
  return config


def quick_shapes_config(num_train_steps: int = 4) -> ml_collections.ConfigDict:
  """`shapes:quick` (autoencoder → teacher → stage one → 2 → 1 steps) with a
  few steps per stage and one small grid; what `shapes_workdir` trains."""
  config = load_config('shapes', 'quick')
  for stage in ('autoencoder', 'teacher', 'guided', 'distill'):
    config[stage].update(
      num_train_steps=num_train_steps,
      batch_size=8,
      log_every=2,
      grids_every=1000,
      checkpoint_every=1000,
    )
    config[stage].optimizer.warmup_steps = 1
  config.grids.update(sample_ws=(1.0,), teacher_num_steps=2)
  config.sample.update(num_steps=2, num_samples=6, batch_size=4)
  config_lib.validate(config)
  return config


def train_steps(
  stage,
  mesh,
  num_steps: int,
  *,
  memory_config: ml_collections.ConfigDict | None = None,
  data_config: ml_collections.ConfigDict | None = None,
):
  """`num_steps` train steps of `stage` on `mesh`, from a fixed init.

  Returns (state, last step's metrics) on the host. Batches are digits
  training batches of the stage's batch size, laid out as the loop does.
  """
  # Imported here: gdd must load after conftest's XLA flags.
  import jax

  from gdd import data
  from gdd.train import loop, sharding
  from gdd.train.state import TrainState

  data_config = data_config or quick_config().data
  info = data.get_info(data_config)
  tx, step, layout = loop.build_train_step(
    stage,
    mesh,
    jax.random.PRNGKey(1),
    max_pixel_value=info.max_pixel_value,
    memory_config=memory_config,
  )
  frozen = jax.device_put(stage.frozen_params, layout.frozen)
  state = jax.jit(
    lambda rng, f: TrainState.create(stage.init_params(rng, f), tx),
    out_shardings=layout.state,
  )(jax.random.PRNGKey(0), frozen)
  batches = data.train_batches(
    data_config, seed=0, global_batch_size=stage.train_config.batch_size
  )
  for _ in range(num_steps):
    state, metrics = step(
      state, frozen, sharding.global_batch(next(batches), mesh)
    )
  return jax.device_get(state), jax.device_get(metrics)
