"""Tests of the shapes data set: pixels, captions, splits and the stream."""

import hashlib
import itertools
import re

import ml_collections
import numpy as np
import pytest

from gdd import data
from gdd.data import shapes

SIZE = 32
# Enough images to meet every shape, colour, size and relation many times.
NUM_CHECKED = 400
RGB = {
  'red': (255, 0, 0),
  'orange': (255, 165, 0),
  'yellow': (255, 255, 0),
  'green': (0, 128, 0),
  'cyan': (0, 255, 255),
  'blue': (0, 0, 255),
  'magenta': (255, 0, 255),
  'white': (255, 255, 255),
}
# The caption grammar, written out here rather than taken from `caption`.
_OBJECT = r'(small|large) ([a-z]+) ([a-z]+)'
CAPTION = re.compile(
  rf'(?:a|a picture of a) {_OBJECT}'
  rf'(?: (to the left of|to the right of|above|below) a {_OBJECT})?'
  r'(?: on a black background)?'
)


def _config(**overrides):
  fields = dict(name='shapes', random_flip=False, image_size=SIZE)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def _raw(split='test', image_size=SIZE):
  return shapes.eval_arrays(image_size=image_size, split=split)


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _assert_batches_equal(actual, expected):
  assert len(actual) == len(expected)
  for a, e in zip(actual, expected, strict=True):
    assert a.keys() == e.keys() == {'image', 'caption'}
    np.testing.assert_array_equal(a['image'], e['image'])
    np.testing.assert_array_equal(a['caption'], e['caption'])


def _objects(arrays, i):
  """(shape, colour, size) names of image i's objects."""
  return [
    (
      shapes.SHAPES[arrays['shape'][i, slot]],
      shapes.COLOURS[arrays['colour'][i, slot]][0],
      shapes.SIZES[arrays['size'][i, slot]],
    )
    for slot in range(arrays['num_objects'][i])
  ]


def _exact_pixels(image, colour):
  """Mask of the pixels holding exactly the CSS value of `colour`."""
  return (image == np.array(RGB[colour], np.uint8)).all(axis=-1)


# ------------------------------------------------------------- captions ---


def test_colours_are_their_css_values():
  assert {name: value for name, value in shapes.COLOURS} == {
    name: '#{:02x}{:02x}{:02x}'.format(*rgb) for name, rgb in RGB.items()
  }


def test_captions_are_lower_case_words_of_the_vocabulary():
  captions = _raw('train')['caption']
  words = set()
  for caption in captions.tolist():
    assert re.fullmatch(r'[a-z]+( [a-z]+)*', caption), caption
    words.update(caption.split())
  assert words <= set(shapes.VOCABULARY)
  # Every word of the vocabulary is used: it holds nothing else.
  assert words == set(shapes.VOCABULARY)
  assert len(shapes.VOCABULARY) < 40


def test_captions_state_the_attributes():
  arrays = _raw()
  templates = set()
  for i, caption in enumerate(arrays['caption'].tolist()):
    match = CAPTION.fullmatch(caption)
    assert match, caption
    size, colour, shape, relation, *second = match.groups()
    objects = [(shape, colour, size)]
    if relation is not None:
      objects.append((second[2], second[1], second[0]))
      assert shapes.RELATIONS[arrays['relation'][i]] == relation
    else:
      assert arrays['relation'][i] == shapes.ABSENT
    assert objects == _objects(arrays, i), caption
    template = arrays['template'][i]
    assert caption.startswith('a picture of ') == (template == 1), caption
    assert caption.endswith(' on a black background') == (template == 2)
    templates.add(template)
    # The public function gives the same caption from the attributes.
    attributes = {name: arrays[name][i] for name in shapes.ATTRIBUTES}
    assert shapes.caption(**attributes) == caption
  assert templates == set(range(len(shapes.TEMPLATES)))


def test_caption_from_predicted_attributes():
  # E.g. what a classifier predicts for one object, template left out.
  assert (
    shapes.caption(
      num_objects=1, shape=[0, -1], colour=[4, -1], size=[1, -1], relation=-1
    )
    == 'a large cyan circle'
  )
  assert (
    shapes.caption(
      num_objects=2,
      shape=[1, 2],
      colour=[5, 2],
      size=[1, 0],
      relation=2,
      template=1,
    )
    == 'a picture of a large blue square above a small yellow triangle'
  )


@pytest.mark.parametrize(
  'overrides, match',
  [
    (dict(num_objects=3), 'num_objects'),
    (dict(shape=[5, 0]), 'shape'),
    (dict(colour=[-1, 0]), 'colour'),
    (dict(size=[0, 2]), 'size'),
    (dict(relation=-1), 'relation'),
    (dict(template=3), 'template'),
  ],
)
def test_caption_rejects_out_of_range_attributes(overrides, match):
  attributes = dict(
    num_objects=2, shape=[0, 1], colour=[0, 1], size=[0, 1], relation=0
  )
  with pytest.raises(ValueError, match=match):
    shapes.caption(**dict(attributes, **overrides))


