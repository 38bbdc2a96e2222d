"""Feature extractors for Fréchet distances, and cached reference statistics.

Two extractors share one interface and one scoring path: Inception-v3 (pool3
features → FID, logits → IS) for natural images, and the digits classifier
(penultimate features → FD-digits, logits → class accuracy and an IS-like
score) for the embedded digits default.
"""

import dataclasses
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from etils import epath

from gdd import config_lib, data, errors, paths
from gdd.evaluation import digits_features, fid

ExtractFn = Callable[[np.ndarray], dict[str, np.ndarray]]


class WeightsNotFoundError(errors.UserError, FileNotFoundError):
  """config.evaluate.inception_weights names no file; says how to make it."""


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
  """images [N, H, W, C] in [−1, 1] → {'features' [N, D], 'logits' [N, K]}."""

  name: str
  metric_name: str  # What the Fréchet distance is called in reports.
  extract: ExtractFn
  # True when logit k means the data set's class k (class accuracy makes
  # sense); Inception's 1008 ImageNet logits are not CIFAR-10's labels.
  labels_are_classes: bool
  about: dict  # Facts reported with the results (e.g. its test accuracy).


def check_config(config: ml_collections.ConfigDict) -> None:
  """Cheap checks of the extractor settings; fails before any sampling."""
  ev = config.evaluate
  if ev.feature_extractor == 'digits' and config.data.name != data.DIGITS:
    raise config_lib.ConfigError(
      "config.evaluate.feature_extractor='digits' scores digits only; use "
      "'inception' (with config.evaluate.inception_weights) for "
      f'{config.data.name!r}.'
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


def make_extractor(
  config: ml_collections.ConfigDict, out_dir: epath.PathLike
) -> FeatureExtractor:
  """The extractor `config.evaluate.feature_extractor` names."""
  ev = config.evaluate
  if ev.feature_extractor == 'digits':
    params, accuracy = digits_features.load_or_train(out_dir)
    return FeatureExtractor(
      name='digits',
      metric_name='FD-digits',
      extract=_batched(digits_features.make_apply_fn(params), ev.batch_size),
      labels_are_classes=True,
      about={'classifier_test_accuracy': accuracy},
    )
  # Imported here: building Inception pulls in more than digits needs.
  from gdd.evaluation import inception, inception_weights

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
    labels_are_classes=False,
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
