"""diffusers' and transformers' config.json ↔ gdd's network configs.

A Stable Diffusion folder describes each network in a config.json; gdd
builds its own network from it (`SDUNetConfig`, `AutoencoderConfig`,
`TextEncoderConfig`, whose field names are diffusers' and transformers'),
and refuses, before any weight is read, every option whose value changes
what the network computes and that gdd does not build (SDXL's added
embeddings, other time embeddings, …), naming them.

A CLIP config.json is only checked for its model type: transformers writes
generic and training-time keys into it (dropout, initializer, token ids)
that do not change what the encoder computes. Options read but not needed
elsewhere: `upcast_attention` (SD 2.1; gdd's attention
softmax is float32 whatever the compute dtype), `force_upcast` and
`sample_size` of the VAE, and every key starting with '_'.
"""

import dataclasses
from typing import Any

from gdd import errors
from gdd.models import autoencoder, sd_unet, text_encoder

# diffusers UNet2DConditionModel options gdd builds with one value only:
# key → that value (diffusers' default, what SD 1.x / 2.x use).
_UNET_FIXED = {
  'act_fn': 'silu',
  'addition_embed_type': None,
  'addition_time_embed_dim': None,
  'attention_type': 'default',
  'center_input_sample': False,
  'class_embed_type': None,
  'class_embeddings_concat': False,
  'conv_in_kernel': 3,
  'conv_out_kernel': 3,
  'cross_attention_norm': None,
  'downsample_padding': 1,
  'dual_cross_attention': False,
  'encoder_hid_dim': None,
  'encoder_hid_dim_type': None,
  'mid_block_only_cross_attention': None,
  'mid_block_scale_factor': 1,
  'mid_block_type': 'UNetMidBlock2DCrossAttn',
  'num_class_embeds': None,
  'only_cross_attention': False,
  'projection_class_embeddings_input_dim': None,
  'resnet_out_scale_factor': 1.0,
  'resnet_skip_time_act': False,
  'resnet_time_scale_shift': 'default',
  'reverse_transformer_layers_per_block': None,
  'time_cond_proj_dim': None,
  'time_embedding_act_fn': None,
  'time_embedding_dim': None,
  'time_embedding_type': 'positional',
  'timestep_post_act': None,
}
# Options that are SDUNetConfig fields of the same name and meaning.
UNET_FIELDS = (
  'sample_size',
  'block_out_channels',
  'layers_per_block',
  'down_block_types',
  'up_block_types',
  'cross_attention_dim',
  'transformer_layers_per_block',
  'use_linear_projection',
  'norm_num_groups',
  'norm_eps',
  'flip_sin_to_cos',
  'freq_shift',
  'dropout',
)
_UNET_READ = (
  'in_channels',
  'out_channels',
  'attention_head_dim',
  'num_attention_heads',
  # Unused unless addition_embed_type is set (refused).
  'addition_embed_type_num_heads',
  'upcast_attention',
)
_VAE_FIXED = {
  'act_fn': 'silu',
  'latents_mean': None,
  'latents_std': None,
  'shift_factor': None,
  'use_post_quant_conv': True,
  'use_quant_conv': True,
}
VAE_FIELDS = (
  'in_channels',
  'out_channels',
  'latent_channels',
  'block_out_channels',
  'layers_per_block',
  'norm_num_groups',
  'mid_block_add_attention',
)
_VAE_READ = (
  'down_block_types',
  'up_block_types',
  'scaling_factor',
  'force_upcast',
  'sample_size',
)
# TextEncoderConfig fields that are CLIPTextConfig keys of the same
# meaning (eos_token_id is read apart; dtype and remat are gdd's).
TEXT_FIELDS = tuple(
  field.name
  for field in dataclasses.fields(text_encoder.TextEncoderConfig)
  if field.name not in ('eos_token_id', 'dtype', 'remat')
)
# diffusers' scheduler prediction_type → gdd's mean_type.
PREDICTION_TYPES = {'epsilon': 'eps', 'v_prediction': 'v', 'sample': 'x'}
# What transformers' SD-era CLIP configs say for eos_token_id: a legacy
# value meaning "the largest id", which is CLIP's <|endoftext|>.
_LEGACY_EOS = 2


class UnsupportedConfigError(errors.UserError, ValueError):
  """A config.json describing a network gdd does not build."""


def unet_config(
  config: dict[str, Any], *, mean_type: str, where: str
) -> sd_unet.SDUNetConfig:
  """The SDUNetConfig of a diffusers UNet2DConditionModel config.json.

  `mean_type` comes from the scheduler's prediction_type (the U-Net's own
  config does not say); `where` names the file in errors.
  """
  _check(config, _UNET_FIXED, UNET_FIELDS + _UNET_READ, where)
  latent, inpainting = _unet_channels(config, where)
  heads = config.get('num_attention_heads') or config['attention_head_dim']
  fields = {k: config[k] for k in UNET_FIELDS if k in config}
  return sd_unet.SDUNetConfig(
    **fields,
    in_channels=latent,
    attention_head_dim=heads,
    mean_type=mean_type,
    time_input='sd',
    **(
      dict(inpainting=True, inpainting_input='masked_image')
      if inpainting
      else {}
    ),
  )


