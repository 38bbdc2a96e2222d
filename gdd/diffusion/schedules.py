"""Noise schedule of the variance-preserving forward process (method.md §1).

Everything is a function of the log signal-to-noise ratio λ = log(α²/σ²):
α² = sigmoid(λ), σ² = sigmoid(−λ). Time t ∈ [0, 1] maps to λ through the
clipped cosine schedule, t = 0 ↦ λ_max (clean), t = 1 ↦ λ_min (pure noise).
All arithmetic is float32, whatever dtype the network runs in.
"""

import jax.numpy as jnp
from jax import nn

LOGSNR_MIN = -20.0
LOGSNR_MAX = 20.0


def logsnr_from_t(
  t: jnp.ndarray,
  *,
  logsnr_min: float = LOGSNR_MIN,
  logsnr_max: float = LOGSNR_MAX,
) -> jnp.ndarray:
  """Cosine log-SNR schedule λ(t) = −2 log tan(a t + b), clipped to range."""
  t = jnp.asarray(t, jnp.float32)
  b = jnp.arctan(jnp.exp(-0.5 * logsnr_max))
  a = jnp.arctan(jnp.exp(-0.5 * logsnr_min)) - b
  logsnr = -2.0 * jnp.log(jnp.tan(a * t + b))
  # float32 tan near π/2 overshoots the ends slightly; clip to the range.
  return jnp.clip(logsnr, logsnr_min, logsnr_max)


def time_input(logsnr: jnp.ndarray) -> jnp.ndarray:
  """Network time input t_in = arctan(exp(−λ/2)) / (π/2), which is ≈ t."""
  logsnr = jnp.asarray(logsnr, jnp.float32)
  return jnp.arctan(jnp.exp(-0.5 * logsnr)) / (0.5 * jnp.pi)


def alpha_sigma(logsnr: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(α, σ) for a log-SNR; the square roots of sigmoid(±λ)."""
  logsnr = jnp.asarray(logsnr, jnp.float32)
  return jnp.sqrt(nn.sigmoid(logsnr)), jnp.sqrt(nn.sigmoid(-logsnr))


def sigma_ratio(
  logsnr_from: jnp.ndarray, logsnr_to: jnp.ndarray
) -> jnp.ndarray:
  """σ_to / σ_from without dividing two tiny numbers.

  log σ² = −softplus(λ), so σ_to/σ_from = exp(½(softplus(λ_from) −
  softplus(λ_to))).
  """
  return jnp.exp(0.5 * (nn.softplus(logsnr_from) - nn.softplus(logsnr_to)))


def alpha_ratio(
  logsnr_from: jnp.ndarray, logsnr_to: jnp.ndarray
) -> jnp.ndarray:
  """α_to / α_from, computed in log space (log α² = −softplus(−λ))."""
  return jnp.exp(0.5 * (nn.softplus(-logsnr_from) - nn.softplus(-logsnr_to)))


def diffuse(
  x: jnp.ndarray, noise: jnp.ndarray, logsnr: jnp.ndarray
) -> jnp.ndarray:
  """Sample z_t = α x + σ ε from q(z_t | x); logsnr has shape [B]."""
  alpha, sigma = alpha_sigma(broadcast_to_image(logsnr, x))
  return alpha * x + sigma * noise


def transition_variance(
  logsnr_s: jnp.ndarray, logsnr_t: jnp.ndarray
) -> jnp.ndarray:
  """Variance σ²_{t|s} = (1 − e^{λ_t − λ_s}) σ_t² of q(z_t | z_s), s < t."""
  _, sigma_t = alpha_sigma(logsnr_t)
  return -jnp.expm1(logsnr_t - logsnr_s) * jnp.square(sigma_t)


def broadcast_to_image(per_example: jnp.ndarray, image: jnp.ndarray):
  """Reshape a [B] (or scalar) array so it broadcasts against [B, H, W, C]."""
  per_example = jnp.asarray(per_example, jnp.float32)
  if per_example.ndim == 0:
    return per_example
  return per_example.reshape(per_example.shape + (1,) * (image.ndim - 1))
