"""`.npz` files for samples and evaluation caches, local or on gs:// etc.

A cache is trusted by later runs, so it must never be left truncated: each
file is written whole under a temporary name and renamed
(`paths.write_atomically`).
"""

import io

import jax
import numpy as np
from etils import epath

from gdd import paths


def atomic_savez(path: epath.PathLike, **arrays) -> None:
  """np.savez(path, **arrays), all or nothing.

  On a multi-host run only process 0 writes: evaluation computes the same
  arrays on every process, and two writers of one file would race.
  """
  if jax.process_index() > 0:
    return
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  paths.write_atomically(path, buffer.getvalue())


def load(path: epath.PathLike) -> dict[str, np.ndarray]:
  """Every array of an `.npz`, read into memory.

  Raises what `np.load` raises for a file that is not an `.npz` (ValueError,
  OSError, zipfile.BadZipFile), and FileNotFoundError.
  """
  data = paths.resolve(path).read_bytes()
  with np.load(io.BytesIO(data)) as arrays:
    return {name: arrays[name] for name in arrays.files}
