r"""Class accuracy of a digits teacher's guided samples, by an independent SVC.

  python benchmarks/digits_teacher_accuracy.py --workdir=/tmp/gdd_digits \
      --num_steps=256 --ws=0,1,4 --num_samples=1000

An RBF SVC is fit on the digits train split (its test-split accuracy is
printed as the classifier's own ceiling); then, for each w, `num_samples`
guided DDIM samples (classes cycled) are generated and classified, and the
fraction assigned to the requested class is printed with the sampling time.
"""

import time

import jax
import ml_collections
import numpy as np
from absl import app, flags
from sklearn import svm

from gdd import data, sample

_WORKDIR = flags.DEFINE_string('workdir', None, 'A run with a teacher.')
_NUM_STEPS = flags.DEFINE_integer('num_steps', 256, 'DDIM steps.')
_WS = flags.DEFINE_list('ws', ['0', '1', '4'], 'Guidance strengths w.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1000, 'Samples per w.')
_BATCH = flags.DEFINE_integer('batch_size', 500, 'Samples per call.')
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


def main(argv):
  del argv
  classifier = fit_classifier()
  sampler = sample.load_sampler(
    _WORKDIR.value, 'teacher', num_steps=_NUM_STEPS.value
  )
  labels = np.arange(_NUM_SAMPLES.value, dtype=np.int32) % 10
  print(f'device: {jax.devices()[0].device_kind} x{jax.device_count()}')
  for w in map(float, _WS.value):
    start = time.perf_counter()
    chunks = []
    for index, begin in enumerate(range(0, len(labels), _BATCH.value)):
      batch = labels[begin : begin + _BATCH.value]
      chunks.append(np.asarray(sampler(jax.random.PRNGKey(index), batch, w)))
    seconds = time.perf_counter() - start
    samples = np.concatenate(chunks)
    predicted = classifier.predict(samples.reshape(len(samples), -1))
    accuracy = float(np.mean(predicted == labels))
    print(
      f'w={w:g} steps={_NUM_STEPS.value} samples={len(labels)} '
      f'accuracy={accuracy:.4f} sampling_s={seconds:.1f} (incl. compile)'
    )


if __name__ == '__main__':
  app.run(main)
