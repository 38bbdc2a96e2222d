r"""CIFAR-10 (32×32×3, 10 classes) at the scale of the PD/GD papers.

Model and optimiser follow method.md §4 (the PD CIFAR-10 model). Needs the
TFDS 'cifar10' dataset prepared under `--config.data.data_dir`:

  tfds build cifar10 --data_dir=$DATA
  python -m gdd.main --config=configs/cifar10.py --workdir=$WORKDIR \
      --config.data.data_dir=$DATA

`--config=configs/cifar10.py:quick` is a tiny model for smoke tests.
"""

from gdd import config_lib


def get_config(variant: str = ''):
  config = config_lib.base_config()
  config.data.name = 'cifar10'
  config.data.random_flip = True
  config.model.update(
    ch=256,
    emb_ch=1024,
    ch_mult=(1, 1, 1),
    num_res_blocks=3,
    attn_resolutions=(16, 8),
    head_dim=64,
    dropout=0.2,
    mean_type='x',
  )
  config.teacher.update(
    # Step count: a choice (the papers give no teacher length for CIFAR-10).
    num_train_steps=800_000,
    batch_size=128,
    ema_decay=0.9999,
    grids_every=20_000,
    checkpoint_every=5_000,
  )
  config.teacher.optimizer.update(
    name='adamw',
    learning_rate=2e-4,
    warmup_steps=1000,
    weight_decay=1e-3,
    grad_clip_norm=1.0,
  )
  # Small enough to replicate: the 56M-param model's state and its share of
  # the batch of 128 fit one device of v5e-64 or 8×H100 with room to spare
  # (--mode=plan; README, "Planning a run", has the planned bytes).
  # bfloat16 for speed; no FSDP, accumulation or remat needed there.
  config.model.dtype = 'bfloat16'
  config.grids.teacher_num_steps = 128
  # FID reference: the whole train split (50k), as in the PD/GD papers.
  config.evaluate.update(
    ws=(0.0, 1.0, 2.0, 4.0), inception_weights='inception_fid.npz'
  )
  return config_lib.apply_variant(config, variant)
