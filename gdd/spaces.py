"""Where diffusion runs: how data reach the diffusion model and back.

A `Space` maps images (float [B, H, W, C] in [−1, 1]) to the diffusion
model's inputs x (`encode`) and its outputs back to images (`decode`), and
says the range x̂ is clipped to while sampling. Samplers work in the
diffusion space; only `decode` turns their results into images that are
shown, saved or scored. Pixel space is the identity; a latent space encodes
with a frozen autoencoder whose params arrive as `space_params`.
"""

import dataclasses
from typing import Any

import jax.numpy as jnp
import ml_collections


@dataclasses.dataclass(frozen=True)
class PixelSpace:
  """Diffusion on the pixels themselves: encode and decode are identities.

  Attributes:
    shape: (H, W, C) of one example, the images' and the diffusion's shape.
    clip: the range x̂ is clipped to before each sampler step (the data
      range [−1, 1]), or None for no clipping (`config.diffusion.clip_x`).
  """

  shape: tuple[int, int, int]
  clip: tuple[float, float] | None

  def encode(self, space_params: Any, images: jnp.ndarray) -> jnp.ndarray:
    """Images in [−1, 1] → diffusion inputs x (here the images)."""
    del space_params  # Pixel space has no network.
    return images

  def decode(self, space_params: Any, x: jnp.ndarray) -> jnp.ndarray:
    """Diffusion outputs x → images in [−1, 1] (here x itself)."""
    del space_params
    return x

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the images `encode` takes and `decode` returns."""
    return self.shape


def pixel_space(
  config: ml_collections.ConfigDict, image_shape: tuple[int, int, int]
) -> PixelSpace:
  """The pixel space of `image_shape`, clipped as `config.diffusion` says."""
  return PixelSpace(
    shape=tuple(image_shape),
    clip=(-1.0, 1.0) if config.diffusion.clip_x else None,
  )
