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
# (params, frozen_params, rng, cond, w[, space_params]) -> images [B, H, W, C]
# in [-1, 1]; cond is the condition pytree (`gdd.conditioning`), space_params
# the params of the space's decoder (`common.in_space` passes them).
PanelFn = Callable[[Params, Any, jax.Array, Any, Any], jnp.ndarray]


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
      compares teacher and student. An encoder has none.
    sample_ws: the guidance strengths w with a grid each (none without
      panels).
    frozen_subtrees: top-level keys of the params that are never updated
      (a student's copy of its teacher's text encoder).
  """

  name: str
  train_config: ml_collections.ConfigDict
  init_params: Callable[[jax.Array, Any], Params]
  loss_fn: LossFn
  frozen_params: Any
  sample_panels: dict[str, PanelFn]
  sample_ws: tuple[float, ...]
  frozen_subtrees: tuple[str, ...] = ()


# A sampling request's answer: (network, denoiser factory) of a stage kind.
SamplerModel = tuple[Any, Callable[..., Any]]


@dataclasses.dataclass(frozen=True)
class StageKind:
  """One kind of stage, declared in its own module (`registry` lists them).

  The pipeline, the sample API and CLI, `--mode=plan`, evaluation and its
  report know stages only through these fields, so a new stage is its own
  module, its config section and its tests.

  Attributes:
    name: 'teacher', 'guided', 'distill', 'single_w', 'encoder': the
      workdir folder (halving kinds: the folder of their rounds,
      `workdir_lib.round_name`), the `load_sampler`/`config.sample.stage`
      name, an evaluation row's model.
    mode: the `--mode` that trains it.
    section: the config section of its training schedule (validated, and
      its batch split over the devices, when it trains).
    needs: the single-folder kind whose finished params it starts from
      (None: data only).
    in_chain: whether `--mode=all` trains it (in registry order).
    nfe_per_step: network evaluations per sampler (or encoder) step.
    samplers: the sampler kinds it offers (`config_lib.SAMPLERS`); none
      for a kind that samples nothing (the encoder), whose
      `sampler_folder` then says what serves it instead.
    train: (ctx, load_input) -> the params of its last folder. `ctx` runs
      and records stage folders (`pipeline.TrainContext`); `load_input()`
      returns the `needs` kind's params, loaded only when called.
    sampler_folder: (workdir, num_steps, sampler, w) -> the folder that
      serves a sampling request; raises `sampling.SampleRequestError`
      naming what exists.
    sampler_model: (config, info) -> (network, denoiser factory) of a
      folder trained with `config`.
    w_range: (config, trained_w) -> the w a folder trained with `config`
      may sample (an encoder: encode) at (trained_w: a single-w model's one
      w, else None).
    eval_rows: (evaluate config, workdir) -> [(sampler, num_steps,
      trained_w)] that the workdir's finished folders can serve.
    series: sampler -> (label, matplotlib colormap or None) in reports.
    plan_stage: (config, info) -> its `Stage` with abstract params for
      `--mode=plan` and `plan.check_fits`; None if it is never planned.
    summary: (config, workdir) -> the line printed when its mode finishes,
      or None.
    applies: config -> whether the kind exists for that config (the
      autoencoder only where the chain runs in a latent space).
    trains: config -> whether it trains (and so is planned) for that
      config; False where its params are imported (`stages.pretrained`).
    in_space: its models diffuse in the config's space, so its batches are
      encoded there (`common.in_space`); False for a kind that learns on
      the images themselves (the autoencoder).
    on_grid: its models learned the time grid t = i/N of their step count
      only (the halving rounds), so sampling from t_start < 1 starts at a
      grid point (`sampling.start_steps`).
  """

  name: str
  mode: str
  section: str
  needs: str | None
  in_chain: bool
  nfe_per_step: int
  samplers: tuple[str, ...]
  train: Callable[..., Any]
  sampler_folder: Callable[..., str]
  sampler_model: Callable[..., SamplerModel]
  w_range: Callable[..., tuple[float, float]]
  eval_rows: Callable[..., list[tuple[str, int, float | None]]]
  series: dict[str, tuple[str, str | None]]
  plan_stage: Callable[..., Stage] | None = None
  summary: Callable[..., str | None] = lambda config, workdir: None
  applies: Callable[..., bool] = lambda config: True
  trains: Callable[..., bool] = lambda config: True
  in_space: bool = True
  on_grid: bool = False
