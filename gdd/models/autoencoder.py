"""The KL autoencoder of latent diffusion: images ↔ latents (Flax linen).

A port of diffusers' `AutoencoderKL` (Stable Diffusion's VAE; Rombach et al.
2022, "High-Resolution Image Synthesis with Latent Diffusion Models"), so that
its trained weights load by renaming alone:

  encoder: conv_in → down_blocks_i (resnets_j, downsamplers_0 but on the last
    level) → mid_block (resnets_0, attentions_0, resnets_1) → conv_norm_out →
    SiLU → conv_out (2·latent_channels: mean and log-variance)
  quant_conv (1x1) → DiagonalGaussian → post_quant_conv (1x1)
  decoder: conv_in → mid_block → up_blocks_i (levels in reversed channel
    order, layers_per_block + 1 resnets, upsamplers_0 but on the last) →
    conv_norm_out → SiLU → conv_out

Param paths are diffusers' state-dict keys with these rules:
  - a PyTorch list index `.i` is a Flax suffix `_i`:
    `encoder.down_blocks.0.resnets.1.conv1.weight` ↔
    `encoder/down_blocks_0/resnets_1/conv1/kernel`,
    `encoder.mid_block.attentions.0.to_out.0.weight` ↔
    `encoder/mid_block/attentions_0/to_out_0/kernel`;
  - `weight` is `kernel` for convs and linears, `scale` for group norms;
    `bias` is `bias`;
  - conv kernels are HWIO here and OIHW in PyTorch (transpose (2, 3, 1, 0));
    linear kernels are [in, out] here and [out, in] in PyTorch (transpose).
  Checkpoints saved by old diffusers versions name the attention projections
  `query`/`key`/`value`/`proj_attn` (diffusers renames them on load to
  `to_q`/`to_k`/`to_v`/`to_out.0`); the original LDM checkpoints use another
  layout altogether (`encoder.down.0.block.1...`) and 1x1-conv attention.

Inputs and outputs are NHWC. Differences from diffusers, none of which
changes what trained weights compute:
  - initialisation is gdd's (Flax defaults; the last conv of each resnet and
    the attention output projection start at zero, so blocks start as the
    identity), not PyTorch's;
  - no dropout: `AutoencoderKL` always builds its resnets with dropout 0;
  - the scaling factor is not part of the network: gdd estimates it from
    data and stores it with the latent space.

Every layer computes in `dtype` with float32 params; group-norm statistics
and the attention softmax are float32 whatever `dtype` is, and the encoder's
and decoder's output heads (norm, SiLU, conv_out, and the 1x1 quant convs)
run in float32, so means, log-variances and images are float32.
"""

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from gdd import checks
from gdd.models import layers

Dtype = Any

# Bounds on the log-variance, as diffusers' DiagonalGaussianDistribution: an
# untrained or diverging encoder then cannot make exp(logvar) overflow.
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0
RECONSTRUCTION_LOSSES = ('l1', 'l2')

# diffusers' GroupNorm epsilon throughout the VAE.
_NORM_EPS = 1e-6
_zeros = nn.initializers.zeros_init()


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig(layers.CheckedConfig):
  """Shape of an `Autoencoder`; the defaults are Stable Diffusion's VAE.

  The fields are `AutoencoderKL`'s config keys. There are
  len(block_out_channels) levels, each halving H and W but the last, so
  latents are `downsampling_factor` = 2^(levels − 1) times smaller than
  images. `dtype` is the compute dtype; `remat` (one of
  `config_lib.REMAT_POLICIES`) says what each resnet and attention block
  recomputes in the backward pass; neither changes the params.
  """

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  mid_block_add_attention: bool = True
  dtype: str = 'float32'
  remat: str = 'none'

  def __post_init__(self):
    # ConfigDicts give lists; a tuple keeps the config hashable.
    object.__setattr__(
      self, 'block_out_channels', tuple(self.block_out_channels)
    )
    for name in (
      'in_channels',
      'out_channels',
      'latent_channels',
      'layers_per_block',
      'norm_num_groups',
    ):
      self._require(checks.is_int(getattr(self, name)), name, 'a positive int')
    self._require(
      bool(self.block_out_channels)
      and all(map(checks.is_int, self.block_out_channels)),
      'block_out_channels',
      'a non-empty tuple of positive ints',
    )
    self._require(
      all(c % self.norm_num_groups == 0 for c in self.block_out_channels),
      'norm_num_groups',
      f'a divisor of every channel count in block_out_channels '
      f'{self.block_out_channels}',
    )
    self._require(
      isinstance(self.mid_block_add_attention, bool),
      'mid_block_add_attention',
      'a bool',
    )
    self._check_dtype_and_remat()

  @property
  def downsampling_factor(self) -> int:
    """Image size over latent size: 2^(levels − 1)."""
    return 2 ** (len(self.block_out_channels) - 1)


