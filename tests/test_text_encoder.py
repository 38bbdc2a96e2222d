"""Tests of gdd.models.text_encoder: shapes, causality, names, precision."""

import collections
import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from gdd import tokenization
from gdd.models import text_encoder
from gdd.models.text_encoder import TextEncoder, TextEncoderConfig

WORDS = ('a', 'red', 'blue', 'circle', 'square', 'left', 'of')
LENGTH = 6
TOKENIZER = tokenization.WordTokenizer(WORDS, max_length=LENGTH)
TINY = TextEncoderConfig(
  vocab_size=TOKENIZER.vocab_size,
  eos_token_id=TOKENIZER.eos_id,
  hidden_size=8,
  intermediate_size=16,
  num_hidden_layers=2,
  num_attention_heads=2,
  max_position_embeddings=LENGTH,
)


@functools.cache
def _params(cfg: TextEncoderConfig = TINY) -> dict:
  return TextEncoder(cfg).init(
    jax.random.key(0), text_encoder.example_tokens(1, LENGTH)
  )['params']


@functools.cache
def _jitted_apply(cfg: TextEncoderConfig):
  return jax.jit(TextEncoder(cfg).apply)


def _encode(tokens, cfg: TextEncoderConfig = TINY, params=None):
  params = _params() if params is None else params
  return _jitted_apply(cfg)({'params': params}, jnp.asarray(tokens))


def _random_tokens(batch: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.integers(0, TINY.vocab_size, (batch, LENGTH)).astype(np.int32)


def test_output_shapes_and_dtype():
  out = _encode(TOKENIZER.encode(['a red circle', 'blue square']))
  assert out.last_hidden_state.shape == (2, LENGTH, 8)
  assert out.pooler_output.shape == (2, 8)
  assert out.last_hidden_state.dtype == out.pooler_output.dtype == jnp.float32
  # A shorter sequence uses the first position embeddings.
  short = jax.eval_shape(
    lambda: _jitted_apply(TINY)({'params': _params()}, jnp.zeros((3, 4), int))
  )
  assert short.last_hidden_state.shape == (3, 4, 8)


def test_causal():
  # Row j changes token j of the base sequence.
  base = _random_tokens(1)[0]
  changed = np.tile(base, (LENGTH, 1))
  for j in range(LENGTH):
    changed[j, j] = (base[j] + 1) % TINY.vocab_size
  states = _encode(np.concatenate([base[None], changed])).last_hidden_state
  diff = np.abs(np.asarray(states[1:] - states[:1])).max(axis=-1)
  for j in range(LENGTH):
    np.testing.assert_array_equal(diff[j, :j], 0)
    assert (diff[j, j:] > 1e-4).all(), (j, diff[j])


def test_padding_after_eos_changes_nothing_before_it():
  tokens = TOKENIZER.encode(['a red circle', 'a red circle'])
  tokens[1, 5] = 7  # any id after EOS (position 4)
  out = _encode(tokens)
  states = np.asarray(out.last_hidden_state)
  np.testing.assert_array_equal(states[0, :5], states[1, :5])
  assert np.abs(states[0, 5] - states[1, 5]).max() > 1e-4
  np.testing.assert_array_equal(out.pooler_output[0], out.pooler_output[1])


def test_pooled_state_is_at_the_first_eos():
  tokens = TOKENIZER.encode(['a red circle', 'blue', 'a red circle left'])
  out = _encode(tokens)
  first_eos = [4, 2, 5]
  np.testing.assert_array_equal(
    out.pooler_output, out.last_hidden_state[np.arange(3), first_eos]
  )


def test_different_captions_give_different_states():
  out = _encode(TOKENIZER.encode(['a red circle', 'a blue circle']))
  states = np.asarray(out.last_hidden_state)
  np.testing.assert_array_equal(states[0, :2], states[1, :2])
  assert np.abs(states[0, 2:] - states[1, 2:]).max() > 1e-3
  assert np.abs(out.pooler_output[0] - out.pooler_output[1]).max() > 1e-3


def test_param_names_mirror_transformers():
  flat = flax.traverse_util.flatten_dict(_params(), sep='/')
  d, i = TINY.hidden_size, TINY.intermediate_size
  expected = {
    'embeddings/token_embedding/embedding': (TINY.vocab_size, d),
    'embeddings/position_embedding/embedding': (LENGTH, d),
    'encoder/layers_0/self_attn/q_proj/kernel': (d, d),
    'encoder/layers_0/self_attn/k_proj/bias': (d,),
    'encoder/layers_0/self_attn/v_proj/kernel': (d, d),
    'encoder/layers_1/self_attn/out_proj/bias': (d,),
    'encoder/layers_0/layer_norm1/scale': (d,),
    'encoder/layers_1/layer_norm2/bias': (d,),
    'encoder/layers_0/mlp/fc1/kernel': (d, i),
    'encoder/layers_1/mlp/fc2/kernel': (i, d),
    'final_layer_norm/scale': (d,),
    'final_layer_norm/bias': (d,),
  }
  assert {k: flat[k].shape for k in expected} == expected
  assert not any('layers_2' in k for k in flat)
  # 16 params per layer (4 projections, 2 norms, 2 MLP layers; each 2).
  assert len(flat) == 2 + 16 * TINY.num_hidden_layers + 2


def test_param_count():
  # Embeddings: 10·8 tokens + 6·8 positions = 128. Per layer: 4·(8·8 + 8)
  # attention + 2·16 norms + (8·16 + 16) fc1 + (16·8 + 8) fc2 = 600, for 2
  # layers 1200. Final norm 16. Total 1344.
  count = sum(p.size for p in jax.tree.leaves(_params()))
  assert count == 1344


@pytest.mark.parametrize(
  'cfg, count',
  [
    (text_encoder.SD1_CONFIG, 123_060_480),
    (text_encoder.SD2_CONFIG, 340_387_840),
  ],
)
def test_stable_diffusion_configs_have_the_published_param_counts(cfg, count):
  shapes = jax.eval_shape(
    lambda: TextEncoder(cfg).init(
      jax.random.key(0), text_encoder.example_tokens(1, 77)
    )
  )
  assert sum(p.size for p in jax.tree.leaves(shapes)) == count


def test_bfloat16_compute():
  bf16 = dataclasses.replace(TINY, dtype='bfloat16')
  bf16_params = jax.eval_shape(lambda: _params(bf16))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf16_params))
  tokens = _random_tokens(4, seed=1)
  out_f32 = _encode(tokens)
  out_bf16 = _encode(tokens, bf16)
  for got, want in zip(out_bf16, out_f32, strict=True):
    assert got.dtype == jnp.float32 and got.shape == want.shape
    # Same params, lower precision: close but not identical.
    assert np.abs(got - want).max() > 0
    np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())


