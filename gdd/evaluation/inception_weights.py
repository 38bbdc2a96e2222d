r"""FID Inception weights: convert pytorch-fid's file to Flax, and load it.

Accepted input: the weights pytorch-fid downloads for its FID Inception,

  pt_inception-2015-12-05-6726825d.pth
  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

(release `fid_weights`, used since pytorch-fid v0.1). It is the state dict of
`fid_inception_v3()` — the weights of the TensorFlow graph
`inception-2015-12-05` that TTUR's FID and the Inception Score use, ported to
torch — so scores computed with it are comparable to published ones.
torchvision's `inception_v3_google-*.pth` is a different network (1000
classes, aux head) and is rejected. A `.npz` holding the same state dict
(same key names, torch layouts) is accepted too.

torch is not needed: `read_torch_file` reads both of torch.save's formats
(zip, torch >= 1.6, and the older "legacy" stream of pickles) with a
restricted unpickler that builds numpy arrays and refuses any other Python
object.

To get the converted file, on a machine with internet access:

  wget https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
  python -m gdd.evaluation.inception_weights \
      --input=pt_inception-2015-12-05-6726825d.pth --output=inception_fid.npz

then copy `inception_fid.npz` (~95 MB) to where evaluation runs and pass its
path to `load_params`. The output is a flat `.npz` keyed by Flax paths
(`params/Mixed_5b/branch1x1/conv/kernel`, `batch_stats/.../bn/mean`), in
Flax layouts: conv OIHW → HWIO, fc (out, in) → (in, out).
"""

import collections
import dataclasses
import hashlib
import io
import logging
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np
from etils import epath
from flax import traverse_util

from gdd import paths
from gdd.evaluation import inception, npz

PUBLISHED_FILENAME = 'pt_inception-2015-12-05-6726825d.pth'
PUBLISHED_URL = (
  'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
  + PUBLISHED_FILENAME
)
# torch.hub's naming convention: the suffix is the start of the file's
# SHA-256. Checked as a warning only, since the convention is not promised.
_PUBLISHED_SHA256_PREFIX = '6726825d'

CONVERT_HINT = (
  f'Download {PUBLISHED_URL} and run `python -m '
  'gdd.evaluation.inception_weights '
  f'--input={PUBLISHED_FILENAME} --output=inception_fid.npz`, then pass the '
  'output file.'
)

# ----------------------------------------------------------------------------
# Reading torch.save files without torch.

