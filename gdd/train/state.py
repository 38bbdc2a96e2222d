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


def update_ema(ema_params: Any, params: Any, decay: float) -> Any:
  """ema ← decay·ema + (1 − decay)·params; decay 0 copies the params."""
  return jax.tree.map(
    lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params
  )
