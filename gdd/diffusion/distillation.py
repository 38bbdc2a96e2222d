"""The progressive-distillation target (method.md §6, PD Algorithm 2).

A student step of length 2/N from z_t must land where two teacher DDIM steps
of length 1/N land. Times are grid indices i (t = i/N) so the edge cases are
exact integer comparisons, not float ones.
"""

from collections.abc import Callable

import jax.numpy as jnp

from gdd.diffusion import samplers, schedules

# (z, logsnr) -> x̂, the teacher's unclipped data estimate.
XFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def two_step_target(
  teacher_x_fn: XFn,
  z_t: jnp.ndarray,
  step_index: jnp.ndarray,
  *,
  teacher_num_steps: int,
  logsnr_fn: samplers.LogsnrFn = schedules.logsnr_from_t,
) -> jnp.ndarray:
  """x̃ such that one DDIM step t → t − 2/N with x̃ equals two teacher steps.

  Args:
    teacher_x_fn: the N-step teacher's x̂(z, λ) (2 calls here).
    z_t: [B, H, W, C] noisy inputs at t = step_index / N.
    step_index: [B] ints in [1, N] (t on the teacher's grid).
    teacher_num_steps: N, the teacher's step count.
    logsnr_fn: the schedule t ↦ λ.

  Returns:
    [B, H, W, C] targets x̃ = (z_{t''} − (σ_{t''}/σ_t) z_t) /
    (α_{t''} − (σ_{t''}/σ_t) α_t), with t'' = t − 2/N; when t'' = 0 the
    target is x̂_b (the second teacher step's estimate), and when t = 1/N it
    is x̂_a (a single teacher step reaches 0).
  """
  n = teacher_num_steps
  step_index = jnp.asarray(step_index, jnp.int32)
  time = lambda i: jnp.maximum(i, 0).astype(jnp.float32) / n
  logsnr_t = logsnr_fn(time(step_index))
  logsnr_mid = logsnr_fn(time(step_index - 1))
  logsnr_end = logsnr_fn(time(step_index - 2))

  x_a = teacher_x_fn(z_t, logsnr_t)
  z_mid = samplers.ddim_step(z_t, x_a, logsnr_t, logsnr_mid)
  x_b = teacher_x_fn(z_mid, logsnr_mid)
  z_end = samplers.ddim_step(z_mid, x_b, logsnr_mid, logsnr_end)

  lt = schedules.broadcast_to_image(logsnr_t, z_t)
  le = schedules.broadcast_to_image(logsnr_end, z_t)
  alpha_t, _ = schedules.alpha_sigma(lt)
  alpha_end, _ = schedules.alpha_sigma(le)
  ratio = schedules.sigma_ratio(lt, le)
  x_tilde = (z_end - ratio * z_t) / (alpha_end - ratio * alpha_t)

  step = schedules.broadcast_to_image(step_index, z_t)
  x_tilde = jnp.where(step == 2, x_b, x_tilde)
  return jnp.where(step == 1, x_a, x_tilde)
