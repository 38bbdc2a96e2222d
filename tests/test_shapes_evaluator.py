"""The shapes evaluator: its classifier, caption scoring, FD-shapes and the
`--mode=evaluate` rows of a text workdir."""

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from gdd import config_lib, data, pipeline
from gdd.data import shapes
from gdd.evaluation import evaluate, features, fid, shapes_features
from gdd.stages import common
from tests import helpers

_SHAPES = ml_collections.ConfigDict({'name': 'shapes', 'image_size': 32})
# Measured on the test split (1000 images) under the tests' XLA flags: number
# of objects 0.999, shape 0.991, colour 0.998, size 0.999, relation 0.998,
# all heads right on 0.987 of the images (with XLA's defaults: 0.999, 0.988,
# 0.995, 0.998, 0.998 and 0.976).
_MIN_ACCURACY = {
  'num_objects': 0.98,
  'shape': 0.97,
  'colour': 0.98,
  'size': 0.98,
  'relation': 0.98,
  'all_correct': 0.95,
}


@pytest.fixture(scope='module')
def classifier(tmp_path_factory):
  eval_dir = str(tmp_path_factory.mktemp('eval'))
  params, accuracy = shapes_features.load_or_train(eval_dir, _SHAPES)
  return eval_dir, params, accuracy


@pytest.fixture(scope='module')
def held_out(classifier):
  """The test split and the classifier's outputs on it."""
  _, params, _ = classifier
  test = data.eval_arrays(_SHAPES, split='test')
  outputs = jax.device_get(shapes_features.make_apply_fn(params)(test['image']))
  return test, outputs


def _quick() -> ml_collections.ConfigDict:
  """`shapes:quick` at 32×32 (the size of the module's classifier), a few
  steps per stage, tiny evaluation settings."""
  config = helpers.shrink_latent_chain(helpers.load_config('shapes', 'quick'))
  config.data.image_size = 32
  config.evaluate.update(
    num_samples=16,
    batch_size=8,
    ws=(0.0, 2.0),
    num_reference=100,
    teacher_num_steps=(2,),
    guided_num_steps=(2,),
    max_stochastic_steps=1,  # No stochastic rows: digits' tests have them.
    speed_teacher_num_steps=(),
  )
  config.evaluate.editing.update(
    num_inputs=8, batch_size=8, teacher_num_steps=2, encoder_num_steps=(2,)
  )
  config_lib.validate(config)
  return config


def test_classifier_is_accurate_and_cached(classifier):
  eval_dir, params, accuracy = classifier
  for name, minimum in _MIN_ACCURACY.items():
    assert accuracy[name] >= minimum, (name, accuracy)
  cached, cached_accuracy = shapes_features.load_or_train(eval_dir, _SHAPES)
  assert cached_accuracy == accuracy
  np.testing.assert_array_equal(
    cached['shape']['kernel'], params['shape']['kernel']
  )


def test_stale_classifier_cache_is_reported(tmp_path):
  np.savez(
    tmp_path / shapes_features.cache_name(32), **{'Dense_0/kernel': np.zeros(3)}
  )
  with pytest.raises(ValueError, match='delete it and re-run'):
    shapes_features.load_or_train(str(tmp_path), _SHAPES)


def _logits(scene: dict) -> dict:
  """One-hot logits of one scene given in `canonical`'s form."""
  out = {
    'num_objects': np.eye(2)[[scene['num_objects'] - 1]],
    'axis': np.eye(2)[[max(scene['axis'], 0)]],
  }
  for name, num in shapes_features.OBJECT_ATTRIBUTES.items():
    out[name] = np.eye(num)[[[max(v, 0) for v in scene[name]]]]
  return out


def _asked(num_objects, shape, colour, size, relation) -> dict:
  return {
    'num_objects': np.array([num_objects]),
    'shape': np.array([shape]),
    'colour': np.array([colour]),
    'size': np.array([size]),
    'relation': np.array([relation]),
  }


