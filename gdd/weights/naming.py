"""PyTorch state dicts ↔ gdd's Flax param trees, by one renaming rule.

gdd's SD U-Net, KL autoencoder and CLIP text encoder name their modules as
diffusers and transformers do (gdd/models/sd_unet.py, autoencoder.py,
text_encoder.py), so a state-dict key and a Flax param path differ only by:
  * a PyTorch list index `.i` is a suffix `_i` of its list's name:
    `down_blocks.0.resnets.1.conv1.weight` ↔ `down_blocks_0/resnets_1/conv1/
    kernel`, `attn1.to_out.0` ↔ `attn1/to_out_0`, `ff.net.2` ↔ `ff/net_2`;
    names that end in `_1` themselves (`time_embedding.linear_1`) are not
    lists, so the way back splits only the names of `LISTS`;
  * the leaf: a conv's or linear's `weight` is `kernel`, a norm's `weight`
    is `scale`, an embedding's `weight` is `embedding`, `bias` is `bias`;
  * the layout: conv OIHW ↔ HWIO (transpose (2, 3, 1, 0)), linear
    [out, in] ↔ [in, out]. A linear stored as a 1x1 conv [out, in, 1, 1]
    (old diffusers VAE attention) is read as the linear it is.
Which leaf and layout apply is read off the Flax tree being filled (its
abstract shapes), so nothing here knows a particular network.
"""

import re
from collections.abc import Iterable, Mapping

import flax
import numpy as np

from gdd import errors

# The PyTorch ModuleList attributes of SD's U-Net, VAE and CLIP.
LISTS = frozenset(
  {
    'attentions',
    'down_blocks',
    'downsamplers',
    'layers',
    'net',
    'resnets',
    'to_out',
    'transformer_blocks',
    'up_blocks',
    'upsamplers',
  }
)
_WEIGHT_LEAVES = ('kernel', 'scale', 'embedding')
# How many names an error lists of each kind before it says "and N more".
_SHOWN = 12


class WeightsMismatchError(errors.UserError, ValueError):
  """A checkpoint whose keys or shapes do not fit the network built."""


def torch_key(path: tuple[str, ...]) -> str:
  """The state-dict key of a Flax param path."""
  *modules, leaf = path
  parts = [_torch_module(name) for name in modules]
  return '.'.join([*parts, 'bias' if leaf == 'bias' else 'weight'])


def _torch_module(name: str) -> str:
  match = re.fullmatch(r'(.+)_(\d+)', name)
  if match and match.group(1) in LISTS:
    return f'{match.group(1)}.{match.group(2)}'
  return name


def to_flax_layout(
  weight: np.ndarray, leaf: str, target_shape: tuple[int, ...]
) -> np.ndarray:
  """A PyTorch weight in the layout of the Flax param `leaf` of that shape."""
  if leaf != 'kernel':
    return weight
  if len(target_shape) == 4 and weight.ndim == 4:
    return weight.transpose(2, 3, 1, 0)
  if len(target_shape) == 2 and weight.ndim == 4 and weight.shape[2:] == (1, 1):
    weight = weight[:, :, 0, 0]
  if len(target_shape) == 2 and weight.ndim == 2:
    return weight.T
  return weight


def to_torch_layout(value: np.ndarray, leaf: str) -> np.ndarray:
  """A Flax param in PyTorch's layout (the inverse of `to_flax_layout`)."""
  if leaf == 'kernel' and value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  if leaf == 'kernel' and value.ndim == 2:
    return value.T
  return value


def to_flax(
  state_dict: Mapping[str, np.ndarray],
  abstract_params: dict,
  *,
  what: str,
  ignored: Iterable[str] = (),
  dtype: np.dtype | None = np.float32,
) -> dict:
  """Fills a Flax param tree of `abstract_params`' structure from PyTorch.

  Args:
    state_dict: key → array in PyTorch's layout (e.g. from safetensors).
    abstract_params: the tree to fill (arrays or ShapeDtypeStructs).
    what: names the checkpoint in errors (e.g. 'unet/ of /path/to/sd').
    ignored: keys that may be in the state dict and are dropped (buffers).
    dtype: the params' dtype (float32: gdd's master params), or None to
      keep the stored one.

  Raises:
    WeightsMismatchError: listing every missing key, unexpected key and
      shape mismatch at once.
  """
  flat = flax.traverse_util.flatten_dict(abstract_params)
  params, missing, wrong = {}, [], []
  for path, target in flat.items():
    key = torch_key(path)
    if key not in state_dict:
      missing.append(key)
      continue
    value = to_flax_layout(
      np.asarray(state_dict[key]), path[-1], tuple(target.shape)
    )
    if value.shape != tuple(target.shape):
      wrong.append(
        f'{key}: stored {tuple(state_dict[key].shape)}, the network needs '
        f'{_torch_shape(path[-1], tuple(target.shape))}'
      )
      continue
    params[path] = value if dtype is None else value.astype(dtype)
  used = {torch_key(path) for path in flat} | set(ignored)
  unexpected = sorted(set(state_dict) - used)
  if missing or unexpected or wrong:
    raise WeightsMismatchError(
      _mismatch_message(what, sorted(missing), unexpected, wrong)
    )
  return flax.traverse_util.unflatten_dict(params)


def to_torch(params: dict, dtype: np.dtype | None = None) -> dict:
  """A Flax param tree as a PyTorch-layout state dict (key → numpy)."""
  flat = flax.traverse_util.flatten_dict(params)
  state_dict = {}
  for path, value in flat.items():
    value = to_torch_layout(np.asarray(value), path[-1])
    state_dict[torch_key(path)] = (
      value if dtype is None else value.astype(dtype)
    )
  return state_dict


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  return to_torch_layout(np.empty(shape, np.bool_), leaf).shape


def _mismatch_message(what, missing, unexpected, wrong) -> str:
  lines = [
    f'The weights in {what} do not fit the network built from its config:'
  ]
  for title, items in (
    ('missing (the network has them, the checkpoint does not)', missing),
    ('unexpected (in the checkpoint, not in the network)', unexpected),
    ('of the wrong shape', wrong),
  ):
    if items:
      shown = ', '.join(items[:_SHOWN])
      more = f' and {len(items) - _SHOWN} more' if len(items) > _SHOWN else ''
      lines.append(f'  {len(items)} {title}: {shown}{more}')
  lines.append(
    '  Check that the folder and its config.json belong together (a '
    'checkpoint of another model or version?) and that the model is one '
    'gdd supports (README, "Distil your Stable Diffusion").'
  )
  return '\n'.join(lines)
