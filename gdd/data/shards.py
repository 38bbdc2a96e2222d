"""Image–caption pairs in webdataset tar shards, as img2dataset writes them.

A folder (config.data.data_dir) holds shards `00000.tar`, `00001.tar`, … (any
`*.tar`, sorted by name; shard i is the i-th). A shard is an uncompressed tar
whose members `KEY.EXT` group into examples by KEY (the member's path up to
the first dot of its file name, as webdataset does): each example is one
image (`IMAGE_EXTENSIONS`) and its UTF-8 caption `KEY.txt`. Other members
(KEY.json, …) are ignored.

Each shard is indexed once per process (member offsets from the tar headers,
cached by path, size and modification time), checking that images and
captions pair up; the pairs are ordered by shard, then key. Members are then
read by offset, never by extracting a tar. A caption is read, and an image
decoded, when its example is: then a caption that is not UTF-8 or blank, or
an image Pillow cannot decode, is an error that names the shard and member.

Process p of P reads only the shards i with i % P == p, its own examples;
its training stream is `gdd.data.common`'s over them with its B / P rows per
batch, so each process sees every one of its examples once per epoch and a
resumed run the batches of an uninterrupted one. Images are decoded with
Pillow (in threads: Pillow releases the GIL), turned by their EXIF
orientation, converted to RGB (alpha dropped), resized (bicubic) so that the
shorter side is image_size and centre-cropped to a square, as uint8. A JPEG
is decoded at the smallest DCT scale that keeps the shorter side at least
image_size, several times faster for large pictures.

A folder's fixed evaluation arrays are its first pairs in index order:
shard 0's by key, then shard 1's, …. `gdd.data` reads the training split
from config.data.data_dir and a held-out split, if any, from its own folder
(config.data.held_out_dir). The index keeps about 150 bytes per pair in
memory.
"""

import concurrent.futures
import dataclasses
import functools
import io
import os
import posixpath
import tarfile
from collections.abc import Iterator, Sequence

import numpy as np
from etils import epath
from PIL import Image, ImageOps

from gdd import errors, paths
from gdd.data import common

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')
CAPTION_EXTENSION = 'txt'
MAX_PIXEL_VALUE = 255


class ShardError(errors.UserError, ValueError):
  """A shard's members are no valid image–caption pairs, or the shards do
  not go round the processes."""


@dataclasses.dataclass(frozen=True)
class _Shard:
  """The pairs of one shard, sorted by key."""

  path: epath.Path
  image_names: tuple[str, ...]
  caption_names: tuple[str, ...]
  # [pairs, 4] int64: image offset, image size, caption offset, caption size.
  offsets: np.ndarray


def shard_paths(folder: str | None, key: str = 'data_dir') -> list[epath.Path]:
  """The `*.tar` files of `folder` (config.data.`key`), sorted by name.

  Raises:
    common.DatasetNotFoundError: the folder is unset, not a folder, or holds
      no .tar file; the message names config.data.`key`.
  """
  setting = f'config.data.{key}'
  if folder is None:
    raise common.DatasetNotFoundError(
      f"{setting} must be the folder of .tar shards for 'webdataset' "
      '(00000.tar, 00001.tar, … as img2dataset writes them); it is unset.'
    )
  path = paths.resolve(folder)
  if not path.is_dir():
    raise common.DatasetNotFoundError(
      f'webdataset {setting}={os.fspath(path)!r} does not exist or is not '
      f'a folder. Set {setting} to the folder that holds the .tar shards.'
    )
  shards = sorted(path.glob('*.tar'))
  if not shards:
    raise common.DatasetNotFoundError(
      f'webdataset {setting}={os.fspath(path)!r} holds no .tar shard. Set '
      f'{setting} to the folder of the shards (00000.tar, …), e.g. the '
      'output folder of img2dataset --output_format webdataset.'
    )
  return shards


def _where(path: epath.Path, member: str) -> str:
  return f'shard {os.fspath(path)!r}, member {member!r}'


def _key_and_extension(name: str) -> tuple[str, str]:
  """A member's example key and lower-case extension, split as webdataset
  does: at the first dot of the file name."""
  folder, file_name = posixpath.split(name)
  stem, _, extension = file_name.partition('.')
  return posixpath.join(folder, stem), extension.lower()


def _scan(
  path: epath.Path,
) -> tuple[dict[str, tarfile.TarInfo], dict[str, tarfile.TarInfo]]:
  """A shard's image and caption members by key, from its headers only."""
  members = {'image': {}, 'caption': {}}
  try:
    with path.open('rb') as file, tarfile.open(fileobj=file, mode='r:') as tar:
      for member in tar:
        if not member.isfile():
          continue
        key, extension = _key_and_extension(member.name)
        if extension in IMAGE_EXTENSIONS:
          kind = 'image'
        elif extension == CAPTION_EXTENSION:
          kind = 'caption'
        else:
          continue
        if key in members[kind]:
          raise ShardError(
            f'{_where(path, member.name)}: example {key!r} already has the '
            f'{kind} {members[kind][key].name!r}. Keep one {kind} per key.'
          )
        members[kind][key] = member
  except tarfile.TarError as error:
    raise ShardError(
      f'shard {os.fspath(path)!r} is not a readable uncompressed tar '
      f'({error}). Rewrite it as a plain .tar (webdataset layout).'
    ) from error
  return members['image'], members['caption']


