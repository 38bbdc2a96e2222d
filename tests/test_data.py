"""Tests of gdd.data: digits directly, TFDS pipelines on mocked data."""

import collections
import itertools
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from gdd import data

NUM_DIGITS = 1797
NUM_TRAIN = 1500
DIGITS_MAX = 16
TFDS_MAX = 255


def _config(name='digits', **overrides):
  fields = dict(name=name, data_dir=None, random_flip=False, shuffle_buffer=8)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _assert_batches_equal(actual, expected):
  assert len(actual) == len(expected)
  for a, e in zip(actual, expected, strict=True):
    np.testing.assert_array_equal(a['image'], e['image'])
    np.testing.assert_array_equal(a['label'], e['label'])


def _rows(images):
  """Multiset of images, to compare sets of examples whatever their order."""
  return collections.Counter(image.tobytes() for image in images)


# The formulas that turned pixels into floats before batches carried raw
# pixels, copied from that code: numpy for digits, TensorFlow for TFDS.
def _digits_floats_before(pixels):
  return pixels.astype(np.float32) / 8.0 - 1.0


def _tfds_floats_before(pixels):
  import tensorflow as tf

  return (tf.cast(pixels, tf.float32) / 127.5 - 1.0).numpy()


_jitted_to_model_range = jax.jit(data.to_model_range, static_argnums=1)


def _assert_scales_as_before(pixels, max_pixel_value, floats_before):
  """Numpy and jitted to_model_range reproduce the old floats bit for bit."""
  expected = floats_before(pixels)
  for scale in (data.to_model_range, _jitted_to_model_range):
    actual = np.asarray(scale(pixels, max_pixel_value))
    assert actual.dtype == np.float32
    np.testing.assert_array_equal(
      actual.view(np.int32), expected.view(np.int32)
    )


# ------------------------------------------------------- to_model_range ---


@pytest.mark.parametrize(
  'max_pixel_value, floats_before',
  [(DIGITS_MAX, _digits_floats_before), (TFDS_MAX, _tfds_floats_before)],
)
def test_to_model_range_matches_old_formula_on_every_pixel_value(
  max_pixel_value, floats_before
):
  pixels = np.arange(max_pixel_value + 1, dtype=np.uint8)
  _assert_scales_as_before(pixels, max_pixel_value, floats_before)
  scaled = data.to_model_range(pixels, max_pixel_value)
  assert scaled[0] == -1.0 and scaled[-1] == 1.0


def test_to_model_range_errors():
  with pytest.raises(TypeError, match='integer pixels'):
    data.to_model_range(np.zeros(3, np.float32), TFDS_MAX)
  with pytest.raises(ValueError, match='max_pixel_value'):
    data.to_model_range(np.zeros(3, np.uint8), 0)
  too_bright = np.array([DIGITS_MAX + 1], np.uint8)
  with pytest.raises(IndexError):
    data.to_model_range(too_bright, DIGITS_MAX)
  assert np.isnan(_jitted_to_model_range(too_bright, DIGITS_MAX)).all()


# ---------------------------------------------------------------- digits ---


def test_import_does_not_load_tensorflow():
  code = (
    'import sys, gdd.data as d, ml_collections as mc;'
    "c = mc.ConfigDict(dict(name='digits', random_flip=False));"
    'd.check_available(c); d.get_info(c);'
    'next(d.train_batches(c, seed=0, global_batch_size=4));'
    "assert 'tensorflow' not in sys.modules, 'tensorflow';"
    "assert 'tensorflow_datasets' not in sys.modules, 'tfds'"
  )
  repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, '-c', code], cwd=repo_root, check=True)


def test_digits_info():
  assert data.get_info(_config()) == data.DatasetInfo(
    name='digits',
    image_shape=(8, 8, 1),
    num_classes=10,
    num_train_examples=NUM_TRAIN,
    max_pixel_value=DIGITS_MAX,
  )


