"""Tests of the webdataset reader on small shards written here."""

import itertools
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from gdd import data, errors
from gdd.data import shards
from tests import helpers

SIZE = 16
PER_SHARD = 5


def _config(data_dir, **overrides):
  fields = dict(
    name='webdataset',
    data_dir=None if data_dir is None else str(data_dir),
    random_flip=False,
    image_size=SIZE,
  )
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def _picture(i=0, size=(24, 20)):
  return helpers.encode_image(Image.new('RGB', size, (i % 256, 40, 200)))


def _write_dataset(folder, num_shards, per_shard=PER_SHARD):
  """Shards of pairs captioned 'pair S K' (shard S, key K); the captions
  in index order (`helpers.write_shards`)."""
  return helpers.write_shards(folder, num_shards, per_shard)


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _stream(config, *, num_steps, batch_size, **kwargs):
  batches = _take(
    data.train_batches(config, global_batch_size=batch_size, **kwargs),
    num_steps,
  )
  return batches, np.concatenate([b['caption'] for b in batches]).tolist()


# ------------------------------------------------------- info and order ---


def test_info_counts_the_pairs_of_every_shard(tmp_path):
  _write_dataset(tmp_path, 3)
  config = _config(tmp_path)
  data.check_available(config)
  assert data.get_info(config) == data.DatasetInfo(
    name='webdataset',
    image_shape=(SIZE, SIZE, 3),
    num_classes=0,
    num_train_examples=3 * PER_SHARD,
    max_pixel_value=255,
    has_captions=True,
  )
  assert data.split_size(config, 'train') == 3 * PER_SHARD
  with pytest.raises(ValueError, match="'test' does not exist.*held_out_dir"):
    data.split_size(config, 'test')


def test_eval_arrays_are_the_first_pairs_in_shard_then_key_order(tmp_path):
  captions = _write_dataset(tmp_path, 3)
  arrays = data.eval_arrays(_config(tmp_path), split='train', num_examples=7)
  assert arrays.keys() == {'image', 'caption'}
  # Captions come stripped of the trailing newline.
  assert arrays['caption'].tolist() == captions[:7]
  assert arrays['image'].shape == (7, SIZE, SIZE, 3)
  assert arrays['image'].dtype == np.float32
  assert arrays['image'].min() >= -1 and arrays['image'].max() <= 1
  everything = data.eval_arrays(_config(tmp_path), split='train')
  assert everything['caption'].tolist() == captions
  with pytest.raises(ValueError, match='num_examples'):
    data.eval_arrays(_config(tmp_path), split='train', num_examples=16)


