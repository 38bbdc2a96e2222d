"""Tests of gdd.models.sd_unet: diffusers parity, conditioning, precision."""

import dataclasses
import functools
import math
import re

import diffusers
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gdd import config_lib
from gdd.models import layers, sd_unet
from gdd.weights import naming

TINY = sd_unet.SDUNetConfig(
  sample_size=8,
  in_channels=4,
  block_out_channels=(32, 64),
  layers_per_block=1,
  down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
  up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
  cross_attention_dim=16,
  attention_head_dim=2,
  norm_num_groups=8,
  # Dropout in eval mode would need a 'dropout' rng, which no eval call
  # passes: every eval test checks that dropout is off there.
  dropout=0.1,
)
# Without text: classes, and self-attention-only transformers.
CLASSES = dataclasses.replace(
  TINY, cross_attention_dim=None, num_class_embeds=3
)
BATCH, TOKENS = 2, 5


def _inputs(cfg: sd_unet.SDUNetConfig, seed: int = 0) -> dict:
  """Keyword inputs of `SDUNet` for `cfg`: labels and w only if it has them."""
  keys = jax.random.split(jax.random.key(seed), 5)
  size = cfg.sample_size
  inputs = {
    'z': jax.random.normal(keys[0], (BATCH, size, size, cfg.in_channels)),
    'logsnr': jax.random.uniform(keys[1], (BATCH,), minval=-10, maxval=10),
    'context': None,
  }
  if cfg.cross_attention_dim is not None:
    inputs['context'] = jax.random.normal(
      keys[2], (BATCH, TOKENS, cfg.cross_attention_dim)
    )
  if cfg.num_class_embeds is not None:
    inputs['labels'] = jax.random.randint(
      keys[3], (BATCH,), 0, cfg.num_class_embeds + 1
    )
  if cfg.use_w_embedding:
    inputs['w'] = jax.random.uniform(keys[4], (BATCH,), maxval=cfg.w_max)
  return inputs


@functools.cache
def _param_shapes(cfg: sd_unet.SDUNetConfig) -> dict:
  return jax.eval_shape(
    lambda: sd_unet.SDUNet(cfg).init(
      jax.random.key(0), **_inputs(cfg), train=False
    )['params']
  )


def _noisy_params(cfg: sd_unet.SDUNetConfig, seed: int = 1) -> dict:
  """Random non-zero params, the zero-initialised layers included.

  Fresh nets output exactly 0 (conv_out starts at zero); these make every
  path through the network show in the output. numpy, not jax.random: one
  compiled kernel per param shape would be slow.
  """
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda s: (
      rng.standard_normal(s.shape, np.float32)
      / math.sqrt(math.prod(s.shape[:-1]) or 1)
    ),
    _param_shapes(cfg),
  )


@functools.cache
def _jitted_apply(cfg: sd_unet.SDUNetConfig):
  return jax.jit(sd_unet.SDUNet(cfg).apply, static_argnames='train')


def _apply(cfg, params, inputs, train=False, rngs=None):
  # One compiled function per config: far faster than op-by-op dispatch.
  apply = _jitted_apply(cfg)
  return apply({'params': params}, **inputs, train=train, rngs=rngs)


# Both projections, per-block heads whose reversal the up path must apply,
# 1 and 2 transformer layers, both sinusoid orders and a class embedding.
DIFFUSERS_CASES = {
  'sd1_like': sd_unet.SDUNetConfig(
    sample_size=8,
    in_channels=4,
    mean_type='eps',
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    down_block_types=(
      'CrossAttnDownBlock2D',
      'CrossAttnDownBlock2D',
      'DownBlock2D',
    ),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
    cross_attention_dim=12,
    attention_head_dim=(2, 4, 8),
    norm_num_groups=8,
    num_class_embeds=3,
  ),
  'sd2_like': sd_unet.SDUNetConfig(
    sample_size=8,
    in_channels=4,
    mean_type='eps',
    block_out_channels=(16, 32),
    layers_per_block=2,
    down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
    up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'),
    cross_attention_dim=8,
    attention_head_dim=4,
    transformer_layers_per_block=2,
    use_linear_projection=True,
    norm_num_groups=4,
    flip_sin_to_cos=False,
    freq_shift=1,
  ),
}
# SDUNetConfig fields that are UNet2DConditionModel arguments.
_DIFFUSERS_ARGUMENTS = (
  'sample_size',
  'in_channels',
  'block_out_channels',
  'layers_per_block',
  'down_block_types',
  'up_block_types',
  'cross_attention_dim',
  'attention_head_dim',
  'transformer_layers_per_block',
  'use_linear_projection',
  'norm_num_groups',
  'norm_eps',
  'num_class_embeds',
  'flip_sin_to_cos',
  'freq_shift',
  'dropout',
)