def test_digits_batch_shapes_dtypes_and_ranges():
  batch = next(data.train_batches(_config(), seed=0, global_batch_size=32))
  assert batch['image'].shape == (32, 8, 8, 1)
  assert batch['image'].dtype == np.uint8
  assert batch['label'].shape == (32,)
  assert batch['label'].dtype == np.int32
  # A batch of 32 digits reaches both ends of the pixel range.
  assert batch['image'].min() == 0 and batch['image'].max() == DIGITS_MAX
  assert batch['label'].min() >= 0 and batch['label'].max() < 10


def test_digits_train_pixels_scale_to_the_floats_of_the_data_set():
  # Scaled training batches hold exactly the old floats of the train split.
  batches = _take(
    data.train_batches(_config(), seed=4, global_batch_size=500), 3
  )
  pixels = np.concatenate([b['image'] for b in batches])
  _assert_scales_as_before(pixels, DIGITS_MAX, _digits_floats_before)
  train = data.eval_arrays(_config(), split='train')
  assert _rows(data.to_model_range(pixels, DIGITS_MAX)) == _rows(train['image'])


def test_digits_splits_partition_the_data_stratified():
  # eval_arrays' floats are bit-identical to the old formula's.
  from sklearn.datasets import load_digits

  train = data.eval_arrays(_config(), split='train')
  test = data.eval_arrays(_config(), split='test')
  assert len(train['label']) == NUM_TRAIN
  assert len(test['label']) == NUM_DIGITS - NUM_TRAIN
  # Together exactly the full data set scaled by x / 8 - 1, each image once:
  # a disjoint split (the digits hold no duplicate images).
  full = _digits_floats_before(load_digits().images)
  both = np.concatenate([train['image'], test['image']])[..., 0]
  assert both.dtype == np.float32
  assert _rows(both) == _rows(full)
  # Stratified: every class holds its share of the test set, ±1.
  expected = np.bincount(load_digits().target) * len(test['label']) / NUM_DIGITS
  assert np.all(np.abs(np.bincount(test['label']) - expected) <= 1)


def test_digits_eval_arrays_are_fixed_prefixes():
  first = data.eval_arrays(_config(), split='train', num_examples=10)
  all_train = data.eval_arrays(_config(), split='train')
  assert first['image'].shape == (10, 8, 8, 1)
  _assert_batches_equal([first], [{k: v[:10] for k, v in all_train.items()}])
  # Callers may write into what they get without corrupting the cache.
  first['image'][:] = 0.0
  again = data.eval_arrays(_config(), split='train', num_examples=10)
  _assert_batches_equal([again], [{k: v[:10] for k, v in all_train.items()}])


@pytest.mark.parametrize(
  'kwargs', [dict(split='validation'), dict(split='test', num_examples=298)]
)
def test_digits_eval_arrays_errors(kwargs):
  with pytest.raises(ValueError, match='split|num_examples'):
    data.eval_arrays(_config(), **kwargs)


def test_digits_determinism():
  def first_batches(seed):
    return _take(
      data.train_batches(_config(), seed=seed, global_batch_size=16), 3
    )

  _assert_batches_equal(first_batches(1), first_batches(1))
  a, b = first_batches(1), first_batches(2)
  assert not np.array_equal(a[0]['image'], b[0]['image'])


@pytest.mark.parametrize('start_step', [1, 5, 23, 24])
def test_digits_resume_equals_uninterrupted(start_step):
  # With B = 64, batch 23 holds stream elements [1472, 1536): it straddles
  # the end of epoch 0 (1500 examples).
  fresh = _take(data.train_batches(_config(), seed=3, global_batch_size=64), 30)
  resumed = data.train_batches(
    _config(), seed=3, global_batch_size=64, start_step=start_step
  )
  _assert_batches_equal(_take(resumed, 30 - start_step), fresh[start_step:])


def test_numpy_int_arguments_give_the_batches_of_python_ints():
  # Runtime arguments may come from numpy or jax (e.g. a restored step).
  numpy_ints = data.train_batches(
    _config(),
    seed=np.int64(3),
    global_batch_size=np.int32(16),
    start_step=np.int64(2),
    process_index=np.int32(1),
    process_count=np.int64(2),
  )
  python_ints = data.train_batches(
    _config(),
    seed=3,
    global_batch_size=16,
    start_step=2,
    process_index=1,
    process_count=2,
  )
  _assert_batches_equal(_take(numpy_ints, 3), _take(python_ints, 3))


