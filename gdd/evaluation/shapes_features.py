"""A small shapes classifier: the judge behind FD-shapes and caption accuracy.

Inception-v3 features say little about small drawings of coloured shapes, and
nothing about whether an image shows what its caption asks. So shapes gets
its own judge, as digits does: a small CNN trained on the shapes train split
that predicts every attribute an image shows. Its penultimate activations
play the role of Inception's pool3 features (Fréchet distance "FD-shapes");
its heads tell, per generated image, whether each attribute its caption
asked for is there (`score`).

Slots. A caption names its subject first and relates it to the second object
("a red circle to the left of a blue square"), but the same picture is also
"a blue square to the right of a red circle": the caption's order is not in
the pixels. The classifier's slots are in an order the pixels fix: slot 0 is
the object at the smaller coordinate along the relation's axis (the left or
the upper one), slot 1 the other, and the relation becomes its axis
(horizontal or vertical); `canonical` maps stored attributes to these
targets. `score` reads a predicted scene back as both captions it stands for
and judges the one closer to the caption asked for.

Sizes. The network always sees 32×32: 16×16 and 64×64 images are resized to
32×32 (bilinear, antialiased) inside it. It is trained on the train split at
the data set's configured size, once per workdir and deterministically, and
cached as `<workdir>/eval/shapes_classifier_<size>.npz` with its accuracy on
the held-out test split, which is reported next to every result.
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
from gdd.data import shapes
from gdd.evaluation import npz

FEATURE_DIM = 128
INPUT_SIZE = 32
# What `score` and `test_accuracy` judge, in report order.
SCORED_ATTRIBUTES = ('num_objects', 'shape', 'colour', 'size', 'relation')
# Attributes of each object, predicted per slot: name → number of values.
OBJECT_ATTRIBUTES = {
  'shape': len(shapes.SHAPES),
  'colour': len(shapes.COLOURS),
  'size': len(shapes.SIZES),
}
# 1000 steps of 64: about a minute on 2 busy CPU cores, after which shape,
# the slowest head to learn, is right on 0.99 of the test split.
_TRAIN_STEPS = 1000
_WARMUP_STEPS = 50
_BATCH_SIZE = 64
_LEARNING_RATE = 5e-3
_GRAD_CLIP_NORM = 1.0
_SEED = 0
# Shifts of up to one pixel (of 32): samples slightly off the data's grid
# are judged like real images. Objects keep 1/32 of the side from the border.
_MAX_SHIFT = 1
_ACCURACY_PREFIX = 'test_accuracy/'


def cache_name(image_size: int) -> str:
  """The classifier's file in the eval folder, per image size."""
  return f'shapes_classifier_{image_size}.npz'


