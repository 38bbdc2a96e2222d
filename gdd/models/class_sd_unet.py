"""A class-conditional denoiser: the SD U-Net with a class embedding, no text.

The network of class-conditional latent chains (ImageNet 256), behind the
same interface as the pixel `UNet` and the `TextUNet` — `(z, logsnr, cond,
w, *, train)` with cond = {'label': int [B]}, K the null label
(`conditioning.ClassConditioning`) — so every stage, loss, sampler and
guidance rule uses it unchanged. The labels go through the SD U-Net's class
embedding (diffusers' `num_class_embeds`, one row more for ∅), added to the
time embedding; there is no text encoder, and the U-Net's transformers have
self-attention and no cross-attention (`sd_unet.SDUNetConfig` with
cross_attention_dim=None, its module docstring says how). Params:
{'unet': …} with `sd_unet`'s names, as in `TextUNet`; a student adds only
'unet/w_embedding' (zero-initialised), so it equals its teacher at init.
Nothing is frozen: the whole network trains in every stage.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from gdd import conditioning
from gdd.models import layers, sd_unet


@dataclasses.dataclass(frozen=True)
class ClassSDUNetConfig(sd_unet.WrapsSDUNet):
  """An SD U-Net with classes and without text."""

  unet: sd_unet.SDUNetConfig

  def __post_init__(self):
    if self.unet.num_class_embeds is None:
      raise ValueError(
        'A class-conditional SD U-Net needs num_class_embeds=K (the number '
        'of classes; row K is the null label).'
      )
    if self.unet.cross_attention_dim is not None:
      raise ValueError(
        'A class-conditional SD U-Net has no text to cross-attend to: build '
        'it with cross_attention_dim=None (self-attention transformers).'
      )


class ClassSDUNet(nn.Module):
  """Class labels → SD U-Net output on latents z."""

  config: ClassSDUNetConfig

  @nn.compact
  def __call__(
    self,
    z: jnp.ndarray,
    logsnr: jnp.ndarray,
    cond: dict,
    w: jnp.ndarray | None = None,
    *,
    train: bool,
  ) -> jnp.ndarray:
    """Raw network output; cond = {'label': int [B] in [0, K]} (and an
    inpainting network's known region, 'mask' and 'masked')."""
    layers.check_cond(
      cond,
      'label',
      'int [B]',
      'class-conditional network',
      inpainting=self.config.inpainting,
    )
    return sd_unet.SDUNet(self.config.unet, name='unet')(
      z,
      logsnr,
      None,
      cond['label'],
      w,
      known=conditioning.known_region(cond) if self.config.inpainting else None,
      train=train,
    )

  def example_inputs(self, batch_size: int) -> tuple:
    """(z, logsnr, cond, w) of the shapes the network takes, for init."""
    cfg = self.config.unet
    z = jnp.zeros(
      (batch_size, cfg.sample_size, cfg.sample_size, cfg.in_channels)
    )
    cond = {'label': jnp.zeros((batch_size,), jnp.int32)}
    cond = layers.example_cond(cond, z, inpainting=cfg.inpainting)
    w = jnp.zeros((batch_size,)) if cfg.use_w_embedding else None
    return z, jnp.zeros((batch_size,)), cond, w
