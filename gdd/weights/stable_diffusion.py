"""A Stable Diffusion folder (diffusers' layout) → gdd's networks, and back.

Reads what `StableDiffusionPipeline.save_pretrained` writes (and what the
Hugging Face hub serves):
  model_index.json
  unet/config.json + diffusion_pytorch_model[.<variant>].safetensors
  vae/config.json + diffusion_pytorch_model[.<variant>].safetensors
  text_encoder/config.json + model[.<variant>].safetensors
  scheduler/scheduler_config.json
  tokenizer/ (vocab.json, merges.txt: `gdd.tokenization`)
each weights file possibly sharded (`<stem>.safetensors.index[.<variant>]
.json` naming the shards). torch is never imported: weights are read with
`safetensors_io`, renamed by `naming`, configs mapped by
`diffusers_configs`. Params come back float32 (gdd's master params; bf16
compute is the network config's `dtype`), whatever the stored dtype.

The way back, a student to diffusers, is `diffusers_export`.
"""

import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from gdd import errors
from gdd.diffusion import schedules
from gdd.models import autoencoder, sd_unet, text_encoder
from gdd.weights import diffusers_configs, naming, safetensors_io

UNET, VAE, TEXT_ENCODER = 'unet', 'vae', 'text_encoder'
STEMS = {
  UNET: 'diffusion_pytorch_model',
  VAE: 'diffusion_pytorch_model',
  TEXT_ENCODER: 'model',
}
# SD's discrete schedule (schedules.sd_logsnr_table) is all gdd implements.
SCHEDULE = {
  'beta_schedule': 'scaled_linear',
  'beta_start': schedules.SD_BETA_START,
  'beta_end': schedules.SD_BETA_END,
  'num_train_timesteps': schedules.SD_NUM_TIMESTEPS,
}
# Old diffusers VAE checkpoints name the attention projections like this;
# diffusers renames them on load too.
_OLD_VAE_ATTENTION = {
  'query': 'to_q',
  'key': 'to_k',
  'value': 'to_v',
  'proj_attn': 'to_out.0',
}
# transformers' buffer of position ids (saved by older versions).
_TEXT_BUFFERS = ('embeddings.position_ids',)


class WeightsNotFoundError(errors.UserError, FileNotFoundError):
  """A folder without the config or safetensors weights gdd reads."""


class Network(NamedTuple):
  """A network's gdd config and its float32 params."""

  config: Any
  params: dict


class StableDiffusion(NamedTuple):
  """The three networks of a Stable Diffusion folder, and its latent scale."""

  unet: Network
  vae: Network
  text_encoder: Network
  scaling_factor: float


def read_json(path: epath.Path) -> dict:
  """A JSON file; missing → WeightsNotFoundError naming it."""
  if not path.exists():
    raise WeightsNotFoundError(
      f'{path} does not exist: is {path.parent.parent} a Stable Diffusion '
      "folder in diffusers' layout (unet/, vae/, text_encoder/, scheduler/, "
      'tokenizer/, model_index.json)?'
    )
  return json.loads(path.read_text())


def read_weights(
  folder: epath.PathLike, stem: str, variant: str | None = None
) -> dict[str, np.ndarray]:
  """The state dict of `folder`: one safetensors file or its shards."""
  folder = epath.Path(folder)
  suffix = f'.{variant}' if variant else ''
  single = folder / f'{stem}{suffix}.safetensors'
  index = folder / f'{stem}.safetensors.index{suffix}.json'
  if single.exists():
    return safetensors_io.load(single)
  if index.exists():
    shards = sorted(set(read_json(index)['weight_map'].values()))
    state_dict = {}
    for shard in shards:
      state_dict.update(safetensors_io.load(folder / shard))
    return state_dict
  present = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
  torch_only = any(name.endswith(('.bin', '.ckpt', '.pt')) for name in present)
  hint = (
    ' It holds PyTorch pickles only: gdd reads safetensors (no torch at run '
    'time); re-save the model with diffusers '
    '(`save_pretrained(folder, safe_serialization=True)`).'
    if torch_only
    else ''
  )
  raise WeightsNotFoundError(
    f'No {single.name} (nor {index.name}) in {folder}; it holds {present}.'
    f'{hint} For a variant (e.g. fp16 files) pass variant=.'
  )


