"""The device mesh, sharding rules and host ↔ global array conversion.

The mesh is 2-D, (`data`, `fsdp`). Batches are split over both axes (every
device gets its own examples). Params, optimiser state, EMA and frozen
teacher params are laid out by `config.memory`: with `fsdp` = 1 they are
replicated (plain data parallelism); with `fsdp` > 1 every array matched by
an 'fsdp' rule and of at least `fsdp_min_size` elements is split along its
largest axis divisible by `fsdp` (big_vision's rule), so each device holds
1/fsdp of it, and XLA gathers it where a layer needs it (ZeRO-3 / FSDP).
jit with these shardings gives the same program on one CPU, 8 fake devices
or a multi-host TPU pod.

Host data that a jitted call takes (labels, noise keys, evaluation batches)
becomes a global array first (`from_host`, `global_batch`): on a multi-host
mesh a numpy array cannot be passed with a sharding.
"""

import itertools
import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from orbax.checkpoint import multihost as orbax_multihost

from gdd import config_lib

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
# The batch (leading) axis is split over every device of the mesh.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def make_mesh(
  devices: Sequence[jax.Device] | None = None, fsdp: int = 1
) -> Mesh:
  """A (data, fsdp) mesh over `devices` (default: every device everywhere).

  Devices are in process order, so each process's devices own a contiguous
  block of the batch (what `global_batch` assumes).
  """
  devices = list(devices or jax.devices())
  check_fsdp(fsdp, len(devices))
  grid = np.asarray(devices).reshape(len(devices) // fsdp, fsdp)
  return Mesh(grid, (DATA_AXIS, FSDP_AXIS))


def mesh_for(config: ml_collections.ConfigDict) -> Mesh:
  """The mesh a config's training uses (`config.memory.fsdp`)."""
  return make_mesh(fsdp=config.memory.fsdp)


def check_fsdp(fsdp: int, num_devices: int) -> None:
  if num_devices % fsdp:
    raise config_lib.ConfigError(
      f'config.memory.fsdp={fsdp} does not divide the {num_devices} devices; '
      f'use a divisor of {num_devices} (1: no FSDP).'
    )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading axis split over every device (the batch)."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def check_batch_size(
  batch_size: int, mesh: Mesh, key: str, num_micro_batches: int = 1
) -> None:
  """Fails early (before compiling) if the batch cannot be split evenly."""
  num_devices = mesh.devices.size
  parts = num_devices * num_micro_batches
  if batch_size % parts:
    split = (
      f'{num_micro_batches} micro-batches (grad_accum_steps) of '
      if num_micro_batches > 1
      else ''
    )
    raise config_lib.ConfigError(
      f'config.{key}={batch_size} does not split into {split}'
      f'{num_devices} devices (the mesh); use a multiple of {parts}.'
    )


def fsdp_spec(
  path: str,
  shape: tuple[int, ...],
  *,
  fsdp: int,
  min_size: int,
  rules: Sequence[tuple[str, str]],
) -> PartitionSpec:
  """The PartitionSpec of one array, from the first rule matching `path`.

  'fsdp' splits the largest axis divisible by `fsdp` (the first of equal
  ones) if the array has at least `min_size` elements; anything else, and
  arrays no rule matches, are replicated.
  """
  how = next((how for regex, how in rules if re.fullmatch(regex, path)), None)
  if how != 'fsdp' or fsdp == 1 or int(np.prod(shape)) < min_size:
    return PartitionSpec()
  divisible = [i for i, size in enumerate(shape) if size % fsdp == 0]
  if not divisible:
    return PartitionSpec()
  axis = max(divisible, key=lambda i: (shape[i], -i))
  spec = [None] * len(shape)
  spec[axis] = FSDP_AXIS
  return PartitionSpec(*spec)


def tree_specs(
  tree: Any, memory_config: ml_collections.ConfigDict, fsdp: int
) -> Any:
  """A PartitionSpec per leaf of `tree` (arrays or ShapeDtypeStructs).

  Works without devices (the planner lays out a pod on this machine).
  Leaves of optimiser states get the rule of their path too: Adam's moments
  mirror the params, and `.../mu/conv_in/kernel` ends in the param's path.
  """

  def spec(path, leaf):
    return fsdp_spec(
      path_string(path),
      tuple(np.shape(leaf)),
      fsdp=fsdp,
      min_size=memory_config.fsdp_min_size,
      rules=memory_config.fsdp_rules,
    )

  return jax.tree_util.tree_map_with_path(spec, tree)


def tree_shardings(
  tree: Any, mesh: Mesh, memory_config: ml_collections.ConfigDict
) -> Any:
  """A NamedSharding per leaf of `tree` on `mesh`, by `tree_specs`."""
  specs = tree_specs(tree, memory_config, mesh.shape[FSDP_AXIS])
  return jax.tree.map(
    lambda spec: NamedSharding(mesh, spec),
    specs,
    is_leaf=lambda x: isinstance(x, PartitionSpec),
  )


def path_string(path: tuple) -> str:
  """'a/b/kernel' for a pytree key path (dict keys, attributes, indices)."""
  parts = []
  for entry in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
  return '/'.join(parts)


def bytes_per_device(tree: Any, specs: Any, mesh_shape: dict[str, int]) -> int:
  """Bytes each device holds of `tree` laid out by `specs` (a spec tree)."""
  total = 0
  leaves = jax.tree.leaves(tree)
  spec_leaves = jax.tree.leaves(
    specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
  )
  for leaf, spec in zip(leaves, spec_leaves, strict=True):
    split = 1
    for axes in spec:
      for axis in (axes,) if isinstance(axes, str) else axes or ():
        split *= mesh_shape[axis]
    total += (
      int(np.prod(np.shape(leaf))) * np.dtype(leaf.dtype).itemsize // split
    )
  return total


def abstract(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` with `shardings` (Orbax restore targets)."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    tree,
    shardings,
  )


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> Any:
  """A global jax.Array batch from this process's rows of it."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, x),
    local_batch,
  )


def from_host(value: Any, sharding: NamedSharding) -> jax.Array:
  """A global array from a host value every process holds whole and alike.

  Each device gets its slice; works on one process and on many (where a
  numpy input with a sharding is refused by jit).
  """
  value = np.asarray(value)
  return jax.make_array_from_callback(
    value.shape, sharding, lambda index: value[index]
  )


def to_host(array: jax.Array) -> np.ndarray:
  """A global array as one numpy array on every process.

  Gathers shards held by other processes (`process_allgather`) when the
  array is not fully addressable here.
  """
  if array.is_fully_addressable:
    return np.asarray(jax.device_get(array))
  if array.is_fully_replicated:
    return np.asarray(array.addressable_data(0))
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


_barrier_count = itertools.count()


def sync_processes(what: str) -> None:
  """Waits until every process gets here (nothing on one process).

  A barrier of the coordination service, not a device collective. Called
  before a newly compiled program first runs: XLA:CPU's cross-process
  collectives (gloo) give the processes 30 s to meet at a program's first
  collective, and the time to compile (or load) a program differs between
  processes; starting together keeps them within that window.
  """
  if jax.process_count() > 1:
    orbax_multihost.sync_global_processes(
      f'gdd_{next(_barrier_count)}_{what}', timeout=3600
    )
