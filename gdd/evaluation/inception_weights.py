r"""FID Inception weights: load the converted `.npz` that gdd evaluates with.

The weights are pytorch-fid's for its FID Inception,

  pt_inception-2015-12-05-6726825d.pth
  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

(release `fid_weights`, used since pytorch-fid v0.1): the state dict of
`fid_inception_v3()` — the TensorFlow graph `inception-2015-12-05` that
TTUR's FID and the Inception Score use, ported to torch — so scores computed
with it are comparable to published ones.

gdd reads them only as a flat `.npz` keyed by Flax paths
(`params/Mixed_5b/branch1x1/conv/kernel`, `batch_stats/.../bn/mean`) in Flax
layouts, which `gdd.evaluation.convert_inception` writes once from the `.pth`
(it needs torch: `pip install -e '.[convert]'`):

  wget https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
  python -m gdd.evaluation.convert_inception \
      --input=pt_inception-2015-12-05-6726825d.pth --output=inception_fid.npz

then copy `inception_fid.npz` (~95 MB) to where evaluation runs and pass its
path to `load_params`.
"""

import zipfile
from typing import Any

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

CONVERT_HINT = (
  f'Download {PUBLISHED_URL} and run `python -m '
  'gdd.evaluation.convert_inception '
  f'--input={PUBLISHED_FILENAME} --output=inception_fid.npz` (needs torch: '
  "pip install -e '.[convert]'), then pass the output file."
)


def expected_shapes() -> dict[str, tuple[int, ...]]:
  """Flat Flax key ('params/Mixed_5b/branch1x1/conv/kernel') → shape."""
  flat = traverse_util.flatten_dict(inception.variable_shapes())
  return {'/'.join(path): tuple(s.shape) for path, s in sorted(flat.items())}


def describe(names: list[str], limit: int = 5) -> str:
  """The first `limit` of `names`, sorted, and how many more: for errors."""
  shown = ', '.join(sorted(names)[:limit])
  more = f' and {len(names) - limit} more' if len(names) > limit else ''
  return f'{shown}{more}'


def load_params(path: epath.PathLike) -> dict[str, Any]:
  """Loads converted weights: {'params', 'batch_stats'} for InceptionV3.

  Args:
    path: an `.npz` written by `gdd.evaluation.convert_inception`.

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
  shapes = expected_shapes()
  for key, shape in shapes.items():
    if key not in flat:
      raise ValueError(f'{path} has no array {key!r}. {CONVERT_HINT}')
    if flat[key].shape != shape:
      raise ValueError(
        f'{path}: {key!r} has shape {flat[key].shape}, expected {shape}. '
        + CONVERT_HINT
      )
  unexpected = sorted(set(flat) - set(shapes))
  if unexpected:
    raise ValueError(
      f'{path} has unexpected arrays {describe(unexpected)}; it was not '
      f'written by the converter. {CONVERT_HINT}'
    )
  nested = traverse_util.unflatten_dict(
    {tuple(k.split('/')): v.astype(np.float32) for k, v in flat.items()}
  )
  return {'params': nested['params'], 'batch_stats': nested['batch_stats']}
