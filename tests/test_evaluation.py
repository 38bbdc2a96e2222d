"""`--mode=evaluate`: the digits evaluator, the row grid, checks and reports."""

import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from gdd import data, pipeline
from gdd.evaluation import (
  digits_features,
  editing_report,
  evaluate,
  features,
  fid,
  report,
)
from tests import helpers

_DIGITS = ml_collections.ConfigDict({'name': 'digits'})


@pytest.fixture(scope='module')
def classifier(tmp_path_factory):
  eval_dir = str(tmp_path_factory.mktemp('eval'))
  params, accuracy = digits_features.load_or_train(eval_dir)
  return eval_dir, params, accuracy


def test_digits_classifier_is_accurate_and_cached(classifier):
  eval_dir, params, accuracy = classifier
  assert accuracy > 0.95
  test = data.eval_arrays(_DIGITS, split='test')
  assert digits_features.test_accuracy(params, test) == accuracy
  cached, cached_accuracy = digits_features.load_or_train(eval_dir)
  assert cached_accuracy == accuracy
  np.testing.assert_array_equal(
    cached['Dense_2']['kernel'], params['Dense_2']['kernel']
  )


def test_stale_classifier_cache_is_reported(tmp_path):
  np.savez(
    tmp_path / digits_features.CACHE_NAME,
    test_accuracy=1.0,
    **{'Dense_0/kernel': np.zeros(3)},
  )
  with pytest.raises(ValueError, match='delete it and re-run'):
    digits_features.load_or_train(str(tmp_path))


def test_fd_digits_ranks_real_above_corrupted_digits(classifier):
  """FD-digits must see what a person sees: noise is far from digits."""
  _, params, _ = classifier
  extract = digits_features.make_apply_fn(params)
  train = data.eval_arrays(_DIGITS, split='train')
  test = data.eval_arrays(_DIGITS, split='test')
  train_features = np.asarray(extract(train['image'])['features'])
  reference = fid.gaussian_stats(train_features)
  noise = np.random.default_rng(0).normal(0, 0.5, test['image'].shape)
  noisy = np.clip(test['image'] + noise, -1, 1)

  def fd(images):
    stats = fid.gaussian_stats(np.asarray(extract(images)['features']))
    return fid.frechet_distance(*stats, *reference)

  real_fd, noisy_fd = fd(test['image']), fd(noisy.astype(np.float32))
  assert real_fd < noisy_fd / 3
  # One class only: the right digits, the wrong distribution.
  ones = test['image'][test['label'] == 1]
  assert fd(np.concatenate([ones] * 10)[: len(test['label'])]) > 3 * real_fd


def _fake_stage(workdir, name):
  os.makedirs(os.path.join(workdir, name, 'params'))


def test_plan_rows_follows_the_finished_stages(tmp_path):
  config = helpers.load_config('digits')
  workdir = str(tmp_path)
  assert evaluate.plan_rows(config, workdir) == []
  for name in ('teacher', 'guided', 'distill/4steps', 'distill/2steps'):
    _fake_stage(workdir, name)
  _fake_stage(workdir, 'distill/16steps/unrelated')  # Unfinished: no params.
  _fake_stage(workdir, 'single_w/w1/2steps')
  rows = evaluate.plan_rows(config, workdir)
  ev = config.evaluate
  teacher_rows = [r for r in rows if r.model == 'teacher']
  assert [r.num_steps for r in teacher_rows] == list(ev.teacher_num_steps)
  assert [r.nfe for r in teacher_rows] == [2 * n for n in ev.teacher_num_steps]
  distill = [(r.sampler, r.num_steps) for r in rows if r.model == 'distill']
  assert distill == [
    ('ddim', 4),
    ('ddim', 2),
    ('stochastic', 8),
    ('stochastic', 4),
  ]
  assert evaluate.Row('single_w', 'ddim', 2, trained_w=1.0) in rows
  assert evaluate.Row('guided', 'ddim', 4).nfe == 4


def test_evaluate_fails_fast_on_bad_requests(tmp_path):
  config = helpers.quick_config()
  with helpers.raises_user_error(FileNotFoundError, match='No finished stage'):
    evaluate.check(config, str(tmp_path))
  cifar = helpers.quick_config('cifar10')
  cifar.evaluate.feature_extractor = 'digits'
  with helpers.raises_user_error(ValueError, match='scores digits only'):
    features.check_config(cifar)
  cifar.evaluate.feature_extractor = 'inception'
  cifar.evaluate.inception_weights = str(tmp_path / 'missing.npz')
  with helpers.raises_user_error(FileNotFoundError, match='inception_weights'):
    features.check_config(cifar)


def _record(model, sampler, steps, w, fd, **extra):
  nfe = 2 * steps if model == 'teacher' else steps
  return dict(
    model=model,
    sampler=sampler,
    num_steps=steps,
    trained_w=extra.pop('trained_w', None),
    nfe=nfe,
    w=w,
    num_samples=100,
    seconds_per_sample=1e-3 * nfe,
    compile_seconds=1.0,
    fd=fd,
    **{'is': 9.5, 'is_std': 0.1, 'accuracy': 0.9},
  )


