"""A gdd student → diffusers' layout, to run anywhere diffusers runs.

`export_unet` writes a gdd SD U-Net (a distilled student) as a diffusers
`unet/` folder, `export_pipeline` a whole StableDiffusionPipeline folder
around it (the source SD folder's VAE, text encoder and tokenizer; DDIM
with SD's timesteps on the student's grid). A w-conditioned student is
exported at one w, its w-embedding folded into the time embedding's last
bias (exact: the w-embedding is added to the time embedding, and both end
in a linear layer), so any UNet2DConditionModel runtime samples it without
guidance.
"""

import json

import flax
import jax.numpy as jnp
import numpy as np
from etils import epath

from gdd.models import layers, sd_unet
from gdd.weights import diffusers_configs, naming, safetensors_io
from gdd.weights import stable_diffusion as sd


def export_unet(
  folder: epath.PathLike,
  config: sd_unet.SDUNetConfig,
  params: dict,
  *,
  w: float | None = None,
  dtype: np.dtype = np.float32,
) -> epath.Path:
  """Writes a gdd SDUNet as a diffusers `unet/` folder; returns it.

  A w-conditioned student needs `w`: its w-embedding at that w is folded
  into `time_embedding/linear_2/bias`. Refuses to overwrite an existing
  folder's weights (exports are never destroyed).
  """
  folder = epath.Path(folder)
  weights = folder / f'{sd.STEMS[sd.UNET]}.safetensors'
  if weights.exists():
    raise FileExistsError(
      f'{weights} exists; gdd does not overwrite exports: pick a new folder '
      'or remove it yourself.'
    )
  params = fold_w_embedding(config, params, w)
  state_dict = sd.join_inpainting_conv_in(
    naming.to_torch(params, dtype), config
  )
  diffusers_config = diffusers_configs.diffusers_unet_config(config)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / 'config.json').write_text(json.dumps(diffusers_config, indent=2))
  safetensors_io.save(state_dict, weights, metadata={'format': 'pt'})
  return folder


# The scheduler of an exported student: DDIM on SD's schedule whose N-step
# timesteps 1000k/N − 1 are the student's grid t = k/N (N dividing 1000;
# `schedules.sd_logsnr_from_t`), ending clean.
_STUDENT_SCHEDULER = {
  '_class_name': 'DDIMScheduler',
  **sd.SCHEDULE,
  'timestep_spacing': 'trailing',
  'set_alpha_to_one': True,
  'steps_offset': 0,
  'clip_sample': False,
}
_PIPELINE_INDEX = {
  '_class_name': 'StableDiffusionPipeline',
  # The diffusers version the format was tested with (constraints.txt);
  # diffusers' inpainting pipeline reads it.
  '_diffusers_version': '0.42.1',
  'feature_extractor': [None, None],
  'requires_safety_checker': False,
  'safety_checker': [None, None],
  'scheduler': ['diffusers', 'DDIMScheduler'],
  'text_encoder': ['transformers', 'CLIPTextModel'],
  'tokenizer': ['transformers', 'CLIPTokenizer'],
  'unet': ['diffusers', 'UNet2DConditionModel'],
  'vae': ['diffusers', 'AutoencoderKL'],
}


def check_new_folder(out: epath.PathLike) -> None:
  """Raises FileExistsError if `out` exists and is not empty."""
  out = epath.Path(out)
  if out.exists() and any(out.iterdir()):
    raise FileExistsError(
      f'{out} exists and is not empty; gdd does not overwrite exports: pick '
      'a new folder.'
    )


def export_pipeline(
  source: epath.PathLike,
  out: epath.PathLike,
  config: sd_unet.SDUNetConfig,
  params: dict,
  *,
  w: float | None = None,
) -> epath.Path:
  """A diffusers StableDiffusionPipeline folder of a student (for SD's
  inpainting U-Net a StableDiffusionInpaintPipeline one); returns it.

  unet/ is the student (`export_unet`, at `w`); vae/, text_encoder/ and
  tokenizer/ are copied from the SD folder `source` it was distilled from;
  scheduler/ is DDIM on the student's grid. `StableDiffusionPipeline
  .from_pretrained(out)` then samples it with `num_inference_steps=N` and
  `guidance_scale=1` (guidance is inside the student). Refuses an `out`
  that exists and is not empty.
  """
  source, out = epath.Path(source), epath.Path(out)
  check_new_folder(out)
  copied = (sd.VAE, sd.TEXT_ENCODER, 'tokenizer')
  missing = [sub for sub in copied if not (source / sub).is_dir()]
  if missing:
    raise sd.WeightsNotFoundError(
      f'{source} has no {missing} folder(s) to copy into the export: is it '
      'the Stable Diffusion folder the chain was distilled from?'
    )
  for sub in copied:
    (out / sub).mkdir(parents=True)
    for file in (source / sub).iterdir():
      file.copy(out / sub / file.name)
  prediction = {v: k for k, v in diffusers_configs.PREDICTION_TYPES.items()}
  scheduler = dict(
    _STUDENT_SCHEDULER, prediction_type=prediction[config.mean_type]
  )
  (out / 'scheduler').mkdir()
  (out / 'scheduler' / 'scheduler_config.json').write_text(
    json.dumps(scheduler, indent=2)
  )
  index = dict(_PIPELINE_INDEX)
  if config.inpainting:
    index['_class_name'] = 'StableDiffusionInpaintPipeline'
  (out / 'model_index.json').write_text(json.dumps(index, indent=2))
  export_unet(out / sd.UNET, config, params, w=w)
  return out


def fold_w_embedding(
  config: sd_unet.SDUNetConfig, params: dict, w: float | None
) -> dict:
  """A student's params at one w without `w_embedding` (or the teacher's).

  emb = time_embedding(t) + w_embedding(w) and time_embedding ends in the
  linear layer linear_2, so at a fixed w the w term is a constant added to
  linear_2's bias.
  """
  if config.use_w_embedding != (w is not None):
    raise ValueError(
      f'Pass w exactly for a w-conditioned student (use_w_embedding='
      f'{config.use_w_embedding}); got w={w}.'
    )
  if w is None:
    return params
  if not 0.0 <= w <= config.w_max:
    raise ValueError(
      f"w={w} is outside the student's range [0, {config.w_max}]."
    )
  mlp = layers.EmbeddingMLP(
    config.time_embed_dim, layer_names=sd_unet.MLP_LAYERS
  )
  features = sd_unet.sinusoid(
    sd_unet.w_input(jnp.full((1,), w, jnp.float32), config), config
  )
  term = mlp.apply({'params': params['w_embedding']}, features)[0]
  folded = flax.core.unfreeze(params)
  del folded['w_embedding']
  bias = folded['time_embedding']['linear_2']['bias']
  folded['time_embedding']['linear_2']['bias'] = np.asarray(bias) + np.asarray(
    term
  )
  return folded
