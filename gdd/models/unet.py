"""The U-Net denoiser: x / ε / v / (x, ε) output from (z_t, λ, c[, w]).

Architecture as in progressive distillation (google-research
diffusion_distillation `unet.py`, itself ADM-like); inputs as in method.md §2:
the time input t_in = arctan(exp(−λ/2))/(π/2), the class label with row K as
the null label ∅, and for students the guidance strength w through a
zero-initialised MLP under the `w_embedding` submodule. Every other param has
the same path and shape with and without w, so a student is initialised by
copying the teacher's tree and keeping its own fresh `w_embedding`. An
inpainting network (`inpainting`) also reads the known region (cond's
'mask' and 'masked') through a zero-initialised `conv_in_known`
(`layers.known_region_input`).
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from gdd import checks
from gdd.diffusion import parameterization, schedules
from gdd.models import layers


@dataclasses.dataclass(frozen=True)
class UNetConfig(layers.CheckedConfig):
  """Shape and conditioning of a `UNet`; validated on construction.

  `attn_resolutions` lists spatial sizes (e.g. 16, 8) whose res blocks are
  each followed by self-attention; the middle block always has attention.
  `dtype` is the compute dtype; params and the output are always float32.
  `remat` (one of `config_lib.REMAT_POLICIES`) says what each residual and
  attention block recomputes in the backward pass instead of storing; it
  changes memory and time, not params or results. `inpainting` adds the
  known region to the inputs (`layers.known_region_input`).
  """

  image_size: int
  in_channels: int
  num_classes: int
  ch: int = 64
  emb_ch: int = 256
  ch_mult: tuple[int, ...] = (1, 2)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = ()
  head_dim: int = 64
  dropout: float = 0.0
  mean_type: str = 'both'
  use_w_embedding: bool = False
  w_max: float = 4.0
  dtype: str = 'float32'
  remat: str = 'none'
  inpainting: bool = False

  def __post_init__(self):
    # Configs often arrive from ConfigDicts as lists; tuples keep the
    # dataclass hashable (usable as a static jit argument).
    object.__setattr__(self, 'ch_mult', tuple(self.ch_mult))
    object.__setattr__(self, 'attn_resolutions', tuple(self.attn_resolutions))
    self._check_sizes()
    self._check_options()
    self._check_attention_heads()

  def _check_sizes(self) -> None:
    """Positive int sizes; levels and attention fit the image size."""
    for name in (
      'image_size',
      'in_channels',
      'num_classes',
      'ch',
      'emb_ch',
      'num_res_blocks',
      'head_dim',
    ):
      self._require(checks.is_int(getattr(self, name)), name, 'a positive int')
    self._require(
      bool(self.ch_mult) and all(map(checks.is_int, self.ch_mult)),
      'ch_mult',
      'a non-empty tuple of positive ints',
    )
    factor = 2 ** (len(self.ch_mult) - 1)
    self._require(
      self.image_size % factor == 0,
      'image_size',
      f'divisible by 2**(len(ch_mult) - 1) = {factor}',
    )
    resolutions = self.resolutions
    self._require(
      all(r in resolutions for r in self.attn_resolutions),
      'attn_resolutions',
      f'a tuple of resolutions the network has, from {resolutions}',
    )

  def _check_options(self) -> None:
    """Dropout, output type, w scale, dtype and remat policy."""
    self._require(0.0 <= self.dropout < 1.0, 'dropout', 'in [0, 1)')
    self._require(
      self.mean_type in parameterization.MEAN_TYPES,
      'mean_type',
      f'one of {parameterization.MEAN_TYPES}',
    )
    self._require(self.w_max > 0, 'w_max', 'positive')
    self._require(isinstance(self.inpainting, bool), 'inpainting', 'a bool')
    self._check_dtype_and_remat()

  def _check_attention_heads(self) -> None:
    """Every attention block's channels split into equal heads."""
    attn_channels = {self.ch * self.ch_mult[-1]} | {
      self.ch * mult
      for mult, r in zip(self.ch_mult, self.resolutions, strict=True)
      if r in self.attn_resolutions
    }
    for channels in sorted(attn_channels):
      heads = layers.num_heads(channels, self.head_dim)
      self._require(
        channels % heads == 0,
        'head_dim',
        f'such that {channels} attention channels split into '
        f'{channels} // head_dim = {heads} equal heads',
      )

  @property
  def out_channels(self) -> int:
    """Output channels: (x̃, ε̃) stacked for 'both', else one image."""
    return (
      2 * self.in_channels if self.mean_type == 'both' else self.in_channels
    )

  @property
  def resolutions(self) -> tuple[int, ...]:
    """Spatial size of each level, from image_size down."""
    return tuple(self.image_size // 2**i for i in range(len(self.ch_mult)))


class UNet(nn.Module):
  """Class- (and optionally w-) conditional U-Net on [B, H, W, C] images."""

  config: UNetConfig

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
    """Raw network output for noisy images z at log-SNR λ.

    Args:
      z: [B, H, W, C] noisy images.
      logsnr: [B] log-SNR λ of each image.
      cond: {'label': [B] int class labels in [0, K]}; K is the null label
        (`conditioning.ClassConditioning`). An inpainting network's also
        holds 'mask' [B, H, W, 1] and 'masked' [B, H, W, C].
      w: [B] guidance strengths; required iff `config.use_w_embedding`.
      train: enables dropout, which then needs the 'dropout' rng.

    Returns:
      [B, H, W, config.out_channels] float32.
    """
    cfg = self.config
    self._check_inputs(z, logsnr, cond, w)
    emb = self._embedding(logsnr, cond['label'], w)
    # Argnum 3 of ResBlock.__call__ (self, x, emb, train) is a Python bool.
    res_block_cls = layers.remat(layers.ResBlock, cfg.remat, (3,))
    attention_cls = layers.remat(layers.AttentionBlock, cfg.remat)
    dtype = jnp.dtype(cfg.dtype)

    def res_block(h, out_ch, name):
      return res_block_cls(out_ch, cfg.dropout, dtype=dtype, name=name)(
        h, emb, train
      )

    def attention(h, name):
      return attention_cls(cfg.head_dim, dtype=dtype, name=name)(h)

    h = nn.Conv(cfg.ch, (3, 3), dtype=dtype, name='conv_in')(z.astype(dtype))
    if cfg.inpainting:
      h = h + layers.known_region_input(cond, z, cfg.ch, dtype)
    h, skips = self._down(h, res_block, attention)
    h = res_block(h, h.shape[-1], 'mid_block_0')
    h = attention(h, 'mid_attn')
    h = res_block(h, h.shape[-1], 'mid_block_1')
    return self._output_head(self._up(h, skips, res_block, attention))

  def example_inputs(self, batch_size: int) -> tuple:
    """(z, logsnr, cond, w) of the shapes the network takes, for init."""
    cfg = self.config
    z = jnp.zeros((batch_size, cfg.image_size, cfg.image_size, cfg.in_channels))
    cond = layers.example_cond(
      {'label': jnp.zeros((batch_size,), jnp.int32)},
      z,
      inpainting=cfg.inpainting,
    )
    w = jnp.zeros((batch_size,)) if cfg.use_w_embedding else None
    return z, jnp.zeros((batch_size,)), cond, w

  def _embedding(self, logsnr, labels, w) -> jnp.ndarray:
    """Time + class (+ w) embedding that every residual block reads."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    t_in = schedules.time_input(logsnr)
    emb = layers.EmbeddingMLP(cfg.emb_ch, dtype=dtype, name='time_embedding')(
      layers.sinusoidal_embedding(t_in * 1000.0, cfg.ch)
    )
    emb = emb + nn.Embed(
      cfg.num_classes + 1, cfg.emb_ch, dtype=dtype, name='class_embedding'
    )(labels)
    if cfg.use_w_embedding:
      emb = emb + layers.EmbeddingMLP(
        cfg.emb_ch, zero_init_output=True, dtype=dtype, name='w_embedding'
      )(layers.sinusoidal_embedding(w * 1000.0 / cfg.w_max, cfg.ch))
    return emb

  def _down(self, h, res_block, attention):
    """The down path; returns h and the skip activations, in order."""
    cfg = self.config
    skips = [h]
    last = len(cfg.ch_mult) - 1
    for level, mult in enumerate(cfg.ch_mult):
      for i in range(cfg.num_res_blocks):
        h = res_block(h, cfg.ch * mult, f'down_{level}_block_{i}')
        if h.shape[1] in cfg.attn_resolutions:
          h = attention(h, f'down_{level}_attn_{i}')
        skips.append(h)
      if level != last:
        h = layers.Downsample(
          dtype=jnp.dtype(cfg.dtype), name=f'down_{level}_downsample'
        )(h)
        skips.append(h)
    return h, skips

  def _up(self, h, skips, res_block, attention):
    """The up path, consuming the skips from the last one back."""
    cfg = self.config
    for level in reversed(range(len(cfg.ch_mult))):
      for i in range(cfg.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res_block(h, cfg.ch * cfg.ch_mult[level], f'up_{level}_block_{i}')
        if h.shape[1] in cfg.attn_resolutions:
          h = attention(h, f'up_{level}_attn_{i}')
      if level != 0:
        h = layers.Upsample(
          dtype=jnp.dtype(cfg.dtype), name=f'up_{level}_upsample'
        )(h)
    return h

  def _output_head(self, h) -> jnp.ndarray:
    """Norm, swish and the zero-initialised output conv, in float32.

    The head runs in float32 whatever the compute dtype: its output is the
    prediction that losses and samplers consume, and it costs one conv.
    """
    h = nn.swish(
      layers.group_norm(h.astype(jnp.float32), jnp.float32, 'norm_out')
    )
    return nn.Conv(
      self.config.out_channels,
      (3, 3),
      kernel_init=nn.initializers.zeros_init(),
      dtype=jnp.float32,
      name='conv_out',
    )(h)

  def _check_inputs(self, z, logsnr, cond, w) -> None:
    """Shape and presence checks; they run at trace time, so cost nothing."""
    cfg = self.config
    if cfg.use_w_embedding and w is None:
      raise ValueError(
        'This UNet has use_w_embedding=True, so w is required: pass the '
        'guidance strength w of shape [B] (e.g. jnp.zeros((B,)) at init).'
      )
    if not cfg.use_w_embedding and w is not None:
      raise ValueError(
        'This UNet has use_w_embedding=False but got w: pass w=None, or '
        'build the model with UNetConfig(use_w_embedding=True).'
      )
    size, channels = cfg.image_size, cfg.in_channels
    if z.ndim != 4 or z.shape[1:] != (size, size, channels):
      raise ValueError(
        f'z must have shape [B, {size}, {size}, {channels}]; got {z.shape}.'
      )
    batch = z.shape[0]
    layers.check_cond(
      cond,
      'label',
      'int [B]',
      'class-conditional UNet',
      inpainting=cfg.inpainting,
    )
    named = (('logsnr', logsnr), ("cond['label']", cond['label']), ('w', w))
    for name, value in named:
      if value is not None and jnp.shape(value) != (batch,):
        raise ValueError(
          f'{name} must have shape [B] = ({batch},); got {jnp.shape(value)}.'
        )
