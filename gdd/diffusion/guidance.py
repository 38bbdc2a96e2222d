"""Classifier-free guidance in GD's convention (method.md §4).

w is the guidance *strength*: x̂^w = (1 + w) x̂(z, c) − w x̂(z, ∅), w ≥ 0, and
w = 0 is the plain conditional model. Stable Diffusion / diffusers call
s = 1 + w the guidance *scale*. gdd's APIs take `w` everywhere; use the two
converters below at the boundary to tools that speak in scales.
"""

import jax.numpy as jnp

from gdd import conditioning
from gdd.diffusion import schedules


def guidance_scale_from_strength(w):
  """Guidance scale s = 1 + w (diffusers' `guidance_scale`) from GD's w."""
  return 1.0 + w


def guidance_strength_from_scale(guidance_scale):
  """GD's guidance strength w = s − 1 from a diffusers-style scale s."""
  return guidance_scale - 1.0


def combine(
  conditional: jnp.ndarray, unconditional: jnp.ndarray, w: jnp.ndarray
) -> jnp.ndarray:
  """(1 + w)·cond − w·uncond, with w per example ([B]) or a scalar.

  Linear, so it gives the same result whether applied to x̂, ε̂ or v̂ (all
  three are affine in x̂ at fixed z and λ).
  """
  w = schedules.broadcast_to_image(w, conditional)
  return (1.0 + w) * conditional - w * unconditional


def guided_x(
  x_fn, z: jnp.ndarray, logsnr: jnp.ndarray, cond, null_cond, w
) -> jnp.ndarray:
  """x̂^w from a conditional model, cond and uncond run as one batch of 2B.

  Args:
    x_fn: (z, logsnr, cond) -> x̂, the model's unclipped data estimate (or
      its ε̂, for ε̂^w: `combine` is linear).
    z: [B, H, W, C] noisy input; logsnr: [B].
    cond: the condition pytree (leaves [B, ...]); null_cond: the
      unconditional ∅ of the same structure (`Conditioning.null_like`).
    w: guidance strength, [B] or scalar.

  One guided prediction costs 2 network evaluations (NFE = 2).
  """
  both = conditioning.concat(cond, null_cond)
  x_both = x_fn(
    jnp.concatenate([z, z]), jnp.concatenate([logsnr, logsnr]), both
  )
  x_cond, x_uncond = jnp.split(x_both, 2)
  return combine(x_cond, x_uncond, w)
