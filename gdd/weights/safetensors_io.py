"""The safetensors file format ↔ flat {name: numpy array} dicts.

A safetensors file is an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}, '__metadata__': {...}} and the tensors'
little-endian bytes back to back. gdd reads and writes it here with numpy
and ml_dtypes instead of the `safetensors` package's numpy API, which
cannot represent bfloat16 (it raises "data type 'bfloat16' not
understood", safetensors 0.8) — and bfloat16 is how many Stable Diffusion
checkpoints are stored. Files are read through `epath`, so gs:// works.
"""

import json
import os

import ml_dtypes
import numpy as np
from etils import epath

from gdd import errors

_DTYPES = {
  'BOOL': np.dtype(np.bool_),
  'U8': np.dtype(np.uint8),
  'I8': np.dtype(np.int8),
  'I16': np.dtype('<i2'),
  'U16': np.dtype('<u2'),
  'I32': np.dtype('<i4'),
  'U32': np.dtype('<u4'),
  'I64': np.dtype('<i8'),
  'U64': np.dtype('<u8'),
  'F16': np.dtype('<f2'),
  'BF16': np.dtype(ml_dtypes.bfloat16),
  'F32': np.dtype('<f4'),
  'F64': np.dtype('<f8'),
  'F8_E4M3': np.dtype(ml_dtypes.float8_e4m3fn),
  'F8_E5M2': np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_METADATA = '__metadata__'
# The header is padded with spaces to a multiple of 8 bytes, as the
# reference writer does, so that every tensor starts aligned.
_ALIGNMENT = 8


class SafetensorsError(errors.UserError, ValueError):
  """A file that is not a valid safetensors file."""


def load(path: epath.PathLike) -> dict[str, np.ndarray]:
  """Every tensor of a .safetensors file, in its stored dtype."""
  path = epath.Path(path)
  data = path.read_bytes()
  header, start = _header(data, path)
  tensors = {}
  for name, entry in header.items():
    if name == _METADATA:
      continue
    tensors[name] = _tensor(data, start, name, entry, path)
  return tensors


def _header(data: bytes, path: epath.Path) -> tuple[dict, int]:
  """The parsed JSON header and where the tensor bytes start."""
  if len(data) < 8:
    raise SafetensorsError(f'{path} is not a safetensors file: too short.')
  size = int.from_bytes(data[:8], 'little')
  if 8 + size > len(data):
    raise SafetensorsError(
      f'{path} is not a safetensors file: its header length {size} runs '
      f'past the end of the file ({len(data)} bytes).'
    )
  try:
    header = json.loads(data[8 : 8 + size])
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise SafetensorsError(
      f'{path} is not a safetensors file: its header is not JSON ({e}).'
    ) from e
  return header, 8 + size


def _tensor(
  data: bytes, start: int, name: str, entry: dict, path: epath.Path
) -> np.ndarray:
  dtype = _DTYPES.get(entry.get('dtype'))
  if dtype is None:
    raise SafetensorsError(
      f'{path}: tensor {name!r} has dtype {entry.get("dtype")!r}; gdd reads '
      f'{sorted(_DTYPES)}.'
    )
  begin, end = entry['data_offsets']
  shape = tuple(entry['shape'])
  if end - begin != dtype.itemsize * int(np.prod(shape)) or (
    start + end > len(data)
  ):
    raise SafetensorsError(
      f'{path}: tensor {name!r} of shape {shape} and dtype {entry["dtype"]} '
      f'does not match its byte range [{begin}, {end}).'
    )
  buffer = data[start + begin : start + end]
  return np.frombuffer(buffer, dtype).reshape(shape).copy()


def save(
  tensors: dict[str, np.ndarray],
  path: epath.PathLike,
  metadata: dict[str, str] | None = None,
) -> None:
  """Writes `tensors` (C order, little-endian) as one .safetensors file.

  Writes to a temporary name and renames it, so an interrupted export
  never leaves a truncated file under the final name.
  """
  path = epath.Path(path)
  header, chunks, offset = {}, [], 0
  if metadata:
    header[_METADATA] = {str(k): str(v) for k, v in metadata.items()}
  for name in sorted(tensors):
    array = np.asarray(tensors[name], order='C')
    array = array.astype(array.dtype.newbyteorder('<'), copy=False)
    kind = _NAMES.get(np.dtype(array.dtype))
    if kind is None:
      raise SafetensorsError(
        f'tensor {name!r} has dtype {array.dtype}, which safetensors cannot '
        f'store; cast it to one of {sorted(_DTYPES)}.'
      )
    raw = array.tobytes()
    header[name] = dict(
      dtype=kind,
      shape=list(array.shape),
      data_offsets=[offset, offset + len(raw)],
    )
    chunks.append(raw)
    offset += len(raw)
  encoded = json.dumps(header, separators=(',', ':')).encode()
  encoded += b' ' * (-len(encoded) % _ALIGNMENT)
  temporary = path.parent / f'.{path.name}.tmp-{os.getpid()}'
  temporary.write_bytes(
    len(encoded).to_bytes(8, 'little') + encoded + b''.join(chunks)
  )
  temporary.rename(path)
