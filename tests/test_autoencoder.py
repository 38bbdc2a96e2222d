"""Tests of gdd.models.autoencoder: shapes, names, posterior, loss, training."""

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend import core as jax_core

from gdd.models import autoencoder
from gdd.models.autoencoder import Autoencoder, AutoencoderConfig
from gdd.weights import naming

TINY = AutoencoderConfig(
  block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4
)
SIZE = 16


def _images(seed: int, batch: int = 2, size: int = SIZE) -> jnp.ndarray:
  """Smooth images in [−1, 1]: 4x4 noise resized bilinearly to `size`."""
  coarse = jax.random.normal(jax.random.key(seed), (batch, 4, 4, 3))
  return jnp.tanh(jax.image.resize(coarse, (batch, size, size, 3), 'linear'))


def _init_fn(cfg: AutoencoderConfig):
  """A no-argument function returning fresh variables for `cfg`."""
  images = jnp.zeros((1, SIZE, SIZE, cfg.in_channels))
  init = functools.partial(Autoencoder(cfg).init, sample_posterior=False)
  return lambda: init(jax.random.key(0), images)


@functools.cache
def _init(cfg: AutoencoderConfig) -> dict:
  """Params for `cfg`, initialised under jit (op by op is slower)."""
  return jax.jit(_init_fn(cfg))()


def _abstract_init(cfg: AutoencoderConfig) -> dict:
  """The shapes and dtypes of `_init(cfg)`, without computing it."""
  return jax.eval_shape(_init_fn(cfg))


