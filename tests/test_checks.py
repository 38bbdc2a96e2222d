"""Tests of gdd.checks: the integer rule of configs and runtime arguments."""

import numpy as np
import pytest

from gdd import checks


@pytest.mark.parametrize(
  'value, minimum, expected',
  [
    (1, 1, True),
    (0, 1, False),
    (0, 0, True),
    (-1, 0, False),
    (True, 0, False),
    (1.0, 1, False),
    ('1', 1, False),
    (None, 1, False),
    (np.int64(1), 1, False),
  ],
)
def test_is_int_is_the_config_rule(value, minimum, expected):
  assert checks.is_int(value, minimum) is expected


@pytest.mark.parametrize(
  'value, minimum, expected',
  [
    (np.int64(1), 1, True),
    (np.uint8(0), 0, True),
    (np.int32(0), 1, False),
    (np.bool_(True), 0, False),
    (np.float64(1.0), 1, False),
    (True, 0, False),
    (3, 1, True),
  ],
)
def test_allow_numpy_also_accepts_numpy_ints(value, minimum, expected):
  assert checks.is_int(value, minimum, allow_numpy=True) is expected
