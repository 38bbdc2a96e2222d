"""Inception-v3 as used for FID and Inception Score, in Flax linen.

This is the network of pytorch-fid's `fid_inception_v3()`: torchvision's
Inception3 (no aux head, 1008 classes) with the `FIDInceptionA/C/E_1/E_2`
patches that make it compute what the TensorFlow graph
`inception-2015-12-05` (the one TTUR's FID and the original IS use) computes:

- the pool branch of every A, C and E_1 block averages with
  count_include_pad=False (TensorFlow ignores the padded zeros);
- the pool branch of the last E block (Mixed_7c, "E_2") max-pools;
- every conv is bias-free and followed by BatchNorm (eps 0.001, inference
  statistics) and ReLU.

Submodules carry pytorch-fid's state-dict names (`Mixed_5b/branch5x5_1/conv`),
so `convert_inception` maps the published weights one to one.

Input handling matches pytorch-fid's `InceptionV3(resize_input=True,
normalize_input=True)` for images given in [-1, 1] rather than [0, 1]:
bilinear resize to 299×299 (align_corners=False, no antialiasing, as
`F.interpolate`) — resizing commutes with pytorch-fid's affine x ↦ 2x − 1.

Outputs: `pool`, the [B, 2048] pool3 features FID uses, and `logits`, the
[B, 1008] pre-softmax scores of the graph's classifier that IS uses.
"""

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

INPUT_SIZE = 299
POOL_DIM = 2048
NUM_CLASSES = 1008
BN_EPSILON = 1e-3
_DATA_AXIS = 'data'

Precision = Any
# FID is sensitive to small feature shifts; keep convs in full float32 even
# on accelerators whose default matmul precision is lower.
_DEFAULT_PRECISION = jax.lax.Precision.HIGHEST


class BasicConv2d(nn.Module):
  """Bias-free conv, BatchNorm (inference statistics), ReLU."""

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)
  precision: Precision = _DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    ph, pw = self.padding
    x = nn.Conv(
      self.features,
      self.kernel_size,
      strides=self.strides,
      padding=((ph, ph), (pw, pw)),
      use_bias=False,
      precision=self.precision,
      name='conv',
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name='bn')(x)
    return nn.relu(x)


def _avg_pool_3x3(x: jnp.ndarray) -> jnp.ndarray:
  # TensorFlow's average pool does not count the padded zeros.
  return nn.avg_pool(
    x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False
  )