def unet_config(folder: epath.PathLike) -> sd_unet.SDUNetConfig:
  """The U-Net's config from `unet/config.json` and the scheduler's."""
  folder = epath.Path(folder)
  where = folder / 'scheduler' / 'scheduler_config.json'
  scheduler = read_json(where)
  _check_schedule(scheduler, where)
  mean_type = diffusers_configs.mean_type(
    scheduler.get('prediction_type', 'epsilon'), str(where)
  )
  return diffusers_configs.unet_config(
    read_json(folder / UNET / 'config.json'),
    mean_type=mean_type,
    where=str(folder / UNET / 'config.json'),
  )


def load_unet(folder: epath.PathLike, *, variant: str | None = None) -> Network:
  """The U-Net of an SD folder (its `unet/` and `scheduler/` read)."""
  folder = epath.Path(folder)
  config = unet_config(folder)
  state_dict = read_weights(folder / UNET, STEMS[UNET], variant)
  params = naming.to_flax(
    split_inpainting_conv_in(state_dict, config),
    abstract_unet_params(config),
    what=str(folder / UNET),
  )
  return Network(config, params)


# SD's inpainting U-Net reads [latent, mask, masked image latents] with one
# conv_in; gdd's conv_in reads the latent and 'conv_in_known' (no bias) the
# rest (`layers.known_region_input`): the kernel splits on input channels.
_KNOWN_CONV = 'conv_in_known.weight'


def split_inpainting_conv_in(state_dict: dict, config) -> dict:
  """An inpainting U-Net's state dict with conv_in split as gdd's is."""
  kernel = state_dict.get('conv_in.weight')
  if not config.inpainting or kernel is None:
    return state_dict
  latent = config.in_channels
  return {
    **state_dict,
    'conv_in.weight': kernel[:, :latent],
    _KNOWN_CONV: kernel[:, latent:],
  }


def join_inpainting_conv_in(state_dict: dict, config) -> dict:
  """`split_inpainting_conv_in`'s inverse: SD's one conv_in (exporter)."""
  if not config.inpainting:
    return state_dict
  joined = {k: v for k, v in state_dict.items() if k != _KNOWN_CONV}
  joined['conv_in.weight'] = np.concatenate(
    [state_dict['conv_in.weight'], state_dict[_KNOWN_CONV]], axis=1
  )
  return joined


def vae_config(
  folder: epath.PathLike,
) -> tuple[autoencoder.AutoencoderConfig, float]:
  """The VAE's config and latent scaling factor from `vae/config.json`."""
  path = epath.Path(folder) / VAE / 'config.json'
  return diffusers_configs.vae_config(read_json(path), where=str(path))


def load_vae(
  folder: epath.PathLike, *, variant: str | None = None
) -> tuple[Network, float]:
  """The KL autoencoder of an SD folder and its latent scaling factor."""
  config, scaling_factor = vae_config(folder)
  folder = epath.Path(folder) / VAE
  state_dict = _renamed_vae_attention(read_weights(folder, STEMS[VAE], variant))
  params = naming.to_flax(
    state_dict, abstract_vae_params(config), what=str(folder)
  )
  return Network(config, params), scaling_factor


def text_encoder_config(
  folder: epath.PathLike,
) -> text_encoder.TextEncoderConfig:
  """The CLIP text encoder's config from `text_encoder/config.json`."""
  path = epath.Path(folder) / TEXT_ENCODER / 'config.json'
  return diffusers_configs.text_encoder_config(read_json(path), where=str(path))


def load_text_encoder(
  folder: epath.PathLike, *, variant: str | None = None
) -> Network:
  """The CLIP text encoder of an SD folder."""
  config = text_encoder_config(folder)
  folder = epath.Path(folder) / TEXT_ENCODER
  state_dict = {
    key.removeprefix('text_model.'): value
    for key, value in read_weights(folder, STEMS[TEXT_ENCODER], variant).items()
  }
  params = naming.to_flax(
    state_dict,
    abstract_text_encoder_params(config),
    what=str(folder),
    ignored=_TEXT_BUFFERS,
  )
  return Network(config, params)


