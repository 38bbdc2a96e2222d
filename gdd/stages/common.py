"""Config → what every stage shares: network, condition, space, schedule."""

import dataclasses
import functools

import jax
import ml_collections

from gdd import (
  conditioning,
  config_lib,
  data,
  errors,
  masks,
  spaces,
  tokenization,
)
from gdd.diffusion import schedules
from gdd.models import (
  UNet,
  UNetConfig,
  autoencoder,
  class_sd_unet,
  sd_unet,
  text_encoder,
  text_unet,
)
from gdd.stages import PanelFn, Stage


def build_model(
  config: ml_collections.ConfigDict,
  info: data.DatasetInfo,
  *,
  use_w_embedding: bool = False,
  w_max: float = 4.0,
  student: bool = False,
) -> UNet | text_unet.TextUNet | class_sd_unet.ClassSDUNet:
  """The denoising network of `config.model` for `info`'s data.

  'unet': the pixel U-Net; 'sd_unet': the SD-architecture U-Net on the
  config's space, behind a text encoder for caption data sets, with a class
  embedding (and no text) for class data sets. `model.inpainting` makes any
  of them an inpainting network (its cond holds the known region). Its
  remat policy is `config.memory.remat`: a memory setting, not part of what
  the network is, so it may change between runs of one stage. A `student`
  reads its output as `config_lib.student_mean_type` (the same channels as
  the teacher's, so it starts from the teacher's weights).
  """
  model_config = config.model.to_dict()
  if student:
    model_config['mean_type'] = config_lib.student_mean_type(config)
  kind = model_config.pop('kind')
  options = dict(
    use_w_embedding=use_w_embedding, w_max=w_max, remat=config.memory.remat
  )
  if kind == 'sd_unet' and info.has_captions:
    return _text_unet(config, info, model_config, options)
  if kind == 'sd_unet':
    return _class_sd_unet(config, info, model_config, options)
  height, _, channels = info.image_shape
  for key in ('ch_mult', 'attn_resolutions'):
    model_config[key] = tuple(model_config[key])
  return UNet(
    UNetConfig(
      image_size=height,
      in_channels=channels,
      num_classes=info.num_classes,
      **options,
      **model_config,
    )
  )


def _class_sd_unet(
  config, info, model_config, options
) -> class_sd_unet.ClassSDUNet:
  """SD U-Net with a class embedding on the config's space (class data)."""
  height, _, channels = build_space(config, info).shape
  return class_sd_unet.ClassSDUNet(
    class_sd_unet.ClassSDUNetConfig(
      sd_unet.SDUNetConfig(
        sample_size=height,
        in_channels=channels,
        cross_attention_dim=None,
        num_class_embeds=info.num_classes,
        **options,
        **model_config,
      )
    )
  )


def _text_unet(config, info, model_config, options) -> text_unet.TextUNet:
  """Text encoder + SD U-Net on the config's space (caption data sets)."""
  height, _, channels = build_space(config, info).shape
  tokenizer = tokenization.for_config(config, info)
  text = text_encoder.TextEncoderConfig(
    vocab_size=tokenizer.vocab_size,
    eos_token_id=tokenizer.eos_id,
    max_position_embeddings=tokenizer.max_length,
    dtype=model_config['dtype'],
    remat=options['remat'],
    **config.text.encoder.to_dict(),
  )
  unet_config = sd_unet.SDUNetConfig(
    sample_size=height,
    in_channels=channels,
    cross_attention_dim=text.hidden_size,
    **options,
    **model_config,
  )
  return text_unet.TextUNet(
    text_unet.TextUNetConfig(
      unet=unet_config, text=text, max_length=tokenizer.max_length
    )
  )


# Params subtree of a text-conditional network's text encoder.
TEXT_ENCODER = 'text_encoder'


def frozen_subtrees(
  config: ml_collections.ConfigDict, *, teacher: bool = False
) -> tuple[str, ...]:
  """The params subtrees a stage never updates (`Stage.frozen_subtrees`).

  The text encoder of a caption data set: trained with the teacher when
  `config.text.train_encoder` (as GLIDE does), frozen in every student,
  which keeps its teacher's copy (and so needs no second encoder).
  """
  if config.data.name not in config_lib.CAPTION_DATASETS:
    return ()
  if teacher and config.text.train_encoder:
    return ()
  return (TEXT_ENCODER,)