def test_images_are_resized_on_the_shorter_side_and_centre_cropped(tmp_path):
  # Wide and tall pictures whose middle half is green, the rest red and
  # blue: the centre crop keeps only green.
  wide = np.zeros((2 * SIZE, 4 * SIZE, 3), np.uint8)
  wide[:, :SIZE, 0] = wide[:, 3 * SIZE :, 2] = 255
  wide[:, SIZE : 3 * SIZE, 1] = 255
  tall = np.zeros((3 * SIZE, SIZE, 3), np.uint8)
  tall[:SIZE, :, 0] = tall[2 * SIZE :, :, 2] = 255
  tall[SIZE : 2 * SIZE, :, 1] = 255
  grey = Image.new('L', (SIZE // 2, SIZE // 2), 77)
  translucent = Image.new('RGBA', (SIZE, SIZE), (10, 20, 30, 128))
  helpers.write_shard(
    tmp_path / '00000.tar',
    [
      ('a.png', helpers.encode_image(Image.fromarray(wide))),
      ('a.txt', b'wide'),
      ('b.png', helpers.encode_image(Image.fromarray(tall))),
      ('b.txt', b'tall'),
      ('c.jpeg', helpers.encode_image(grey, 'JPEG')),
      ('c.txt', b'grey'),
      ('d.webp', helpers.encode_image(translucent, 'WEBP', lossless=True)),
      ('d.txt', 'caf\u00e9 \u2603'.encode()),
    ],
  )
  raw = shards.eval_arrays(str(tmp_path), image_size=SIZE)
  assert raw['caption'].tolist() == ['wide', 'tall', 'grey', 'café ☃']
  assert raw['image'].shape == (4, SIZE, SIZE, 3)
  assert raw['image'].dtype == np.uint8
  # Bicubic filtering blurs a pixel at the crop's edges; inside, pure green.
  for image in raw['image'][:2]:
    assert (image[1:-1, 1:-1] == [0, 255, 0]).all()
  assert (np.abs(raw['image'][2].astype(int) - 77) <= 2).all()
  # RGBA becomes RGB: the colour kept, the alpha dropped.
  assert (raw['image'][3] == [10, 20, 30]).all()


# --------------------------------------------------------------- stream ---


def test_stream_is_deterministic_epochs_of_permutations(tmp_path):
  captions = _write_dataset(tmp_path, 3)  # 15 pairs, batch 4.
  config = _config(tmp_path)
  kwargs = dict(num_steps=8, batch_size=4, process_index=0, process_count=1)
  batches, stream = _stream(config, seed=1, **kwargs)
  assert batches[0].keys() == {'image', 'caption'}
  assert batches[0]['image'].shape == (4, SIZE, SIZE, 3)
  assert batches[0]['image'].dtype == np.uint8
  assert sorted(stream[:15]) == sorted(captions)
  assert sorted(stream[15:30]) == sorted(captions)
  assert stream[:15] != stream[15:30] and stream[:15] != captions
  assert _stream(config, seed=1, **kwargs)[1] == stream
  assert _stream(config, seed=2, **kwargs)[1] != stream
  # Each row's image is its caption's (the picture of key K in shard S has
  # the colour (K, S, 9), kept by the JPEG to within a few levels).
  for batch in batches:
    for image, caption in zip(batch['image'], batch['caption'], strict=True):
      _, s, k = caption.split()
      assert np.abs(image[SIZE // 2, SIZE // 2] - [int(k), int(s), 9]).max() < 8


@pytest.mark.parametrize('start_step', [1, 3, 4])
def test_resume_equals_uninterrupted(tmp_path, start_step):
  # Process 1 of 2 reads shards 1 and 3: 10 pairs; with its 3 rows a batch,
  # batch 3 holds its stream elements [9, 12), straddling epochs 0 and 1.
  _write_dataset(tmp_path, 4)
  config = _config(tmp_path)
  kwargs = dict(seed=5, batch_size=6, process_index=1, process_count=2)
  fresh, _ = _stream(config, num_steps=7, **kwargs)
  resumed, _ = _stream(
    config, num_steps=7 - start_step, start_step=start_step, **kwargs
  )
  assert len(resumed) == len(fresh[start_step:])
  for a, b in zip(resumed, fresh[start_step:], strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['caption'], b['caption'])


def test_processes_read_disjoint_shards_that_cover_the_data(tmp_path):
  captions = _write_dataset(tmp_path, 5)
  seen = []
  for p in range(2):
    # Process 0 reads shards 0, 2, 4 (15 pairs); process 1 shards 1, 3 (10).
    shard_ids = range(p, 5, 2)
    mine = [c for c in captions if int(c.split()[1]) in shard_ids]
    batches, stream = _stream(
      _config(tmp_path),
      num_steps=len(mine),
      batch_size=2,
      seed=0,
      process_index=p,
      process_count=2,
    )
    assert batches[0]['image'].shape == (1, SIZE, SIZE, 3)
    assert sorted(stream) == sorted(mine)
    seen += stream
  assert sorted(seen) == sorted(captions)


def test_each_shard_is_indexed_once_and_read_by_offset(tmp_path, monkeypatch):
  _write_dataset(tmp_path, 2)
  opened = []
  open_tar = tarfile.open

  def counting_open(*args, **kwargs):
    opened.append(kwargs['fileobj'].name)
    return open_tar(*args, **kwargs)

  def refuse(*args, **kwargs):
    raise AssertionError('members must be read by offset')

  monkeypatch.setattr(tarfile, 'open', counting_open)
  monkeypatch.setattr(tarfile.TarFile, 'extractfile', refuse)
  monkeypatch.setattr(tarfile.TarFile, 'extractall', refuse)
  config = _config(tmp_path)
  data.check_available(config)
  data.get_info(config)
  _stream(
    config, num_steps=3, batch_size=4, seed=0, process_index=0, process_count=1
  )
  data.eval_arrays(config, split='train')
  assert sorted(opened) == [
    str(tmp_path / '00000.tar'),
    str(tmp_path / '00001.tar'),
  ]


# ------------------------------------------------------------- held out ---


def test_held_out_dir_is_the_test_split_and_never_trained_on(tmp_path):
  captions = _write_dataset(tmp_path / 'train', 2)
  held_out = helpers.write_shards(
    tmp_path / 'held_out', 2, 3, caption=lambda s, k: f'held {s} {k}'
  )
  config = _config(tmp_path / 'train', held_out_dir=str(tmp_path / 'held_out'))
  data.check_available(config)
  assert data.held_out_split(config) == 'test'
  assert data.get_info(config).num_train_examples == 2 * PER_SHARD
  assert data.split_size(config, 'test') == 6
  test = data.eval_arrays(config, split='test')
  assert test['caption'].tolist() == held_out
  assert test['image'].shape == (6, SIZE, SIZE, 3)
  # Captions span shards, and a count beyond the split gives all of them.
  assert data.held_out_captions(config, 4) == tuple(held_out[:4])
  assert data.held_out_captions(config, 100) == tuple(held_out)
  # One epoch: the 10 training pairs, none held out.
  _, stream = _stream(
    config, num_steps=2, batch_size=5, seed=0, process_index=0, process_count=1
  )
  assert sorted(stream) == sorted(captions)
  # Without a held-out folder the first training pairs stand in.
  config.held_out_dir = None
  assert data.held_out_split(config) == 'train'
  assert data.held_out_captions(config, 3) == tuple(captions[:3])


def test_held_out_captions_are_read_without_their_images(tmp_path):
  _write_dataset(tmp_path / 'train', 1)
  (tmp_path / 'held_out').mkdir()
  helpers.write_shard(
    tmp_path / 'held_out' / '00000.tar',
    _pair('a', image=b'not a picture', caption=b'held out a')
    + _pair('b', image=b'not a picture', caption=b'held out b'),
  )
  config = _config(tmp_path / 'train', held_out_dir=str(tmp_path / 'held_out'))
  assert data.held_out_captions(config, 2) == ('held out a', 'held out b')
  with pytest.raises(shards.ShardError, match='cannot decode the image'):
    data.eval_arrays(config, split='test')


@pytest.mark.parametrize(
  'layout, error, match',
  [
    ('missing', data.DatasetNotFoundError, 'config.data.held_out_dir='),
    ('unpaired', shards.ShardError, 'has no caption'),
  ],
)
def test_a_bad_held_out_folder_fails_the_availability_check(
  tmp_path, layout, error, match
):
  _write_dataset(tmp_path / 'train', 1)
  folder = tmp_path / 'held_out'
  if layout == 'unpaired':
    folder.mkdir()
    helpers.write_shard(folder / '00000.tar', _pair('x')[:1])
  config = _config(tmp_path / 'train', held_out_dir=str(folder))
  with helpers.raises_user_error(error, match) as info:
    data.check_available(config)
  assert str(folder) in str(info.value)


# --------------------------------------------------------------- errors ---


def _pair(key='x', image=None, caption=b'a caption'):
  return [(f'{key}.jpg', image or _picture()), (f'{key}.txt', caption)]


@pytest.mark.parametrize(
  'members, member, match',
  [
    (_pair()[:1], 'x.jpg', 'no caption x.txt'),
    (_pair()[1:], 'x.txt', 'no image'),
    (_pair(caption=b''), 'x.txt', 'caption is empty'),
    (_pair() + [('x.png', _picture())], 'x.png', 'already has the image'),
  ],
)
def test_unpaired_or_empty_members_fail_the_index(
  tmp_path, members, member, match
):
  _write_dataset(tmp_path, 1)
  helpers.write_shard(tmp_path / '00001.tar', _pair('a') + members)
  with pytest.raises(shards.ShardError, match=match) as error:
    data.check_available(_config(tmp_path))
  assert isinstance(error.value, errors.UserError)
  assert f"member '{member}'" in str(error.value)
  assert '00001.tar' in str(error.value)


@pytest.mark.parametrize(
  'members, match',
  [
    ([('x.json', b'{}')], 'holds no image–caption pair'),
    (None, 'not a readable uncompressed tar'),
  ],
)
def test_a_shard_without_pairs_fails_the_index(tmp_path, members, match):
  _write_dataset(tmp_path, 1)
  if members is None:
    (tmp_path / '00001.tar').write_bytes(b'not a tar at all' * 100)
  else:
    helpers.write_shard(tmp_path / '00001.tar', members)
  with pytest.raises(shards.ShardError, match=match) as error:
    data.get_info(_config(tmp_path))
  assert '00001.tar' in str(error.value)


_GOOD = _picture()


@pytest.mark.parametrize(
  'pair, member, match',
  [
    (_pair(caption=b' \n'), 'x.txt', 'caption is blank'),
    (_pair(caption=b'caf\xe9'), 'x.txt', 'caption is not UTF-8'),
    (_pair(image=b'not a picture'), 'x.jpg', 'cannot decode the image'),
    (_pair(image=_GOOD[: len(_GOOD) // 2]), 'x.jpg', 'cannot decode'),
  ],
)
def test_undecodable_members_fail_when_read(tmp_path, pair, member, match):
  # Shard 0 holds the good pairs 'a' and 'b', shard 1 the bad 'x'.
  helpers.write_shard(tmp_path / '00000.tar', _pair('a') + _pair('b'))
  helpers.write_shard(tmp_path / '00001.tar', pair)
  config = _config(tmp_path)
  data.check_available(config)
  data.eval_arrays(config, split='train', num_examples=2)
  with pytest.raises(shards.ShardError, match=match) as error:
    data.eval_arrays(config, split='train')
  assert f"member '{member}'" in str(error.value)
  assert '00001.tar' in str(error.value)
  batches = data.train_batches(
    config, seed=0, global_batch_size=3, process_index=0, process_count=1
  )
  with pytest.raises(shards.ShardError, match=match):
    next(batches)


@pytest.mark.parametrize('layout', ['missing', 'empty', 'no_tar', 'unset'])
def test_a_folder_without_shards_is_not_found(tmp_path, layout):
  folder = tmp_path / 'shards'
  if layout != 'missing':
    folder.mkdir()
  if layout == 'no_tar':
    (folder / '00000.tar.gz').write_bytes(b'')
  config = _config(None if layout == 'unset' else folder)
  for call in (data.check_available, data.get_info):
    with pytest.raises(data.DatasetNotFoundError) as error:
      call(config)
    assert isinstance(error.value, errors.UserError)
    assert ('unset' if layout == 'unset' else str(folder)) in str(error.value)


def test_fewer_shards_than_processes_fails_on_the_process_without(tmp_path):
  _write_dataset(tmp_path, 2)
  config = _config(tmp_path)
  kwargs = dict(seed=0, global_batch_size=3, process_count=3)
  for p in range(2):
    next(data.train_batches(config, process_index=p, **kwargs))
  with pytest.raises(shards.ShardError, match='holds 2 shard') as error:
    data.train_batches(config, process_index=2, **kwargs)
  assert 'process 2 of 3' in str(error.value)
  assert 'at least 3 shards' in str(error.value)


@pytest.mark.parametrize(
  'overrides, match',
  [
    (dict(random_flip=True), 'random_flip.*left or right'),
    (dict(image_size=0), 'config.data.image_size'),
    (dict(image_size=16.0), 'config.data.image_size'),
  ],
)
def test_invalid_config_raises(tmp_path, overrides, match):
  _write_dataset(tmp_path, 1)
  with pytest.raises(ValueError, match=match):
    data.check_available(_config(tmp_path, **overrides))
