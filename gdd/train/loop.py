"""The one train loop every stage runs: jitted sharded step, logs, checkpoints.

A stage supplies its loss, initial params, frozen (teacher) params and a
sampler (`gdd.stages.Stage`); this loop owns everything else: the optimiser,
EMA, the mesh, data order, checkpoint/resume, metrics, sample grids and the
final params export. Randomness is fold_in(stage_key, step), and data batch k
depends only on (seed, k), so resuming from checkpoint N continues exactly
as an uninterrupted run would.
"""

import dataclasses
import functools
import math
import os
import time
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath

from gdd import conditioning, data, errors, images, paths, plan, workdir_lib
from gdd.stages import Stage, common, registry
from gdd.train import (
  checkpointing,
  optim,
  preemption,
  profiling,
  sharding,
  throughput,
)
from gdd.train.state import TrainState, ema_decay_at, update_ema

# Sample grids show at most this many rows (classes, or other conditions).
MAX_GRID_ROWS = 10


class NonFiniteLossError(errors.UserError, FloatingPointError):
  """Training diverged (NaN/Inf); only states known to be good are kept."""


def stage_key(seed: int, stage_name: str) -> jax.Array:
  """A root key per (seed, stage), so stages draw independent numbers."""
  return jax.random.fold_in(
    jax.random.PRNGKey(seed), zlib.crc32(stage_name.encode()) & 0x7FFFFFFF
  )


def load_exported_params(
  stage_dir: epath.PathLike, abstract_params: Any
) -> Any:
  """A finished stage's params export, replicated over all devices."""
  rep = sharding.replicated(sharding.make_mesh())
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
    abstract_params,
  )
  return checkpointing.load_params(workdir_lib.params_dir(stage_dir), target)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a stage's arrays live: a sharding per leaf of each tree."""

  state: Any  # TrainState of shardings.
  frozen: Any  # Frozen (teacher) params of shardings, or None.
  batch: jax.sharding.NamedSharding


def layout_for(
  stage: Stage, tx: optax.GradientTransformation, mesh, memory_config
) -> Layout:
  """The FSDP (or replicated) layout `config.memory` gives the stage.

  Shapes come from `jax.eval_shape`: nothing is allocated.
  """
  abstract_state = jax.eval_shape(
    lambda rng, frozen: TrainState.create(stage.init_params(rng, frozen), tx),
    jax.random.PRNGKey(0),
    stage.frozen_params,
  )
  return Layout(
    state=sharding.tree_shardings(abstract_state, mesh, memory_config),
    frozen=sharding.tree_shardings(stage.frozen_params, mesh, memory_config),
    batch=sharding.batch_sharded(mesh),
  )


def _model_batch(batch: dict[str, jax.Array], max_pixel_value: int | None):
  """The batch with images in [−1, 1]; data sets send raw integer pixels."""
  image = batch['image']
  if not jnp.issubdtype(image.dtype, jnp.integer):
    return batch
  if max_pixel_value is None:
    raise ValueError(
      'The batch holds integer pixels; pass max_pixel_value (the data '
      "set's DatasetInfo.max_pixel_value) to build_train_step."
    )
  return dict(batch, image=data.to_model_range(image, max_pixel_value))


def _micro_batches(batch, num_micro: int, batch_sharding):
  """[B, …] → [k, B/k, …]; micro-batch j holds rows j, j + k, j + 2k, …

  Strided, so each device's rows split into the k micro-batches alike and
  no row moves to another device (B/k stays split over the mesh).
  """
  spec = jax.sharding.PartitionSpec(None, *batch_sharding.spec)
  micro_sharding = jax.sharding.NamedSharding(batch_sharding.mesh, spec)

  def split(x):
    x = x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:])
    return jax.lax.with_sharding_constraint(x.swapaxes(0, 1), micro_sharding)

  return jax.tree.map(split, batch)