def build_conditioning(
  config: ml_collections.ConfigDict, info: data.DatasetInfo
) -> conditioning.ClassConditioning | conditioning.TextConditioning:
  """What the models of `config` are conditioned on: classes or captions.

  Caption data sets (`info.has_captions`) give text conditioning with the
  config's tokenizer (`config.text`), cycling the held-out captions in
  grids and evaluation; the others their classes.
  """
  if not info.has_captions:
    return conditioning.ClassConditioning(info.num_classes)
  return conditioning.TextConditioning(
    tokenization.for_config(config, info),
    data.held_out_captions(config.data, config.text.num_held_out_captions),
  )


def build_space(config: ml_collections.ConfigDict, info: data.DatasetInfo):
  """The space the stages' models diffuse in (`config.space`).

  'pixel': the pixels of `info`; 'latent': the latents of the autoencoder
  stage's network (its params arrive later, as `space_params`).
  """
  if config.space == 'latent':
    return _latent_space(config, info)
  return spaces.pixel_space(config, info.image_shape)


def build_autoencoder(
  config: ml_collections.ConfigDict, info: data.DatasetInfo
) -> autoencoder.Autoencoder:
  """The autoencoder of `config.autoencoder.model` for `info`'s images."""
  channels = info.image_shape[-1]
  return autoencoder.Autoencoder(
    autoencoder.AutoencoderConfig(
      in_channels=channels,
      out_channels=channels,
      remat=config.memory.remat,
      **config.autoencoder.model.to_dict(),
    )
  )