def _max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """2×2 max pooling as a reshape: its gradient is a select, where
  `nn.max_pool`'s (select-and-scatter) takes twice as long on XLA:CPU."""
  batch, height, width, channels = x.shape
  x = x.reshape(batch, height // 2, 2, width // 2, 2, channels)
  return x.max(axis=(2, 4))


class ShapesClassifier(nn.Module):
  """3 × (Conv 3×3 → 2×2 max pool) → Dense(256) → Dense(128) → heads.

  Takes images [N, S, S, 3] in [−1, 1]; returns 'features' [N, 128] and
  logits: 'num_objects' [N, 2] (1 or 2), 'shape', 'colour' and 'size'
  [N, 2, K] (per slot) and 'axis' [N, 2] (horizontal, vertical).
  """

  @nn.compact
  def __call__(self, images: jnp.ndarray) -> dict[str, jnp.ndarray]:
    batch = images.shape[0]
    if images.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
      images = jax.image.resize(
        images, (batch, INPUT_SIZE, INPUT_SIZE, 3), 'bilinear'
      )
    # Background 0, so that early activations are the objects' (shape was
    # learnt in fewer steps than with −1), and the brightest channel as a
    # silhouette of every object whatever its colour.
    x = (images + 1) / 2
    x = jnp.concatenate([x, jnp.max(x, axis=-1, keepdims=True)], axis=-1)
    for channels in (16, 32, 64):
      x = _max_pool_2x2(nn.relu(nn.Conv(channels, (3, 3))(x)))
    x = nn.relu(nn.Dense(256)(x.reshape(batch, -1)))
    # The features are taken before the ReLU: a unit that is never active
    # would make their covariance singular.
    features = nn.Dense(FEATURE_DIM)(x)
    x = nn.relu(features)
    out = {
      'features': features,
      'num_objects': nn.Dense(2, name='num_objects')(x),
      'axis': nn.Dense(2, name='axis')(x),
    }
    for name, num in OBJECT_ATTRIBUTES.items():
      logits = nn.Dense(2 * num, name=name)(x)
      out[name] = logits.reshape(batch, 2, num)
    return out


def canonical(attributes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The classifier's targets of stored attributes (`shapes.ATTRIBUTES`).

  Objects in slot order (the left or upper one first), the relation as its
  axis (0: to the left or right of, 1: above or below); a one-object
  image's slot 1 and axis stay `shapes.ABSENT`.
  """
  relation = np.asarray(attributes['relation'])
  two = relation != shapes.ABSENT
  # 'to the right of' and 'below': the caption's subject is in slot 1.
  swap = two & (relation % 2 == 1)
  out = {'num_objects': np.asarray(attributes['num_objects'])}
  for name in OBJECT_ATTRIBUTES:
    value = np.asarray(attributes[name])
    out[name] = np.where(swap[:, None], value[:, ::-1], value)
  out['axis'] = np.where(two, relation // 2, shapes.ABSENT)
  return out


def predict(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The scene the classifier's logits show, in `canonical`'s form.

  Slot 1 and the axis of a scene predicted to have one object are
  `shapes.ABSENT`.
  """
  num_objects = np.argmax(outputs['num_objects'], axis=-1) + 1
  two = num_objects == 2
  out = {'num_objects': num_objects}
  for name in OBJECT_ATTRIBUTES:
    value = np.argmax(outputs[name], axis=-1)
    value[~two, 1] = shapes.ABSENT
    out[name] = value
  out['axis'] = np.where(
    two, np.argmax(outputs['axis'], axis=-1), shapes.ABSENT
  )
  return out


def _readings(scene: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
  """The two captions' attributes (`shapes.ATTRIBUTES`) a scene stands for.

  Slot 0 as the subject ('to the left of', 'above'), then slot 1 ('to the
  right of', 'below'). Read the second way, a one-object scene has no
  subject: none of its object's attributes is right.
  """
  two = scene['axis'] != shapes.ABSENT
  readings = []
  for subject, order in ((0, [0, 1]), (1, [1, 0])):
    reading = {name: scene[name][:, order] for name in OBJECT_ATTRIBUTES}
    reading['num_objects'] = scene['num_objects']
    # RELATIONS: 2 × axis, + 1 where the subject is the right or lower one.
    reading['relation'] = np.where(
      two, 2 * scene['axis'] + subject, shapes.ABSENT
    )
    readings.append(reading)
  return readings


def _judge(
  reading: dict[str, np.ndarray], asked: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
  """Per sample and attribute: does the reading show what was asked?

  An attribute asked of two objects is right when both show it. The
  relation is right between the objects asked for only, told apart by
  their colours (an image's two colours always differ), as GenEval judges
  a position only between detected objects: two objects of other colours
  side by side are not "a red circle to the left of a blue square". The
  relation of a one-object caption is right whatever the image.
  """
  correct = {'num_objects': reading['num_objects'] == asked['num_objects']}
  for name in OBJECT_ATTRIBUTES:
    right = (reading[name] == asked[name]) | (asked[name] == shapes.ABSENT)
    correct[name] = np.all(right, axis=1)
  correct['relation'] = (
    (reading['relation'] == asked['relation']) & correct['colour']
  ) | (asked['relation'] == shapes.ABSENT)
  return correct


def _agreement(correct: dict[str, np.ndarray]) -> np.ndarray:
  """Per sample, how well a reading agrees with the caption: the number of
  attributes right, ties broken by which are right (the earlier in
  `SCORED_ATTRIBUTES`, the more it counts). Readings that tie are right in
  the same attributes, so the two ways to phrase a caption score alike."""
  agreement = sum(correct[name].astype(int) for name in SCORED_ATTRIBUTES)
  for name in SCORED_ATTRIBUTES:
    agreement = 2 * agreement + correct[name]
  return agreement


def score(
  outputs: dict[str, np.ndarray], asked: dict[str, np.ndarray]
) -> dict[str, float | None]:
  """How often generated images show what their captions asked for.

  Args:
    outputs: the classifier's outputs on the images.
    asked: the attributes of each image's caption (`shapes.ATTRIBUTES`), as
      the shapes split stores them beside the caption.

  Returns:
    'all_correct': the fraction of images right in every attribute, and
    '<attribute>_accuracy' for each of `SCORED_ATTRIBUTES`: the fraction
    right in that attribute, of all images ('relation': of those whose
    caption has two objects, None if none has; see `_judge`). Each image is
    judged by the reading of its predicted scene (`_readings`) that agrees
    more with its caption (`_agreement`).
  """
  readings = [_judge(r, asked) for r in _readings(predict(outputs))]
  second = _agreement(readings[1]) > _agreement(readings[0])
  correct = {
    name: np.where(second, readings[1][name], readings[0][name])
    for name in SCORED_ATTRIBUTES
  }
  two = np.asarray(asked['num_objects']) == 2
  scores = {
    'all_correct': float(np.mean(np.all(list(correct.values()), axis=0)))
  }
  for name in SCORED_ATTRIBUTES:
    judged = two if name == 'relation' else np.ones_like(two)
    scores[f'{name}_accuracy'] = (
      float(np.mean(correct[name][judged])) if judged.any() else None
    )
  return scores


def _masked_cross_entropy(
  logits: jnp.ndarray, labels: jnp.ndarray
) -> jnp.ndarray:
  """Mean cross-entropy over the labels that are not `shapes.ABSENT`."""
  present = labels != shapes.ABSENT
  losses = optax.softmax_cross_entropy_with_integer_labels(
    logits, jnp.maximum(labels, 0)
  )
  return jnp.sum(losses * present) / jnp.maximum(jnp.sum(present), 1)


def _loss(outputs: dict, targets: dict) -> jnp.ndarray:
  """The heads' cross-entropies, summed; absent slots and axes masked."""
  loss = _masked_cross_entropy(
    outputs['num_objects'], targets['num_objects'] - 1
  )
  loss += _masked_cross_entropy(outputs['axis'], targets['axis'])
  for name in OBJECT_ATTRIBUTES:
    loss += _masked_cross_entropy(outputs[name], targets[name])
  return loss


def _random_shift(rng: jax.Array, images: jnp.ndarray) -> jnp.ndarray:
  """Each image moved by up to _MAX_SHIFT pixels, borders black (−1)."""
  pad = _MAX_SHIFT
  padded = jnp.pad(
    images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-1.0
  )
  offsets = jax.random.randint(rng, (len(images), 2), 0, 2 * pad + 1)

  def crop(image, offset):
    return jax.lax.dynamic_slice(
      image, (offset[0], offset[1], 0), images.shape[1:]
    )

  return jax.vmap(crop)(padded, offsets)


def train_classifier(train: dict[str, np.ndarray]) -> dict:
  """Trains the classifier on `train`: `shapes.eval_arrays`' raw uint8
  pixels (a quarter of float32's memory; mapped to [−1, 1] per batch, as
  `data.eval_arrays` maps them) and attributes."""
  model = ShapesClassifier()
  rng = jax.random.PRNGKey(_SEED)
  images = jnp.asarray(train['image'])
  targets = jax.tree.map(jnp.asarray, canonical(train))
  params = model.init(rng, jnp.zeros((1, *images.shape[1:])))['params']
  tx = optax.chain(
    optax.clip_by_global_norm(_GRAD_CLIP_NORM),
    optax.adamw(
      optax.warmup_cosine_decay_schedule(
        0.0, _LEARNING_RATE, _WARMUP_STEPS, _TRAIN_STEPS
      ),
      1e-4,
    ),
  )

  def loss_fn(params, batch_images, batch_targets):
    return _loss(model.apply({'params': params}, batch_images), batch_targets)

  @jax.jit
  def train_step(params, opt_state, step):
    index_rng, shift_rng = jax.random.split(jax.random.fold_in(rng, step))
    index = jax.random.choice(index_rng, len(images), (_BATCH_SIZE,))
    batch_images = data.to_model_range(images[index], shapes.MAX_PIXEL_VALUE)
    batch_images = _random_shift(shift_rng, batch_images)
    batch_targets = jax.tree.map(lambda x: x[index], targets)
    grads = jax.grad(loss_fn)(params, batch_images, batch_targets)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for step in range(_TRAIN_STEPS):
    params, opt_state = train_step(params, opt_state, step)
  return jax.device_get(params)


def make_apply_fn(params: dict):
  """Jitted images [N, S, S, 3] in [−1, 1] → `ShapesClassifier`'s outputs."""
  model = ShapesClassifier()
  return jax.jit(lambda x: model.apply({'params': params}, x))


def test_accuracy(
  params: dict, test: dict[str, np.ndarray]
) -> dict[str, float]:
  """Accuracy per head on `test` (images in [−1, 1], attributes).

  Keys `SCORED_ATTRIBUTES` ('relation': the axis, of two-object images; the
  slot order carries the rest) and 'all_correct' (every head right).
  """
  scene = predict(jax.device_get(make_apply_fn(params)(test['image'])))
  target = canonical(test)
  heads = {name: name for name in SCORED_ATTRIBUTES} | {'relation': 'axis'}
  accuracy, image_right = {}, np.ones(len(test['image']), bool)
  for name, head in heads.items():
    present = target[head] != shapes.ABSENT
    right = scene[head] == target[head]
    accuracy[name] = float(np.mean(right[present]))
    image_right &= (right | ~present).reshape(len(right), -1).all(axis=1)
  accuracy['all_correct'] = float(np.mean(image_right))
  return accuracy


def _load(path: epath.Path) -> tuple[dict, dict[str, float]]:
  """(params, accuracy) of a cached classifier; stale files are refused."""
  flat = npz.load(path)
  accuracy = {
    key.removeprefix(_ACCURACY_PREFIX): float(flat.pop(key))
    for key in list(flat)
    if key.startswith(_ACCURACY_PREFIX)
  }
  params = flax.traverse_util.unflatten_dict(flat, sep='/')
  template = jax.eval_shape(
    ShapesClassifier().init,
    jax.random.PRNGKey(0),
    jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)),
  )['params']
  expected = jax.tree.map(lambda x: x.shape, template)
  if jax.tree.map(np.shape, params) != expected or set(accuracy) != {
    *SCORED_ATTRIBUTES,
    'all_correct',
  }:
    raise ValueError(
      f'{path} does not hold a classifier of this version of gdd; delete '
      'it and re-run: it is retrained in about a minute.'
    )
  return params, accuracy


def load_or_train(
  eval_dir: epath.PathLike, data_config: ml_collections.ConfigDict
) -> tuple[dict, dict[str, float]]:
  """The cached classifier of `eval_dir` for `data_config`'s image size
  (trained and cached if missing).

  Returns (params, `test_accuracy` on the shapes test split).
  """
  image_size = data.get_info(data_config).image_shape[0]
  path = paths.resolve(eval_dir) / cache_name(image_size)
  if path.exists():
    return _load(path)
  logging.info('Training the shapes evaluator classifier (once per workdir).')
  params = train_classifier(
    shapes.eval_arrays(image_size=image_size, split='train')
  )
  accuracy = test_accuracy(params, data.eval_arrays(data_config, split='test'))
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  npz.atomic_savez(
    path,
    **flat,
    **{_ACCURACY_PREFIX + name: value for name, value in accuracy.items()},
  )
  return params, accuracy