def _torch(array) -> torch.Tensor:
  return torch.from_numpy(np.array(array))


@pytest.mark.parametrize('name', sorted(DIFFUSERS_CASES))
def test_equals_diffusers_unet(name):
  # diffusers' UNet2DConditionModel of the same config (torch on CPU, a
  # test dependency) with gdd's random params renamed by gdd.weights.naming
  # (strict: every key, every shape) computes the same output. Covers the
  # time sinusoid, class embedding, both projections, per-block heads
  # (reversed in the up path), 2-layer transformers, PyTorch's downsample
  # padding and the skip order. tests/test_weights.py loads SD-shaped
  # checkpoints the other way.
  cfg = DIFFUSERS_CASES[name]
  model = diffusers.UNet2DConditionModel(
    **{k: getattr(cfg, k) for k in _DIFFUSERS_ARGUMENTS},
    out_channels=cfg.out_channels,
  ).eval()
  params = _noisy_params(cfg)
  state_dict = naming.to_torch(params)
  if cfg.num_class_embeds is not None:
    # diffusers has no row for the null label K.
    key = 'class_embedding.weight'
    state_dict[key] = state_dict[key][: cfg.num_class_embeds]
  model.load_state_dict(
    {
      k: torch.from_numpy(np.ascontiguousarray(v))
      for k, v in state_dict.items()
    },
    strict=True,
  )
  inputs = _inputs(cfg)
  if cfg.num_class_embeds is not None:
    inputs['labels'] = inputs['labels'] % cfg.num_class_embeds
  out = _apply(cfg, params, inputs)
  with torch.no_grad():
    expected = model(
      _torch(np.asarray(inputs['z']).transpose(0, 3, 1, 2)),
      _torch(sd_unet.timesteps(inputs['logsnr'])),
      encoder_hidden_states=_torch(inputs['context']),
      class_labels=_torch(inputs['labels']).long()
      if 'labels' in inputs
      else None,
    ).sample
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(
    out, expected.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=5e-5
  )


@pytest.mark.parametrize(
  'overrides, count',
  [
    # diffusers' UNet2DConditionModel parameter counts (SD 1.x, SD 2.x).
    (dict(sample_size=64, mean_type='eps'), 859_520_964),
    (
      dict(
        sample_size=96,
        mean_type='v',
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
      ),
      865_910_724,
    ),
  ],
)
def test_stable_diffusion_sizes(overrides, count):
  cfg = sd_unet.SDUNetConfig(**overrides)
  shapes = jax.eval_shape(
    lambda: sd_unet.SDUNet(cfg).init(
      jax.random.key(0),
      jnp.zeros((1, cfg.sample_size, cfg.sample_size, 4)),
      jnp.zeros(1),
      jnp.zeros((1, 77, cfg.cross_attention_dim)),
      train=False,
    )['params']
  )
  assert sum(s.size for s in jax.tree.leaves(shapes)) == count