def _latent_space(
  config: ml_collections.ConfigDict, info: data.DatasetInfo
) -> spaces.LatentSpace:
  """The latent space of the autoencoder of `config` on `info`'s images."""
  model = build_autoencoder(config, info)
  height, width, _ = info.image_shape
  factor = model.config.downsampling_factor
  if height % factor or width % factor:
    raise errors.UserError(
      f'The images are {height}×{width}, not a multiple of the '
      f'autoencoder downsampling factor {factor} (2 ** (levels − 1), '
      'levels = len(config.autoencoder.model.block_out_channels)): use '
      'fewer levels or another config.data.image_size.'
    )
  return spaces.LatentSpace(
    autoencoder=model,
    shape=(height // factor, width // factor, model.config.latent_channels),
    image_shape=tuple(info.image_shape),
  )


def abstract_space_params(
  config: ml_collections.ConfigDict, info: data.DatasetInfo
):
  """ShapeDtypeStructs of the space's params (None in pixel space)."""
  if config.space != 'latent':
    return None
  model = build_autoencoder(config, info)
  images = jax.numpy.zeros((1, *info.image_shape))
  params = jax.eval_shape(
    lambda rng: model.init(rng, images, sample_posterior=False)['params'],
    jax.random.PRNGKey(0),
  )
  return {
    'autoencoder': params,
    'scaling_factor': jax.ShapeDtypeStruct((), jax.numpy.float32),
  }


def init_params(model, rng: jax.Array) -> dict:
  """Fresh params of `model` (shapes from a batch of one)."""
  z, logsnr, cond, w = model.example_inputs(1)
  return model.init(rng, z, logsnr, cond, w, train=False)['params']


def abstract_params(model: UNet):
  """ShapeDtypeStructs of `model`'s params (no computation)."""
  return jax.eval_shape(
    functools.partial(init_params, model), jax.random.PRNGKey(0)
  )


def logsnr_fn(config: ml_collections.ConfigDict):
  """t ↦ λ(t) of the config's schedule (and its log-SNR range)."""
  if config.diffusion.schedule == 'sd':
    return schedules.sd_logsnr_from_t
  return functools.partial(
    schedules.logsnr_from_t,
    logsnr_min=config.diffusion.logsnr_min,
    logsnr_max=config.diffusion.logsnr_max,
  )


def panel(sample_fn, *, of: str) -> PanelFn:
  """A sample-grid panel drawing `sample_fn` with the stage's `of` params.

  `of` is 'params' (the params being trained) or 'frozen' (the teacher's).
  """
  if of not in ('params', 'frozen'):
    raise ValueError(f"of={of!r}; allowed: 'params', 'frozen'.")

  def draw(params, frozen, rng, cond, w, space_params=None):
    chosen = params if of == 'params' else frozen
    return sample_fn(chosen, rng, cond, w, space_params=space_params)

  return draw


def in_space(stage: Stage, space, space_params) -> Stage:
  """`stage` trained in `space`: its loss sees x = space.encode(images).

  The frozen params become (the stage's frozen params, `space_params`), so
  the space's networks (a frozen autoencoder) enter the jitted step as an
  argument; the loss and the panels get their own part. Pixel space
  (`space_params` None) returns `stage` itself: nothing to encode.
  """
  if space_params is None:
    return stage

  def loss_fn(params, frozen, batch, rng):
    stage_frozen, frozen_space = frozen
    x = jax.lax.stop_gradient(space.encode(frozen_space, batch['image']))
    return stage.loss_fn(params, stage_frozen, dict(batch, image=x), rng)

  def in_space_panel(draw: PanelFn) -> PanelFn:
    return lambda params, frozen, rng, cond, w: draw(
      params, frozen[0], rng, cond, w, space_params=frozen[1]
    )

  return dataclasses.replace(
    stage,
    init_params=lambda rng, frozen: stage.init_params(rng, frozen[0]),
    loss_fn=loss_fn,
    frozen_params=(stage.frozen_params, space_params),
    sample_panels={
      name: in_space_panel(draw) for name, draw in stage.sample_panels.items()
    },
  )


# The random masks' stream, folded out of a step's key (`with_random_masks`):
# 'mask' in ASCII.
_RANDOM_MASKS_STREAM = 0x6D61736B


def inpainting_input(config: ml_collections.ConfigDict) -> str:
  """What the config's inpainting network reads as 'masked'
  (`conditioning.INPAINTING_INPUTS`); only SD U-Nets choose."""
  return config.model.get('inpainting_input', 'masked_latents')


def _random_space_masks(config, space, rng: jax.Array, batch_size: int):
  """A step's random training masks (`config.random_masks`) drawn at the
  images' size from their own stream, at the space's size."""
  height, width = space.image_shape[:2]
  mask = masks.random(
    jax.random.fold_in(rng, _RANDOM_MASKS_STREAM),
    batch_size,
    height,
    width,
    config.random_masks.to_dict(),
  )
  return masks.to_space(mask, space.shape)


def with_random_masks(
  stage: Stage, config: ml_collections.ConfigDict, space
) -> Stage:
  """`stage` trained as an inpainting model: random masks in every batch.

  Its loss sees the batch with the known region of `masks.random` masks
  (`config.random_masks`) drawn at the images' size and taken to the
  space's as the sampler takes a user's mask (`masks.to_space`): 'mask',
  and 'masked' = x · mask, x the batch's data in the diffusion space
  (`conditioning.with_known_region`). The stage's own loss is unchanged:
  its conditioning passes the known region on to the network and keeps it
  in the CFG null. The masks come from fold_in(rng, a stream of their own)
  and the loss gets rng itself, so it draws what it draws without masks,
  and step k's batch stays a function of (seed, k).

  In a latent space this wraps the stage inside `in_space`, so x are the
  latents of the whole image and 'masked' is those latents, masked. Stable
  Diffusion instead encodes the masked image with the VAE; masking the
  latents costs no second encoder pass per batch (nor at sampling), at the
  price that a kept latent next to the hole has seen a little of the hole
  through the encoder's receptive field (alike in training and sampling).
  Without `config.model.inpainting`, `stage` itself.
  """
  if not config.model.inpainting:
    return stage

  def loss_fn(params, frozen, batch, rng):
    x = batch['image']
    mask = _random_space_masks(config, space, rng, x.shape[0])
    masked_batch = conditioning.with_known_region(batch, x, mask)
    return stage.loss_fn(params, frozen, masked_batch, rng)

  return dataclasses.replace(stage, loss_fn=loss_fn)


def with_random_masked_images(stage: Stage, config, space) -> Stage:
  """`with_random_masks` for Stable Diffusion's inpainting input: 'masked'
  is the masked image encoded (`spaces.encode_masked`), as SD's inpainting
  U-Net was trained, at a second encoder pass per batch. Wraps a stage
  already `in_space` (a latent space): it needs the images themselves.
  """

  def loss_fn(params, frozen, batch, rng):
    images = batch['image']
    mask = _random_space_masks(config, space, rng, images.shape[0])
    masked = jax.lax.stop_gradient(
      spaces.encode_masked(space, frozen[1], images, mask)
    )
    masked_batch = conditioning.with_masked_input(batch, mask, masked)
    return stage.loss_fn(params, frozen, masked_batch, rng)

  return dataclasses.replace(stage, loss_fn=loss_fn)


def as_trained(
  stage: Stage, config: ml_collections.ConfigDict, space, space_params
) -> Stage:
  """`stage` as a chain trains it: with random masks for an inpainting
  model (`with_random_masks`, or `with_random_masked_images` for SD's
  inpainting input), in the config's space (`in_space`)."""
  if config.model.inpainting and inpainting_input(config) == 'masked_image':
    return with_random_masked_images(
      in_space(stage, space, space_params), config, space
    )
  return in_space(with_random_masks(stage, config, space), space, space_params)
