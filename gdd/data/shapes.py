"""Shapes: an embedded captioned data set of coloured shapes (no download).

Each RGB image shows one or two objects on a black background (CSS black,
#000000). An object is one of `SHAPES` in one of `COLOURS`, drawn with its
exact CSS value, and one of `SIZES`. An image with two objects relates the
first (the caption's subject) to the second by one of `RELATIONS`; an image
with one object has no position word, its object lies anywhere it fits. The
two objects of an image always differ in colour, so each is told apart by its
colour alone. Captions are lower-case words from `VOCABULARY`, made by
`caption` from the attributes and one of `TEMPLATES` (which only rephrases:
every caption names every attribute), e.g. 'a large blue square above a
small yellow triangle' or 'a picture of a small red circle'.

Geometry, in fractions of the image side so that an example is the same
scene at every size in `IMAGE_SIZES`: an object's box has half-side 1/8
(small) or 1/5 (large) and keeps 1/32 from the border. Two objects lie in
disjoint intervals along their relation's axis, at least 1/16 apart, and
across it the second is within half their distance along it of the first: the
relation holds between the boxes, hence between the objects, and its axis
dominates. Edges are anti-aliased (coverage from a distance field); pixels
inside an object hold its exact colour, and no pixel mixes two objects.

At 16×16 a small object is 4 pixels wide, too few to draw every shape
clearly; gdd.data's default image_size is 32.

Splits 'train' (20 000 images) and 'test' (1 000) are generated once per
process and image size from a fixed seed, independent of the run's seed (in
about 1 s at 32×32, 5 s at 64×64, numpy on one core). The training stream is
`gdd.data.common`'s.
"""

import functools
from collections.abc import Iterator, Sequence

import numpy as np

from gdd import checks
from gdd.data import common

IMAGE_SIZES = (16, 32, 64)
MAX_PIXEL_VALUE = 255
NUM_TRAIN_EXAMPLES = 20_000
NUM_TEST_EXAMPLES = 1_000
SPLITS = ('train', 'test')

SHAPES = ('circle', 'square', 'triangle', 'diamond', 'cross')
# (CSS name, CSS value): the name in the captions, the value in the pixels.
COLOURS = (
  ('red', '#ff0000'),
  ('orange', '#ffa500'),
  ('yellow', '#ffff00'),
  ('green', '#008000'),
  ('cyan', '#00ffff'),
  ('blue', '#0000ff'),
  ('magenta', '#ff00ff'),
  ('white', '#ffffff'),
)
SIZES = ('small', 'large')
# Where the first object (the caption's subject) lies relative to the
# second: along x for indices 0 and 1, along y for 2 and 3; at the smaller
# coordinate (left, top) for even indices.
RELATIONS = ('to the left of', 'to the right of', 'above', 'below')
TEMPLATES = (
  'a {objects}',
  'a picture of a {objects}',
  'a {objects} on a black background',
)
# Per-image int32 arrays: num_objects and relation [N]; shape, colour and
# size [N, 2] (one column per object); template [N] (the phrasing only, not
# in the pixels). ABSENT fills the second object's columns and the relation
# of a one-object image.
ATTRIBUTES = ('num_objects', 'shape', 'colour', 'size', 'relation', 'template')
ABSENT = -1

VOCABULARY = tuple(
  sorted(
    {
      word
      for phrase in (
        *SHAPES,
        *(name for name, _ in COLOURS),
        *SIZES,
        *RELATIONS,
        *TEMPLATES,
      )
      for word in phrase.replace('{objects}', '').split()
    }
  )
)

# Seed of the generated splits only; deliberately not the config seed.
_SPLIT_SEED = 0
_HALF_SIDE = (1 / 8, 1 / 5)  # Of an object's box, per size.
_MARGIN = 1 / 32
_GAP = 1 / 16
_ACROSS_SLOPE = 1 / 2
_RENDER_CHUNK = 1024  # Images rendered at once; bounds the float buffers.
_RGB = np.array(
  [[int(value[i : i + 2], 16) for i in (1, 3, 5)] for _, value in COLOURS],
  np.float32,
)