def test_a_caption_is_judged_by_the_scene_it_describes():
  """Left: a small red circle; right: a large blue square."""
  outputs = _logits(
    {'num_objects': 2, 'shape': [0, 1], 'colour': [0, 5], 'size': [0, 1]}
    | {'axis': 0}  # Horizontal.
  )
  left, right, above = (
    shapes.RELATIONS.index(r)
    for r in ('to the left of', 'to the right of', 'above')
  )
  all_right = {f'{n}_accuracy': 1.0 for n in shapes_features.SCORED_ATTRIBUTES}
  all_right['all_correct'] = 1.0
  # Both ways of saying it are right.
  for asked in (
    _asked(2, [0, 1], [0, 5], [0, 1], left),
    _asked(2, [1, 0], [5, 0], [1, 0], right),
  ):
    assert shapes_features.score(outputs, asked) == all_right
  # The objects in the wrong relation: the relation alone is wrong.
  for asked in (
    _asked(2, [0, 1], [0, 5], [0, 1], right),
    _asked(2, [0, 1], [0, 5], [0, 1], above),
  ):
    assert shapes_features.score(outputs, asked) == all_right | {
      'relation_accuracy': 0.0,
      'all_correct': 0.0,
    }
  # Other colours in that relation: no relation between the objects asked
  # for.
  assert shapes_features.score(
    outputs, _asked(2, [0, 1], [1, 2], [0, 1], left)
  ) == all_right | {
    'colour_accuracy': 0.0,
    'relation_accuracy': 0.0,
    'all_correct': 0.0,
  }
  # The right object asked for alone, two shown: it is there, not alone.
  absent = shapes.ABSENT
  scores = shapes_features.score(
    outputs, _asked(1, [1, absent], [5, absent], [1, absent], absent)
  )
  assert scores == all_right | {
    'num_objects_accuracy': 0.0,
    'all_correct': 0.0,
    'relation_accuracy': None,
  }
  # Two asked for, the first shown alone: no attribute asked of both
  # objects is there, nor the relation.
  single = _logits(
    {'num_objects': 1, 'shape': [0, absent], 'colour': [0, absent]}
    | {'size': [0, absent], 'axis': absent}
  )
  scores = shapes_features.score(
    single, _asked(2, [0, 1], [0, 5], [0, 1], left)
  )
  assert scores == {
    'all_correct': 0.0,
    'num_objects_accuracy': 0.0,
    'shape_accuracy': 0.0,
    'colour_accuracy': 0.0,
    'size_accuracy': 0.0,
    'relation_accuracy': 0.0,
  }


def test_real_images_match_their_own_captions_only(classifier, held_out):
  _, _, accuracy = classifier
  test, outputs = held_out
  own = shapes_features.score(outputs, test)
  assert abs(own['all_correct'] - accuracy['all_correct']) <= 0.01
  for name in shapes_features.SCORED_ATTRIBUTES:
    assert own[f'{name}_accuracy'] >= _MIN_ACCURACY[name] - 0.01, own
  # The same images described the other way round ('B right of A' for 'A
  # left of B') are as right.
  two = test['num_objects'] == 2
  flipped = dict(test)
  flipped['relation'] = np.where(two, test['relation'] ^ 1, shapes.ABSENT)
  for name in shapes_features.OBJECT_ATTRIBUTES:
    flipped[name] = np.where(two[:, None], test[name][:, ::-1], test[name])
  assert shapes_features.score(outputs, flipped) == own
  order = np.random.default_rng(0).permutation(len(test['caption']))
  shuffled = {name: value[order] for name, value in test.items()}
  other = shapes_features.score(outputs, shuffled)
  assert other['all_correct'] < 0.05
  assert other['colour_accuracy'] < 0.2


def test_fd_shapes_ranks_real_above_corrupted_shapes(classifier, held_out):
  """FD-shapes must see what a person sees: wrong colours, blur."""
  _, params, _ = classifier
  extract = shapes_features.make_apply_fn(params)
  test, outputs = held_out
  train = data.eval_arrays(_SHAPES, split='train', num_examples=2000)
  reference = fid.gaussian_stats(
    jax.device_get(extract(train['image']))['features']
  )

  def fd(images):
    stats = fid.gaussian_stats(jax.device_get(extract(images))['features'])
    return fid.frechet_distance(*stats, *reference)

  real_fd = fid.frechet_distance(
    *fid.gaussian_stats(outputs['features']), *reference
  )
  # Channels rotated (red → lime, blue → red, …): the shapes, other colours.
  swapped = test['image'][..., [2, 0, 1]]
  # A 3×3 box blur.
  padded = np.pad(test['image'], ((0, 0), (1, 1), (1, 1), (0, 0)), 'edge')
  blurred = (
    sum(padded[:, i : i + 32, j : j + 32] for i in range(3) for j in range(3))
    / 9
  )
  assert fd(swapped) > 5 * real_fd
  assert fd(blurred.astype(np.float32)) > 3 * real_fd


