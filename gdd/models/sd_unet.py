"""The Stable Diffusion U-Net: diffusers' `UNet2DConditionModel` in Flax.

The architecture and the module names of diffusers' UNet2DConditionModel
(SD 1.x and 2.x configurations), so a Stable Diffusion checkpoint loads by
renaming (gdd/weights/); the inputs are gdd's (method.md §2, §9): the
log-SNR λ, embedded as t_in = arctan(exp(−λ/2))/(π/2) scaled by 1000 or, for
Stable Diffusion's weights, as SD's own timestep of λ (`timesteps`), the
per-token text states `context` that cross-attention reads, optionally a
class label with row K as the null label ∅, and for students the guidance
strength w through a zero-initialised MLP under `w_embedding`. Every other
param has the same path and shape with and without w, so a student is the
teacher's tree plus a fresh `w_embedding`, and equals the teacher at init.

Without text (`cross_attention_dim=None`: a class-conditional network, the
class embedding added to the time embedding as in diffusers'
`num_class_embeds`), the SDUNet takes context=None and its transformers keep
self-attention and the feed-forward but have no cross-attention: diffusers'
BasicTransformerBlock built with cross_attention_dim=None (no norm2, no
attn2). The block types keep their names — a CrossAttnDownBlock2D then
holds self-attention transformers, so `down_block_types` chooses the levels
with attention, as LDM's class-conditional ImageNet models attend at some
resolutions only — and a text network's params are untouched, so Stable
Diffusion weights still load into it.

Structure, as diffusers builds it: conv_in → down blocks (resnets, each
followed by a Transformer2DModel in a CrossAttnDownBlock2D, then a stride-2
conv but in the last block) → mid block (resnet, transformer, resnet) → up
blocks (layers_per_block + 1 resnets on the concatenated skips, transformers
in a CrossAttnUpBlock2D, nearest ×2 + conv but in the last block) →
conv_norm_out → SiLU → conv_out. Each transformer: GroupNorm (eps 1e-6) →
proj_in → BasicTransformerBlocks (LayerNorm → self-attention, LayerNorm →
cross-attention, LayerNorm → GEGLU feed-forward, each residual) → proj_out,
plus the input.

Param names. A PyTorch state-dict key maps to a Flax param path by:
  * `.` separates path parts, except that a list index joins its list's name
    with `_`: `down_blocks.0.resnets.1.conv1.weight` →
    `down_blocks_0/resnets_1/conv1/kernel`, `attn1.to_out.0` →
    `attn1/to_out_0`, `ff.net.0.proj` → `ff/net_0/proj`, `ff.net.2` →
    `ff/net_2`, `downsamplers.0.conv` → `downsamplers_0/conv`;
  * Conv2d `weight` [O, I, kh, kw] → `kernel` [kh, kw, I, O]
    (transpose (2, 3, 1, 0)); Linear `weight` [O, I] → `kernel` [I, O];
    GroupNorm / LayerNorm `weight` → `scale`; Embedding `weight` →
    `embedding`; `bias` → `bias`.
  * `class_embedding/embedding` has one row more than diffusers' (row K, the
    null label); `w_embedding` has no SD counterpart.

Deviations from diffusers, each deliberate:
  * Initialisation follows CompVis' LDM code that SD was trained with, not
    PyTorch's defaults: each resnet's conv2, each transformer's proj_out and
    conv_out start at zero, so a fresh network outputs 0 and every block
    starts as the identity (gdd's convention, as in unet.py).
  * The output channels follow gdd's `mean_type` (as `UNetConfig`): SD 1 and
    SD 2-base predict ε (mean_type='eps'), SD 2-768 predicts v ('v'); gdd's
    own default 'both' stacks (x̃, ε̃).
  * A block's channels must split into its heads exactly; diffusers would
    silently use channels // heads · heads < channels inner channels.
  * Only what SD 1 / 2 use is built: no attention masks, no upcasting, no
    dual or cross-only attention, no added (SDXL) embeddings.
  * Compute runs in `dtype` with float32 params; GroupNorm and LayerNorm
    statistics, the attention softmax and the output head are float32.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from gdd import checks, conditioning
from gdd.diffusion import parameterization, schedules
from gdd.models import layers

DOWN_BLOCK_TYPES = ('CrossAttnDownBlock2D', 'DownBlock2D')
UP_BLOCK_TYPES = ('CrossAttnUpBlock2D', 'UpBlock2D')

# diffusers' Transformer2DModel normalises its input with eps 1e-6 whatever
# the U-Net's norm_eps; its LayerNorms use 1e-5.
_TRANSFORMER_GROUP_NORM_EPS = 1e-6
_LAYER_NORM_EPS = 1e-5
# Down-block padding of SD's Downsample2D: PyTorch's padding=1.
_TORCH_PADDING_1 = ((1, 1), (1, 1))

_zeros = nn.initializers.zeros_init()


TIME_INPUTS = ('arctan', 'sd')


def timesteps(logsnr: jnp.ndarray, time_input: str = 'arctan') -> jnp.ndarray:
  """The [B] time that the sinusoid embeds, float32.

  'arctan': gdd's t_in·1000, t_in = arctan(exp(−λ/2))/(π/2) ≈ t (method.md
  §2), spanning [0, 1000] as SD's integer timesteps do. 'sd': SD's own
  timestep of λ on its discrete schedule (`schedules.sd_timestep`), what a
  network with Stable Diffusion's weights was trained on.
  """
  if time_input == 'sd':
    return schedules.sd_timestep(logsnr)
  return schedules.time_input(logsnr) * 1000.0


@dataclasses.dataclass(frozen=True)
class SDUNetConfig(layers.CheckedConfig):
  """Shape and conditioning of an `SDUNet`; validated on construction.

  Field names are diffusers' (`UNet2DConditionModel`'s config.json) and the
  defaults are SD 1.x's; SD 2.x is cross_attention_dim=1024,
  attention_head_dim=(5, 10, 20, 20), use_linear_projection=True. Except:
    * `sample_size` is the latent size and has no default (64 for SD 1.x);
    * `mean_type` replaces diffusers' `out_channels`: conv_out has
      `out_channels` = 2·in_channels for 'both', else in_channels;
    * `num_class_embeds` K gives K + 1 rows, row K the null label ∅;
    * `use_w_embedding`, `w_max`, `dtype`, `remat` and `inpainting` are
      gdd's (see `UNetConfig`); an inpainting SDUNet takes `known`, as
      `inpainting_input` says (`conditioning.INPAINTING_INPUTS`; SD's
      9-channel inpainting U-Net is 'masked_image');
    * `time_input` is gdd's too: 'arctan' (gdd's t_in·1000, networks
      trained by gdd) or 'sd' (SD's timestep on its discrete schedule,
      networks with Stable Diffusion's weights; see `timesteps`).

  `attention_head_dim` is, as in diffusers, the NUMBER of attention heads of
  each block, not their width: diffusers' UNet2DConditionModel sets
  `num_attention_heads = attention_head_dim` (a naming mistake it keeps for
  the compatibility of existing configs, diffusers issue 2011) and each
  Transformer2DModel gets head width channels // heads. SD 1's 8 means 8
  heads of 40, 80, 160 channels; SD 2's (5, 10, 20, 20) means heads of 64.
  An int applies to every block; a tuple gives one per down block, the up
  blocks taking it reversed and the mid block its last entry.
  `transformer_layers_per_block` is per down block in the same way.

  `cross_attention_dim=None` builds a network without text: it takes
  context=None and its transformers have no cross-attention (the module
  docstring); give it `num_class_embeds` to condition on classes.
  """

  sample_size: int
  in_channels: int = 4
  mean_type: str = 'both'
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  down_block_types: tuple[str, ...] = (
    'CrossAttnDownBlock2D',
    'CrossAttnDownBlock2D',
    'CrossAttnDownBlock2D',
    'DownBlock2D',
  )
  up_block_types: tuple[str, ...] = (
    'UpBlock2D',
    'CrossAttnUpBlock2D',
    'CrossAttnUpBlock2D',
    'CrossAttnUpBlock2D',
  )
  cross_attention_dim: int | None = 768
  attention_head_dim: int | tuple[int, ...] = 8
  transformer_layers_per_block: int | tuple[int, ...] = 1
  use_linear_projection: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  num_class_embeds: int | None = None
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  dropout: float = 0.0
  use_w_embedding: bool = False
  w_max: float = 4.0
  dtype: str = 'float32'
  remat: str = 'none'
  inpainting: bool = False
  inpainting_input: str = 'masked_latents'
  time_input: str = 'arctan'

  def __post_init__(self):
    # ConfigDicts and config.json give lists; tuples keep the dataclass
    # hashable (usable as a static jit argument).
    for name in (
      'block_out_channels',
      'down_block_types',
      'up_block_types',
      'attention_head_dim',
      'transformer_layers_per_block',
    ):
      if isinstance(getattr(self, name), list):
        object.__setattr__(self, name, tuple(getattr(self, name)))
    self._check_sizes()
    self._check_blocks()
    self._check_options()
    self._check_attention_heads()

  def _check_sizes(self) -> None:
    """Positive int sizes; the levels fit the sample size and the groups."""
    for name in (
      'sample_size',
      'in_channels',
      'layers_per_block',
      'norm_num_groups',
    ):
      self._require(checks.is_int(getattr(self, name)), name, 'a positive int')
    self._require(
      self.cross_attention_dim is None
      or checks.is_int(self.cross_attention_dim),
      'cross_attention_dim',
      'a positive int, or None for a network without text',
    )
    channels = self.block_out_channels
    self._require(
      isinstance(channels, tuple)
      and bool(channels)
      and all(map(checks.is_int, channels)),
      'block_out_channels',
      'a non-empty tuple of positive ints',
    )
    self._require(
      all(c % self.norm_num_groups == 0 for c in channels),
      'norm_num_groups',
      f'a divisor of every block_out_channels entry {channels}',
    )
    factor = 2 ** (len(channels) - 1)
    self._require(
      self.sample_size % factor == 0,
      'sample_size',
      f'divisible by 2**(len(block_out_channels) - 1) = {factor}',
    )

  def _check_blocks(self) -> None:
    """One block type and per-block value for each block_out_channels entry."""
    levels = len(self.block_out_channels)
    for name, allowed in (
      ('down_block_types', DOWN_BLOCK_TYPES),
      ('up_block_types', UP_BLOCK_TYPES),
    ):
      types = getattr(self, name)
      self._require(
        isinstance(types, tuple)
        and len(types) == levels
        and all(t in allowed for t in types),
        name,
        f'a tuple of {levels} (one per block_out_channels entry) of {allowed}',
      )
    for name in ('attention_head_dim', 'transformer_layers_per_block'):
      value = getattr(self, name)
      self._require(
        checks.is_int(value)
        or (
          isinstance(value, tuple)
          and len(value) == levels
          and all(map(checks.is_int, value))
        ),
        name,
        f'a positive int or a tuple of {levels} positive ints',
      )

  def _check_options(self) -> None:
    """Flags, output type, embeddings, dropout, w scale, dtype and remat."""
    for name in (
      'use_linear_projection',
      'flip_sin_to_cos',
      'use_w_embedding',
      'inpainting',
    ):
      self._require(isinstance(getattr(self, name), bool), name, 'a bool')
    self._require(
      self.mean_type in parameterization.MEAN_TYPES,
      'mean_type',
      f'one of {parameterization.MEAN_TYPES}',
    )
    self._require(
      self.num_class_embeds is None or checks.is_int(self.num_class_embeds),
      'num_class_embeds',
      'None or a positive int',
    )
    half = self.block_out_channels[0] // 2
    self._require(
      checks.is_int(self.freq_shift, 0) and self.freq_shift < half,
      'freq_shift',
      f'an int in [0, block_out_channels[0] // 2 = {half})',
    )
    self._require(self.norm_eps > 0, 'norm_eps', 'positive')
    self._require(0.0 <= self.dropout < 1.0, 'dropout', 'in [0, 1)')
    self._require(self.w_max > 0, 'w_max', 'positive')
    self._require(
      self.time_input in TIME_INPUTS, 'time_input', f'one of {TIME_INPUTS}'
    )
    self._require(
      self.inpainting_input in conditioning.INPAINTING_INPUTS,
      'inpainting_input',
      f'one of {conditioning.INPAINTING_INPUTS}',
    )
    self._check_dtype_and_remat()

  def _check_attention_heads(self) -> None:
    """Every transformer's channels split into its number of heads."""
    for where, channels, heads in self._attention_blocks():
      self._require(
        channels % heads == 0,
        'attention_head_dim',
        f"numbers of heads (diffusers' naming) that divide the channels: "
        f'the {where} has {channels} channels and {heads} heads',
      )

  def _attention_blocks(self) -> list[tuple[str, int, int]]:
    """(where, channels, heads) of every block that has transformers."""
    channels = self.block_out_channels
    heads = self.num_attention_heads
    found = [
      (f'down block {i}', channels[i], heads[i])
      for i, kind in enumerate(self.down_block_types)
      if kind == 'CrossAttnDownBlock2D'
    ]
    found.append(('mid block', channels[-1], heads[-1]))
    found += [
      (f'up block {i}', channels[::-1][i], heads[::-1][i])
      for i, kind in enumerate(self.up_block_types)
      if kind == 'CrossAttnUpBlock2D'
    ]
    return found

  @property
  def out_channels(self) -> int:
    """conv_out's channels: (x̃, ε̃) stacked for 'both', else one latent."""
    return (
      2 * self.in_channels if self.mean_type == 'both' else self.in_channels
    )

  @property
  def time_embed_dim(self) -> int:
    """Width of the time (+ class, + w) embedding: 4·block_out_channels[0]."""
    return 4 * self.block_out_channels[0]

  @property
  def num_attention_heads(self) -> tuple[int, ...]:
    """Heads of each down block's transformers (`attention_head_dim`)."""
    return self._per_block(self.attention_head_dim)

  @property
  def transformer_depths(self) -> tuple[int, ...]:
    """BasicTransformerBlocks in each down block's transformers."""
    return self._per_block(self.transformer_layers_per_block)

  def _per_block(self, value: int | tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(value, tuple):
      return value
    return (value,) * len(self.block_out_channels)


class WrapsSDUNet:
  """Base of the configs of networks built around an SDUNet (field `unet`):
  what they predict and whether they take w are the U-Net's."""

  unet: SDUNetConfig

  @property
  def mean_type(self) -> str:
    """What the network predicts (`parameterization.MEAN_TYPES`)."""
    return self.unet.mean_type

  @property
  def use_w_embedding(self) -> bool:
    """Whether w is an input (a w-conditioned student)."""
    return self.unet.use_w_embedding

  @property
  def inpainting(self) -> bool:
    """Whether the known region is an input (an inpainting network)."""
    return self.unet.inpainting


# diffusers' TimestepEmbedding layers; the w-embedding MLP has the same.
MLP_LAYERS = ('linear_1', 'linear_2')


def sinusoid(x: jnp.ndarray, config: SDUNetConfig) -> jnp.ndarray:
  """diffusers' `Timesteps` projection of a [B] input (time or w)."""
  return layers.sinusoidal_embedding(
    x,
    config.block_out_channels[0],
    flip_sin_to_cos=config.flip_sin_to_cos,
    freq_shift=config.freq_shift,
  )


def w_input(w: jnp.ndarray, config: SDUNetConfig) -> jnp.ndarray:
  """What the w-embedding's sinusoid embeds: w scaled to [0, 1000]."""
  return w * 1000.0 / config.w_max


def _dtype(config: SDUNetConfig) -> jnp.dtype:
  return jnp.dtype(config.dtype)


class ResnetBlock2D(nn.Module):
  """diffusers' ResnetBlock2D: the time embedding added between the convs.

  GroupNorm → SiLU → conv1 → + time_emb_proj(SiLU(emb)) → GroupNorm → SiLU
  → dropout → conv2 (zero-initialised), plus a 1x1 conv_shortcut when the
  channel count changes. `train` is positional, so that `layers.remat` can
  mark it static (argnum 3).
  """

  config: SDUNetConfig
  out_channels: int

  @nn.compact
  def __call__(
    self, x: jnp.ndarray, emb: jnp.ndarray, train: bool
  ) -> jnp.ndarray:
    cfg, out = self.config, self.out_channels
    dtype = _dtype(cfg)
    norm = dict(groups=cfg.norm_num_groups, epsilon=cfg.norm_eps)
    h = nn.swish(layers.group_norm(x, dtype, 'norm1', **norm))
    h = nn.Conv(out, (3, 3), dtype=dtype, name='conv1')(h)
    time = nn.Dense(out, dtype=dtype, name='time_emb_proj')(nn.swish(emb))
    h = h + time[:, None, None, :]
    h = nn.swish(layers.group_norm(h, dtype, 'norm2', **norm))
    h = nn.Dropout(cfg.dropout)(h, deterministic=not train)
    h = nn.Conv(out, (3, 3), kernel_init=_zeros, dtype=dtype, name='conv2')(h)
    if x.shape[-1] != out:
      x = nn.Conv(out, (1, 1), dtype=dtype, name='conv_shortcut')(x)
    return x + h


class Attention(nn.Module):
  """diffusers' Attention: multi-head attention from x to `context`.

  to_q, to_k, to_v have no bias, to_out_0 has one; self-attention when
  `context` is None. `jax.nn.dot_product_attention` as in
  `layers.AttentionBlock`, whose docstring says why its XLA path keeps the
  logits and the softmax in float32 under bfloat16 compute.
  """

  heads: int
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(
    self, x: jnp.ndarray, context: jnp.ndarray | None = None
  ) -> jnp.ndarray:
    context = x if context is None else context
    channels = x.shape[-1]

    def project(inputs, name):
      h = nn.Dense(channels, use_bias=False, dtype=self.dtype, name=name)(
        inputs
      )
      return h.reshape(*h.shape[:2], self.heads, channels // self.heads)

    h = jax.nn.dot_product_attention(
      project(x, 'to_q'),
      project(context, 'to_k'),
      project(context, 'to_v'),
      implementation=None,
    )
    h = h.reshape(x.shape)
    return nn.Dense(channels, dtype=self.dtype, name='to_out_0')(h)


class GEGLU(nn.Module):
  """proj to 2·features, split into (h, gate), h·GELU(gate) (exact GELU)."""

  features: int
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    h = nn.Dense(2 * self.features, dtype=self.dtype, name='proj')(x)
    h, gate = jnp.split(h, 2, axis=-1)
    return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """diffusers' FeedForward: net_0 (GEGLU to 4·dim) → net_2 (back to dim)."""

  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    channels = x.shape[-1]
    h = GEGLU(4 * channels, dtype=self.dtype, name='net_0')(x)
    return nn.Dense(channels, dtype=self.dtype, name='net_2')(h)


class BasicTransformerBlock(nn.Module):
  """Self-attention, cross-attention to the text, feed-forward; pre-norm.

  Without text (context None) there is no cross-attention: no norm2, no
  attn2, as in diffusers' block with cross_attention_dim=None.
  """

  heads: int
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(
    self, x: jnp.ndarray, context: jnp.ndarray | None
  ) -> jnp.ndarray:
    def norm(name):
      return nn.LayerNorm(_LAYER_NORM_EPS, dtype=self.dtype, name=name)

    attention = dict(heads=self.heads, dtype=self.dtype)
    x = x + Attention(**attention, name='attn1')(norm('norm1')(x))
    if context is not None:
      x = x + Attention(**attention, name='attn2')(norm('norm2')(x), context)
    return x + FeedForward(dtype=self.dtype, name='ff')(norm('norm3')(x))


class Transformer2DModel(nn.Module):
  """diffusers' Transformer2DModel on [B, H, W, C], added to its input.

  GroupNorm → proj_in → `depth` BasicTransformerBlocks over the H·W tokens
  → proj_out (zero-initialised). The projections are 1x1 convs (SD 1) or
  Dense layers (`use_linear_projection`, SD 2): the same maths, with
  kernels of shape [1, 1, C, C] or [C, C] as in the checkpoints.
  """

  config: SDUNetConfig
  heads: int
  depth: int

  @nn.compact
  def __call__(
    self, x: jnp.ndarray, context: jnp.ndarray | None
  ) -> jnp.ndarray:
    cfg = self.config
    dtype = _dtype(cfg)
    batch, height, width, channels = x.shape
    h = layers.group_norm(
      x,
      dtype,
      'norm',
      groups=cfg.norm_num_groups,
      epsilon=_TRANSFORMER_GROUP_NORM_EPS,
    )
    if cfg.use_linear_projection:
      project = dict(features=channels, dtype=dtype)
      proj_in, proj_out = nn.Dense, nn.Dense
    else:
      project = dict(features=channels, kernel_size=(1, 1), dtype=dtype)
      proj_in, proj_out = nn.Conv, nn.Conv
    h = proj_in(**project, name='proj_in')(h)
    h = h.reshape(batch, height * width, channels)
    for i in range(self.depth):
      h = BasicTransformerBlock(
        self.heads, dtype=dtype, name=f'transformer_blocks_{i}'
      )(h, context)
    h = h.reshape(x.shape)
    h = proj_out(**project, kernel_init=_zeros, name='proj_out')(h)
    return x + h


def _block_layers(config: SDUNetConfig):
  """The resnet and transformer classes, rematerialised per `config.remat`."""
  # Argnum 3 of ResnetBlock2D.__call__ (self, x, emb, train) is a bool.
  return (
    layers.remat(ResnetBlock2D, config.remat, (3,)),
    layers.remat(Transformer2DModel, config.remat),
  )


class DownBlock(nn.Module):
  """Down block `index`: a CrossAttnDownBlock2D or a DownBlock2D.

  Returns the output and the activations the up path concatenates: each
  resnet's (or its transformer's) output, then the downsampled one.
  """

  config: SDUNetConfig
  index: int

  @nn.compact
  def __call__(self, h, emb, context, train: bool):
    cfg, i = self.config, self.index
    resnet_cls, transformer_cls = _block_layers(cfg)
    cross = cfg.down_block_types[i] == 'CrossAttnDownBlock2D'
    skips = []
    for j in range(cfg.layers_per_block):
      h = resnet_cls(cfg, cfg.block_out_channels[i], name=f'resnets_{j}')(
        h, emb, train
      )
      if cross:
        h = transformer_cls(
          cfg,
          cfg.num_attention_heads[i],
          cfg.transformer_depths[i],
          name=f'attentions_{j}',
        )(h, context)
      skips.append(h)
    if i < len(cfg.block_out_channels) - 1:
      h = layers.Downsample(
        dtype=_dtype(cfg), padding=_TORCH_PADDING_1, name='downsamplers_0'
      )(h)
      skips.append(h)
    return h, skips


class MidBlock(nn.Module):
  """UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""

  config: SDUNetConfig

  @nn.compact
  def __call__(self, h, emb, context, train: bool):
    cfg = self.config
    resnet_cls, transformer_cls = _block_layers(cfg)
    channels = cfg.block_out_channels[-1]
    h = resnet_cls(cfg, channels, name='resnets_0')(h, emb, train)
    h = transformer_cls(
      cfg,
      cfg.num_attention_heads[-1],
      cfg.transformer_depths[-1],
      name='attentions_0',
    )(h, context)
    return resnet_cls(cfg, channels, name='resnets_1')(h, emb, train)


class UpBlock(nn.Module):
  """Up block `index`: a CrossAttnUpBlock2D or an UpBlock2D.

  Its layers_per_block + 1 resnets each take the last of `skips` (popped,
  so the caller's list shrinks) concatenated to the running activation.
  Heads and depths are the down blocks' reversed, as in diffusers.
  """

  config: SDUNetConfig
  index: int

  @nn.compact
  def __call__(self, h, skips: list, emb, context, train: bool):
    cfg, i = self.config, self.index
    resnet_cls, transformer_cls = _block_layers(cfg)
    cross = cfg.up_block_types[i] == 'CrossAttnUpBlock2D'
    channels = cfg.block_out_channels[::-1][i]
    for j in range(cfg.layers_per_block + 1):
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = resnet_cls(cfg, channels, name=f'resnets_{j}')(h, emb, train)
      if cross:
        h = transformer_cls(
          cfg,
          cfg.num_attention_heads[::-1][i],
          cfg.transformer_depths[::-1][i],
          name=f'attentions_{j}',
        )(h, context)
    if i < len(cfg.block_out_channels) - 1:
      h = layers.Upsample(dtype=_dtype(cfg), name='upsamplers_0')(h)
    return h


class SDUNet(nn.Module):
  """Text- or class- (and optionally w-) conditional SD U-Net on latents."""

  config: SDUNetConfig

  @nn.compact
  def __call__(
    self,
    z: jnp.ndarray,
    logsnr: jnp.ndarray,
    context: jnp.ndarray | None,
    labels: jnp.ndarray | None = None,
    w: jnp.ndarray | None = None,
    known: dict | None = None,
    *,
    train: bool,
  ) -> jnp.ndarray:
    """Raw network output for noisy latents z at log-SNR λ.

    Args:
      z: [B, S, S, in_channels] noisy latents, S = `config.sample_size`.
      logsnr: [B] log-SNR λ of each latent.
      context: [B, L, cross_attention_dim] per-token text states (the text
        encoder's last hidden state), read by every cross-attention; the
        CFG null is the empty caption's states. None iff
        `config.cross_attention_dim` is None (a network without text).
      labels: [B] int class labels in [0, K], K the null label; required
        iff `config.num_class_embeds` is set.
      w: [B] guidance strengths; required iff `config.use_w_embedding`.
      known: the known region {'mask': [B, S, S, 1], 'masked': [B, S, S,
        in_channels]}; required iff `config.inpainting`
        (`layers.known_region_input`).
      train: enables dropout, which then needs the 'dropout' rng.

    Returns:
      [B, S, S, config.out_channels] float32.
    """
    cfg = self.config
    self._check_inputs(z, logsnr, context, labels, w)
    _check_present(
      'known',
      known,
      cfg.inpainting,
      'inpainting=True',
      "{'mask': [B, S, S, 1], 'masked': [B, S, S, in_channels]}",
    )
    emb = self._embedding(logsnr, labels, w)
    dtype = _dtype(cfg)
    if context is not None:
      context = context.astype(dtype)
    h = nn.Conv(cfg.block_out_channels[0], (3, 3), dtype=dtype, name='conv_in')(
      z.astype(dtype)
    )
    if cfg.inpainting:
      h = h + layers.known_region_input(
        known,
        z,
        cfg.block_out_channels[0],
        dtype,
        inpainting_input=cfg.inpainting_input,
      )
    skips = [h]
    for i in range(len(cfg.block_out_channels)):
      h, block_skips = DownBlock(cfg, i, name=f'down_blocks_{i}')(
        h, emb, context, train
      )
      skips += block_skips
    h = MidBlock(cfg, name='mid_block')(h, emb, context, train)
    for i in range(len(cfg.block_out_channels)):
      h = UpBlock(cfg, i, name=f'up_blocks_{i}')(h, skips, emb, context, train)
    return self._output_head(h)

  def _embedding(self, logsnr, labels, w) -> jnp.ndarray:
    """Time + class (+ w) embedding that every resnet reads."""
    cfg = self.config
    mlp = dict(
      features=cfg.time_embed_dim, dtype=_dtype(cfg), layer_names=MLP_LAYERS
    )
    emb = layers.EmbeddingMLP(**mlp, name='time_embedding')(
      sinusoid(timesteps(logsnr, cfg.time_input), cfg)
    )
    if cfg.num_class_embeds is not None:
      emb = emb + nn.Embed(
        cfg.num_class_embeds + 1,
        cfg.time_embed_dim,
        dtype=_dtype(cfg),
        name='class_embedding',
      )(labels)
    if cfg.use_w_embedding:
      emb = emb + layers.EmbeddingMLP(
        **mlp, zero_init_output=True, name='w_embedding'
      )(sinusoid(w_input(w, cfg), cfg))
    return emb

  def _output_head(self, h: jnp.ndarray) -> jnp.ndarray:
    """conv_norm_out → SiLU → conv_out (zero-initialised), in float32.

    float32 whatever the compute dtype: the output is the prediction that
    losses and samplers consume, and the head costs one conv.
    """
    cfg = self.config
    h = layers.group_norm(
      h.astype(jnp.float32),
      jnp.float32,
      'conv_norm_out',
      groups=cfg.norm_num_groups,
      epsilon=cfg.norm_eps,
    )
    return nn.Conv(
      cfg.out_channels,
      (3, 3),
      kernel_init=_zeros,
      dtype=jnp.float32,
      name='conv_out',
    )(nn.swish(h))

  def _check_inputs(self, z, logsnr, context, labels, w) -> None:
    """Shape and presence checks; they run at trace time, so cost nothing."""
    cfg = self.config
    _check_present('w', w, cfg.use_w_embedding, 'use_w_embedding=True')
    _check_present(
      'labels', labels, cfg.num_class_embeds is not None, 'num_class_embeds=K'
    )
    size, channels = cfg.sample_size, cfg.in_channels
    if z.ndim != 4 or z.shape[1:] != (size, size, channels):
      raise ValueError(
        f'z must have shape [B, {size}, {size}, {channels}]; got {z.shape}.'
      )
    batch = z.shape[0]
    _check_context(context, batch, cfg.cross_attention_dim)
    for name, value in (('logsnr', logsnr), ('labels', labels), ('w', w)):
      if value is not None and jnp.shape(value) != (batch,):
        raise ValueError(
          f'{name} must have shape [B] = ({batch},); got {jnp.shape(value)}.'
        )
    label_dtype = None if labels is None else jnp.asarray(labels).dtype
    if label_dtype is not None and not jnp.issubdtype(label_dtype, jnp.integer):
      raise ValueError(f'labels must be ints; got dtype {label_dtype}.')


def _check_context(context, batch: int, width: int | None) -> None:
  """[B, L, width] text states with L >= 1, or None for a network without
  text (width None)."""
  if width is None:
    if context is not None:
      raise ValueError(
        'This SDUNet has no cross-attention (cross_attention_dim=None) but '
        'got a context: pass context=None, or build it with '
        'SDUNetConfig(cross_attention_dim=D).'
      )
    return
  shape = None if context is None else jnp.shape(context)
  if (
    shape is None
    or len(shape) != 3
    or shape[::2] != (batch, width)
    or not shape[1]
  ):
    raise ValueError(
      f'context must have shape [B, L, cross_attention_dim] = '
      f'[{batch}, L, {width}] with L >= 1 tokens; got {shape}.'
    )


def _check_present(
  name: str,
  value,
  wanted: bool,
  setting: str,
  expected: str = 'of shape [B] (e.g. jnp.zeros((B,)) at init)',
) -> None:
  """`value` is given iff the config asks for it (`setting` says how)."""
  if wanted and value is None:
    raise ValueError(
      f'This SDUNet has {setting}, so {name} is required: pass {name} '
      f'{expected}.'
    )
  if not wanted and value is not None:
    raise ValueError(
      f'This SDUNet was built without {setting} but got {name}: pass '
      f'{name}=None, or build it with SDUNetConfig({setting}).'
    )
