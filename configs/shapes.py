r"""Text-to-image in latent space, embedded: the generated `shapes` captions.

32×32 RGB images of one or two coloured shapes with captions such as "a
small red circle above a large blue square" (gdd/data/shapes.py; drawn, no
download). The whole latent chain runs on a laptop CPU: a KL autoencoder
(32×32×3 → 8×8×4), a CFG teacher — CLIP-architecture text encoder + SD
U-Net on the latents, the encoder trained with the U-Net — then stage one
and the halving rounds, every student with its teacher's encoder frozen.

  python -m gdd.main --config=configs/shapes.py --workdir=/tmp/gdd_shapes

`--config=configs/shapes.py:quick` is a minutes-long smoke run; `:inpaint`
(`:quick+inpaint`) trains the chain as inpainting models; `--mode=encoder`
distils the DDIM encoder (translation). Then

  python -m gdd.main --config=configs/shapes.py --workdir=/tmp/gdd_shapes \
    --mode=evaluate
"""

from gdd import config_lib


def get_config(variant: str = ''):
  config = config_lib.base_config()
  config.data.update(name='shapes', image_size=32)
  config.space = 'latent'
  config.autoencoder.model.update(
    latent_channels=4,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    norm_num_groups=8,
  )
  config.autoencoder.update(
    num_train_steps=1200,
    batch_size=32,
    ema_decay=0.999,
    ema_warmup=True,
    log_every=100,
    checkpoint_every=400,
    grids_every=1200,
  )
  config.autoencoder.optimizer.update(
    learning_rate=1e-3, warmup_steps=200, decay='cosine'
  )
  config.model = config_lib.sd_unet_model_config(
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
    up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
    attention_head_dim=2,
    norm_num_groups=8,
  )
  # The longest caption has 16 words; + BOS and EOS.
  config.text.update(max_length=18, num_held_out_captions=64)
  config.text.encoder.update(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
  )
  config.teacher.update(
    num_train_steps=2400,
    batch_size=64,
    ema_decay=0.998,
    ema_warmup=True,
    log_every=100,
    grids_every=2400,
    checkpoint_every=500,
  )
  config.teacher.optimizer.update(
    learning_rate=1e-3, warmup_steps=200, decay='cosine'
  )
  config.guided.update(
    num_train_steps=600,
    batch_size=64,
    ema_decay=0.995,
    ema_warmup=True,
    log_every=100,
    grids_every=600,
    checkpoint_every=300,
  )
  # 5e-4, not 2e-4: on digits a higher stage-one rate trained a better
  # student in the same updates (README, "Why this schedule").
  config.guided.optimizer.update(learning_rate=5e-4, decay='cosine')
  config.distill.update(
    num_train_steps=300,
    batch_size=64,
    log_every=100,
    grids_every=300,
    checkpoint_every=300,
  )
  config.distill.optimizer.learning_rate = 2e-4
  config.distill.initial_num_steps = 16
  # `--mode=encoder` (not part of the default chain; translation): the same
  # 16 → 1 halving as distill at w = 0, 200 updates per round (shapes'
  # rounds take ~1 s per update here).
  config.encoder.update(
    num_train_steps=200,
    batch_size=64,
    log_every=100,
    checkpoint_every=200,
    initial_num_steps=16,
  )
  config.encoder.optimizer.learning_rate = 2e-4
  config.grids.update(teacher_num_steps=32, samples_per_class=4)
  # Scored by the shapes classifier (gdd/evaluation/shapes_features.py):
  # FD-shapes, and how often samples show every attribute their caption
  # asks for, per attribute too. Samples cycle the held-out captions.
  config.evaluate.update(
    feature_extractor='shapes',
    num_samples=1000,
    batch_size=250,
    ws=(0.0, 1.0, 2.0, 4.0),
    # 2000 of the 20 000 train images: twice the samples per cell, so the
    # reference adds less estimation noise than they do; seconds to embed.
    num_reference=2000,
    real_split='test',
    teacher_num_steps=(256, 16, 8, 4),
    guided_num_steps=(16, 8, 4),
    # Stochastic rows at 8, 4 and 2 steps (the 4-, 2- and 1-step models).
    max_stochastic_steps=8,
    # The 256-step teacher against the 4-step student on one batch; 1024
    # teacher steps would add ~11 min here for the same ratio.
    speed_teacher_num_steps=(256,),
  )
  # Editing, inpainting and translation rows on held-out images, targets
  # the next held-out caption (gdd.evaluation.editing).
  config.evaluate.editing.enabled = True
  return config_lib.apply_variant(config, variant, quick=_make_quick)


def _make_quick(config) -> None:
  """Minutes: tiny networks, a few dozen steps per stage."""
  config_lib.make_quick(config)
  config.data.image_size = 16
  config.autoencoder.model.update(
    block_out_channels=(16, 16), norm_num_groups=8
  )
  config.autoencoder.update(
    num_train_steps=40,
    batch_size=32,
    log_every=10,
    grids_every=40,
    checkpoint_every=20,
    scaling_examples=256,
    eval_examples=64,
  )
  config.autoencoder.optimizer.update(warmup_steps=5)
  config.model.update(block_out_channels=(16, 32), norm_num_groups=8)
  config.text.encoder.update(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1
  )
  config.text.num_held_out_captions = 4
  config.evaluate.num_reference = 500
  # Rounds 2 → 1: the shortest chain that still has a halving round.
  config.distill.initial_num_steps = 4
