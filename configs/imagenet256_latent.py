r"""Class-conditional ImageNet 256×256 in latent space (GD §4.2), paper scale.

ImageNet (TFDS imagenet2012, 1000 classes) centre-cropped to 256×256 as ADM
crops it (gdd/data/tfds.py `_center_crop`). The chain: a KL autoencoder of
Stable Diffusion's VAE shape (256×256×3 → 32×32×4, factor 8), a CFG teacher
— the SD U-Net with a class embedding and self-attention transformers, no
text (gdd/models/class_sd_unet.py) — on its scaled latents, then stage one
and the halving rounds from 1024 steps, as for ImageNet 64.

The data needs a manual download of ImageNet (ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in $DATA/downloads/manual/); prepare it with

  tfds build imagenet2012 --data_dir=$DATA

then run (on a TPU pod, see launch/):

  python -m gdd.main --config=configs/imagenet256_latent.py \
      --workdir=$WORKDIR --config.data.data_dir=$DATA

Check the memory settings on another slice first with

  python -m gdd.main --config=configs/imagenet256_latent.py \
      --workdir=$WORKDIR --mode=plan --config.plan.target=v4-32

`--config=configs/imagenet256_latent.py:quick` is a tiny model for smoke
tests.
"""

from gdd import config_lib


def get_config(variant: str = ''):
  config = config_lib.base_config()
  config.data.update(name='imagenet256', random_flip=True)
  config.space = 'latent'
  _autoencoder(config)
  _teacher(config)
  # Stage one and the halving rounds: the base config's, as ImageNet 64
  # (w ∈ [0, 4], 50k updates each, rounds 1024 → … → 1 steps: the PD/GD
  # ImageNet 64 teacher step count, method.md §6).
  config.grids.teacher_num_steps = 128
  # FID/IS against the whole validation split (50k), as ImageNet 64; w=0.5
  # is LDM-4-G's guidance (scale 1.5) for its best ImageNet 256 FID.
  config.evaluate.update(
    reference_split='validation',
    inception_weights='inception_fid.npz',
    ws=(0.0, 0.5, 1.0, 4.0),
  )
  return config_lib.apply_variant(config, variant, quick=_make_quick)


def _autoencoder(config) -> None:
  """Stable Diffusion's VAE shape (83.7M params), trained here with gdd's
  L1 + 1e-6·KL loss (no perceptual or adversarial term, unlike SD's)."""
  config.autoencoder.model.update(
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    norm_num_groups=32,
    dtype='bfloat16',
  )
  # Steps and batch: a choice (SD's VAE is a different data set and loss).
  # 2 micro-batches: 32 images of 256×256 per H100 do not fit (--mode=plan).
  config.autoencoder.update(
    num_train_steps=100_000,
    batch_size=256,
    grad_accum_steps=2,
    ema_decay=0.999,
    grids_every=10_000,
    checkpoint_every=5_000,
  )


def _teacher(config) -> None:
  """The class-conditional SD U-Net (369.9M params) and its training.

  In the spirit of LDM's ImageNet 256 models — LDM-4 cin256
  (configs/latent-diffusion/cin256-v2.yaml: 64×64×3 VQ latents, 192
  channels × (1, 2, 3, 5), 2 res blocks, attention at 32/16/8, ~400M
  params) — on SD's 32×32×4 latents: 256 channels × (1, 2, 4), 2 resnets
  per block, transformers (self-attention + GEGLU) at 32, 16 and 8 with
  heads of 64 channels (SD 2's width; cin256 uses one head per block).
  """
  config.model = config_lib.sd_unet_model_config(
    block_out_channels=(256, 512, 1024),
    layers_per_block=2,
    down_block_types=('CrossAttnDownBlock2D',) * 3,
    up_block_types=('CrossAttnUpBlock2D',) * 3,
    attention_head_dim=(4, 8, 16),
    mean_type='both',
  )
  config.teacher.update(
    # Step count and batch: a choice (LDM and DiT train for 400k+ steps).
    num_train_steps=400_000,
    batch_size=1024,
    ema_decay=0.9999,
    grids_every=20_000,
    checkpoint_every=5_000,
  )
  config.teacher.optimizer.update(
    name='adam', learning_rate=1e-4, warmup_steps=1000, grad_clip_norm=1.0
  )
  # bfloat16 compute with float32 params, the state split over 8 devices
  # and 2 micro-batches per step fit the batch on 8×H100 and on a v5e-64
  # slice (--mode=plan; README, "Planning a run").
  config.model.dtype = 'bfloat16'
  config.memory.fsdp = 8
  config.teacher.grad_accum_steps = 2


def _make_quick(config) -> None:
  """Minutes on real data: tiny networks, a few dozen steps per stage."""
  config_lib.make_quick(config)
  config.autoencoder.model.update(
    block_out_channels=(8, 8, 8, 8), norm_num_groups=4, dtype='float32'
  )
  config.autoencoder.update(
    num_train_steps=40,
    batch_size=32,
    grad_accum_steps=1,
    log_every=10,
    grids_every=40,
    checkpoint_every=20,
    scaling_examples=256,
    eval_examples=64,
  )
  config.autoencoder.optimizer.update(warmup_steps=5)
  config.model.update(
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
    up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'),
    attention_head_dim=(2, 2),
    norm_num_groups=8,
  )
  config.evaluate.num_reference = 500
  config.distill.initial_num_steps = 4
