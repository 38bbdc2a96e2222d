"""Tests of gdd.models: shapes, init, conditioning, precision and remat."""

import collections
import dataclasses
import functools
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from gdd import config_lib, data, plan
from gdd.models import UNet, UNetConfig, layers
from gdd.stages import common, guided
from tests import helpers

TINY = UNetConfig(
  image_size=8,
  in_channels=1,
  num_classes=3,
  ch=8,
  emb_ch=16,
  ch_mult=(1, 2),
  num_res_blocks=1,
  head_dim=8,
)
BATCH = 2


def _inputs(cfg: UNetConfig, seed: int = 0, batch: int = BATCH):
  """A batch (z, logsnr, cond, w) for `cfg`; w is None for a teacher."""
  z_rng, logsnr_rng, label_rng, w_rng = jax.random.split(
    jax.random.key(seed), 4
  )
  shape = (batch, cfg.image_size, cfg.image_size, cfg.in_channels)
  z = jax.random.normal(z_rng, shape)
  logsnr = jax.random.uniform(logsnr_rng, (batch,), minval=-10, maxval=10)
  labels = jax.random.randint(label_rng, (batch,), 0, cfg.num_classes + 1)
  w = None
  if cfg.use_w_embedding:
    w = jax.random.uniform(w_rng, (batch,), maxval=cfg.w_max)
  return z, logsnr, {'label': labels}, w


def _init(cfg: UNetConfig, seed: int = 0) -> dict:
  return UNet(cfg).init(jax.random.key(seed), *_inputs(cfg), train=False)[
    'params'
  ]


def _perturb(params: dict, seed: int, keep=lambda path: False) -> dict:
  """Adds N(0, 0.1²) noise to every param whose path `keep` does not match.

  Fresh nets have zero-initialised output layers; noise makes every path
  through the network visible in the output.
  """
  # numpy noise: jax.random would compile a kernel per param shape.
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(params)
  flat = {
    path: value
    if keep(path)
    else value + 0.1 * rng.standard_normal(value.shape, np.float32)
    for path, value in flat.items()
  }
  return flax.traverse_util.unflatten_dict(flat)


@functools.cache
def _jitted_apply(cfg: UNetConfig):
  return jax.jit(UNet(cfg).apply, static_argnames='train')


def _apply(cfg: UNetConfig, params: dict, *inputs, train=False, rngs=None):
  # One compiled function per config: far faster than op-by-op dispatch.
  return _jitted_apply(cfg)({'params': params}, *inputs, train=train, rngs=rngs)


def test_sinusoidal_embedding():
  x = jnp.array([0.0, 1.0, 500.0])
  emb = layers.sinusoidal_embedding(x, 8)
  assert emb.shape == (3, 8) and emb.dtype == jnp.float32
  np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_allclose(emb[1, 0], np.cos(1.0), rtol=1e-6)
  odd = layers.sinusoidal_embedding(x, 7)
  assert odd.shape == (3, 7)
  np.testing.assert_array_equal(odd[:, -1], 0)


@pytest.mark.parametrize(
  'channels, groups', [(8, 8), (32, 32), (40, 20), (48, 24), (96, 32), (7, 7)]
)
def test_num_groups(channels, groups):
  assert layers.num_groups(channels) == groups


@pytest.mark.parametrize('mean_type', ['x', 'eps', 'v', 'both'])
@pytest.mark.parametrize('attn_resolutions', [(), (8, 4)])
@pytest.mark.parametrize('use_w_embedding', [False, True])
def test_output_shape(mean_type, attn_resolutions, use_w_embedding):
  cfg = dataclasses.replace(
    TINY,
    mean_type=mean_type,
    attn_resolutions=attn_resolutions,
    use_w_embedding=use_w_embedding,
  )
  # eval_shape traces without compiling, so the grid of configs stays fast.
  out, variables = jax.eval_shape(
    lambda: UNet(cfg).init_with_output(
      jax.random.key(0), *_inputs(cfg), train=False
    )
  )
  channels = 2 if mean_type == 'both' else 1
  assert cfg.out_channels == channels
  assert out.shape == (BATCH, 8, 8, channels)
  assert out.dtype == jnp.float32
  names = set(variables['params'])
  assert 'mid_attn' in names
  assert ('down_0_attn_0' in names) == bool(attn_resolutions)
  assert ('up_1_attn_1' in names) == bool(attn_resolutions)
  assert ('w_embedding' in names) == use_w_embedding


