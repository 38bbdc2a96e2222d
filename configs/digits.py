r"""The embedded default: scikit-learn's digits (8×8×1, 10 classes).

Ships inside scikit-learn, so it runs anywhere with no download; sized to
train a good guided teacher on a 2-core laptop CPU in minutes.

  python -m gdd.main --config=configs/digits.py --workdir=/tmp/gdd_digits

`--config=configs/digits.py:quick` is a short smoke run (README has its
measured time). `:inpaint` trains the same chain as inpainting models (the
network also sees a mask and the masked digit; random masks in training:
`config.random_masks`), `:quick+inpaint` its smoke run; then

  python -m gdd.main --config=configs/digits.py:inpaint \
    --workdir=/tmp/gdd_digits_inpaint --mode=inpaint
"""

from gdd import config_lib


def get_config(variant: str = ''):
  config = config_lib.base_config()
  config.data.name = 'digits'
  config.model.update(
    ch=32,
    emb_ch=128,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(4,),
    head_dim=32,
    dropout=0.1,
    mean_type='both',
  )
  config.teacher.update(
    # README ("What the default run does") has the measured stage times.
    num_train_steps=3000,
    batch_size=64,
    # Averages the last ~500 updates, and from the first update on: the
    # warm-up keeps the random initialisation out of the EMA.
    ema_decay=0.998,
    ema_warmup=True,
    log_every=100,
    grids_every=1500,
    checkpoint_every=500,
  )
  config.teacher.optimizer.update(
    learning_rate=2e-3, warmup_steps=200, decay='cosine'
  )
  config.guided.update(
    num_train_steps=2000,
    batch_size=64,
    # Stage one starts from the teacher and first moves away from it at w=0;
    # a long EMA (0.999) keeps those early params (README, "Why this
    # schedule"). 0.995 averages ~200 updates.
    ema_decay=0.995,
    ema_warmup=True,
    # Under the paper's unweighted loss the largest w decide most of each
    # update and the student leaves its teacher at w = 0; (1 + w)^-2 evens
    # that out (README, "Why this schedule").
    w_loss_power=2.0,
    log_every=100,
    grids_every=2000,
    checkpoint_every=500,
  )
  config.guided.optimizer.update(learning_rate=5e-4, decay='cosine')
  config.distill.update(
    # Per halving round.
    num_train_steps=500,
    batch_size=64,
    log_every=100,
    grids_every=500,
    checkpoint_every=500,
  )
  config.distill.optimizer.learning_rate = 2e-4
  # The stage-one model as a 64-step DDIM sampler is the first teacher, not
  # 1024 as on ImageNet: 8×8 digits need far fewer steps (the teacher's
  # 64-step FD-digits is within 4% of its 256-step one), and 6 rounds of
  # 500 updates keep the whole chain short on a 2-core CPU; from 32 steps
  # the 4-step student missed its teacher by 1.26× at w = 0 (README, "Why
  # this schedule", has the measurements).
  config.distill.initial_num_steps = 64
  # `--mode=encoder` (not part of the default chain): the same 32 → 1
  # halving as distill, at w = 0, with half its updates per round (not yet
  # measured: a starting point).
  config.encoder.update(
    num_train_steps=400,
    batch_size=64,
    log_every=100,
    checkpoint_every=400,
    initial_num_steps=32,
  )
  config.encoder.optimizer.learning_rate = 2e-4
  config.grids.teacher_num_steps = 64
  config.evaluate.update(
    feature_extractor='digits',
    num_samples=1000,
    batch_size=250,
    ws=(0.0, 1.0, 2.0, 4.0),
    num_reference=1500,  # The whole train split.
    real_split='test',
    teacher_num_steps=(256, 16, 8, 4),
    guided_num_steps=(64, 8, 4),
  )
  # Editing, inpainting and translation rows on 250 of the 297 held-out
  # test digits (gdd.evaluation.editing); add a finished `:inpaint` chain
  # with --config.evaluate.editing.inpainting_workdir=....
  config.evaluate.editing.enabled = True
  return config_lib.apply_variant(config, variant)
