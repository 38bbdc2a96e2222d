"""Training stages: each builds a `Stage`, the one train loop runs it."""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

Params = Any
Batch = dict[str, jnp.ndarray]
# (params, frozen_params, batch, rng) -> (scalar loss, metrics dict).
LossFn = Callable[[Params, Any, Batch, jax.Array], tuple[jnp.ndarray, dict]]
# (params, frozen_params, rng, cond, w) -> images [B, H, W, C] in [-1, 1]; cond
# is the condition pytree (`gdd.conditioning`).
SampleFn = Callable[[Params, Any, jax.Array, Any, Any], jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class Stage:
  """What the train loop needs from a stage, and nothing more.

  Attributes:
    name: folder of the stage under the workdir, e.g. 'teacher'.
    train_config: the stage's config block (num_train_steps, batch_size,
      optimizer, ema_decay, log/grid/checkpoint intervals).
    init_params: (rng, frozen_params) -> initial params of the trained
      network; a student starts from its teacher's (frozen) params.
    loss_fn: pure loss; the frozen params (a teacher's, or None) arrive as an
      argument of the jitted step, never through a closure.
    frozen_params: params the loss reads but never differentiates.
    sample_panels: the sample grids written during training, as panels shown
      side by side from the same noise: name (e.g. 'student_4step_ddim') ->
      sampler. Students put their teacher's panel first, so every grid
      compares teacher and student.
    sample_ws: the guidance strengths w with a grid each.
  """

  name: str
  train_config: ml_collections.ConfigDict
  init_params: Callable[[jax.Array, Any], Params]
  loss_fn: LossFn
  frozen_params: Any
  sample_panels: dict[str, SampleFn]
  sample_ws: tuple[float, ...]


def nfe(stage: str, num_steps: int) -> int:
  """Network evaluations per sample of a `stage` sampler with `num_steps`.

  `stage` is a workdir stage kind ('teacher', 'guided', 'distill',
  'single_w'). The CFG teacher evaluates the conditional and the
  unconditional model at every step (`guidance.guided_x`); every student
  evaluates one network per step.
  """
  return 2 * num_steps if stage == 'teacher' else num_steps
