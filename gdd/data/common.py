"""What the data sets share: the missing-data error, the training stream of
an indexed data set and fixed prefixes of arrays.

The training stream is the concatenation of epochs, epoch e being the
permutation of the examples drawn from `np.random.default_rng([seed, e])`.
Global batch k is stream elements [k·B, (k+1)·B), so a batch may straddle two
epochs, and any batch is computed directly from its step number: a resumed
run sees exactly the batches of an uninterrupted one.
"""

from collections.abc import Iterator

import numpy as np

from gdd import errors


class DatasetNotFoundError(errors.UserError, FileNotFoundError):
  """A data set is not prepared where the config says it is."""


def batch_indices(
  *,
  num_examples: int,
  seed: int,
  global_batch_size: int,
  start_step: int,
  process_index: int,
  process_count: int,
) -> Iterator[np.ndarray]:
  """Example indices of this process's rows of batches start_step, ….

  Yields int64 [global_batch_size // process_count] arrays in [0,
  num_examples): process p's rows are the p-th consecutive slice of each
  global batch. Arguments are validated by `gdd.data.train_batches`.
  """
  local_batch_size = global_batch_size // process_count
  # Positions of this process's rows within global batch 0 of the stream.
  offsets = process_index * local_batch_size + np.arange(local_batch_size)
  # Permutations of the epochs the current batch touches; older ones are
  # dropped so memory stays O(B + N) however long training runs.
  permutations = {}
  step = start_step
  while True:
    epochs, positions = np.divmod(
      step * global_batch_size + offsets, num_examples
    )
    idx = np.empty(local_batch_size, np.int64)
    for epoch in np.unique(epochs).tolist():
      if epoch not in permutations:
        rng = np.random.default_rng([seed, epoch])
        permutations[epoch] = rng.permutation(num_examples)
      in_epoch = epochs == epoch
      idx[in_epoch] = permutations[epoch][positions[in_epoch]]
    # Later batches start no earlier than this one's last epoch.
    permutations = {e: p for e, p in permutations.items() if e >= epochs[-1]}
    yield idx
    step += 1


def num_examples_or_all(num_examples: int | None, size: int, where: str) -> int:
  """`num_examples`, or all `size` examples if None.

  `where` names the data set and split in the error.

  Raises:
    ValueError: num_examples is not in [1, size].
  """
  if num_examples is None:
    return size
  if not 0 < num_examples <= size:
    raise ValueError(
      f'num_examples must be in [1, {size}] for {where}, got {num_examples}.'
    )
  return num_examples


def prefix(
  arrays: dict[str, np.ndarray], num_examples: int | None, where: str
) -> dict[str, np.ndarray]:
  """Copies of the first `num_examples` rows (all if None) of `arrays`.

  Copies, so that callers may write into them without corrupting a cache.

  Raises:
    ValueError: num_examples is not in [1, number of rows].
  """
  size = len(next(iter(arrays.values())))
  num_examples = num_examples_or_all(num_examples, size, where)
  return {key: np.array(value[:num_examples]) for key, value in arrays.items()}
