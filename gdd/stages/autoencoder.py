"""The autoencoder stage: the frozen encoder/decoder of a latent space.

Trains a KL autoencoder (`gdd.models.autoencoder`, Stable Diffusion's
AutoencoderKL architecture) on the data set's images with reconstruction
+ kl_weight · KL (LDM's loss without its perceptual and adversarial terms),
then measures on its EMA params the latent scaling factor s = 1 / std of
the training latents (method.md §9; Stable Diffusion's 0.18215 is that
number for its VAE) and the reconstruction PSNR on held-out images, and
records both in the stage folder (`workdir_lib.latent_record`). Every later
stage of a latent config diffuses in `spaces.LatentSpace` with these params
frozen. Exists only for configs with config.space='latent'.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from gdd import data, images, paths, sampling, workdir_lib
from gdd.models import autoencoder as autoencoder_lib
from gdd.stages import Stage, StageKind, common, pretrained
from gdd.train import checkpointing, sharding

NAME = 'autoencoder'
# Images encoded per jitted call while measuring s and the PSNR.
_EVAL_BATCH = 256
# Held-out images shown in the reconstruction grid (inputs | outputs).
_GRID_IMAGES = 16


def uses_latent_space(config: ml_collections.ConfigDict) -> bool:
  """Whether the chain of `config` diffuses in an autoencoder's latents."""
  return config.space == 'latent'


def init_params(model: autoencoder_lib.Autoencoder, shape, rng: jax.Array):
  """Fresh params of `model` (shapes from one image of `shape`)."""
  images = jnp.zeros((1, *shape), jnp.float32)
  return model.init(rng, images, sample_posterior=False)['params']


def loss_fn(
  params, frozen_params, batch, rng: jax.Array, *, model, config
) -> tuple[jnp.ndarray, dict]:
  """Reconstruction of a posterior sample + kl_weight · KL."""
  del frozen_params  # Learns from the images alone.
  images_in = batch['image']
  reconstruction, mean, logvar = model.apply(
    {'params': params}, images_in, rng, sample_posterior=True
  )
  return autoencoder_lib.autoencoder_loss(
    images_in,
    reconstruction,
    mean,
    logvar,
    kl_weight=config.autoencoder.kl_weight,
    reconstruction_loss=config.autoencoder.reconstruction_loss,
  )


def make_stage(
  config: ml_collections.ConfigDict, info: data.DatasetInfo
) -> Stage:
  """The autoencoder `Stage`; it writes no sample grids (nothing to sample)."""
  model = common.build_autoencoder(config, info)
  return Stage(
    name=NAME,
    train_config=config.autoencoder,
    init_params=lambda rng, frozen: init_params(model, info.image_shape, rng),
    loss_fn=functools.partial(loss_fn, model=model, config=config),
    frozen_params=None,
    sample_panels={},
    sample_ws=(),
  )


def _encoded(model, params, image_batches):
  """(posterior means, reconstructions) of host image batches, on the host."""
  encode = jax.jit(
    lambda p, x: model.apply({'params': p}, x, sample_posterior=False)
  )
  means, reconstructions = [], []
  for batch in image_batches:
    reconstruction, mean, _ = encode(params, jnp.asarray(batch))
    means.append(np.asarray(mean))
    reconstructions.append(np.asarray(reconstruction))
  return np.concatenate(means), np.concatenate(reconstructions)


def _batches(array: np.ndarray):
  return [array[i : i + _EVAL_BATCH] for i in range(0, len(array), _EVAL_BATCH)]


def _first_images(data_config, split: str, num: int) -> np.ndarray:
  """The first `num` images of `split`, or all if it has fewer."""
  num = min(num, data.split_size(data_config, split))
  return data.eval_arrays(data_config, split=split, num_examples=num)['image']


def measure(config, info, params) -> dict:
  """The latent scaling factor and held-out PSNR of trained params.

  s = 1 / std of every latent value of the first
  `autoencoder.scaling_examples` training images (their posterior means),
  so the diffusion model sees unit-scale data; PSNR (dB, images in [−1, 1])
  of the first `autoencoder.eval_examples` held-out images, reconstructed
  from their posterior means as the latent space uses them. A split with
  fewer images (a small shard folder) gives all of them.
  """
  model = common.build_autoencoder(config, info)
  ae = config.autoencoder
  train = _first_images(config.data, 'train', ae.scaling_examples)
  held_out = _first_images(
    config.data, data.held_out_split(config.data), ae.eval_examples
  )
  means, _ = _encoded(model, params, _batches(train))
  _, reconstructions = _encoded(model, params, _batches(held_out))
  psnr = autoencoder_lib.psnr(jnp.asarray(held_out), reconstructions)
  return {
    'scaling_factor': float(1.0 / np.std(means)),
    'latent_mean': float(np.mean(means)),
    'psnr_db': float(jnp.mean(psnr)),
    'num_scaling_examples': len(train),
    'num_psnr_examples': len(held_out),
    'grid': np.concatenate(
      [held_out[:_GRID_IMAGES], reconstructions[:_GRID_IMAGES]]
    ),
  }