@pytest.mark.parametrize('mean_type, channels', [('both', 8), ('eps', 4)])
def test_output_shape_and_param_names(mean_type, channels):
  cfg = dataclasses.replace(TINY, mean_type=mean_type)
  out, variables = jax.eval_shape(
    lambda: sd_unet.SDUNet(cfg).init_with_output(
      jax.random.key(0), **_inputs(cfg), train=False
    )
  )
  assert cfg.out_channels == channels
  assert out.shape == (BATCH, 8, 8, channels) and out.dtype == jnp.float32
  flat = flax.traverse_util.flatten_dict(variables['params'], sep='/')
  block = 'down_blocks_0/attentions_0/transformer_blocks_0'
  expected = {
    'conv_in/kernel': (3, 3, 4, 32),
    'time_embedding/linear_1/kernel': (32, 128),
    'time_embedding/linear_2/bias': (128,),
    'down_blocks_0/resnets_0/conv1/kernel': (3, 3, 32, 32),
    'down_blocks_0/resnets_0/time_emb_proj/kernel': (128, 32),
    'down_blocks_0/attentions_0/norm/scale': (32,),
    'down_blocks_0/attentions_0/proj_in/kernel': (1, 1, 32, 32),
    f'{block}/attn1/to_q/kernel': (32, 32),
    f'{block}/attn2/to_k/kernel': (16, 32),
    f'{block}/attn2/to_out_0/bias': (32,),
    f'{block}/ff/net_0/proj/kernel': (32, 256),
    f'{block}/ff/net_2/kernel': (128, 32),
    f'{block}/norm3/scale': (32,),
    'down_blocks_0/downsamplers_0/conv/kernel': (3, 3, 32, 32),
    'down_blocks_1/resnets_0/conv_shortcut/kernel': (1, 1, 32, 64),
    'mid_block/resnets_1/norm2/scale': (64,),
    'mid_block/attentions_0/proj_in/kernel': (1, 1, 64, 64),
    'up_blocks_0/resnets_1/conv1/kernel': (3, 3, 96, 64),
    'up_blocks_0/upsamplers_0/conv/kernel': (3, 3, 64, 64),
    'up_blocks_1/attentions_1/proj_out/kernel': (1, 1, 32, 32),
    'conv_norm_out/scale': (32,),
    'conv_out/kernel': (3, 3, 32, channels),
  }
  for path, shape in expected.items():
    assert flat[path].shape == shape, path
  # No bias on q, k, v; no attention in the DownBlock2D or UpBlock2D.
  assert f'{block}/attn1/to_q/bias' not in flat
  assert not any(p.startswith('down_blocks_1/attentions') for p in flat)
  assert not any(p.startswith('up_blocks_0/attentions') for p in flat)
  assert 'up_blocks_1/upsamplers_0/conv/kernel' not in flat
  assert not any(p.startswith(('class_embedding', 'w_embedding')) for p in flat)


def test_without_text_the_transformers_only_self_attend():
  flat = flax.traverse_util.flatten_dict(_param_shapes(CLASSES), sep='/')
  text = flax.traverse_util.flatten_dict(_param_shapes(TINY), sep='/')
  # diffusers' BasicTransformerBlock with cross_attention_dim=None: no
  # norm2 and no attn2; every other param is the text network's, path and
  # shape, and the class embedding has the null label's row.
  cross = {
    p for p in text if re.search(r'transformer_blocks_\d+/(attn2|norm2)/', p)
  }
  assert cross
  assert set(flat) == set(text) - cross | {'class_embedding/embedding'}
  for path, struct in flat.items():
    assert path not in text or text[path].shape == struct.shape, path
  assert flat['class_embedding/embedding'].shape == (4, 128)
  # Labels, not a text, condition it; the null label K is a label too.
  params = _noisy_params(CLASSES)
  inputs = _inputs(CLASSES)
  labels = (jnp.array([0, 1]), jnp.array([2, 1]), jnp.array([3, 1]))
  out = [_apply(CLASSES, params, {**inputs, 'labels': y}) for y in labels]
  np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-5, atol=1e-5)
  assert not np.allclose(out[0][0], out[1][0], atol=1e-3)
  assert not np.allclose(out[0][0], out[2][0], atol=1e-3)
  with pytest.raises(ValueError, match='context=None'):
    _apply(CLASSES, params, {**inputs, 'context': _inputs(TINY)['context']})
  with pytest.raises(ValueError, match='context must have shape'):
    _apply(TINY, _noisy_params(TINY), {**_inputs(TINY), 'context': None})


