r"""Converts pytorch-fid's FID Inception weights to the `.npz` gdd loads.

  pip install -e '.[convert]'  # torch, needed here only
  wget https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
  python -m gdd.evaluation.convert_inception \
      --input=pt_inception-2015-12-05-6726825d.pth --output=inception_fid.npz

The input is read with `torch.load(weights_only=True)`, which builds tensors
and refuses any other Python object, so a file cannot run code. torchvision's
`inception_v3_google-*.pth` is a different network (1000 classes, aux head)
and is refused. The output is what `inception_weights.load_params` reads: a
flat `.npz` keyed by Flax paths, conv OIHW → HWIO, fc (out, in) → (in, out),
float32. torch is imported only when converting; gdd never needs it.
"""

import hashlib
import logging
from collections.abc import Mapping

import numpy as np
from etils import epath

from gdd import paths
from gdd.evaluation import npz
from gdd.evaluation.inception_weights import (
  CONVERT_HINT,
  PUBLISHED_FILENAME,
  describe,
  expected_shapes,
)

# torch.hub's naming convention: the suffix is the start of the file's
# SHA-256. Checked as a warning only, since the convention is not promised.
_PUBLISHED_SHA256_PREFIX = '6726825d'

# (collection, Flax leaf name) → torch suffix, for conv, BatchNorm and fc.
_LEAF_TO_TORCH = {
  ('params', 'kernel'): 'weight',
  ('params', 'bias'): 'bias',
  ('params', 'scale'): 'weight',
  ('batch_stats', 'mean'): 'running_mean',
  ('batch_stats', 'var'): 'running_var',
}


def torch_name(flax_key: str) -> str:
  """pytorch-fid's name for a flat Flax key.

  'params/Mixed_5b/b/conv/kernel' → 'Mixed_5b.b.conv.weight'.
  """
  collection, *modules, leaf = flax_key.split('/')
  return '.'.join([*modules, _LEAF_TO_TORCH[(collection, leaf)]])


def torch_to_flax_layout(array: np.ndarray) -> np.ndarray:
  """Conv OIHW → HWIO, dense (out, in) → (in, out); vectors unchanged."""
  if array.ndim == 4:
    return np.transpose(array, (2, 3, 1, 0))
  if array.ndim == 2:
    return array.T
  return array


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(flax_shape) == 4:
    return tuple(flax_shape[i] for i in (3, 2, 0, 1))
  return flax_shape[::-1]  # (in, out) → (out, in); vectors unchanged.


def torch_to_flax(
  state_dict: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
  """pytorch-fid state dict → flat {Flax key: float32 array in Flax layout}.

  Every expected tensor must be present with the right shape; BatchNorm's
  `num_batches_tracked` counters are dropped (unused at inference).
  """
  shapes = expected_shapes()
  key_map = {torch_name(key): key for key in shapes}
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
      + (f'missing {len(missing)}: {describe(missing)}. ' if missing else '')
      + (
        f'unexpected {len(unexpected)}: {describe(unexpected)}. '
        if unexpected
        else ''
      )
      + CONVERT_HINT
    )
  out = {}
  for name, key in key_map.items():
    value = torch_to_flax_layout(np.asarray(state_dict[name]))
    if value.shape != shapes[key]:
      raise ValueError(
        f'{name} has shape {np.shape(state_dict[name])}; the FID Inception '
        f'needs {_torch_shape(shapes[key])}. ' + CONVERT_HINT
      )
    out[key] = value.astype(np.float32)
  return out


def read_state_dict(path: epath.PathLike) -> dict[str, np.ndarray]:
  """A tensor state dict saved by torch.save, as numpy arrays."""
  import torch  # The optional `convert` extra; gdd itself never imports it.

  with paths.resolve(path).open('rb') as f:
    obj = torch.load(f, map_location='cpu', weights_only=True)
  if not isinstance(obj, Mapping) or not all(
    isinstance(v, torch.Tensor) for v in obj.values()
  ):
    raise ValueError(
      f'{path} does not hold a state dict of tensors (got {type(obj)}). '
      + CONVERT_HINT
    )
  return {
    name: (t.float() if t.is_floating_point() else t).numpy()
    for name, t in obj.items()
  }


def _sha256_prefix(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open('rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()[: len(_PUBLISHED_SHA256_PREFIX)]


def convert(input_path: epath.PathLike, output_path: epath.PathLike) -> None:
  """Converts pytorch-fid's `.pth` to the Flax `.npz`, all or nothing."""
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


def main(argv: list[str]) -> None:
  from absl import flags

  if len(argv) > 1:
    raise ValueError(f'Unexpected arguments: {argv[1:]}')
  convert(flags.FLAGS.input, flags.FLAGS.output)
  print(f'Wrote {flags.FLAGS.output}')


if __name__ == '__main__':
  from absl import app, flags

  # Defined here, not at import, so importing this module adds no flags.
  flags.DEFINE_string('input', None, f'{PUBLISHED_FILENAME} (torch.save).')
  flags.DEFINE_string('output', None, 'Converted Flax weights (.npz).')
  flags.mark_flags_as_required(['input', 'output'])
  app.run(main)