def _loss_grads(loss_fn, params, frozen_params, batch, rng, *, micro):
  """Metrics and gradients of the batch, over `micro` = (k, batch sharding).

  k > 1 sums the micro-batches' gradients in a lax.scan (one micro-batch of
  activations alive at a time) and averages them: the gradient of the mean
  loss over the whole batch, since the micro-batches are equal in size.
  Micro-batch j draws its noise from fold_in(rng, j), so k > 1 draws other
  (equally distributed) random numbers than k = 1.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  num_micro, batch_sharding = micro
  if num_micro == 1:
    (_, metrics), grads = grad_fn(params, frozen_params, batch, rng)
    return metrics, grads

  def accumulate(grad_sum, inputs):
    index, micro_batch = inputs
    micro_rng = jax.random.fold_in(rng, index)
    (_, metrics), grads = grad_fn(params, frozen_params, micro_batch, micro_rng)
    return jax.tree.map(jnp.add, grad_sum, grads), metrics

  grad_sum, metrics = jax.lax.scan(
    accumulate,
    jax.tree.map(jnp.zeros_like, params),
    (
      jnp.arange(num_micro),
      _micro_batches(batch, num_micro, batch_sharding),
    ),
  )
  mean = lambda tree: jax.tree.map(lambda x: x.mean(axis=0), tree)
  grads = jax.tree.map(lambda g: g / num_micro, grad_sum)
  return mean(metrics), grads


def _train_step(
  state: TrainState,
  frozen_params: Any,
  batch: dict[str, jax.Array],
  *,
  loss_fn,
  tx: optax.GradientTransformation,
  learning_rate_fn: optax.Schedule,
  ema_decay: float,
  ema_warmup: bool,
  step_key: jax.Array,
  micro: tuple[int, jax.sharding.NamedSharding],
  max_pixel_value: int | None,
  frozen_subtrees: tuple[str, ...] = (),
) -> tuple[TrainState, dict[str, jax.Array]]:
  rng = jax.random.fold_in(step_key, state.step)
  batch = _model_batch(batch, max_pixel_value)
  metrics, grads = _loss_grads(
    loss_fn, state.params, frozen_params, batch, rng, micro=micro
  )
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(
    metrics,
    grad_norm=optax.global_norm(grads),
    learning_rate=learning_rate_fn(state.step),
    # Not logged: tells bad data from a diverged run (`_StageRun.check`).
    batch_finite=_all_finite(batch).astype(jnp.float32),
  )
  new_state = state.replace(
    step=state.step + 1,
    params=params,
    opt_state=opt_state,
    ema_params=_with_frozen(
      update_ema(
        state.ema_params,
        params,
        # state.step updates were done before this one.
        ema_decay_at(ema_decay, state.step, ema_warmup),
      ),
      params,
      frozen_subtrees,
    ),
  )
  return new_state, metrics


def _with_frozen(ema_params, params, frozen_subtrees: tuple[str, ...]):
  """The EMA with its frozen subtrees set to the (unchanged) params.

  Averaging a constant would change its last bits (d·p + (1 − d)·p ≠ p in
  floating point); a frozen subtree must stay bit for bit what it was.
  """
  if not frozen_subtrees:
    return ema_params
  return {
    key: params[key] if key in frozen_subtrees else value
    for key, value in ema_params.items()
  }


def build_train_step(
  stage: Stage,
  mesh: jax.sharding.Mesh,
  step_key: jax.Array,
  *,
  max_pixel_value: int | None = None,
  memory_config: ml_collections.ConfigDict | None = None,
) -> tuple[optax.GradientTransformation, Any, Layout]:
  """The stage's optimiser, jitted state-donating step and array layout.

  `step(state, frozen_params, batch) -> (state, metrics)`: state and frozen
  params laid out by `memory_config` (FSDP rules; None: replicated), the
  batch split over every device, in `grad_accum_steps` micro-batches.
  Integer images are scaled to [−1, 1] on the device (`max_pixel_value`).
  """
  train_config = stage.train_config
  num_steps = train_config.num_train_steps
  tx = optim.make_optimizer(
    train_config.optimizer, num_steps, frozen=stage.frozen_subtrees
  )
  if memory_config is None:
    memory_config = ml_collections.ConfigDict(
      {'fsdp_min_size': 0, 'fsdp_rules': ()}
    )
  layout = layout_for(stage, tx, mesh, memory_config)
  step = jax.jit(
    functools.partial(
      _train_step,
      loss_fn=stage.loss_fn,
      tx=tx,
      learning_rate_fn=optim.learning_rate_schedule(
        train_config.optimizer, num_steps
      ),
      ema_decay=train_config.ema_decay,
      ema_warmup=train_config.ema_warmup,
      step_key=step_key,
      micro=(train_config.grad_accum_steps, layout.batch),
      max_pixel_value=max_pixel_value,
      frozen_subtrees=stage.frozen_subtrees,
    ),
    in_shardings=(layout.state, layout.frozen, layout.batch),
    out_shardings=(layout.state, sharding.replicated(mesh)),
    donate_argnums=(0,),
  )
  return tx, step, layout


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
    stage_dir: epath.PathLike,
  ):
    self._stage_dir = paths.resolve(stage_dir)
    cond_kind = common.build_conditioning(config, info)
    self._cond, self._num_rows = cond_kind.grid(
      config.grids.samples_per_class, MAX_GRID_ROWS
    )
    self._titles = cond_kind.grid_titles(self._num_rows)
    self._num_devices = mesh.devices.size
    self._mesh = mesh
    rep = sharding.replicated(mesh)
    # Params come in their training layout (FSDP or replicated); the
    # samples come back replicated, so every process can read them.
    self._panels = {
      name: jax.jit(sample_fn, out_shardings=rep)
      for name, sample_fn in stage.sample_panels.items()
    }
    logging.info(
      '[%s] sample grids, left to right: %s',
      stage.name,
      ', '.join(self._panels),
    )
    self._rng = sharding.from_host(jax.random.PRNGKey(config.seed), rep)
    self._sample_ws = stage.sample_ws
    self._upscale = images.display_scale(info.image_shape[0])

  def __call__(self, step: int, params, frozen_params, writer) -> None:
    n = conditioning.batch_size(self._cond)
    padded = jax.tree.map(
      lambda x: sharding.from_host(x, sharding.batch_sharded(self._mesh)),
      conditioning.pad_to_multiple(self._cond, self._num_devices),
    )
    rep = sharding.replicated(self._mesh)
    grids = {}
    for w in self._sample_ws:
      panels = []
      w_array = sharding.from_host(np.float32(w), rep)
      for name, sample in self._panels.items():
        samples = sample(params, frozen_params, self._rng, padded, w_array)
        samples = images.to_uint8(sharding.to_host(samples)[:n])
        panels.append(images.make_grid(samples, num_rows=self._num_rows))
        grids[f'samples/w={w:g}/{name}'] = panels[-1][None]
      if jax.process_index() == 0:
        self._save(step, w, images.side_by_side(panels))
    writer.write_images(step, grids)

  def _save(self, step: int, w: float, grid: np.ndarray) -> None:
    """Writes the PNG; rows of captions get their caption at the left."""
    upscale = self._upscale
    if self._titles:
      grid, upscale = images.with_row_titles(grid, self._titles, upscale), 1
    images.save_png(
      workdir_lib.grid_file(self._stage_dir, step, w), grid, upscale=upscale
    )


def _all_finite(tree) -> jax.Array:
  leaves = [
    jnp.all(jnp.isfinite(x))
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _health_check(
  stage: Stage, layout: Layout, step_key: jax.Array, max_pixel_value
):
  """Jitted `(state, frozen_params, next_batch) -> {params, batch, loss}`.

  Three booleans: the state's params and EMA params are finite; the next
  step's batch is finite; the loss the next step will compute from the
  state (same batch, same random numbers) is finite. A finite but diverged
  state (params of 1e28 after a learning-rate blow-up) passes the first and
  fails the last, so it is never saved.
  """

  def health(state, frozen_params, next_batch):
    rng = jax.random.fold_in(step_key, state.step)
    next_batch = _model_batch(next_batch, max_pixel_value)
    loss, _ = stage.loss_fn(state.params, frozen_params, next_batch, rng)
    return {
      'params': _all_finite((state.params, state.ema_params)),
      'batch': _all_finite(next_batch),
      'loss': _all_finite(loss),
    }

  return jax.jit(
    health,
    in_shardings=(layout.state, layout.frozen, layout.batch),
    out_shardings=sharding.replicated(layout.batch.mesh),
  )


@dataclasses.dataclass(frozen=True)
class _StageRun:
  """Everything the step loop of one stage uses besides the train state."""

  stage: Stage
  config: ml_collections.ConfigDict
  stage_dir: epath.Path
  mesh: jax.sharding.Mesh
  layout: Layout
  tx: optax.GradientTransformation
  frozen_params: Any
  train_step: Callable
  health: Callable
  ckpt: checkpointing.Checkpointer
  writer: metric_writers.MetricWriter

  @classmethod
  def open(cls, stage, config, stage_dir, mesh, step_key):
    """Opens the stage's checkpoints and writer; the caller closes them."""
    max_pixel_value = data.get_info(config.data).max_pixel_value
    tx, train_step, layout = build_train_step(
      stage,
      mesh,
      step_key,
      max_pixel_value=max_pixel_value,
      memory_config=config.memory,
    )
    return cls(
      stage=stage,
      config=config,
      stage_dir=paths.resolve(stage_dir),
      mesh=mesh,
      layout=layout,
      tx=tx,
      frozen_params=jax.device_put(stage.frozen_params, layout.frozen),
      train_step=train_step,
      health=_health_check(stage, layout, step_key, max_pixel_value),
      ckpt=checkpointing.Checkpointer(
        stage_dir, max_to_keep=stage.train_config.max_checkpoints_to_keep
      ),
      # clu's writers take a string (tf.io.gfile, which reads gs:// too).
      writer=metric_writers.create_default_writer(
        os.fspath(workdir_lib.events_dir(stage_dir)),
        just_logging=jax.process_index() > 0,
      ),
    )

  def diverged(self, what: str) -> NonFiniteLossError:
    """The error for a diverged run; names the checkpoint that is kept."""
    latest = self.ckpt.latest_step()
    kept = (
      f'checkpoint {latest}, the newest state known to be good, is kept'
      if latest is not None
      else 'no checkpoint was written (no state was known to be good)'
    )
    return NonFiniteLossError(
      f'[{self.stage.name}] {what}. Stopped; {kept}. Training is '
      'deterministic, so re-running this config diverges again: start a new '
      '--workdir with a lower learning rate (or a lower '
      'optimizer.grad_clip_norm, more warmup_steps, a float32 model dtype).'
    )

  def bad_data(self, where: str) -> NonFiniteLossError:
    """The error for NaN/Inf in the data, told apart from divergence."""
    return NonFiniteLossError(
      f'[{self.stage.name}] {where} holds NaN or Inf values: the data is '
      f'bad, not the training. Checkpoint {self.ckpt.latest_step()} is kept; '
      'fix the data pipeline (or data set) and re-run to resume.'
    )

  def check(self, means: dict[str, float], step: int) -> dict[str, float]:
    """The logged metrics of the steps up to `step`, if all are finite."""
    if means.pop('batch_finite') < 1:
      raise self.bad_data(f'a batch of the steps up to {step}')
    bad = {k: v for k, v in means.items() if not math.isfinite(v)}
    if bad:
      raise self.diverged(f'non-finite metrics {bad} in the steps up to {step}')
    return means

  def save(self, step: int, state: TrainState, next_batch) -> None:
    """Checkpoints `state` as step `step` if it is good, else raises.

    Bad data (NaN/Inf in the next batch) is told apart from a diverged
    state: the state is saved if its params are finite, then the run stops.
    """
    health = jax.device_get(self.health(state, self.frozen_params, next_batch))
    if not health['params']:
      raise self.diverged(f'the params after update {step} are not finite')
    if health['batch'] and not health['loss']:
      raise self.diverged(
        f'the state after update {step} gives a non-finite loss'
      )
    self.ckpt.save(step, state)
    if not health['batch']:
      raise self.bad_data(f'the batch of step {step + 1}')


