"""Connects the processes of a multi-host run (`config.distributed`).

`jax.distributed.initialize` gets only the keys that are set; JAX detects
the unset ones from the cluster: Cloud TPU VM metadata, SLURM variables
(`SLURM_STEP_NODELIST`'s first host, `SLURM_NTASKS`, `SLURM_PROCID`), Open
MPI's `mpirun` variables, mpi4py, or Kubernetes. On SLURM and Open MPI that
detection also sets `local_device_ids=[local rank]` (one GPU per process),
so a run with one process per GPU host must set `local_device_ids` to all of
the host's GPUs (launch/README.md).

JAX 0.10 aborts the process from C++ (no Python exception) when the
coordinator cannot be reached or a process does not register within
`initialization_timeout`. So the failures gdd can see coming are checked
first (a coordinator host that does not resolve; a coordinator port that
never opens, seen from process 1 and up), and a line naming the keys to
check is logged before connecting.
"""

import socket
import time
from typing import Any

import jax
import ml_collections
from absl import logging

from gdd import errors

# The config keys passed to `jax.distributed.initialize` when set.
_JAX_KEYS = (
  'coordinator_address',
  'num_processes',
  'process_id',
  'local_device_ids',
)
# `jax.distributed.initialize`'s default `initialization_timeout`: how long
# process 1 and up wait for the coordinator's port before giving up.
_TIMEOUT_S = 300
_PROBE_INTERVAL_S = 1.0
_KEYS_TO_CHECK = (
  'distributed.coordinator_address (process 0 host:port, the same on every '
  'process), distributed.num_processes and distributed.process_id; unset '
  'keys are auto-detected only on Cloud TPU, SLURM and Open MPI'
)


class DistributedInitError(errors.UserError, RuntimeError):
  """The processes of a multi-host run could not connect."""


def initialize(distributed_config: ml_collections.ConfigDict) -> None:
  """Connects this process to the others when `initialize` is True.

  Must run before anything touches a JAX device. Logs one line per process
  once connected (process i of n, local and global device counts).

  Raises:
    DistributedInitError: the coordinator host does not resolve, its port
      does not open within the timeout, or JAX rejects the arguments (e.g.
      no cluster to auto-detect them from).
  """
  if not distributed_config.initialize:
    return
  arguments = {
    key: distributed_config[key]
    for key in _JAX_KEYS
    if distributed_config[key] is not None
  }
  _check_coordinator(
    arguments.get('coordinator_address'), arguments.get('process_id')
  )
  # Said before connecting: JAX aborts the process if the connection fails.
  logging.info(
    'Connecting to the JAX coordinator (%s). An abort with '
    'DEADLINE_EXCEEDED after %d s means a process did not start or cannot '
    'reach it: check %s.',
    _describe(arguments),
    _TIMEOUT_S,
    _KEYS_TO_CHECK,
  )
  try:
    jax.distributed.initialize(**arguments)
  except ValueError as error:
    raise DistributedInitError(
      f'jax.distributed.initialize({_describe(arguments)}) failed '
      f'({errors.first_line(error)}). Check {_KEYS_TO_CHECK}.'
    ) from error
  logging.info(
    'Process %d of %d connected: %d local devices, %d in all.',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def _describe(arguments: dict[str, Any]) -> str:
  """`key=value` for every key JAX gets; the others read 'auto-detected'."""
  return ', '.join(
    f'{key}={arguments[key]!r}' if key in arguments else f'{key} auto-detected'
    for key in _JAX_KEYS
  )


def _check_coordinator(address: str | None, process_id: int | None) -> None:
  """Fails early where JAX would abort the process instead.

  Checks that the host resolves and, from process 1 and up, that its port
  opens within the timeout. Process 0 starts the coordinator inside
  `jax.distributed.initialize`, so only the others can wait for its port.
  """
  if address is None:
    return
  host, port = address.rsplit(':', 1)
  try:
    socket.getaddrinfo(host, port)
  except socket.gaierror as error:
    raise DistributedInitError(
      f'distributed.coordinator_address={address!r}: host {host!r} does not '
      f'resolve ({error}). Set it to the host:port of process 0, reachable '
      'from every process.'
    ) from error
  if process_id:
    _wait_for_port(host, int(port), address)


def _wait_for_port(host: str, port: int, address: str) -> None:
  """Returns once `host:port` accepts a TCP connection."""
  deadline = time.monotonic() + _TIMEOUT_S
  while True:
    try:
      with socket.create_connection((host, port), timeout=_PROBE_INTERVAL_S):
        return
    except OSError as error:
      if time.monotonic() >= deadline:
        raise DistributedInitError(
          f'The JAX coordinator at distributed.coordinator_address='
          f'{address!r} did not accept connections within {_TIMEOUT_S} s '
          f'({error}). Is process 0 running, and is the port open to this '
          f'host? Check {_KEYS_TO_CHECK}.'
        ) from error
    time.sleep(_PROBE_INTERVAL_S)
