"""Mesh, shardings and global-batch assembly (data parallel, no pmap).

Params and optimiser state are replicated; batches are split along the
leading axis over the mesh's `data` axis. jit with these shardings gives the
same program on one CPU, 8 fake devices or a multi-host TPU pod.
"""

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gdd import config_lib

DATA_AXIS = 'data'


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D `data` mesh over `devices` (default: every device everywhere)."""
  return Mesh(np.asarray(devices or jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, key: str) -> None:
  """Fails early (before compiling) if the batch cannot be split evenly."""
  num_devices = mesh.devices.size
  if batch_size % num_devices:
    raise config_lib.ConfigError(
      f'config.{key}={batch_size} is not divisible by the {num_devices} '
      f'devices of the mesh; use a multiple of {num_devices}.'
    )


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> Any:
  """A global jax.Array batch from this process's part of it."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, x),
    local_batch,
  )
