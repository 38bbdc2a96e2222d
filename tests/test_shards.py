"""Tests of the webdataset reader on small shards written here."""

import io
import itertools
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from gdd import data, errors
from gdd.data import shards

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


def _encode(image, file_format='PNG', **options):
  buffer = io.BytesIO()
  image.save(buffer, file_format, **options)
  return buffer.getvalue()


def _picture(i=0, size=(24, 20)):
  return _encode(Image.new('RGB', size, (i % 256, 40, 200)))


def _write_shard(path, members):
  """A tar of (name, bytes) members, in the order given."""
  with tarfile.open(path, 'w') as tar:
    for name, content in members:
      info = tarfile.TarInfo(name)
      info.size = len(content)
      tar.addfile(info, io.BytesIO(content))


def _write_dataset(folder, num_shards, per_shard=PER_SHARD):
  """Shards of pairs captioned 'pair S K' (shard S, key K), written in
  reverse key order, each with a KEY.json to ignore; the captions in index
  order."""
  folder.mkdir(exist_ok=True)
  captions = []
  for s in range(num_shards):
    members = []
    for k in reversed(range(per_shard)):
      key = f'{s:05d}{k:04d}'
      members += [
        (f'{key}.json', b'{}'),
        (f'{key}.txt', f'pair {s} {k}\n'.encode()),
        (f'{key}.jpg', _encode(Image.new('RGB', (20, 30), (k, s, 9)), 'JPEG')),
      ]
    _write_shard(folder / f'{s:05d}.tar', members)
    captions += [f'pair {s} {k}' for k in range(per_shard)]
  return captions


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
  with pytest.raises(ValueError, match="split must be one of \\('train',\\)"):
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
  _write_shard(
    tmp_path / '00000.tar',
    [
      ('a.png', _encode(Image.fromarray(wide))),
      ('a.txt', b'wide'),
      ('b.png', _encode(Image.fromarray(tall))),
      ('b.txt', b'tall'),
      ('c.jpeg', _encode(grey, 'JPEG')),
      ('c.txt', b'grey'),
      ('d.webp', _encode(translucent, 'WEBP', lossless=True)),
      ('d.txt', 'caf\u00e9 \u2603'.encode()),
    ],
  )
  raw = shards.eval_arrays(str(tmp_path), image_size=SIZE, split='train')
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
  _write_shard(tmp_path / '00001.tar', _pair('a') + members)
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
    _write_shard(tmp_path / '00001.tar', members)
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
  _write_shard(tmp_path / '00000.tar', _pair('a') + _pair('b'))
  _write_shard(tmp_path / '00001.tar', pair)
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
