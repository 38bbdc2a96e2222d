"""Stages filled from a Stable Diffusion folder instead of trained.

With `config.pretrained.folder` set (a folder in diffusers' layout,
`gdd.weights.stable_diffusion`), the chain's autoencoder is SD's VAE, with
SD's latent scaling factor rather than a measured one, and its teacher is
SD itself: SD's U-Net behind SD's CLIP text encoder, whose CFG null is the
empty prompt's states (SD's guidance scale s = 1 + w). Both folders get
the converted weights as their params export, recorded like a trained
stage's, so stage one, the halving rounds and the encoder run from them
unchanged.

The config must build the folder's networks — its `model`, `text.encoder`
and `autoencoder.model` say what gdd compiles, shards and plans — so
`check` compares them with the folder's config.json files (reading JSON
only) and names every difference before any weight is read.
"""

import ml_collections
from etils import epath

from gdd import config_lib, data, paths
from gdd.stages import common
from gdd.weights import diffusers_configs, stable_diffusion


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether the chain starts from a Stable Diffusion folder."""
  return bool(config.pretrained.folder)


def _folder(config: ml_collections.ConfigDict) -> epath.Path:
  return paths.resolve(config.pretrained.folder)


def _variant(config: ml_collections.ConfigDict) -> str | None:
  return config.pretrained.variant or None


def check(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> None:
  """Raises ConfigError unless the config builds the folder's networks."""
  folder = _folder(config)
  unet = stable_diffusion.unet_config(folder)
  text = stable_diffusion.text_encoder_config(folder)
  vae, _ = stable_diffusion.vae_config(folder)
  model = common.build_model(config, info)
  built_vae = common.build_autoencoder(config, info).config
  problems = (
    _differences('model', model.config.unet, unet, _UNET_FIELDS)
    + _differences('text.encoder', model.config.text, text, _TEXT_FIELDS)
    + _differences('autoencoder.model', built_vae, vae, _VAE_FIELDS)
  )
  if problems:
    raise config_lib.ConfigError(
      f'config.pretrained.folder={str(folder)!r} holds other networks than '
      f'the config builds: {"; ".join(problems)}. Set these config keys to '
      "the folder's values (configs/sd15_distill.py and sd21_distill.py "
      'have SD 1.5 and 2.1).'
    )


# What must match: the architecture (diffusers' config fields), not the
# compute dtype, remat, the latent size (the U-Net is convolutional),
# dropout or a student's w-embedding.
_UNET_FIELDS = (
  *(
    field
    for field in diffusers_configs.UNET_FIELDS
    if field not in ('sample_size', 'dropout')
  ),
  'in_channels',
  'attention_head_dim',
  'mean_type',
  'time_input',
  'inpainting',
  'inpainting_input',
)
_TEXT_FIELDS = (*diffusers_configs.TEXT_FIELDS, 'eos_token_id')
_VAE_FIELDS = diffusers_configs.VAE_FIELDS


def _differences(section: str, built, loaded, fields) -> list[str]:
  return [
    f'{section}: {field} is {getattr(built, field)!r} in the config, '
    f'{getattr(loaded, field)!r} in the folder'
    for field in fields
    if getattr(built, field) != getattr(loaded, field)
  ]


def teacher_params(config: ml_collections.ConfigDict) -> dict:
  """The teacher's params: {'text_encoder': CLIP's, 'unet': SD's U-Net's}."""
  folder, variant = _folder(config), _variant(config)
  unet = stable_diffusion.load_unet(folder, variant=variant)
  text = stable_diffusion.load_text_encoder(folder, variant=variant)
  return {common.TEXT_ENCODER: text.params, 'unet': unet.params}


def autoencoder_params(config: ml_collections.ConfigDict) -> dict:
  """SD's VAE params."""
  vae, _ = stable_diffusion.load_vae(_folder(config), variant=_variant(config))
  return vae.params


def scaling_factor(config: ml_collections.ConfigDict) -> float:
  """SD's latent scaling factor (vae/config.json; 0.18215 for SD 1 and 2)."""
  return stable_diffusion.vae_config(_folder(config))[1]