# --------------------------------------------------------------- pixels ---


def test_attributes_are_drawn_in_their_exact_colours_and_sizes():
  arrays = _raw()
  counts = {}
  for i in range(NUM_CHECKED):
    image = arrays['image'][i]
    for shape, colour, size in _objects(arrays, i):
      count = _exact_pixels(image, colour).sum()
      counts.setdefault((shape, size), []).append(count)
  assert len(counts) == len(shapes.SHAPES) * len(shapes.SIZES)
  for shape in shapes.SHAPES:
    # Every object has an interior of its exact colour; large ones more.
    assert 0 < max(counts[shape, 'small']) < min(counts[shape, 'large'])


def test_every_pixel_is_background_or_one_objects_colour_faded():
  # Anti-aliased edges fade an object's colour towards black; a pixel of
  # any other colour would be a wrong colour or two objects overlapping.
  arrays = _raw()
  for i in range(NUM_CHECKED):
    image = arrays['image'][i].reshape(-1, 3).astype(np.float64)
    residuals = []
    for _, colour, _ in _objects(arrays, i):
      rgb = np.array(RGB[colour], np.float64)
      alpha = np.clip(image @ rgb / (rgb @ rgb), 0, 1)
      residuals.append(np.abs(image - alpha[:, None] * rgb).max(axis=1))
    assert np.min(residuals, axis=0).max() <= 1.0, i
    # The border is background: every object lies inside the image.
    border = np.concatenate(
      [arrays['image'][i, [0, -1]], arrays['image'][i, :, [0, -1]]]
    )
    assert not border.any()


def test_two_objects_stand_in_their_relation():
  arrays = _raw()
  seen = set()
  for i in np.flatnonzero(arrays['num_objects'][:NUM_CHECKED] == 2):
    (_, subject_colour, _), (_, other_colour, _) = _objects(arrays, i)
    centroids = []
    for colour in (subject_colour, other_colour):
      rows, columns = np.nonzero(_exact_pixels(arrays['image'][i], colour))
      centroids.append(np.array([columns.mean(), rows.mean()]))
    dx, dy = centroids[0] - centroids[1]  # Subject minus other, y down.
    relation = shapes.RELATIONS[arrays['relation'][i]]
    along, across = {
      'to the left of': (-dx, dy),
      'to the right of': (dx, dy),
      'above': (-dy, dx),
      'below': (dy, dx),
    }[relation]
    # On the named side, and mostly along that axis.
    assert along > abs(across), (i, relation, dx, dy)
    seen.add(relation)
  assert seen == set(shapes.RELATIONS)


def test_two_objects_differ_in_colour_and_counts_are_mixed():
  arrays = _raw('train')
  two = arrays['num_objects'] == 2
  assert 0.4 < two.mean() < 0.6
  assert np.all(arrays['colour'][two, 0] != arrays['colour'][two, 1])
  for name in ('shape', 'colour', 'size'):
    assert np.all(arrays[name][~two, 1] == shapes.ABSENT)
    assert np.all(arrays[name][two] >= 0)


def test_image_sizes_draw_the_same_scenes():
  small = _raw(image_size=16)
  default = _raw()
  assert small['image'].shape == (1000, 16, 16, 3)
  for name in ('caption', *shapes.ATTRIBUTES):
    np.testing.assert_array_equal(small[name], default[name])
  # The objects are where they are at 32×32, at half the scale: the
  # brightness-weighted centroids (in pixel-centre coordinates) agree.
  for i in range(50):
    centroids = []
    for image in (small['image'][i], default['image'][i]):
      weight = image.sum(axis=-1, dtype=np.float64)
      rows, columns = np.indices(weight.shape) + 0.5
      centroids.append(
        np.array([(columns * weight).sum(), (rows * weight).sum()])
        / weight.sum()
      )
    assert np.abs(centroids[0] - centroids[1] / 2).max() < 0.5


# --------------------------------------------------------------- splits ---


def test_splits_are_fixed():
  # The test split's pixels and captions, pinned: a change to the drawing,
  # the captions or the split seed changes every evaluation.
  test = _raw()
  digest = hashlib.sha256(test['image'].tobytes())
  digest.update('\n'.join(test['caption'].tolist()).encode())
  assert digest.hexdigest()[:16] == '485cfc7854d2b25b'


def test_generation_is_deterministic():
  cached = _raw(image_size=16)
  rng = np.random.default_rng([shapes._SPLIT_SEED, shapes.SPLITS.index('test')])
  again = shapes._generate(rng, shapes.NUM_TEST_EXAMPLES, 16)
  assert cached.keys() == again.keys()
  for name in cached:
    np.testing.assert_array_equal(cached[name], again[name])


