"""FID, Inception Score and the statistics cache, against closed forms."""

import os

import numpy as np
import pytest
from scipy import special, stats

from gdd.evaluation import fid


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def _fd_by_eigendecomposition(mu1, sigma1, mu2, sigma2) -> float:
  """Tr((Σ1Σ2)^½) = Tr((Σ1^½ Σ2 Σ1^½)^½): symmetric, so eigh suffices."""
  w, v = np.linalg.eigh(sigma1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
  tr_covmean = np.sum(np.sqrt(np.clip(inner, 0, None)))
  diff = mu1 - mu2
  return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean


def test_gaussian_stats_are_float64_mean_and_sample_covariance():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(50, 4)).astype(np.float32)
  mu, sigma = fid.gaussian_stats(feats)
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(mu, feats.astype(np.float64).mean(0))
  centred = feats.astype(np.float64) - mu
  np.testing.assert_allclose(sigma, centred.T @ centred / 49, atol=1e-12)
  with pytest.raises(ValueError, match=r'\[N, D\]'):
    fid.gaussian_stats(feats[0])
  with pytest.raises(ValueError, match='at least 2 samples'):
    fid.gaussian_stats(feats[:1])


def test_frechet_distance_of_a_set_with_itself_is_zero():
  feats = np.random.default_rng(1).normal(size=(400, 32))
  mu, sigma = fid.gaussian_stats(feats)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
  # ...and a different set is far from it: the function is not constant.
  mu2, sigma2 = fid.gaussian_stats(2.0 * feats + 1.0)
  assert fid.frechet_distance(mu, sigma, mu2, sigma2) > 10.0


def test_frechet_distance_diagonal_closed_form():
  rng = np.random.default_rng(2)
  d = 16
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  got = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
  assert expected > 1.0
  assert isinstance(got, float)
  np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_distance_non_diagonal_matches_eigendecomposition():
  rng = np.random.default_rng(3)
  d = 24
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  sigma1, sigma2 = _random_spd(rng, d), _random_spd(rng, d)
  # Σ1Σ2 is not symmetric here, so sqrtm really works on a general matrix.
  assert not np.allclose(sigma1 @ sigma2, (sigma1 @ sigma2).T)
  expected = _fd_by_eigendecomposition(mu1, sigma1, mu2, sigma2)
  got = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
  np.testing.assert_allclose(got, expected, rtol=1e-8)
  # Symmetric in its two arguments.
  np.testing.assert_allclose(
    fid.frechet_distance(mu2, sigma2, mu1, sigma1), expected, rtol=1e-8
  )


def test_frechet_distance_with_rank_deficient_covariances():
  # Fewer samples than dimensions, as with small sample sets and 2048-d
  # features: both covariances are singular.
  rng = np.random.default_rng(4)
  mu1, sigma1 = fid.gaussian_stats(rng.normal(size=(10, 40)))
  mu2, sigma2 = fid.gaussian_stats(rng.normal(size=(10, 40)) + 0.5)
  got = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
  expected = _fd_by_eigendecomposition(mu1, sigma1, mu2, sigma2)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_frechet_distance_adds_eps_when_sqrtm_is_not_finite(monkeypatch):
  rng = np.random.default_rng(5)
  d = 8
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  sigma1, sigma2 = _random_spd(rng, d), _random_spd(rng, d)
  real_sqrtm = fid.linalg.sqrtm
  calls = []

  def flaky_sqrtm(a):
    calls.append(a)
    return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

  monkeypatch.setattr(fid.linalg, 'sqrtm', flaky_sqrtm)
  eps = 1e-2
  got = fid.frechet_distance(mu1, sigma1, mu2, sigma2, eps=eps)
  assert len(calls) == 2
  offset = eps * np.eye(d)
  np.testing.assert_allclose(
    calls[1], (sigma1 + offset) @ (sigma2 + offset), rtol=1e-12
  )
  diff = mu1 - mu2
  expected = (
    diff @ diff
    + np.trace(sigma1)
    + np.trace(sigma2)
    - 2 * np.trace(real_sqrtm((sigma1 + offset) @ (sigma2 + offset)).real)
  )
  np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_distance_rejects_large_imaginary_part(monkeypatch):
  d = 4
  eye = np.eye(d)
  monkeypatch.setattr(fid.linalg, 'sqrtm', lambda a: eye + 0.5j * eye)
  with pytest.raises(ValueError, match='imaginary'):
    fid.frechet_distance(np.zeros(d), eye, np.zeros(d), eye)
  # Round-off-sized imaginary parts are dropped.
  monkeypatch.setattr(fid.linalg, 'sqrtm', lambda a: eye + 1e-9j * eye)
  assert abs(fid.frechet_distance(np.zeros(d), eye, np.zeros(d), eye)) < 1e-12


def test_frechet_distance_shape_errors():
  mu, sigma = np.zeros(4), np.eye(4)
  with pytest.raises(ValueError, match='different feature dimensions'):
    fid.frechet_distance(mu, sigma, np.zeros(5), np.eye(5))
  with pytest.raises(ValueError, match='sigma1 must have shape'):
    fid.frechet_distance(mu, np.eye(3), mu, sigma)
  with pytest.raises(ValueError, match='sigma2 must have shape'):
    fid.frechet_distance(mu, sigma, mu, np.ones((4, 5)))
  with pytest.raises(ValueError, match='mu1 must have shape'):
    fid.frechet_distance(np.zeros((4, 1)), sigma, mu, sigma)


