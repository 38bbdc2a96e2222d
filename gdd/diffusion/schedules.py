"""Noise schedule of the variance-preserving forward process (method.md §1).

Everything is a function of the log signal-to-noise ratio λ = log(α²/σ²):
α² = sigmoid(λ), σ² = sigmoid(−λ). Time t ∈ [0, 1] maps to λ through the
clipped cosine schedule, t = 0 ↦ λ_max (clean), t = 1 ↦ λ_min (pure noise),
or through Stable Diffusion's discrete schedule (`sd_logsnr_from_t`,
method.md §11). All arithmetic is float32, whatever dtype the network runs
in.
"""

import jax.numpy as jnp
import numpy as np
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


# Stable Diffusion 1.x / 2.x's discrete DDPM schedule ("scaled_linear").
SD_NUM_TIMESTEPS = 1000
SD_BETA_START = 0.00085
SD_BETA_END = 0.012


def sd_logsnr_table() -> np.ndarray:
  """λ_i = log(ᾱ_i / (1 − ᾱ_i)) of SD's timesteps i = 0..999, float64.

  β_i = linspace(√β_start, √β_end, 1000)², ᾱ_i = ∏_{j ≤ i} (1 − β_j): λ
  falls from ≈ 7.1 (i = 0) to ≈ −5.4 (i = 999; SD's terminal SNR is not 0).
  diffusers computes the same in float32; the two agree to ~1e-6.
  """
  betas = (
    np.linspace(
      SD_BETA_START**0.5, SD_BETA_END**0.5, SD_NUM_TIMESTEPS, dtype=np.float64
    )
    ** 2
  )
  alphas_cumprod = np.cumprod(1.0 - betas)
  return np.log(alphas_cumprod) - np.log1p(-alphas_cumprod)


def _sd_knots() -> tuple[np.ndarray, np.ndarray]:
  """(t, λ) knots of `sd_logsnr_from_t`: t = 0 and t = (i + 1)/1000."""
  t = np.arange(SD_NUM_TIMESTEPS + 1, dtype=np.float64) / SD_NUM_TIMESTEPS
  logsnr = np.concatenate([[LOGSNR_MAX], sd_logsnr_table()])
  return t.astype(np.float32), logsnr.astype(np.float32)


def sd_logsnr_from_t(t: jnp.ndarray) -> jnp.ndarray:
  """λ(t) of SD's schedule: linear between its timesteps, t = (i + 1)/1000.

  method.md §11 maps t ∈ [0, 1] to i ∈ [0, 999]; gdd shifts that by one
  step, t = (i + 1)/1000, so that the grid t = k/N of an N-step student
  (N dividing 1000: 1, 2, 4, 8) is SD's integer timesteps 1000k/N − 1 —
  diffusers' DDIMScheduler with timestep_spacing='trailing' — and t = 0 is
  clean (λ = LOGSNR_MAX), DDIM's `set_alpha_to_one` last step. A student
  exported at a fixed w (gdd/weights/stable_diffusion.py) then samples in
  diffusers on its own grid.
  """
  knots_t, knots_logsnr = _sd_knots()
  return jnp.interp(jnp.asarray(t, jnp.float32), knots_t, knots_logsnr)


def sd_timestep(logsnr: jnp.ndarray) -> jnp.ndarray:
  """SD's timestep of a log-SNR: i where λ_i = λ, linear in between.

  The time input of an SD network (`SDUNetConfig.time_input='sd'`);
  clipped to [0, 999], the range SD was trained on (λ above λ_0, between
  t = 1/1000 and clean, reads as timestep 0).
  """
  table = sd_logsnr_table().astype(np.float32)
  steps = np.arange(SD_NUM_TIMESTEPS, dtype=np.float32)
  # interp needs increasing knots: −λ_i increases with i.
  return jnp.interp(-jnp.asarray(logsnr, jnp.float32), -table, steps)


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
