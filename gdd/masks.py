"""Inpainting masks: named regions, mask files, and the diffusion's size.

A mask is float32 [B, H, W, 1], 1 where the input is kept and 0 where the
model fills in (what `sampling.Sampler` takes as `mask`). Named masks say
which region is filled in: 'left', 'right', 'top', 'bottom' (a half) or
'center' (the middle box of half the height and width). Mask files follow
the Stable Diffusion inpainting convention: white is filled in, black kept.
"""

import numpy as np

from gdd import errors

KINDS = ('left', 'right', 'top', 'bottom', 'center')


class MaskError(errors.UserError, ValueError):
  """A mask that cannot be used; says what can."""


def named(kind: str, batch_size: int, height: int, width: int) -> np.ndarray:
  """The mask that fills in region `kind` (`KINDS`) of every image."""
  fill = np.zeros((height, width), bool)
  if kind == 'left':
    fill[:, : width // 2] = True
  elif kind == 'right':
    fill[:, width // 2 :] = True
  elif kind == 'top':
    fill[: height // 2] = True
  elif kind == 'bottom':
    fill[height // 2 :] = True
  elif kind == 'center':
    rows = slice(height // 4, height - height // 4)
    fill[rows, width // 4 : width - width // 4] = True
  else:
    raise MaskError(
      f'mask={kind!r}; allowed: {KINDS} (the region filled in) or the path '
      'of a mask file (.npz with masks, or .png: white is filled in).'
    )
  mask = (~fill).astype(np.float32)[None, :, :, None]
  return np.broadcast_to(mask, (batch_size, height, width, 1)).copy()


def from_fill(fill: np.ndarray) -> np.ndarray:
  """A mask from a fill-in map ([B, H, W] or [B, H, W, 1], > 0.5 filled)."""
  fill = np.asarray(fill, np.float32)
  if fill.ndim == 3:
    fill = fill[..., None]
  if fill.ndim != 4 or fill.shape[-1] != 1:
    raise MaskError(
      f'a mask must be [B, H, W] or [B, H, W, 1]; got shape {fill.shape}.'
    )
  return (fill <= 0.5).astype(np.float32)


def to_space(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """A pixel mask at the diffusion space's (h, w): kept only where every
  pixel of the patch is kept, so nothing to fill in is ever pinned.

  In pixel space (h, w) = (H, W) and the mask is returned as is.
  """
  _, height, width, _ = mask.shape
  h, w = shape[:2]
  if height % h or width % w:
    raise MaskError(
      f'a {height}x{width} mask does not divide into the {h}x{w} '
      'diffusion space.'
    )
  patches = mask.reshape(mask.shape[0], h, height // h, w, width // w, 1)
  return patches.min(axis=(2, 4))
