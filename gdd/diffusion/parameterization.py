"""Network output → x̂ (and ε̂) for the x / eps / v / both parameterisations.

method.md §2: every parameterisation is turned into x̂ here; losses,
guidance and samplers work on x̂ alone (ε̂ = (z − α x̂)/σ and v̂ follow from
it), so clipping x̂ at sampling time changes every estimate consistently.
Encoding (method.md §9) needs ε̂ near t = 0, where dividing by σ ≈ 4.5e-5
would amplify x̂'s rounding; `eps_from_output` gives the same ε̂ without
that division wherever the parameterisation allows.
"""

import jax.numpy as jnp

from gdd.diffusion import schedules

MEAN_TYPES = ('x', 'eps', 'v', 'both')


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


def eps_from_output(
  output: jnp.ndarray, z: jnp.ndarray, logsnr: jnp.ndarray, mean_type: str
) -> jnp.ndarray:
  """ε̂ = (z − α x̂)/σ of `x_from_output`'s x̂, written without dividing by σ.

  Substituting each x̂ into (z − α x̂)/σ: `eps` gives ε̂ = f, `v` gives
  ε̂ = σ z + α v̂, `both` gives ε̂ = σ (z − α x̃) + α² ε̃; all three are well
  conditioned as σ → 0. `x` has no such form: ε̂ = (z − α f)/σ divides
  the network's x error by σ (encoding refuses x models for that reason).
  """
  alpha, sigma = schedules.alpha_sigma(schedules.broadcast_to_image(logsnr, z))
  output = output.astype(jnp.float32)
  if mean_type == 'x':
    return (z - alpha * output) / sigma
  if mean_type == 'eps':
    return output
  if mean_type == 'v':
    return sigma * z + alpha * output
  if mean_type == 'both':
    x_tilde, eps_tilde = jnp.split(output, 2, axis=-1)
    return sigma * (z - alpha * x_tilde) + jnp.square(alpha) * eps_tilde
  raise ValueError(f'mean_type={mean_type!r}; allowed: {MEAN_TYPES}.')
