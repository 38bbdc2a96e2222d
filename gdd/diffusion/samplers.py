"""DDIM step and the deterministic, stochastic and ancestral samplers (§7).

A sampler takes `denoise_fn(z, logsnr) -> x̂`, the model's (already guided,
unclipped) data estimate, and loops over a uniform time grid with N steps
from t_start (1 unless editing from a noised input) to 0 inside one
`lax.fori_loop`, so a jitted sampler compiles once per step count. x̂ is
clipped to `clip` (the data range [−1, 1] by default) before each step;
`known` keeps a region fixed (replacement inpainting). `lead_in` is the one
DDIM step that takes a distilled round from an off-grid t_start to its grid.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from gdd import checks
from gdd.diffusion import schedules

DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
LogsnrFn = Callable[[jnp.ndarray], jnp.ndarray]
# The known region's noise index of the lead-in step: no loop step uses it.
_LEAD_IN_INDEX = 2**32 - 1


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


def grid_logsnr(
  logsnr_fn: LogsnrFn, t: jnp.ndarray, batch_size: int
) -> jnp.ndarray:
  """[B] copies of λ(t): the per-example log-SNR of one grid time."""
  return jnp.full((batch_size,), logsnr_fn(t), jnp.float32)


def check_num_steps(num_steps: int, minimum: int = 1) -> None:
  """Raises ValueError unless num_steps is a (static) int >= minimum."""
  if not checks.is_int(num_steps, minimum):
    raise ValueError(
      f'num_steps={num_steps!r}; must be an int >= {minimum} (it is static '
      'and fixes the time grid).'
    )


@dataclasses.dataclass(frozen=True)
class Known:
  """Replacement inpainting: where `mask` is 1, x is known (method.md §9).

  After every step the known region of z_s is replaced by x noised to s
  with q(z_s | x) (fresh noise per step), and the result's known region is
  x itself, so a mask of ones returns x.

  Attributes:
    x: [B, ...] the known data in the diffusion space.
    mask: 1 where x is known, 0 where the sampler fills in; broadcastable
      to x (e.g. [B, H, W, 1]).
    rng: key of the per-step noise.
  """

  x: jnp.ndarray
  mask: jnp.ndarray
  rng: jax.Array

  def replace(self, z: jnp.ndarray, logsnr: jnp.ndarray, i) -> jnp.ndarray:
    """z with its known region set to a draw of q(z_λ | x)."""
    noise = jax.random.normal(jax.random.fold_in(self.rng, i), z.shape)
    known = schedules.diffuse(self.x, noise, logsnr)
    return self.mask * known + (1.0 - self.mask) * z

  def final(self, x_hat: jnp.ndarray) -> jnp.ndarray:
    return self.mask * self.x + (1.0 - self.mask) * x_hat


def _denoised(
  denoise_fn: DenoiseFn,
  clip: tuple[float, float] | None,
  z: jnp.ndarray,
  logsnr: jnp.ndarray,
) -> jnp.ndarray:
  """The model's x̂ in float32, clipped to `clip` unless it is None."""
  x_hat = denoise_fn(z, logsnr).astype(jnp.float32)
  return x_hat if clip is None else jnp.clip(x_hat, *clip)


def _run_grid(
  denoise_fn: DenoiseFn,
  z_start: jnp.ndarray,
  update: Callable[..., jnp.ndarray],
  *,
  num_steps: int,
  logsnr_fn: LogsnrFn,
  clip: tuple[float, float] | None,
  t_start=1.0,
  known: Known | None = None,
) -> jnp.ndarray:
  """Shared loop over t = t_start·(1 − i/N), i = 0 … N−1; the last returns x̂.

  `update(i, z_t, x_hat, t, step, grid)` returns z at t − step (step =
  t_start/N, the grid spacing), where `grid(time)` gives the per-example
  log-SNR of a time. With t_start = 1 (a Python float) the grid is
  computed exactly as 1 − i/N, 1 − i/N − 1/N, …, 1/N.
  """
  batch = z_start.shape[0]
  grid = lambda time: grid_logsnr(logsnr_fn, time, batch)
  step = t_start / num_steps
  denoise = functools.partial(_denoised, denoise_fn, clip)

  def body(i, z):
    t = t_start * (1.0 - i / num_steps)
    z = update(i, z, denoise(z, grid(t)), t, step, grid)
    return z if known is None else known.replace(z, grid(t - step), i)

  z = jax.lax.fori_loop(0, num_steps - 1, body, z_start.astype(jnp.float32))
  x_hat = denoise(z, grid(jnp.asarray(step, jnp.float32)))
  return x_hat if known is None else known.final(x_hat)


