"""Image conversions and sample grids shared by training logs and sampling."""

import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFont

from gdd import paths


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats → uint8 [0, 255], rounding to nearest."""
  images = np.asarray(images, np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(
  images: np.ndarray, num_rows: int, padding: int = 1
) -> np.ndarray:
  """Tiles uint8 [N, H, W, C] images into one [rows·H, cols·W, C] image.

  Images fill rows first; a partial last row is padded with black.
  """
  n, h, w, c = images.shape
  num_cols = -(-n // num_rows)
  grid = np.zeros(
    (
      num_rows * (h + padding) + padding,
      num_cols * (w + padding) + padding,
      c,
    ),
    images.dtype,
  )
  for index, image in enumerate(images):
    row, col = divmod(index, num_cols)
    top = padding + row * (h + padding)
    left = padding + col * (w + padding)
    grid[top : top + h, left : left + w] = image
  return grid


def side_by_side(grids: list[np.ndarray], gap: int = 2) -> np.ndarray:
  """Joins equally tall uint8 [H, W_i, C] grids left to right, white gaps."""
  height, _, channels = grids[0].shape
  gap_column = np.full((height, gap, channels), 255, grids[0].dtype)
  parts = [gap_column] * (2 * len(grids) - 1)
  parts[::2] = grids
  return np.concatenate(parts, axis=1)


def save_png(path: epath.PathLike, image: np.ndarray, upscale: int = 1) -> None:
  """Writes a uint8 [H, W, C] image, optionally upscaled (nearest)."""
  if upscale > 1:
    image = image.repeat(upscale, axis=0).repeat(upscale, axis=1)
  if image.shape[-1] == 1:
    image = image[..., 0]
  path = paths.resolve(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    Image.fromarray(image).save(f, format='PNG')


def with_row_titles(
  grid: np.ndarray, titles: list[str], upscale: int = 1
) -> np.ndarray:
  """The grid (upscaled), with each row's title (a caption) at its left.

  `titles` has one entry per row of images; the grid's rows are equally
  tall (`make_grid`). Returns uint8 RGB [H·upscale, text + W·upscale, 3].
  """
  image = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
  if image.shape[-1] == 1:
    image = image.repeat(3, axis=-1)
  font = ImageFont.load_default()
  measure = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  text_width = 8 + int(max(measure.textlength(t, font=font) for t in titles))
  canvas = Image.new('RGB', (text_width + image.shape[1], image.shape[0]))
  canvas.paste((255, 255, 255), (0, 0, text_width, image.shape[0]))
  canvas.paste(Image.fromarray(image), (text_width, 0))
  draw = ImageDraw.Draw(canvas)
  row_height = image.shape[0] / len(titles)
  for row, title in enumerate(titles):
    middle = (row + 0.5) * row_height
    draw.text((4, middle), title, fill=(0, 0, 0), font=font, anchor='lm')
  return np.asarray(canvas)


def display_scale(image_size: int) -> int:
  """A nearest-neighbour upscale that makes small images viewable (≥ 64 px)."""
  return max(1, 64 // image_size)
