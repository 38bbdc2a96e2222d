"""Inpainting masks: named regions, mask files, random training masks, and
the diffusion's size.

A mask is float32 [B, H, W, 1], 1 where the input is kept and 0 where the
model fills in (what `sampling.Sampler` takes as `mask`). Named masks say
which region is filled in: 'left', 'right', 'top', 'bottom' (a half) or
'center' (the middle box of half the height and width). Mask files follow
the Stable Diffusion inpainting convention: white is filled in, black kept.
`random` draws the masks an inpainting model trains on (`RANDOM_KINDS`).
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gdd import errors

KINDS = ('left', 'right', 'top', 'bottom', 'center')
# What a random training mask fills in (`random`): a box, a few thick
# strokes, a half of the image (outpainting), or everything (generation).
RANDOM_KINDS = ('box', 'stroke', 'half', 'all_filled')
# Box sides, as fractions of the image's height and width.
_BOX_SIDES = (0.25, 0.75)
# Strokes: up to this many segments; radius as a fraction of the shorter
# side, at least _MIN_RADIUS pixels (more than half a pixel's diagonal, so a
# stroke always covers the pixel nearest its end).
_MAX_STROKES = 4
_STROKE_RADII = (1 / 16, 1 / 8)
_MIN_RADIUS = 0.75


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
    raise unknown(kind)
  mask = (~fill).astype(np.float32)[None, :, :, None]
  return np.broadcast_to(mask, (batch_size, height, width, 1)).copy()


def unknown(spec: str) -> MaskError:
  """The error for a mask that is neither a named region nor a mask file."""
  return MaskError(
    f'mask={spec!r}; allowed: {KINDS} (the region filled in) or the path '
    'of a mask file (.npz with masks, or .png: white is filled in).'
  )


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

  In pixel space (h, w) = (H, W) and the mask is returned as is. Takes
  numpy or jax arrays (the sampler's requests, the training masks).
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


def to_images(mask: jnp.ndarray, image_shape: tuple[int, ...]) -> jnp.ndarray:
  """A diffusion-space mask at the images' (H, W): each entry repeated over
  its patch (`to_space`'s inverse on the masks it returns)."""
  _, h, w, _ = mask.shape
  height, width = image_shape[:2]
  return jnp.repeat(jnp.repeat(mask, height // h, axis=1), width // w, axis=2)


def random(
  rng: jax.Array,
  batch_size: int,
  height: int,
  width: int,
  fractions: Mapping[str, float],
) -> jnp.ndarray:
  """Random training masks float32 [B, H, W, 1] (1 kept), one per example.

  Each example's kind is drawn with the probabilities `fractions` (a value
  per `RANDOM_KINDS` name, summing to 1), as Stable Diffusion's inpainting
  model was trained on synthetic masks with a quarter of them filling in
  everything: 'box' fills a rectangle with sides of 1/4 to 3/4 of the
  image's; 'stroke' 1 to 4 thick line segments (radius 1/16 to 1/8 of the
  shorter side, at least 0.75 pixels) between uniform end points; 'half'
  one of the four halves (outpainting); 'all_filled' the whole image, so
  the model also generates from nothing. A pure function of `rng`.
  """
  probabilities = jnp.asarray([fractions[k] for k in RANDOM_KINDS])
  kind_rng, shape_rng = jax.random.split(rng)
  kinds = jax.random.choice(
    kind_rng, len(RANDOM_KINDS), (batch_size,), p=probabilities
  )
  centres = _pixel_centres(height, width)

  def every_kind(key):  # [len(RANDOM_KINDS), H, W], True where filled in.
    box_rng, stroke_rng, half_rng = jax.random.split(key, 3)
    return jnp.stack(
      [
        _box(box_rng, centres, height, width),
        _strokes(stroke_rng, centres, height, width),
        _half(half_rng, centres, height, width),
        jnp.ones((height, width), bool),
      ]
    )

  fills = jax.vmap(every_kind)(jax.random.split(shape_rng, batch_size))
  fill = jnp.take_along_axis(fills, kinds[:, None, None, None], axis=1)[:, 0]
  return (~fill).astype(jnp.float32)[..., None]


def _pixel_centres(height: int, width: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(rows, columns) of the pixel centres, [H, 1] and [1, W], in pixels."""
  return (
    jnp.arange(height, dtype=jnp.float32)[:, None] + 0.5,
    jnp.arange(width, dtype=jnp.float32)[None, :] + 0.5,
  )


def _box(rng, centres, height: int, width: int) -> jnp.ndarray:
  """A filled rectangle, sides 1/4 to 3/4 of the image's, placed uniformly."""
  rows, cols = centres
  size_rng, place_rng = jax.random.split(rng)
  sides = jnp.asarray([height, width], jnp.float32)
  size = sides * jax.random.uniform(
    size_rng, (2,), minval=_BOX_SIDES[0], maxval=_BOX_SIDES[1]
  )
  corner = (sides - size) * jax.random.uniform(place_rng, (2,))
  inside_rows = (rows >= corner[0]) & (rows < corner[0] + size[0])
  inside_cols = (cols >= corner[1]) & (cols < corner[1] + size[1])
  return inside_rows & inside_cols


def _strokes(rng, centres, height: int, width: int) -> jnp.ndarray:
  """1 to `_MAX_STROKES` thick segments between uniform end points."""
  rows, cols = centres
  count_rng, ends_rng, radius_rng = jax.random.split(rng, 3)
  count = jax.random.randint(count_rng, (), 1, _MAX_STROKES + 1)
  sides = jnp.asarray([height, width], jnp.float32)
  ends = sides * jax.random.uniform(ends_rng, (_MAX_STROKES, 2, 2))
  shorter = min(height, width)
  radii = jnp.maximum(
    _MIN_RADIUS,
    shorter
    * jax.random.uniform(
      radius_rng,
      (_MAX_STROKES,),
      minval=_STROKE_RADII[0],
      maxval=_STROKE_RADII[1],
    ),
  )
  point = jnp.stack(jnp.broadcast_arrays(rows, cols), axis=-1)  # [H, W, 2]

  def segment(ends, radius):
    start, end = ends
    direction = end - start
    along = jnp.clip(
      jnp.sum((point - start) * direction, -1)
      / jnp.maximum(jnp.sum(direction**2), 1e-12),
      0.0,
      1.0,
    )
    nearest = start + along[..., None] * direction
    return jnp.sum((point - nearest) ** 2, -1) < radius**2

  drawn = jax.vmap(segment)(ends, radii)  # [_MAX_STROKES, H, W]
  used = jnp.arange(_MAX_STROKES) < count
  return jnp.any(drawn & used[:, None, None], axis=0)


def _half(rng, centres, height: int, width: int) -> jnp.ndarray:
  """One of the left, right, top and bottom halves, uniformly."""
  rows, cols = centres
  halves = jnp.stack(
    jnp.broadcast_arrays(
      cols < width / 2, cols > width / 2, rows < height / 2, rows > height / 2
    )
  )
  return halves[jax.random.randint(rng, (), 0, 4)]