def _record(ctx, params, scaling_factor: float | None = None) -> None:
  """Measures and records s and the PSNR once, with a reconstruction grid.

  A given `scaling_factor` (a pretrained VAE's) is recorded as s; the one
  measured on the data is kept beside it as `data_scaling_factor`.
  """
  stage_dir = workdir_lib.stage_dir(ctx.workdir, NAME)
  if workdir_lib.read_latent_record(stage_dir) is not None:
    return
  stats = measure(ctx.config, ctx.info, jax.device_get(params))
  if scaling_factor is not None:
    stats['data_scaling_factor'] = stats['scaling_factor']
    stats['scaling_factor'] = scaling_factor
  grid = stats.pop('grid')
  logging.info(
    '%s: scaling factor %.5f, held-out PSNR %.2f dB',
    NAME,
    stats['scaling_factor'],
    stats['psnr_db'],
  )
  if jax.process_index() == 0:
    images.save_png(
      workdir_lib.reconstruction_grid_file(stage_dir),
      images.make_grid(images.to_uint8(grid), num_rows=2),
      upscale=images.display_scale(ctx.info.image_shape[0]),
    )
    workdir_lib.write_latent_record(stage_dir, stats)
  sharding.sync_processes('latent_record')


def _train(ctx, load_input):
  """Trains (or loads) the autoencoder; records s and the PSNR.

  With `config.pretrained.folder`, Stable Diffusion's VAE is imported
  instead, with SD's scaling factor (`stages.pretrained`).
  """
  del load_input
  config, info = ctx.config, ctx.info
  model = common.build_autoencoder(config, info)
  abstract = jax.eval_shape(
    functools.partial(init_params, model, info.image_shape),
    jax.random.PRNGKey(0),
  )
  if not pretrained.enabled(config):
    params = ctx.run_stage(
      NAME,
      lambda: make_stage(config, info),
      name=NAME,
      abstract_params=abstract,
    )
    _record(ctx, params)
    return params
  pretrained.check(config, info)
  params = ctx.import_stage(
    NAME,
    name=NAME,
    load=lambda: pretrained.autoencoder_params(config),
    abstract_params=abstract,
  )
  _record(ctx, params, scaling_factor=pretrained.scaling_factor(config))
  return params


def load_space_params(config: ml_collections.ConfigDict, workdir):
  """The frozen latent space's params of `workdir`; None in pixel space.

  {'autoencoder': the exported params, 'scaling_factor': float32 s}, read
  from a finished, measured autoencoder folder.

  Raises:
    checkpointing.MissingExportError: the autoencoder is not finished; the
      message says which --mode trains it.
  """
  if not uses_latent_space(config):
    return None
  info = data.get_info(config.data)
  stage_dir = workdir_lib.stage_dir(paths.resolve(workdir), NAME)
  record = workdir_lib.read_latent_record(stage_dir)
  if not workdir_lib.is_finished(stage_dir) or record is None:
    raise checkpointing.MissingExportError(
      f'This latent-space config needs a finished autoencoder in '
      f'{stage_dir}; run --mode=autoencoder (or the default --mode=all) '
      'first.'
    )
  model = common.build_autoencoder(config, info)
  abstract = jax.eval_shape(
    functools.partial(init_params, model, info.image_shape),
    jax.random.PRNGKey(0),
  )
  rep = sharding.replicated(sharding.make_mesh())
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract
  )
  return {
    'autoencoder': checkpointing.load_params(
      workdir_lib.params_dir(stage_dir), target
    ),
    'scaling_factor': np.float32(record['scaling_factor']),
  }


def _sampler_folder(workdir, num_steps, sampler, w):
  raise sampling.SampleRequestError(
    'The autoencoder is not a diffusion model and samples nothing: choose '
    'a diffusion stage (teacher, guided, distill, single_w).'
  )


def _summary(config, workdir) -> str | None:
  record = workdir_lib.read_latent_record(
    workdir_lib.stage_dir(paths.resolve(workdir), NAME)
  )
  if record is None:
    return None
  return (
    f'autoencoder: held-out PSNR {record["psnr_db"]:.2f} dB, latent scaling '
    f'factor {record["scaling_factor"]:.5f}'
  )


KIND = StageKind(
  name=NAME,
  mode='autoencoder',
  section='autoencoder',
  needs=None,
  in_chain=True,
  nfe_per_step=0,
  samplers=(),
  train=_train,
  sampler_folder=_sampler_folder,
  sampler_model=lambda config, info: (
    common.build_autoencoder(config, info),
    None,
  ),
  w_range=lambda config, trained_w: (0.0, 0.0),
  eval_rows=lambda ev, workdir: [],
  series={},
  plan_stage=make_stage,
  summary=_summary,
  applies=uses_latent_space,
  trains=lambda config: not pretrained.enabled(config),
  in_space=False,
)