def _group_norm(
  x: jnp.ndarray, groups: int, dtype: Dtype, name: str
) -> jnp.ndarray:
  """GroupNorm with `groups` groups, float32 statistics, output in `dtype`.

  As `layers.group_norm`, but the group count is the config's (diffusers'
  `norm_num_groups`) rather than derived from the channels, and epsilon is
  diffusers'. Must be called inside a compact method.
  """
  return nn.GroupNorm(
    num_groups=groups,
    epsilon=_NORM_EPS,
    dtype=dtype,
    force_float32_reductions=True,
    name=name,
  )(x)


class ResnetBlock(nn.Module):
  """diffusers' `ResnetBlock2D` without time embedding.

  GroupNorm → SiLU → conv3x3 → GroupNorm → SiLU → conv3x3 (zero-initialised),
  plus a 1x1 `conv_shortcut` when the channel count changes.
  """

  out_channels: int
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    conv = functools.partial(nn.Conv, self.out_channels, dtype=self.dtype)
    h = nn.swish(_group_norm(x, self.groups, self.dtype, 'norm1'))
    h = conv((3, 3), name='conv1')(h)
    h = nn.swish(_group_norm(h, self.groups, self.dtype, 'norm2'))
    h = conv((3, 3), kernel_init=_zeros, name='conv2')(h)
    if x.shape[-1] != self.out_channels:
      x = conv((1, 1), name='conv_shortcut')(x)
    return x + h


class Attention(nn.Module):
  """diffusers' VAE `Attention`: one head over all pixels, added residually.

  GroupNorm, then q/k/v linear projections of all C channels (one head of
  size C, so logits are scaled by 1/√C), then the output projection
  `to_out_0` (zero-initialised). `jax.nn.dot_product_attention` computes
  the logits and softmax in float32 whatever `dtype` is (see
  `layers.AttentionBlock`).
  """

  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    batch, height, width, channels = x.shape
    h = _group_norm(x, self.groups, self.dtype, 'group_norm')
    # [B, T, N=1, C]: all pixels as tokens, a single head.
    h = h.reshape(batch, height * width, 1, channels)
    q, k, v = (
      nn.Dense(channels, dtype=self.dtype, name=name)(h)
      for name in ('to_q', 'to_k', 'to_v')
    )
    h = jax.nn.dot_product_attention(q, k, v, implementation=None)
    h = nn.Dense(
      channels, kernel_init=_zeros, dtype=self.dtype, name='to_out_0'
    )(h)
    return x + h.reshape(x.shape)


class Downsample(nn.Module):
  """diffusers' `Downsample2D(padding=0)`: pad right/bottom by 1, 3x3/2 conv.

  The asymmetric padding (none on the left and top) is what the trained
  weights expect; a symmetric 'SAME' pad would shift every output by one
  pixel on odd sizes.
  """

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    return nn.Conv(
      x.shape[-1],
      (3, 3),
      strides=(2, 2),
      padding=((0, 1), (0, 1)),
      dtype=self.dtype,
      name='conv',
    )(x)


def _block_classes(cfg: AutoencoderConfig) -> tuple[type, type]:
  """The resnet and attention classes under the config's remat policy."""
  return (
    layers.remat(ResnetBlock, cfg.remat),
    layers.remat(Attention, cfg.remat),
  )


class MidBlock(nn.Module):
  """diffusers' `UNetMidBlock2D`: resnet, attention (optional), resnet."""

  config: AutoencoderConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    resnet_cls, attention_cls = _block_classes(cfg)
    dtype = jnp.dtype(cfg.dtype)
    channels = x.shape[-1]
    groups = cfg.norm_num_groups
    x = resnet_cls(channels, groups, dtype, name='resnets_0')(x)
    if cfg.mid_block_add_attention:
      x = attention_cls(groups, dtype, name='attentions_0')(x)
    return resnet_cls(channels, groups, dtype, name='resnets_1')(x)


class ResnetStack(nn.Module):
  """`DownEncoderBlock2D` / `UpDecoderBlock2D`: resnets, then a resampler.

  `resample` is None (no resampler, the last level), 'down'
  (`downsamplers_0`) or 'up' (`upsamplers_0`: nearest ×2 and a 3x3 conv,
  `layers.Upsample`).
  """

  config: AutoencoderConfig
  out_channels: int
  num_resnets: int
  resample: str | None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    resnet_cls, _ = _block_classes(cfg)
    dtype = jnp.dtype(cfg.dtype)
    for i in range(self.num_resnets):
      x = resnet_cls(
        self.out_channels, cfg.norm_num_groups, dtype, name=f'resnets_{i}'
      )(x)
    if self.resample == 'down':
      x = Downsample(dtype, name='downsamplers_0')(x)
    elif self.resample == 'up':
      x = layers.Upsample(dtype, name='upsamplers_0')(x)
    return x


