"""Stopping cleanly when asked: SIGTERM/SIGINT → finish the step, save, exit.

Schedulers (SLURM, Kubernetes, preemptible VMs) send SIGTERM and wait before
killing; a person presses Ctrl-C. While `catch_signals()` is active, either
signal only records a stop request: the train loop finishes the step it is
in, saves a checkpoint of that step and raises `InterruptedRunError`;
`gdd.main` prints its message and exits with `EXIT_CODE`. A re-run resumes
from that checkpoint exactly. The first signal also restores the previous
handlers, so a second Ctrl-C stops at once (the newest complete checkpoint
is kept).

Signals are caught only in the main thread of a single-process run. A
multi-host job learns of preemption through JAX's preemption service instead
(`Checkpointer.reached_preemption`), which makes every host stop at the same
step; a signal that reached one host alone could not.
"""

import contextlib
import signal
import threading
from collections.abc import Iterator

import jax

# sysexits.h EX_TEMPFAIL: "temporary failure; the user is invited to retry".
EXIT_CODE = 75
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class InterruptedRunError(Exception):
  """The run stopped on request after saving; re-running resumes it."""


class _Catcher:
  """Process-wide state: signal handlers are process-wide too."""

  def __init__(self):
    self.depth = 0
    self.request: str | None = None
    self.previous: dict[int, object] = {}

  def handle(self, signum, frame) -> None:
    del frame
    self.request = signal.Signals(signum).name
    self.restore()

  def restore(self) -> None:
    for signum, handler in self.previous.items():
      signal.signal(signum, handler)
    self.previous = {}


_CATCHER = _Catcher()


def _can_catch() -> bool:
  return (
    threading.current_thread() is threading.main_thread()
    and jax.process_count() == 1
  )


@contextlib.contextmanager
def catch_signals() -> Iterator[None]:
  """SIGTERM and SIGINT request a stop instead of killing, inside the block.

  Re-entrant: an inner block shares the outermost one, whose exit restores
  the handlers and clears any request.
  """
  catcher = _CATCHER
  if catcher.depth == 0 and _can_catch():
    catcher.previous = {s: signal.getsignal(s) for s in _SIGNALS}
    for signum in _SIGNALS:
      signal.signal(signum, catcher.handle)
  catcher.depth += 1
  try:
    yield
  finally:
    catcher.depth -= 1
    if catcher.depth == 0:
      catcher.restore()
      catcher.request = None


def requested() -> str | None:
  """The name of the signal that asked to stop ('SIGTERM'), or None."""
  return _CATCHER.request


def raise_if_requested(where: str) -> None:
  """Between stages: stops before `where` starts if a stop was requested."""
  if _CATCHER.request:
    raise InterruptedRunError(
      f'Stopped by {_CATCHER.request} before {where}; every finished stage '
      'and checkpoint is saved. Re-run the same command to continue.'
    )
