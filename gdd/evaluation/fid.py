"""FID and Inception Score from Inception features: pure numpy, float64.

The formulas follow the reference implementations the published numbers come
from, so scores computed here are comparable with papers:

- Fréchet distance: TTUR (`bioinf-jku/TTUR`, `fid.py`) and pytorch-fid
  (`src/pytorch_fid/fid_score.py`): `scipy.linalg.sqrtm` of Σ1·Σ2, an ε·I
  offset when that product is numerically singular, and the imaginary part
  dropped only when it is round-off.
- Inception Score: Salimans et al. 2016 (`openai/improved-gan`,
  `inception_score/model.py`): exp E_x KL(p(y|x) || p(y)) per split, mean and
  standard deviation over `num_splits` contiguous splits.

Reference statistics of a data set (μ, Σ of its pool3 features) are cached as
`.npz` files with `save_stats` / `load_stats`.
"""

from typing import Any

import numpy as np
from etils import epath
from scipy import linalg, special

from gdd.evaluation import npz

# Largest imaginary part (on the diagonal of sqrtm(Σ1·Σ2)) still treated as
# round-off; pytorch-fid and TTUR use the same tolerance.
_IMAG_ATOL = 1e-3


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and covariance [D, D] (unbiased, rows are samples) in float64.

  Args:
    features: [N, D] activations, e.g. Inception pool3 features; N >= 2.

  Returns:
    (mu, sigma), both float64.
  """
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2:
    raise ValueError(
      f'features must have shape [N, D]; got shape {features.shape}.'
    )
  if features.shape[0] < 2:
    raise ValueError(
      'A covariance needs at least 2 samples; got '
      f'{features.shape[0]} (features shape {features.shape}).'
    )
  mu = features.mean(axis=0)
  sigma = np.cov(features, rowvar=False)
  return mu, np.atleast_2d(sigma)


def _check_stats(mu: np.ndarray, sigma: np.ndarray, which: str) -> None:
  if mu.ndim != 1:
    raise ValueError(f'mu{which} must have shape [D]; got shape {mu.shape}.')
  d = mu.shape[0]
  if sigma.shape != (d, d):
    raise ValueError(
      f'sigma{which} must have shape [D, D] = {(d, d)} to match '
      f'mu{which}; got shape {sigma.shape}.'
    )


def frechet_distance(
  mu1: np.ndarray,
  sigma1: np.ndarray,
  mu2: np.ndarray,
  sigma2: np.ndarray,
  eps: float = 1e-6,
) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

  d² = ||mu1 − mu2||² + Tr(sigma1 + sigma2 − 2·(sigma1·sigma2)^½).

  With fewer samples than feature dimensions the covariances are singular and
  sqrtm can fail; then, as in TTUR, eps is added to both diagonals.

  Args:
    mu1: [D] mean of the first set (e.g. generated samples).
    sigma1: [D, D] covariance of the first set.
    mu2: [D] mean of the second set (e.g. reference data).
    sigma2: [D, D] covariance of the second set.
    eps: diagonal offset used only when the product is singular.

  Returns:
    The distance as a Python float (FID when the inputs are pool3 stats).

  Raises:
    ValueError: on mismatched shapes, or if sqrtm's result has an imaginary
      part too large to be round-off.
  """
  mu1, sigma1, mu2, sigma2 = _checked_stats_pair(mu1, sigma1, mu2, sigma2)
  diff = mu1 - mu2
  covmean = _sqrtm_of_product(sigma1, sigma2, eps)
  return float(
    diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
  )