def test_bfloat16_compute():
  # TINY's middle block has attention, so bfloat16 attention runs too.
  bf16 = dataclasses.replace(TINY, dtype='bfloat16')
  params = _perturb(_init(TINY), seed=1)
  bf16_params = jax.eval_shape(lambda: _init(bf16))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf16_params))
  assert jax.tree.map(jnp.shape, bf16_params) == jax.tree.map(jnp.shape, params)
  inputs = _inputs(TINY)[:3]
  out_bf16 = _apply(bf16, params, *inputs)
  out_f32 = _apply(TINY, params, *inputs)
  assert out_bf16.dtype == jnp.float32
  assert out_bf16.shape == out_f32.shape
  # Same params, lower precision: close but not identical.
  scale = float(jnp.abs(out_f32).max())
  assert scale > 0
  np.testing.assert_allclose(out_bf16, out_f32, atol=0.05 * scale)


def _equations(jaxpr: jax_core.Jaxpr):
  """Every equation of `jaxpr` and of the jaxprs nested in its equations."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax_core.jaxprs_in_params(eqn.params):
      yield from _equations(sub)


def test_bfloat16_statistics_softmax_and_embedding_are_float32():
  bf16 = dataclasses.replace(TINY, dtype='bfloat16')
  params = jax.eval_shape(lambda: _init(bf16))
  jaxpr = jax.make_jaxpr(
    lambda p: UNet(bf16).apply({'params': p}, *_inputs(bf16)[:3], train=False)
  )(params).jaxpr
  dtypes = collections.defaultdict(set)
  for eqn in _equations(jaxpr):
    dtypes[eqn.primitive.name].update(str(v.aval.dtype) for v in eqn.outvars)
  # The convs and dense layers compute in bfloat16 (conv_out in float32)...
  assert dtypes['conv_general_dilated'] == {'bfloat16', 'float32'}
  assert 'bfloat16' in dtypes['dot_general']
  # ...but the GroupNorm statistics (their sums and 1/√(var + ε)), the
  # attention softmax (its max, exp and sum) and the sinusoidal embedding
  # are float32.
  for name in ('reduce_sum', 'rsqrt', 'reduce_max', 'exp', 'sin', 'cos'):
    assert dtypes[name] == {'float32'}, (name, dtypes[name])


def _einsum_attention(params: dict, x: jnp.ndarray, head_dim: int):
  """AttentionBlock as first written: two einsums around a softmax."""
  batch, height, width, channels = x.shape
  heads = layers.num_heads(channels, head_dim)
  h = nn.GroupNorm(num_groups=layers.num_groups(channels)).apply(
    {'params': params['norm']}, x
  )
  qkv = h @ params['qkv']['kernel'] + params['qkv']['bias']
  qkv = qkv.reshape(batch, height * width, 3, heads, channels // heads)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  q = q * (channels // heads) ** -0.5
  weights = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k), axis=-1)
  h = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(x.shape)
  return x + h @ params['proj_out']['kernel'] + params['proj_out']['bias']


def test_attention_equals_einsum_reference():
  # 16 channels in 2 heads over 4x4 positions: a wrong head split or scale
  # changes the result.
  block = layers.AttentionBlock(head_dim=8)
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 16))
  params = _perturb(block.init(jax.random.key(1), x)['params'], seed=2)
  attended = jax.jit(block.apply)({'params': params}, x) - x
  expected = _einsum_attention(params, x, head_dim=8) - x
  assert float(jnp.abs(expected).max()) > 0.1
  np.testing.assert_allclose(attended, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('remat', ['full', 'dots_saveable'])
def test_remat_keeps_the_param_tree(remat):
  # Checkpoints written without remat must load with it, and vice versa.
  cfg = dataclasses.replace(
    TINY, attn_resolutions=(8, 4), use_w_embedding=True, dropout=0.1
  )
  plain, rematerialised = (
    jax.eval_shape(lambda c=c: _init(c))
    for c in (cfg, dataclasses.replace(cfg, remat=remat))
  )
  assert rematerialised == plain


def test_models_take_remat_from_the_memory_config():
  config = helpers.load_config('digits')
  config.memory.remat = 'dots_saveable'
  info = data.get_info(config.data)
  assert common.build_model(config, info).config.remat == 'dots_saveable'
  assert guided.build_student(config, info).config.remat == 'dots_saveable'


# The planner's CPU compile options (remat's barriers kept, as accelerators
# keep them); LLVM optimisation off does not change the memory plan and
# halves the compile time.
_REMAT_AS_ON_ACCELERATORS = {
  **plan.CPU_KEEP_REMAT,
  'xla_backend_optimization_level': 0,
}


def test_remat_changes_memory_not_gradients():
  # One level (fewer blocks to compile) and 64 images: the activations,
  # which remat stops storing, outweigh the params. Dropout on: the
  # recomputed forward pass must draw the same masks.
  cfg = dataclasses.replace(TINY, ch_mult=(1,), dropout=0.1)
  # Noise on zeros rather than a real init, which is slow to run op by op.
  params = _perturb(
    jax.tree.map(
      lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(lambda: _init(cfg))
    ),
    seed=1,
  )
  args = (params, _inputs(cfg, batch=64)[:3], jax.random.key(3))
  grads, temp_bytes = {}, {}
  for remat in config_lib.REMAT_POLICIES:
    model = UNet(dataclasses.replace(cfg, remat=remat))

    def loss(p, inputs, rng, model=model):
      out = model.apply(
        {'params': p}, *inputs, train=True, rngs={'dropout': rng}
      )
      return jnp.mean(out**2)

    compiled = (
      jax.jit(jax.grad(loss)).lower(*args).compile(_REMAT_AS_ON_ACCELERATORS)
    )
    grads[remat] = compiled(*args)
    temp_bytes[remat] = compiled.memory_analysis().temp_size_in_bytes
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads['none']))
  for remat in ('full', 'dots_saveable'):
    for got, want in zip(
      jax.tree.leaves(grads[remat]), jax.tree.leaves(grads['none']), strict=True
    ):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * scale)
  # Measured: 13.8 MB of temporaries without remat, 7.5 MB 'full', 7.4 MB
  # 'dots_saveable'.
  assert temp_bytes['full'] < 0.8 * temp_bytes['none'], temp_bytes
  assert temp_bytes['dots_saveable'] < 0.8 * temp_bytes['none'], temp_bytes


def test_fresh_net_outputs_zero_and_conditioning_reaches_output():
  params = _init(TINY)
  z, logsnr, labels, _ = _inputs(TINY)
  np.testing.assert_array_equal(_apply(TINY, params, z, logsnr, labels), 0)

  # Noise on all params, the zero-initialised layers (conv_out, each block's
  # last conv, the attention projections) included, opens every path from the
  # embedding to the output.
  params = _perturb(params, seed=1)
  out = _apply(TINY, params, z, logsnr, labels)
  assert float(jnp.abs(out).max()) > 0
  other = {'label': (labels['label'] + 1) % (TINY.num_classes + 1)}
  assert not np.allclose(out, _apply(TINY, params, z, logsnr, other))
  assert not np.allclose(out, _apply(TINY, params, z, logsnr + 3.0, labels))


def test_student_params_are_teacher_params_plus_w_embedding():
  student_cfg = dataclasses.replace(TINY, use_w_embedding=True)
  teacher, student = (
    flax.traverse_util.flatten_dict(jax.eval_shape(lambda c=c: _init(c)))
    for c in (TINY, student_cfg)
  )
  extra = set(student) - set(teacher)
  assert set(teacher) <= set(student)
  assert extra and all(path[0] == 'w_embedding' for path in extra)
  for path, value in teacher.items():
    assert student[path] == value, path


def test_fresh_w_embedding_leaves_the_teacher_unchanged():
  student_cfg = dataclasses.replace(TINY, use_w_embedding=True)
  teacher_params = _perturb(_init(TINY), seed=1)
  fresh = _init(student_cfg, seed=2)
  # The w-path's first layer gets noise too, so only the zero-initialised
  # last layer makes the path a no-op.
  w_embedding = _perturb(
    fresh['w_embedding'], seed=3, keep=lambda path: path[0] == 'dense_1'
  )
  student_params = {**teacher_params, 'w_embedding': w_embedding}
  z, logsnr, labels, _ = _inputs(TINY)
  expected = _apply(TINY, teacher_params, z, logsnr, labels)
  assert float(jnp.abs(expected).max()) > 0
  for w in (0.0, 1.5, 4.0):
    got = _apply(
      student_cfg, student_params, z, logsnr, labels, jnp.full(BATCH, w)
    )
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)

  # With a trained (non-zero) last layer the output does depend on w.
  student_params['w_embedding'] = _perturb(w_embedding, seed=4)
  w0, w4 = (
    _apply(student_cfg, student_params, z, logsnr, labels, jnp.full(BATCH, w))
    for w in (0.0, 4.0)
  )
  assert not np.allclose(w0, w4)


def test_dropout_only_in_training():
  cfg = dataclasses.replace(TINY, dropout=0.5)
  params = _perturb(_init(cfg), seed=1)
  inputs = _inputs(cfg)[:3]
  eval_a = _apply(cfg, params, *inputs)
  eval_b = _apply(cfg, params, *inputs)
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a, train_b = (
    _apply(cfg, params, *inputs, train=True, rngs={'dropout': key})
    for key in jax.random.split(jax.random.key(5))
  )
  assert not np.allclose(train_a, train_b)
  assert not np.allclose(train_a, eval_a)
  with pytest.raises(flax.errors.InvalidRngError):
    _apply(cfg, params, *inputs, train=True)


def test_w_missing_or_unexpected():
  student_cfg = dataclasses.replace(TINY, use_w_embedding=True)
  z, logsnr, labels, _ = _inputs(TINY)
  with pytest.raises(ValueError, match='w is required'):
    UNet(student_cfg).init(jax.random.key(0), z, logsnr, labels, train=False)
  with pytest.raises(ValueError, match='use_w_embedding=False but got w'):
    UNet(TINY).init(
      jax.random.key(0), z, logsnr, labels, jnp.zeros(2), train=False
    )


def test_input_shape_errors():
  z, logsnr, labels, _ = _inputs(TINY)
  init = UNet(TINY).init
  with pytest.raises(ValueError, match='z must have shape'):
    init(jax.random.key(0), z[:, :4], logsnr, labels, train=False)
  with pytest.raises(ValueError, match='logsnr must have shape'):
    init(jax.random.key(0), z, logsnr[:1], labels, train=False)
  with pytest.raises(ValueError, match=r"cond\['label'\] must have shape"):
    init(
      jax.random.key(0), z, logsnr, {'label': labels['label'][:1]}, train=False
    )
  with pytest.raises(ValueError, match="cond must be {'label'"):
    init(jax.random.key(0), z, logsnr, labels['label'], train=False)


@pytest.mark.parametrize(
  'field, value',
  [
    ('image_size', 7),
    ('image_size', 0),
    ('ch', 8.0),
    ('num_res_blocks', True),
    ('ch_mult', ()),
    ('ch_mult', (1, 0)),
    ('attn_resolutions', (3,)),
    ('dropout', 1.0),
    ('mean_type', 'score'),
    ('w_max', 0.0),
    ('dtype', 'float16'),
    ('head_dim', 3),
    ('remat', 'partial'),
  ],
)
def test_bad_config(field, value):
  # The message names the field and the rejected value.
  with pytest.raises(ValueError, match=re.escape(f'{field}={value!r};')):
    dataclasses.replace(TINY, **{field: value})


def test_config_accepts_lists():
  cfg = dataclasses.replace(TINY, ch_mult=[1, 2], attn_resolutions=[4])
  assert cfg.ch_mult == (1, 2) and cfg.attn_resolutions == (4,)
  hash(cfg)