def _restore_or_init(run: _StageRun, init_rng) -> TrainState:
  """The newest readable checkpoint's state if any, else a fresh state.

  Either comes in the run's layout: a checkpoint written under another mesh
  or FSDP setting restores into this one.
  """
  create_state = jax.jit(
    lambda rng, frozen: TrainState.create(
      run.stage.init_params(rng, frozen), run.tx
    ),
    out_shardings=run.layout.state,
  )
  target = sharding.abstract(
    jax.eval_shape(create_state, init_rng, run.frozen_params),
    run.layout.state,
  )
  state = run.ckpt.restore_latest(target)
  if state is None:
    return create_state(init_rng, run.frozen_params)
  logging.info('[%s] resuming from checkpoint %d', run.stage.name, state.step)
  return state


def train_stage(
  stage: Stage,
  config: ml_collections.ConfigDict,
  stage_dir: epath.PathLike,
  *,
  replace_export: bool = False,
) -> Any:
  """Trains `stage` to `num_train_steps`, resuming from its checkpoints.

  Returns the final EMA params, which are also exported to
  `<stage_dir>/params`. The caller holds the stage folder's lock
  (`gdd.train.lock`). SIGTERM/SIGINT finish the current step, save it and
  raise `preemption.InterruptedRunError`. `replace_export`: the existing
  export cannot be read; once the final state exists it is moved to
  `<stage_dir>/unreadable/` and a new export written.
  """
  mesh = sharding.mesh_for(config)
  sharding.check_batch_size(
    stage.train_config.batch_size,
    mesh,
    f'{stage.name}.batch_size',
    stage.train_config.grad_accum_steps,
  )
  # Before anything compiles at full size (only where devices report
  # their memory: GPUs, TPUs).
  section = registry.get(workdir_lib.stage_kind(stage.name)).section
  plan.check_fits(config, stage, section, mesh)
  init_rng, step_key = jax.random.split(stage_key(config.seed, stage.name))
  run = _StageRun.open(stage, config, stage_dir, mesh, step_key)
  try:
    if replace_export and run.ckpt.latest_step() is None:
      raise checkpointing.UnreadableCheckpointError(
        f'The params export {workdir_lib.params_dir(stage_dir)} cannot be '
        f'read and {workdir_lib.checkpoints_dir(stage_dir)} has no checkpoint '
        'to export again from. Nothing was moved; move the stage folder away '
        'to train it again.'
      )
    with preemption.catch_signals():
      state = _run_steps(run, _restore_or_init(run, init_rng))
  finally:
    # Saves already started hold good states: let them commit even when the
    # run dies, so a re-run resumes from the newest one.
    run.ckpt.wait_until_finished()
    run.ckpt.close()
    run.writer.flush()
  _export(stage_dir, state.ema_params, replace=replace_export)
  return state.ema_params


