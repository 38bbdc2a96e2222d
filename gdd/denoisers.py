"""The denoiser interface: (params, cond, w) → (z, λ) → x̂.

Every model gdd trains or samples is used through a `DenoiserFactory`: given
its params, the condition pytree and the guidance strength w it returns a
`DenoiseFn` (z, λ) ↦ x̂, the unclipped data estimate in the diffusion space.
Losses, samplers and the distillation target only ever see a `DenoiseFn`,
so the plain network, the CFG-guided teacher (2 evaluations per call) and
any later kind of model are interchangeable behind it. Encoding asks the
same factories for ε̂ instead (`estimate='eps'`).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from gdd import conditioning
from gdd.diffusion import guidance, parameterization, samplers

# (params, cond, w) -> (z, logsnr) -> x̂: a model at fixed cond and w.
DenoiserFactory = Callable[[Any, conditioning.Cond, Any], samplers.DenoiseFn]


def _output(
  model, params, z, logsnr, cond, w, *, train=False, dropout_rng=None
):
  """The network's raw output (its `mean_type`'s parameterisation)."""
  rngs = {'dropout': dropout_rng} if train else None
  return model.apply(
    {'params': params}, z, logsnr, cond, w, train=train, rngs=rngs
  )


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
  output = _output(
    model, params, z, logsnr, cond, w, train=train, dropout_rng=dropout_rng
  )
  return parameterization.x_from_output(
    output, z, logsnr, model.config.mean_type
  )


def predict_eps(
  model,
  params: dict,
  z: jnp.ndarray,
  logsnr: jnp.ndarray,
  cond: conditioning.Cond,
  w: jnp.ndarray | None = None,
) -> jnp.ndarray:
  """The network's noise estimate ε̂(z, λ, c[, w]) (eval mode).

  The ε̂ of `predict_x`'s x̂, computed without dividing by σ where the
  parameterisation allows (`parameterization.eps_from_output`): what
  encoding needs near t = 0.
  """
  output = _output(model, params, z, logsnr, cond, w)
  return parameterization.eps_from_output(
    output, z, logsnr, model.config.mean_type
  )


# What a factory's function estimates: x̂ (every sampler, loss and target)
# or ε̂ (encoding, `gdd.diffusion.encoding`).
_PREDICT = {'x': predict_x, 'eps': predict_eps}


def plain(
  model, params, cond: conditioning.Cond, w, *, estimate: str = 'x'
) -> samplers.DenoiseFn:
  """(z, λ) ↦ x̂(z, c[, w]): one network evaluation per call, no CFG pair.

  A w-conditioned student gets w per example; a model without a w-embedding
  (a single-w student, whose w was fixed in training) ignores it.
  `estimate='eps'` returns ε̂ instead of x̂ (`predict_eps`).
  """
  predict = _PREDICT[estimate]
  batch_w = (
    jnp.broadcast_to(
      jnp.asarray(w, jnp.float32), (conditioning.batch_size(cond),)
    )
    if model.config.use_w_embedding
    else None
  )
  return lambda z, logsnr: predict(model, params, z, logsnr, cond, batch_w)


def guided(
  model, cond_kind, params, cond: conditioning.Cond, w, *, estimate: str = 'x'
) -> samplers.DenoiseFn:
  """(z, λ) ↦ x̂^w of a CFG model; 2 network evaluations per call.

  `cond_kind` (a `conditioning` kind) supplies the null condition ∅.
  `estimate='eps'` returns ε̂^w instead (the same combination, method §4).
  """
  predict = _PREDICT[estimate]

  def x_fn(z, logsnr, both):
    return predict(model, params, z, logsnr, both)

  null = cond_kind.null_like(cond)
  return lambda z, logsnr: guidance.guided_x(x_fn, z, logsnr, cond, null, w)