def _check_pairs(
  path: epath.Path,
  images: dict[str, tarfile.TarInfo],
  captions: dict[str, tarfile.TarInfo],
) -> None:
  """Raises ShardError unless images and captions pair up, none empty."""
  without_caption = images.keys() - captions.keys()
  if without_caption:
    key = min(without_caption)
    raise ShardError(
      f'{_where(path, images[key].name)}: the image has no caption '
      f'{key}.{CAPTION_EXTENSION} in its shard. Add the caption or remove '
      'the image.'
    )
  without_image = captions.keys() - images.keys()
  if without_image:
    key = min(without_image)
    raise ShardError(
      f'{_where(path, captions[key].name)}: the caption has no image '
      f'({", ".join(f"{key}.{e}" for e in IMAGE_EXTENSIONS)}) in its shard. '
      'Add the image or remove the caption.'
    )
  if not images:
    raise ShardError(
      f'shard {os.fspath(path)!r} holds no image–caption pair (KEY.jpg, '
      f'.jpeg, .png or .webp with KEY.{CAPTION_EXTENSION}). Remove it from '
      'the data_dir.'
    )
  empty = sorted(key for key, member in captions.items() if member.size == 0)
  if empty:
    raise ShardError(
      f'{_where(path, captions[empty[0]].name)}: the caption is empty. Write '
      'the caption or remove the pair.'
    )


@functools.cache
def _cached_index(path: str, length: int, mtime: float) -> _Shard:
  """The index of a shard; the file's length and mtime key the cache."""
  del length, mtime
  shard_path = epath.Path(path)
  images, captions = _scan(shard_path)
  _check_pairs(shard_path, images, captions)
  keys = sorted(images)
  return _Shard(
    path=shard_path,
    image_names=tuple(images[key].name for key in keys),
    caption_names=tuple(captions[key].name for key in keys),
    offsets=np.array(
      [
        [
          images[key].offset_data,
          images[key].size,
          captions[key].offset_data,
          captions[key].size,
        ]
        for key in keys
      ],
      np.int64,
    ),
  )


def _index(path: epath.Path) -> _Shard:
  """The pairs of a shard, indexed once per process (until it changes).

  Raises:
    ShardError: the shard is not a tar, or its members do not pair up.
  """
  stat = path.stat()
  return _cached_index(os.fspath(path), stat.length, stat.mtime)


def num_pairs(folder: str | None, key: str = 'data_dir') -> int:
  """Pairs in all shards of `folder`; indexes (so checks) every shard.

  Raises:
    common.DatasetNotFoundError: no shard in the folder (config.data.`key`).
    ShardError: a shard's members do not pair up.
  """
  return sum(len(_index(path).offsets) for path in shard_paths(folder, key))


def _read(path: epath.Path, offset: int, size: int) -> bytes:
  """`size` bytes of a shard from `offset`: one member, random access."""
  with path.open('rb') as file:
    file.seek(offset)
    return file.read(size)


def _decode_caption(data: bytes, where: str) -> str:
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError as error:
    raise ShardError(
      f'{where}: the caption is not UTF-8 ({error.reason} at byte '
      f'{error.start}). Re-encode it as UTF-8.'
    ) from error
  if not text.strip():
    raise ShardError(
      f'{where}: the caption is blank. Write the caption or remove the pair.'
    )
  return text.strip()


def _decode_image(data: bytes, image_size: int, where: str) -> np.ndarray:
  """uint8 [S, S, 3]: the image resized (shorter side S) and centre-cropped."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      # A JPEG is decoded at the smallest DCT scale still at least S on its
      # shorter side: several times faster for large images.
      image.draft('RGB', (image_size, image_size))
      image = ImageOps.exif_transpose(image).convert('RGB')
  except (OSError, ValueError, Image.DecompressionBombError) as error:
    raise ShardError(
      f'{where}: Pillow cannot decode the image ({errors.first_line(error)}).'
      ' Re-encode it or remove the pair.'
    ) from error
  width, height = image.size
  scale = image_size / min(width, height)
  size = (
    max(image_size, round(width * scale)),
    max(image_size, round(height * scale)),
  )
  image = image.resize(size, Image.Resampling.BICUBIC)
  left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
  return np.asarray(
    image.crop((left, top, left + image_size, top + image_size))
  )


def _example(
  shard: _Shard, row: int, image_size: int
) -> tuple[np.ndarray, str]:
  """The image and caption of a shard's row."""
  offsets = shard.offsets[row].tolist()
  image_offset, image_bytes, caption_offset, caption_bytes = offsets
  caption = _decode_caption(
    _read(shard.path, caption_offset, caption_bytes),
    _where(shard.path, shard.caption_names[row]),
  )
  image = _decode_image(
    _read(shard.path, image_offset, image_bytes),
    image_size,
    _where(shard.path, shard.image_names[row]),
  )
  return image, caption


