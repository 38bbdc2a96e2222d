"""Feature extractors for Fréchet distances, and cached reference statistics.

Three extractors share one interface and one scoring path: Inception-v3
(pool3 features → FID, logits → IS) for natural images, the digits
classifier (penultimate features → FD-digits, logits → class accuracy and an
IS-like score) for the embedded digits default, and the shapes classifier
(penultimate features → FD-shapes, heads → how often each attribute a
caption asks for is in its image) for the embedded shapes captions.
"""

import dataclasses
import functools
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from etils import epath

from gdd import config_lib, data, errors, paths
from gdd.evaluation import digits_features, fid, shapes_features

ExtractFn = Callable[[np.ndarray], dict[str, np.ndarray]]
# (extract's outputs, what each image was asked for) → scores beside the FD.
JudgeFn = Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], dict]
# The extractors made for one data set, and that data set.
_DATA_OF_EXTRACTOR = {'digits': data.DIGITS, 'shapes': data.SHAPES}


class WeightsNotFoundError(errors.UserError, FileNotFoundError):
  """config.evaluate.inception_weights names no file; says how to make it."""


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
  """images [N, H, W, C] in [−1, 1] → {'features' [N, D], …} and scores.

  `judge` scores a set of images against what each was asked for: the
  conditions' arrays (class models: {'label'}; caption models: {'caption'}
  and what the data set stores beside it, e.g. shapes' attributes).
  """

  name: str
  metric_name: str  # What the Fréchet distance is called in reports.
  extract: ExtractFn
  judge: JudgeFn
  about: dict  # Facts reported with the results (e.g. its test accuracy).


def check_config(config: ml_collections.ConfigDict) -> None:
  """Cheap checks of the extractor settings; fails before any sampling."""
  ev = config.evaluate
  scored = _DATA_OF_EXTRACTOR.get(ev.feature_extractor)
  if scored is not None and scored != config.data.name:
    own = [
      f'{extractor!r}'
      for extractor, name in _DATA_OF_EXTRACTOR.items()
      if name == config.data.name
    ]
    fix = (
      own[0] if own else "'inception' (with config.evaluate.inception_weights)"
    )
    raise config_lib.ConfigError(
      f'config.evaluate.feature_extractor={ev.feature_extractor!r} scores '
      f'{scored} only; use {fix} for {config.data.name!r}.'
    )
  if (
    ev.feature_extractor == 'inception'
    and not paths.resolve(ev.inception_weights).is_file()
  ):
    raise WeightsNotFoundError(
      f'config.evaluate.inception_weights={ev.inception_weights!r} is not a '
      'file. FID needs the FID Inception-v3 weights converted once: python '
      '-m gdd.evaluation.convert_inception --input=pt_inception-2015-12-05-'
      '6726825d.pth --output=inception_fid.npz (README, "Evaluation").'
    )


def _batched(apply_fn, batch_size: int) -> ExtractFn:
  def extract(images: np.ndarray) -> dict[str, np.ndarray]:
    outputs = [
      jax.device_get(apply_fn(images[begin : begin + batch_size]))
      for begin in range(0, len(images), batch_size)
    ]
    return {
      key: np.concatenate([np.asarray(out[key]) for out in outputs])
      for key in outputs[0]
    }

  return extract


def _num_splits(num_samples: int) -> int:
  """10 splits as is standard, fewer when there are few samples."""
  return max(1, min(10, num_samples // 100))


def _logit_scores(
  outputs: dict[str, np.ndarray],
  asked: dict[str, np.ndarray],
  *,
  labels_are_classes: bool,
) -> dict:
  """IS (or its digits analogue) and, where logit k means the data set's
  class k and the images were asked for classes, class accuracy."""
  logits = outputs['logits']
  is_mean, is_std = fid.inception_score(
    logits, num_splits=_num_splits(len(logits)), from_logits=True
  )
  accuracy = None
  if labels_are_classes and 'label' in asked:
    accuracy = float(np.mean(np.argmax(logits, axis=-1) == asked['label']))
  return {'is': is_mean, 'is_std': is_std, 'accuracy': accuracy}


def make_extractor(
  config: ml_collections.ConfigDict, out_dir: epath.PathLike
) -> FeatureExtractor:
  """The extractor `config.evaluate.feature_extractor` names."""
  make = {
    'digits': _digits_extractor,
    'shapes': _shapes_extractor,
    'inception': _inception_extractor,
  }[config.evaluate.feature_extractor]
  return make(config, out_dir)


def _digits_extractor(
  config: ml_collections.ConfigDict, out_dir: epath.PathLike
) -> FeatureExtractor:
  params, accuracy = digits_features.load_or_train(out_dir)
  return FeatureExtractor(
    name='digits',
    metric_name='FD-digits',
    extract=_batched(
      digits_features.make_apply_fn(params), config.evaluate.batch_size
    ),
    judge=functools.partial(_logit_scores, labels_are_classes=True),
    about={'classifier_test_accuracy': accuracy},
  )


def _shapes_extractor(
  config: ml_collections.ConfigDict, out_dir: epath.PathLike
) -> FeatureExtractor:
  params, accuracy = shapes_features.load_or_train(out_dir, config.data)
  return FeatureExtractor(
    name='shapes',
    metric_name='FD-shapes',
    extract=_batched(
      shapes_features.make_apply_fn(params), config.evaluate.batch_size
    ),
    judge=shapes_features.score,
    about={f'classifier_test_{k}': v for k, v in accuracy.items()},
  )


def _inception_extractor(
  config: ml_collections.ConfigDict, out_dir: epath.PathLike
) -> FeatureExtractor:
  del out_dir  # Inception is not trained: nothing to cache.
  # Imported here: building Inception pulls in more than digits needs.
  from gdd.evaluation import inception, inception_weights

  ev = config.evaluate
  # Each process embeds every image on its own devices: every process then
  # holds the same statistics, and no batch crosses hosts.
  feature_fn = inception.make_feature_fn(
    inception_weights.load_params(ev.inception_weights),
    ev.batch_size,
    devices=jax.local_devices(),
  )

  def extract(images: np.ndarray) -> dict[str, np.ndarray]:
    out = feature_fn(images)
    return {'features': out['pool'], 'logits': out['logits']}

  return FeatureExtractor(
    name='inception',
    metric_name='FID',
    extract=extract,
    # Inception's 1008 ImageNet logits are not CIFAR-10's labels.
    judge=functools.partial(_logit_scores, labels_are_classes=False),
    about={'weights': os.fspath(paths.resolve(ev.inception_weights))},
  )


def reference_size(config: ml_collections.ConfigDict) -> int:
  """Real examples behind the reference statistics."""
  ev = config.evaluate
  return min(ev.num_reference, data.split_size(config.data, ev.reference_split))


def reference_stats(
  config: ml_collections.ConfigDict,
  extractor: FeatureExtractor,
  out_dir: epath.PathLike,
) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of real features, computed once and cached.

  The cache name holds everything the statistics depend on (data set,
  split, size, extractor), so a changed setting computes new ones instead
  of reusing stale ones.
  """
  ev = config.evaluate
  num_examples = reference_size(config)
  path = paths.resolve(out_dir) / (
    f'reference_{config.data.name}_{ev.reference_split}_{num_examples}_'
    f'{extractor.name}.npz'
  )
  if path.exists():
    return fid.load_stats(path)
  real = data.eval_arrays(
    config.data, split=ev.reference_split, num_examples=num_examples
  )
  mu, sigma = fid.gaussian_stats(extractor.extract(real['image'])['features'])
  fid.save_stats(path, mu, sigma)
  return mu, sigma
