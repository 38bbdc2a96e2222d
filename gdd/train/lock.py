"""One writer per stage folder.

Two runs training the same stage folder would interleave checkpoints and
params exports. A run therefore holds `<stage_dir>/lock` while it trains the
stage. The file records who holds it (host, pid, start time, command) so the
second run's error can name the holder.

On a local disk the lock is an exclusive `flock` on that file, which the
kernel drops when the process exits for any reason (kill -9 included), so
there are no stale locks to clean up. An object store (a gs:// workdir) has
no flock: there the lock is the file's existence (see `_hold_object`), and a
run that dies without cleaning up leaves it behind.

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
from etils import epath
from jax.experimental import multihost_utils

from gdd import errors, paths, workdir_lib

_HOLDER_KEYS = {'host', 'pid', 'started', 'command'}


class LockHeldError(errors.UserError, RuntimeError):
  """Another process is training this stage folder (or died holding its
  lock on an object store)."""


def _holder_record() -> dict:
  return {
    'host': socket.gethostname(),
    'pid': os.getpid(),
    'started': datetime.datetime.now().isoformat(timespec='seconds'),
    'command': ' '.join(sys.argv),
  }


def _read_holder(path: epath.Path) -> dict | None:
  """The holder record in the lock file, or None if absent or unreadable."""
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _describe_holder(path: epath.Path) -> str:
  holder = _read_holder(path)
  if not isinstance(holder, dict) or not holder.keys() >= _HOLDER_KEYS:
    return 'a process that has not written its details yet'
  return (
    f'pid {holder["pid"]} on host {holder["host"]}, started '
    f'{holder["started"]}: {holder["command"]}'
  )


@contextlib.contextmanager
def hold(stage_dir: epath.PathLike) -> Iterator[None]:
  """Holds the stage folder's lock for the `with` block, or raises.

  Raises:
    LockHeldError: another process holds it (on an object store: or held
      it and died); the message names it. On a multi-host job every
      process raises when process 0 could not take the lock.
  """
  stage_dir = paths.resolve(stage_dir)
  hold_one = _hold_file if paths.is_local(stage_dir) else _hold_object
  if jax.process_count() == 1:
    with hold_one(stage_dir):
      yield
    return
  with contextlib.ExitStack() as stack:
    error = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(hold_one(stage_dir))
      except LockHeldError as held:
        error = held
    if not multihost_utils.broadcast_one_to_all(np.int32(error is None)):
      raise error or LockHeldError(
        f'{stage_dir} is being trained by another run; process 0 of this '
        'job names it in its log.'
      )
    yield


@contextlib.contextmanager
def _hold_file(stage_dir: epath.Path) -> Iterator[None]:
  """The flock itself, taken by this process (local stage folders)."""
  stage_dir.mkdir(parents=True, exist_ok=True)
  path = workdir_lib.lock_file(stage_dir)
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


@contextlib.contextmanager
def _hold_object(stage_dir: epath.Path) -> Iterator[None]:
  """A lock file on an object store: created if absent, deleted on release.

  Object stores have no flock, so the file's existence is the lock, with
  two weaknesses:

  - A race: checking for the file and writing it are two requests. Reading
    the file back after writing it catches a run that wrote in between
    (the later write wins; the other run refuses), but two runs that check
    before either writes and read back before either overwrites both go
    on. Start one run per stage folder.
  - Staleness: no kernel releases the lock when the holder dies. A clean
    exit (an error, SIGTERM/SIGINT, preemption) deletes it; kill -9 or a
    lost host leaves it, and later runs refuse, saying to delete the file
    once that run is known to be gone.
  """
  path = workdir_lib.lock_file(stage_dir)
  if path.exists():
    raise _object_lock_held(stage_dir, path)
  record = _holder_record()
  path.write_text(json.dumps(record))
  if _read_holder(path) != record:
    raise _object_lock_held(stage_dir, path)
  try:
    yield
  finally:
    if _read_holder(path) == record:
      path.unlink(missing_ok=True)


def _object_lock_held(stage_dir: epath.Path, path: epath.Path) -> LockHeldError:
  return LockHeldError(
    f'{stage_dir} is being trained by another run: {_describe_holder(path)}. '
    'Two runs must not share a stage folder: wait for that one to finish, or '
    'stop it and re-run; or use another --workdir. On an object store '
    'nothing releases the lock of a run that died: if that run is gone, '
    f'delete {path} and re-run.'
  )