def _export(stage_dir: epath.PathLike, ema_params, *, replace: bool) -> None:
  """Writes the params export, moving an unreadable one aside first."""
  path = workdir_lib.params_dir(stage_dir)
  if replace and path.exists():
    moved = checkpointing.move_aside(
      path, workdir_lib.unreadable_dir(stage_dir)
    )
    logging.warning('Moved the unreadable params export to %s.', moved)
  if not path.exists():
    checkpointing.export_params(path, ema_params)


def _global_batches(run: _StageRun, start_step: int):
  """Global batches of steps start_step + 1, … (batch k feeds step k + 1)."""
  batches = data.train_batches(
    run.config.data,
    seed=run.config.seed,
    global_batch_size=run.stage.train_config.batch_size,
    start_step=start_step,
  )
  # Captions become token ids here, on the host: strings cannot enter jit.
  cond_kind = common.build_conditioning(
    run.config, data.get_info(run.config.data)
  )
  for batch in batches:
    yield sharding.global_batch(cond_kind.host_batch(batch), run.mesh)


def _run_steps(run: _StageRun, state: TrainState) -> TrainState:
  """Steps from the state's step to num_train_steps, with side effects.

  The next step's batch is fetched right after a step is dispatched: the
  host prepares it while the device computes, and a checkpoint's health
  check needs it.
  """
  num_steps = run.stage.train_config.num_train_steps
  start_step = int(state.step)
  if start_step >= num_steps:
    return state
  batches = _global_batches(run, start_step)
  batch = next(batches)
  steps = _StepLoop.open(run, state, batch)
  try:
    for step in range(start_step + 1, num_steps + 1):
      steps.trace.before(step)
      state, step_metrics = run.train_step(state, run.frozen_params, batch)
      batch = next(batches)
      steps.trace.after(step, step_metrics)
      steps.metrics.add(step_metrics)
      steps.report(step)
      steps.after_step(step, state, batch)
  finally:
    steps.trace.stop()
  return state


