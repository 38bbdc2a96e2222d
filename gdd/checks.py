"""Value checks shared by configs, models, data and samplers.

One home for rules that several layers apply to their inputs, so that a
config key and the argument it becomes accept the same values. It imports
nothing from gdd: the pure layers (models, samplers, data) can use it without
depending on the config schema.
"""

from typing import Any

import numpy as np


def is_int(value: Any, minimum: int = 1, *, allow_numpy: bool = False) -> bool:
  """Whether `value` is an int >= `minimum` (1: a positive int).

  A bool is never an int here. A numpy integer is refused by default, since
  a config value must be one config.json can store; `allow_numpy=True`
  accepts it, for runtime arguments that may come from numpy or jax (e.g. a
  step count or a process index).
  """
  int_types = (int, np.integer) if allow_numpy else int
  if not isinstance(value, int_types) or isinstance(value, bool):
    return False
  # bool(): a numpy comparison returns a numpy bool.
  return bool(value >= minimum)
