"""CLIP's text transformer: token ids [B, L] → hidden states [B, L, D].

The architecture of transformers' `CLIPTextModel` (OpenAI CLIP's text tower,
the text encoder of Stable Diffusion 1.x and 2.x): token plus learned
position embeddings, pre-LayerNorm encoder layers with causal self-attention
and an MLP, and a final LayerNorm. Params are named as transformers names
them (`embeddings/token_embedding/embedding`,
`encoder/layers_0/self_attn/q_proj/kernel`, `final_layer_norm/scale`, …), so
converting a checkpoint is a renaming plus a transpose of each kernel.

Every layer computes in the config's `dtype` with float32 params; the
LayerNorm statistics and the attention softmax are float32 whatever the
dtype, and the final LayerNorm and the outputs are float32.
"""

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from gdd import checks
from gdd.models import layers

Dtype = Any

HIDDEN_ACTS = ('quick_gelu', 'gelu')


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig(layers.CheckedConfig):
  """Shape of a `TextEncoder`, as transformers' `CLIPTextConfig` names it.

  `eos_token_id` is the tokenizer's `eos_id`: the pooled state is taken at
  the first position of that id (see `TextEncoder`). transformers' configs
  of the SD era say 2 there, a legacy value that makes it pool at the
  largest id instead; with CLIP's vocabulary, whose `<|endoftext|>` (49407)
  is the largest id, that is the same position. `hidden_act` is
  'quick_gelu' (x·σ(1.702x), OpenAI CLIP, SD 1.x) or 'gelu' (exact, erf;
  OpenCLIP, SD 2.x). `dtype` is the compute dtype; params and outputs are
  float32. `remat` (one of `config_lib.REMAT_POLICIES`) says what each
  encoder layer recomputes in the backward pass instead of storing.
  """

  vocab_size: int
  eos_token_id: int
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  dtype: str = 'float32'
  remat: str = 'none'

  def __post_init__(self):
    for name in (
      'vocab_size',
      'hidden_size',
      'intermediate_size',
      'num_hidden_layers',
      'num_attention_heads',
      'max_position_embeddings',
    ):
      self._require(checks.is_int(getattr(self, name)), name, 'a positive int')
    self._require(
      checks.is_int(self.eos_token_id, 0)
      and self.eos_token_id < self.vocab_size,
      'eos_token_id',
      f'an int in [0, vocab_size={self.vocab_size})',
    )
    self._require(
      self.hidden_size % self.num_attention_heads == 0,
      'num_attention_heads',
      f'a divisor of hidden_size={self.hidden_size}',
    )
    self._require(
      self.hidden_act in HIDDEN_ACTS, 'hidden_act', f'one of {HIDDEN_ACTS}'
    )
    self._require(self.layer_norm_eps > 0, 'layer_norm_eps', 'positive')
    self._check_dtype_and_remat()


# The text encoder of Stable Diffusion 1.x: OpenAI CLIP ViT-L/14's
# (openai/clip-vit-large-patch14), 123,060,480 params.
SD1_CONFIG = TextEncoderConfig(
  vocab_size=49408,
  eos_token_id=49407,
  hidden_size=768,
  intermediate_size=3072,
  num_hidden_layers=12,
  num_attention_heads=12,
)

# The text encoder of Stable Diffusion 2.x: OpenCLIP ViT-H/14's without its
# last layer (SD 2 conditions on the penultimate one), 340,387,840 params.
SD2_CONFIG = TextEncoderConfig(
  vocab_size=49408,
  eos_token_id=49407,
  hidden_size=1024,
  intermediate_size=4096,
  num_hidden_layers=23,
  num_attention_heads=16,
  hidden_act='gelu',
)


class TextEncoding(NamedTuple):
  """What a `TextEncoder` returns, named as transformers names it.

  Attributes:
    last_hidden_state: [B, L, D] float32, after the final LayerNorm: what a
      Stable Diffusion U-Net cross-attends to.
    pooler_output: [B, D] float32, the state at each row's first EOS.
  """

  last_hidden_state: jnp.ndarray
  pooler_output: jnp.ndarray


def example_tokens(batch_size: int, length: int) -> jnp.ndarray:
  """Token ids of the shape a `TextEncoder` takes, for init and tracing."""
  return jnp.zeros((batch_size, length), jnp.int32)


