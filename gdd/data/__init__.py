"""Training and evaluation data, one API over every supported data set.

`data_config.name` picks the backend: 'digits' (scikit-learn's digits, ships
with the package), 'shapes' (captioned coloured shapes, generated here),
'webdataset' (image–caption pairs in tar shards under data_dir, held-out pairs
under held_out_dir) or a TFDS data set ('cifar10', 'imagenet64',
'imagenet256': ImageNet centre-cropped to 256×256). Images are shaped
(B, H, W, C). Class data sets label them (int32 'label'); caption data sets
(`DatasetInfo.has_captions`) describe them (str 'caption') and have no
classes. Training batches carry the raw pixels as uint8 in [0,
DatasetInfo.max_pixel_value], a quarter of the bytes of float32 to send to the
devices; the jitted train step maps them onto the model's [−1, 1] with
`to_model_range`. Evaluation arrays come already in [−1, 1] as float32, scaled
on the host by the same function.

Training batches are a pure function of (seed, step, process_index,
process_count): no iterator state is ever saved, and a run resumed at step k
sees exactly the batches an uninterrupted run sees from step k on.

TensorFlow is imported only when a TFDS data set is used, so digits, shapes
and webdataset runs and `import gdd.data` stay fast.
"""

import dataclasses
import importlib
from collections.abc import Iterator
from types import ModuleType

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gdd import checks
from gdd.data import digits, shapes, shards
from gdd.data.common import DatasetNotFoundError

DIGITS = 'digits'
SHAPES = 'shapes'
WEBDATASET = 'webdataset'
TFDS_NAMES = ('cifar10', 'imagenet64', 'imagenet256')
NAMES = (DIGITS, SHAPES, WEBDATASET, *TFDS_NAMES)
# The split each data set holds out from training (webdataset's depends on
# its config: `held_out_split`).
_HELD_OUT_SPLITS = {
  DIGITS: 'test',
  SHAPES: 'test',
  'cifar10': 'test',
  'imagenet64': 'validation',
  'imagenet256': 'validation',
}
# A webdataset split → the config.data key of its folder.
_SHARD_FOLDER_KEYS = {'train': 'data_dir', 'test': 'held_out_dir'}
# config.data.image_size when unset; read by shapes and webdataset only.
DEFAULT_IMAGE_SIZE = 32

