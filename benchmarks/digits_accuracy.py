r"""Class accuracy of a digits run's samples, judged by an independent SVC.

  python benchmarks/digits_accuracy.py --workdir=workdirs/digits \
      --ws=0,1,4 --num_samples=1000

An RBF SVC is fit on the real digits train split (its test-split accuracy is
printed as the classifier's own ceiling). Then, for each row
`stage:num_steps:sampler` and each w, `num_samples` samples (classes cycled
0..9) are generated from the same noise seeds and classified; the table gives
the fraction assigned to the requested class, the network evaluations (NFE)
per sample, and seconds per sample measured after compilation (every batch
but the first), on the device named in the output.
"""

import time

import jax
import ml_collections
import numpy as np
from absl import app, flags
from sklearn import svm

from gdd import data, sample
from gdd.stages import registry

DEFAULT_ROWS = [
  'teacher:256:ddim',
  'teacher:64:ddim',
  'guided:64:ddim',
  'distill:8:ddim',
  'distill:4:ddim',
  'distill:2:ddim',
  'distill:1:ddim',
  'distill:8:stochastic',
  'distill:4:stochastic',
]

_WORKDIR = flags.DEFINE_string('workdir', None, 'A finished digits run.')
_ROWS = flags.DEFINE_list('rows', DEFAULT_ROWS, 'stage:num_steps:sampler.')
_WS = flags.DEFINE_list('ws', ['0', '1', '4'], 'Guidance strengths w.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1000, 'Samples per cell.')
_BATCH = flags.DEFINE_integer('batch_size', 250, 'Samples per call.')
flags.mark_flag_as_required('workdir')


def fit_classifier() -> svm.SVC:
  """RBF SVC on the digits train split, scored on the test split."""
  config = ml_collections.ConfigDict({'name': 'digits'})
  train = data.eval_arrays(config, split='train')
  test = data.eval_arrays(config, split='test')
  classifier = svm.SVC(C=10.0, gamma='scale')
  classifier.fit(
    train['image'].reshape(len(train['image']), -1), train['label']
  )
  accuracy = classifier.score(
    test['image'].reshape(len(test['image']), -1), test['label']
  )
  print(f'SVC accuracy on the real digits test split: {accuracy:.4f}')
  return classifier


def measure(sampler, labels, w, batch_size):
  """Samples for `labels`; seconds per sample after the compiling call."""
  chunks, seconds = [], []
  for index, begin in enumerate(range(0, len(labels), batch_size)):
    batch = labels[begin : begin + batch_size]
    start = time.perf_counter()
    chunks.append(np.asarray(sampler(jax.random.PRNGKey(index), batch, w)))
    seconds.append((time.perf_counter() - start) / len(batch))
  timed = seconds[1:] or seconds
  return np.concatenate(chunks), float(np.mean(timed))


def main(argv):
  del argv
  classifier = fit_classifier()
  labels = np.arange(_NUM_SAMPLES.value, dtype=np.int32) % 10
  ws = [float(w) for w in _WS.value]
  device = f'{jax.devices()[0].device_kind} x{jax.device_count()}'
  print(f'device: {device}; {len(labels)} samples per cell')
  header = ' | '.join(f'w={w:g}' for w in ws)
  print(f'| model | sampler | steps | NFE | {header} | s/sample |')
  print('|' + ' --- |' * (5 + len(ws)))
  for row in _ROWS.value:
    stage, num_steps, sampler_name = row.split(':')
    num_steps = int(num_steps)
    sampler = sample.load_sampler(
      _WORKDIR.value, stage, num_steps=num_steps, sampler=sampler_name
    )
    accuracies, times = [], []
    for w in ws:
      samples, seconds = measure(sampler, labels, w, _BATCH.value)
      predicted = classifier.predict(samples.reshape(len(samples), -1))
      accuracies.append(float(np.mean(predicted == labels)))
      times.append(seconds)
    cells = ' | '.join(f'{a:.3f}' for a in accuracies)
    print(
      f'| {stage} | {sampler_name} | {num_steps} | '
      f'{registry.nfe(stage, num_steps)} | {cells} | '
      f'{np.mean(times):.2e} |',
      flush=True,
    )


if __name__ == '__main__':
  app.run(main)