def quick_gelu(x: jnp.ndarray) -> jnp.ndarray:
  """OpenAI CLIP's GELU approximation x·σ(1.702x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def _activation(name: str):
  if name == 'quick_gelu':
    return quick_gelu
  return lambda x: jax.nn.gelu(x, approximate=False)


def _layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
  """LayerNorm with float32 two-pass statistics, output in `dtype`.

  Two-pass (E[(x − μ)²]) rather than Flax's default E[x²] − μ²: trained CLIP
  residual streams have a few large channels, where the fast formula
  cancels.
  """
  return nn.LayerNorm(
    epsilon=eps,
    dtype=dtype,
    use_fast_variance=False,
    force_float32_reductions=True,
    name=name,
  )


class Embeddings(nn.Module):
  """Token embedding plus the learned embedding of positions 0..L−1."""

  config: TextEncoderConfig

  @nn.compact
  def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    token_embedding = nn.Embed(
      cfg.vocab_size,
      cfg.hidden_size,
      embedding_init=nn.initializers.normal(0.02),
      dtype=dtype,
      name='token_embedding',
    )
    position_embedding = nn.Embed(
      cfg.max_position_embeddings,
      cfg.hidden_size,
      embedding_init=nn.initializers.normal(0.01),
      dtype=dtype,
      name='position_embedding',
    )
    positions = jnp.arange(tokens.shape[1])
    return token_embedding(tokens) + position_embedding(positions)[None]


class SelfAttention(nn.Module):
  """Causal multi-head self-attention: q/k/v/out projections with bias.

  `jax.nn.dot_product_attention` (the XLA path, as in
  `layers.AttentionBlock`) accumulates q·k, scales and takes the softmax
  in float32 whatever the compute dtype.
  """

  config: TextEncoderConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    batch, length, width = x.shape
    heads = cfg.num_attention_heads

    def project(name):
      h = nn.Dense(width, dtype=dtype, name=name)(x)
      return h.reshape(batch, length, heads, width // heads)

    h = jax.nn.dot_product_attention(
      project('q_proj'),
      project('k_proj'),
      project('v_proj'),
      is_causal=True,
      implementation=None,
    )
    h = h.reshape(batch, length, width)
    return nn.Dense(width, dtype=dtype, name='out_proj')(h)


class Mlp(nn.Module):
  """fc1 → activation → fc2."""

  config: TextEncoderConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    h = nn.Dense(cfg.intermediate_size, dtype=dtype, name='fc1')(x)
    h = _activation(cfg.hidden_act)(h)
    return nn.Dense(cfg.hidden_size, dtype=dtype, name='fc2')(h)


class EncoderLayer(nn.Module):
  """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x))."""

  config: TextEncoderConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    h = _layer_norm(cfg.layer_norm_eps, dtype, 'layer_norm1')(x)
    x = x + SelfAttention(cfg, name='self_attn')(h)
    h = _layer_norm(cfg.layer_norm_eps, dtype, 'layer_norm2')(x)
    return x + Mlp(cfg, name='mlp')(h)


class Encoder(nn.Module):
  """The stack of `num_hidden_layers` encoder layers, `layers_0` first."""

  config: TextEncoderConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    layer_cls = layers.remat(EncoderLayer, cfg.remat)
    for i in range(cfg.num_hidden_layers):
      x = layer_cls(cfg, name=f'layers_{i}')(x)
    return x


class TextEncoder(nn.Module):
  """CLIP's text transformer on int token ids [B, L].

  Attention is causal, so the state at position i depends on tokens 0..i
  only: the states up to a row's EOS are the same whatever padding follows,
  and there is no attention mask (Stable Diffusion passes none either; its
  U-Net reads all L states, padding positions included).
  """

  config: TextEncoderConfig

  @nn.compact
  def __call__(self, tokens: jnp.ndarray) -> TextEncoding:
    """Encodes tokens [B, L] (L ≤ max_position_embeddings).

    The pooled state is each row's state at its first `eos_token_id`
    (position 0 in a row without one). Ids must lie in [0, vocab_size);
    this cannot be checked under jit.
    """
    cfg = self.config
    self._check_tokens(tokens)
    x = Embeddings(cfg, name='embeddings')(tokens)
    x = Encoder(cfg, name='encoder')(x)
    # The final LayerNorm in float32: its output is what the U-Net reads.
    x = _layer_norm(cfg.layer_norm_eps, jnp.float32, 'final_layer_norm')(
      x.astype(jnp.float32)
    )
    eos = jnp.argmax(tokens == cfg.eos_token_id, axis=1)
    pooled = jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]
    return TextEncoding(last_hidden_state=x, pooler_output=pooled)

  def _check_tokens(self, tokens: jnp.ndarray) -> None:
    """Shape and dtype checks; they run at trace time, so cost nothing."""
    max_length = self.config.max_position_embeddings
    if tokens.ndim != 2 or tokens.shape[1] > max_length:
      raise ValueError(
        f'tokens must have shape [B, L] with L <= max_position_embeddings='
        f'{max_length}; got {tokens.shape}.'
      )
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f'tokens must be integer ids; got {tokens.dtype}.')