def test_linear_projection():
  cfg = dataclasses.replace(TINY, use_linear_projection=True)
  params = _noisy_params(cfg)
  assert params['mid_block']['attentions_0']['proj_in']['kernel'].shape == (
    64,
    64,
  )
  # A 1x1 conv is the same map: reshaped kernels give the same output.
  conv_params = jax.tree_util.tree_map_with_path(
    lambda path, p: (
      p.reshape(1, 1, *p.shape)
      if path[-2].key in ('proj_in', 'proj_out') and path[-1].key == 'kernel'
      else p
    ),
    params,
  )
  inputs = _inputs(cfg)
  out = _apply(cfg, params, inputs)
  np.testing.assert_allclose(
    out, _apply(TINY, conv_params, inputs), rtol=1e-5, atol=1e-5
  )


def test_cross_attention_reads_the_text():
  params = _noisy_params(TINY)
  inputs = _inputs(TINY)
  out = _apply(TINY, params, inputs)
  context = inputs['context']
  # Another caption, or one token changed, changes the output...
  other = _apply(TINY, params, {**inputs, 'context': context[::-1]})
  assert not np.allclose(out, other, atol=1e-3)
  one_token = context.at[:, 2].set(0.0)
  assert not np.allclose(
    out, _apply(TINY, params, {**inputs, 'context': one_token}), atol=1e-3
  )
  # ...but the token order alone does not: attention is a weighted sum over
  # tokens (their positions are the text encoder's business).
  permuted = context[:, jnp.array([3, 0, 4, 1, 2])]
  np.testing.assert_allclose(
    _apply(TINY, params, {**inputs, 'context': permuted}),
    out,
    rtol=1e-5,
    atol=1e-5,
  )
  # The caption is any number of tokens long.
  short = _apply(TINY, params, {**inputs, 'context': context[:, :1]})
  assert short.shape == out.shape


def test_time_and_class_labels_change_the_output():
  cfg = dataclasses.replace(TINY, num_class_embeds=3)
  params = _noisy_params(cfg)
  assert params['class_embedding']['embedding'].shape == (4, 128)
  inputs = _inputs(cfg)
  out = _apply(cfg, params, inputs)
  null = {**inputs, 'labels': jnp.full((BATCH,), 3)}
  assert not np.allclose(out, _apply(cfg, params, null), atol=1e-3)
  later = {**inputs, 'logsnr': inputs['logsnr'] - 3.0}
  assert not np.allclose(out, _apply(cfg, params, later), atol=1e-3)


@pytest.mark.parametrize('teacher_cfg', [TINY, CLASSES], ids=['text', 'class'])
def test_student_params_are_teacher_params_plus_w_embedding(teacher_cfg):
  student_cfg = dataclasses.replace(teacher_cfg, use_w_embedding=True)
  teacher, student = (
    flax.traverse_util.flatten_dict(_param_shapes(c))
    for c in (teacher_cfg, student_cfg)
  )
  extra = set(student) - set(teacher)
  assert set(teacher) <= set(student)
  assert extra and all(path[0] == 'w_embedding' for path in extra)
  for path, value in teacher.items():
    assert student[path] == value, path


@pytest.mark.parametrize('teacher_cfg', [TINY, CLASSES], ids=['text', 'class'])
def test_fresh_net_is_zero_and_its_w_embedding_changes_nothing(teacher_cfg):
  student_cfg = dataclasses.replace(teacher_cfg, use_w_embedding=True)
  inputs = _inputs(student_cfg)
  fresh = jax.jit(
    lambda: sd_unet.SDUNet(student_cfg).init(
      jax.random.key(2), **inputs, train=False
    )
  )()['params']
  # conv_out starts at zero (as do each resnet's conv2 and each proj_out).
  np.testing.assert_array_equal(_apply(student_cfg, fresh, inputs), 0)

  # A fresh w_embedding on a trained teacher: the teacher, for every w.
  # Only its zero-initialised last layer makes it a no-op.
  w_embedding = fresh['w_embedding']
  assert float(jnp.abs(w_embedding['linear_1']['kernel']).max()) > 0
  teacher_params = _noisy_params(teacher_cfg)
  student_params = {**teacher_params, 'w_embedding': w_embedding}
  teacher_inputs = {k: v for k, v in inputs.items() if k != 'w'}
  expected = _apply(teacher_cfg, teacher_params, teacher_inputs)
  for w in (0.0, 1.5, 4.0):
    got = _apply(
      student_cfg, student_params, {**inputs, 'w': jnp.full(BATCH, w)}
    )
    # Two programs: XLA may fuse, so round, them differently (~2e-6 seen).
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

  # With a trained (non-zero) last layer the output does depend on w.
  student_params['w_embedding'] = _noisy_params(student_cfg)['w_embedding']
  w0, w4 = (
    _apply(student_cfg, student_params, {**inputs, 'w': jnp.full(BATCH, w)})
    for w in (0.0, 4.0)
  )
  assert not np.allclose(w0, w4, atol=1e-3)


