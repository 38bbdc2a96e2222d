"""Where diffusion runs: how data reach the diffusion model and back.

A `Space` maps images (float [B, H, W, C] in [−1, 1]) to the diffusion
model's inputs x (`encode`) and its outputs back to images (`decode`), and
says the range x̂ is clipped to while sampling. Samplers work in the
diffusion space; only `decode` turns their results into images that are
shown, saved or scored. Pixel space is the identity; a latent space encodes
with a frozen autoencoder whose params arrive as `space_params` (an
argument of every jitted function, never a constant baked into it).
"""

import dataclasses
from typing import Any

import jax.numpy as jnp
import ml_collections

from gdd import masks


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


@dataclasses.dataclass(frozen=True)
class LatentSpace:
  """Diffusion on the scaled latents of a frozen KL autoencoder (method §9).

  x = s · mean(E(image)): the posterior mean, not a sample, so that the
  latents of an image are a function of the image (the data stream, and so
  every stage's batches, stay a pure function of the step, and a teacher
  and its student see the same x); with the small KL weight of a latent
  diffusion autoencoder the posterior's std is tiny next to the spread of
  the means, so a sample would add little but noise. s = 1 / std of the
  training latents (the autoencoder stage measures it; Stable Diffusion's
  0.18215 is that number for its VAE) gives x unit scale, as the diffusion
  schedule assumes. No clipping of x̂ while sampling (latents have no fixed
  range; Stable Diffusion does not clip them either); decoded images are
  clipped to the data range [−1, 1].

  `space_params`: {'autoencoder': the autoencoder's params,
  'scaling_factor': float32 s}.

  Attributes:
    autoencoder: the autoencoder network (`gdd.models.autoencoder`).
    shape: (h, w, c) of one latent, the diffusion's shape.
    image_shape: (H, W, C) of the images encoded and decoded.
  """

  autoencoder: Any
  shape: tuple[int, int, int]
  image_shape: tuple[int, int, int]
  clip = None

  def encode(self, space_params: Any, images: jnp.ndarray) -> jnp.ndarray:
    """Images in [−1, 1] → scaled posterior means x."""
    mean, _ = self.autoencoder.apply(
      {'params': space_params['autoencoder']}, images, method='encode'
    )
    return mean * space_params['scaling_factor']

  def decode(self, space_params: Any, x: jnp.ndarray) -> jnp.ndarray:
    """Latents x → images in [−1, 1] (the decoder's output, clipped)."""
    images = self.autoencoder.apply(
      {'params': space_params['autoencoder']},
      x / space_params['scaling_factor'],
      method='decode',
    )
    return jnp.clip(images, -1.0, 1.0)


def encode_masked(
  space, space_params: Any, images: jnp.ndarray, mask: jnp.ndarray
) -> jnp.ndarray:
  """Stable Diffusion's inpainting input: the encoded images with the region
  to fill in zeroed (`conditioning.INPAINTING_INPUTS`' 'masked_image').

  `mask` is at the diffusion space's size (1 kept, `masks.to_space`) and
  is repeated back over the pixels, so the network's mask and the zeroed
  pixels are one region. (SD's pipeline zeroes the user's pixel mask and
  resizes it to the latents; the two agree on masks aligned with the
  latent grid.) The posterior mean, as every `LatentSpace.encode`, where
  SD's pipeline draws a sample.
  """
  pixel_mask = masks.to_images(mask, space.image_shape)
  return space.encode(space_params, images * pixel_mask)


def pixel_space(
  config: ml_collections.ConfigDict, image_shape: tuple[int, int, int]
) -> PixelSpace:
  """The pixel space of `image_shape`, clipped as `config.diffusion` says."""
  return PixelSpace(
    shape=tuple(image_shape),
    clip=(-1.0, 1.0) if config.diffusion.clip_x else None,
  )