def _checked_stats_pair(
  mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Both (mu, sigma) as float64, checked to be Gaussians of one dimension."""
  mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
  _check_stats(mu1, sigma1, '1')
  _check_stats(mu2, sigma2, '2')
  if mu1.shape != mu2.shape:
    raise ValueError(
      'The two sets of statistics have different feature dimensions: '
      f'mu1 {mu1.shape} vs mu2 {mu2.shape}. Were they computed with the same '
      'feature extractor (pool3 features are 2048-d)?'
    )
  return mu1, sigma1, mu2, sigma2


def _sqrtm_of_product(
  sigma1: np.ndarray, sigma2: np.ndarray, eps: float
) -> np.ndarray:
  """Real (sigma1·sigma2)^½, eps on both diagonals if the product is singular.

  Raises:
    ValueError: the root is not finite even with eps, or has an imaginary
      part too large to be round-off.
  """
  covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if not np.isfinite(covmean).all():
      raise ValueError(
        'sqrtm(sigma1 @ sigma2) is not finite even after adding '
        f'eps={eps} to the diagonals; check the statistics for NaN/inf.'
      )
  if not np.iscomplexobj(covmean):
    return covmean
  # Only the trace enters the distance, so the diagonal decides whether the
  # imaginary part is round-off (as in pytorch-fid and TTUR).
  max_imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
  if max_imag > _IMAG_ATOL:
    raise ValueError(
      'sqrtm(sigma1 @ sigma2) has a non-negligible imaginary component '
      f'(max |imag| on the diagonal = {max_imag:.3g} > {_IMAG_ATOL}); the '
      'covariances are probably not positive semi-definite or are badly '
      'conditioned. Use more samples or check the features.'
    )
  return covmean.real


def inception_score(
  predictions: np.ndarray,
  num_splits: int = 10,
  *,
  from_logits: bool = True,
) -> tuple[float, float]:
  """Inception Score: mean and std over splits of exp E_x KL(p(y|x) || p(y)).

  The samples are cut into `num_splits` contiguous parts, as in the reference
  code; p(y) is the mean prediction within each part.

  Args:
    predictions: [N, C] classifier outputs: logits (the default) or, with
      `from_logits=False`, probabilities whose rows sum to 1.
    num_splits: number of parts; the std over parts is the reported error.
    from_logits: whether `predictions` are logits (softmax is applied).

  Returns:
    (mean, std) over the splits. 1 is the minimum (all predictions equal);
    C is the maximum (confident predictions spread evenly over C classes).
  """
  preds = np.asarray(predictions, dtype=np.float64)
  _check_predictions(preds, num_splits)
  log_p = _log_probabilities(preds, from_logits)
  n = preds.shape[0]
  scores = [
    _split_score(log_p[i * n // num_splits : (i + 1) * n // num_splits])
    for i in range(num_splits)
  ]
  return float(np.mean(scores)), float(np.std(scores))


def _check_predictions(preds: np.ndarray, num_splits: int) -> None:
  """[N, C] finite predictions, at least one per split."""
  if preds.ndim != 2:
    raise ValueError(
      f'predictions must have shape [N, C]; got shape {preds.shape}.'
    )
  n = preds.shape[0]
  if num_splits < 1:
    raise ValueError(f'num_splits must be >= 1; got {num_splits}.')
  if n < num_splits:
    raise ValueError(
      f'Inception Score needs at least num_splits={num_splits} samples (one '
      f'per split); got {n}. Use more samples or fewer splits.'
    )
  if not np.isfinite(preds).all():
    raise ValueError('predictions contain NaN or inf.')


def _log_probabilities(preds: np.ndarray, from_logits: bool) -> np.ndarray:
  """log p(y|x) [N, C] from logits or from rows of probabilities."""
  if from_logits:
    return special.log_softmax(preds, axis=1)
  if (preds < 0).any():
    raise ValueError(
      'predictions with from_logits=False must be probabilities (>= 0); '
      'pass from_logits=True for logits.'
    )
  row_sums = preds.sum(axis=1)
  if not np.allclose(row_sums, 1.0, atol=1e-3):
    raise ValueError(
      'predictions with from_logits=False must have rows summing to 1; '
      f'row sums range over [{row_sums.min():.4g}, {row_sums.max():.4g}]. '
      'Pass from_logits=True for logits.'
    )
  with np.errstate(divide='ignore'):
    return np.log(preds / row_sums[:, None])


def _split_score(log_p: np.ndarray) -> float:
  """exp E_x KL(p(y|x) || p(y)) over one split; p(y) is its mean prediction."""
  # log p(y) = log mean_x p(y|x), computed in log space for tiny p.
  log_py = special.logsumexp(log_p, axis=0) - np.log(log_p.shape[0])
  p = np.exp(log_p)
  # 0·log 0 = 0: classes with p(y|x) = 0 contribute nothing (their
  # −inf − log p(y) is computed, then discarded).
  with np.errstate(invalid='ignore'):
    terms = p * np.where(p > 0, log_p - log_py[None, :], 0.0)
  return float(np.exp(np.mean(np.sum(terms, axis=1))))


def save_stats(
  path: epath.PathLike,
  mu: np.ndarray,
  sigma: np.ndarray,
  /,
  **metadata: Any,
) -> None:
  """Writes reference statistics to an `.npz`, atomically.

  The file is written under a temporary name in the same directory and then
  renamed, so an interrupted run never leaves a truncated cache that a later
  run would trust.

  Args:
    path: destination (`.npz` is not appended; pass the full name).
    mu: [D] feature mean.
    sigma: [D, D] feature covariance.
    **metadata: extra arrays or scalars to store alongside (e.g. num_samples,
      dataset name); the names `mu` and `sigma` are reserved (the three
      arguments above are positional-only so any name reaches this check).
  """
  mu = np.asarray(mu, dtype=np.float64)
  sigma = np.asarray(sigma, dtype=np.float64)
  _check_stats(mu, sigma, '')
  reserved = {'mu', 'sigma'} & set(metadata)
  if reserved:
    raise ValueError(f'metadata may not use the reserved names {reserved}.')
  npz.atomic_savez(path, mu=mu, sigma=sigma, **metadata)


def load_stats(path: epath.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Reads (mu, sigma) written by `save_stats` (or pytorch-fid's `.npz`)."""
  data = npz.load(path)
  missing = {'mu', 'sigma'} - set(data)
  if missing:
    raise ValueError(
      f'{path} is not a statistics file: missing {sorted(missing)} '
      f'(has {sorted(data)}).'
    )
  mu = data['mu'].astype(np.float64)
  sigma = data['sigma'].astype(np.float64)
  _check_stats(mu, sigma, '')
  return mu, sigma
