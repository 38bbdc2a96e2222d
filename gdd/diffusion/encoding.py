"""Deterministic DDIM encoding and its distillation target (method.md §9).

Encoding runs the DDIM ODE forwards, from data x at t = 0 to z_1 at t = 1:
z_s = α_s x̂(z_t) + σ_s ε̂(z_t) for s > t, the inverse of
`samplers.ddim_sample` (DDIB encodes this way). GD distils it like the
sampler: an N-step student takes one step t → t + 2/N where its 2N-step
teacher takes two.

A model enters through `EpsFn` (z, λ) ↦ ε̂, its noise estimate, not
through x̂: encoding starts where σ is smallest, and there ε̂ = (z − α x̂)/σ
would divide x̂'s error by σ_0 ≈ 4.5e-5 (λ_max = 20).

**Choice (the first step from z_0 = x, method.md §9).** The first step
evaluates the model at z_0 = x itself (not noised) and λ_max, and reads ε̂
from the network output without dividing by σ
(`parameterization.eps_from_output`: ε̂ = f for `eps`, σ z + α v̂ for `v`,
σ (z − α x̃) + α² ε̃ for `both`), so it is as well conditioned as any other
step. (At λ_max the noise in z is far below what a network resolves, so
a trained model's ε̂ there should be near 0, the first step then near
z_{1/N} = α_{1/N} x, the exact ODE's limit on data; not measured.) A
model parameterised by x has no such form (its ε̂ is its x error over
σ_0): gdd refuses to encode with one (`config_lib` for the encoder stage,
`gdd.encode.load_encoder` for the others).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from gdd.diffusion import samplers, schedules

# (z, logsnr) -> ε̂, a model's noise estimate at fixed condition and w.
EpsFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def encode_step(
  z_t: jnp.ndarray,
  eps_hat: jnp.ndarray,
  logsnr_t: jnp.ndarray,
  logsnr_s: jnp.ndarray,
) -> jnp.ndarray:
  """z_s = (α_s/α_t) z_t + (σ_s − (α_s/α_t) σ_t) ε̂, a DDIM step to s > t.

  The same step as `samplers.ddim_step` with x̂ = (z_t − σ_t ε̂)/α_t, written
  in ε̂: ddim_step multiplies z_t − α_t x̂ by σ_s/σ_t, over 10³ for a step
  from t = 0, while for s later than t no coefficient here exceeds 1
  (α_s ≤ α_t, σ_s ≤ 1). Sampling is the mirror case (α_s/α_t blows up as
  t → 1), hence ddim_step's x form there.
  """
  logsnr_t = schedules.broadcast_to_image(logsnr_t, z_t)
  logsnr_s = schedules.broadcast_to_image(logsnr_s, z_t)
  _, sigma_t = schedules.alpha_sigma(logsnr_t)
  _, sigma_s = schedules.alpha_sigma(logsnr_s)
  ratio = schedules.alpha_ratio(logsnr_t, logsnr_s)
  return ratio * z_t + (sigma_s - ratio * sigma_t) * eps_hat


def ddim_encode(
  eps_fn: EpsFn,
  x: jnp.ndarray,
  *,
  num_steps: int,
  logsnr_fn: samplers.LogsnrFn = schedules.logsnr_from_t,
) -> jnp.ndarray:
  """Deterministic N-step DDIM encoding of x: z_1, after N network calls.

  Steps t = i/N → (i + 1)/N for i = 0 … N−1 inside one `lax.fori_loop`
  (one compilation per step count), from z_0 = x; the last step lands on
  t = 1 exactly. Nothing is clipped: z is noise, not data.

  Args:
    eps_fn: the model's ε̂(z, λ) (see the module docstring).
    x: [B, ...] data in the diffusion space.
    num_steps: N (static).
    logsnr_fn: the schedule t ↦ λ.

  Returns:
    [B, ...] float32 z_1.
  """
  samplers.check_num_steps(num_steps)
  batch_size = x.shape[0]

  def logsnr(i):
    time = jnp.asarray(i, jnp.float32) / num_steps
    return samplers.grid_logsnr(logsnr_fn, time, batch_size)

  def body(i, z):
    logsnr_t = logsnr(i)
    eps_hat = eps_fn(z, logsnr_t).astype(jnp.float32)
    return encode_step(z, eps_hat, logsnr_t, logsnr(i + 1))

  return jax.lax.fori_loop(0, num_steps, body, x.astype(jnp.float32))


def encoding_two_step_target(
  teacher_eps_fn: EpsFn,
  z_t: jnp.ndarray,
  step_index: jnp.ndarray,
  *,
  teacher_num_steps: int,
  logsnr_fn: samplers.LogsnrFn = schedules.logsnr_from_t,
) -> jnp.ndarray:
  """ε̃ such that one encoding step t → t + 2/N with ε̃ equals two teacher's.

  Derivation: the teacher steps t → t' = t + 1/N → t'' = t + 2/N
  (`encode_step`, 2 calls of `teacher_eps_fn`) give z_{t''}. One student
  step with ε̃ gives z_{t''} = r z_t + (σ_{t''} − r σ_t) ε̃, r = α_{t''}/α_t;
  solving for ε̃,

    ε̃ = (z_{t''} − r z_t) / (σ_{t''} − r σ_t).

  The denominator exceeds σ_{t''} − σ_t > 0 (r < 1), so there are no edge
  cases: t = 0 (σ_0 ≈ 0) and t'' = 1 (the last step lands on z_1) are
  ordinary grid times, unlike the sampler's target (`distillation`).

  Args:
    teacher_eps_fn: the N-step teacher's ε̂(z, λ).
    z_t: [B, ...] inputs at t = step_index / N.
    step_index: [B] ints in [0, N − 2] (t'' = t + 2/N ≤ 1).
    teacher_num_steps: N, the teacher's step count.
    logsnr_fn: the schedule t ↦ λ.

  Returns:
    [B, ...] float32 targets ε̃.
  """
  n = teacher_num_steps
  step_index = jnp.asarray(step_index, jnp.int32)
  logsnr = lambda i: logsnr_fn(i.astype(jnp.float32) / n)
  logsnr_t = logsnr(step_index)
  logsnr_mid = logsnr(step_index + 1)
  logsnr_end = logsnr(step_index + 2)

  eps_a = teacher_eps_fn(z_t, logsnr_t).astype(jnp.float32)
  z_mid = encode_step(z_t, eps_a, logsnr_t, logsnr_mid)
  eps_b = teacher_eps_fn(z_mid, logsnr_mid).astype(jnp.float32)
  z_end = encode_step(z_mid, eps_b, logsnr_mid, logsnr_end)

  lt = schedules.broadcast_to_image(logsnr_t, z_t)
  le = schedules.broadcast_to_image(logsnr_end, z_t)
  _, sigma_t = schedules.alpha_sigma(lt)
  _, sigma_end = schedules.alpha_sigma(le)
  ratio = schedules.alpha_ratio(lt, le)
  return (z_end - ratio * z_t) / (sigma_end - ratio * sigma_t)