def test_the_extractor_must_fit_the_data():
  digits = helpers.quick_config('digits')
  digits.evaluate.feature_extractor = 'shapes'
  with helpers.raises_user_error(ValueError, match="use 'digits' for 'digits'"):
    features.check_config(digits)
  config = _quick()
  config.evaluate.feature_extractor = 'digits'
  with helpers.raises_user_error(ValueError, match="use 'shapes' for 'shapes'"):
    features.check_config(config)
  config.data.name = 'cifar10'
  config.evaluate.feature_extractor = 'shapes'
  with helpers.raises_user_error(
    ValueError,
    match=r"feature_extractor='shapes' scores shapes only; use "
    r"'inception'",
  ):
    features.check_config(config)


def test_conditions_ask_for_the_held_out_captions_attributes():
  config = _quick()
  cond, asked = evaluate.conditions(config, 10)
  tokenizer = common.build_conditioning(
    config, data.get_info(config.data)
  ).tokenizer
  captions = tokenizer.decode(cond['tokens'])
  assert list(asked['caption']) == captions
  assert list(shapes.captions(asked)) == captions
  assert captions[:4] == captions[4:8]  # 4 held-out captions, cycled.


def test_evaluate_mode_on_a_tiny_text_chain(classifier, tmp_path):
  workdir = str(tmp_path)
  config = _quick()
  # The autoencoder and the teacher only: the students' rows take the same
  # scoring path (digits' evaluation tests cover their rows), and training
  # and scoring them here would cost minutes of CI.
  for mode in ('autoencoder', 'teacher'):
    pipeline.run(config, workdir, mode)
  # The module's classifier is what this workdir would train: reuse it.
  eval_dir = os.path.join(workdir, 'eval')
  os.makedirs(eval_dir)
  name = shapes_features.cache_name(32)
  shutil.copy(os.path.join(classifier[0], name), os.path.join(eval_dir, name))
  pipeline.run(config, workdir, 'evaluate')
  with open(os.path.join(eval_dir, 'results.json')) as f:
    results = json.load(f)
  assert results['metric'] == 'FD-shapes'
  assert results['conditions'] == '4 distinct held-out captions cycled'
  assert results['extractor'] == {
    f'classifier_test_{k}': v for k, v in classifier[2].items()
  }
  records = results['records']
  rows = evaluate.plan_rows(config, workdir)
  assert len(records) == 1 + 2 * len(rows)
  real = records[0]
  assert real['model'] == 'real' and real['all_correct'] >= 0.9
  for record in records:
    assert np.isfinite(record['fd']) and record['fd'] >= 0
    assert 'is' not in record and 'accuracy' not in record
    for name in ('all_correct', 'num_objects_accuracy', 'shape_accuracy'):
      assert 0.0 <= record[name] <= 1.0
  # After 4 updates the models draw no shapes yet: far from real images.
  assert min(r['fd'] for r in records[1:]) > 3 * real['fd']
  assert all(r['seconds_per_sample'] > 0 for r in records[1:])
  with open(os.path.join(eval_dir, 'results.md')) as f:
    table = f.read()
  assert '### FD-shapes (lower is better)' in table
  assert '### Caption accuracy: relation as asked' in table
  for name in ('quality_vs_nfe.png', 'quality_vs_w.png'):
    with Image.open(os.path.join(eval_dir, name)) as image:
      assert image.size[0] > 300
  cached = [n for n in os.listdir(eval_dir) if n.startswith('reference_')]
  assert cached == ['reference_shapes_train_100_shapes.npz']
  # The editing rows (configs/shapes.py turns them on): the teacher alone
  # here, judged by the next held-out caption's attributes.
  with open(os.path.join(eval_dir, 'editing.json')) as f:
    editing = json.load(f)
  assert [(r['task'], r['model']) for r in editing['records']] == [
    ('edit', 'teacher'),
    ('inpaint', 'teacher'),
    ('translate', 'teacher'),
  ]
  for record in editing['records']:
    assert 0 <= record['accuracy'] <= 1 and np.isfinite(record['fd'])
  # Kept latents decode to the autoencoder's reconstruction: not 0.
  assert editing['records'][1]['known_error'] > 0
  # Each attribute's accuracy beside all of them right.
  for record in editing['records']:
    assert record['colour_accuracy'] >= record['accuracy']
  with open(os.path.join(eval_dir, 'editing.md')) as f:
    assert 'num_objects / shape / colour / size / relation accuracy' in f.read()
