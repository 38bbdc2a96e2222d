"""The trained inpainting model: a config switch (`model.inpainting`) that
adds the known region to every network's inputs, random training masks,
its CFG null, the sampler's requests, and a tiny digits chain end to end
through --mode=inpaint."""

import dataclasses
import functools
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdd import (
  conditioning,
  config_lib,
  data,
  edit,
  masks,
  pipeline,
  sample,
  tokenization,
  workdir_lib,
)
from gdd.models import sd_unet
from gdd.stages import common, teacher
from tests import helpers


def _inpainting(config):
  config.model.inpainting = True
  return config


CONFIGS = {
  'pixel unet': 'digits',
  'text sd_unet': 'shapes',  # The class SD U-Net shares its SDUNet input.
}


def _noisy(params, seed: int = 0):
  """`params` with every leaf moved by 0.05·N(0, 1) (numpy: no compile per
  shape), so every path through the network shows in its output."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: x + 0.05 * rng.standard_normal(x.shape, np.float32), params
  )


def _random_inputs(model, batch_size: int = 2):
  """(z, logsnr, cond with a random known region, w) for `model`."""
  z, _, cond, w = model.example_inputs(batch_size)
  keys = jax.random.split(jax.random.key(0), 4)
  z = jax.random.normal(keys[0], z.shape)
  logsnr = jax.random.uniform(keys[1], (batch_size,), minval=-5, maxval=5)
  mask = (jax.random.uniform(keys[2], (*z.shape[:-1], 1)) > 0.5) * 1.0
  x = jax.random.normal(keys[3], z.shape)
  return z, logsnr, conditioning.with_known_region(cond, x, mask), w


def _apply(model):
  return jax.jit(
    lambda params, *inputs: model.apply(
      {'params': params}, *inputs, train=False
    )
  )


@pytest.mark.parametrize('name', list(CONFIGS))
def test_a_fresh_inpainting_network_computes_the_plain_one(name):
  config = helpers.load_config(CONFIGS[name], 'quick')
  info = data.get_info(config.data)
  plain = common.build_model(config, info)
  model = common.build_model(_inpainting(config), info)
  fresh = jax.jit(functools.partial(common.init_params, model))(
    jax.random.key(1)
  )
  fresh = flax.traverse_util.flatten_dict(fresh)
  plain_shapes = flax.traverse_util.flatten_dict(common.abstract_params(plain))
  # The plain network's params keep their names; one bias-free kernel more.
  (path,) = set(fresh) - set(plain_shapes)
  assert path[-2:] == ('conv_in_known', 'kernel')
  assert not np.any(fresh[path])
  params = _noisy({k: v for k, v in fresh.items() if k != path})
  assert jax.tree.map(np.shape, params) == jax.tree.map(
    lambda s: s.shape, plain_shapes
  )
  z, logsnr, cond, w = _random_inputs(model)
  base = {k: v for k, v in cond.items() if k not in conditioning.KNOWN_REGION}
  unflat = flax.traverse_util.unflatten_dict
  expected = _apply(plain)(unflat(params), z, logsnr, base, w)
  apply = _apply(model)
  out = apply(unflat(params | {path: fresh[path]}), z, logsnr, cond, w)
  np.testing.assert_array_equal(out, expected)
  # A non-zero kernel reads the known region.
  moved = apply(unflat(params | {path: fresh[path] + 0.1}), z, logsnr, cond, w)
  assert not np.allclose(moved, expected)
  with pytest.raises(ValueError, match="'mask'"):
    apply(unflat(params | {path: fresh[path]}), z, logsnr, base, w)


def test_random_masks_leave_the_loss_alone_and_train_the_known_region():
  config = helpers.load_config('digits', 'quick')
  info = data.get_info(config.data)
  plain_loss = jax.jit(teacher.make_stage(config, info).loss_fn)
  config = _inpainting(config)
  stage = common.with_random_masks(
    teacher.make_stage(config, info), config, common.build_space(config, info)
  )
  keys = jax.random.split(jax.random.key(1), 3)
  batch = {
    'image': jax.random.uniform(keys[0], (8, 8, 8, 1), minval=-1, maxval=1),
    'label': jax.random.randint(keys[1], (8,), 0, 10),
  }
  value_and_grad = jax.jit(
    jax.value_and_grad(
      lambda p: stage.loss_fn(p, None, batch, keys[2]), has_aux=True
    )
  )
  kernel = lambda tree: np.asarray(tree['conv_in_known']['kernel'])
  params = stage.init_params(jax.random.key(0), None)
  _, first = value_and_grad(params)
  # conv_out starts at zero, so at step 0 only it learns; then the rest.
  assert not np.any(kernel(first))
  params = jax.tree.map(lambda p, g: p - 0.1 * g, params, first)
  assert np.any(kernel(value_and_grad(params)[1]))
  # With a zero kernel the loss is the plain teacher's: the masks draw from
  # a key of their own, so its noise, times and dropped labels are alike.
  params = _noisy(params)
  params['conv_in_known']['kernel'] *= 0
  (loss, _), _ = value_and_grad(params)
  del params['conv_in_known']
  np.testing.assert_allclose(
    loss, plain_loss(params, None, batch, keys[2])[0], rtol=1e-6
  )


# One compile for every draw: the fractions are traced, the sizes static.
_RANDOM = jax.jit(masks.random, static_argnums=(1, 2, 3))
_NUM = 2000


def _draw(fractions: dict, seed: int = 0) -> np.ndarray:
  """`_NUM` random 16x16 masks."""
  return np.asarray(_RANDOM(jax.random.key(seed), _NUM, 16, 16, fractions))


def _only(kind: str) -> dict:
  return {k: float(k == kind) for k in masks.RANDOM_KINDS}


def _halves() -> np.ndarray:
  return np.stack(
    [masks.named(h, _NUM, 16, 16) for h in ('left', 'right', 'top', 'bottom')]
  )


def test_random_masks_have_the_advertised_fractions():
  fractions = config_lib.base_config().random_masks.to_dict()
  drawn = _draw(fractions)
  assert drawn.shape == (_NUM, 16, 16, 1) and drawn.dtype == np.float32
  assert set(np.unique(drawn)) == {0.0, 1.0}
  all_filled = ~drawn.any(axis=(1, 2, 3))
  half = (drawn[None] == _halves()).all(axis=(2, 3, 4)).any(axis=0)
  # 2000 draws: standard errors below 0.011.
  assert abs(all_filled.mean() - fractions['all_filled']) < 0.03
  assert abs(half.mean() - fractions['half']) < 0.03
  boxes_or_strokes = fractions['box'] + fractions['stroke']
  assert abs(np.mean(~all_filled & ~half) - boxes_or_strokes) < 0.03


def test_each_kind_of_random_mask_fills_what_it_says():
  fill = lambda kind: _draw(_only(kind))[..., 0] == 0
  assert fill('all_filled').all()
  halves = _halves()[..., 0] == 0
  assert (fill('half')[None] == halves).all(axis=(2, 3)).any(axis=0).all()
  for box in fill('box'):  # A rectangle, sides 1/4 to 3/4 of the image's.
    rows, cols = np.nonzero(box)
    assert box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
    for side in (np.ptp(rows) + 1, np.ptp(cols) + 1):
      assert 16 / 4 - 1 <= side <= 3 * 16 / 4 + 1
  strokes = fill('stroke').mean(axis=(1, 2))
  assert strokes.min() > 0 and strokes.max() < 1


def test_random_masks_are_a_function_of_the_key():
  fractions = config_lib.base_config().random_masks.to_dict()
  np.testing.assert_array_equal(_draw(fractions), _draw(fractions))
  assert not np.array_equal(_draw(fractions), _draw(fractions, seed=1))
  # At a latent space's size, as the sampler takes a user's mask.
  latent = masks.to_space(jnp.asarray(_draw(fractions)[:4]), (4, 4, 4))
  assert latent.shape == (4, 4, 4, 1)


def _text_kind():
  tokenizer = tokenization.WordTokenizer(('a', 'red', 'circle'), max_length=5)
  return conditioning.TextConditioning(tokenizer, ('a red circle',))


@pytest.mark.parametrize(
  'kind, cond',
  [
    (conditioning.ClassConditioning(10), {'label': jnp.array([3, 7])}),
    (_text_kind(), {'tokens': _text_kind().tokens(['a red circle', 'a'])}),
  ],
)
def test_the_cfg_null_keeps_the_mask_and_the_masked_input(kind, cond):
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  mask = jnp.zeros((2, 4, 4, 1)).at[:, :2].set(1.0)
  cond = conditioning.with_known_region(cond, x, mask)
  np.testing.assert_array_equal(cond['masked'], x * mask)
  null = kind.null_like(cond)
  assert set(null) == set(cond)
  base = (set(cond) - set(conditioning.KNOWN_REGION)).pop()
  assert not np.array_equal(null[base], cond[base])
  for key in conditioning.KNOWN_REGION:
    np.testing.assert_array_equal(null[key], cond[key])
  dropped = kind.drop_to_null(cond, jax.random.key(1), 0.5)
  for key in conditioning.KNOWN_REGION:
    np.testing.assert_array_equal(dropped[key], cond[key])
  # A batch's known region reaches the condition the losses read.
  batch = {'image': x, **cond}
  assert set(kind.from_batch(batch)) == set(cond)


@pytest.mark.parametrize(
  'key, value, message',
  [
    ('model.inpainting', None, r'config.model.inpainting=None .* True or'),
    ('random_masks.box', -0.1, r'random_masks.box=-0.1 .* in \[0, 1\]'),
    ('random_masks.stroke', 1.5, r'random_masks.stroke=1.5 is invalid'),
    ('random_masks.half', 0.3, r'\(box=0.3, .*half=0.3.*\) sum to 1.15'),
  ],
)
def test_bad_inpainting_values_are_refused(key, value, message):
  config = helpers.load_config('digits', 'inpaint')
  section, name = key.split('.')
  config[section][name] = value
  with helpers.raises_user_error(ValueError, match=message):
    config_lib.validate(config)


def test_inpainting_variants_load_and_bad_ones_are_named():
  for name, variant in (
    ('digits', 'inpaint'),
    ('digits', 'quick+inpaint'),
    ('shapes', 'quick+inpaint'),
  ):
    config = helpers.load_config(name, variant)
    config_lib.validate(config)
    assert config.model.inpainting
  assert helpers.load_config('shapes', 'quick+inpaint').data.image_size == 16
  for bad in ('inpaint+huge', 'quick+quick'):
    with pytest.raises(ValueError, match=r"joined by '\+'"):
      helpers.load_config('digits', bad)


def test_an_old_record_resumes_as_a_plain_chain(tmp_path):
  config = config_lib.base_config()
  pipeline.record_stage_config(config, str(tmp_path), 'teacher')
  record = workdir_lib.config_record(str(tmp_path))
  stored = json.loads(record.read_text())
  del stored['model']['inpainting'], stored['random_masks']
  record.write_text(json.dumps(stored))
  # Masks are not read by a plain chain: changing them is no mismatch.
  config.random_masks.update(box=0.5, stroke=0.1)
  assert pipeline.check_recorded_config(config, str(tmp_path), 'teacher')
  assert not config_lib.from_record(stored).model.inpainting
  with pytest.raises(pipeline.ConfigMismatchError, match='model.inpainting'):
    pipeline.check_recorded_config(_inpainting(config), str(tmp_path), 'guided')


def test_a_tiny_inpainting_chain_inpaints_end_to_end(tmp_path):
  config = _inpainting(helpers.quick_config(num_train_steps=2))
  # No warm-up: update 1 moves conv_out off zero, update 2 the rest.
  config.teacher.optimizer.warmup_steps = 0
  config.distill.initial_num_steps = 2  # One halving round: 2 → 1 steps.
  config.grids.update(sample_ws=(1.0,), teacher_num_steps=1)
  config.edit.update(
    stage='distill', num_steps=1, num_inputs=4, batch_size=4, mask='right'
  )
  workdir = str(tmp_path / 'chain')
  pipeline.run(config, workdir, 'all')
  kernel = helpers.exported_params(workdir, 'teacher')['conv_in_known']
  assert np.any(kernel['kernel'])  # Trained: the known region is read.

  pipeline.run(config, workdir, 'inpaint')
  written = os.path.join(
    workdir, 'edits', 'inpaint_distill_ddim_1steps_w1_t1.npz'
  )
  with np.load(written) as f:
    outputs, inputs, kept = f['images'], f['inputs'], f['masks']
  assert outputs.shape == inputs.shape == (4, 8, 8, 1)
  np.testing.assert_array_equal(kept[:, :, :4], 1)
  np.testing.assert_array_equal(kept[:, :, 4:], 0)
  # Conditioned, not replaced: the kept half is the model's own output.
  assert not np.array_equal(outputs[:, :, :4], inputs[:, :, :4])
  assert os.path.isfile(written.replace('.npz', '.png'))

  # The network reads the masked input. (Without a mask it fills in
  # everything: the sample grids written above did.)
  sampler = sample.load_sampler(workdir, 'distill', num_steps=1)
  held_out = edit.load_inputs(config).images
  mask = masks.named('right', 4, 8, 8)
  rng, labels = jax.random.key(0), np.arange(4)
  a = sampler(rng, labels, 1.0, init=held_out, mask=mask)
  b = sampler(rng, labels, 1.0, init=-held_out, mask=mask)
  assert not np.array_equal(a, b)


def test_an_sd_unet_takes_the_known_region_iff_it_inpaints():
  cfg = sd_unet.SDUNetConfig(
    sample_size=8,
    block_out_channels=(8, 16),
    down_block_types=('DownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'UpBlock2D'),
    norm_num_groups=8,
    cross_attention_dim=None,
    attention_head_dim=2,
  )
  z, logsnr = jnp.zeros((2, 8, 8, 4)), jnp.zeros((2,))
  known = conditioning.with_known_region({}, z, z[..., :1])
  init = lambda net, **kw: net.init(jax.random.key(0), z, logsnr, None, **kw)
  inpainting = sd_unet.SDUNet(dataclasses.replace(cfg, inpainting=True))
  with pytest.raises(ValueError, match="known is required: pass known {'mask'"):
    init(inpainting, train=False)
  with pytest.raises(ValueError, match='without inpainting=True but got known'):
    init(sd_unet.SDUNet(cfg), known=known, train=False)
  with pytest.raises(ValueError, match=r"cond\['masked'\] \(2, 8, 8, 4\)"):
    init(inpainting, known=dict(known, masked=z[:, :4]), train=False)
