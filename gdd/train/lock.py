"""One writer per stage folder: a lock that a dead process cannot leave behind.

Two runs training the same stage folder would interleave checkpoints and
params exports. A run therefore holds `<stage_dir>/lock` while it trains the
stage: an exclusive `flock` on that file, which the kernel drops when the
process exits for any reason (kill -9 included), so there are no stale locks
to clean up. The file also records who holds it (host, pid, start time,
command) so the second run's error can name the holder.

On a multi-host job only process 0 takes the lock (the other processes of
the same job read the same folder and write nothing but their shards of
collective checkpoints); every process learns whether process 0 got it,
so the whole job stops together instead of hanging in a collective.
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from gdd import errors

LOCK_FILE = 'lock'


class LockHeldError(errors.UserError, RuntimeError):
  """Another live process is training this stage folder."""


def _holder_record() -> dict:
  return {
    'host': socket.gethostname(),
    'pid': os.getpid(),
    'started': datetime.datetime.now().isoformat(timespec='seconds'),
    'command': ' '.join(sys.argv),
  }


def _describe_holder(path: str) -> str:
  try:
    with open(path) as f:
      holder = json.load(f)
    return (
      f'pid {holder["pid"]} on host {holder["host"]}, started '
      f'{holder["started"]}: {holder["command"]}'
    )
  except (OSError, ValueError, KeyError):
    return 'a process that has not written its details yet'


@contextlib.contextmanager
def hold(stage_dir: str) -> Iterator[None]:
  """Holds the stage folder's lock for the `with` block, or raises.

  Raises:
    LockHeldError: another live process holds it; the message names it.
      On a multi-host job every process raises when process 0 could not
      take the lock.
  """
  if jax.process_count() == 1:
    with _hold_file(stage_dir):
      yield
    return
  with contextlib.ExitStack() as stack:
    error = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(_hold_file(stage_dir))
      except LockHeldError as held:
        error = held
    if not multihost_utils.broadcast_one_to_all(np.int32(error is None)):
      raise error or LockHeldError(
        f'{stage_dir} is being trained by another run; process 0 of this '
        'job names it in its log.'
      )
    yield


@contextlib.contextmanager
def _hold_file(stage_dir: str) -> Iterator[None]:
  """The flock itself, taken by this process."""
  os.makedirs(stage_dir, exist_ok=True)
  path = os.path.join(stage_dir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise LockHeldError(
        f'{stage_dir} is being trained by another run: '
        f'{_describe_holder(path)}. Two runs must not share a stage folder: '
        'wait for that one to finish, or stop it (its lock goes with it) and '
        're-run; or use another --workdir.'
      ) from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(_holder_record()).encode())
    os.fsync(fd)
    yield
  finally:
    # Closing the descriptor releases the flock; the file stays (harmless:
    # only a live flock means "held").
    os.close(fd)
