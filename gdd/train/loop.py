"""The one train loop every stage runs: jitted sharded step, logs, checkpoints.

A stage supplies its loss, initial params, frozen (teacher) params and a
sampler (`gdd.stages.Stage`); this loop owns everything else: the optimiser,
EMA, the mesh, data order, checkpoint/resume, metrics, sample grids and the
final params export. Randomness is fold_in(stage_key, step), and data batch k
depends only on (seed, k), so resuming from checkpoint N continues exactly
as an uninterrupted run would.
"""

import functools
import math
import os
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions

from gdd import data, images
from gdd.stages import Stage
from gdd.train import checkpointing, optim, sharding
from gdd.train.state import TrainState, update_ema

# Sample grids show at most this many classes (rows).
MAX_GRID_CLASSES = 10


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/Inf; the last good checkpoint is kept."""


def stage_key(seed: int, stage_name: str) -> jax.Array:
  """A root key per (seed, stage), so stages draw independent numbers."""
  return jax.random.fold_in(
    jax.random.PRNGKey(seed), zlib.crc32(stage_name.encode()) & 0x7FFFFFFF
  )


def params_dir(stage_dir: str) -> str:
  """Where a finished stage's params-only (EMA) export lives."""
  return os.path.join(stage_dir, 'params')


def load_exported_params(stage_dir: str, abstract_params: Any) -> Any:
  """A finished stage's params export, replicated over all devices."""
  rep = sharding.replicated(sharding.make_mesh())
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
    abstract_params,
  )
  return checkpointing.load_params(params_dir(stage_dir), target)


def checkpoints_dir(stage_dir: str) -> str:
  return os.path.join(stage_dir, 'checkpoints')


def _train_step(
  state: TrainState,
  frozen_params: Any,
  batch: dict[str, jax.Array],
  *,
  loss_fn,
  tx: optax.GradientTransformation,
  learning_rate_fn: optax.Schedule,
  ema_decay: float,
  step_key: jax.Array,
) -> tuple[TrainState, dict[str, jax.Array]]:
  rng = jax.random.fold_in(step_key, state.step)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (_, metrics), grads = grad_fn(state.params, frozen_params, batch, rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(
    metrics,
    grad_norm=optax.global_norm(grads),
    learning_rate=learning_rate_fn(state.step),
  )
  new_state = state.replace(
    step=state.step + 1,
    params=params,
    opt_state=opt_state,
    ema_params=update_ema(state.ema_params, params, ema_decay),
  )
  return new_state, metrics


def build_train_step(
  stage: Stage, mesh: jax.sharding.Mesh, step_key: jax.Array
) -> tuple[optax.GradientTransformation, Any]:
  """The stage's optimiser and its jitted, sharded, state-donating step.

  `step(state, frozen_params, batch) -> (state, metrics)`: state and frozen
  params replicated, the batch split over the mesh's data axis.
  """
  train_config = stage.train_config
  num_steps = train_config.num_train_steps
  tx = optim.make_optimizer(train_config.optimizer, num_steps)
  rep = sharding.replicated(mesh)
  step = jax.jit(
    functools.partial(
      _train_step,
      loss_fn=stage.loss_fn,
      tx=tx,
      learning_rate_fn=optim.learning_rate_schedule(
        train_config.optimizer, num_steps
      ),
      ema_decay=train_config.ema_decay,
      step_key=step_key,
    ),
    in_shardings=(rep, rep, sharding.batch_sharded(mesh)),
    out_shardings=(rep, rep),
    donate_argnums=(0,),
  )
  return tx, step


def _grid_labels(num_classes: int, samples_per_class: int) -> np.ndarray:
  """Row r of the grid is class r: labels 0,0,…,1,1,…"""
  classes = np.arange(min(num_classes, MAX_GRID_CLASSES), dtype=np.int32)
  return np.repeat(classes, samples_per_class)


class _SampleGridWriter:
  """Writes one sample grid per guidance strength w, from fixed noise.

  Each grid shows the stage's panels left to right (e.g. teacher, student
  DDIM, student stochastic), all drawn from the same initial noise.
  """

  def __init__(
    self,
    stage: Stage,
    config: ml_collections.ConfigDict,
    info: data.DatasetInfo,
    mesh: jax.sharding.Mesh,
    stage_dir: str,
  ):
    self._stage_dir = stage_dir
    self._labels = _grid_labels(info.num_classes, config.eval.samples_per_class)
    self._num_devices = mesh.devices.size
    rep = sharding.replicated(mesh)
    self._panels = {
      name: jax.jit(
        sample_fn,
        in_shardings=(rep, rep, rep, sharding.batch_sharded(mesh), rep),
        out_shardings=rep,
      )
      for name, sample_fn in stage.sample_panels.items()
    }
    logging.info(
      '[%s] sample grids, left to right: %s',
      stage.name,
      ', '.join(self._panels),
    )
    self._rng = jax.random.PRNGKey(config.seed)
    self._sample_ws = stage.sample_ws
    self._upscale = images.display_scale(info.image_shape[0])

  def __call__(self, step: int, params, frozen_params, writer) -> None:
    n = len(self._labels)
    padded = np.pad(self._labels, (0, -n % self._num_devices), mode='edge')
    grids = {}
    for w in self._sample_ws:
      panels = []
      for name, sample in self._panels.items():
        samples = sample(
          params, frozen_params, self._rng, padded, jnp.float32(w)
        )
        samples = images.to_uint8(jax.device_get(samples)[:n])
        panels.append(
          images.make_grid(samples, num_rows=len(set(self._labels)))
        )
        grids[f'samples/w={w:g}/{name}'] = panels[-1][None]
      grid = images.side_by_side(panels)
      if jax.process_index() == 0:
        images.save_png(
          os.path.join(self._stage_dir, 'samples', f'step{step}_w{w:g}.png'),
          grid,
          upscale=self._upscale,
        )
    writer.write_images(step, grids)


def _check_finite(metrics: dict[str, float], step: int, last_good: int):
  bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
  if bad:
    raise NonFiniteLossError(
      f'Non-finite metrics {bad} in the steps up to {step}. Stopped; the '
      f'last good checkpoint (step {last_good}) is kept and a re-run resumes '
      'from it. Usual fixes: lower the learning rate, lower '
      'optimizer.grad_clip_norm, or use a float32 model dtype.'
    )


def _restore_or_init(
  stage, ckpt, mesh, tx, init_rng, frozen_params
) -> TrainState:
  """The latest checkpoint's state if there is one, else a fresh state."""
  rep = sharding.replicated(mesh)
  create_state = jax.jit(
    lambda rng, frozen: TrainState.create(stage.init_params(rng, frozen), tx),
    out_shardings=rep,
  )
  start_step = ckpt.latest_step()
  if start_step is None:
    return create_state(init_rng, frozen_params)
  logging.info('[%s] resuming from checkpoint %d', stage.name, start_step)
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
    jax.eval_shape(create_state, init_rng, frozen_params),
  )
  return ckpt.restore(start_step, target)


