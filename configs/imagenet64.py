r"""ImageNet 64×64 (TFDS imagenet_resized/64x64, 1000 classes), paper scale.

Model and optimiser are the PD/GD ImageNet 64 teacher of method.md §4. The
dataset needs a manual download of ImageNet; prepare it with

  tfds build imagenet_resized/64x64 --data_dir=$DATA --manual_dir=$IMAGENET

then run (on a TPU pod, see launch/):

  python -m gdd.main --config=configs/imagenet64.py --workdir=$WORKDIR \
      --config.data.data_dir=$DATA

The memory settings below fit the paper batch on a v5e-64 slice and on
8×H100; check another slice first with

  python -m gdd.main --config=configs/imagenet64.py --workdir=$WORKDIR \
      --mode=plan --config.plan.target=v4-32

`--config=configs/imagenet64.py:quick` is a tiny model for smoke tests.
"""

from gdd import config_lib


def get_config(variant: str = ''):
  config = config_lib.base_config()
  config.data.name = 'imagenet64'
  config.data.random_flip = True
  config.model.update(
    ch=192,
    emb_ch=768,
    ch_mult=(1, 2, 3, 4),
    num_res_blocks=3,
    attn_resolutions=(32, 16, 8),
    head_dim=64,
    dropout=0.1,
    mean_type='both',
  )
  config.teacher.update(
    # Step count: a choice (the papers give no teacher length here).
    num_train_steps=400_000,
    batch_size=2048,
    ema_decay=0.9999,
    grids_every=20_000,
    checkpoint_every=5_000,
  )
  config.teacher.optimizer.update(
    name='adam', learning_rate=3e-4, warmup_steps=1000, grad_clip_norm=1.0
  )
  # The 277M-param teacher's float32 state and activations do not fit the
  # paper batch replicated. bfloat16 compute, the state split over 8
  # devices and 8 micro-batches per step fit both targets, 8×H100 and a
  # v5e-64 slice (--mode=plan; README, "Planning a run", has the planned
  # bytes and the largest micro-batch that fits).
  config.model.dtype = 'bfloat16'
  config.memory.fsdp = 8
  config.teacher.grad_accum_steps = 8
  config.grids.teacher_num_steps = 128
  # FID reference: the whole validation split (50k). The first 50k of the
  # 1.28M train examples in stored order would not be a uniform sample.
  config.evaluate.update(
    reference_split='validation', inception_weights='inception_fid.npz'
  )
  return config_lib.apply_variant(config, variant)
