"""The FID Inception: shapes, preprocessing, sharding, weight conversion.

The network compiles once (8 fake devices, batch 8, 299×299) and every test
reuses it through module-scoped fixtures. The architecture is checked
against an independent transcription of pytorch-fid's state dict, and
converted weights against torch's own conv/linear, so the round trips
cannot pass by being consistently wrong in both directions. The converter's
tests need torch (in the `test` extra); without it they are skipped.
"""

import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from gdd.evaluation import convert_inception, inception, inception_weights
from tests import conftest

BATCH_SIZE = 8

# ----------------------------------------------------------------------------
# Independent transcription of pytorch-fid's FID Inception state dict, from
# torchvision's Inception3 / InceptionA–E definitions (conv: in, out, kH, kW).


def _block_a(cin: int, pool: int) -> list[tuple]:
  return [
    ('branch1x1', cin, 64, 1, 1),
    ('branch5x5_1', cin, 48, 1, 1),
    ('branch5x5_2', 48, 64, 5, 5),
    ('branch3x3dbl_1', cin, 64, 1, 1),
    ('branch3x3dbl_2', 64, 96, 3, 3),
    ('branch3x3dbl_3', 96, 96, 3, 3),
    ('branch_pool', cin, pool, 1, 1),
  ]


def _block_c(c7: int) -> list[tuple]:
  return [
    ('branch1x1', 768, 192, 1, 1),
    ('branch7x7_1', 768, c7, 1, 1),
    ('branch7x7_2', c7, c7, 1, 7),
    ('branch7x7_3', c7, 192, 7, 1),
    ('branch7x7dbl_1', 768, c7, 1, 1),
    ('branch7x7dbl_2', c7, c7, 7, 1),
    ('branch7x7dbl_3', c7, c7, 1, 7),
    ('branch7x7dbl_4', c7, c7, 7, 1),
    ('branch7x7dbl_5', c7, 192, 1, 7),
    ('branch_pool', 768, 192, 1, 1),
  ]


def _block_e(cin: int) -> list[tuple]:
  return [
    ('branch1x1', cin, 320, 1, 1),
    ('branch3x3_1', cin, 384, 1, 1),
    ('branch3x3_2a', 384, 384, 1, 3),
    ('branch3x3_2b', 384, 384, 3, 1),
    ('branch3x3dbl_1', cin, 448, 1, 1),
    ('branch3x3dbl_2', 448, 384, 3, 3),
    ('branch3x3dbl_3a', 384, 384, 1, 3),
    ('branch3x3dbl_3b', 384, 384, 3, 1),
    ('branch_pool', cin, 192, 1, 1),
  ]


def _pytorch_fid_shapes() -> dict[str, tuple[int, ...]]:
  blocks = {
    '': [
      ('Conv2d_1a_3x3', 3, 32, 3, 3),
      ('Conv2d_2a_3x3', 32, 32, 3, 3),
      ('Conv2d_2b_3x3', 32, 64, 3, 3),
      ('Conv2d_3b_1x1', 64, 80, 1, 1),
      ('Conv2d_4a_3x3', 80, 192, 3, 3),
    ],
    'Mixed_5b.': _block_a(192, 32),
    'Mixed_5c.': _block_a(256, 64),
    'Mixed_5d.': _block_a(288, 64),
    'Mixed_6a.': [
      ('branch3x3', 288, 384, 3, 3),
      ('branch3x3dbl_1', 288, 64, 1, 1),
      ('branch3x3dbl_2', 64, 96, 3, 3),
      ('branch3x3dbl_3', 96, 96, 3, 3),
    ],
    'Mixed_6b.': _block_c(128),
    'Mixed_6c.': _block_c(160),
    'Mixed_6d.': _block_c(160),
    'Mixed_6e.': _block_c(192),
    'Mixed_7a.': [
      ('branch3x3_1', 768, 192, 1, 1),
      ('branch3x3_2', 192, 320, 3, 3),
      ('branch7x7x3_1', 768, 192, 1, 1),
      ('branch7x7x3_2', 192, 192, 1, 7),
      ('branch7x7x3_3', 192, 192, 7, 1),
      ('branch7x7x3_4', 192, 192, 3, 3),
    ],
    'Mixed_7b.': _block_e(1280),
    'Mixed_7c.': _block_e(2048),
  }
  shapes = {}
  for prefix, convs in blocks.items():
    for name, cin, cout, kh, kw in convs:
      shapes[f'{prefix}{name}.conv.weight'] = (cout, cin, kh, kw)
      for stat in ('weight', 'bias', 'running_mean', 'running_var'):
        shapes[f'{prefix}{name}.bn.{stat}'] = (cout,)
      shapes[f'{prefix}{name}.bn.num_batches_tracked'] = ()
  shapes['fc.weight'] = (1008, 2048)
  shapes['fc.bias'] = (1008,)
  return shapes


