"""Checkpoints and params exports; the only module that imports orbax.

Checkpoint N holds the train state after N updates. Orbax writes each save
into a temporary folder and renames it when complete, so a kill mid-save
never replaces a good checkpoint (the writer removes such leftovers when it
starts). A stage's final (EMA) params are also exported params-only to
`<stage_dir>/params`, which later stages and the sampler load.

Nothing here deletes data that could be good: a checkpoint or export that
cannot be read is moved into `<stage_dir>/unreadable/`, and only once
something older has been read in its place.
"""

import datetime
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from gdd import errors, paths, workdir_lib


class UnreadableCheckpointError(errors.UserError, RuntimeError):
  """No checkpoint or params export of a stage can be read."""


def move_aside(path: epath.PathLike, aside_dir: epath.PathLike) -> epath.Path:
  """Moves `path` into `aside_dir` under a new name; returns where it went.

  Process 0 moves; every process waits for it, so all see the same files.
  (On an object store a move is a copy and a delete of each object.)
  """
  path, aside_dir = paths.resolve(path), paths.resolve(aside_dir)
  stamp = datetime.datetime.now().strftime('%Y%m%dT%H%M%S')
  destination = aside_dir / f'{path.parent.name}_{path.name}_{stamp}'
  if jax.process_index() == 0:
    aside_dir.mkdir(parents=True, exist_ok=True)
    path.rename(destination)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'gdd_move_aside:{path}')
  return destination


class Checkpointer:
  """Periodic, retained, asynchronous train-state checkpoints of one stage.

  Only the run that holds the stage's lock (`gdd.train.lock`) may create
  one: it removes unfinished saves left by a killed run.
  """

  def __init__(self, stage_dir: epath.PathLike, *, max_to_keep: int):
    """Opens the checkpoints of the stage folder `stage_dir`."""
    self._directory = workdir_lib.checkpoints_dir(stage_dir)
    self._aside_dir = workdir_lib.unreadable_dir(stage_dir)
    self._manager = ocp.CheckpointManager(
      self._directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=True,
        cleanup_tmp_directories=True,
      ),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any) -> None:
    """Starts an async save of `state` as checkpoint `step`."""
    self._manager.save(step, args=ocp.args.StandardSave(state))

  def restore(self, step: int, target: Any) -> Any:
    """Restores checkpoint `step` onto the shapes/shardings of `target`."""
    return self._manager.restore(
      step, args=ocp.args.StandardRestore(abstract_tree_like(target))
    )

  def restore_latest(self, target: Any) -> Any | None:
    """The newest checkpoint that can be read, or None if there is none.

    A checkpoint that fails to restore is reported and the next older one
    tried. Once one restores, the newer unreadable ones are moved to
    `<stage_dir>/unreadable/` (never deleted) so that training can save
    those steps again. If none restores, nothing is moved.

    Raises:
      UnreadableCheckpointError: checkpoints exist but none can be read.
    """
    failed = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state = self.restore(step, target)
      except Exception as error:  # Orbax/TensorStore raise many types.
        logging.warning(
          'Checkpoint %d in %s cannot be read (%s); trying the one before.',
          step,
          self._directory,
          errors.first_line(error),
        )
        failed.append((step, error))
        continue
      if failed:
        self._move_aside([step for step, _ in failed])
        logging.warning('Resuming from checkpoint %d instead.', step)
      return state
    if failed:
      steps, newest = [step for step, _ in failed], failed[0][1]
      raise UnreadableCheckpointError(
        f'No checkpoint in {self._directory} can be read (steps {steps}; '
        f'newest: {errors.first_line(newest)}). Nothing was moved or '
        'deleted. If the files are damaged, move that folder away and '
        're-run to train the stage again (training is deterministic); '
        '--verbose shows the traceback.'
      ) from newest
    return None

  def _move_aside(self, steps: list[int]) -> None:
    for step in steps:
      moved = move_aside(self._directory / str(step), self._aside_dir)
      logging.warning('Moved unreadable checkpoint %d to %s.', step, moved)
    self._manager.reload()  # Orbax's step list, without the moved steps.

  def reached_preemption(self, step: int) -> bool:
    """True when the cluster signalled preemption (multi-host runs)."""
    return self._manager.reached_preemption(step)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_tree_like(tree: Any) -> Any:
  """Abstract target keeping each leaf's own sharding (if it has one)."""

  def leaf(x):
    return jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=getattr(x, 'sharding', None)
    )

  return jax.tree.map(leaf, tree)


def export_params(path: epath.PathLike, params: Any) -> None:
  """Writes a params-only export (blocking); refuses to overwrite one.

  Removes what an interrupted export of `path` left (Orbax writes into
  `<path>.orbax-checkpoint-tmp*` and renames when complete): only the run
  holding the stage's lock exports.
  """
  path = paths.resolve(path)
  if path.exists():
    raise FileExistsError(
      f'{path} exists; params exports are never overwritten. Delete it by '
      'hand if you really mean to replace it.'
    )
  unfinished = f'{path.name}.orbax-checkpoint-tmp'
  if jax.process_index() == 0 and path.parent.exists():
    for leftover in path.parent.iterdir():
      if leftover.name.startswith(unfinished):
        leftover.rmtree()
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, params)
    checkpointer.wait_until_finished()


class MissingExportError(errors.UserError, FileNotFoundError):
  """A stage has no params export: it has not finished."""


def load_params(path: epath.PathLike, target: Any | None = None) -> Any:
  """Loads a params export; `target` (abstract or concrete) fixes shardings.

  Without a target the arrays come back as Orbax saved them (replicated on
  this process's devices).
  """
  path = paths.resolve(path)
  if not path.is_dir():
    raise MissingExportError(
      f'No params export at {path}. Train the stage first (gdd.main '
      '--mode=...), or point --workdir at a finished run.'
    )
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      if target is None:
        return checkpointer.restore(path)
      return checkpointer.restore(path, abstract_tree_like(target))
  except Exception as error:  # Orbax/TensorStore raise many types.
    raise UnreadableCheckpointError(
      f'The params export {path} cannot be read ({errors.first_line(error)}). '
      'Re-run the training command on this workdir: it moves the broken '
      "export aside and writes it again from the stage's final checkpoint."
    ) from error
