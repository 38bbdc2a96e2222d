"""scikit-learn's digits: the embedded default data set (no download).

1797 grey images of 8×8 pixels with integer values 0–16 (kept as uint8),
ten classes. A fixed stratified split holds out 297 images as 'test' and
leaves 1500 for 'train'; the split never depends on the run's seed, so every
run and every evaluation sees the same train set.

The training stream is the concatenation of epochs, epoch e being the
permutation of the train set drawn from `np.random.default_rng([seed, e])`.
Global batch k is stream elements [k·B, (k+1)·B), so a batch may straddle two
epochs. Any batch is computed directly from its step number, which makes a
resumed run see exactly the batches of an uninterrupted one.
"""

import functools
from collections.abc import Iterator

import numpy as np

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
  arrays = _load_splits()[split]
  size = len(arrays['label'])
  if num_examples is None:
    num_examples = size
  if not 0 < num_examples <= size:
    raise ValueError(
      f'num_examples must be in [1, {size}] for digits split {split!r}, '
      f'got {num_examples}.'
    )
  return {key: np.array(value[:num_examples]) for key, value in arrays.items()}


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
  local_batch_size = global_batch_size // process_count
  # Positions of this process's rows within global batch 0 of the stream.
  offsets = process_index * local_batch_size + np.arange(local_batch_size)
  # Permutations of the epochs the current batch touches; older ones are
  # dropped so memory stays O(B + N) however long training runs.
  permutations = {}
  step = start_step
  while True:
    epochs, positions = np.divmod(
      step * global_batch_size + offsets, NUM_TRAIN_EXAMPLES
    )
    idx = np.empty(local_batch_size, np.int64)
    for epoch in np.unique(epochs).tolist():
      if epoch not in permutations:
        rng = np.random.default_rng([seed, epoch])
        permutations[epoch] = rng.permutation(NUM_TRAIN_EXAMPLES)
      in_epoch = epochs == epoch
      idx[in_epoch] = permutations[epoch][positions[in_epoch]]
    # Later batches start no earlier than this one's last epoch.
    permutations = {e: p for e, p in permutations.items() if e >= epochs[-1]}
    yield {'image': train['image'][idx], 'label': train['label'][idx]}
    step += 1