def _read_examples(
  shards: Sequence[_Shard],
  indices: np.ndarray,
  image_size: int,
  pool: concurrent.futures.Executor,
) -> dict[str, np.ndarray]:
  """{'image': uint8 [N, S, S, 3], 'caption': str [N]} of the examples at
  `indices` into the pairs of `shards` in order (decoded in `pool`)."""
  starts = np.cumsum([0] + [len(shard.offsets) for shard in shards])
  shard_ids = np.searchsorted(starts, indices, side='right') - 1
  rows = indices - starts[shard_ids]
  examples = list(
    pool.map(
      lambda shard_id, row: _example(shards[shard_id], row, image_size),
      shard_ids.tolist(),
      rows.tolist(),
    )
  )
  return {
    'image': np.stack([image for image, _ in examples]),
    'caption': np.array([caption for _, caption in examples], np.str_),
  }


def _pool() -> concurrent.futures.ThreadPoolExecutor:
  # Pillow releases the GIL while it decodes, so threads decode in parallel.
  return concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1))


def _process_shards(
  data_dir: str | None, process_index: int, process_count: int
) -> list[_Shard]:
  """The indexed shards i with i % process_count == process_index.

  Raises:
    ShardError: there are fewer shards than processes, or a shard of this
      process does not index.
  """
  all_paths = shard_paths(data_dir)
  mine = all_paths[process_index::process_count]
  if not mine:
    raise ShardError(
      f'webdataset data_dir {data_dir!r} holds {len(all_paths)} shard(s), '
      f'but process {process_index} of {process_count} has none: each '
      'process reads its own shards (shard i goes to process i % '
      f'{process_count}). Write the data as at least {process_count} '
      'shards (img2dataset: a smaller --number_sample_per_shard).'
    )
  return [_index(path) for path in mine]


def train_batches(
  data_dir: str | None,
  *,
  image_size: int,
  seed: int,
  global_batch_size: int,
  start_step: int,
  process_index: int,
  process_count: int,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's B / P rows of global batches start_step, …, from its own
  shards: {'image': uint8 [B / P, S, S, 3], 'caption': str [B / P]}.

  Indexes this process's shards before it returns, so that a bad shard
  fails before training starts. Arguments are validated by
  `gdd.data.train_batches`.
  """
  shards = _process_shards(data_dir, process_index, process_count)
  return _batches(
    shards,
    image_size=image_size,
    seed=seed,
    local_batch_size=global_batch_size // process_count,
    start_step=start_step,
  )


def _batches(
  shards: list[_Shard],
  *,
  image_size: int,
  seed: int,
  local_batch_size: int,
  start_step: int,
) -> Iterator[dict[str, np.ndarray]]:
  with _pool() as pool:
    # The process's pairs are its data set: one process, its batch size.
    for indices in common.batch_indices(
      num_examples=sum(len(shard.offsets) for shard in shards),
      seed=seed,
      global_batch_size=local_batch_size,
      start_step=start_step,
      process_index=0,
      process_count=1,
    ):
      yield _read_examples(shards, indices, image_size, pool)


def eval_arrays(
  folder: str | None,
  *,
  image_size: int,
  num_examples: int | None = None,
  key: str = 'data_dir',
) -> dict[str, np.ndarray]:
  """The first `num_examples` (all if None) pairs of all shards of `folder`
  (config.data.`key`) in index order (shard, then key), as raw pixels and
  captions."""
  num_examples = common.num_examples_or_all(
    num_examples, num_pairs(folder, key), f'webdataset config.data.{key}'
  )
  shards = [_index(path) for path in shard_paths(folder, key)]
  with _pool() as pool:
    return _read_examples(shards, np.arange(num_examples), image_size, pool)


def captions(folder: str | None, num: int, key: str = 'data_dir') -> list[str]:
  """The first `num` captions of `folder`'s shards (fewer if it has fewer
  pairs), in index order; reads no image."""
  found = []
  for path in shard_paths(folder, key):
    shard = _index(path)
    for row in range(min(num - len(found), len(shard.offsets))):
      _, _, offset, size = shard.offsets[row].tolist()
      where = _where(shard.path, shard.caption_names[row])
      found.append(_decode_caption(_read(shard.path, offset, size), where))
    if len(found) == num:
      break
  return found