def _check_index(name: str, value: int, values: Sequence) -> None:
  if not 0 <= value < len(values):
    raise ValueError(
      f'{name} must be an index in [0, {len(values)}), got {value!r}.'
    )


def _describe(shape: int, colour: int, size: int) -> str:
  """'small red circle' for one object, checking its indices."""
  _check_index('shape', shape, SHAPES)
  _check_index('colour', colour, COLOURS)
  _check_index('size', size, SIZES)
  return f'{SIZES[size]} {COLOURS[colour][0]} {SHAPES[shape]}'


def caption(
  *,
  num_objects: int,
  shape: Sequence[int],
  colour: Sequence[int],
  size: Sequence[int],
  relation: int,
  template: int = 0,
) -> str:
  """The caption of one image's attributes (see `ATTRIBUTES`).

  shape, colour and size hold one index per object; for one object their
  second entries and the relation are ignored. E.g. to caption the
  attributes a classifier predicts, to compare them with the prompt's.

  Raises:
    ValueError: num_objects is not 1 or 2, or an index used is out of range.
  """
  if num_objects not in (1, 2):
    raise ValueError(f'num_objects must be 1 or 2, got {num_objects!r}.')
  _check_index('template', template, TEMPLATES)
  objects = _describe(shape[0], colour[0], size[0])
  if num_objects == 2:
    _check_index('relation', relation, RELATIONS)
    second = _describe(shape[1], colour[1], size[1])
    objects = f'{objects} {RELATIONS[relation]} a {second}'
  return TEMPLATES[template].format(objects=objects)


def captions(attributes: dict[str, np.ndarray]) -> np.ndarray:
  """`caption` of every row of per-image attribute arrays, as str [N]."""
  rows = zip(*(attributes[name].tolist() for name in ATTRIBUTES), strict=True)
  return np.array(
    [caption(**dict(zip(ATTRIBUTES, row, strict=True))) for row in rows],
    dtype=np.str_,
  )


def _sample_attributes(
  rng: np.random.Generator, num: int
) -> dict[str, np.ndarray]:
  """Independent uniform attributes, the two colours of an image distinct."""
  num_objects = rng.integers(1, 3, num)
  first_colour = rng.integers(0, len(COLOURS), num)
  offset = rng.integers(1, len(COLOURS), num)
  attributes = {
    'num_objects': num_objects,
    'shape': rng.integers(0, len(SHAPES), (num, 2)),
    'colour': np.stack(
      [first_colour, (first_colour + offset) % len(COLOURS)], axis=1
    ),
    'size': rng.integers(0, len(SIZES), (num, 2)),
    'relation': rng.integers(0, len(RELATIONS), num),
    'template': rng.integers(0, len(TEMPLATES), num),
  }
  single = num_objects == 1
  for name in ('shape', 'colour', 'size'):
    attributes[name][single, 1] = ABSENT
  attributes['relation'][single] = ABSENT
  return {name: value.astype(np.int32) for name, value in attributes.items()}