def _unet_channels(config: dict[str, Any], where: str) -> tuple[int, bool]:
  """(latent channels, whether it is SD's inpainting U-Net) of a U-Net
  config: in = out, or in = 2·out + 1 (latents, mask with 1 = fill in, the
  encoded masked image: gdd's 'masked_image' inpainting input)."""
  channels_in = config.get('in_channels', 4)
  channels_out = config.get('out_channels', 4)
  if channels_in == channels_out:
    return channels_out, False
  if channels_in == 2 * channels_out + 1:
    return channels_out, True
  raise UnsupportedConfigError(
    f'{where}: in_channels={channels_in} and out_channels={channels_out}. '
    'gdd loads U-Nets whose input is the latent (in = out) and Stable '
    "Diffusion's inpainting U-Nets (in = 2·out + 1: latent, mask, masked "
    'image latents).'
  )


def diffusers_unet_config(config: sd_unet.SDUNetConfig) -> dict[str, Any]:
  """The UNet2DConditionModel config.json of a gdd SDUNet (exporter)."""
  if config.time_input != 'sd' or config.mean_type not in ('eps', 'v', 'x'):
    raise UnsupportedConfigError(
      f'Only networks with SD time input and one prediction export to '
      f'diffusers; this one has time_input={config.time_input!r}, '
      f'mean_type={config.mean_type!r} (diffusers has no counterpart of '
      "gdd's 'arctan' time input nor of the 'both' output)."
    )
  sd_inpainting = config.inpainting_input == 'masked_image'
  classes = config.num_class_embeds is not None
  if (config.inpainting and not sd_inpainting) or classes:
    raise UnsupportedConfigError(
      "Class-conditional SDUNets and inpainting ones with gdd's "
      "inpainting_input='masked_latents' do not export to diffusers (SD's "
      "inpainting U-Net is 'masked_image')."
    )
  fields = {k: getattr(config, k) for k in UNET_FIELDS}
  return {
    '_class_name': 'UNet2DConditionModel',
    **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()},
    'in_channels': 2 * config.in_channels + 1
    if config.inpainting
    else config.in_channels,
    'out_channels': config.in_channels,
    'attention_head_dim': _listed(config.attention_head_dim),
    'transformer_layers_per_block': _listed(
      config.transformer_layers_per_block
    ),
  }


def vae_config(
  config: dict[str, Any], *, where: str
) -> tuple[autoencoder.AutoencoderConfig, float]:
  """The AutoencoderConfig and scaling factor of an AutoencoderKL config."""
  _check(config, _VAE_FIXED, VAE_FIELDS + _VAE_READ, where)
  levels = len(config['block_out_channels'])
  for key, kind in (
    ('down_block_types', 'DownEncoderBlock2D'),
    ('up_block_types', 'UpDecoderBlock2D'),
  ):
    if list(config.get(key, [kind] * levels)) != [kind] * levels:
      raise UnsupportedConfigError(
        f'{where}: {key}={config[key]}; gdd builds {levels} x {kind!r}.'
      )
  fields = {k: config[k] for k in VAE_FIELDS if k in config}
  return autoencoder.AutoencoderConfig(**fields), float(
    config.get('scaling_factor', 0.18215)
  )


def text_encoder_config(
  config: dict[str, Any], *, where: str
) -> text_encoder.TextEncoderConfig:
  """The TextEncoderConfig of a transformers CLIPTextModel config.json."""
  if config.get('model_type', 'clip_text_model') != 'clip_text_model':
    raise UnsupportedConfigError(
      f'{where}: model_type={config.get("model_type")!r}; gdd loads '
      "CLIP text encoders ('clip_text_model', Stable Diffusion 1.x / 2.x)."
    )
  eos = config.get('eos_token_id', _LEGACY_EOS)
  if eos == _LEGACY_EOS:
    eos = config['vocab_size'] - 1
  fields = {k: config[k] for k in TEXT_FIELDS if k in config}
  return text_encoder.TextEncoderConfig(**fields, eos_token_id=eos)


def mean_type(prediction_type: str, where: str) -> str:
  """gdd's mean_type of a diffusers scheduler's prediction_type."""
  if prediction_type not in PREDICTION_TYPES:
    raise UnsupportedConfigError(
      f'{where}: prediction_type={prediction_type!r}; gdd reads '
      f'{sorted(PREDICTION_TYPES)}.'
    )
  return PREDICTION_TYPES[prediction_type]


def _check(config: dict, fixed: dict, known: tuple, where: str) -> None:
  """Refuses options gdd does not build: fixed ones with another value,
  and unknown ones (a newer diffusers option that may change the maths)."""
  problems = []
  for key, value in config.items():
    if key.startswith('_') or key in known:
      continue
    if key not in fixed:
      problems.append(f'{key}={value!r} (an option gdd does not know)')
    elif not _same(value, fixed[key]):
      problems.append(f'{key}={value!r} (gdd builds {fixed[key]!r})')
  if problems:
    raise UnsupportedConfigError(
      f'{where} describes a network gdd does not build: '
      + '; '.join(problems)
      + '. gdd loads Stable Diffusion 1.x / 2.x networks (README, "Distil '
      'your Stable Diffusion").'
    )


def _same(value, fixed) -> bool:
  """Equal, also for per-block lists of one repeated value ([False] * 4)."""
  if isinstance(value, list):
    return all(v == fixed for v in value)
  return value == fixed


def _listed(value):
  return list(value) if isinstance(value, tuple) else value