def _one_hot_probs(num: int, num_classes: int) -> np.ndarray:
  return np.eye(num_classes)[np.arange(num) % num_classes]


def test_inception_score_is_one_for_constant_predictions():
  logits = np.tile(np.random.default_rng(6).normal(size=(1, 7)), (100, 1))
  mean, std = fid.inception_score(logits, num_splits=5)
  np.testing.assert_allclose(mean, 1.0, atol=1e-12)
  assert std < 1e-12


def test_inception_score_is_num_classes_for_confident_uniform_predictions():
  num_classes = 10
  probs = _one_hot_probs(1000, num_classes)
  mean, std = fid.inception_score(probs, num_splits=10, from_logits=False)
  np.testing.assert_allclose(mean, num_classes, rtol=1e-12)
  assert std < 1e-9
  # Near-one-hot softmax of logits gives the same score.
  mean, _ = fid.inception_score(60.0 * probs, num_splits=10)
  np.testing.assert_allclose(mean, num_classes, rtol=1e-9)


def test_inception_score_splits_are_scored_separately():
  # Split 1: confident over 8 classes (IS 8); split 2: constant (IS 1).
  num_classes = 8
  confident = _one_hot_probs(40, num_classes)
  constant = np.tile(np.full(num_classes, 1.0 / num_classes), (40, 1))
  probs = np.concatenate([confident, constant])
  mean, std = fid.inception_score(probs, num_splits=2, from_logits=False)
  np.testing.assert_allclose(mean, (8 + 1) / 2, rtol=1e-12)
  np.testing.assert_allclose(std, (8 - 1) / 2, rtol=1e-12)
  # As one split the score is exp of the pooled mean KL, exp(½ log 8) = √8,
  # not the mean of the per-split scores.
  pooled, pooled_std = fid.inception_score(
    probs, num_splits=1, from_logits=False
  )
  assert pooled_std == 0.0
  np.testing.assert_allclose(pooled, np.sqrt(8), rtol=1e-12)


def test_inception_score_matches_direct_kl_and_probability_input():
  rng = np.random.default_rng(7)
  logits = 3.0 * rng.normal(size=(90, 12))
  probs = special.softmax(logits, axis=1)
  expected = []
  for part in np.array_split(probs, 3):  # 90 / 3: same contiguous parts.
    py = part.mean(axis=0)
    kl = [stats.entropy(p, py) for p in part]
    expected.append(np.exp(np.mean(kl)))
  mean, std = fid.inception_score(logits, num_splits=3)
  np.testing.assert_allclose(mean, np.mean(expected), rtol=1e-10)
  np.testing.assert_allclose(std, np.std(expected), rtol=1e-8)
  mean_p, std_p = fid.inception_score(probs, num_splits=3, from_logits=False)
  np.testing.assert_allclose([mean_p, std_p], [mean, std], rtol=1e-8)
  assert 1.0 < mean < 12.0


def test_inception_score_errors():
  with pytest.raises(ValueError, match='at least num_splits=10 samples'):
    fid.inception_score(np.zeros((9, 5)), num_splits=10)
  with pytest.raises(ValueError, match=r'\[N, C\]'):
    fid.inception_score(np.zeros(20))
  with pytest.raises(ValueError, match='summing to 1'):
    fid.inception_score(np.ones((20, 5)), num_splits=2, from_logits=False)
  with pytest.raises(ValueError, match='>= 0'):
    probs = np.full((20, 2), 0.5)
    probs[0] = [1.5, -0.5]
    fid.inception_score(probs, num_splits=2, from_logits=False)


def test_stats_cache_round_trips(tmp_path):
  rng = np.random.default_rng(8)
  mu, sigma = fid.gaussian_stats(rng.normal(size=(30, 6)))
  path = tmp_path / 'sub' / 'ref_stats.npz'
  fid.save_stats(path, mu, sigma, num_samples=30, dataset='digits')
  loaded_mu, loaded_sigma = fid.load_stats(path)
  np.testing.assert_array_equal(loaded_mu, mu)
  np.testing.assert_array_equal(loaded_sigma, sigma)
  with np.load(path) as data:
    assert int(data['num_samples']) == 30
    assert str(data['dataset']) == 'digits'
  # Overwriting replaces the file and leaves no temporary files behind.
  fid.save_stats(path, mu + 1.0, sigma)
  np.testing.assert_array_equal(fid.load_stats(path)[0], mu + 1.0)
  assert os.listdir(path.parent) == ['ref_stats.npz']


def test_stats_cache_errors(tmp_path):
  with pytest.raises(ValueError, match='reserved'):
    fid.save_stats(tmp_path / 'a.npz', np.zeros(2), np.eye(2), mu=1)
  with pytest.raises(ValueError, match='sigma must have shape'):
    fid.save_stats(tmp_path / 'a.npz', np.zeros(2), np.eye(3))
  np.savez(tmp_path / 'b.npz', mu=np.zeros(2))
  with pytest.raises(ValueError, match=r"missing \['sigma'\]"):
    fid.load_stats(tmp_path / 'b.npz')