def test_report_tables_and_plots(tmp_path):
  records = [
    _record('teacher', 'ddim', 256, w, 10.0 + w) for w in (0.0, 1.0)
  ] + [_record('distill', 'ddim', 4, w, 12.0 + w) for w in (0.0, 1.0)]
  records.append(_record('single_w', 'ddim', 4, 1.0, 7.5, trained_w=1.0))
  results = {
    'workdir': '/run',
    'device': 'cpu:cpu x1',
    'metric': 'FD-digits',
    'extractor': {'classifier_test_accuracy': 0.99},
    'reference': {'split': 'train', 'num_examples': 1500},
    'records': records,
    'speed': {
      'device': 'cpu:cpu x1',
      'batch_size': 256,
      'student_num_steps': 4,
      'student_seconds': 0.01,
      'rows': [
        {
          'teacher_num_steps': 256,
          'teacher_seconds': 1.2,
          'measured_ratio': 120.0,
          'ideal_ratio': 128.0,
        }
      ],
    },
  }
  report.write(results, str(tmp_path))
  table = (tmp_path / 'results.md').read_text()
  assert '| teacher | ddim | 256 | 512 | 5.12e-01 | 10.000 | 11.000 |' in table
  assert '| distill | ddim | 4 | 4 | 4.00e-03 | 12.000 | 13.000 |' in table
  # The single-w model has a value at its own w only.
  assert '| single_w (w=1) | ddim | 4 | 4 | 4.00e-03 | – | 7.500 |' in table
  assert '| 256 | 512 | 1.200 | 120.0× | 128× |' in table
  assert json.loads((tmp_path / 'results.json').read_text()) == results
  for name in ('quality_vs_nfe.png', 'quality_vs_w.png'):
    with Image.open(tmp_path / name) as image:
      assert image.size[0] > 300


def test_editing_report_has_a_table_per_task_scored(tmp_path):
  edit = dict(
    task='edit',
    model='distill',
    num_steps=4,
    t_start=0.6,
    t_start_used=0.6,
    t_grid=0.5,
    accuracy=0.9,
    psnr=10.0,
    feature_distance=20.0,
    fd=5.0,
  )
  results = {
    'workdir': '/run',
    'metric': 'FD-digits',
    'num_inputs': 8,
    'config': {'w': 1.0, 'mask': 'right', 'off_grid': 'step'},
    'records': [edit],
  }
  editing_report.write(results, tmp_path)
  table = (tmp_path / 'editing.md').read_text()
  assert 'one DDIM step to the grid point below' in table
  assert '| distilled student, 4 steps | 0.6 (0.6 → 0.5) | 0.900 |' in table
  assert 'Inpainting' not in table and 'Translation' not in table
  assert editing_report.read(tmp_path) == results
  assert (tmp_path / 'editing_tradeoff.png').exists()
  # No edit rows, no trade-off plot (an empty figure).
  results['records'] = [
    dict(
      edit,
      task='inpaint',
      inpainting='replacement',
      known_error=0.0,
      known_max_error=0.0,
    )
  ]
  editing_report.write(results, tmp_path / 'inpaint_only')
  assert not (tmp_path / 'inpaint_only' / 'editing_tradeoff.png').exists()


def test_evaluate_mode_on_a_tiny_chain(chain_workdir):
  """--mode=evaluate with tiny settings over teacher → guided → 4 → 2 → 1."""
  workdir = chain_workdir
  config = helpers.quick_config(num_train_steps=2)
  config.evaluate.update(
    num_samples=24,
    batch_size=16,
    ws=(0.0, 2.0),
    teacher_num_steps=(2,),
    guided_num_steps=(2,),
    max_stochastic_steps=2,
    speed_batch_size=16,
    speed_teacher_num_steps=(2,),
  )
  config.evaluate.editing.enabled = False  # tests/test_encoding.py's.
  pipeline.run(config, workdir, 'evaluate')
  out = os.path.join(workdir, 'eval')
  with open(os.path.join(out, 'results.json')) as f:
    results = json.load(f)
  records = results['records']
  real = [r for r in records if r['model'] == 'real']
  assert len(real) == 1 and real[0]['num_samples'] == 24
  rows = evaluate.plan_rows(config, workdir)
  assert len(records) == 1 + 2 * len(rows)
  for record in records[1:]:
    assert record['num_samples'] == 24
    assert record['seconds_per_sample'] > 0
    assert np.isfinite(record['fd']) and record['fd'] >= 0
    assert 1.0 <= record['is'] <= 10.0
    assert 0.0 <= record['accuracy'] <= 1.0
  # Same noise, different models: the scores differ. After 2 updates the
  # teacher ignores its label (zero-initialised output layers, a warm-up
  # step), so w changes nothing and stage one, whose target is then its own
  # initial output, is still the teacher; the halving rounds differ.
  at_w0 = {
    (r['model'], r['sampler'], r['num_steps']): r['fd']
    for r in records[1:]
    if r['w'] == 0
  }
  distinct = [fd for key, fd in at_w0.items() if key[0] != 'guided']
  assert len(set(distinct)) == len(distinct) == len(rows) - 1
  speed = results['speed']
  assert speed['student_num_steps'] == config.evaluate.speed_student_num_steps
  assert [r['teacher_num_steps'] for r in speed['rows']] == list(
    config.evaluate.speed_teacher_num_steps
  )
  assert all(r['measured_ratio'] > 0 for r in speed['rows'])
  for name in ('results.md', 'quality_vs_nfe.png', 'quality_vs_w.png'):
    assert os.path.exists(os.path.join(out, name))
  # The reference statistics are cached and reused.
  cached = [n for n in os.listdir(out) if n.startswith('reference_digits')]
  assert cached == ['reference_digits_train_1500_digits.npz']


def test_evaluate_checks_the_request_against_the_workdir(chain_workdir):
  config = helpers.quick_config(num_train_steps=2)
  config.evaluate.ws = (0.0, 5.0)
  with helpers.raises_user_error(ValueError, match='leaves the range'):
    evaluate.check(config, chain_workdir)
  cifar = helpers.quick_config('cifar10')
  with helpers.raises_user_error(ValueError, match="trained on 'digits'"):
    evaluate.check(cifar, chain_workdir)
