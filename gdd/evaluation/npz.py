"""Atomic `.npz` writes for evaluation caches (statistics, weights).

A cache is trusted by later runs, so it must never be left truncated: each
file is written under a temporary name in its directory and renamed.
"""

import os
import tempfile

import numpy as np


def atomic_savez(path: str | os.PathLike, **arrays) -> None:
  """np.savez(path, **arrays), all or nothing."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(
    dir=directory, prefix=os.path.basename(path) + '.', suffix='.tmp'
  )
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **arrays)
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise
