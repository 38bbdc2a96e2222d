"""Building blocks of the U-Net: embeddings, residual, attention, resampling.

ADM / progressive-distillation style (google-research diffusion_distillation
`unet.py`). Every layer computes in `dtype` and keeps float32 params;
reductions (GroupNorm statistics, the attention softmax) run in float32 even
when `dtype` is bfloat16. Layers whose output is added to a residual stream
are zero-initialised, so each block starts as the identity and a new
conditioning path starts as a no-op.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gdd import conditioning, config_lib

Dtype = Any

_zeros = nn.initializers.zeros_init()

# What a rematerialised block keeps for the backward pass, by the names of
# `gdd.config_lib.REMAT_POLICIES`; everything else in the block is recomputed.
# 'dots_saveable' keeps the outputs of matmuls and convolutions (the expensive
# ops) and recomputes the cheap elementwise ones and the normalisations.
_REMAT_SAVEABLE = {
  'full': jax.checkpoint_policies.nothing_saveable,
  'dots_saveable': jax.checkpoint_policies.dots_saveable,
}


class CheckedConfig:
  """Base of the networks' frozen config dataclasses: one check rule.

  A bad field raises ValueError naming the class, the field, its value and
  what is allowed, before any network is built.
  """

  def _require(self, ok: bool, name: str, allowed: str) -> None:
    if not ok:
      value = getattr(self, name)
      raise ValueError(
        f'{type(self).__name__}.{name}={value!r}; must be {allowed}.'
      )

  def _check_dtype_and_remat(self) -> None:
    """The compute dtype and remat policy every network config has."""
    self._require(
      self.dtype in config_lib.DTYPES, 'dtype', f'one of {config_lib.DTYPES}'
    )
    self._require(
      self.remat in config_lib.REMAT_POLICIES,
      'remat',
      f'one of {config_lib.REMAT_POLICIES}',
    )


def check_cond(
  cond, key: str, expected: str, network: str, *, inpainting: bool = False
) -> None:
  """Raises ValueError unless cond is a dict of exactly `key` (and, for an
  inpainting network, the known region `conditioning.KNOWN_REGION`).

  `expected` describes the value (e.g. 'int [B]'), `network` the network
  (e.g. 'class-conditional UNet'), for the message.
  """
  keys = {key, *conditioning.KNOWN_REGION} if inpainting else {key}
  if not isinstance(cond, dict) or set(cond) != keys:
    got = sorted(cond) if isinstance(cond, dict) else ''
    wanted = f'{{{key!r}: {expected}}}' + (
      " with 'mask' [B, H, W, 1] and 'masked' [B, H, W, C] (the known "
      'region: `conditioning.with_known_region`)'
      if inpainting
      else ''
    )
    raise ValueError(
      f'cond must be {wanted} for this {network}; got '
      f'{type(cond).__name__} {got}.'
    )


def example_cond(cond: dict, z: jnp.ndarray, *, inpainting: bool) -> dict:
  """An init-time `cond`, with an all-zero known region if `inpainting`."""
  if not inpainting:
    return cond
  return conditioning.with_known_region(cond, z, jnp.zeros_like(z[..., :1]))


def known_region_input(
  cond: dict,
  z: jnp.ndarray,
  features: int,
  dtype: Dtype,
  *,
  inpainting_input: str = 'masked_latents',
) -> jnp.ndarray:
  """An inpainting network's extra input: a 3x3 conv of [mask, masked].

  Added to conv_in(z), it is conv_in of the 1 + 2C channels [z, mask,
  masked] (Stable Diffusion's inpainting U-Net: 4 + 1 + 4) split in two:
  conv_in keeps its name and shape, so a plain network's params fit, and
  this conv ('conv_in_known', no bias) starts at zero, so a fresh
  inpainting network computes exactly the plain one with the same other
  params. (An SD inpainting checkpoint's conv_in kernel splits along its
  input channels: [:4] → conv_in, [4:] → conv_in_known.) SD's network reads
  the mask as 1 = fill in: with `inpainting_input='masked_image'` (its
  input, `conditioning.INPAINTING_INPUTS`) the mask channel is 1 − mask.
  Must be called inside a compact method.
  """
  mask, masked = cond['mask'], cond['masked']
  if mask.shape != (*z.shape[:-1], 1) or masked.shape != z.shape:
    raise ValueError(
      f"cond['mask'] must have shape {(*z.shape[:-1], 1)} and "
      f"cond['masked'] {z.shape} (z's); got {mask.shape} and {masked.shape}."
    )
  if inpainting_input == 'masked_image':
    mask = 1.0 - mask
  known = jnp.concatenate([mask, masked], axis=-1).astype(dtype)
  return nn.Conv(
    features,
    (3, 3),
    use_bias=False,
    kernel_init=_zeros,
    dtype=dtype,
    name='conv_in_known',
  )(known)


def sinusoidal_embedding(
  x: jnp.ndarray,
  dim: int,
  max_period: float = 10000.0,
  *,
  flip_sin_to_cos: bool = True,
  freq_shift: float = 0.0,
) -> jnp.ndarray:
  """Sinusoidal features [cos(x f_i), sin(x f_i)] of a [B] input, [B, dim].

  The frequencies f_i = max_period^(−i/(half − freq_shift)), half = dim // 2,
  run geometrically from 1 down to about 1/max_period, so inputs spread over
  [0, 1000] (t_in·1000, w·1000/w_max) are resolved both coarsely and finely.
  An odd `dim` gets a zero last column. Always float32.

  `flip_sin_to_cos=False` puts the sines first; with `freq_shift` this is
  diffusers' `get_timestep_embedding` (its `downscale_freq_shift`), so a
  Stable Diffusion U-Net's time embedding can be reproduced exactly. The
  defaults are diffusers' `Timesteps(flip_sin_to_cos=True,
  downscale_freq_shift=0)`, the embedding of SD 1 and 2.
  """
  x = jnp.asarray(x, jnp.float32)
  if x.ndim != 1:
    raise ValueError(f'x must have shape [B]; got shape {x.shape}.')
  half = dim // 2
  freqs = jnp.exp(
    -math.log(max_period)
    * jnp.arange(half, dtype=jnp.float32)
    / (half - freq_shift)
  )
  args = x[:, None] * freqs[None, :]
  waves = [jnp.cos(args), jnp.sin(args)]
  emb = jnp.concatenate(waves if flip_sin_to_cos else waves[::-1], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def num_groups(channels: int, max_groups: int = 32) -> int:
  """GroupNorm groups: the largest divisor of `channels` that is ≤ 32."""
  return max(
    g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0
  )


def num_heads(channels: int, head_dim: int) -> int:
  """Attention heads for `channels`: channels // head_dim, at least 1."""
  return max(1, channels // head_dim)


def group_norm(
  x: jnp.ndarray,
  dtype: Dtype,
  name: str,
  *,
  groups: int | None = None,
  epsilon: float = 1e-6,
) -> jnp.ndarray:
  """GroupNorm over the last axis, output in `dtype`.

  `groups` defaults to `num_groups(channels)`; a Stable Diffusion U-Net
  passes its fixed `norm_num_groups` and its own `epsilon` instead.

  Mean and variance are float32 whatever `dtype` is: Flax's variance
  E[x²] − E[x]² cancels when the mean is large next to the spread, and
  bfloat16 keeps under 3 significant digits. Flax's default already does
  this; it is spelt out because the bfloat16 policy relies on it. Must be
  called inside a compact method (it creates a named submodule).
  """
  return nn.GroupNorm(
    num_groups=groups or num_groups(x.shape[-1]),
    epsilon=epsilon,
    dtype=dtype,
    force_float32_reductions=True,
    name=name,
  )(x)


def remat(
  module: type[nn.Module], policy: str, static_argnums: tuple[int, ...] = ()
) -> type[nn.Module]:
  """`module` recomputed in the backward pass under `policy`, or as is.

  Args:
    module: a Module class; its params keep their names and shapes, so
      checkpoints load whatever the policy.
    policy: one of `gdd.config_lib.REMAT_POLICIES`: 'none' returns `module`
      unchanged (every activation stored); 'full' stores only the block's
      inputs; 'dots_saveable' also stores its matmul and conv outputs.
    static_argnums: `__call__` arguments that are Python values (e.g. the
      `train` flag), counting `self` as 0; others would become tracers.
  """
  if policy == 'none':
    return module
  return nn.remat(
    module, policy=_REMAT_SAVEABLE[policy], static_argnums=static_argnums
  )


class EmbeddingMLP(nn.Module):
  """Dense → swish → Dense: sinusoidal features to the embedding width.

  `zero_init_output` zeroes the last layer's kernel and bias, so the MLP
  outputs exactly 0 until trained: a conditioning path added to a trained
  network (the student's w-embedding) then changes nothing at first.
  `layer_names` names the two Dense layers (diffusers' `TimestepEmbedding`
  calls them linear_1 and linear_2).
  """

  features: int
  zero_init_output: bool = False
  dtype: Dtype = jnp.float32
  layer_names: tuple[str, str] = ('dense_0', 'dense_1')

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    first, last = self.layer_names
    x = nn.Dense(self.features, dtype=self.dtype, name=first)(x)
    x = nn.swish(x)
    if self.zero_init_output:
      inits = dict(kernel_init=_zeros, bias_init=_zeros)
    else:
      inits = {}
    return nn.Dense(self.features, dtype=self.dtype, name=last, **inits)(x)


class ResBlock(nn.Module):
  """Residual block conditioned on the embedding by FiLM (scale and shift).

  GroupNorm → swish → conv3x3 → GroupNorm·(1 + scale) + shift → swish →
  dropout → conv3x3 (zero-initialised), plus a 1x1-conv skip when the channel
  count changes. `train` (enables dropout) is positional, so that `remat`
  can mark it static (argnum 3): jax.checkpoint traces keyword arguments.
  """

  out_ch: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self, x: jnp.ndarray, emb: jnp.ndarray, train: bool
  ) -> jnp.ndarray:
    h = nn.swish(group_norm(x, self.dtype, 'norm_0'))
    h = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype, name='conv_0')(h)
    film = nn.Dense(2 * self.out_ch, dtype=self.dtype, name='film')(
      nn.swish(emb)
    )
    scale, shift = jnp.split(film[:, None, None, :], 2, axis=-1)
    h = group_norm(h, self.dtype, 'norm_1') * (1 + scale) + shift
    h = nn.swish(h)
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = nn.Conv(
      self.out_ch,
      (3, 3),
      kernel_init=_zeros,
      dtype=self.dtype,
      name='conv_1',
    )(h)
    if x.shape[-1] != self.out_ch:
      x = nn.Conv(self.out_ch, (1, 1), dtype=self.dtype, name='skip')(x)
    return x + h


class AttentionBlock(nn.Module):
  """Multi-head self-attention over all pixels, added residually.

  The output projection is zero-initialised (the block starts as the
  identity). The attention is `jax.nn.dot_product_attention` with
  `implementation=None`, so JAX picks the kernel and later JAX versions can
  pick a fused one; in JAX 0.10 None means the XLA path on every backend
  (cuDNN flash attention must be asked for by name, and takes only 16-bit
  inputs, so naming it would break float32 runs). In bfloat16 compute the
  XLA path keeps the precision of an einsum formulation with float32
  logits: q·k accumulates into float32, the 1/√d scale and the softmax run
  in float32, and only the weights are cast to bfloat16 for the weighted
  sum of v. The softmax over H·W positions is where low precision hurts.
  """

  head_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    batch, height, width, channels = x.shape
    heads = num_heads(channels, self.head_dim)
    if channels % heads:
      raise ValueError(
        f'{channels} channels do not split into {heads} attention heads '
        f'(head_dim={self.head_dim}).'
      )
    h = group_norm(x, self.dtype, 'norm')
    qkv = nn.Dense(3 * channels, dtype=self.dtype, name='qkv')(h)
    # [B, T, 3, N, H]: this split of the qkv kernel's columns is what the
    # trained params mean, so it must not change.
    qkv = qkv.reshape(batch, height * width, 3, heads, channels // heads)
    h = jax.nn.dot_product_attention(
      qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], implementation=None
    )
    h = h.reshape(batch, height, width, channels)
    h = nn.Dense(
      channels, kernel_init=_zeros, dtype=self.dtype, name='proj_out'
    )(h)
    return x + h


class Downsample(nn.Module):
  """Halves H and W with a stride-2 3x3 conv (channels unchanged).

  `padding` is Flax's: 'SAME' pads an even size by 0 before and 1 after;
  ((1, 1), (1, 1)) is PyTorch's `padding=1`, which a Stable Diffusion
  U-Net's weights were trained with.
  """

  dtype: Dtype = jnp.float32
  padding: str | tuple[tuple[int, int], ...] = 'SAME'

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    return nn.Conv(
      x.shape[-1],
      (3, 3),
      strides=(2, 2),
      padding=self.padding,
      dtype=self.dtype,
      name='conv',
    )(x)


class Upsample(nn.Module):
  """Doubles H and W: nearest-neighbour repeat, then a 3x3 conv."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return nn.Conv(x.shape[-1], (3, 3), dtype=self.dtype, name='conv')(x)