def lead_in(
  denoise_fn: DenoiseFn,
  z: jnp.ndarray,
  *,
  t_from,
  t_to,
  logsnr_fn: LogsnrFn = schedules.logsnr_from_t,
  clip: tuple[float, float] | None = (-1.0, 1.0),
  known: Known | None = None,
) -> jnp.ndarray:
  """One DDIM step from t_from down to t_to (one network call).

  How a distilled round, which learned only its grid t = i/N, starts from a
  t_start off that grid: this step takes z_{t_start} to the grid point
  below, the sampler's grid steps go on from there (method.md §9,
  `sampling.start_steps`). With `known`, the known region is replaced at
  t_to as after any step.
  """
  batch = z.shape[0]
  logsnr_from = grid_logsnr(logsnr_fn, t_from, batch)
  logsnr_to = grid_logsnr(logsnr_fn, t_to, batch)
  z = z.astype(jnp.float32)
  x_hat = _denoised(denoise_fn, clip, z, logsnr_from)
  z = ddim_step(z, x_hat, logsnr_from, logsnr_to)
  return z if known is None else known.replace(z, logsnr_to, _LEAD_IN_INDEX)


def ddim_sample(
  denoise_fn: DenoiseFn,
  z_start: jnp.ndarray,
  *,
  num_steps: int,
  logsnr_fn: LogsnrFn = schedules.logsnr_from_t,
  clip: tuple[float, float] | None = (-1.0, 1.0),
  t_start=1.0,
  known: Known | None = None,
) -> jnp.ndarray:
  """Deterministic N-step DDIM from z_start at t_start; N network calls.

  Steps t = t_start·(1 − i/N); each moves to t − t_start/N, and the last
  one returns x̂ itself. From t_start = 1, z_start is pure noise z_1.
  """
  check_num_steps(num_steps)

  def update(i, z, x_hat, t, step, grid):
    del i
    return ddim_step(z, x_hat, grid(t), grid(t - step))

  return _run_grid(
    denoise_fn,
    z_start,
    update,
    num_steps=num_steps,
    logsnr_fn=logsnr_fn,
    clip=clip,
    t_start=t_start,
    known=known,
  )


def stochastic_sample(
  denoise_fn: DenoiseFn,
  z_start: jnp.ndarray,
  rng: jax.Array,
  *,
  num_steps: int,
  logsnr_fn: LogsnrFn = schedules.logsnr_from_t,
  clip: tuple[float, float] | None = (-1.0, 1.0),
  t_start=1.0,
  known: Known | None = None,
) -> jnp.ndarray:
  """GD's stochastic N-step sampler (Eq. 5); N network calls.

  From t, a deterministic DDIM jump of two grid steps (2/N from t_start =
  1) to k = t − 2/N, then re-noising forward to s = t − 1/N with
  q(z_s | z_k); from the last grid time one deterministic step to 0.
  `denoise_fn` should be the model distilled for N/2 steps: its jumps have
  that step length.
  """
  check_num_steps(num_steps, minimum=2)

  def update(i, z, x_hat, t, step, grid):
    logsnr_k = grid(t - 2 * step)
    z_k = ddim_step(z, x_hat, grid(t), logsnr_k)
    logsnr_s = grid(t - step)
    return renoise(z_k, logsnr_k, logsnr_s, jax.random.fold_in(rng, i))

  return _run_grid(
    denoise_fn,
    z_start,
    update,
    num_steps=num_steps,
    logsnr_fn=logsnr_fn,
    clip=clip,
    t_start=t_start,
    known=known,
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
  z_start: jnp.ndarray,
  rng: jax.Array,
  *,
  num_steps: int,
  logsnr_fn: LogsnrFn = schedules.logsnr_from_t,
  clip: tuple[float, float] | None = (-1.0, 1.0),
  t_start=1.0,
  known: Known | None = None,
  gamma: float = 0.3,
) -> jnp.ndarray:
  """Ancestral sampling from q(z_s | z_t, x̂) with variance interpolation.

  The step variance is (σ̃²_{s|t})^{1−γ} (σ²_{t|s})^{γ} (CFG/PD samplers):
  γ = 0 is the true posterior variance, γ = 1 the forward one. The default
  0.3 is the interpolation the CFG paper reports using **(choice)**.
  """
  check_num_steps(num_steps)

  def update(i, z, x_hat, t, step, grid):
    logsnr_t = schedules.broadcast_to_image(grid(t), z)
    logsnr_s = schedules.broadcast_to_image(grid(t - step), z)
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
    z_start,
    update,
    num_steps=num_steps,
    logsnr_fn=logsnr_fn,
    clip=clip,
    t_start=t_start,
    known=known,
  )