def test_bfloat16_compute_is_close_to_float32():
  bf16 = dataclasses.replace(TINY, dtype='bfloat16')
  bf16_shapes = _param_shapes(bf16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf16_shapes))
  assert bf16_shapes == _param_shapes(TINY)
  params = _noisy_params(TINY)
  inputs = _inputs(TINY)
  out_bf16, out_f32 = (_apply(c, params, inputs) for c in (bf16, TINY))
  assert out_bf16.dtype == jnp.float32
  # Same params, lower precision: close but not identical.
  scale = float(jnp.abs(out_f32).max())
  assert scale > 0 and not np.array_equal(out_bf16, out_f32)
  np.testing.assert_allclose(out_bf16, out_f32, atol=0.05 * scale)


def test_remat_keeps_params_outputs_and_gradients():
  # One level: half the blocks to compile. train=True with dropout: the
  # recomputed forward pass must draw the same masks.
  cfg = dataclasses.replace(
    TINY,
    block_out_channels=(32,),
    down_block_types=('CrossAttnDownBlock2D',),
    up_block_types=('CrossAttnUpBlock2D',),
  )
  params = _noisy_params(cfg)
  inputs = _inputs(cfg)
  results = {}
  for remat in config_lib.REMAT_POLICIES:
    remat_cfg = dataclasses.replace(cfg, remat=remat)
    assert _param_shapes(remat_cfg) == _param_shapes(cfg)

    def loss(p, rng, cfg=remat_cfg):
      out = sd_unet.SDUNet(cfg).apply(
        {'params': p}, **inputs, train=True, rngs={'dropout': rng}
      )
      return jnp.mean(out**2), out

    grad_fn = jax.jit(jax.grad(loss, has_aux=True))
    results[remat] = grad_fn(params, jax.random.key(3))
    if remat == 'none':
      # Dropout is on in training: another rng, another output.
      other = grad_fn(params, jax.random.key(4))[1]
      assert not np.allclose(other, results[remat][1], atol=1e-3)
  grads, out = results['none']
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
  for remat in ('full', 'dots_saveable'):
    remat_grads, remat_out = results[remat]
    np.testing.assert_allclose(remat_out, out, rtol=1e-5, atol=1e-5)
    for got, want in zip(
      jax.tree.leaves(remat_grads), jax.tree.leaves(grads), strict=True
    ):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize(
  'flip_sin_to_cos, freq_shift', [(True, 0), (False, 1), (True, 1)]
)
def test_sinusoid_is_diffusers_get_timestep_embedding(
  flip_sin_to_cos, freq_shift
):
  t = np.array([0.0, 1.0, 999.0])
  half = 8
  expected = diffusers.models.embeddings.get_timestep_embedding(
    torch.from_numpy(t),
    2 * half,
    flip_sin_to_cos=flip_sin_to_cos,
    downscale_freq_shift=freq_shift,
  ).numpy()
  got = layers.sinusoidal_embedding(
    t, 2 * half, flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift
  )
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_timesteps_are_gdd_time_input_times_1000():
  # λ = 20 is t ≈ 0, λ = 0 is t = ½, λ = −20 is t ≈ 1.
  got = sd_unet.timesteps(jnp.array([20.0, 0.0, -20.0]))
  np.testing.assert_allclose(got, [0.0, 500.0, 1000.0], atol=0.1)


