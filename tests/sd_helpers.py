"""A tiny random Stable Diffusion for the SD tests: built with the reference
implementations (diffusers, transformers; torch CPU, test-only) and saved in
diffusers' layout, with mock image–caption shards and the `:tiny` config
that distils it."""

import diffusers
import ml_collections
import numpy as np
import torch
import transformers

from gdd import config_lib, tokenization
from tests import helpers

CAPTIONS = ('a cat', 'cats', 'a cat at a cat', 'at a cat')


def perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for param in module.parameters():
      param.add_(0.05 * torch.randn(param.shape, generator=generator))
  return module


def save_random_sd(config, folder) -> None:
  """A random SD whose networks are the ones `config` builds, in diffusers'
  layout (torch networks saved with save_pretrained)."""
  torch.manual_seed(0)
  model = config.model
  tokenizer = tokenization.ClipTokenizer.from_files(
    *helpers.write_clip_files(mkdir_new(folder / 'tokenizer'))
  )
  text = config.text.encoder
  unet = diffusers.UNet2DConditionModel(
    # SD's inpainting U-Net: latents, mask and masked image latents.
    in_channels=9 if model.inpainting else 4,
    out_channels=4,
    sample_size=config.data.image_size // 2,
    block_out_channels=model.block_out_channels,
    layers_per_block=model.layers_per_block,
    down_block_types=model.down_block_types,
    up_block_types=model.up_block_types,
    cross_attention_dim=text.hidden_size,
    attention_head_dim=model.attention_head_dim,
    use_linear_projection=model.use_linear_projection,
    norm_num_groups=model.norm_num_groups,
  )
  ae = config.autoencoder.model
  vae = diffusers.AutoencoderKL(
    block_out_channels=ae.block_out_channels,
    down_block_types=('DownEncoderBlock2D',) * len(ae.block_out_channels),
    up_block_types=('UpDecoderBlock2D',) * len(ae.block_out_channels),
    latent_channels=ae.latent_channels,
    layers_per_block=ae.layers_per_block,
    norm_num_groups=ae.norm_num_groups,
  )
  clip = transformers.CLIPTextModel(
    transformers.CLIPTextConfig(
      vocab_size=tokenizer.vocab_size,
      max_position_embeddings=config.text.max_length,
      eos_token_id=tokenizer.eos_id,
      bos_token_id=tokenizer.eos_id - 1,
      **text.to_dict(),
    )
  )
  prediction = {'eps': 'epsilon', 'v': 'v_prediction'}[model.mean_type]
  for name, network in (('unet', unet), ('vae', vae), ('text_encoder', clip)):
    perturbed(network, seed=len(name)).save_pretrained(folder / name)
  diffusers.DDIMScheduler(
    beta_schedule='scaled_linear',
    beta_start=0.00085,
    beta_end=0.012,
    prediction_type=prediction,
    clip_sample=False,
  ).save_pretrained(folder / 'scheduler')


def mkdir_new(path):
  path.mkdir(parents=True)
  return path


def tiny_config(
  name: str, sd_folder, shards, variant: str = 'tiny'
) -> ml_collections.ConfigDict:
  config = helpers.shrink_latent_chain(helpers.load_config(name, variant))
  config.pretrained.folder = str(sd_folder)
  config.data.data_dir = str(shards)
  # One round, 2 → 1: each round compiles its own programs (CI minutes).
  config.distill.update(num_train_steps=2, initial_num_steps=2)
  return config


def tiny_sd(name: str, tmp_path_factory, variant: str = 'tiny'):
  """(validated `name`:`variant` config, its root) with a random SD of its
  layout in root/sd and mock shards in root/shards."""
  root = tmp_path_factory.mktemp(name)
  helpers.write_shards(
    root / 'shards',
    num_shards=1,
    per_shard=8,
    caption=lambda s, k: CAPTIONS[k % len(CAPTIONS)],
  )
  save_random_sd(helpers.load_config(name, variant), root / 'sd')
  config = tiny_config(name, root / 'sd', root / 'shards', variant)
  config_lib.validate(config)
  return config, root


def prompt_states(config, sd_folder):
  """captions → CLIP states by the torch text encoder on gdd's token ids."""
  tokenizer = tokenization.for_config(config, None)
  clip = transformers.CLIPTextModel.from_pretrained(sd_folder / 'text_encoder')

  def states(texts):
    with torch.no_grad():
      ids = torch.from_numpy(tokenizer.encode(texts).astype(np.int64))
      return clip(ids).last_hidden_state

  return states