def test_splits_are_disjoint():
  train = _raw('train')
  test = _raw()
  assert len(train['image']) == shapes.NUM_TRAIN_EXAMPLES == 20_000
  assert len(test['image']) == shapes.NUM_TEST_EXAMPLES == 1_000
  train_images = {image.tobytes() for image in train['image']}
  assert len(train_images) == len(train['image'])
  assert not train_images & {image.tobytes() for image in test['image']}


def test_info_and_eval_arrays():
  info = data.get_info(_config())
  assert info == data.DatasetInfo(
    name='shapes',
    image_shape=(SIZE, SIZE, 3),
    num_classes=0,
    num_train_examples=20_000,
    max_pixel_value=255,
    has_captions=True,
  )
  assert data.get_info(_config(image_size=None)).image_shape == (32, 32, 3)
  data.check_available(_config())
  assert data.split_size(_config(), 'train') == 20_000
  assert data.split_size(_config(), 'test') == 1_000
  arrays = data.eval_arrays(_config(), split='test', num_examples=10)
  assert arrays.keys() == {'image', 'caption', *shapes.ATTRIBUTES}
  assert arrays['image'].shape == (10, SIZE, SIZE, 3)
  assert arrays['image'].dtype == np.float32
  assert arrays['image'].min() == -1.0 and arrays['image'].max() == 1.0
  assert arrays['caption'].shape == (10,)
  assert arrays['shape'].shape == (10, 2) and arrays['shape'].dtype == np.int32
  np.testing.assert_array_equal(arrays['caption'], _raw()['caption'][:10])
  # Callers may write into what they get without corrupting the cache.
  arrays['shape'][:] = 7
  assert (data.eval_arrays(_config(), split='test')['shape'] < 5).all()


@pytest.mark.parametrize(
  'config, kwargs, match',
  [
    (_config(image_size=48), {}, 'config.data.image_size'),
    (_config(image_size='32'), {}, 'config.data.image_size'),
    (_config(image_size=True), {}, 'config.data.image_size'),
    (_config(random_flip=True), {}, 'random_flip.*left and right'),
    (_config(), dict(split='validation'), 'split'),
    (_config(), dict(num_examples=1001), 'num_examples'),
  ],
)
def test_invalid_config_or_split_raises(config, kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.eval_arrays(config, **dict(dict(split='test'), **kwargs))


# --------------------------------------------------------------- stream ---


def _batches(seed=3, batch_size=3000, **kwargs):
  return data.train_batches(
    _config(), seed=seed, global_batch_size=batch_size, **kwargs
  )


def test_batches_are_train_pairs():
  batch = next(_batches(batch_size=64, process_index=0, process_count=1))
  assert batch.keys() == {'image', 'caption'}
  assert batch['image'].shape == (64, SIZE, SIZE, 3)
  assert batch['image'].dtype == np.uint8
  assert batch['caption'].shape == (64,)
  assert isinstance(batch['caption'][0].item(), str)
  # Each row is a train example with its own caption.
  train = _raw('train')
  caption_of = dict(
    zip(
      (image.tobytes() for image in train['image']),
      train['caption'].tolist(),
      strict=True,
    )
  )
  for image, caption in zip(batch['image'], batch['caption'], strict=True):
    assert caption_of[image.tobytes()] == caption


@pytest.fixture(scope='module')
def fresh():
  """Batches 0–8 of seed 3 with B = 3000: batch 6 holds stream elements
  [18000, 21000), straddling the end of epoch 0 (20 000 examples)."""
  return _take(_batches(process_index=0, process_count=1), 9)


@pytest.mark.parametrize('start_step', [1, 6, 7])
def test_resume_equals_uninterrupted(fresh, start_step):
  resumed = _batches(start_step=start_step, process_index=0, process_count=1)
  _assert_batches_equal(_take(resumed, 9 - start_step), fresh[start_step:])


def test_epochs_are_permutations_of_train_drawn_from_the_seed(fresh):
  stream = np.concatenate([batch['caption'] for batch in fresh])
  train = _raw('train')['caption']
  epoch_0 = stream[: len(train)]
  assert sorted(epoch_0.tolist()) == sorted(train.tolist())
  assert not np.array_equal(epoch_0, train)
  # Epoch 1 starts afresh: another order than epoch 0's.
  assert not np.array_equal(stream[len(train) :], epoch_0[:7000])
  other_seed = next(_batches(seed=4, process_index=0, process_count=1))
  assert not np.array_equal(other_seed['caption'], fresh[0]['caption'])


def test_process_rows_partition_the_global_batch(fresh):
  steps = (0, 6)
  whole = [fresh[step] for step in steps]
  parts = [
    [
      next(_batches(start_step=step, process_index=p, process_count=4))
      for step in steps
    ]
    for p in range(4)
  ]
  for s in range(len(steps)):
    assert parts[0][s]['image'].shape == (750, SIZE, SIZE, 3)
    joined = {
      key: np.concatenate([part[s][key] for part in parts])
      for key in ('image', 'caption')
    }
    _assert_batches_equal([joined], [whole[s]])
