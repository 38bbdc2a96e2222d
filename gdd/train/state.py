"""The train state every stage shares; Orbax saves it as one pytree."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
  """Checkpoint N holds the state after N updates (`step == N`).

  No RNG state is stored: the step's randomness is fold_in(key, step), so a
  resumed run draws exactly the numbers an uninterrupted one would.
  """

  step: jnp.ndarray
  params: Any
  opt_state: optax.OptState
  ema_params: Any

  @classmethod
  def create(cls, params: Any, tx: optax.GradientTransformation):
    return cls(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params),
    )


def ema_decay_at(
  decay: float, num_updates: jax.Array | int, warmup: bool
) -> jax.Array | float:
  """The EMA decay for update `num_updates` (0 for the first update).

  Without warm-up, `decay` itself. With warm-up, min(decay, (1 + n)/(10 + n))
  (the common practice, e.g. TensorFlow's ExponentialMovingAverage with
  num_updates): a fixed decay keeps a fraction decay^n of the starting params
  after n updates (5% of a random init after 3000 updates at 0.999), while
  the warm-up's short early horizon forgets them within a few hundred updates
  and lets a long decay average only the later params.
  """
  if not warmup:
    return decay
  n = jnp.asarray(num_updates, jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def update_ema(ema_params: Any, params: Any, decay: float | jax.Array) -> Any:
  """ema ← decay·ema + (1 − decay)·params; decay 0 copies the params."""
  return jax.tree.map(
    lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params
  )
