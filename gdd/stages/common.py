"""Config → the pieces every stage shares: network, schedule, denoiser."""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from gdd import data
from gdd.diffusion import parameterization, samplers, schedules
from gdd.models import UNet, UNetConfig

# (params, labels [B], w) -> (z, λ) -> x̂: a model's denoiser at labels and w.
DenoiserFactory = Callable[[Any, jnp.ndarray, Any], samplers.DenoiseFn]


def build_model(
  config: ml_collections.ConfigDict,
  info: data.DatasetInfo,
  *,
  use_w_embedding: bool = False,
  w_max: float = 4.0,
) -> UNet:
  """The U-Net of `config.model` for images of `info`'s shape and classes.

  Its remat policy is `config.memory.remat`: a memory setting, not part of
  what the network is, so it may change between runs of one stage.
  """
  height, _, channels = info.image_shape
  model_config = config.model.to_dict()
  for key in ('ch_mult', 'attn_resolutions'):
    model_config[key] = tuple(model_config[key])
  return UNet(
    UNetConfig(
      image_size=height,
      in_channels=channels,
      num_classes=info.num_classes,
      use_w_embedding=use_w_embedding,
      w_max=w_max,
      remat=config.memory.remat,
      **model_config,
    )
  )


def init_params(model: UNet, rng: jax.Array) -> dict:
  """Fresh params of `model` (shapes from a batch of one)."""
  cfg = model.config
  z = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.in_channels))
  w = jnp.zeros((1,)) if cfg.use_w_embedding else None
  variables = model.init(
    rng, z, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32), w, train=False
  )
  return variables['params']


def abstract_params(model: UNet):
  """ShapeDtypeStructs of `model`'s params (no computation)."""
  return jax.eval_shape(
    functools.partial(init_params, model), jax.random.PRNGKey(0)
  )


def logsnr_fn(config: ml_collections.ConfigDict):
  """t ↦ λ(t) for the config's log-SNR range."""
  return functools.partial(
    schedules.logsnr_from_t,
    logsnr_min=config.diffusion.logsnr_min,
    logsnr_max=config.diffusion.logsnr_max,
  )


def predict_x(
  model: UNet,
  params: dict,
  z: jnp.ndarray,
  logsnr: jnp.ndarray,
  labels: jnp.ndarray,
  w: jnp.ndarray | None = None,
  *,
  train: bool = False,
  dropout_rng: jax.Array | None = None,
) -> jnp.ndarray:
  """The network's unclipped data estimate x̂(z, λ, c[, w])."""
  rngs = {'dropout': dropout_rng} if train else None
  output = model.apply(
    {'params': params}, z, logsnr, labels, w, train=train, rngs=rngs
  )
  return parameterization.x_from_output(
    output, z, logsnr, model.config.mean_type
  )


def run_sampler(
  config: ml_collections.ConfigDict,
  denoise_fn: samplers.DenoiseFn,
  rng: jax.Array,
  shape: tuple[int, ...],
  *,
  num_steps: int,
  sampler: str,
) -> jnp.ndarray:
  """Draws z_1 ~ N(0, I) of `shape` and runs the named sampler from it."""
  noise_rng, sampler_rng = jax.random.split(rng)
  noise = jax.random.normal(noise_rng, shape, jnp.float32)
  kwargs = dict(
    num_steps=num_steps,
    logsnr_fn=logsnr_fn(config),
    clip_x=config.diffusion.clip_x,
  )
  if sampler == 'ddim':
    return samplers.ddim_sample(denoise_fn, noise, **kwargs)
  if sampler == 'ancestral':
    return samplers.ancestral_sample(denoise_fn, noise, sampler_rng, **kwargs)
  if sampler == 'stochastic':
    return samplers.stochastic_sample(denoise_fn, noise, sampler_rng, **kwargs)
  raise ValueError(
    f"sampler={sampler!r}; allowed: 'ddim', 'ancestral', 'stochastic'."
  )


def plain_denoiser(model: UNet, params, labels: jnp.ndarray, w):
  """(z, λ) ↦ x̂(z, c[, w]): one network evaluation per call, no CFG pair.

  A w-conditioned student gets w per example; a model without a w-embedding
  (a single-w student, whose w was fixed in training) ignores it.
  """
  batch_w = (
    jnp.broadcast_to(jnp.asarray(w, jnp.float32), labels.shape)
    if model.config.use_w_embedding
    else None
  )
  return lambda z, logsnr: predict_x(model, params, z, logsnr, labels, batch_w)


def make_sample_fn(
  config: ml_collections.ConfigDict,
  model: UNet,
  make_denoiser: DenoiserFactory,
  *,
  num_steps: int,
  sampler: str = 'ddim',
):
  """(params, rng, labels, w) ↦ samples in [−1, 1] of `model`'s images."""
  cfg = model.config
  image_shape = (cfg.image_size, cfg.image_size, cfg.in_channels)

  def sample_fn(params, rng, labels, w):
    return run_sampler(
      config,
      make_denoiser(params, labels, w),
      rng,
      labels.shape + image_shape,
      num_steps=num_steps,
      sampler=sampler,
    )

  return sample_fn