def _max_pool_3x3(x: jnp.ndarray) -> jnp.ndarray:
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_s2(x: jnp.ndarray) -> jnp.ndarray:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class InceptionA(nn.Module):
  """35×35 block (Mixed_5b/c/d); FIDInceptionA."""

  pool_features: int
  precision: Precision = _DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(64, (1, 1), name='branch1x1')(x)
    b5 = conv(48, (1, 1), name='branch5x5_1')(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = conv(64, (1, 1), name='branch3x3dbl_1')(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = conv(self.pool_features, (1, 1), name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """35×35 → 17×17 reduction (Mixed_6a)."""

  precision: Precision = _DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(384, (3, 3), strides=(2, 2), name='branch3x3')(x)
    bd = conv(64, (1, 1), name='branch3x3dbl_1')(x)
    bd = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = conv(96, (3, 3), strides=(2, 2), name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """17×17 block with factorised 7×7 convs (Mixed_6b–e); FIDInceptionC."""

  channels_7x7: int
  precision: Precision = _DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    c7 = self.channels_7x7
    b1 = conv(192, (1, 1), name='branch1x1')(x)
    b7 = conv(c7, (1, 1), name='branch7x7_1')(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = conv(c7, (1, 1), name='branch7x7dbl_1')(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = conv(192, (1, 1), name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """17×17 → 8×8 reduction (Mixed_7a)."""

  precision: Precision = _DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(192, (1, 1), name='branch3x3_1')(x)
    b3 = conv(320, (3, 3), strides=(2, 2), name='branch3x3_2')(b3)
    b7 = conv(192, (1, 1), name='branch7x7x3_1')(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = conv(192, (3, 3), strides=(2, 2), name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """8×8 block (Mixed_7b: FIDInceptionE_1, Mixed_7c: FIDInceptionE_2).

  `max_pool_branch` selects E_2's max-pooled pool branch (a quirk of the
  TensorFlow graph that FID numbers depend on); E_1 averages without pads.
  """

  max_pool_branch: bool = False
  precision: Precision = _DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(320, (1, 1), name='branch1x1')(x)
    b3 = conv(384, (1, 1), name='branch3x3_1')(x)
    b3 = jnp.concatenate(
      [
        conv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
        conv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3),
      ],
      axis=-1,
    )
    bd = conv(448, (1, 1), name='branch3x3dbl_1')(x)
    bd = conv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate(
      [
        conv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
        conv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd),
      ],
      axis=-1,
    )
    pooled = _max_pool_3x3(x) if self.max_pool_branch else _avg_pool_3x3(x)
    bp = conv(192, (1, 1), name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of torch's bilinear resize (align_corners=False).

  Half-pixel centres, source coordinates below 0 clamped to 0 and the upper
  neighbour clamped to the last pixel, no antialiasing: exactly
  `F.interpolate(mode='bilinear')` along one axis.
  """
  scale = in_size / out_size
  src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  frac = src - i0
  weights = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(weights, (rows, i0), 1.0 - frac)
  np.add.at(weights, (rows, i1), frac)
  return weights.astype(np.float32)


def resize_bilinear(images: jnp.ndarray, size: int = INPUT_SIZE) -> jnp.ndarray:
  """Resizes [B, H, W, C] to [B, size, size, C] as torch's bilinear resize.

  Written as two small matmuls with fixed interpolation matrices: exact,
  shape-static and cheap to compile.
  """
  _, h, w, _ = images.shape
  hp = jax.lax.Precision.HIGHEST
  if h != size:
    images = jnp.einsum(
      'oh,bhwc->bowc', _bilinear_matrix(h, size), images, precision=hp
    )
  if w != size:
    images = jnp.einsum(
      'ow,bhwc->bhoc', _bilinear_matrix(w, size), images, precision=hp
    )
  return images


def _check_images_shape(shape: Sequence[int]) -> None:
  if len(shape) != 4 or shape[-1] not in (1, 3):
    raise ValueError(
      'images must have shape [B, H, W, C] with C = 1 (grayscale) or 3 (RGB); '
      f'got shape {tuple(shape)}.'
    )


def preprocess(images: jnp.ndarray) -> jnp.ndarray:
  """[B, H, W, 1|3] images in [-1, 1] → [B, 299, 299, 3] float32 network input.

  Grayscale is tiled to RGB (the network was trained on RGB); any other size
  is resized bilinearly. Values are not rescaled: the network expects [-1, 1].
  """
  _check_images_shape(images.shape)
  images = jnp.asarray(images, jnp.float32)
  if images.shape[-1] == 1:
    images = jnp.tile(images, (1, 1, 1, 3))
  return resize_bilinear(images, INPUT_SIZE)


class InceptionV3(nn.Module):
  """The FID Inception-v3; returns {'pool': [B, 2048], 'logits': [B, 1008]}.

  Call with float images [B, H, W, 1|3] in [-1, 1]; variables are
  {'params', 'batch_stats'} as `inception_weights.load_params` returns.
  """

  precision: Precision = _DEFAULT_PRECISION

  @nn.compact
  def __call__(self, images: jnp.ndarray) -> dict[str, jnp.ndarray]:
    x = preprocess(images)
    conv = functools.partial(BasicConv2d, precision=self.precision)
    x = conv(32, (3, 3), strides=(2, 2), name='Conv2d_1a_3x3')(x)
    x = conv(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = conv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3_s2(x)
    x = conv(80, (1, 1), name='Conv2d_3b_1x1')(x)
    x = conv(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = _max_pool_3x3_s2(x)
    p = self.precision
    x = InceptionA(32, precision=p, name='Mixed_5b')(x)
    x = InceptionA(64, precision=p, name='Mixed_5c')(x)
    x = InceptionA(64, precision=p, name='Mixed_5d')(x)
    x = InceptionB(precision=p, name='Mixed_6a')(x)
    x = InceptionC(128, precision=p, name='Mixed_6b')(x)
    x = InceptionC(160, precision=p, name='Mixed_6c')(x)
    x = InceptionC(160, precision=p, name='Mixed_6d')(x)
    x = InceptionC(192, precision=p, name='Mixed_6e')(x)
    x = InceptionD(precision=p, name='Mixed_7a')(x)
    x = InceptionE(max_pool_branch=False, precision=p, name='Mixed_7b')(x)
    x = InceptionE(max_pool_branch=True, precision=p, name='Mixed_7c')(x)
    pool = jnp.mean(x, axis=(1, 2))
    # Dropout sits here in torchvision; it is the identity at inference.
    logits = nn.Dense(NUM_CLASSES, precision=p, name='fc')(pool)
    return {'pool': pool, 'logits': logits}


@functools.lru_cache(maxsize=1)
def variable_shapes() -> dict[str, dict[str, Any]]:
  """Shapes of {'params', 'batch_stats'} (ShapeDtypeStructs), traced once."""
  return jax.eval_shape(
    InceptionV3().init,
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32),
  )


@functools.cache
def _compiled(mesh: Mesh) -> tuple[Callable, Callable]:
  """(preprocess, forward) jitted for `mesh`; cached so calls share compiles."""
  replicated = NamedSharding(mesh, PartitionSpec())
  batch = NamedSharding(mesh, PartitionSpec(_DATA_AXIS))
  model = InceptionV3()
  prep = jax.jit(preprocess, in_shardings=batch, out_shardings=batch)
  forward = jax.jit(
    model.apply, in_shardings=(replicated, batch), out_shardings=batch
  )
  return prep, forward


def make_feature_fn(
  variables: dict[str, Any],
  batch_size: int = 256,
  devices: Sequence[jax.Device] | None = None,
) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
  """A function numpy images → {'pool': [N, 2048], 'logits': [N, 1008]}.

  The returned function takes float images [N, H, W, 1|3] in [-1, 1] of any
  size and N, runs them in batches of `batch_size` split over `devices` (data
  parallel: variables replicated, batch sharded on a 1-D mesh), pads the last
  partial batch and drops the padding from the result. Preprocessing compiles
  once per input shape, the network once (always 299×299).

  Args:
    variables: {'params', 'batch_stats'}, e.g. from
      `inception_weights.load_params`.
    batch_size: global batch per step; must be divisible by the number of
      devices.
    devices: devices of the mesh (default `jax.devices()`); in a multi-process
      run pass `jax.local_devices()` so each process embeds its own images.

  Returns:
    The feature function; outputs are float32 numpy arrays.
  """
  mesh = _data_mesh(batch_size, devices)
  batch_sharding = NamedSharding(mesh, PartitionSpec(_DATA_AXIS))
  variables = jax.device_put(
    {'params': variables['params'], 'batch_stats': variables['batch_stats']},
    NamedSharding(mesh, PartitionSpec()),
  )
  prep, forward = _compiled(mesh)

  def feature_fn(images: np.ndarray) -> dict[str, np.ndarray]:
    images = np.asarray(images, np.float32)
    _check_images_shape(images.shape)
    # Dispatch every batch before reading any back, so host-side slicing and
    # transfers overlap with device compute.
    outputs = [
      (forward(variables, prep(jax.device_put(chunk, batch_sharding))), valid)
      for chunk, valid in _padded_batches(images, batch_size)
    ]
    return _concatenate_valid_rows(outputs)

  return feature_fn


def _data_mesh(batch_size: int, devices: Sequence[jax.Device] | None) -> Mesh:
  """A 1-D mesh over `devices` (default: all) that splits batch_size evenly."""
  devices = list(jax.devices() if devices is None else devices)
  if batch_size < 1 or batch_size % len(devices):
    raise ValueError(
      f'batch_size={batch_size} must be a positive multiple of the number of '
      f'devices ({len(devices)}) so each device gets an equal share; use e.g. '
      f'{max(1, batch_size // len(devices)) * len(devices)}.'
    )
  return Mesh(np.asarray(devices), (_DATA_AXIS,))


def _padded_batches(
  images: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, int]]:
  """(batch, number of real rows), the last batch padded with zeros."""
  for start in range(0, images.shape[0], batch_size):
    chunk = images[start : start + batch_size]
    valid = chunk.shape[0]
    if valid < batch_size:
      pad = np.zeros((batch_size - valid, *chunk.shape[1:]), np.float32)
      chunk = np.concatenate([chunk, pad])
    yield chunk, valid


def _concatenate_valid_rows(
  outputs: Sequence[tuple[dict[str, jax.Array], int]],
) -> dict[str, np.ndarray]:
  """The network's per-batch outputs joined, without the padding rows."""
  result = {
    'pool': np.zeros((0, POOL_DIM), np.float32),
    'logits': np.zeros((0, NUM_CLASSES), np.float32),
  }
  if outputs:
    result = {
      k: np.concatenate([np.asarray(out[k])[:valid] for out, valid in outputs])
      for k in result
    }
  return result