def _output_head(
  h: jnp.ndarray, cfg: AutoencoderConfig, features: int
) -> jnp.ndarray:
  """conv_norm_out → SiLU → conv_out, in float32 (inside a compact method).

  The head's output is the posterior's moments or the image, which losses
  and the diffusion model consume; at one conv it is cheap to keep exact.
  """
  h = _group_norm(
    h.astype(jnp.float32), cfg.norm_num_groups, jnp.float32, 'conv_norm_out'
  )
  return nn.Conv(features, (3, 3), dtype=jnp.float32, name='conv_out')(
    nn.swish(h)
  )


class Encoder(nn.Module):
  """Images [B, H, W, in_channels] → moments [B, h, w, 2·latent_channels]."""

  config: AutoencoderConfig

  @nn.compact
  def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    channels = cfg.block_out_channels
    h = nn.Conv(channels[0], (3, 3), dtype=dtype, name='conv_in')(
      images.astype(dtype)
    )
    for level, out_channels in enumerate(channels):
      last = level == len(channels) - 1
      h = ResnetStack(
        cfg,
        out_channels,
        cfg.layers_per_block,
        None if last else 'down',
        name=f'down_blocks_{level}',
      )(h)
    h = MidBlock(cfg, name='mid_block')(h)
    return _output_head(h, cfg, 2 * cfg.latent_channels)