def _pair_centres(
  half: np.ndarray, relation: np.ndarray, uniform: np.ndarray
) -> np.ndarray:
  """Centres [N, 2, (x, y)] of two objects in `relation`, see the docstring.

  half: [N, 2] half-sides; uniform: [N, 4] draws in [0, 1).
  """
  # The subject is the object near the origin of the axis (left or above).
  subject_near = relation % 2 == 0
  near_half = np.where(subject_near, half[:, 0], half[:, 1])
  far_half = np.where(subject_near, half[:, 1], half[:, 0])
  # Slack along the axis, split at two sorted uniform points: before, between
  # and after the two boxes.
  slack = 1 - 2 * _MARGIN - 2 * near_half - 2 * far_half - _GAP
  low, high = np.sort(uniform[:, :2], axis=1).T
  near = _MARGIN + low * slack + near_half
  far = _MARGIN + high * slack + 2 * near_half + _GAP + far_half
  along = np.where(subject_near, [near, far], [far, near]).T
  # Across the axis: the subject anywhere it fits, the other object within
  # _ACROSS_SLOPE times their distance along the axis of it.
  reach = _ACROSS_SLOPE * (far - near)
  subject_low = _MARGIN + half[:, 0]
  subject = subject_low + uniform[:, 2] * (1 - 2 * subject_low)
  other_low = np.maximum(_MARGIN + half[:, 1], subject - reach)
  other_high = np.minimum(1 - _MARGIN - half[:, 1], subject + reach)
  other = other_low + uniform[:, 3] * (other_high - other_low)
  across = np.stack([subject, other], axis=1)
  horizontal = (relation < 2)[:, None, None]
  return np.where(
    horizontal,
    np.stack([along, across], axis=2),
    np.stack([across, along], axis=2),
  )


def _sample_centres(
  rng: np.random.Generator, attributes: dict[str, np.ndarray]
) -> np.ndarray:
  """Object centres [N, 2, (x, y)] as fractions of the image side."""
  # An absent object's half-side and centre are drawn but never rendered.
  half = np.asarray(_HALF_SIDE)[np.maximum(attributes['size'], 0)]
  uniform = rng.random((len(half), 4))
  low = _MARGIN + half[:, :1]
  single = low + uniform[:, :2] * (1 - 2 * low)
  pair = _pair_centres(half, np.maximum(attributes['relation'], 0), uniform)
  is_single = (attributes['num_objects'] == 1)[:, None, None]
  return np.where(is_single, np.stack([single, single], axis=1), pair)


def _rectangle(
  dx: np.ndarray, dy: np.ndarray, half_x: np.ndarray, half_y: np.ndarray
) -> np.ndarray:
  """Signed distance (exact inside, Chebyshev outside) to a rectangle."""
  return np.maximum(np.abs(dx) - half_x, np.abs(dy) - half_y)


def _distance(
  shape: str, dx: np.ndarray, dy: np.ndarray, half: np.ndarray
) -> np.ndarray:
  """Signed distance in pixels to a shape with box half-side `half` at dx =
  dy = 0: exact inside; outside, a bound no less than the distance to the
  box, so that anti-aliased edges reach at most half a pixel beyond it."""
  if shape == 'circle':
    # Not np.hypot: sqrt is correctly rounded, so images are the same bits
    # on every platform.
    distance = np.sqrt(dx * dx + dy * dy) - half
  elif shape == 'square':
    distance = _rectangle(dx, dy, 0.85 * half, 0.85 * half)
  elif shape == 'triangle':  # Apex up, base along the box's bottom side.
    slanted = (2 * np.abs(dx) - dy - half) / np.sqrt(np.float32(5))
    distance = np.maximum(dy - half, slanted)
  elif shape == 'diamond':
    distance = (np.abs(dx) + np.abs(dy) - half) / np.sqrt(np.float32(2))
  else:  # Cross: arms a third of the box's half-side thick.
    arm = half / 3
    distance = np.minimum(
      _rectangle(dx, dy, half, arm), _rectangle(dx, dy, arm, half)
    )
  return np.maximum(distance, _rectangle(dx, dy, half, half))