# torch.save's legacy format starts with these two pickled integers.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
  'DoubleStorage': np.float64,
  'FloatStorage': np.float32,
  'HalfStorage': np.float16,
  'LongStorage': np.int64,
  'IntStorage': np.int32,
  'ShortStorage': np.int16,
  'CharStorage': np.int8,
  'ByteStorage': np.uint8,
  'BoolStorage': np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Stands in for a `torch.<T>Storage` class in the pickle."""

  name: str

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(_STORAGE_DTYPES[self.name])


@dataclasses.dataclass
class _Storage:
  """A flat typed buffer; legacy files deliver the data after the pickle."""

  key: str
  dtype: np.dtype
  numel: int
  data: np.ndarray | None = None


@dataclasses.dataclass
class _LazyTensor:
  """A strided view into a storage, materialised once the data is read."""

  storage: _Storage
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]

  def materialize(self) -> np.ndarray:
    data = self.storage.data
    if data is None:
      raise ValueError(f'Storage {self.storage.key!r} has no data.')
    if len(self.size) != len(self.stride):
      raise ValueError(f'size {self.size} and stride {self.stride} differ.')
    if any(s == 0 for s in self.size):
      return np.zeros(self.size, data.dtype)
    last = self.offset + sum(
      (n - 1) * st for n, st in zip(self.size, self.stride, strict=True)
    )
    if self.offset < 0 or min(self.stride, default=0) < 0 or last >= data.size:
      raise ValueError(
        f'Tensor (offset {self.offset}, size {self.size}, stride '
        f'{self.stride}) lies outside its storage of {data.size} elements.'
      )
    view = np.lib.stride_tricks.as_strided(
      data[self.offset :],
      shape=self.size,
      strides=[st * data.itemsize for st in self.stride],
      writeable=False,
    )
    return np.array(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  del unused  # requires_grad, backward hooks, metadata: meaningless here.
  return _LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
  del requires_grad, backward_hooks, unused
  return data


_ALLOWED_GLOBALS = {
  ('collections', 'OrderedDict'): collections.OrderedDict,
  ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
  ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
  ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
}


class _TorchUnpickler(pickle.Unpickler):
  """Unpickles torch's state-dict pickles into lazy numpy tensors.

  Only the globals a plain tensor state dict needs resolve; anything else is
  refused, so loading a file cannot run arbitrary code.
  """

  def __init__(self, file: BinaryIO, storages: dict[str, _Storage]):
    super().__init__(file)
    self._storages = storages

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(
      f'Refusing to load {module}.{name}: only plain tensor state dicts '
      '(torch.save(model.state_dict())) can be read without torch.'
    )

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and pid and pid[0] == 'storage'):
      raise pickle.UnpicklingError(f'Unsupported persistent id {pid!r}.')
    # zip: (tag, type, key, location, numel); legacy adds view_metadata.
    _, storage_type, key, _, numel, *view = pid
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f'Unsupported storage type {storage_type}.')
    key = str(key)
    storage = self._storages.get(key)
    if storage is None:
      storage = _Storage(key, storage_type.dtype, int(numel))
      self._storages[key] = storage
    if view and view[0] is not None:
      raise pickle.UnpicklingError(
        'Storage views (legacy format view_metadata) are not supported.'
      )
    return storage


def _materialize(obj: Any) -> Any:
  if isinstance(obj, _LazyTensor):
    return obj.materialize()
  if isinstance(obj, Mapping):
    return collections.OrderedDict((k, _materialize(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v) for v in obj)
  return obj


def _fill(storage: _Storage, raw: bytes, byteorder: str) -> None:
  expected = storage.numel * storage.dtype.itemsize
  if len(raw) != expected:
    raise ValueError(
      f'Storage {storage.key!r}: {len(raw)} bytes on file, expected '
      f'{expected} ({storage.numel} × {storage.dtype}); the file is truncated '
      'or corrupt.'
    )
  order = '<' if byteorder == 'little' else '>'
  storage.data = np.frombuffer(raw, storage.dtype.newbyteorder(order)).astype(
    storage.dtype
  )


def _read_zip(path: epath.PathLike) -> Any:
  with paths.resolve(path).open('rb') as f, zipfile.ZipFile(f) as zf:
    pickles = [n for n in zf.namelist() if n.endswith('data.pkl')]
    if len(pickles) != 1:
      raise ValueError(
        f'{path} is a zip file but not a torch.save archive '
        f'(expected one <archive>/data.pkl, found {pickles}).'
      )
    prefix = pickles[0][: -len('data.pkl')]
    names = set(zf.namelist())
    byteorder = 'little'
    if prefix + 'byteorder' in names:
      byteorder = zf.read(prefix + 'byteorder').decode().strip()
    storages: dict[str, _Storage] = {}
    result = _TorchUnpickler(io.BytesIO(zf.read(pickles[0])), storages).load()
    for key, storage in storages.items():
      name = f'{prefix}data/{key}'
      if name not in names:
        raise ValueError(f'{path}: storage record {name} is missing.')
      _fill(storage, zf.read(name), byteorder)
  return _materialize(result)


def _read_legacy(path: epath.PathLike) -> Any:
  storages: dict[str, _Storage] = {}
  with paths.resolve(path).open('rb') as f:
    # The header pickles are plain ints and dicts; the restricted unpickler
    # reads them too, so nothing in the file can import code.
    header = lambda: _TorchUnpickler(f, storages).load()
    try:
      magic = header()
    except Exception as e:  # Any failure here means: not this format.
      raise ValueError(
        f'{path} is neither a torch.save file (zip or legacy) nor an .npz.'
      ) from e
    if magic != _LEGACY_MAGIC:
      raise ValueError(f'{path} is not a torch.save file (bad magic number).')
    protocol = header()
    if protocol != _LEGACY_PROTOCOL:
      raise ValueError(f'{path}: unsupported legacy protocol {protocol}.')
    sys_info = header()
    byteorder = 'little' if sys_info.get('little_endian', True) else 'big'
    result = _TorchUnpickler(f, storages).load()
    keys = header()
    for key in keys:
      storage = storages[str(key)]
      # Each record: int64 element count, then the raw elements.
      numel = int.from_bytes(f.read(8), byteorder, signed=True)
      if numel != storage.numel:
        raise ValueError(
          f'{path}: storage {key} has {numel} elements on file, the pickle '
          f'says {storage.numel}.'
        )
      _fill(storage, f.read(numel * storage.dtype.itemsize), byteorder)
  return _materialize(result)


def _is_zip(path: epath.PathLike) -> bool:
  with paths.resolve(path).open('rb') as f:
    return zipfile.is_zipfile(f)


def read_torch_file(path: epath.PathLike) -> dict[str, np.ndarray]:
  """Reads a tensor state dict written by torch.save, without torch.

  Both formats torch.save writes are supported: the zip archive (default
  since torch 1.6: `<archive>/data.pkl` plus one `<archive>/data/<key>`
  record per storage) and the legacy stream (magic number, protocol, sys info,
  the pickle, the storage keys, then each storage's raw data). Strided views
  and storage offsets are honoured; dtypes are those of the storages.

  Args:
    path: the `.pth`/`.pt` file.

  Returns:
    The state dict, name → numpy array.
  """
  obj = _read_zip(path) if _is_zip(path) else _read_legacy(path)
  if not isinstance(obj, Mapping) or not all(
    isinstance(v, np.ndarray) for v in obj.values()
  ):
    raise ValueError(
      f'{path} does not hold a state dict of tensors (got {type(obj)}).'
    )
  return dict(obj)


def read_state_dict(path: epath.PathLike) -> dict[str, np.ndarray]:
  """A pytorch-fid-named state dict from a torch.save file or an `.npz`."""
  path = paths.resolve(path)
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist. {CONVERT_HINT}')
  if _is_zip(path):
    with path.open('rb') as f, zipfile.ZipFile(f) as zf:
      is_npz = all(n.endswith('.npy') for n in zf.namelist())
    if is_npz:
      return npz.load(path)
  return read_torch_file(path)


# ----------------------------------------------------------------------------
# Name and layout mapping between pytorch-fid and Flax.

# (collection, Flax leaf name) ↔ torch suffix, for BatchNorm and linear layers.
_LEAF_TO_TORCH = {
  ('params', 'kernel'): 'weight',
  ('params', 'bias'): 'bias',
  ('params', 'scale'): 'weight',
  ('batch_stats', 'mean'): 'running_mean',
  ('batch_stats', 'var'): 'running_var',
}


def _torch_name(flax_path: tuple[str, ...]) -> str:
  collection, *modules, leaf = flax_path
  return '.'.join([*modules, _LEAF_TO_TORCH[(collection, leaf)]])


def _flax_to_torch_layout(array: np.ndarray) -> np.ndarray:
  if array.ndim == 4:  # conv HWIO → OIHW
    return np.transpose(array, (3, 2, 0, 1))
  if array.ndim == 2:  # dense (in, out) → (out, in)
    return array.T
  return array


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(flax_shape) == 4:
    return tuple(flax_shape[i] for i in (3, 2, 0, 1))
  return tuple(reversed(flax_shape)) if len(flax_shape) == 2 else flax_shape


def _torch_to_flax_layout(array: np.ndarray) -> np.ndarray:
  if array.ndim == 4:  # conv OIHW → HWIO
    return np.transpose(array, (2, 3, 1, 0))
  if array.ndim == 2:  # dense (out, in) → (in, out)
    return array.T
  return array


def expected_shapes() -> dict[str, tuple[int, ...]]:
  """Flat Flax key ('params/Mixed_5b/branch1x1/conv/kernel') → shape."""
  flat = traverse_util.flatten_dict(inception.variable_shapes())
  return {'/'.join(path): tuple(s.shape) for path, s in sorted(flat.items())}


def _torch_key_map() -> dict[str, str]:
  """pytorch-fid state-dict name → flat Flax key."""
  return {_torch_name(tuple(key.split('/'))): key for key in expected_shapes()}


def _describe(names: list[str], limit: int = 5) -> str:
  shown = ', '.join(sorted(names)[:limit])
  more = f' and {len(names) - limit} more' if len(names) > limit else ''
  return f'{shown}{more}'


def torch_to_flax(
  state_dict: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
  """pytorch-fid state dict → flat {Flax key: float32 array in Flax layout}.

  Every expected tensor must be present with the right shape; BatchNorm's
  `num_batches_tracked` counters are dropped (unused at inference).
  """
  key_map = _torch_key_map()
  shapes = expected_shapes()
  names = set(state_dict)
  if any(n.startswith('AuxLogits.') for n in names):
    raise ValueError(
      "This state dict has AuxLogits.* tensors: it looks like torchvision's "
      'ImageNet Inception-v3, not the FID Inception. ' + CONVERT_HINT
    )
  missing = sorted(set(key_map) - names)
  unexpected = sorted(
    n for n in names - set(key_map) if not n.endswith('.num_batches_tracked')
  )
  if missing or unexpected:
    raise ValueError(
      "The state dict does not match pytorch-fid's FID Inception: "
      + (f'missing {len(missing)}: {_describe(missing)}. ' if missing else '')
      + (
        f'unexpected {len(unexpected)}: {_describe(unexpected)}. '
        if unexpected
        else ''
      )
      + CONVERT_HINT
    )
  out = {}
  for torch_key, flax_key in key_map.items():
    value = _torch_to_flax_layout(np.asarray(state_dict[torch_key]))
    if value.shape != shapes[flax_key]:
      raise ValueError(
        f'{torch_key} has shape {np.shape(state_dict[torch_key])}; the FID '
        f'Inception needs {_torch_shape(shapes[flax_key])}. ' + CONVERT_HINT
      )
    out[flax_key] = value.astype(np.float32)
  return out


def flax_to_torch(
  variables: Mapping[str, Any], include_num_batches_tracked: bool = True
) -> dict[str, np.ndarray]:
  """{'params', 'batch_stats'} → pytorch-fid-named state dict (torch layouts).

  The inverse of `torch_to_flax`; with `include_num_batches_tracked` it adds
  the int64 counters torch's BatchNorm state dicts carry, as in the real file.
  """
  flat = traverse_util.flatten_dict(
    {k: variables[k] for k in ('params', 'batch_stats')}
  )
  out = {}
  for path, value in sorted(flat.items()):
    out[_torch_name(path)] = _flax_to_torch_layout(np.asarray(value))
    if include_num_batches_tracked and path[-1] == 'mean':
      bn = '.'.join(path[1:-1])
      out[f'{bn}.num_batches_tracked'] = np.array(0, np.int64)
  return out


# ----------------------------------------------------------------------------
# Converting and loading.


def _sha256_prefix(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open('rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()[: len(_PUBLISHED_SHA256_PREFIX)]


def convert(input_path: epath.PathLike, output_path: epath.PathLike) -> None:
  """Converts pytorch-fid's weights (`.pth` or `.npz`) to the Flax `.npz`.

  The output is written to a temporary file and renamed, so a failed run
  never leaves a partial weights file behind.
  """
  input_path = paths.resolve(input_path)
  if input_path.name == PUBLISHED_FILENAME:
    prefix = _sha256_prefix(input_path)
    if prefix != _PUBLISHED_SHA256_PREFIX:
      logging.warning(
        '%s: SHA-256 starts with %s, not %s; the download may be corrupt.',
        input_path,
        prefix,
        _PUBLISHED_SHA256_PREFIX,
      )
  npz.atomic_savez(output_path, **torch_to_flax(read_state_dict(input_path)))


def load_params(path: epath.PathLike) -> dict[str, Any]:
  """Loads converted weights: {'params', 'batch_stats'} for InceptionV3.

  Args:
    path: an `.npz` written by `convert` (or this module's CLI).

  Returns:
    Nested dicts of float32 numpy arrays.

  Raises:
    FileNotFoundError / ValueError naming the problem (missing file, an
      unconverted pytorch-fid file, a missing or mis-shaped array) and how to
      produce a valid file.
  """
  path = paths.resolve(path)
  if not path.exists():
    raise FileNotFoundError(
      f'FID Inception weights not found at {path}. {CONVERT_HINT}'
    )
  try:
    flat = npz.load(path)
  except (ValueError, OSError, zipfile.BadZipFile) as e:
    raise ValueError(
      f'{path} is not a converted weights .npz (a torch .pth must be '
      f'converted first). {CONVERT_HINT}'
    ) from e
  if 'fc.weight' in flat:
    raise ValueError(
      f'{path} holds the unconverted pytorch-fid state dict (torch names and '
      f'layouts). {CONVERT_HINT}'
    )
  for key, shape in expected_shapes().items():
    if key not in flat:
      raise ValueError(f'{path} has no array {key!r}. {CONVERT_HINT}')
    if flat[key].shape != shape:
      raise ValueError(
        f'{path}: {key!r} has shape {flat[key].shape}, expected {shape}. '
        + CONVERT_HINT
      )
  unexpected = sorted(set(flat) - set(expected_shapes()))
  if unexpected:
    raise ValueError(
      f'{path} has unexpected arrays {_describe(unexpected)}; it was not '
      f'written by this converter. {CONVERT_HINT}'
    )
  nested = traverse_util.unflatten_dict(
    {tuple(k.split('/')): v.astype(np.float32) for k, v in flat.items()}
  )
  return {'params': nested['params'], 'batch_stats': nested['batch_stats']}


def main(argv: list[str]) -> None:
  from absl import flags

  if len(argv) > 1:
    raise ValueError(f'Unexpected arguments: {argv[1:]}')
  convert(flags.FLAGS.input, flags.FLAGS.output)
  print(f'Wrote {flags.FLAGS.output}')


if __name__ == '__main__':
  from absl import app, flags

  # Defined here, not at import, so importing this module adds no flags.
  flags.DEFINE_string('input', None, f'{PUBLISHED_FILENAME} (or an .npz).')
  flags.DEFINE_string('output', None, 'Converted Flax weights (.npz).')
  flags.mark_flags_as_required(['input', 'output'])
  app.run(main)