def test_w_and_labels_missing_or_unexpected():
  z, logsnr, context = (_inputs(TINY)[k] for k in ('z', 'logsnr', 'context'))
  init = sd_unet.SDUNet(TINY).init
  student = sd_unet.SDUNet(dataclasses.replace(TINY, use_w_embedding=True))
  with pytest.raises(ValueError, match='w is required'):
    student.init(jax.random.key(0), z, logsnr, context, train=False)
  with pytest.raises(ValueError, match='use_w_embedding=True but got w'):
    init(jax.random.key(0), z, logsnr, context, w=jnp.zeros(2), train=False)
  classes = sd_unet.SDUNet(dataclasses.replace(TINY, num_class_embeds=3))
  with pytest.raises(ValueError, match='labels is required'):
    classes.init(jax.random.key(0), z, logsnr, context, train=False)
  with pytest.raises(ValueError, match='without num_class_embeds=K but got'):
    init(jax.random.key(0), z, logsnr, context, jnp.zeros(2, int), train=False)
  with pytest.raises(ValueError, match='labels must be ints'):
    classes.init(
      jax.random.key(0), z, logsnr, context, jnp.zeros(2), train=False
    )


@pytest.mark.parametrize(
  'name, change, message',
  [
    ('z', lambda z: z[:, :4], 'z must have shape'),
    ('z', lambda z: z[..., :3], 'z must have shape'),
    ('logsnr', lambda x: x[:1], r'logsnr must have shape \[B\]'),
    ('context', lambda c: c[:, :, :8], 'context must have shape'),
    ('context', lambda c: c[:1], 'context must have shape'),
    ('context', lambda c: c[:, :0], 'context must have shape'),
    ('context', lambda c: c[:, 0], 'context must have shape'),
  ],
)
def test_input_shape_errors(name, change, message):
  inputs = _inputs(TINY)
  inputs[name] = change(inputs[name])
  with pytest.raises(ValueError, match=message):
    sd_unet.SDUNet(TINY).init(jax.random.key(0), **inputs, train=False)


@pytest.mark.parametrize(
  'field, value',
  [
    ('sample_size', 7),
    ('sample_size', 0),
    ('in_channels', 4.0),
    ('mean_type', 'score'),
    ('block_out_channels', ()),
    ('block_out_channels', (32, 0)),
    ('layers_per_block', True),
    ('down_block_types', ('CrossAttnDownBlock2D',)),
    ('down_block_types', ('CrossAttnDownBlock2D', 'AttnDownBlock2D')),
    ('up_block_types', ('UpBlock2D', 'CrossAttnDownBlock2D')),
    ('cross_attention_dim', 0),
    ('attention_head_dim', 3),
    ('attention_head_dim', (2, 2, 2)),
    ('attention_head_dim', (2, 0)),
    ('transformer_layers_per_block', 0),
    ('use_linear_projection', 1),
    ('norm_num_groups', 12),
    ('norm_eps', 0.0),
    ('num_class_embeds', 0),
    ('flip_sin_to_cos', 'yes'),
    ('freq_shift', 16),
    ('freq_shift', -1),
    ('dropout', 1.0),
    ('w_max', 0.0),
    ('dtype', 'float16'),
    ('remat', 'partial'),
  ],
)
def test_bad_config(field, value):
  # The message names the field and the rejected value.
  with pytest.raises(ValueError, match=re.escape(f'{field}={value!r};')):
    dataclasses.replace(TINY, **{field: value})


def test_heads_must_divide_the_channels_of_every_attention_block():
  # 64 // 3 is not exact in the mid block (the down one has none).
  cfg = dict(attention_head_dim=(2, 3))
  with pytest.raises(ValueError, match='the mid block has 64 channels and 3'):
    dataclasses.replace(TINY, **cfg)
  # Up blocks take the heads reversed: up block 1 (32 channels) gets 5.
  with pytest.raises(ValueError, match='up block 1 has 32 channels and 5'):
    dataclasses.replace(
      TINY,
      down_block_types=('DownBlock2D', 'DownBlock2D'),
      attention_head_dim=(5, 4),
    )


def test_config_accepts_lists():
  cfg = dataclasses.replace(
    TINY,
    block_out_channels=[32, 64],
    down_block_types=['CrossAttnDownBlock2D', 'DownBlock2D'],
    up_block_types=['UpBlock2D', 'CrossAttnUpBlock2D'],
    attention_head_dim=[2, 4],
  )
  assert cfg.block_out_channels == (32, 64)
  assert cfg.num_attention_heads == (2, 4)
  hash(cfg)