def _render_chunk(
  attributes: dict[str, np.ndarray], centres: np.ndarray, image_size: int
) -> np.ndarray:
  """uint8 [N, S, S, 3] images of objects at `centres` (fractions of S)."""
  pixel = np.arange(image_size, dtype=np.float32) + 0.5
  centres = centres.astype(np.float32) * image_size
  half_sides = np.asarray(_HALF_SIDE, np.float32) * image_size
  coverages, colours = [], []
  for slot in range(2):
    # Coverage of each pixel by the slot's object, from its centre's
    # distance; zero where the slot is empty.
    coverage = np.zeros((len(centres), image_size, image_size), np.float32)
    for index, shape in enumerate(SHAPES):
      rows = np.flatnonzero(attributes['shape'][:, slot] == index)
      half = half_sides[attributes['size'][rows, slot]][:, None, None]
      dx = pixel[None, None, :] - centres[rows, slot, 0, None, None]
      dy = pixel[None, :, None] - centres[rows, slot, 1, None, None]
      coverage[rows] = np.clip(0.5 - _distance(shape, dx, dy, half), 0, 1)
    coverages.append(coverage)
    # An empty slot's colour index (ABSENT) picks a colour it never shows.
    colours.append(_RGB[attributes['colour'][:, slot]])
  images = np.empty((*coverages[0].shape, 3), np.uint8)
  for channel in range(3):  # Channel by channel: contiguous, 4× faster.
    images[..., channel] = np.rint(
      sum(
        coverage * colour[:, channel, None, None]
        for coverage, colour in zip(coverages, colours, strict=True)
      )
    )
  return images


def _generate(
  rng: np.random.Generator, num: int, image_size: int
) -> dict[str, np.ndarray]:
  """`num` examples: images, captions and attributes."""
  attributes = _sample_attributes(rng, num)
  centres = _sample_centres(rng, attributes)
  images = np.empty((num, image_size, image_size, 3), np.uint8)
  for start in range(0, num, _RENDER_CHUNK):
    rows = slice(start, start + _RENDER_CHUNK)
    images[rows] = _render_chunk(
      {name: value[rows] for name, value in attributes.items()},
      centres[rows],
      image_size,
    )
  return {'image': images, 'caption': captions(attributes), **attributes}


@functools.cache
def _load_splits(image_size: int) -> dict[str, dict[str, np.ndarray]]:
  """Generates both splits once per process and size (read-only)."""
  splits = {}
  for index, split in enumerate(SPLITS):
    rng = np.random.default_rng([_SPLIT_SEED, index])
    arrays = _generate(rng, split_size(split), image_size)
    for array in arrays.values():
      # The cache hands out the same arrays to every caller; nobody may edit.
      array.flags.writeable = False
    splits[split] = arrays
  return splits


def _check_image_size(image_size: int) -> None:
  """Raises ValueError unless image_size is one of `IMAGE_SIZES`."""
  if not checks.is_int(image_size, allow_numpy=True) or (
    image_size not in IMAGE_SIZES
  ):
    raise ValueError(
      f'shapes image_size must be one of {IMAGE_SIZES}, got {image_size!r}.'
    )


def split_size(split: str) -> int:
  if split not in SPLITS:
    raise ValueError(f'shapes split must be one of {SPLITS}, got {split!r}.')
  return NUM_TRAIN_EXAMPLES if split == 'train' else NUM_TEST_EXAMPLES


def eval_arrays(
  *, image_size: int, split: str, num_examples: int | None = None
) -> dict[str, np.ndarray]:
  """The first `num_examples` (all if None) of a split, in the fixed order:
  raw pixels, captions and the `ATTRIBUTES` arrays."""
  _check_image_size(image_size)
  split_size(split)  # Checks the split.
  return common.prefix(
    _load_splits(image_size)[split], num_examples, f'shapes split {split!r}'
  )


def train_batches(
  *,
  image_size: int,
  seed: int,
  global_batch_size: int,
  start_step: int,
  process_index: int,
  process_count: int,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of global batches start_step, start_step + 1, …:
  {'image': uint8 [B / P, S, S, 3], 'caption': str [B / P]}.

  Arguments are validated by `gdd.data.train_batches`.
  """
  _check_image_size(image_size)
  train = _load_splits(image_size)['train']
  for idx in common.batch_indices(
    num_examples=NUM_TRAIN_EXAMPLES,
    seed=seed,
    global_batch_size=global_batch_size,
    start_step=start_step,
    process_index=process_index,
    process_count=process_count,
  ):
    yield {'image': train['image'][idx], 'caption': train['caption'][idx]}
