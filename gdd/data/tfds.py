"""TFDS pipelines: cifar10, imagenet_resized/64x64 and imagenet2012 at 256.

Each process reads its own even part of 'train', so hosts never read the same
example in an epoch and need not talk to each other. The order is a pure
function of (seed, epoch, process): epoch e is read with file shuffling and a
tf.data shuffle whose seeds derive from (seed, e, process_index), and the
random flip is stateless, seeded by the example's index in the epoch. A run
resumed at step k therefore rebuilds epoch k // steps_per_epoch and skips the
batches already consumed in it. Images stay uint8 (0..255), as stored, or
for full-size ImageNet as its centre crop (`_center_crop`) rounds them.

TensorFlow itself is imported only when a pipeline is built: the availability
check (`missing_message`) needs just the builder's metadata, and TensorFlow
takes seconds to import.
"""

import dataclasses
import functools
import logging
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

# Every supported data set stores uint8 images.
MAX_PIXEL_VALUE = 255


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Static facts about one data set, so get_info needs no I/O."""

  tfds_name: str
  image_shape: tuple[int, int, int]
  num_classes: int
  num_train_examples: int
  how_to_prepare: str
  # Stored at any size, brought to image_shape by `_center_crop`.
  center_crop: bool = False


SPECS = {
  'cifar10': _Spec(
    tfds_name='cifar10',
    image_shape=(32, 32, 3),
    num_classes=10,
    num_train_examples=50_000,
    how_to_prepare='Prepare it (downloads ~160 MB) with:\n  {build}',
  ),
  'imagenet64': _Spec(
    tfds_name='imagenet_resized/64x64',
    image_shape=(64, 64, 3),
    num_classes=1000,
    num_train_examples=1_281_167,
    how_to_prepare=(
      'The downsampled ImageNet files need an ImageNet account, so download '
      'them by hand from https://image-net.org/download-images '
      '(Imagenet64_train_part1_npz.zip, Imagenet64_train_part2_npz.zip, '
      'Imagenet64_val_npz.zip), put them in {data_dir}/downloads/manual/ and '
      'then run:\n  {build}'
    ),
  ),
  # ILSVRC 2012 at full size, centre-cropped to 256×256 as ADM and the
  # latent-diffusion ImageNet 256 models see it.
  'imagenet256': _Spec(
    tfds_name='imagenet2012',
    image_shape=(256, 256, 3),
    num_classes=1000,
    num_train_examples=1_281_167,
    how_to_prepare=(
      'ImageNet needs an account, so download ILSVRC2012_img_train.tar and '
      'ILSVRC2012_img_val.tar by hand from '
      'https://image-net.org/download-images, put them in '
      '{data_dir}/downloads/manual/ and then run:\n  {build}'
    ),
    center_crop=True,
  ),
}


def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  return tfds.builder(SPECS[name].tfds_name, data_dir=data_dir)


def missing_message(name: str, data_dir: str | None) -> str | None:
  """None if `name` is prepared under data_dir, else what is wrong and how
  to fix it. Reads only metadata: no TensorFlow, no examples."""
  builder = _builder(name, data_dir)
  if builder.is_prepared():
    return None
  spec = SPECS[name]
  root = str(builder.data_dir_root)
  fix = spec.how_to_prepare.format(
    data_dir=root, build=f'tfds build {spec.tfds_name} --data_dir={root}'
  )
  return (
    f'Dataset {name!r} (TFDS {spec.tfds_name!r}) is not prepared in '
    f'data_dir {root!r} (looked for {builder.data_dir}). Set '
    f'config.data.data_dir to where it is prepared, or prepare it there. {fix}'
  )


@functools.cache
def _tf():
  """Imports TensorFlow, hiding GPUs so it never takes accelerator memory."""
  import tensorflow as tf

  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    # TensorFlow was initialised by someone else first; too late to hide.
    logging.warning('TensorFlow devices were already initialised; GPUs stay.')
  return tf


def _center_crop(image, size: int):
  """ADM's centre crop: the short side resized to `size`, the centre kept.

  A uint8 [H, W, 3] image of any size → uint8 [size, size, 3]. The resize
  is bicubic and antialiased, as in ADM's `center_crop_arr` (PIL's BICUBIC,
  which antialiases, after box halvings by 2 while the short side is at
  least twice `size`): the preprocessing of ADM's ImageNet 256 reference
  batch, which later class-conditional models (DiT among them) report FID
  against. Not LDM's loader (taming's SmallestMaxSize: cv2 bilinear without
  antialiasing, which aliases where the short side shrinks several times)
  and not an area resize, which is a box filter when it shrinks and
  nearest-neighbour when it enlarges the few images under `size`.
  """
  tf = _tf()
  shape = tf.shape(image)[:2]
  scale = size / tf.cast(tf.reduce_min(shape), tf.float32)
  # round() as ADM; max() guards the short side against a rounding slip.
  resized_shape = tf.maximum(
    tf.cast(tf.round(tf.cast(shape, tf.float32) * scale), tf.int32), size
  )
  resized = tf.image.resize(
    image, resized_shape, method='bicubic', antialias=True
  )
  top, left = tf.unstack((resized_shape - size) // 2)
  crop = tf.image.crop_to_bounding_box(resized, top, left, size, size)
  return tf.cast(tf.clip_by_value(tf.round(crop), 0, 255), tf.uint8)


def _stored_image(spec: _Spec, image):
  """A decoded image as the pipeline yields it: cropped if the spec says."""
  if spec.center_crop:
    return _center_crop(image, spec.image_shape[0])
  return image


def _seeds(*entropy: int) -> tuple[int, int, int]:
  """Three independent non-negative int64 seeds derived from `entropy`."""
  state = np.random.SeedSequence(entropy).generate_state(3, np.uint64)
  return tuple(int(s >> np.uint64(1)) for s in state)


def _deterministic_options():
  options = _tf().data.Options()
  options.deterministic = True
  return options


def _epoch_dataset(
  builder: tfds.core.DatasetBuilder,
  *,
  spec: _Spec,
  part,
  seed: int,
  epoch: int,
  process_index: int,
  shuffle_buffer: int,
  random_flip: bool,
  local_batch_size: int,
  skip_batches: int,
):
  """One epoch of this process's part as batches, from batch skip_batches."""
  tf = _tf()
  file_seed, shuffle_seed, flip_seed = _seeds(seed, epoch, process_index)
  # Images stay encoded through shuffling and skipping: a smaller shuffle
  # buffer, and a resume does not decode the batches it skips.
  image_feature = builder.info.features['image']
  ds = builder.as_dataset(
    split=part,
    shuffle_files=True,
    decoders={'image': tfds.decode.SkipDecoding()},
    read_config=tfds.ReadConfig(shuffle_seed=file_seed, try_autocache=False),
  )
  ds = ds.shuffle(
    shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False
  )
  ds = ds.enumerate().skip(skip_batches * local_batch_size)

  def preprocess(index, example):
    image = _stored_image(spec, image_feature.decode_example(example['image']))
    if random_flip:
      image = tf.image.stateless_random_flip_left_right(
        image, seed=tf.stack([tf.constant(flip_seed, tf.int64), index])
      )
    return {'image': image, 'label': tf.cast(example['label'], tf.int32)}

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_deterministic_options())


