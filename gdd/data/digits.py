"""scikit-learn's digits: the embedded default data set (no download).

1797 grey images of 8×8 pixels with integer values 0–16 (kept as uint8),
ten classes. A fixed stratified split holds out 297 images as 'test' and
leaves 1500 for 'train'; the split never depends on the run's seed, so every
run and every evaluation sees the same train set.

The training stream is `gdd.data.common`'s: epochs of permutations of the
train set drawn from (seed, epoch), any batch computed directly from its step
number, so a resumed run sees exactly the batches of an uninterrupted one.
"""

import functools
from collections.abc import Iterator

import numpy as np

from gdd.data import common

IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
MAX_PIXEL_VALUE = 16
NUM_TEST_EXAMPLES = 297
NUM_TRAIN_EXAMPLES = 1797 - NUM_TEST_EXAMPLES
SPLITS = ('train', 'test')

# Seed of the train/test split only; deliberately not the config seed.
_SPLIT_SEED = 0


@functools.cache
def _load_splits() -> dict[str, dict[str, np.ndarray]]:
  """Loads and splits the digits once per process (read-only)."""
  # Imported here: scikit-learn takes ~1.5 s to import and only digits needs it.
  from sklearn import datasets, model_selection

  digits = datasets.load_digits()
  # scikit-learn stores the integer pixel values as float64: exact in uint8.
  images = digits.images.astype(np.uint8).reshape((-1, *IMAGE_SHAPE))
  labels = digits.target.astype(np.int32)
  train_idx, test_idx = model_selection.train_test_split(
    np.arange(len(labels)),
    test_size=NUM_TEST_EXAMPLES,
    stratify=labels,
    random_state=_SPLIT_SEED,
  )
  splits = {}
  for split, idx in (('train', train_idx), ('test', test_idx)):
    arrays = {'image': images[idx], 'label': labels[idx]}
    for array in arrays.values():
      # The cache hands out the same arrays to every caller; nobody may edit.
      array.flags.writeable = False
    splits[split] = arrays
  return splits


def split_size(split: str) -> int:
  if split not in SPLITS:
    raise ValueError(f'digits split must be one of {SPLITS}, got {split!r}.')
  return NUM_TRAIN_EXAMPLES if split == 'train' else NUM_TEST_EXAMPLES


def eval_arrays(
  *, split: str, num_examples: int | None = None
) -> dict[str, np.ndarray]:
  """The first `num_examples` (all if None) of a split, in the fixed order,
  as raw pixels."""
  if split not in SPLITS:
    raise ValueError(f'digits split must be one of {SPLITS}, got {split!r}.')
  return common.prefix(
    _load_splits()[split], num_examples, f'digits split {split!r}'
  )


def train_batches(
  *,
  seed: int,
  global_batch_size: int,
  start_step: int,
  process_index: int,
  process_count: int,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of global batches start_step, start_step + 1, ….

  Arguments are validated by `gdd.data.train_batches`.
  """
  train = _load_splits()['train']
  for idx in common.batch_indices(
    num_examples=NUM_TRAIN_EXAMPLES,
    seed=seed,
    global_batch_size=global_batch_size,
    start_step=start_step,
    process_index=process_index,
    process_count=process_count,
  ):
    yield {'image': train['image'][idx], 'label': train['label'][idx]}
