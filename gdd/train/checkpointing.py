"""Checkpoints and params exports; the only module that imports orbax.

Checkpoint N holds the train state after N updates. Orbax writes each save
into a temporary folder and renames it when complete, so a kill mid-save
never replaces a good checkpoint. A stage's final (EMA) params are also
exported params-only to `<stage_dir>/params`, which later stages and the
sampler load.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Periodic, retained, asynchronous train-state checkpoints of one stage."""

  def __init__(self, directory: str, *, max_to_keep: int):
    self._manager = ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=True
      ),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any) -> None:
    """Starts an async save of `state` as checkpoint `step`."""
    self._manager.save(step, args=ocp.args.StandardSave(state))

  def restore(self, step: int, target: Any) -> Any:
    """Restores checkpoint `step` onto the shapes/shardings of `target`."""
    return self._manager.restore(
      step, args=ocp.args.StandardRestore(abstract_tree_like(target))
    )

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


def export_params(path: str, params: Any) -> None:
  """Writes a params-only export (blocking); refuses to overwrite one."""
  path = os.path.abspath(path)
  if os.path.exists(path):
    raise FileExistsError(
      f'{path} exists; params exports are never overwritten. Delete it by '
      'hand if you really mean to replace it.'
    )
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, params)
    checkpointer.wait_until_finished()


def load_params(path: str, target: Any | None = None) -> Any:
  """Loads a params export; `target` (abstract or concrete) fixes shardings.

  Without a target the arrays come back as Orbax saved them (replicated on
  this process's devices).
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(
      f'No params export at {path}. Train the stage first (gdd.main '
      '--mode=...), or point --workdir at a finished run.'
    )
  with ocp.StandardCheckpointer() as checkpointer:
    if target is None:
      return checkpointer.restore(path)
    return checkpointer.restore(path, abstract_tree_like(target))