# Why a left-right flip is no augmentation for a data set.
_NO_FLIP = {
  DIGITS: 'digits are not symmetric under a left-right flip',
  SHAPES: 'a flip swaps left and right, and the captions would lie',
  WEBDATASET: 'a flip contradicts captions that say left or right',
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static description of a data set, known before any data is read."""

  name: str
  image_shape: tuple[int, int, int]  # (H, W, C)
  num_classes: int  # 0 for a caption data set.
  num_train_examples: int
  # Largest raw pixel value: training images lie in [0, max_pixel_value].
  max_pixel_value: int
  # Examples carry a 'caption' (str) instead of a 'label'.
  has_captions: bool = False


def _tfds() -> ModuleType:
  # Imported on first use: it loads tensorflow_datasets (and later TensorFlow).
  return importlib.import_module('gdd.data.tfds')


def _validate(data_config: ml_collections.ConfigDict) -> None:
  """Checks the fields this module reads; names the key and what is allowed."""
  name = data_config.name
  if name not in NAMES:
    raise ValueError(f'config.data.name must be one of {NAMES}, got {name!r}.')
  random_flip = data_config.get('random_flip', False)
  if not isinstance(random_flip, bool):
    raise ValueError(
      f'config.data.random_flip must be a bool, got {random_flip!r}.'
    )
  if random_flip and name in _NO_FLIP:
    raise ValueError(
      f'config.data.random_flip must be False for {name}: {_NO_FLIP[name]}.'
    )
  if name in (SHAPES, WEBDATASET):
    _image_size(data_config)
  if name in TFDS_NAMES:
    shuffle_buffer = data_config.get('shuffle_buffer')
    if not checks.is_int(shuffle_buffer):
      raise ValueError(
        f'config.data.shuffle_buffer must be a positive int for {name!r}, '
        f'got {shuffle_buffer!r}.'
      )


def _image_size(data_config: ml_collections.ConfigDict) -> int:
  """config.data.image_size (DEFAULT_IMAGE_SIZE if unset), checked."""
  image_size = data_config.get('image_size')
  if image_size is None:
    return DEFAULT_IMAGE_SIZE
  if data_config.name == SHAPES:
    if not checks.is_int(image_size) or image_size not in shapes.IMAGE_SIZES:
      raise ValueError(
        f'config.data.image_size must be one of {shapes.IMAGE_SIZES} for '
        f'shapes, got {image_size!r}.'
      )
  elif not checks.is_int(image_size):
    raise ValueError(
      f'config.data.image_size must be a positive int, got {image_size!r}.'
    )
  return image_size


def get_info(data_config: ml_collections.ConfigDict) -> DatasetInfo:
  """Image shape, class count and train size.

  Reads no data, but for webdataset the shards' tar headers, to count the
  pairs (once per process).
  """
  _validate(data_config)
  name = data_config.name
  if name == DIGITS:
    return DatasetInfo(
      name=name,
      image_shape=digits.IMAGE_SHAPE,
      num_classes=digits.NUM_CLASSES,
      num_train_examples=digits.NUM_TRAIN_EXAMPLES,
      max_pixel_value=digits.MAX_PIXEL_VALUE,
    )
  if name == SHAPES:
    image_size = _image_size(data_config)
    return DatasetInfo(
      name=name,
      image_shape=(image_size, image_size, 3),
      num_classes=0,
      num_train_examples=shapes.NUM_TRAIN_EXAMPLES,
      max_pixel_value=shapes.MAX_PIXEL_VALUE,
      has_captions=True,
    )
  if name == WEBDATASET:
    image_size = _image_size(data_config)
    return DatasetInfo(
      name=name,
      image_shape=(image_size, image_size, 3),
      num_classes=0,
      num_train_examples=shards.num_pairs(data_config.get('data_dir')),
      max_pixel_value=shards.MAX_PIXEL_VALUE,
      has_captions=True,
    )
  tfds_module = _tfds()
  spec = tfds_module.SPECS[name]
  return DatasetInfo(
    name=name,
    image_shape=spec.image_shape,
    num_classes=spec.num_classes,
    num_train_examples=spec.num_train_examples,
    max_pixel_value=tfds_module.MAX_PIXEL_VALUE,
  )


def check_available(data_config: ml_collections.ConfigDict) -> None:
  """Fails fast, before anything compiles, if the data is not prepared.

  For webdataset, indexes every shard: an unpaired image or caption, or an
  empty caption, fails here rather than during training.

  Raises:
    ValueError: the config is invalid.
    DatasetNotFoundError: a TFDS data set is not prepared under
      data_config.data_dir, or data_dir holds no webdataset shard; the
      message says how to prepare it.
    shards.ShardError: a webdataset shard is invalid.
  """
  _validate(data_config)
  if data_config.name in (DIGITS, SHAPES):
    return
  if data_config.name == WEBDATASET:
    for split in _shard_splits(data_config):
      shards.num_pairs(*_shard_folder(data_config, split))
    return
  message = _tfds().missing_message(
    data_config.name, data_config.get('data_dir')
  )
  if message is not None:
    raise DatasetNotFoundError(message)


def _check_int(key: str, value: int, minimum: int) -> None:
  """Checks a runtime argument; numpy ints pass (e.g. a restored step)."""
  if not checks.is_int(value, minimum, allow_numpy=True):
    raise ValueError(f'{key} must be an int >= {minimum}, got {value!r}.')


def to_model_range(
  images: np.ndarray | jax.Array, max_pixel_value: int
) -> np.ndarray | jax.Array:
  """Raw integer pixels in [0, max_pixel_value] → float32 in [−1, 1].

  Pixel value v becomes float32(v) / float32(max_pixel_value / 2) − 1, each
  operation rounded in float32 as numpy does (digits: v / 8 − 1; TFDS:
  v / 127.5 − 1), the values the data sets yielded as float32 before they
  sent raw pixels. It is a lookup in the table of those values rather than
  the arithmetic itself, because XLA turns x / c into x · (1 / c) and fuses
  the − 1 into a multiply-add: with jax 0.10 on CPU, jitted v / 127.5 − 1
  differs from numpy's in 205 of the 256 values, and the model would see
  other inputs than before.

  Works on numpy arrays (returns numpy, on the host) and on jax arrays,
  inside jit too (returns jax; max_pixel_value must then be a static int).
  A pixel above max_pixel_value becomes NaN under jax; numpy raises
  IndexError.

  Raises:
    TypeError: the images are not integers.
    ValueError: max_pixel_value is not an int >= 1.
  """
  if not np.issubdtype(images.dtype, np.integer):
    raise TypeError(
      f'to_model_range takes raw integer pixels, got dtype {images.dtype}.'
    )
  _check_int('max_pixel_value', max_pixel_value, 1)
  values = np.arange(max_pixel_value + 1, dtype=np.float32)
  table = values / np.float32(max_pixel_value / 2) - np.float32(1)
  if isinstance(images, np.ndarray):
    return table[images]
  return jnp.take(table, images, mode='fill', fill_value=jnp.nan)


def train_batches(
  data_config: ml_collections.ConfigDict,
  *,
  seed: int,
  global_batch_size: int,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator over this process's rows of the global batches.

  Yields the parts of global batches start_step, start_step + 1, … that
  belong to this process: {'image': uint8 [B / P, H, W, C] in
  [0, max_pixel_value], 'label': int32 [B / P]} with B = global_batch_size,
  P = process_count, or for a caption data set {'image': …, 'caption': str
  [B / P]}; `to_model_range` maps the images onto [−1, 1]. Batch k depends
  only on (seed, k, process_index, process_count). A webdataset process
  reads only its own shards (see `gdd.data.shards`), indexed before this
  returns.

  Args:
    data_config: the data config (name, data_dir, random_flip,
      shuffle_buffer, image_size).
    seed: non-negative data seed; the order of examples derives from it.
    global_batch_size: examples per step over all processes; must be
      divisible by process_count.
    start_step: the first step yielded, e.g. the restored checkpoint's step.
    process_index: this process; defaults to jax.process_index().
    process_count: number of processes; defaults to jax.process_count().

  Raises:
    ValueError: an invalid config or argument.
    DatasetNotFoundError, shards.ShardError: as in `check_available`.
  """
  _validate(data_config)
  kwargs = _batch_arguments(
    seed=seed,
    global_batch_size=global_batch_size,
    start_step=start_step,
    process_index=process_index,
    process_count=process_count,
  )
  if data_config.name == DIGITS:
    return digits.train_batches(**kwargs)
  if data_config.name == SHAPES:
    return shapes.train_batches(image_size=_image_size(data_config), **kwargs)
  if data_config.name == WEBDATASET:
    return shards.train_batches(
      data_config.get('data_dir'), image_size=_image_size(data_config), **kwargs
    )
  return _tfds().train_batches(
    data_config.name,
    data_config.get('data_dir'),
    shuffle_buffer=data_config.shuffle_buffer,
    random_flip=data_config.get('random_flip', False),
    **kwargs,
  )


def _batch_arguments(
  *,
  seed: int,
  global_batch_size: int,
  start_step: int,
  process_index: int | None,
  process_count: int | None,
) -> dict[str, int]:
  """`train_batches`' arguments, checked, as the backends take them.

  Unset process_index and process_count become jax's. Every value is
  converted to a Python int, since numpy ints are accepted.

  Raises:
    ValueError: an argument is out of range or the batch does not split
      evenly over the processes.
  """
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  _check_int('seed', seed, 0)
  _check_int('start_step', start_step, 0)
  _check_int('process_count', process_count, 1)
  _check_int('global_batch_size', global_batch_size, 1)
  if not (
    checks.is_int(process_index, 0, allow_numpy=True)
    and process_index < process_count
  ):
    raise ValueError(
      f'process_index must be in [0, {process_count}), got {process_index!r}.'
    )
  if global_batch_size % process_count:
    raise ValueError(
      f'global_batch_size {global_batch_size} must be divisible by the '
      f'process count {process_count}.'
    )
  return dict(
    seed=int(seed),
    global_batch_size=int(global_batch_size),
    start_step=int(start_step),
    process_index=int(process_index),
    process_count=int(process_count),
  )


def eval_arrays(
  data_config: ml_collections.ConfigDict,
  *,
  split: str,
  num_examples: int | None = None,
) -> dict[str, np.ndarray]:
  """A fixed, unshuffled set of examples of a split, the same everywhere.

  For evaluation (e.g. FID reference statistics): the first `num_examples`
  (all if None) of `split` in stored order, never flipped, as
  {'image': float32 [N, H, W, C] in [−1, 1], 'label': int32 [N]}; caption
  data sets give 'caption' (str [N]) instead of 'label', and shapes its
  attribute arrays too (`shapes.ATTRIBUTES`). Digits and shapes have splits
  'train' and 'test'; webdataset has 'train' (data_dir) and, with
  held_out_dir set, 'test' (its first pairs in index order: shard by shard,
  key by key); TFDS data sets have their TFDS splits. The images are the
  training pixels through `to_model_range`.
  """
  info = get_info(data_config)
  if info.name == DIGITS:
    raw = digits.eval_arrays(split=split, num_examples=num_examples)
  elif info.name == SHAPES:
    raw = shapes.eval_arrays(
      image_size=info.image_shape[0], split=split, num_examples=num_examples
    )
  elif info.name == WEBDATASET:
    folder, key = _shard_folder(data_config, split)
    raw = shards.eval_arrays(
      folder, image_size=info.image_shape[0], num_examples=num_examples, key=key
    )
  else:
    raw = _tfds().eval_arrays(
      info.name,
      data_config.get('data_dir'),
      split=split,
      num_examples=num_examples,
    )
  return dict(raw, image=to_model_range(raw['image'], info.max_pixel_value))


def split_size(data_config: ml_collections.ConfigDict, split: str) -> int:
  """Examples in `split` (reads metadata only for TFDS data sets, and tar
  headers for webdataset)."""
  _validate(data_config)
  if data_config.name == DIGITS:
    return digits.split_size(split)
  if data_config.name == SHAPES:
    return shapes.split_size(split)
  if data_config.name == WEBDATASET:
    return shards.num_pairs(*_shard_folder(data_config, split))
  return _tfds().split_size(
    data_config.name, data_config.get('data_dir'), split
  )


def _shard_splits(data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """A webdataset's splits: 'train', and 'test' if held_out_dir is set."""
  if data_config.get('held_out_dir'):
    return ('train', 'test')
  return ('train',)


def _shard_folder(
  data_config: ml_collections.ConfigDict, split: str
) -> tuple[str | None, str]:
  """The folder of a webdataset split, and the config.data key naming it.

  Raises:
    ValueError: the split does not exist for this config.
  """
  if split not in _shard_splits(data_config):
    raise ValueError(
      f'webdataset split {split!r} does not exist: allowed '
      f"{_shard_splits(data_config)} ('test' is config.data.held_out_dir's "
      'shards, when it is set).'
    )
  key = _SHARD_FOLDER_KEYS[split]
  return data_config.get(key), key


def held_out_split(data_config: ml_collections.ConfigDict) -> str:
  """The split held out from training (`_HELD_OUT_SPLITS`).

  A webdataset without config.data.held_out_dir holds nothing out: its
  'train' split stands in.
  """
  _validate(data_config)
  if data_config.name == WEBDATASET:
    return _shard_splits(data_config)[-1]
  return _HELD_OUT_SPLITS[data_config.name]


def held_out_captions(
  data_config: ml_collections.ConfigDict, num: int
) -> tuple[str, ...]:
  """The first `num` captions of the held-out split (fewer if it is small).

  What text models' sample grids, `--mode=sample` and evaluation cycle
  through, as the class-conditional ones cycle the classes. A webdataset's
  are read without decoding its images.
  """
  split = held_out_split(data_config)
  if data_config.name == WEBDATASET:
    folder, key = _shard_folder(data_config, split)
    return tuple(shards.captions(folder, num, key=key))
  num = min(num, split_size(data_config, split))
  arrays = eval_arrays(data_config, split=split, num_examples=num)
  return tuple(str(c) for c in arrays['caption'])


def caption_vocabulary(
  data_config: ml_collections.ConfigDict,
) -> tuple[str, ...] | None:
  """Every word of a data set's captions, or None for free text."""
  _validate(data_config)
  return shapes.VOCABULARY if data_config.name == SHAPES else None
