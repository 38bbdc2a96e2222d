"""A small digits classifier: the feature extractor behind FD-digits.

Inception-v3 features mean nothing on 8×8 grey digits, so digits gets its own
judge: a small CNN trained on the digits train split. Its penultimate
activations play the role of Inception's pool3 features (Fréchet distance
"FD-digits"), its logits the role of Inception's logits (class accuracy and
an IS-like score). It is trained once per workdir, deterministically, and
cached as `<workdir>/eval/digits_classifier.npz`; its accuracy on the
held-out test split is stored with it and reported next to every result.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from gdd import data, paths
from gdd.evaluation import npz

FEATURE_DIM = 64
NUM_CLASSES = 10
CACHE_NAME = 'digits_classifier.npz'
_TRAIN_STEPS = 500
_BATCH_SIZE = 128
_LEARNING_RATE = 3e-3
_SEED = 0
# Shifts of up to one pixel: the classifier must not depend on the exact
# pixel grid, so that slightly shifted samples are judged like real digits.
_MAX_SHIFT = 1


class DigitsClassifier(nn.Module):
  """Conv(32) → Conv(64, stride 2) → Dense(128) → Dense(64) → logits."""

  @nn.compact
  def __call__(self, images: jnp.ndarray) -> dict[str, jnp.ndarray]:
    x = nn.gelu(nn.Conv(32, (3, 3))(images))
    x = nn.gelu(nn.Conv(64, (3, 3), strides=2)(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.gelu(nn.Dense(128)(x))
    features = nn.gelu(nn.Dense(FEATURE_DIM)(x))
    return {'features': features, 'logits': nn.Dense(NUM_CLASSES)(features)}


def _random_shift(rng: jax.Array, images: jnp.ndarray) -> jnp.ndarray:
  """Each image moved by up to _MAX_SHIFT pixels, borders filled with −1."""
  pad = _MAX_SHIFT
  padded = jnp.pad(
    images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-1.0
  )
  offsets = jax.random.randint(rng, (len(images), 2), 0, 2 * pad + 1)
  height, width = images.shape[1:3]

  def crop(image, offset):
    return jax.lax.dynamic_slice(
      image, (offset[0], offset[1], 0), (height, width, image.shape[-1])
    )

  return jax.vmap(crop)(padded, offsets)


def train_classifier(train: dict[str, np.ndarray]) -> dict:
  """Trains the classifier on `train` (images in [−1, 1], int labels)."""
  model = DigitsClassifier()
  rng = jax.random.PRNGKey(_SEED)
  params = model.init(rng, train['image'][:1])['params']
  tx = optax.adamw(
    optax.cosine_decay_schedule(_LEARNING_RATE, _TRAIN_STEPS), 1e-4
  )
  images = jnp.asarray(train['image'])
  labels = jnp.asarray(train['label'])

  def loss_fn(params, batch_images, batch_labels):
    logits = model.apply({'params': params}, batch_images)['logits']
    return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch_labels
    ).mean()

  @jax.jit
  def train_step(params, opt_state, step):
    step_rng = jax.random.fold_in(rng, step)
    index_rng, shift_rng = jax.random.split(step_rng)
    index = jax.random.choice(index_rng, len(labels), (_BATCH_SIZE,))
    batch_images = _random_shift(shift_rng, images[index])
    grads = jax.grad(loss_fn)(params, batch_images, labels[index])
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for step in range(_TRAIN_STEPS):
    params, opt_state = train_step(params, opt_state, step)
  return jax.device_get(params)


def make_apply_fn(params: dict):
  """Jitted images → {'features' [N, 64], 'logits' [N, 10]}."""
  model = DigitsClassifier()
  return jax.jit(lambda x: model.apply({'params': params}, x))


def test_accuracy(params: dict, test: dict[str, np.ndarray]) -> float:
  logits = make_apply_fn(params)(test['image'])['logits']
  return float(np.mean(np.argmax(logits, -1) == test['label']))


def load_or_train(eval_dir: epath.PathLike) -> tuple[dict, float]:
  """The cached classifier of `eval_dir` (trained and cached if missing).

  Returns (params, accuracy on the digits test split).
  """
  path = paths.resolve(eval_dir) / CACHE_NAME
  template = jax.eval_shape(
    DigitsClassifier().init,
    jax.random.PRNGKey(0),
    jnp.zeros((1, *data.digits.IMAGE_SHAPE)),
  )['params']
  if path.exists():
    flat = npz.load(path)
    accuracy = float(flat.pop('test_accuracy'))
    params = flax.traverse_util.unflatten_dict(flat, sep='/')
    expected = jax.tree.map(lambda x: x.shape, template)
    if jax.tree.map(np.shape, params) != expected:
      raise ValueError(
        f'{path} does not hold a classifier of this version of gdd; delete '
        'it and re-run: it is retrained in under a minute.'
      )
    return params, accuracy
  config = ml_collections.ConfigDict({'name': data.DIGITS})
  logging.info('Training the digits evaluator classifier (once per workdir).')
  params = train_classifier(data.eval_arrays(config, split='train'))
  accuracy = test_accuracy(params, data.eval_arrays(config, split='test'))
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  npz.atomic_savez(path, test_accuracy=accuracy, **flat)
  return params, accuracy
