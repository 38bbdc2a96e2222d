"""A text-conditional denoiser: CLIP-style text encoder + SD U-Net.

The network of text-to-image chains, behind the same interface as the pixel
`UNet` — `(z, logsnr, cond, w, *, train)` with cond = {'tokens': int32
[B, L]} (`conditioning.TextConditioning`) — so every stage, loss, sampler
and guidance rule uses it unchanged. The tokens go through the text encoder
(`text_encoder.TextEncoder`); its per-token states are what the U-Net's
cross-attention reads (`sd_unet.SDUNet`), as in Stable Diffusion. Params:
{'text_encoder': …, 'unet': …}, each with its own module's names, so
converting Stable Diffusion weights maps each subtree on its own. A
student's w-embedding lives under 'unet/w_embedding'; every other param
has its teacher's path and shape. Which subtree trains in which stage is
the stage's business (`Stage.frozen_subtrees`), not the network's.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from gdd import conditioning
from gdd.models import layers, sd_unet, text_encoder


@dataclasses.dataclass(frozen=True)
class TextUNetConfig(sd_unet.WrapsSDUNet):
  """The two halves; the U-Net cross-attends to the encoder's width."""

  unet: sd_unet.SDUNetConfig
  text: text_encoder.TextEncoderConfig
  max_length: int

  def __post_init__(self):
    if self.unet.cross_attention_dim != self.text.hidden_size:
      raise ValueError(
        f'The U-Net cross-attends to {self.unet.cross_attention_dim}-wide '
        f'states but the text encoder gives {self.text.hidden_size}: '
        'cross_attention_dim must equal the text hidden_size.'
      )
    if self.max_length > self.text.max_position_embeddings:
      raise ValueError(
        f'max_length={self.max_length} token ids do not fit the text '
        f"encoder's {self.text.max_position_embeddings} positions."
      )


class TextUNet(nn.Module):
  """Captions' tokens → text states → SD U-Net output on latents z."""

  config: TextUNetConfig

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
    """Raw network output; cond = {'tokens': int32 [B, L]} (and an
    inpainting network's known region, 'mask' and 'masked')."""
    layers.check_cond(
      cond,
      'tokens',
      'int [B, L]',
      'text-conditional network',
      inpainting=self.config.inpainting,
    )
    states = text_encoder.TextEncoder(self.config.text, name='text_encoder')(
      cond['tokens']
    ).last_hidden_state
    return sd_unet.SDUNet(self.config.unet, name='unet')(
      z,
      logsnr,
      states,
      None,
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
    cond = {
      'tokens': text_encoder.example_tokens(batch_size, self.config.max_length)
    }
    cond = layers.example_cond(cond, z, inpainting=cfg.inpainting)
    w = jnp.zeros((batch_size,)) if cfg.use_w_embedding else None
    return z, jnp.zeros((batch_size,)), cond, w