def test_remat_gives_the_same_gradients():
  tokens = jnp.asarray(_random_tokens(2, seed=2))

  def grads(cfg):
    def loss(params):
      out = TextEncoder(cfg).apply({'params': params}, tokens)
      return jnp.sum(out.last_hidden_state**2)

    return jax.jit(jax.grad(loss))(_params())

  remat = dataclasses.replace(TINY, remat='full')
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
    grads(remat),
    grads(TINY),
  )


@pytest.mark.parametrize(
  'field, value',
  [
    ('vocab_size', 0),
    ('eos_token_id', 10),
    ('hidden_size', 8.0),
    ('num_attention_heads', 3),
    ('hidden_act', 'relu'),
    ('layer_norm_eps', 0.0),
    ('dtype', 'float16'),
    ('remat', 'all'),
  ],
)
def test_config_validation(field, value):
  with pytest.raises(ValueError, match=f'TextEncoderConfig.{field}='):
    dataclasses.replace(TINY, **{field: value})


def test_tokens_must_fit_the_position_embeddings():
  with pytest.raises(ValueError, match='max_position_embeddings=6'):
    _encode(np.zeros((1, LENGTH + 1), np.int32))


def _equations(jaxpr):
  """Every equation of `jaxpr` and of the jaxprs nested in its equations."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax_core.jaxprs_in_params(eqn.params):
      yield from _equations(sub)


def test_bfloat16_softmax_and_norm_statistics_are_float32():
  bf16 = dataclasses.replace(TINY, dtype='bfloat16')
  jaxpr = jax.make_jaxpr(
    lambda p: TextEncoder(bf16).apply({'params': p}, _random_tokens(2))
  )(_params()).jaxpr
  dtypes = collections.defaultdict(set)
  for eqn in _equations(jaxpr):
    dtypes[eqn.primitive.name].update(str(v.aval.dtype) for v in eqn.outvars)
  assert 'bfloat16' in dtypes['dot_general']
  # The softmax's max, exp and sum and the LayerNorms' 1/√(var + ε).
  for name in ('reduce_max', 'exp', 'reduce_sum', 'rsqrt'):
    assert dtypes[name] == {'float32'}, (name, dtypes[name])
