"""Per-example loss weightings, shared by every stage (method.md §3)."""

import jax.numpy as jnp

WEIGHTINGS = ('snr_trunc', 'v_mse', 'eps_mse')


def weighted_loss(
  x_pred: jnp.ndarray,
  x_target: jnp.ndarray,
  logsnr: jnp.ndarray,
  *,
  weighting: str,
) -> jnp.ndarray:
  """Per-example loss [B] between a predicted and a target x̂ at log-SNR λ.

  Every weighting is a multiple of the x-MSE, since at fixed z
  ε̂ − ε̃ = −(α/σ)(x̂ − x̃): snr_trunc = max(SNR, 1)·x-MSE (the max of the x-
  and ε-MSE), v_mse = (1 + SNR)·x-MSE, eps_mse = SNR·x-MSE. Computing it this
  way avoids dividing by σ → 0. Targets are never clipped.
  """
  x_mse = jnp.mean(
    jnp.square(x_pred - x_target), axis=tuple(range(1, x_pred.ndim))
  )
  snr = jnp.exp(jnp.asarray(logsnr, jnp.float32))
  if weighting == 'snr_trunc':
    return jnp.maximum(snr, 1.0) * x_mse
  if weighting == 'v_mse':
    return (1.0 + snr) * x_mse
  if weighting == 'eps_mse':
    return snr * x_mse
  raise ValueError(f'weighting={weighting!r}; allowed: {WEIGHTINGS}.')