# ----------------------------------------------------------------------------
# Test-only weights: random variables with the real tree, and their
# pytorch-fid state dict.


def init_random_params(seed: int) -> dict:
  """Random {'params', 'batch_stats'} with the real tree.

  Filled on the host from the traced shapes instead of running `init`, which
  would execute the whole network at 299×299. Kernels are He-scaled and the
  BatchNorm statistics are non-trivial, so a conversion that drops or
  misplaces any array changes the outputs.
  """
  gen = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(inception.variable_shapes())
  out = {}
  for path, struct in sorted(flat.items()):
    shape, name = struct.shape, path[-1]
    if name == 'kernel':
      fan_in = int(np.prod(shape[:-1]))
      value = gen.normal(size=shape) * np.sqrt(2.0 / fan_in)
    elif name == 'scale':
      value = 1.0 + 0.1 * gen.normal(size=shape)
    elif name in ('bias', 'mean'):
      value = 0.1 * gen.normal(size=shape)
    elif name == 'var':
      value = gen.uniform(0.5, 1.5, size=shape)
    else:
      raise ValueError(f'Unexpected variable {"/".join(path)}.')
    out[path] = value.astype(struct.dtype)
  return traverse_util.unflatten_dict(out)


def flax_to_torch(variables: dict) -> dict[str, np.ndarray]:
  """{'params', 'batch_stats'} → pytorch-fid's state dict (torch layouts).

  With the int64 `num_batches_tracked` counters torch's BatchNorm adds, as
  in the published file.
  """
  out = {}
  for key, value in traverse_util.flatten_dict(variables, sep='/').items():
    name = convert_inception.torch_name(key)
    value = np.asarray(value)
    # conv HWIO → OIHW, dense (in, out) → (out, in).
    out[name] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    if name.endswith('.running_mean'):
      bn = name.removesuffix('.running_mean')
      out[f'{bn}.num_batches_tracked'] = np.array(0, np.int64)
  return out


def torch_save(torch, path, state_dict: dict[str, np.ndarray], legacy=False):
  """torch.save of a numpy state dict; `legacy`: the pre-1.6 format."""
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}
  torch.save(tensors, path, _use_new_zipfile_serialization=not legacy)


# ----------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope='module')
def torch():
  # Imported by the tests that use it only: it is slow to import, and only
  # the converter needs it.
  return pytest.importorskip(
    'torch', reason="needs torch: pip install -e '.[convert]'"
  )


@pytest.fixture(scope='module')
def variables():
  return init_random_params(0)


@pytest.fixture(scope='module')
def feature_fn(variables):
  return inception.make_feature_fn(variables, batch_size=BATCH_SIZE)