def train_batches(
  name: str,
  data_dir: str | None,
  *,
  shuffle_buffer: int,
  random_flip: bool,
  seed: int,
  global_batch_size: int,
  start_step: int,
  process_index: int,
  process_count: int,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's part of global batches start_step, start_step + 1, ….

  Arguments are validated by `gdd.data.train_batches`.
  """
  builder = _builder(name, data_dir)
  part = tfds.even_splits('train', n=process_count, drop_remainder=True)[
    process_index
  ]
  local_batch_size = global_batch_size // process_count
  # TFDS asserts the cardinality of what it reads, so this costs no I/O.
  num_local_examples = int(builder.as_dataset(split=part).cardinality())
  steps_per_epoch = num_local_examples // local_batch_size
  if steps_per_epoch < 1:
    raise ValueError(
      f'global_batch_size {global_batch_size} is too large for {name!r}: '
      f'each of {process_count} processes holds {num_local_examples} '
      f'examples, fewer than its batch of {local_batch_size}.'
    )
  epoch, skip_batches = divmod(start_step, steps_per_epoch)
  while True:
    ds = _epoch_dataset(
      builder,
      spec=SPECS[name],
      part=part,
      seed=seed,
      epoch=epoch,
      process_index=process_index,
      shuffle_buffer=shuffle_buffer,
      random_flip=random_flip,
      local_batch_size=local_batch_size,
      skip_batches=skip_batches,
    )
    yield from ds.as_numpy_iterator()
    epoch += 1
    skip_batches = 0


def split_size(name: str, data_dir: str | None, split: str) -> int:
  """Examples in a prepared split, from the builder's metadata."""
  splits = _builder(name, data_dir).info.splits
  if split not in splits:
    raise ValueError(
      f'{name!r} has no split {split!r}; its splits: {sorted(splits)}.'
    )
  return splits[split].num_examples


def eval_arrays(
  name: str,
  data_dir: str | None,
  *,
  split: str,
  num_examples: int | None,
) -> dict[str, np.ndarray]:
  """The first `num_examples` (all if None) of a split in its stored order,
  as raw pixels."""
  tf = _tf()
  ds = _builder(name, data_dir).as_dataset(
    split=split,
    shuffle_files=False,
    read_config=tfds.ReadConfig(try_autocache=False),
  )
  size = int(ds.cardinality())
  if num_examples is None:
    num_examples = size
  if not 0 < num_examples <= size:
    raise ValueError(
      f'num_examples must be in [1, {size}] for {name!r} split {split!r}, '
      f'got {num_examples}.'
    )
  spec = SPECS[name]
  ds = ds.take(num_examples).map(
    lambda ex: {
      'image': _stored_image(spec, ex['image']),
      'label': tf.cast(ex['label'], tf.int32),
    },
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  ds = ds.batch(1024).with_options(_deterministic_options())
  batches = list(ds.as_numpy_iterator())
  return {
    key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]
  }
