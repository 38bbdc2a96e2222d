r"""Text-to-image in latent space on your own image–caption shards.

The data is a folder of webdataset shards `00000.tar`, `00001.tar`, … whose
pairs are `KEY.jpg` (or .png, .webp) + `KEY.txt`, as img2dataset writes LAION
subsets (`--output_format webdataset`). The chain is the paper's latent,
text-conditional setting (GD §4.2): a KL autoencoder, then a CFG teacher —
CLIP's text transformer feeding Stable Diffusion 1.x's U-Net layout — then
stage one and the halving rounds on the latents.

Four settings are the user's; the first three have no default and are
refused (one message naming each, with an example) before anything runs:

  python -m gdd.main --config=configs/webdataset.py --workdir=$WORKDIR \
    --config.data.data_dir=/data/laion/shards \
    --config.text.vocab_file=$SD/tokenizer/vocab.json \
    --config.text.merges_file=$SD/tokenizer/merges.txt \
    --config.data.image_size=256

- data.data_dir: the shard folder.
- text.vocab_file, text.merges_file: CLIP's BPE files, from any Stable
  Diffusion 1.x download's `tokenizer/` folder ($SD above); they need the
  `clip` extra (pip install -e '.[clip]').
- data.image_size (default 256): the side images are resized (shorter
  side) and centre-cropped to; a multiple of 8, the autoencoder's
  downsampling, at most the shards' own size.
- data.held_out_dir (optional): a second shard folder, e.g. COCO captions
  written by img2dataset, never trained on: grids, --mode=sample and
  evaluation cycle its first `text.num_held_out_captions` captions. Unset,
  the first pairs of data_dir stand in (they are trained on too).

Everything trains from scratch: gdd loads no Stable Diffusion weights (only
their tokenizer files), so the autoencoder, text encoder and U-Net are sized
as a starting point rather than at SD's size: SD's VAE layout (4 levels,
f = 8, 4 latent channels: 256² images → 32²×4 latents) at half its width
(21M params), the U-Net's SD 1.x layout (cross-attention in the three upper
levels, 2 ResNets per level, 8 heads) at (192, 384, 768, 768) channels
(310M; SD 1.x: (320, 640, 1280, 1280), 860M) and a CLIP ViT-B/32-sized text
encoder (12 layers of 512, 63M; SD 1.x: ViT-L/14's 768) trained with the
U-Net as GLIDE does. Step counts and batch sizes are choices, not measured
here; check memory and time per step on your accelerators first with
--mode=plan --config.plan.target=8xH100 (README, "Planning a run").

--mode=evaluate scores FID and IS with the FID Inception-v3 weights,
converted once (README, "Evaluation"):
--config.evaluate.inception_weights=/path/to/inception_fid.npz. With a
held-out folder, --config.evaluate.reference_split=test compares the samples
with its images (COCO-style zero-shot FID) rather than data_dir's first
ones.

`--config=configs/webdataset.py:quick` is a minutes-long smoke run on the
same shards (tiny networks, 32×32 images, a few dozen steps per stage).
"""

from gdd import config_lib


def get_config(variant: str = ''):
  config = config_lib.base_config()
  config.data.update(name='webdataset', image_size=256)
  config.space = 'latent'
  _add_networks(config)
  _add_schedule(config)
  # 5000 samples, each with its own held-out caption (the paper's SD
  # numbers are COCO-5k FIDs); captions are read without their images.
  config.text.num_held_out_captions = 5000
  config.evaluate.update(
    feature_extractor='inception',
    inception_weights='inception_fid.npz',
    num_samples=5000,
    num_reference=5000,
    batch_size=256,
    ws=(0.0, 1.0, 2.0, 4.0),
    teacher_num_steps=(256, 16, 8, 4),
    guided_num_steps=(64, 16, 8, 4),
    speed_teacher_num_steps=(64,),
  )
  return config_lib.apply_variant(config, variant, quick=_make_quick)


def _add_networks(config) -> None:
  """SD 1.x's autoencoder, U-Net and text encoder layouts, smaller."""
  config.autoencoder.model.update(
    latent_channels=4,
    block_out_channels=(64, 128, 256, 256),
    layers_per_block=2,
    norm_num_groups=32,
  )
  config.model = config_lib.sd_unet_model_config(
    **dict(config_lib.SD_UNET_LAYOUT, block_out_channels=(192, 384, 768, 768)),
    attention_head_dim=8,
    dtype='bfloat16',
  )
  config.text.update(tokenizer='clip', max_length=77)
  config.text.encoder.update(
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
  )


def _add_schedule(config) -> None:
  """Stage lengths, batches and optimisers: a starting point (choices)."""
  config.autoencoder.update(
    num_train_steps=100_000,
    batch_size=64,
    ema_warmup=True,
    grids_every=10_000,
    checkpoint_every=5_000,
  )
  config.autoencoder.optimizer.update(learning_rate=1e-4, warmup_steps=1000)
  config.teacher.update(
    num_train_steps=300_000,
    batch_size=512,
    ema_decay=0.9999,
    ema_warmup=True,
    grids_every=20_000,
    checkpoint_every=5_000,
  )
  # Stable Diffusion's optimiser: AdamW 1e-4 with weight decay 0.01.
  config.teacher.optimizer.update(
    name='adamw', learning_rate=1e-4, weight_decay=0.01, warmup_steps=10_000
  )
  config.guided.update(
    num_train_steps=50_000,
    batch_size=512,
    ema_warmup=True,
    grids_every=10_000,
    checkpoint_every=5_000,
  )
  # Rounds 64 → 32 → … → 1 (six): 64 DDIM steps of the stage-one student
  # are the first teacher, as SD samples with about 50.
  config.distill.update(
    num_train_steps=20_000,
    batch_size=512,
    initial_num_steps=64,
    grids_every=10_000,
    checkpoint_every=5_000,
  )
  config.grids.update(teacher_num_steps=64, samples_per_class=4)


def _make_quick(config) -> None:
  """Minutes: tiny networks on 32×32 images, a few dozen steps per stage."""
  config_lib.make_quick(config)
  config.data.image_size = 32
  config.autoencoder.model.update(
    block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8
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
  config.model.update(
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
    up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
    attention_head_dim=2,
    norm_num_groups=8,
  )
  config.text.encoder.update(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
  )
  config.text.num_held_out_captions = 4
  config.evaluate.num_reference = 500
  # Rounds 4 → 2 → 1.
  config.distill.initial_num_steps = 4