@pytest.fixture(scope='module')
def images():
  rng = np.random.default_rng(0)
  return rng.uniform(-1, 1, size=(10, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope='module')
def features(feature_fn, images):
  # 10 images: one full batch and one padded with 6 blank images.
  return feature_fn(images)


@pytest.fixture(scope='module')
def torch_state_dict(variables):
  return flax_to_torch(variables)


# ----------------------------------------------------------------------------
# The model.


def test_outputs_pool_and_logits(feature_fn, features, images):
  gray = images[:2, :8, :8, :1]
  out = feature_fn(gray)
  assert out['pool'].shape == (2, inception.POOL_DIM) == (2, 2048)
  assert out['logits'].shape == (2, inception.NUM_CLASSES) == (2, 1008)
  assert features['pool'].shape == (10, 2048)
  assert features['logits'].shape == (10, 1008)
  for feats in (out, features):
    assert feats['pool'].dtype == feats['logits'].dtype == np.float32
    assert np.isfinite(feats['pool']).all()
    assert np.isfinite(feats['logits']).all()
    # pool3 averages post-ReLU maps; distinct images give distinct features.
    assert (feats['pool'] >= 0).all() and feats['pool'].std() > 1e-3
    assert np.abs(feats['pool'][0] - feats['pool'][1]).max() > 1e-3
  # Grayscale is tiled to RGB.
  tiled = feature_fn(np.repeat(gray, 3, axis=-1))
  np.testing.assert_allclose(tiled['pool'], out['pool'], rtol=1e-5, atol=1e-5)


def test_batching_and_padding_do_not_change_features(
  feature_fn, features, images
):
  # Images 6..9 in one padded batch vs. split over two batches above.
  out = feature_fn(images[6:])
  for key in ('pool', 'logits'):
    np.testing.assert_allclose(out[key], features[key][6:], atol=1e-4)
  assert feature_fn(images[:0])['pool'].shape == (0, 2048)


def test_sharded_features_match_single_device_apply(
  variables, features, images
):
  # Resizing inside the model and on one device gives the same features as
  # the jitted, batch-sharded path (tolerance: conv summation order).
  out = jax.jit(inception.InceptionV3().apply)(variables, images[:2])
  for key in ('pool', 'logits'):
    np.testing.assert_allclose(
      out[key], features[key][:2], rtol=1e-4, atol=1e-4
    )


def test_make_feature_fn_validates_inputs(variables, feature_fn):
  num_devices = len(jax.devices())
  if num_devices > 1:  # Any batch size divides over one device.
    with pytest.raises(ValueError, match='multiple of the number of devices'):
      inception.make_feature_fn(variables, batch_size=num_devices + 1)
  with pytest.raises(ValueError, match='multiple of the number of devices'):
    inception.make_feature_fn(variables, batch_size=0)
  with pytest.raises(ValueError, match='C = 1 .* or 3'):
    feature_fn(np.zeros((2, 8, 8, 2), np.float32))
  with pytest.raises(ValueError, match=r'\[B, H, W, C\]'):
    feature_fn(np.zeros((8, 8, 3), np.float32))


def _torch_bilinear_reference(img: np.ndarray, size: int) -> np.ndarray:
  """Literal float64 transcription of torch's upsample_bilinear2d kernel."""

  def axis(in_size):
    scale = in_size / size
    src = np.maximum(scale * (np.arange(size) + 0.5) - 0.5, 0.0)
    i0 = src.astype(np.int64)
    step = (i0 < in_size - 1).astype(np.int64)
    lam = src - i0
    return i0, i0 + step, lam

  h0, h1, lh = axis(img.shape[1])
  w0, w1, lw = axis(img.shape[2])
  img = img.astype(np.float64)
  top = (
    img[:, h0] * (1 - lh)[None, :, None, None]
    + img[:, h1] * lh[None, :, None, None]
  )
  return (
    top[:, :, w0] * (1 - lw)[None, None, :, None]
    + top[:, :, w1] * lw[None, None, :, None]
  )


def test_resize_matches_torch_bilinear():
  # F.interpolate([0, 1], size=4, mode='bilinear', align_corners=False)
  # is [0, 0.25, 0.75, 1] (source coordinates clamped at the border).
  x = jnp.asarray([0.0, 1.0]).reshape(1, 1, 2, 1)
  y = inception.resize_bilinear(jnp.tile(x, (1, 2, 1, 1)), size=4)
  np.testing.assert_allclose(y[0, 0, :, 0], [0.0, 0.25, 0.75, 1.0], atol=1e-7)
  rng = np.random.default_rng(1)
  for h, w in ((8, 8), (32, 20), (350, 317)):
    img = rng.uniform(-1, 1, size=(1, h, w, 3)).astype(np.float32)
    ours = inception.resize_bilinear(jnp.asarray(img), 299)
    assert ours.shape == (1, 299, 299, 3)
    ref = _torch_bilinear_reference(img, 299)
    np.testing.assert_allclose(ours, ref, atol=2e-6)
    if h < 299:
      # Upsampling also equals JAX's half-pixel bilinear resize. (When
      # downsampling, JAX's float32 sample positions differ by ~1e-5.)
      jax_ref = jax.image.resize(
        img, (1, 299, 299, 3), method='linear', antialias=False
      )
      np.testing.assert_allclose(ours, jax_ref, atol=1e-5)


def test_pool_branches_follow_the_fid_variant():
  # FIDInceptionA/C/E_1 average without counting pads: a constant map stays
  # constant at the border; E_2 (Mixed_7c) max-pools.
  x = jnp.ones((1, 5, 5, 1))
  np.testing.assert_allclose(inception._avg_pool_3x3(x), x)
  y = jnp.arange(25.0).reshape(1, 5, 5, 1)
  np.testing.assert_allclose(inception._max_pool_3x3(y)[0, 0, 0, 0], 6.0)


# ----------------------------------------------------------------------------
# Weight conversion.


def test_parameters_match_pytorch_fid_state_dict(variables, torch_state_dict):
  expected = _pytorch_fid_shapes()
  assert len(expected) == 94 * 6 + 2
  got = {k: v.shape for k, v in torch_state_dict.items()}
  assert got == expected
  # torchvision's Inception3 has 27,161,264 parameters with its aux head
  # (3,326,696) and 1000 classes; the FID net drops the head, has 1008.
  num_params = sum(v.size for v in jax.tree.leaves(variables['params']))
  assert num_params == 27_161_264 - 3_326_696 + 8 * 2048 + 8


def test_converter_maps_every_key_of_the_initialised_tree(variables):
  rng = np.random.default_rng(2)
  fake = {
    k: rng.normal(size=s).astype(np.float32)
    for k, s in _pytorch_fid_shapes().items()
  }
  flat = convert_inception.torch_to_flax(fake)
  init = traverse_util.flatten_dict(variables, sep='/')
  assert set(flat) == set(init)
  for key, value in flat.items():
    assert value.shape == init[key].shape, key
  np.testing.assert_array_equal(
    flat['params/Mixed_6b/branch7x7_2/conv/kernel'],
    fake['Mixed_6b.branch7x7_2.conv.weight'].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
    flat['batch_stats/Mixed_7c/branch_pool/bn/var'],
    fake['Mixed_7c.branch_pool.bn.running_var'],
  )


def test_converted_layouts_follow_torch_semantics(torch):
  # torch's conv2d (OIHW, cross-correlation) and linear (y = x Wᵀ + b)
  # compute the same as Flax's Conv and Dense with the converted arrays.
  rng = np.random.default_rng(3)
  weight = rng.normal(size=(5, 3, 1, 7)).astype(np.float32)  # (1, 7) kernel
  x = rng.normal(size=(2, 3, 9, 11)).astype(np.float32)  # NCHW
  ref = torch.nn.functional.conv2d(
    torch.from_numpy(x), torch.from_numpy(weight), padding=(0, 3)
  )
  conv = inception.BasicConv2d(5, (1, 7), padding=(0, 3)).bind(
    {
      'params': {
        'conv': {'kernel': convert_inception.torch_to_flax_layout(weight)},
        'bn': {'scale': np.ones(5), 'bias': np.zeros(5)},
      },
      # BatchNorm with mean 0, var 1 - eps is the identity.
      'batch_stats': {'bn': {'mean': np.zeros(5), 'var': np.ones(5) - 1e-3}},
    }
  )
  out = conv(jnp.asarray(x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(out, torch.relu(ref).numpy(), atol=1e-5)
  w = rng.normal(size=(4, 6)).astype(np.float32)
  b = rng.normal(size=4).astype(np.float32)
  v = rng.normal(size=(2, 6)).astype(np.float32)
  ref = torch.nn.functional.linear(*map(torch.from_numpy, (v, w, b)))
  np.testing.assert_allclose(
    v @ convert_inception.torch_to_flax_layout(w) + b, ref.numpy(), atol=1e-5
  )


@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
def test_weights_round_trip(
  torch, tmp_path, legacy, variables, torch_state_dict
):
  path = tmp_path / 'weights.pth'
  torch_save(torch, path, torch_state_dict, legacy=legacy)
  read = convert_inception.read_state_dict(path)
  assert set(read) == set(torch_state_dict)
  for key, value in torch_state_dict.items():
    assert read[key].dtype == value.dtype, key
    np.testing.assert_array_equal(read[key], value, err_msg=key)

  out = tmp_path / 'inception_fid.npz'
  convert_inception.convert(path, out)
  loaded = inception_weights.load_params(out)
  expected = traverse_util.flatten_dict(variables)
  got = traverse_util.flatten_dict(loaded)
  assert set(got) == set(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(got[key], value, err_msg=str(key))
  assert sorted(os.listdir(tmp_path)) == sorted([path.name, out.name])


def test_converted_weights_give_identical_features(
  torch, tmp_path, torch_state_dict, features, images
):
  torch_save(torch, tmp_path / 'weights.pth', torch_state_dict)
  convert_inception.convert(tmp_path / 'weights.pth', tmp_path / 'out.npz')
  loaded = inception_weights.load_params(tmp_path / 'out.npz')
  out = inception.make_feature_fn(loaded, batch_size=BATCH_SIZE)(images[:8])
  for key in ('pool', 'logits'):
    np.testing.assert_array_equal(out[key], features[key][:8])


def test_cli_converts(torch, tmp_path, torch_state_dict):
  torch_save(torch, tmp_path / 'in.pth', torch_state_dict)
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=conftest.TEST_XLA_FLAGS)
  subprocess.run(
    [
      sys.executable,
      '-m',
      'gdd.evaluation.convert_inception',
      f'--input={tmp_path / "in.pth"}',
      f'--output={tmp_path / "out.npz"}',
    ],
    check=True,
    env=env,
    capture_output=True,
  )
  loaded = inception_weights.load_params(tmp_path / 'out.npz')
  np.testing.assert_array_equal(
    loaded['params']['fc']['kernel'], torch_state_dict['fc.weight'].T
  )


def test_load_params_errors_name_the_problem_and_the_fix(
  tmp_path, torch_state_dict, variables
):
  with pytest.raises(FileNotFoundError, match='pt_inception-2015-12-05'):
    inception_weights.load_params(tmp_path / 'nope.npz')
  np.savez(tmp_path / 'torch_names.npz', **torch_state_dict)
  with pytest.raises(ValueError, match='unconverted.*convert_inception'):
    inception_weights.load_params(tmp_path / 'torch_names.npz')
  (tmp_path / 'weights.pth').write_bytes(b'not an npz')
  with pytest.raises(ValueError, match='must be converted first'):
    inception_weights.load_params(tmp_path / 'weights.pth')

  flat = traverse_util.flatten_dict(variables, sep='/')
  missing = dict(flat)
  del missing['batch_stats/Mixed_6c/branch7x7_3/bn/mean']
  np.savez(tmp_path / 'missing.npz', **missing)
  with pytest.raises(
    ValueError,
    match='batch_stats/Mixed_6c/branch7x7_3/bn/mean.*--input=pt_inception',
  ):
    inception_weights.load_params(tmp_path / 'missing.npz')
  wrong = dict(flat)
  wrong['params/fc/kernel'] = np.zeros((2048, 1000), np.float32)
  np.savez(tmp_path / 'wrong.npz', **wrong)
  with pytest.raises(ValueError, match=r"'params/fc/kernel' has shape \(2048"):
    inception_weights.load_params(tmp_path / 'wrong.npz')
  extra = dict(flat, **{'params/extra': np.zeros(1)})
  np.savez(tmp_path / 'extra.npz', **extra)
  with pytest.raises(ValueError, match='unexpected arrays params/extra'):
    inception_weights.load_params(tmp_path / 'extra.npz')


def test_converter_rejects_wrong_state_dicts(torch_state_dict):
  sd = dict(torch_state_dict)
  del sd['Mixed_5b.branch5x5_2.conv.weight']
  with pytest.raises(ValueError, match='missing 1: Mixed_5b.branch5x5_2'):
    convert_inception.torch_to_flax(sd)
  sd = dict(torch_state_dict, **{'AuxLogits.fc.weight': np.zeros((1000, 768))})
  with pytest.raises(ValueError, match='torchvision'):
    convert_inception.torch_to_flax(sd)
  sd = dict(torch_state_dict, **{'fc.weight': np.zeros((1000, 2048))})
  with pytest.raises(
    ValueError, match=r'fc.weight has shape \(1000, 2048\).*needs \(1008, 2048'
  ):
    convert_inception.torch_to_flax(sd)
  # num_batches_tracked is optional: older state dicts lack it.
  sd = {
    k: v
    for k, v in torch_state_dict.items()
    if not k.endswith('num_batches_tracked')
  }
  assert len(convert_inception.torch_to_flax(sd)) == 94 * 5 + 2


_UNPICKLED_CALLS = []


def _record_call(tag):
  _UNPICKLED_CALLS.append(tag)


class _NotATensor:
  """Unpickles as a call of `_record_call`: what a malicious file would do."""

  def __reduce__(self):
    return _record_call, ('called',)


def test_converter_reads_only_tensors(torch, tmp_path):
  torch.save({'fc.weight': _NotATensor()}, tmp_path / 'evil.pth')
  with pytest.raises(pickle.UnpicklingError, match='weights_only'):
    convert_inception.read_state_dict(tmp_path / 'evil.pth')
  assert not _UNPICKLED_CALLS
  torch.save([torch.zeros(2)], tmp_path / 'list.pth')
  with pytest.raises(ValueError, match='not hold a state dict of tensors'):
    convert_inception.read_state_dict(tmp_path / 'list.pth')
