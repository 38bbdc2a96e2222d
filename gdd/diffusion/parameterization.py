"""Network output → (x̂, ε̂, v̂) for the x / eps / v / both parameterisations.

method.md §2: the output is first turned into x̂; ε̂ and v̂ are always derived
from x̂, so clipping x̂ at sampling time changes all three consistently.
"""

from typing import NamedTuple

import jax.numpy as jnp

from gdd.diffusion import schedules

MEAN_TYPES = ('x', 'eps', 'v', 'both')


class Prediction(NamedTuple):
  """Denoised estimates for one z_t: data x̂, noise ε̂ and velocity v̂."""

  x: jnp.ndarray
  eps: jnp.ndarray
  v: jnp.ndarray


def x_from_output(
  output: jnp.ndarray, z: jnp.ndarray, logsnr: jnp.ndarray, mean_type: str
) -> jnp.ndarray:
  """x̂ from the raw network output (`both` stacks (x̃, ε̃) on channels)."""
  alpha, sigma = schedules.alpha_sigma(schedules.broadcast_to_image(logsnr, z))
  output = output.astype(jnp.float32)
  if mean_type == 'x':
    return output
  if mean_type == 'eps':
    return (z - sigma * output) / alpha
  if mean_type == 'v':
    return alpha * z - sigma * output
  if mean_type == 'both':
    x_tilde, eps_tilde = jnp.split(output, 2, axis=-1)
    return jnp.square(sigma) * x_tilde + alpha * (z - sigma * eps_tilde)
  raise ValueError(f'mean_type={mean_type!r}; allowed: {MEAN_TYPES}.')


def eps_from_x(
  x: jnp.ndarray, z: jnp.ndarray, logsnr: jnp.ndarray
) -> jnp.ndarray:
  """ε̂ = (z − α x̂)/σ: the noise that maps x̂ to z at this log-SNR."""
  alpha, sigma = schedules.alpha_sigma(schedules.broadcast_to_image(logsnr, z))
  return (z - alpha * x) / sigma


def predict(
  output: jnp.ndarray,
  z: jnp.ndarray,
  logsnr: jnp.ndarray,
  *,
  mean_type: str,
  clip_x: bool = False,
) -> Prediction:
  """All three estimates; `clip_x` clips x̂ to [−1, 1] first (sampling only)."""
  x = x_from_output(output, z, logsnr, mean_type)
  if clip_x:
    x = jnp.clip(x, -1.0, 1.0)
  return prediction_from_x(x, z, logsnr)


def prediction_from_x(
  x: jnp.ndarray, z: jnp.ndarray, logsnr: jnp.ndarray
) -> Prediction:
  """(x̂, ε̂, v̂) from x̂ alone: v̂ = α ε̂ − σ x̂."""
  alpha, sigma = schedules.alpha_sigma(schedules.broadcast_to_image(logsnr, z))
  eps = eps_from_x(x, z, logsnr)
  return Prediction(x=x, eps=eps, v=alpha * eps - sigma * x)