def _perturbed(params: dict, seed: int = 1) -> dict:
  """Params plus N(0, 0.1²) noise, so zero-initialised layers matter."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda p: p + 0.1 * rng.standard_normal(p.shape, np.float32), params
  )


@functools.cache
def _jitted_call(cfg: AutoencoderConfig):
  """One compiled `__call__` per config: far faster than op by op."""
  return jax.jit(Autoencoder(cfg).apply, static_argnames='sample_posterior')


def test_encode_decode_shapes_and_dtypes():
  model, images = Autoencoder(TINY), jnp.zeros((2, SIZE, SIZE, 3))
  params = _abstract_init(TINY)
  mean, logvar = jax.eval_shape(
    functools.partial(model.apply, method='encode'), params, images
  )
  assert mean.shape == logvar.shape == (2, 4, 4, 4)
  reconstruction = jax.eval_shape(
    functools.partial(model.apply, method='decode'), params, mean
  )
  assert reconstruction.shape == (2, SIZE, SIZE, 3)
  out = jax.eval_shape(
    functools.partial(model.apply, sample_posterior=False), params, images
  )
  assert out == (reconstruction, mean, logvar)
  for x in (mean, logvar, reconstruction):
    assert x.dtype == jnp.float32


@pytest.mark.parametrize('levels', [1, 2, 4])
def test_downsampling_factor_is_two_to_the_levels_minus_one(levels):
  cfg = AutoencoderConfig(
    block_out_channels=(4,) * levels,
    layers_per_block=1,
    norm_num_groups=2,
    latent_channels=3,
  )
  assert cfg.downsampling_factor == 2 ** (levels - 1)
  images = jnp.zeros((1, SIZE, SIZE, 3))
  mean, _ = jax.eval_shape(
    functools.partial(Autoencoder(cfg).apply, method='encode'),
    _abstract_init(cfg),
    images,
  )
  latent = SIZE // 2 ** (levels - 1)
  assert mean.shape == (1, latent, latent, 3)


def test_param_names_are_diffusers_module_names():
  params = _abstract_init(TINY)['params']
  params = flax.traverse_util.flatten_dict(params, sep='/')
  expected = {
    'encoder/conv_in/kernel': (3, 3, 3, 8),
    'encoder/down_blocks_0/resnets_0/conv1/kernel': (3, 3, 8, 8),
    'encoder/down_blocks_0/resnets_0/norm1/scale': (8,),
    'encoder/down_blocks_0/downsamplers_0/conv/kernel': (3, 3, 8, 8),
    'encoder/down_blocks_1/resnets_0/conv_shortcut/kernel': (1, 1, 8, 16),
    'encoder/mid_block/resnets_1/conv2/bias': (16,),
    'encoder/mid_block/attentions_0/group_norm/scale': (16,),
    'encoder/mid_block/attentions_0/to_q/kernel': (16, 16),
    'encoder/mid_block/attentions_0/to_k/bias': (16,),
    'encoder/mid_block/attentions_0/to_out_0/kernel': (16, 16),
    'encoder/conv_norm_out/scale': (16,),
    'encoder/conv_out/kernel': (3, 3, 16, 8),
    'quant_conv/kernel': (1, 1, 8, 8),
    'post_quant_conv/kernel': (1, 1, 4, 4),
    'decoder/conv_in/kernel': (3, 3, 4, 16),
    'decoder/up_blocks_0/resnets_1/conv1/kernel': (3, 3, 16, 16),
    'decoder/up_blocks_0/upsamplers_0/conv/kernel': (3, 3, 16, 16),
    'decoder/up_blocks_2/resnets_0/conv_shortcut/kernel': (1, 1, 16, 8),
    'decoder/conv_out/kernel': (3, 3, 8, 3),
  }
  assert {name: params[name].shape for name in expected} == expected
  # No resampler on the last level; layers_per_block (+1) resnets a level.
  assert not any('down_blocks_2/downsamplers' in n for n in params)
  assert not any('up_blocks_2/upsamplers' in n for n in params)
  assert not any('down_blocks_0/resnets_1' in n for n in params)
  assert any('up_blocks_0/resnets_1' in n for n in params)
  assert not any('up_blocks_0/resnets_2' in n for n in params)
  assert all(p.dtype == jnp.float32 for p in params.values())


# diffusers 0.42.1 AutoencoderKL(block_out_channels=(8, 16), layers_per_block
# =1, norm_num_groups=4, latent_channels=4, two DownEncoderBlock2D and two
# UpDecoderBlock2D), every state-dict entry in sorted key order drawn as
# 0.2·N(0, 1) from np.random.default_rng(0) in its PyTorch shape; the input
# is default_rng(1).uniform(-1, 1, (1, 8, 8, 3)) (NHWC). Each output
# (NHWC), projected on three default_rng(2) normal arrays of its shape:
_DIFFUSERS_REFERENCE = {
  'mean': [2.0723, 0.471451, 1.13646],
  'logvar': [-1.54403, -2.50866, 0.880847],
  'reconstruction': [1.96385, 1.76099, -1.4493],
}


def test_outputs_match_diffusers_under_the_renaming_rule():
  cfg = AutoencoderConfig(
    block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4
  )
  abstract = flax.traverse_util.flatten_dict(_abstract_init(cfg)['params'])
  keys = {naming.torch_key(path): path for path in abstract}
  assert len(keys) == len(abstract)
  rng, state_dict = np.random.default_rng(0), {}
  for key in sorted(keys):
    path = keys[key]
    layout = naming.to_torch_layout(np.empty(abstract[path].shape), path[-1])
    state_dict[key] = 0.2 * rng.standard_normal(layout.shape)
  params = {
    'params': naming.to_flax(
      state_dict, _abstract_init(cfg)['params'], what='reference'
    )
  }
  images = np.random.default_rng(1).uniform(-1, 1, (1, 8, 8, 3))
  outputs = jax.jit(Autoencoder(cfg).apply, static_argnames='sample_posterior')(
    params, jnp.asarray(images, jnp.float32), sample_posterior=False
  )
  for name, out in zip(
    ('reconstruction', 'mean', 'logvar'), outputs, strict=True
  ):
    proj = np.random.default_rng(2).standard_normal((3, *out.shape))
    projected = np.tensordot(proj.astype(np.float32), out, axes=out.ndim)
    np.testing.assert_allclose(
      projected, _DIFFUSERS_REFERENCE[name], rtol=1e-4, err_msg=name
    )


def test_mid_block_attention_can_be_left_out():
  cfg = AutoencoderConfig(
    block_out_channels=(8,),
    layers_per_block=1,
    norm_num_groups=4,
    mid_block_add_attention=False,
  )
  params = _abstract_init(cfg)['params']
  params = flax.traverse_util.flatten_dict(params, sep='/')
  assert not any('attentions' in name for name in params)
  assert 'decoder/mid_block/resnets_1/conv1/kernel' in params


def test_downsampler_pads_only_right_and_bottom():
  # A kernel that reads only its top-left tap: with no left/top padding the
  # output at (i, j) is the input at (2i, 2j); 'SAME' would read (2i−1, 2j−1)
  # on odd sizes. An odd size 5 gives (5 + 1 − 3) // 2 + 1 = 2, as diffusers.
  x = jnp.arange(25.0).reshape(1, 5, 5, 1)
  kernel = jnp.zeros((3, 3, 1, 1)).at[0, 0].set(1.0)
  params = {'params': {'conv': {'kernel': kernel, 'bias': jnp.zeros(1)}}}
  out = autoencoder.Downsample().apply(params, x)
  np.testing.assert_array_equal(out[0, ..., 0], x[0, 0:4:2, 0:4:2, 0])


def test_kl_divergence():
  zeros = jnp.zeros((3, 2, 2, 4))
  np.testing.assert_array_equal(autoencoder.kl_divergence(zeros, zeros), 0)
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(3, 2, 2, 4))
  logvar = rng.normal(size=(3, 2, 2, 4))
  # KL(N(μ, σ²) ‖ N(0, 1)) = −log σ + (σ² + μ²)/2 − 1/2, in float64.
  sigma = np.exp(0.5 * logvar)
  closed_form = (-np.log(sigma) + (sigma**2 + mean**2) / 2 - 0.5).sum(
    axis=(1, 2, 3)
  )
  kl = autoencoder.kl_divergence(mean, logvar)
  assert kl.shape == (3,)
  np.testing.assert_allclose(kl, closed_form, rtol=1e-5)
  np.testing.assert_allclose(
    autoencoder.DiagonalGaussian(mean, logvar).kl(), closed_form, rtol=1e-5
  )


def test_posterior_sampling_uses_the_rng():
  mean = jnp.full((2, 4, 4, 4), 3.0)
  posterior = autoencoder.DiagonalGaussian(mean, jnp.full_like(mean, -2.0))
  a = posterior.sample(jax.random.key(0))
  b = posterior.sample(jax.random.key(1))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, posterior.sample(jax.random.key(0)))
  np.testing.assert_array_equal(posterior.mode(), mean)
  draws = posterior.sample(jax.random.key(2)) - mean
  np.testing.assert_allclose(draws.std(), np.exp(-1.0), rtol=0.2)


def test_model_samples_only_when_asked():
  params, images = _init(TINY), _images(0)
  call = _jitted_call(TINY)
  mode = call(params, images, sample_posterior=False)[0]
  np.testing.assert_array_equal(
    mode, call(params, images, sample_posterior=False)[0]
  )
  draw = functools.partial(call, params, images, sample_posterior=True)
  a, b = draw(jax.random.key(0))[0], draw(jax.random.key(1))[0]
  assert not np.allclose(a, b)
  assert not np.allclose(a, mode)
  with pytest.raises(ValueError, match='rng exactly when'):
    Autoencoder(TINY).apply(params, images, sample_posterior=True)
  with pytest.raises(ValueError, match='rng exactly when'):
    Autoencoder(TINY).apply(
      params, images, jax.random.key(0), sample_posterior=False
    )


def test_logvar_is_clipped():
  moments = jnp.concatenate(
    [jnp.zeros((1, 1, 1, 3)), jnp.array([[[[-100.0, 0.0, 100.0]]]])], axis=-1
  )
  posterior = autoencoder.DiagonalGaussian.from_moments(moments)
  np.testing.assert_array_equal(posterior.logvar[0, 0, 0], [-30.0, 0.0, 20.0])
  # Through the model: a huge logvar bias in quant_conv is clipped too.
  flat = flax.traverse_util.flatten_dict(_init(TINY))
  bias = ('params', 'quant_conv', 'bias')
  flat[bias] = flat[bias].at[4:].set(1e4)  # The logvar channels.
  params = flax.traverse_util.unflatten_dict(flat)
  call = _jitted_call(TINY)
  _, _, logvar = call(params, _images(0), sample_posterior=False)
  np.testing.assert_array_equal(logvar, autoencoder.LOGVAR_MAX)


@pytest.mark.parametrize(
  'kwargs, field',
  [
    (dict(block_out_channels=(8, 12), norm_num_groups=8), 'norm_num_groups'),
    (dict(block_out_channels=()), 'block_out_channels'),
    (dict(block_out_channels=(8, 0)), 'block_out_channels'),
    (dict(latent_channels=0), 'latent_channels'),
    (dict(layers_per_block=1.0), 'layers_per_block'),
    (dict(dtype='float16'), 'dtype'),
    (dict(remat='some'), 'remat'),
  ],
)
def test_bad_configs_are_refused(kwargs, field):
  with pytest.raises(ValueError, match=rf'AutoencoderConfig\.{field}='):
    AutoencoderConfig(**kwargs)


def test_bad_inputs_are_refused():
  params = _abstract_init(TINY)

  def apply(x, method):
    fn = functools.partial(Autoencoder(TINY).apply, method=method)
    return jax.eval_shape(fn, params, jnp.zeros(x))

  with pytest.raises(ValueError, match='multiples of the downsampling'):
    apply((1, 10, 16, 3), 'encode')
  with pytest.raises(ValueError, match=r'\[B, H, W, 3\]'):
    apply((1, 16, 16, 1), 'encode')
  with pytest.raises(ValueError, match=r'\[B, h, w, 4\]'):
    apply((1, 4, 4, 3), 'decode')


def test_loss_and_psnr():
  images = jnp.zeros((2, 2, 2, 1))
  reconstruction = jnp.full_like(images, 0.5).at[1].set(-1.0)
  mean, logvar = jnp.ones((2, 1, 1, 2)), jnp.zeros((2, 1, 1, 2))
  loss = functools.partial(
    autoencoder.autoencoder_loss, images, reconstruction, mean, logvar
  )
  # Per image: l1 sums |error| over 4 pixels (2 and 4), KL is ½·1·2 = 1.
  total, metrics = loss(kl_weight=0.5, reconstruction_loss='l1')
  np.testing.assert_allclose(metrics['reconstruction'], 3.0)
  np.testing.assert_allclose(metrics['kl'], 1.0)
  np.testing.assert_allclose(total, 3.5)
  _, metrics = loss(kl_weight=0.0, reconstruction_loss='l2')
  np.testing.assert_allclose(metrics['reconstruction'], (1.0 + 4.0) / 2)
  with pytest.raises(ValueError, match='reconstruction_loss'):
    loss(kl_weight=0.0, reconstruction_loss='l3')
  # Peak 2 over [−1, 1]: an error of 0.5 is 10·log10(4 / 0.25) ≈ 12.04 dB.
  np.testing.assert_allclose(
    autoencoder.psnr(images, reconstruction),
    [10 * np.log10(16.0), 10 * np.log10(4.0)],
    rtol=1e-6,
  )


def test_tiny_autoencoder_overfits_a_few_images():
  cfg = AutoencoderConfig(
    block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4
  )
  model, images = Autoencoder(cfg), _images(3, batch=4)
  optimizer = optax.adam(3e-3)

  def loss_fn(params, rng):
    out = model.apply(params, images, rng, sample_posterior=True)
    return autoencoder.autoencoder_loss(
      images, *out, kl_weight=1e-6, reconstruction_loss='l2'
    )[0]

  @jax.jit
  def step(params, opt_state, rng):
    grads = jax.grad(loss_fn)(params, rng)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  def train(params):
    opt_state = optimizer.init(params)
    for rng in jax.random.split(jax.random.key(1), 100):
      params, opt_state = step(params, opt_state, rng)
    return params

  @jax.jit
  def mean_psnr(params):
    rec = model.apply(params, images, sample_posterior=False)[0]
    return autoencoder.psnr(images, rec).mean()

  params = _init(cfg)
  before, after = float(mean_psnr(params)), float(mean_psnr(train(params)))
  assert after > before + 10.0, (before, after)


def test_bfloat16_compute_is_close_to_float32():
  params = _perturbed(_init(TINY))
  bf16 = dataclasses.replace(TINY, dtype='bfloat16')
  images = _images(0)
  outs = {
    cfg.dtype: _jitted_call(cfg)(params, images, sample_posterior=False)
    for cfg in (TINY, bf16)
  }
  for ref, low in zip(outs['float32'], outs['bfloat16'], strict=True):
    assert low.dtype == jnp.float32
    scale = float(jnp.abs(ref).max())
    np.testing.assert_allclose(low, ref, atol=0.03 * scale)


def _primitive_dtypes(jaxpr: jax_core.Jaxpr, dtypes: dict) -> dict:
  """Output dtypes of each primitive in `jaxpr` and its nested jaxprs."""
  for eqn in jaxpr.eqns:
    dtypes.setdefault(eqn.primitive.name, set()).update(
      str(v.aval.dtype) for v in eqn.outvars
    )
    for sub in jax_core.jaxprs_in_params(eqn.params):
      _primitive_dtypes(sub, dtypes)
  return dtypes


def test_bfloat16_statistics_and_softmax_are_float32():
  bf16 = dataclasses.replace(TINY, dtype='bfloat16')
  images = jnp.zeros((1, SIZE, SIZE, 3))
  jaxpr = jax.make_jaxpr(
    lambda p: Autoencoder(bf16).apply(p, images, sample_posterior=False)
  )(_abstract_init(bf16)).jaxpr
  dtypes = _primitive_dtypes(jaxpr, {})
  # Convs and projections in bfloat16 (the output heads in float32)...
  assert dtypes['conv_general_dilated'] == {'bfloat16', 'float32'}
  assert 'bfloat16' in dtypes['dot_general']
  # ...but GroupNorm statistics and the attention softmax in float32.
  for name in ('reduce_sum', 'rsqrt', 'reduce_max', 'exp'):
    assert dtypes[name] == {'float32'}, (name, dtypes[name])


def test_remat_wraps_each_block_and_keeps_the_params():
  # Tracing only: remat's numerics are jax.checkpoint's; what could go wrong
  # here is the wrapping (which modules, their names and arguments).
  full = dataclasses.replace(TINY, remat='full')
  images = jnp.zeros((1, SIZE, SIZE, 3))
  params = _abstract_init(TINY)
  assert _abstract_init(full) == params

  def rematerialised_blocks(cfg):
    def forward(p):
      return Autoencoder(cfg).apply(p, images, sample_posterior=False)

    return str(jax.make_jaxpr(forward)(params)).count('remat2[')

  # Encoder 3 + 3 (mid, with attention), decoder 3 (mid) + 3 levels × 2.
  assert rematerialised_blocks(full) == 15
  assert rematerialised_blocks(TINY) == 0
