"""DDIM step and the deterministic, stochastic and ancestral samplers (§7).

A sampler takes `denoise_fn(z, logsnr) -> x̂`, the model's (already guided,
unclipped) data estimate, and loops over a uniform time grid with spacing 1/N
inside one `lax.fori_loop`, so a jitted sampler compiles once per step count.
x̂ is clipped to [−1, 1] before each step when `clip_x` is set.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from gdd import checks
from gdd.diffusion import schedules

DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
LogsnrFn = Callable[[jnp.ndarray], jnp.ndarray]


def ddim_step(
  z_t: jnp.ndarray,
  x_hat: jnp.ndarray,
  logsnr_t: jnp.ndarray,
  logsnr_s: jnp.ndarray,
) -> jnp.ndarray:
  """z_s = α_s x̂ + σ_s (z_t − α_t x̂)/σ_t, for any s (earlier or later)."""
  logsnr_t = schedules.broadcast_to_image(logsnr_t, z_t)
  logsnr_s = schedules.broadcast_to_image(logsnr_s, z_t)
  alpha_t, _ = schedules.alpha_sigma(logsnr_t)
  alpha_s, _ = schedules.alpha_sigma(logsnr_s)
  ratio = schedules.sigma_ratio(logsnr_t, logsnr_s)
  return alpha_s * x_hat + ratio * (z_t - alpha_t * x_hat)


def _grid_logsnr(
  logsnr_fn: LogsnrFn, t: jnp.ndarray, batch_size: int
) -> jnp.ndarray:
  return jnp.full((batch_size,), logsnr_fn(t), jnp.float32)


def _check_num_steps(num_steps: int, minimum: int = 1) -> None:
  if not checks.is_int(num_steps, minimum):
    raise ValueError(
      f'num_steps={num_steps!r}; must be an int >= {minimum} (it is static '
      'and fixes the time grid).'
    )


def _run_grid(
  denoise_fn: DenoiseFn,
  noise: jnp.ndarray,
  update: Callable[..., jnp.ndarray],
  *,
  num_steps: int,
  logsnr_fn: LogsnrFn,
  clip_x: bool,
) -> jnp.ndarray:
  """Shared loop: t = 1, 1 − 1/N, …, 2/N call `update`; t = 1/N returns x̂.

  `update(i, z_t, x_hat, grid)` returns the next z, where `grid(time)` gives
  the per-example log-SNR of a time.
  """
  batch = noise.shape[0]
  grid = lambda time: _grid_logsnr(logsnr_fn, time, batch)

  def denoise(z, logsnr):
    x_hat = denoise_fn(z, logsnr).astype(jnp.float32)
    return jnp.clip(x_hat, -1.0, 1.0) if clip_x else x_hat

  def body(i, z):
    t = 1.0 - i / num_steps
    return update(i, z, denoise(z, grid(t)), t, grid)

  z = jax.lax.fori_loop(0, num_steps - 1, body, noise.astype(jnp.float32))
  return denoise(z, grid(jnp.float32(1.0 / num_steps)))


def ddim_sample(
  denoise_fn: DenoiseFn,
  noise: jnp.ndarray,
  *,
  num_steps: int,
  logsnr_fn: LogsnrFn = schedules.logsnr_from_t,
  clip_x: bool = True,
) -> jnp.ndarray:
  """Deterministic N-step DDIM from z_1 = noise; N network calls.

  Steps t = 1, 1 − 1/N, …, 1/N; each moves to s = t − 1/N, and the last one
  returns x̂ itself.
  """
  _check_num_steps(num_steps)

  def update(i, z, x_hat, t, grid):
    del i
    return ddim_step(z, x_hat, grid(t), grid(t - 1.0 / num_steps))

  return _run_grid(
    denoise_fn,
    noise,
    update,
    num_steps=num_steps,
    logsnr_fn=logsnr_fn,
    clip_x=clip_x,
  )


def stochastic_sample(
  denoise_fn: DenoiseFn,
  noise: jnp.ndarray,
  rng: jax.Array,
  *,
  num_steps: int,
  logsnr_fn: LogsnrFn = schedules.logsnr_from_t,
  clip_x: bool = True,
) -> jnp.ndarray:
  """GD's stochastic N-step sampler (Eq. 5); N network calls.

  From t, a deterministic DDIM jump of length 2/N to k = t − 2/N, then
  re-noising forward to s = t − 1/N with q(z_s | z_k); from t = 1/N one
  deterministic step to 0. `denoise_fn` should be the model distilled for
  N/2 steps: its jumps have that step length.
  """
  _check_num_steps(num_steps, minimum=2)

  def update(i, z, x_hat, t, grid):
    logsnr_k = grid(t - 2.0 / num_steps)
    z_k = ddim_step(z, x_hat, grid(t), logsnr_k)
    logsnr_s = grid(t - 1.0 / num_steps)
    return renoise(z_k, logsnr_k, logsnr_s, jax.random.fold_in(rng, i))

  return _run_grid(
    denoise_fn,
    noise,
    update,
    num_steps=num_steps,
    logsnr_fn=logsnr_fn,
    clip_x=clip_x,
  )


def renoise(
  z_k: jnp.ndarray, logsnr_k: jnp.ndarray, logsnr_s: jnp.ndarray, rng
) -> jnp.ndarray:
  """Sample q(z_s | z_k) for s later (noisier) than k."""
  logsnr_k = schedules.broadcast_to_image(logsnr_k, z_k)
  logsnr_s = schedules.broadcast_to_image(logsnr_s, z_k)
  mean = schedules.alpha_ratio(logsnr_k, logsnr_s) * z_k
  std = jnp.sqrt(schedules.transition_variance(logsnr_k, logsnr_s))
  return mean + std * jax.random.normal(rng, z_k.shape, z_k.dtype)


def ancestral_sample(
  denoise_fn: DenoiseFn,
  noise: jnp.ndarray,
  rng: jax.Array,
  *,
  num_steps: int,
  logsnr_fn: LogsnrFn = schedules.logsnr_from_t,
  clip_x: bool = True,
  gamma: float = 0.3,
) -> jnp.ndarray:
  """Ancestral sampling from q(z_s | z_t, x̂) with variance interpolation.

  The step variance is (σ̃²_{s|t})^{1−γ} (σ²_{t|s})^{γ} (CFG/PD samplers):
  γ = 0 is the true posterior variance, γ = 1 the forward one. The default
  0.3 is the interpolation the CFG paper reports using **(choice)**.
  """
  _check_num_steps(num_steps)

  def update(i, z, x_hat, t, grid):
    logsnr_t = schedules.broadcast_to_image(grid(t), z)
    logsnr_s = schedules.broadcast_to_image(grid(t - 1.0 / num_steps), z)
    alpha_s, sigma_s = schedules.alpha_sigma(logsnr_s)
    r = jnp.exp(logsnr_t - logsnr_s)  # e^{λ_t − λ_s} < 1.
    mean = (
      r * schedules.alpha_ratio(logsnr_t, logsnr_s) * z
      + (1.0 - r) * alpha_s * x_hat
    )
    log_var_posterior = jnp.log1p(-r) + 2.0 * jnp.log(sigma_s)
    log_var_forward = jnp.log(schedules.transition_variance(logsnr_s, logsnr_t))
    log_var = (1.0 - gamma) * log_var_posterior + gamma * log_var_forward
    eps = jax.random.normal(jax.random.fold_in(rng, i), z.shape, z.dtype)
    return mean + jnp.exp(0.5 * log_var) * eps

  return _run_grid(
    denoise_fn,
    noise,
    update,
    num_steps=num_steps,
    logsnr_fn=logsnr_fn,
    clip_x=clip_x,
  )
