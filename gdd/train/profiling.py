"""`config.profile_steps`: a jax.profiler trace of a few training steps.

The trace starts after the run's first two steps (the first compiles, the
second may still wait on it) and covers `num_steps` steps; open the folder
with TensorBoard's profile plugin or Perfetto (`ui.perfetto.dev`).
"""

from typing import Any

import jax
from absl import logging

# Steps of a run left out of the trace: compilation and warm-up.
WARMUP_STEPS = 2


class StepTrace:
  """Starts and stops one trace around steps of a training run."""

  def __init__(self, num_steps: int, start_step: int, log_dir: str):
    self._first = start_step + WARMUP_STEPS + 1
    self._last = self._first + num_steps - 1
    self._num_steps = num_steps
    self._log_dir = log_dir
    self._active = False

  def before(self, step: int) -> None:
    """Call before running `step`; starts the trace at its first step."""
    if self._num_steps and step == self._first:
      jax.profiler.start_trace(self._log_dir)
      self._active = True

  def after(self, step: int, outputs: Any) -> None:
    """Call after dispatching `step`; ends the trace after its last step.

    Waits for `outputs` first, so the trace holds the device work too.
    """
    if self._active and step >= self._last:
      self.stop(outputs)

  def stop(self, outputs: Any = None) -> None:
    """Ends the trace if one is running (also when the run stops early)."""
    if not self._active:
      return
    jax.block_until_ready(outputs)
    jax.profiler.stop_trace()
    self._active = False
    logging.info(
      'Profiler trace of %d steps in %s', self._num_steps, self._log_dir
    )