@dataclasses.dataclass(frozen=True)
class _StepLoop:
  """The stage run and the step loop's side effects (metrics, grids, …)."""

  run: _StageRun
  report: periodic_actions.ReportProgress
  write_grids: _SampleGridWriter
  trace: profiling.StepTrace
  metrics: '_MetricMeans'

  @classmethod
  def open(cls, run: _StageRun, state: TrainState, batch) -> '_StepLoop':
    """The loop's side effects; compiles the step on the first `batch`."""
    return cls(
      run=run,
      report=periodic_actions.ReportProgress(
        num_train_steps=run.stage.train_config.num_train_steps,
        writer=run.writer,
        every_steps=run.stage.train_config.log_every,
      ),
      write_grids=_SampleGridWriter(
        run.stage,
        run.config,
        data.get_info(run.config.data),
        run.mesh,
        run.stage_dir,
      ),
      trace=profiling.StepTrace(
        run.config.profile_steps,
        int(state.step),
        os.fspath(workdir_lib.profile_dir(run.stage_dir)),
      ),
      metrics=_MetricMeans(_throughput(run, state, batch)),
    )

  def after_step(self, step: int, state: TrainState, next_batch) -> None:
    """Logs, checkpoints and grids due after `step`; stops if asked to."""
    run, train_config = self.run, self.run.stage.train_config
    stop = _stop_request(run, step)
    is_last = step == train_config.num_train_steps
    save_now = step % train_config.checkpoint_every == 0 or is_last or stop
    if step % train_config.log_every == 0 or save_now:
      run.writer.write_scalars(step, run.check(self.metrics.pop(), step))
    if save_now:
      sharding.sync_processes('save')  # The first save compiles its check.
      run.save(step, state, next_batch)
    # A stop skips the grids: a scheduler's grace period is short.
    if (step % train_config.grids_every == 0 or is_last) and not stop:
      sharding.sync_processes('grids')  # Their samplers compile at first use.
      self.write_grids(step, state.ema_params, run.frozen_params, run.writer)
    if stop:
      raise preemption.InterruptedRunError(
        f'[{run.stage.name}] stopped by {stop} after step {step}; checkpoint '
        f'{step} is saved in {workdir_lib.checkpoints_dir(run.stage_dir)}. '
        'Re-run the same command to resume from it.'
      )