def test_digits_process_parts_concatenate_to_global_batch():
  batch_size, num_steps = 64, 26
  global_batches = _take(
    data.train_batches(
      _config(),
      seed=5,
      global_batch_size=batch_size,
      process_count=1,
      process_index=0,
    ),
    num_steps,
  )
  parts = [
    _take(
      data.train_batches(
        _config(),
        seed=5,
        global_batch_size=batch_size,
        process_index=p,
        process_count=4,
      ),
      num_steps,
    )
    for p in range(4)
  ]
  for step in range(num_steps):
    assert parts[0][step]['image'].shape == (16, 8, 8, 1)
    joined = {
      key: np.concatenate([part[step][key] for part in parts])
      for key in ('image', 'label')
    }
    _assert_batches_equal([joined], [global_batches[step]])


@pytest.mark.parametrize('batch_size', [100, 64])
def test_digits_every_example_once_per_epoch(batch_size):
  train = _rows(data.eval_arrays(_config(), split='train')['image'])
  num_steps = -(-2 * NUM_TRAIN // batch_size)
  batches = _take(
    data.train_batches(_config(), seed=7, global_batch_size=batch_size),
    num_steps,
  )
  stream = data.to_model_range(
    np.concatenate([b['image'] for b in batches]), DIGITS_MAX
  )
  assert _rows(stream[:NUM_TRAIN]) == train
  assert _rows(stream[NUM_TRAIN : 2 * NUM_TRAIN]) == train
  # Consecutive epochs are different permutations.
  assert not np.array_equal(
    stream[:NUM_TRAIN], stream[NUM_TRAIN : 2 * NUM_TRAIN]
  )


@pytest.mark.parametrize(
  'config, kwargs, match',
  [
    (_config(random_flip=True), {}, 'random_flip'),
    (_config(name='mnist'), {}, 'config.data.name'),
    (_config(), dict(global_batch_size=10, process_count=4), 'divisible'),
    (_config(), dict(process_index=4, process_count=4), 'process_index'),
    (_config(), dict(seed=-1), 'seed'),
    (_config(), dict(global_batch_size=0), 'global_batch_size'),
    (_config(), dict(start_step=-1), 'start_step'),
    (_config(), dict(seed=True), 'seed'),
    (_config(), dict(start_step=np.int64(-1)), 'start_step'),
    (_config('cifar10', shuffle_buffer=0), {}, 'shuffle_buffer'),
  ],
)
def test_invalid_arguments_raise(config, kwargs, match):
  kwargs = dict(dict(seed=0, global_batch_size=8, process_index=0), **kwargs)
  kwargs.setdefault('process_count', 1)
  with pytest.raises(ValueError, match=match):
    data.train_batches(config, **kwargs)


def test_digits_check_available_and_random_flip_error():
  data.check_available(_config())
  with pytest.raises(ValueError, match='random_flip'):
    data.check_available(_config(random_flip=True))
  with pytest.raises(ValueError, match='random_flip'):
    data.get_info(_config(random_flip=True))


# ------------------------------------------------------------------ TFDS ---

TFDS_CASES = [('cifar10', (32, 32, 3), 10), ('imagenet64', (64, 64, 3), 1000)]
# Steps the fake pixel value takes from one example to the next; examples
# are told apart by their image alone, so checks need no labels.
PIXEL_STEP = 3


def _indexed_as_dataset(self, split, decoders=None, **kwargs):
  """Mocked `_as_dataset` whose example i has image[h, w] = 3·i + w.

  Unlike tfds' default mock it honours even splits (what the per-process
  parts read) and makes each example identifiable and visibly flipped.
  """
  del kwargs
  import tensorflow as tf

  num_examples = 16
  start, stop = 0, num_examples
  if isinstance(split, str):
    assert split == 'train', split
  else:
    per_part = num_examples // split.count
    start, stop = split.index * per_part, (split.index + 1) * per_part
  height, width, _ = self.info.features['image'].shape
  num_classes = self.info.features['label'].num_classes

  def make(i):
    row = tf.cast(PIXEL_STEP * i + tf.range(width, dtype=tf.int64), tf.uint8)
    image = tf.broadcast_to(row[None, :, None], (height, width, 3))
    if decoders is not None:  # The pipeline decodes images itself.
      image = tf.io.encode_png(image)
    return {'image': image, 'label': i % num_classes}

  return tf.data.Dataset.range(start, stop).map(make)


def _example_ids_and_flips(images):
  """(index of each image's example, whether it came out flipped)."""
  pixels = images[:, 0, :, 0].astype(int)
  flipped = pixels[:, 0] > pixels[:, 1]
  return pixels.min(axis=1) // PIXEL_STEP, flipped


@pytest.mark.parametrize('name, shape, num_classes', TFDS_CASES)
def test_tfds_info(name, shape, num_classes):
  info = data.get_info(_config(name))
  assert (info.image_shape, info.num_classes) == (shape, num_classes)
  assert info.max_pixel_value == TFDS_MAX
  assert info.num_train_examples == {'cifar10': 50_000}.get(name, 1_281_167)


@pytest.mark.parametrize('name, shape, num_classes', TFDS_CASES)
def test_tfds_batches_shapes_dtypes_and_ranges(name, shape, num_classes):
  with tfds.testing.mock_data(num_examples=8):
    batch = next(
      data.train_batches(
        _config(name, random_flip=True), seed=0, global_batch_size=4
      )
    )
    evaluation = data.eval_arrays(_config(name), split='train', num_examples=6)
  assert batch['image'].shape == (4, *shape)
  assert batch['image'].dtype == np.uint8
  assert batch['label'].shape == (4,) and batch['label'].dtype == np.int32
  assert batch['label'].min() >= 0 and batch['label'].max() < num_classes
  # uint8 spans exactly [0, max_pixel_value] = [0, 255].
  _assert_scales_as_before(batch['image'], TFDS_MAX, _tfds_floats_before)
  assert evaluation['image'].shape == (6, *shape)
  assert evaluation['image'].dtype == np.float32
  assert evaluation['image'].min() >= -1.0 and evaluation['image'].max() <= 1.0
  assert evaluation['label'].dtype == np.int32


def test_tfds_eval_arrays_are_the_old_floats_of_the_stored_pixels():
  with tfds.testing.mock_data(as_dataset_fn=_indexed_as_dataset):
    evaluation = data.eval_arrays(_config('cifar10'), split='train')
  # Example i stores image[h, w] = 3·i + w (see _indexed_as_dataset).
  example = np.arange(16)[:, None, None, None]
  column = np.arange(32)[None, None, :, None]
  pixels = np.broadcast_to(PIXEL_STEP * example + column, (16, 32, 32, 3))
  expected = _tfds_floats_before(pixels.astype(np.uint8))
  np.testing.assert_array_equal(
    evaluation['image'].view(np.int32), expected.view(np.int32)
  )


def test_tfds_determinism_and_resume():
  config = _config('cifar10', random_flip=True)
  # 12 examples, batch 4: 3 steps per epoch, so steps 3 and 4 start and
  # continue epoch 1.
  with tfds.testing.mock_data(num_examples=12):
    fresh = _take(data.train_batches(config, seed=1, global_batch_size=4), 7)
    again = _take(data.train_batches(config, seed=1, global_batch_size=4), 7)
    other = _take(data.train_batches(config, seed=2, global_batch_size=4), 7)
    resumed = {
      step: _take(
        data.train_batches(
          config, seed=1, global_batch_size=4, start_step=step
        ),
        7 - step,
      )
      for step in (3, 4)
    }
  _assert_batches_equal(again, fresh)
  assert any(
    not np.array_equal(a['image'], b['image'])
    for a, b in zip(fresh, other, strict=True)
  )
  for step, batches in resumed.items():
    _assert_batches_equal(batches, fresh[step:])


def test_tfds_eval_arrays_are_deterministic():
  with tfds.testing.mock_data(num_examples=5):
    first = data.eval_arrays(_config('imagenet64'), split='validation')
    second = data.eval_arrays(_config('imagenet64'), split='validation')
  assert first['image'].shape == (5, 64, 64, 3)
  _assert_batches_equal([first], [second])


@pytest.mark.parametrize('random_flip', [False, True])
def test_tfds_flip(random_flip):
  config = _config('cifar10', random_flip=random_flip)
  with tfds.testing.mock_data(as_dataset_fn=_indexed_as_dataset):
    batches = _take(data.train_batches(config, seed=0, global_batch_size=8), 4)
  images = np.concatenate([b['image'] for b in batches])
  _, flipped = _example_ids_and_flips(images)
  if random_flip:
    assert flipped.any() and not flipped.all()
  else:
    assert not flipped.any()


def test_tfds_process_parts_are_disjoint_epoch_permutations():
  # 16 examples, 2 processes: 8 each; local batch 2 gives 4 steps per epoch.
  with tfds.testing.mock_data(as_dataset_fn=_indexed_as_dataset):
    ids = []
    for p in range(2):
      batches = _take(
        data.train_batches(
          _config('imagenet64', random_flip=True),
          seed=0,
          global_batch_size=4,
          process_index=p,
          process_count=2,
        ),
        8,
      )
      assert batches[0]['image'].shape == (2, 64, 64, 3)
      ids.append(
        _example_ids_and_flips(np.concatenate([b['image'] for b in batches]))[0]
      )
  for p in range(2):
    epochs = ids[p].reshape(2, 8)
    # Each epoch is a permutation of the process's part, reshuffled.
    assert (
      sorted(epochs[0]) == sorted(epochs[1]) == list(range(8 * p, 8 * p + 8))
    )
    assert not np.array_equal(epochs[0], epochs[1])
  assert not set(ids[0]) & set(ids[1])


def test_tfds_batch_larger_than_process_part_raises():
  with (
    tfds.testing.mock_data(num_examples=4),
    pytest.raises(ValueError, match='too large'),
  ):
    next(data.train_batches(_config('cifar10'), seed=0, global_batch_size=8))


@pytest.mark.parametrize('name', ['cifar10', 'imagenet64'])
def test_check_available_names_data_dir_and_fix(name, tmp_path):
  with pytest.raises(data.DatasetNotFoundError) as error:
    data.check_available(_config(name, data_dir=str(tmp_path)))
  assert isinstance(error.value, FileNotFoundError)
  message = str(error.value)
  assert str(tmp_path) in message
  assert name in message
  tfds_name = {'cifar10': 'cifar10'}.get(name, 'imagenet_resized/64x64')
  assert f'tfds build {tfds_name} --data_dir={tmp_path}' in message
  if name == 'imagenet64':
    assert 'downloads/manual' in message


def test_check_available_passes_under_mock_data_with_metadata(tmp_path):
  # mock_data replaces every data_dir by its own (a missing folder unless
  # given), so check_available fails under it; writing the builder's
  # metadata there makes the mocked data set count as prepared.
  builder = tfds.builder('cifar10')
  metadata_dir = tmp_path / 'cifar10' / str(builder.version)
  metadata_dir.mkdir(parents=True)
  builder.info.write_to_directory(metadata_dir)
  with tfds.testing.mock_data(num_examples=4, data_dir=str(tmp_path)):
    data.check_available(_config('cifar10'))
  with (
    tfds.testing.mock_data(num_examples=4),
    pytest.raises(data.DatasetNotFoundError),
  ):
    data.check_available(_config('cifar10'))


def test_split_sizes_come_from_metadata():
  assert data.split_size(_config('digits'), 'train') == 1500
  assert data.split_size(_config('digits'), 'test') == 297
  with pytest.raises(ValueError, match='must be one of'):
    data.split_size(_config('digits'), 'validation')
  # Not prepared here: no splits, and the error says which exist.
  with (
    tfds.testing.mock_data(num_examples=8),
    pytest.raises(ValueError, match="no split 'test'; its splits"),
  ):
    data.split_size(_config('cifar10'), 'test')