def load(
  folder: epath.PathLike, *, variant: str | None = None
) -> StableDiffusion:
  """U-Net, VAE and text encoder of an SD folder, checked to fit together."""
  unet = load_unet(folder, variant=variant)
  vae, scaling_factor = load_vae(folder, variant=variant)
  text = load_text_encoder(folder, variant=variant)
  if unet.config.cross_attention_dim != text.config.hidden_size:
    raise diffusers_configs.UnsupportedConfigError(
      f'{folder}: the U-Net cross-attends to {unet.config.cross_attention_dim}'
      f'-wide states, the text encoder gives {text.config.hidden_size}.'
    )
  if unet.config.in_channels != vae.config.latent_channels:
    raise diffusers_configs.UnsupportedConfigError(
      f'{folder}: the U-Net takes {unet.config.in_channels} channels, the '
      f'VAE gives {vae.config.latent_channels}-channel latents.'
    )
  return StableDiffusion(unet, vae, text, scaling_factor)


def abstract_unet_params(config: sd_unet.SDUNetConfig) -> dict:
  """ShapeDtypeStructs of an SDUNet's params."""
  size, channels = config.sample_size, config.in_channels
  z = jnp.zeros((1, size, size, channels))
  inputs = dict(
    z=z,
    logsnr=jnp.zeros((1,)),
    context=None
    if config.cross_attention_dim is None
    else jnp.zeros((1, 1, config.cross_attention_dim)),
    labels=None if config.num_class_embeds is None else jnp.zeros((1,), int),
    w=jnp.zeros((1,)) if config.use_w_embedding else None,
    known={'mask': z[..., :1], 'masked': z} if config.inpainting else None,
  )
  return jax.eval_shape(
    lambda rng: sd_unet.SDUNet(config).init(rng, **inputs, train=False)[
      'params'
    ],
    jax.random.key(0),
  )


def abstract_vae_params(config: autoencoder.AutoencoderConfig) -> dict:
  """ShapeDtypeStructs of an Autoencoder's params."""
  factor = config.downsampling_factor
  images = jnp.zeros((1, factor, factor, config.in_channels))
  return jax.eval_shape(
    lambda rng: autoencoder.Autoencoder(config).init(
      rng, images, sample_posterior=False
    )['params'],
    jax.random.key(0),
  )


def abstract_text_encoder_params(
  config: text_encoder.TextEncoderConfig,
) -> dict:
  """ShapeDtypeStructs of a TextEncoder's params."""
  return jax.eval_shape(
    lambda rng: text_encoder.TextEncoder(config).init(
      rng, text_encoder.example_tokens(1, 1)
    )['params'],
    jax.random.key(0),
  )


def _check_schedule(scheduler: dict, where: epath.Path) -> None:
  different = {
    key: scheduler.get(key)
    for key, value in SCHEDULE.items()
    if not _matches(scheduler.get(key), value)
  }
  if different:
    raise diffusers_configs.UnsupportedConfigError(
      f"{where}: {different}; gdd implements Stable Diffusion 1.x / 2.x's "
      f'schedule {SCHEDULE} (method.md §11).'
    )


def _matches(value, expected) -> bool:
  if isinstance(expected, float):
    return isinstance(value, (int, float)) and np.isclose(value, expected)
  return value == expected


def _renamed_vae_attention(state_dict: dict) -> dict:
  """Old diffusers VAE attention names (query, key, …) → today's."""
  renamed = {}
  for key, value in state_dict.items():
    *modules, leaf = key.split('.')
    if len(modules) > 1 and modules[-1] in _OLD_VAE_ATTENTION:
      modules[-1] = _OLD_VAE_ATTENTION[modules[-1]]
    renamed['.'.join([*modules, leaf])] = value
  return renamed