class Decoder(nn.Module):
  """Latents [B, h, w, latent_channels] → images [B, H, W, out_channels]."""

  config: AutoencoderConfig

  @nn.compact
  def __call__(self, latents: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    channels = cfg.block_out_channels[::-1]
    h = nn.Conv(channels[0], (3, 3), dtype=dtype, name='conv_in')(
      latents.astype(dtype)
    )
    h = MidBlock(cfg, name='mid_block')(h)
    for i, out_channels in enumerate(channels):
      last = i == len(channels) - 1
      h = ResnetStack(
        cfg,
        out_channels,
        cfg.layers_per_block + 1,
        None if last else 'up',
        name=f'up_blocks_{i}',
      )(h)
    return _output_head(h, cfg, cfg.out_channels)


def kl_divergence(mean: jnp.ndarray, logvar: jnp.ndarray) -> jnp.ndarray:
  """KL(N(mean, exp(logvar)) ‖ N(0, I)) of each latent, summed: [B].

  Per dimension ½(μ² + σ² − 1 − log σ²), summed over all but the batch
  axis, as diffusers' `DiagonalGaussianDistribution.kl()`. Float32.
  """
  mean = jnp.asarray(mean, jnp.float32)
  logvar = jnp.asarray(logvar, jnp.float32)
  if mean.shape != logvar.shape or mean.ndim < 2:
    raise ValueError(
      'mean and logvar must have the same shape [B, ...]; got '
      f'{mean.shape} and {logvar.shape}.'
    )
  per_dim = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return per_dim.sum(axis=tuple(range(1, mean.ndim)))


@flax.struct.dataclass
class DiagonalGaussian:
  """The encoder's posterior q(z | x) = N(mean, exp(logvar)), elementwise.

  A pytree (it passes through jit). Build it with `from_moments`, which
  clips the log-variance as diffusers does.
  """

  mean: jnp.ndarray
  logvar: jnp.ndarray

  @classmethod
  def from_moments(cls, moments: jnp.ndarray) -> 'DiagonalGaussian':
    """Splits [..., 2L] moments into mean (first L) and clipped logvar."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return cls(mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

  @property
  def std(self) -> jnp.ndarray:
    """exp(logvar / 2), elementwise."""
    return jnp.exp(0.5 * self.logvar)

  def sample(self, rng: jax.Array) -> jnp.ndarray:
    """mean + std·ε with ε ~ N(0, I) drawn from `rng`."""
    noise = jax.random.normal(rng, self.mean.shape, self.mean.dtype)
    return self.mean + self.std * noise

  def mode(self) -> jnp.ndarray:
    """The most likely latent: the mean."""
    return self.mean

  def kl(self) -> jnp.ndarray:
    """`kl_divergence` against N(0, I), one value per batch element."""
    return kl_divergence(self.mean, self.logvar)


class Autoencoder(nn.Module):
  """diffusers' `AutoencoderKL` on NHWC images in [−1, 1].

  `encode` and `decode` are the two halves, for `model.apply(params, x,
  method='encode')`; `__call__` runs both. All outputs are float32.
  """

  config: AutoencoderConfig

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg)
    self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1))
    self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1))
    self.decoder = Decoder(cfg)

  def encode(self, images: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Images [B, H, W, in_channels] → posterior (mean, clipped logvar).

    Both are [B, H/f, W/f, latent_channels], f = downsampling_factor; H and
    W must be multiples of f, so that decoding gives back the image size.
    """
    cfg = self.config
    factor = cfg.downsampling_factor
    if (
      images.ndim != 4
      or images.shape[-1] != cfg.in_channels
      or images.shape[1] % factor
      or images.shape[2] % factor
    ):
      raise ValueError(
        f'images must have shape [B, H, W, {cfg.in_channels}] with H and W '
        f'multiples of the downsampling factor {factor}; got {images.shape}.'
      )
    moments = self.quant_conv(self.encoder(images).astype(jnp.float32))
    posterior = DiagonalGaussian.from_moments(moments)
    return posterior.mean, posterior.logvar

  def decode(self, latents: jnp.ndarray) -> jnp.ndarray:
    """Latents [B, h, w, latent_channels] → images [B, f·h, f·w, C]."""
    channels = self.config.latent_channels
    if latents.ndim != 4 or latents.shape[-1] != channels:
      raise ValueError(
        f'latents must have shape [B, h, w, {channels}]; got {latents.shape}.'
      )
    h = self.post_quant_conv(latents.astype(jnp.float32))
    return self.decoder(h).astype(jnp.float32)

  def __call__(
    self,
    images: jnp.ndarray,
    rng: jax.Array | None = None,
    *,
    sample_posterior: bool,
  ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Encodes, takes a posterior sample (or its mean), decodes.

    Args:
      images: [B, H, W, in_channels] in [−1, 1].
      rng: the posterior sample's key; required iff `sample_posterior`.
      sample_posterior: decode z ~ q(z | x) (training) rather than its mean.

    Returns:
      (reconstruction [B, H, W, out_channels], mean, logvar).
    """
    if sample_posterior != (rng is not None):
      raise ValueError(
        'Pass rng exactly when sample_posterior=True (it draws the '
        f'posterior sample); got sample_posterior={sample_posterior} and '
        f'rng={"None" if rng is None else "a key"}.'
      )
    mean, logvar = self.encode(images)
    posterior = DiagonalGaussian(mean, logvar)
    latents = posterior.sample(rng) if sample_posterior else posterior.mode()
    return self.decode(latents), mean, logvar


def autoencoder_loss(
  images: jnp.ndarray,
  reconstruction: jnp.ndarray,
  mean: jnp.ndarray,
  logvar: jnp.ndarray,
  *,
  kl_weight: float,
  reconstruction_loss: str = 'l1',
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Reconstruction + kl_weight·KL, averaged over the batch.

  As the LDM autoencoder's loss without its perceptual and adversarial
  terms: the reconstruction error (|x − x̂| for 'l1', (x − x̂)² for 'l2') is
  summed over each image's pixels and channels, the KL over its latent, so
  LDM's kl_weight (1e-6) keeps its meaning.

  Returns:
    (loss, {'loss', 'reconstruction', 'kl'}), scalars, for
    `jax.value_and_grad(..., has_aux=True)`.
  """
  if reconstruction_loss not in RECONSTRUCTION_LOSSES:
    raise ValueError(
      f'reconstruction_loss={reconstruction_loss!r}; must be one of '
      f'{RECONSTRUCTION_LOSSES}.'
    )
  if images.shape != reconstruction.shape:
    raise ValueError(
      f'images {images.shape} and reconstruction {reconstruction.shape} '
      'must have the same shape.'
    )
  error = jnp.asarray(reconstruction, jnp.float32) - images
  error = jnp.abs(error) if reconstruction_loss == 'l1' else jnp.square(error)
  rec = error.sum(axis=(1, 2, 3)).mean()
  kl = kl_divergence(mean, logvar).mean()
  loss = rec + kl_weight * kl
  return loss, {'loss': loss, 'reconstruction': rec, 'kl': kl}


def psnr(images: jnp.ndarray, reconstruction: jnp.ndarray) -> jnp.ndarray:
  """Peak signal-to-noise ratio in dB of each image in [−1, 1]: [B].

  10·log10(peak² / MSE) with peak = 2, the range of [−1, 1] (the same value
  as for both images mapped to [0, 1] with peak 1). Identical images give
  +inf.
  """
  if images.shape != reconstruction.shape or images.ndim < 2:
    raise ValueError(
      f'images {images.shape} and reconstruction {reconstruction.shape} '
      'must have the same shape [B, ...].'
    )
  error = jnp.asarray(reconstruction, jnp.float32) - images
  mse = jnp.square(error).mean(axis=tuple(range(1, images.ndim)))
  return 10.0 * jnp.log10(4.0 / mse)
