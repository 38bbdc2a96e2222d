"""Config → the pieces every stage shares: the network and the schedule."""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from gdd import data, spaces
from gdd.diffusion import schedules
from gdd.models import UNet, UNetConfig, unet


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


def build_space(config: ml_collections.ConfigDict, info: data.DatasetInfo):
  """The space the stages' models diffuse in: today the pixels of `info`."""
  return spaces.pixel_space(config, info.image_shape)


def init_params(model: UNet, rng: jax.Array) -> dict:
  """Fresh params of `model` (shapes from a batch of one)."""
  cfg = model.config
  z = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.in_channels))
  w = jnp.zeros((1,)) if cfg.use_w_embedding else None
  variables = model.init(
    rng, z, jnp.zeros((1,)), unet.example_cond(1), w, train=False
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
