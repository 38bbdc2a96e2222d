"""The denoiser interface: (params, cond, w) → (z, λ) → x̂.

Every model gdd trains or samples is used through a `DenoiserFactory`: given
its params, the condition pytree and the guidance strength w it returns a
`DenoiseFn` (z, λ) ↦ x̂, the unclipped data estimate in the diffusion space.
Losses, samplers and the distillation target only ever see a `DenoiseFn`,
so the plain network, the CFG-guided teacher (2 evaluations per call) and
any later kind of model are interchangeable behind it.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from gdd import conditioning
from gdd.diffusion import guidance, parameterization, samplers

# (params, cond, w) -> (z, logsnr) -> x̂: a model at fixed cond and w.
DenoiserFactory = Callable[[Any, conditioning.Cond, Any], samplers.DenoiseFn]


def predict_x(
  model,
  params: dict,
  z: jnp.ndarray,
  logsnr: jnp.ndarray,
  cond: conditioning.Cond,
  w: jnp.ndarray | None = None,
  *,
  train: bool = False,
  dropout_rng: jax.Array | None = None,
) -> jnp.ndarray:
  """The network's unclipped data estimate x̂(z, λ, c[, w])."""
  rngs = {'dropout': dropout_rng} if train else None
  output = model.apply(
    {'params': params}, z, logsnr, cond, w, train=train, rngs=rngs
  )
  return parameterization.x_from_output(
    output, z, logsnr, model.config.mean_type
  )


def plain(model, params, cond: conditioning.Cond, w) -> samplers.DenoiseFn:
  """(z, λ) ↦ x̂(z, c[, w]): one network evaluation per call, no CFG pair.

  A w-conditioned student gets w per example; a model without a w-embedding
  (a single-w student, whose w was fixed in training) ignores it.
  """
  batch_w = (
    jnp.broadcast_to(
      jnp.asarray(w, jnp.float32), (conditioning.batch_size(cond),)
    )
    if model.config.use_w_embedding
    else None
  )
  return lambda z, logsnr: predict_x(model, params, z, logsnr, cond, batch_w)


def guided(
  model, cond_kind, params, cond: conditioning.Cond, w
) -> samplers.DenoiseFn:
  """(z, λ) ↦ x̂^w of a CFG model; 2 network evaluations per call.

  `cond_kind` (a `conditioning` kind) supplies the null condition ∅.
  """

  def x_fn(z, logsnr, both):
    return predict_x(model, params, z, logsnr, both)

  null = cond_kind.null_like(cond)
  return lambda z, logsnr: guidance.guided_x(x_fn, z, logsnr, cond, null, w)