def train_stage(
  stage: Stage,
  config: ml_collections.ConfigDict,
  stage_dir: str,
) -> Any:
  """Trains `stage` to `num_train_steps`, resuming from its checkpoints.

  Returns the final EMA params, which are also exported to
  `<stage_dir>/params`.
  """
  train_config = stage.train_config
  mesh = sharding.make_mesh()
  sharding.check_batch_size(
    train_config.batch_size, mesh, f'{stage.name}.batch_size'
  )
  init_rng, step_key = jax.random.split(stage_key(config.seed, stage.name))
  tx, train_step = build_train_step(stage, mesh, step_key)
  ckpt = checkpointing.Checkpointer(
    checkpoints_dir(stage_dir),
    max_to_keep=train_config.max_checkpoints_to_keep,
  )
  writer = metric_writers.create_default_writer(
    stage_dir, just_logging=jax.process_index() > 0
  )
  frozen_params = jax.device_put(stage.frozen_params, sharding.replicated(mesh))
  try:
    state = _restore_or_init(stage, ckpt, mesh, tx, init_rng, frozen_params)
    state = _run_steps(
      stage,
      config,
      stage_dir,
      state,
      frozen_params,
      train_step,
      mesh,
      ckpt,
      writer,
    )
  finally:
    # Saves already started hold good states: let them commit even when the
    # run dies, so a re-run resumes from the newest one.
    ckpt.wait_until_finished()
    ckpt.close()
    writer.flush()
  if not os.path.exists(params_dir(stage_dir)):
    checkpointing.export_params(params_dir(stage_dir), state.ema_params)
  return state.ema_params


def _run_steps(
  stage, config, stage_dir, state, frozen_params, train_step, mesh, ckpt, writer
) -> TrainState:
  """Steps from the state's step to num_train_steps, with side effects."""
  train_config = stage.train_config
  num_steps = train_config.num_train_steps
  start_step = int(state.step)
  batches = data.train_batches(
    config.data,
    seed=config.seed,
    global_batch_size=train_config.batch_size,
    start_step=start_step,
  )
  report = periodic_actions.ReportProgress(
    num_train_steps=num_steps,
    writer=writer,
    every_steps=train_config.log_every,
  )
  write_grids = _SampleGridWriter(
    stage, config, data.get_info(config.data), mesh, stage_dir
  )
  metric_sums, num_summed, last_good = None, 0, start_step
  for step in range(start_step + 1, num_steps + 1):
    batch = sharding.global_batch(next(batches), mesh)
    state, metrics = train_step(state, frozen_params, batch)
    metric_sums = (
      metrics
      if metric_sums is None
      else jax.tree.map(jnp.add, metric_sums, metrics)
    )
    num_summed += 1
    report(step)
    is_last = step == num_steps
    save_now = step % train_config.checkpoint_every == 0 or is_last
    if step % train_config.log_every == 0 or save_now:
      # Pulling metrics here (not every step) keeps the device queue full.
      means = {
        k: float(v) / num_summed for k, v in jax.device_get(metric_sums).items()
      }
      _check_finite(means, step, last_good)
      writer.write_scalars(step, means)
      metric_sums, num_summed = None, 0
    if save_now:
      ckpt.save(step, state)
      last_good = step
    if step % train_config.eval_every == 0 or is_last:
      write_grids(step, state.ema_params, frozen_params, writer)
    if ckpt.reached_preemption(step):
      if not save_now:
        ckpt.save(step, state)
      raise SystemExit(
        f'[{stage.name}] preempted at step {step}; re-run to resume.'
      )
  return state