def _throughput(run: _StageRun, state, batch) -> throughput.Throughput:
  """FLOPs of the step (compiled here, once: the step's calls reuse it)."""
  compiled = run.train_step.lower(state, run.frozen_params, batch).compile()
  sharding.sync_processes('train_step_compiled')
  device = run.mesh.devices.flat[0]
  return throughput.Throughput.of(compiled, device, run.config.model.dtype)


def _stop_request(run: _StageRun, step: int) -> str | None:
  """Why the run must stop after `step` (a signal, cluster preemption)."""
  if run.ckpt.reached_preemption(step):  # A sync point: every host calls it.
    return 'cluster preemption'
  return preemption.requested()


class _MetricMeans:
  """Sums step metrics on device; pulls their means to the host on demand.

  Pulling only at log steps (not every step) keeps the device queue full.
  With a `throughput.Throughput`, each pull also reports the achieved
  TFLOP/s per device and MFU over the wall time since the previous pull
  (so checkpoint saves and grids in between count); the first pull, whose
  time includes compiling, reports none.
  """

  def __init__(self, rate: throughput.Throughput | None = None):
    self._sums, self._count = None, 0
    self._rate = rate
    self._last_pull = None

  def add(self, metrics: dict[str, jax.Array]) -> None:
    self._sums = (
      metrics
      if self._sums is None
      else jax.tree.map(jnp.add, self._sums, metrics)
    )
    self._count += 1

  def pop(self) -> dict[str, float]:
    sums = jax.device_get(self._sums)
    now = time.perf_counter()
    means = {k: float(v) / self._count for k, v in sums.items()}
    if self._rate is not None and self._last_pull is not None:
      means.update(self._rate.report(self._count, now - self._last_pull))
    self._sums, self._count, self._last_pull = None, 0, now
    return means
