"""The config schema: defaults shared by every config file, and validation.

Config files in `configs/` call `base_config()` and override values; every
run calls `validate(config)` before anything compiles, so a bad value fails
in a second with a message that names the key, the value and what is allowed.
`TRAINING_KEYS` says which keys change what each stage learns: a workdir's
stage is resumed or reused only while those keys keep their values.
"""

import math
import numbers
import os
import re
import types
from collections.abc import Callable, Iterable
from typing import Any

import ml_collections
from ml_collections import config_dict

from gdd import checks, conditioning, errors, masks, paths
from gdd.diffusion import losses, parameterization

DATASETS = (
  'digits',
  'cifar10',
  'imagenet64',
  'imagenet256',
  'shapes',
  'webdataset',
)
# Data sets of images with captions: text-conditional models, `config.text`.
CAPTION_DATASETS = ('shapes', 'webdataset')
# Caption data sets with a closed vocabulary, which the 'word' tokenizer
# takes; the others have free text and need 'clip'.
WORD_DATASETS = ('shapes',)
# Where the diffusion models work: on the images, or on the latents of the
# autoencoder stage (`gdd.stages.autoencoder`).
SPACES = ('pixel', 'latent')
# diffusion.schedule: gdd's clipped cosine λ(t), or Stable Diffusion's
# discrete scaled_linear schedule (method.md §11; `schedules`).
SCHEDULES = ('cosine', 'sd')
# 'unet': the pixel U-Net (ADM-like, gdd/models/unet.py); 'sd_unet': Stable
# Diffusion's UNet2DConditionModel architecture (gdd/models/sd_unet.py).
MODEL_KINDS = ('unet', 'sd_unet')
# 'word': the data set's caption words (shapes); 'clip': CLIP's BPE from a
# Stable Diffusion `tokenizer/` folder's vocab.json and merges.txt.
TOKENIZERS = ('word', 'clip')
OPTIMIZERS = ('adam', 'adamw')
LR_DECAYS = ('constant', 'cosine', 'linear')
SAMPLERS = ('ddim', 'ancestral', 'stochastic')
# How a distilled round starts from a t_start between its grid points
# (`sampling.start_steps`): one DDIM step to the grid point below, or from it.
OFF_GRID_RULES = ('step', 'floor')
STAGES = ('autoencoder', 'teacher', 'guided', 'distill', 'single_w', 'encoder')
AUTOENCODER_LOSSES = ('l1', 'l2')
TIME_GRIDS = ('fine', 'student')
# 'digits' and 'shapes': a small classifier trained on that data set's own
# train split (gdd/evaluation/{digits,shapes}_features.py).
FEATURE_EXTRACTORS = ('inception', 'digits', 'shapes')
DTYPES = ('float32', 'bfloat16')
# What `nn.remat` recomputes in the backward pass (gdd/models/layers.py):
# 'none' stores every activation; 'full' stores only each residual and
# attention block's inputs; 'dots_saveable' also stores matmul outputs.
REMAT_POLICIES = ('none', 'full', 'dots_saveable')
# How a param whose path matches a `memory.fsdp_rules` regex is laid out.
FSDP_RULES = ('fsdp', 'replicate')


def optimizer_config(**overrides: Any) -> ml_collections.ConfigDict:
  """Optax chain settings: clip → Adam(W) with warm-up and a decay schedule."""
  opt = ml_collections.ConfigDict(
    {
      'name': 'adam',
      'learning_rate': 2e-4,
      'warmup_steps': 1000,
      'decay': 'constant',
      'grad_clip_norm': 1.0,
      'weight_decay': 0.0,
      'b1': 0.9,
      'b2': 0.999,
      'eps': 1e-8,
    }
  )
  opt.update(overrides)
  return opt


def train_config(**overrides: Any) -> ml_collections.ConfigDict:
  """Settings every training stage has (loop length, logging, checkpoints)."""
  train = ml_collections.ConfigDict(
    {
      'num_train_steps': 100_000,
      'batch_size': 128,
      'optimizer': optimizer_config(),
      # 0 turns EMA off (the EMA params then equal the params).
      'ema_decay': 0.9999,
      # True: update n (from 0) decays by min(ema_decay, (1 + n)/(10 + n)),
      # so the EMA forgets the starting params (a random init, or for a
      # student the teacher it starts from) within a few hundred updates
      # instead of keeping ema_decay^n of them. False keeps the plain EMA,
      # bit for bit what gdd computed before the key existed.
      'ema_warmup': False,
      'log_every': 100,
      'grids_every': 5000,
      'checkpoint_every': 1000,
      'max_checkpoints_to_keep': 3,
      # Micro-batches per step, summed inside the jitted step (lax.scan):
      # the same update as one pass over batch_size, in less memory.
      'grad_accum_steps': 1,
    }
  )
  train.update(overrides)
  return train


def base_config() -> ml_collections.ConfigDict:
  """Every key gdd knows, with defaults; config files override values."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  _add_network_sections(config)
  _add_stage_sections(config)
  _add_mode_sections(config)
  # True lets the guided and distill stages train ε-students
  # (`student_mean_type` 'eps'), refused otherwise: PD §4 finds ε-prediction
  # unstable for distillation. For measuring that choice on purpose (e.g.
  # from a Stable Diffusion 1.x ε-teacher); the teacher may be ε regardless.
  config.allow_eps_students = False
  # Start the chain from a Stable Diffusion folder in diffusers' layout
  # (gdd.stages.pretrained): its VAE is the autoencoder and SD itself (U-Net
  # + CLIP text encoder) the teacher, both imported instead of trained.
  # '' trains every stage from scratch. `variant`: e.g. 'fp16' for
  # diffusion_pytorch_model.fp16.safetensors.
  config.pretrained = ml_collections.ConfigDict({'folder': '', 'variant': ''})
  # Trace this many training steps of each stage with jax.profiler (after
  # the first two, which compile), into STAGE/profile; 0: no trace.
  config.profile_steps = 0
  # Multi-process runs: gdd calls jax.distributed.initialize() with the keys
  # that are set; unset (None) keys are auto-detected (Cloud TPU, SLURM,
  # Open MPI). launch/README.md has recipes.
  config.distributed = ml_collections.ConfigDict(
    {
      'initialize': False,
      'coordinator_address': config_dict.placeholder(str),
      'num_processes': config_dict.placeholder(int),
      'process_id': config_dict.placeholder(int),
      # e.g. (0, 1, 2, 3): the local GPUs this process drives. Unset on a
      # SLURM GPU job would mean only GPU SLURM_LOCALID (JAX's detection).
      'local_device_ids': config_dict.placeholder(tuple),
    }
  )
  return config


def _add_network_sections(config: ml_collections.ConfigDict) -> None:
  """The data, the network, its memory layout and the diffusion process."""
  config.data = ml_collections.ConfigDict(
    {
      'name': 'digits',
      'data_dir': config_dict.placeholder(str),
      # webdataset: a folder of held-out image–caption shards (e.g. COCO
      # captions written by img2dataset), the 'test' split that grids,
      # --mode=sample and evaluation draw captions from; unset: the first
      # pairs of data_dir stand in (`gdd.data.held_out_split`).
      'held_out_dir': config_dict.placeholder(str),
      'random_flip': False,
      'shuffle_buffer': 10_000,
      # Side of the square images of data sets drawn or resized to a size
      # (shapes, webdataset); the others have a fixed size.
      'image_size': 32,
    }
  )
  config.space = 'pixel'  # One of SPACES.
  config.model = _model_config()
  config.random_masks = _random_masks_config()
  config.text = _text_config()
  config.memory = _memory_config()
  config.diffusion = ml_collections.ConfigDict(
    {
      # One of SCHEDULES; 'cosine' spans [logsnr_min, logsnr_max], 'sd' is
      # SD's own range (λ ≈ 7.07 to −5.36, clean at t = 0).
      'schedule': 'cosine',
      'logsnr_min': -20.0,
      'logsnr_max': 20.0,
      'loss_weighting': 'snr_trunc',
      # Clip x̂ to [-1, 1] at sampling time (never in training targets).
      'clip_x': True,
    }
  )


def _model_config() -> ml_collections.ConfigDict:
  """The U-Net's shape, its output and its compute dtype."""
  return ml_collections.ConfigDict(
    {
      'kind': 'unet',  # One of MODEL_KINDS.
      'ch': 64,
      'emb_ch': 256,
      'ch_mult': (1, 2),
      'num_res_blocks': 2,
      'attn_resolutions': (),
      'head_dim': 64,
      'dropout': 0.0,
      'mean_type': 'both',
      # Compute dtype; params, optimiser state, EMA, softmax, normalisation
      # statistics and the loss stay float32 ('bfloat16': mixed precision).
      'dtype': 'float32',
      # An inpainting model: the network also sees the mask and the masked
      # input (`gdd.conditioning`), trained on `random_masks`.
      'inpainting': False,
    }
  )


def _random_masks_config() -> ml_collections.ConfigDict:
  """What an inpainting model's training masks fill in (`masks.random`).

  The fraction of examples of each kind, summing to 1; read only when
  `model.inpainting`. 'all_filled' examples are plain generation (Stable
  Diffusion's inpainting model fills in everything for a quarter of them).
  """
  return ml_collections.ConfigDict(
    {'box': 0.3, 'stroke': 0.3, 'half': 0.15, 'all_filled': 0.25}
  )


def sd_unet_model_config(**overrides: Any) -> ml_collections.ConfigDict:
  """`config.model` for an SD-architecture U-Net (`gdd.models.sd_unet`).

  Defaults are a small network; Stable Diffusion 1.x is
  block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
  attention_head_dim=8. On a caption data set its cross-attention reads the
  text encoder's states (`config.text.encoder.hidden_size` wide); on a
  class data set it embeds the label and its transformers have
  self-attention only (`gdd.models.class_sd_unet`). `overrides` may change
  a key's type: `attention_head_dim` and `transformer_layers_per_block` are
  an int or one int per block, e.g. SD 2.x's attention_head_dim=(5, 10, 20,
  20).
  """
  model = {
    'kind': 'sd_unet',
    'block_out_channels': (64, 128),
    'layers_per_block': 1,
    'down_block_types': ('CrossAttnDownBlock2D', 'DownBlock2D'),
    'up_block_types': ('UpBlock2D', 'CrossAttnUpBlock2D'),
    'attention_head_dim': 4,
    'transformer_layers_per_block': 1,
    'use_linear_projection': False,
    'norm_num_groups': 32,
    'dropout': 0.0,
    'mean_type': 'both',
    'dtype': 'float32',
    'inpainting': False,
    # What an inpainting network reads as the masked input: 'masked_latents'
    # (gdd's) or 'masked_image' (SD's inpainting U-Net: the encoded masked
    # image, a second VAE pass per batch; conditioning.INPAINTING_INPUTS).
    'inpainting_input': 'masked_latents',
    # 'sd': SD's timestep as the time input (Stable Diffusion's weights,
    # with diffusion.schedule='sd'); 'arctan': gdd's t_in·1000.
    'time_input': 'arctan',
  }
  return ml_collections.ConfigDict({**model, **overrides})


def _text_config() -> ml_collections.ConfigDict:
  """Captions → token ids → the CLIP-architecture text encoder's states.

  Read for caption data sets (CAPTION_DATASETS) only.
  """
  return ml_collections.ConfigDict(
    {
      'tokenizer': 'word',  # One of TOKENIZERS.
      # 'clip': the tokenizer/ files shipped with Stable Diffusion weights.
      'vocab_file': '',
      'merges_file': '',
      # SD 1.x pads with '<|endoftext|>', SD 2.x with '!'.
      'pad_token': '<|endoftext|>',
      # Token ids per caption, BOS and EOS included (CLIP: 77).
      'max_length': 16,
      'encoder': ml_collections.ConfigDict(
        {
          'hidden_size': 128,
          'intermediate_size': 512,
          'num_hidden_layers': 2,
          'num_attention_heads': 4,
          'hidden_act': 'quick_gelu',
          'layer_norm_eps': 1e-5,
        }
      ),
      # The teacher trains the encoder with the U-Net (as GLIDE does);
      # every student keeps its teacher's encoder frozen. False: frozen from
      # the start too (pretrained weights).
      'train_encoder': True,
      # Held-out captions that sample grids and evaluation cycle through.
      'num_held_out_captions': 64,
    }
  )


def _memory_config() -> ml_collections.ConfigDict:
  """How params and activations are laid out in device memory.

  The same computation (up to summation order) whatever is chosen here.
  """
  return ml_collections.ConfigDict(
    {
      # Size of the mesh's `fsdp` axis: params, optimiser state, EMA and a
      # frozen teacher are split over it (ZeRO-3 style); the batch is split
      # over all devices. 1: plain data parallelism (everything replicated).
      'fsdp': 1,
      # Arrays with fewer elements stay replicated (big_vision's threshold).
      'fsdp_min_size': 2**20,
      # (regex on the param path 'a/b/kernel', 'fsdp' | 'replicate'), first
      # match wins; 'fsdp' splits the largest axis divisible by `fsdp`.
      'fsdp_rules': (('.*', 'fsdp'),),
      # One of REMAT_POLICIES.
      'remat': 'none',
    }
  )


def _add_stage_sections(config: ml_collections.ConfigDict) -> None:
  """One section per stage: teacher, guided, distill (single_w), encoder."""
  # The frozen autoencoder of a latent space (config.space='latent').
  config.autoencoder = train_config(num_train_steps=20_000, ema_decay=0.999)
  config.autoencoder.optimizer.update(learning_rate=1e-4, warmup_steps=500)
  config.autoencoder.update(
    {
      # AutoencoderConfig's fields (gdd/models/autoencoder.py) but the
      # image channels; Stable Diffusion's VAE is block_out_channels=(128,
      # 256, 512, 512), layers_per_block=2.
      'model': ml_collections.ConfigDict(
        {
          'latent_channels': 4,
          'block_out_channels': (64, 128, 128),
          'layers_per_block': 1,
          'norm_num_groups': 32,
          'mid_block_add_attention': True,
          'dtype': 'float32',
        }
      ),
      'reconstruction_loss': 'l1',  # One of AUTOENCODER_LOSSES.
      # Per-image sums: LDM's weight, the KL a small regulariser.
      'kl_weight': 1e-6,
      # Training images whose latents give the scaling factor.
      'scaling_examples': 2048,
      # Held-out images whose reconstruction PSNR is measured.
      'eval_examples': 512,
    }
  )
  config.teacher = train_config()
  # Probability that a label is replaced by the null label (CFG training).
  config.teacher.p_uncond = 0.1

  # Stage one: the w-conditioned student, initialised from the teacher.
  config.guided = train_config(num_train_steps=50_000, ema_decay=0.9999)
  config.guided.optimizer.update(learning_rate=1e-4, warmup_steps=0)
  # Range of guidance strengths w the students are trained for.
  config.guided.w_min = 0.0
  config.guided.w_max = 4.0
  # Stage one's and the rounds' per-example loss is weighted by (1 + w)^-p;
  # 0 is the paper's unweighted loss (gdd.stages.guided.w_loss_weight).
  config.guided.w_loss_power = 0.0
  # The w-conditioned students' parameterisation (stage one, the rounds, the
  # encoder): '' is the teacher's model.mean_type; 'x', 'v' or 'eps' give a
  # student that starts from the teacher's weights but reads its output
  # that way (`student_mean_type`; e.g. a v-student of an ε-teacher).
  config.guided.student_mean_type = ''

  # Stage two: progressive halving rounds, initial_num_steps → … → final.
  config.distill = train_config(num_train_steps=50_000, ema_decay=0.0)
  config.distill.optimizer.update(
    learning_rate=1e-4, warmup_steps=0, decay='linear'
  )
  config.distill.initial_num_steps = 1024
  config.distill.final_num_steps = 1
  # 'fine': train on the teacher's grid (all i/N); 'student': on i/N, i even.
  config.distill.time_grid = 'fine'
  # `--mode=distill_single_w`: the paper's single-w baseline (method.md §8.3),
  # the halving rounds at this one w, from the CFG teacher, no stage one.
  # Its rounds reuse the distill section (steps, optimiser, step counts).
  config.single_w = ml_collections.ConfigDict({'w': 1.0})
  config.encoder = _encoder_config()


def _encoder_config() -> ml_collections.ConfigDict:
  """`--mode=encoder`: the distilled DDIM encoder (method.md §9).

  Halving rounds like distill's, initial_num_steps → … → final_num_steps,
  from the stage-one student viewed as an initial_num_steps-step encoder;
  not part of `--mode=all`.
  """
  encoder = train_config(num_train_steps=50_000, ema_decay=0.0)
  encoder.optimizer.update(learning_rate=1e-4, warmup_steps=0, decay='linear')
  encoder.initial_num_steps = 1024
  encoder.final_num_steps = 1
  # The guidance strength it encodes at. 0 is the plain conditional model,
  # as DDIB encodes: its ODE is the probability flow of p(x | c), which
  # carries the class's data onto N(0, I) and back; a guided ODE (w > 0) is
  # no distribution's flow, so its codes would not be N(0, I) and decoding
  # them under another condition (translation) would start off the prior.
  encoder.w = 0.0
  return encoder


def _add_mode_sections(config: ml_collections.ConfigDict) -> None:
  """Training-time sample grids and the non-training --modes."""
  # Sample grids written during training (every `grids_every` steps; not
  # `--mode=evaluate`, which is `config.evaluate`): one grid per w, rows =
  # classes.
  config.grids = ml_collections.ConfigDict(
    {
      'sample_ws': (0.0, 1.0, 2.0, 4.0),
      'teacher_num_steps': 64,
      'samples_per_class': 8,
    }
  )
  # `--mode=sample`.
  config.sample = ml_collections.ConfigDict(
    {
      'stage': 'teacher',
      'num_steps': 256,
      'w': 1.0,
      'sampler': 'ddim',
      'num_samples': 100,
      'batch_size': 500,
      'seed': 0,
      'output': '',
      # Text models: a file of captions, one per line, cycled ('': the
      # held-out captions).
      'prompts': '',
    }
  )
  config.edit = _edit_config()
  # `--mode=export` (gdd/export.py): a student of a Stable Diffusion chain
  # as a diffusers pipeline folder, its w-embedding folded in at `w`.
  config.export = ml_collections.ConfigDict(
    {
      'stage': 'distill',  # 'distill' (num_steps picks the round) or 'guided'.
      'num_steps': 4,
      'w': 6.5,  # SD's guidance scale 7.5.
      # '' = WORKDIR/exports/<stage folder>_w<w>; never overwritten.
      'out': '',
    }
  )
  config.evaluate = _evaluate_config()
  # `--mode=plan`: memory and FLOPs per device for a target accelerator.
  config.plan = ml_collections.ConfigDict(
    {
      # e.g. '8xH100', 'v5e-64', 'v4-32'; '' plans for the devices present.
      'target': '',
      # The model FLOP utilisation the time-per-step estimate assumes.
      'assumed_mfu': 0.4,
    }
  )


def _edit_config() -> ml_collections.ConfigDict:
  """The `--mode=edit`, `inpaint` and `translate` section (`gdd.edit`)."""
  return ml_collections.ConfigDict(
    {
      # An .npz (images uint8 [B, H, W, C]), a .png or a folder of .png
      # files at the model's size; '': the first num_inputs held-out images.
      'input': '',
      'num_inputs': 10,
      # Class models: class indices, comma-separated ('8', '3,8'); text
      # models: captions separated by '|'; cycled over the inputs. '': each
      # held-out input's own class or caption.
      'targets': '',
      'stage': 'distill',
      'num_steps': 4,
      'sampler': 'ddim',
      'w': 1.0,
      # --mode=edit: the time the input is noised to (SDEdit's strength).
      't_start': 0.6,
      # A distilled round (grid t = i/N) asked to start between grid points:
      # 'step' noises to t_start and
      # takes one DDIM step to the grid point below (k + 1 network calls);
      # 'floor' starts at that grid point (`sampling.start_steps`).
      'off_grid': 'step',
      # --mode=inpaint: replacement from this time (1: the fill from noise).
      'inpaint_t_start': 1.0,
      # --mode=inpaint: the region filled in, one of masks.KINDS, or a mask
      # file (.npz with masks, or .png: white is filled in).
      'mask': 'right',
      # --mode=translate: the inputs' own classes or captions to encode
      # under, as targets ('': held-out inputs' own), and the encoder:
      # 'encoder' (a distilled round; encoder_num_steps picks it), or the
      # many-step DDIM encoder of 'guided' or 'teacher'.
      'sources': '',
      'encoder_stage': 'encoder',
      'encoder_num_steps': 4,
      'batch_size': 100,
      'seed': 0,
      'output': '',
    }
  )


def _evaluate_config() -> ml_collections.ConfigDict:
  """The `--mode=evaluate` section: every finished stage, rows × w.

  Scored by FID/IS (Inception-v3) or, on digits and shapes, by FD-digits
  and FD-shapes.
  """
  return ml_collections.ConfigDict(
    {
      # 'inception' (FID/IS; needs inception_weights), 'digits' or 'shapes'.
      'feature_extractor': 'inception',
      # A converted weights file: python -m gdd.evaluation.convert_inception.
      'inception_weights': '',
      'num_samples': 50_000,
      # Samples and Inception inputs per call; a multiple of the devices.
      'batch_size': 512,
      'ws': (0.0, 0.3, 1.0, 4.0),
      'seed': 0,
      # Reference statistics: this split, at most num_reference examples.
      'reference_split': 'train',
      'num_reference': 50_000,
      # Real images of this split are scored like a model ('' to skip): the
      # floor any model's FD can reach with num_samples images.
      'real_split': '',
      # Teacher rows: many steps (the reference) and few (DDIM baseline).
      'teacher_num_steps': (1024, 256, 16, 8, 4),
      'guided_num_steps': (256, 16, 8, 4),
      # Stochastic rows for 2N steps up to this many (model distilled for N).
      'max_stochastic_steps': 16,
      # Teacher-vs-student wall time at one batch size ('()' to skip).
      'speed_batch_size': 256,
      'speed_teacher_num_steps': (256, 1024),
      'speed_student_num_steps': 4,
      # The generation rows above (False: editing only).
      'generation': True,
      'editing': _editing_evaluation_config(),
    }
  )


def _editing_evaluation_config() -> ml_collections.ConfigDict:
  """`--mode=evaluate`'s editing, inpainting and translation rows
  (`gdd.evaluation.editing`), on held-out inputs."""
  return ml_collections.ConfigDict(
    {
      'enabled': False,
      # Which of 'edit', 'inpaint', 'translate' to score.
      'tasks': ('edit', 'inpaint', 'translate'),
      'num_inputs': 250,
      'batch_size': 250,
      'seed': 0,
      # Guidance toward the targets (inpainting: toward the input's own).
      'w': 1.0,
      # Editing: SDEdit's start times; the teacher at teacher_num_steps
      # (the reference) beside the distilled student's rounds; a round
      # started between its grid points follows off_grid (as edit.off_grid).
      't_starts': (0.4, 0.5, 0.6, 0.8),
      'off_grid': 'step',
      'teacher_num_steps': 256,
      'student_num_steps': (2, 4),
      # Inpainting: the region filled in (`masks.KINDS`), and a finished
      # inpainting chain (`config.model.inpainting`) to score beside
      # replacement ('' to leave it out).
      'mask': 'right',
      'inpainting_workdir': '',
      # Which inpainting rows: 'replacement' (this workdir's models) and
      # 'trained' (inpainting_workdir's); e.g. ('trained',) to add an
      # inpainting chain's rows to an earlier run's replacement rows.
      'inpainting_methods': ('replacement', 'trained'),
      # Translation: the distilled encoder's rounds, decoded by the
      # student's translate_num_steps round (and the teacher's many-step
      # encoder and decoder).
      'encoder_num_steps': (1, 2, 4),
      'translate_num_steps': 4,
    }
  )


# What a stage's training reads: the config keys whose values change the
# params it learns, as dotted keys or sections (a section covers every key
# under it). A stage learns from its teacher too, so each kind also lists its
# teacher's keys. A stage folder's config.json is compared on these keys
# only (`training_keys`), so a resumed or skipped stage is refused exactly
# when the current config would train it differently.
_DATA_TRAINING_KEYS = (
  'seed',  # Init, per-step randomness and the order of the data.
  'data.name',
  'data.random_flip',
  'data.shuffle_buffer',  # The order of a TFDS data set's examples.
)
# The autoencoder's keys: what it learns, and so the latents every stage of
# a latent-space chain diffuses in (its scaling factor included).
_AUTOENCODER_TRAINING_KEYS = (
  'autoencoder.num_train_steps',
  'autoencoder.batch_size',
  'autoencoder.optimizer',
  'autoencoder.ema_decay',
  'autoencoder.ema_warmup',
  'autoencoder.model',
  'autoencoder.reconstruction_loss',
  'autoencoder.kl_weight',
  'autoencoder.scaling_examples',
  'pretrained',
)
# The captions' tokens and the text encoder (caption data sets only).
_TEXT_TRAINING_KEYS = (
  'text.tokenizer',
  'text.vocab_file',
  'text.merges_file',
  'text.pad_token',
  'text.max_length',
  'text.encoder',
  'text.train_encoder',
)
_TEACHER_TRAINING_KEYS = _DATA_TRAINING_KEYS + (
  'space',
  'model',
  'diffusion.schedule',
  'diffusion.logsnr_min',
  'diffusion.logsnr_max',
  'diffusion.loss_weighting',
  'teacher.num_train_steps',
  'teacher.batch_size',
  'teacher.optimizer',
  'teacher.ema_decay',
  'teacher.ema_warmup',
  'teacher.p_uncond',
  'pretrained',
)
_GUIDED_TRAINING_KEYS = (
  'guided.num_train_steps',
  'guided.batch_size',
  'guided.optimizer',
  'guided.ema_decay',
  'guided.ema_warmup',
  # The w range is sampled in stage one and in every halving round, and
  # w_max scales the student's w-embedding.
  'guided.w_min',
  'guided.w_max',
  'guided.w_loss_power',
  'guided.student_mean_type',
)
# The halving rounds, with w or at the single w (both use the distill block).
_ROUND_TRAINING_KEYS = (
  'distill.num_train_steps',
  'distill.batch_size',
  'distill.optimizer',
  'distill.ema_decay',
  'distill.ema_warmup',
  # Sets the first round's teacher step count, so every later round's
  # teacher descends from a different chain when it changes.
  'distill.initial_num_steps',
  'distill.time_grid',
)
# The distilled encoder's rounds (from the stage-one student).
_ENCODER_TRAINING_KEYS = (
  'encoder.num_train_steps',
  'encoder.batch_size',
  'encoder.optimizer',
  'encoder.ema_decay',
  'encoder.ema_warmup',
  # The first teacher's step count: every later round descends from it.
  'encoder.initial_num_steps',
  'encoder.w',
)
TRAINING_KEYS = {
  'autoencoder': _DATA_TRAINING_KEYS + _AUTOENCODER_TRAINING_KEYS,
  'teacher': _TEACHER_TRAINING_KEYS,
  'guided': _TEACHER_TRAINING_KEYS + _GUIDED_TRAINING_KEYS,
  'distill': (
    _TEACHER_TRAINING_KEYS + _GUIDED_TRAINING_KEYS + _ROUND_TRAINING_KEYS
  ),
  # From the CFG teacher, no stage one: the guided keys do not matter.
  'single_w': _TEACHER_TRAINING_KEYS + _ROUND_TRAINING_KEYS + ('single_w.w',),
  'encoder': (
    _TEACHER_TRAINING_KEYS + _GUIDED_TRAINING_KEYS + _ENCODER_TRAINING_KEYS
  ),
}
_CADENCE_KEYS = {
  'log_every': 'how often metrics are logged',
  'grids_every': 'how often sample grids are written',
  'checkpoint_every': 'how often the state is saved; resuming is exact',
  'max_checkpoints_to_keep': 'how many checkpoints stay on disk',
  'grad_accum_steps': (
    'micro-batches per step: the same update up to summation order'
  ),
}
# The keys that deliberately change no stage's training, and why. Every key
# of `base_config()` is in TRAINING_KEYS or here (tests/test_configs.py).
NOT_TRAINING_KEYS = {
  'data.data_dir': 'where the data set is stored; data.name says which',
  'data.held_out_dir': (
    'the held-out captions and images of grids and evaluation, never trained on'
  ),
  'diffusion.clip_x': 'clips x̂ in samplers only, never in training targets',
  **{
    f'{stage}.{key}': reason
    for stage in ('autoencoder', 'teacher', 'guided', 'distill', 'encoder')
    for key, reason in _CADENCE_KEYS.items()
  },
  'autoencoder.eval_examples': 'how many held-out images its PSNR reports',
  'text.num_held_out_captions': 'which captions grids and evaluation use',
  'distill.final_num_steps': (
    'where the chain stops; round N reads only its teacher step count 2N'
  ),
  'encoder.final_num_steps': (
    "where the encoder's rounds stop; round N reads only its teacher's 2N"
  ),
  'grids': 'the sample grids written during training',
  'sample': 'read by --mode=sample only',
  'edit': 'read by --mode=edit, inpaint and translate only',
  'export': 'read by --mode=export only',
  'evaluate': 'read by --mode=evaluate only',
  'distributed': 'how processes connect, not what they compute',
  'memory': (
    'the layout over devices and memory (FSDP, remat): the same result up '
    'to summation order'
  ),
  'plan': 'read by --mode=plan only',
  'profile_steps': 'a profiler trace changes no result',
  'allow_eps_students': 'permits a model.mean_type; computes nothing itself',
}


# Training keys added after workdirs were recorded, with the value that
# trains what gdd did before the key existed: a config.json without the key
# compares as if it held this value, so older workdirs still resume.
_ADDED_TRAINING_KEYS = {
  **{
    f'{stage}.ema_warmup': False for stage in ('teacher', 'guided', 'distill')
  },
  'space': 'pixel',
  'model.kind': 'unet',
  'model.inpainting': False,
  'model.time_input': 'arctan',
  'model.inpainting_input': 'masked_latents',
  'diffusion.schedule': 'cosine',
  'pretrained.folder': '',
  'pretrained.variant': '',
  'guided.w_loss_power': 0.0,
  'guided.student_mean_type': '',
}


def from_record(record: dict) -> ml_collections.ConfigDict:
  """The config of a stage's `config.json`, with keys added since filled in.

  A workdir recorded before a key existed trained as the key's default (or,
  for a section, without it), so the missing entries get base_config()'s
  values: `space`, `model.kind`, `data.image_size`, `diffusion.schedule`,
  `guided.w_loss_power`, `guided.student_mean_type` and whole sections
  such as `text`, `autoencoder` and `pretrained`.
  """
  config = ml_collections.ConfigDict(record)
  base = base_config()
  for section in base:
    if section not in config:
      config[section] = base[section]
  for key in (
    'model.kind',
    'model.inpainting',
    'data.image_size',
    'data.held_out_dir',
    'sample.prompts',
    'diffusion.schedule',
    'guided.w_loss_power',
    'guided.student_mean_type',
  ):
    section, name = key.split('.')
    if name not in config[section]:
      config[section][name] = base[section][name]
  # Only SD U-Nets have a time input and an inpainting input to choose.
  for name in ('time_input', 'inpainting_input'):
    if config.model.kind == 'sd_unet' and name not in config.model:
      config.model[name] = _ADDED_TRAINING_KEYS[f'model.{name}']
  return config


def _entries_in_use(flat: dict, kind: str) -> tuple[str, ...]:
  """The training entries that only some configs read, where `flat` does.

  The image size of data sets drawn or resized to one; the text keys of
  caption data sets; the autoencoder's keys for the stages of a latent
  chain (its own are always in TRAINING_KEYS['autoencoder']); the random
  masks of an inpainting chain's stages.
  """
  entries = ()
  if flat.get('data.name') in CAPTION_DATASETS:
    entries += ('data.image_size',)
    if kind != 'autoencoder':
      entries += _TEXT_TRAINING_KEYS
  if flat.get('space') == 'latent' and kind != 'autoencoder':
    entries += _AUTOENCODER_TRAINING_KEYS
  if flat.get('model.inpainting') and kind != 'autoencoder':
    entries += ('random_masks',)
  return entries


def flatten(tree: Any) -> dict[str, Any]:
  """Dotted key → leaf value of a nested ConfigDict or dict (a config.json)."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict | ml_collections.ConfigDict):
      flat.update({f'{key}.{k}': v for k, v in flatten(value).items()})
    else:
      flat[key] = value
  return flat


def _in_entry(key: str, entry: str) -> bool:
  """Whether the dotted `key` is `entry` or lies in the section `entry`."""
  return key == entry or key.startswith(entry + '.')


def training_keys(config_dict: dict, kind: str) -> dict:
  """The entries of a config dict that a stage of `kind` learns from.

  Dotted key → value, tuples as lists (as config.json stores them), so a
  stored and a current config compare equal exactly when they would train
  the stage alike. `kind` is a key of TRAINING_KEYS.
  """
  flat = {**_ADDED_TRAINING_KEYS, **flatten(config_dict)}
  entries = TRAINING_KEYS[kind] + _entries_in_use(flat, kind)
  return {
    key: list(value) if isinstance(value, tuple) else value
    for key, value in flat.items()
    if any(_in_entry(key, entry) for entry in entries)
  }


class ConfigError(errors.UserError, ValueError):
  """A config value is invalid; the message names key, value and the fix."""


def _check(
  config: ml_collections.ConfigDict,
  key: str,
  predicate: Callable[[Any], bool],
  allowed: str,
) -> None:
  value = _value(config, key)
  ok = False
  try:
    ok = bool(predicate(value))
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ConfigError(f'config.{key}={value!r} is invalid: allowed {allowed}.')


def _value(config: ml_collections.ConfigDict, key: str) -> Any:
  """The value of a dotted key."""
  value = config
  for part in key.split('.'):
    value = value[part]
  return value


def _non_negative_number(v: Any) -> bool:
  return isinstance(v, int | float) and not isinstance(v, bool) and v >= 0


def _one_of(options: Iterable[str]) -> Callable[[Any], bool]:
  return lambda v: v in tuple(options)


def _positive_int_tuple(v: Any) -> bool:
  return isinstance(v, tuple | list) and all(map(checks.is_int, v))


def _validate_train(config: ml_collections.ConfigDict, stage: str) -> None:
  for key in (
    'num_train_steps',
    'batch_size',
    'log_every',
    'grids_every',
    'checkpoint_every',
    'max_checkpoints_to_keep',
    'grad_accum_steps',
  ):
    _check(config, f'{stage}.{key}', checks.is_int, 'a positive int')
  _check(
    config,
    f'{stage}.grad_accum_steps',
    lambda v: config[stage].batch_size % v == 0,
    f'a divisor of {stage}.batch_size={config[stage].batch_size}',
  )
  _check(config, f'{stage}.ema_decay', lambda v: 0 <= v < 1, 'in [0, 1)')
  _check(
    config,
    f'{stage}.ema_warmup',
    lambda v: isinstance(v, bool),
    'True or False',
  )
  opt = f'{stage}.optimizer'
  _check(config, f'{opt}.name', _one_of(OPTIMIZERS), f'one of {OPTIMIZERS}')
  _check(config, f'{opt}.decay', _one_of(LR_DECAYS), f'one of {LR_DECAYS}')
  _check(config, f'{opt}.learning_rate', lambda v: v > 0, 'a number > 0')
  for key in ('warmup_steps', 'grad_clip_norm', 'weight_decay', 'eps'):
    _check(config, f'{opt}.{key}', _non_negative_number, 'a number >= 0')
  for key in ('b1', 'b2'):
    _check(config, f'{opt}.{key}', lambda v: 0 <= v < 1, 'in [0, 1)')
  _check(
    config,
    f'{opt}.warmup_steps',
    lambda v: v <= config[stage].num_train_steps,
    f'<= {stage}.num_train_steps',
  )


def _validate_pretrained(config: ml_collections.ConfigDict) -> None:
  """A Stable Diffusion start needs the chain SD is: latent text-to-image
  on SD's schedule with an SD U-Net and CLIP's tokenizer."""
  for key in ('folder', 'variant'):
    _check(config, f'pretrained.{key}', lambda v: isinstance(v, str), 'a str')
  if not config.pretrained.folder:
    return
  needed = {
    'space': 'latent',
    'model.kind': 'sd_unet',
    'diffusion.schedule': 'sd',
    'text.tokenizer': 'clip',
  }
  for key, value in needed.items():
    _check(
      config,
      key,
      lambda v, value=value: v == value,
      f'{value!r} with pretrained.folder set (a Stable Diffusion chain)',
    )
  _check(
    config,
    'data.name',
    _one_of(CAPTION_DATASETS),
    f'one of {CAPTION_DATASETS} with pretrained.folder set (SD is '
    'text-to-image)',
  )
  _check(
    config,
    'model.inpainting',
    lambda v: not v or config.model.inpainting_input == 'masked_image',
    "False, or True with model.inpainting_input='masked_image' (SD's "
    'inpainting U-Net), with pretrained.folder set',
  )


def _check_finite(config: ml_collections.ConfigDict) -> None:
  """Every number, also inside tuples, is finite: no key means NaN or ±inf.

  One walk over every key, so keys added later are covered too.
  """
  for key, value in flatten(config).items():
    is_tuple = isinstance(value, tuple | list)
    if any(
      isinstance(v, numbers.Real) and not math.isfinite(v)
      for v in (value if is_tuple else (value,))
    ):
      allowed = 'finite numbers' if is_tuple else 'a finite number'
      raise ConfigError(
        f'config.{key}={value!r} is invalid: allowed {allowed}.'
      )


def validate(
  config: ml_collections.ConfigDict, training: Iterable[str] = ()
) -> None:
  """Raises ConfigError on the first invalid value; cheap, no JAX work.

  `training` names the sections ('teacher', 'guided', 'distill', 'encoder')
  of the stages this run trains, for the checks that hold for some stages only.
  """
  _check_finite(config)
  _check(config, 'seed', lambda v: checks.is_int(v, 0), 'an int >= 0')
  _validate_network(config, training)
  _validate_pretrained(config)
  _validate_stages(config)
  if 'encoder' in tuple(training):
    _validate_encoder_input(config)
  _validate_grids(config)
  _validate_evaluate(config)
  _validate_memory(config)
  _validate_distributed(config)
  _check(config, 'plan.target', lambda v: isinstance(v, str), 'a string')
  _check(config, 'plan.assumed_mfu', lambda v: 0 < v <= 1, 'in (0, 1]')
  _check(config, 'profile_steps', lambda v: checks.is_int(v, 0), 'an int >= 0')
  _validate_sample(config)
  _validate_edit(config)
  _validate_export(config)


def _required_keys(config: ml_collections.ConfigDict) -> dict[str, str]:
  """Keys without a default for this config → an example and what it is.

  A webdataset's shard folder and CLIP's tokenizer files: the user's data
  and their Stable Diffusion download; on SD's schedule, the SD folder.
  """
  required = {}
  if config.data.name == 'webdataset':
    required['data.data_dir'] = (
      '/data/laion/shards  (the folder of 00000.tar, 00001.tar, …)'
    )
  if config.diffusion.schedule == 'sd':
    required['pretrained.folder'] = (
      "/models/stable-diffusion-v1-5  (diffusers' layout: unet/, vae/, …)"
    )
  if (
    config.data.name in CAPTION_DATASETS
    and config.text.tokenizer == 'clip'
    # An SD chain reads its folder's tokenizer/ files by default.
    and not config.pretrained.folder
    and config.diffusion.schedule != 'sd'
  ):
    tokenizer = '/models/stable-diffusion-v1-5/tokenizer'
    required['text.vocab_file'] = f'{tokenizer}/vocab.json'
    required['text.merges_file'] = f'{tokenizer}/merges.txt'
  return required


def _check_required(config: ml_collections.ConfigDict) -> None:
  """One ConfigError naming every required key left unset, each with an
  example, so that a user fixes them all at once."""
  missing = [
    (key, example)
    for key, example in _required_keys(config).items()
    if not _value(config, key)
  ]
  if missing:
    keys = [f'config.{key}' for key, _ in missing]
    names = ', '.join(keys[:-1]) + ' and ' * (len(keys) > 1) + keys[-1]
    examples = '\n'.join(f'  --config.{k}={e}' for k, e in missing)
    raise ConfigError(
      f'{names} must be set for this config (data.name='
      f'{config.data.name!r}, text.tokenizer={config.text.tokenizer!r}), '
      f'e.g.\n{examples}'
    )


def _validate_network(
  config: ml_collections.ConfigDict, training: Iterable[str]
) -> None:
  """The data, model and diffusion sections."""
  _check(config, 'data.name', _one_of(DATASETS), f'one of {DATASETS}')
  if config.data.name in CAPTION_DATASETS:
    _check_tokenizer(config)
  _check_required(config)
  _check(
    config,
    'data.random_flip',
    lambda v: not (v and config.data.name == 'digits'),
    'False for digits (digits are not mirror-symmetric)',
  )
  _check(
    config,
    'data.held_out_dir',
    lambda v: v is None or config.data.name == 'webdataset',
    "unset: only 'webdataset' reads it (the other data sets hold out their "
    'own split)',
  )
  _check(config, 'data.shuffle_buffer', checks.is_int, 'a positive int')
  _check(config, 'data.image_size', checks.is_int, 'a positive int')
  _check(config, 'space', _one_of(SPACES), f'one of {SPACES}')
  _check(config, 'model.kind', _one_of(MODEL_KINDS), f'one of {MODEL_KINDS}')
  _check(
    config,
    'model.kind',
    lambda v: v == 'sd_unet' or config.data.name not in CAPTION_DATASETS,
    f"'sd_unet' for {config.data.name!r}: the pixel U-Net is "
    'class-conditional and this data set has captions, not classes '
    '(config_lib.sd_unet_model_config() gives the text-conditional model)',
  )
  if config.model.kind == 'unet':
    _validate_pixel_unet(config)
  else:
    _validate_sd_unet(config)
  _check(
    config,
    'model.mean_type',
    _one_of(parameterization.MEAN_TYPES),
    f'one of {parameterization.MEAN_TYPES}',
  )
  _check(config, 'model.dtype', _one_of(DTYPES), f'one of {DTYPES}')
  _check(config, 'model.dropout', lambda v: 0 <= v < 1, 'in [0, 1)')
  _check(
    config, 'model.inpainting', lambda v: isinstance(v, bool), 'True or False'
  )
  if config.model.inpainting:
    _validate_random_masks(config)
  _check_student_mean_type(config, training)
  if config.data.name in CAPTION_DATASETS:
    _validate_text(config)
  if config.space == 'latent':
    _validate_autoencoder(config, training)

  _check(
    config,
    'diffusion.logsnr_max',
    lambda v: v > config.diffusion.logsnr_min,
    '> diffusion.logsnr_min',
  )
  _check(
    config, 'diffusion.schedule', _one_of(SCHEDULES), f'one of {SCHEDULES}'
  )
  _check(
    config,
    'diffusion.schedule',
    lambda v: (v == 'sd') == (config.model.get('time_input') == 'sd'),
    "'sd' exactly when model.time_input='sd' (a network with SD's time "
    "input runs on SD's schedule, and only it does)",
  )
  _check(
    config,
    'diffusion.loss_weighting',
    _one_of(losses.WEIGHTINGS),
    f'one of {losses.WEIGHTINGS}',
  )


def _validate_random_masks(config: ml_collections.ConfigDict) -> None:
  """Fractions in [0, 1], one per kind of `masks.RANDOM_KINDS`, summing to 1."""
  for kind in masks.RANDOM_KINDS:
    _check(
      config,
      f'random_masks.{kind}',
      lambda v: _non_negative_number(v) and v <= 1,
      'a fraction of the training examples in [0, 1]',
    )
  total = sum(config.random_masks[kind] for kind in masks.RANDOM_KINDS)
  if abs(total - 1) > 1e-6:
    fractions = ', '.join(
      f'{kind}={config.random_masks[kind]!r}' for kind in masks.RANDOM_KINDS
    )
    raise ConfigError(
      f'config.random_masks ({fractions}) sum to {total:g}: allowed '
      'fractions of the training examples that sum to 1.'
    )


def _validate_pixel_unet(config: ml_collections.ConfigDict) -> None:
  """The pixel U-Net's shape keys."""
  for key in ('ch', 'emb_ch', 'num_res_blocks', 'head_dim'):
    _check(config, f'model.{key}', checks.is_int, 'a positive int')
  _check(
    config,
    'model.ch_mult',
    lambda v: len(v) > 0 and _positive_int_tuple(v),
    'a non-empty tuple of positive ints, e.g. (1, 2)',
  )
  _check(
    config,
    'model.attn_resolutions',
    _positive_int_tuple,
    'a tuple of spatial sizes, e.g. (16, 8) or ()',
  )


def _validate_sd_unet(config: ml_collections.ConfigDict) -> None:
  """The SD-architecture U-Net's keys (SDUNetConfig checks the rest)."""
  _check(
    config,
    'model.block_out_channels',
    lambda v: len(v) > 0 and _positive_int_tuple(v),
    'a non-empty tuple of positive ints, e.g. (64, 128)',
  )
  for key in ('layers_per_block', 'norm_num_groups'):
    _check(config, f'model.{key}', checks.is_int, 'a positive int')
  levels = len(config.model.block_out_channels)
  for key in ('down_block_types', 'up_block_types'):
    _check(
      config,
      f'model.{key}',
      lambda v: isinstance(v, tuple | list) and len(v) == levels,
      f'a tuple of {levels} block types, one per block_out_channels entry',
    )
  inputs = conditioning.INPAINTING_INPUTS
  _check(config, 'model.inpainting_input', _one_of(inputs), f'one of {inputs}')
  _check(
    config,
    'space',
    lambda v: v == 'latent' or config.model.inpainting_input != 'masked_image',
    "'latent' with model.inpainting_input='masked_image' (SD's inpainting "
    "input encodes the masked image; in pixel space use 'masked_latents')",
  )


def _validate_text(config: ml_collections.ConfigDict) -> None:
  """The tokenizer and text encoder of a caption data set."""
  for key in ('vocab_file', 'merges_file'):
    _check(
      config,
      f'text.{key}',
      lambda v: isinstance(v, str),
      'a path (the tokenizer/ folder of Stable Diffusion weights)',
    )
  _check(
    config, 'text.max_length', lambda v: checks.is_int(v, 3), 'an int >= 3'
  )
  for key in (
    'hidden_size',
    'intermediate_size',
    'num_hidden_layers',
    'num_attention_heads',
  ):
    _check(config, f'text.encoder.{key}', checks.is_int, 'a positive int')
  _check(
    config,
    'text.train_encoder',
    lambda v: isinstance(v, bool),
    'True or False',
  )
  _check(config, 'text.num_held_out_captions', checks.is_int, 'a positive int')


def _check_tokenizer(config: ml_collections.ConfigDict) -> None:
  """A tokenizer that can read the data set's captions."""
  _check(config, 'text.tokenizer', _one_of(TOKENIZERS), f'one of {TOKENIZERS}')
  _check(
    config,
    'text.tokenizer',
    lambda v: v == 'clip' or config.data.name in WORD_DATASETS,
    f"'clip' for {config.data.name!r}, whose captions are free text ('word' "
    f'takes the closed vocabularies of {WORD_DATASETS} only)',
  )


def _validate_autoencoder(
  config: ml_collections.ConfigDict, training: Iterable[str]
) -> None:
  """The autoencoder section of a latent-space config."""
  if 'autoencoder' in training:
    _validate_train(config, 'autoencoder')
  model = 'autoencoder.model'
  _check(
    config,
    f'{model}.block_out_channels',
    lambda v: len(v) > 0 and _positive_int_tuple(v),
    'a non-empty tuple of positive ints, e.g. (64, 128, 128)',
  )
  for key in ('latent_channels', 'layers_per_block', 'norm_num_groups'):
    _check(config, f'{model}.{key}', checks.is_int, 'a positive int')
  _check(config, f'{model}.dtype', _one_of(DTYPES), f'one of {DTYPES}')
  _check(
    config,
    'autoencoder.reconstruction_loss',
    _one_of(AUTOENCODER_LOSSES),
    f'one of {AUTOENCODER_LOSSES}',
  )
  _check(config, 'autoencoder.kl_weight', _non_negative_number, 'a number >= 0')
  for key in ('scaling_examples', 'eval_examples'):
    _check(config, f'autoencoder.{key}', checks.is_int, 'a positive int')


def _validate_stages(config: ml_collections.ConfigDict) -> None:
  """The teacher, guided, distill, single_w and encoder sections."""
  _validate_train(config, 'teacher')
  _check(config, 'teacher.p_uncond', lambda v: 0 < v < 1, 'in (0, 1)')

  _validate_train(config, 'guided')
  _check(config, 'guided.w_min', _non_negative_number, 'a number >= 0')
  _check(
    config,
    'guided.w_max',
    lambda v: v > config.guided.w_min,
    '> guided.w_min',
  )
  _check(config, 'guided.w_loss_power', _non_negative_number, 'a number >= 0')
  _validate_halving(config, 'distill')
  _check(
    config, 'distill.time_grid', _one_of(TIME_GRIDS), f'one of {TIME_GRIDS}'
  )

  _check(config, 'single_w.w', _non_negative_number, 'a number >= 0')

  _validate_halving(config, 'encoder')
  _check(config, 'encoder.w', _non_negative_number, 'a number >= 0')


def _validate_halving(config: ml_collections.ConfigDict, section: str) -> None:
  """A section of halving rounds: its training keys and step counts."""
  _validate_train(config, section)
  power_of_two = lambda v: checks.is_int(v) and v & (v - 1) == 0
  final = config[section].final_num_steps
  _check(config, f'{section}.final_num_steps', power_of_two, 'a power of 2')
  _check(
    config,
    f'{section}.initial_num_steps',
    lambda v: power_of_two(v) and v > final,
    f'a power of 2 > {section}.final_num_steps',
  )


def _validate_grids(config: ml_collections.ConfigDict) -> None:
  _check(
    config,
    'grids.sample_ws',
    lambda v: len(v) > 0 and all(w >= 0 for w in v),
    'a non-empty tuple of guidance strengths w >= 0',
  )
  _check(config, 'grids.teacher_num_steps', checks.is_int, 'a positive int')
  _check(config, 'grids.samples_per_class', checks.is_int, 'a positive int')


def _validate_sample(config: ml_collections.ConfigDict) -> None:
  _check(config, 'sample.stage', _one_of(STAGES), f'one of {STAGES}')
  _check(config, 'sample.sampler', _one_of(SAMPLERS), f'one of {SAMPLERS}')
  for key in ('num_steps', 'num_samples', 'batch_size'):
    _check(config, f'sample.{key}', checks.is_int, 'a positive int')
  _check(config, 'sample.w', _non_negative_number, 'a number >= 0')


def _check_off_grid(config: ml_collections.ConfigDict, key: str) -> None:
  _check(config, key, _one_of(OFF_GRID_RULES), f'one of {OFF_GRID_RULES}')


def _validate_export(config: ml_collections.ConfigDict) -> None:
  stages = ('distill', 'guided')
  _check(config, 'export.stage', _one_of(stages), f'one of {stages}')
  _check(config, 'export.num_steps', checks.is_int, 'a positive int')
  _check(config, 'export.w', _non_negative_number, 'a number >= 0')
  _check(config, 'export.out', lambda v: isinstance(v, str), 'a path or ""')


def _validate_edit(config: ml_collections.ConfigDict) -> None:
  _check(config, 'edit.stage', _one_of(STAGES[1:]), f'one of {STAGES[1:]}')
  _check(config, 'edit.sampler', _one_of(SAMPLERS), f'one of {SAMPLERS}')
  _check_off_grid(config, 'edit.off_grid')
  encoders = ('encoder', 'guided', 'teacher')  # gdd.encode.ENCODING_STAGES
  _check(config, 'edit.encoder_stage', _one_of(encoders), f'one of {encoders}')
  for key in ('num_steps', 'num_inputs', 'batch_size', 'encoder_num_steps'):
    _check(config, f'edit.{key}', checks.is_int, 'a positive int')
  _check(config, 'edit.w', _non_negative_number, 'a number >= 0')
  for key in ('t_start', 'inpaint_t_start'):
    _check(
      config,
      f'edit.{key}',
      lambda v: _non_negative_number(v) and 0 < v <= 1,
      'a number in (0, 1]',
    )
  for key in ('input', 'targets', 'sources', 'mask', 'output'):
    _check(config, f'edit.{key}', lambda v: isinstance(v, str), 'a string')


def student_mean_type(config: ml_collections.ConfigDict) -> str:
  """The w-conditioned students' parameterisation: `guided.student_mean_type`,
  or the teacher's `model.mean_type` when that is ''."""
  return config.guided.student_mean_type or config.model.mean_type


def _check_student_mean_type(
  config: ml_collections.ConfigDict, training: Iterable[str]
) -> None:
  """A student type the teacher's weights fit; ε only on purpose (method §2).

  The student starts as a copy of the teacher, so it may read the same
  output channels another way ('x', 'v', 'eps') but not change how many
  there are ('both' has twice as many).
  """
  _check(
    config,
    'allow_eps_students',
    lambda v: isinstance(v, bool),
    'True or False',
  )
  teacher = config.model.mean_type
  allowed = ('', 'both') if teacher == 'both' else ('', 'x', 'v', 'eps')
  _check(
    config,
    'guided.student_mean_type',
    _one_of(allowed),
    f"one of {allowed} for model.mean_type={teacher!r} ('' is the "
    "teacher's; a student starts from the teacher's weights, so it can "
    "read them as 'x', 'v' or 'eps' but not switch to or from 'both')",
  )
  if student_mean_type(config) != 'eps' or config.allow_eps_students:
    return
  students = [s for s in ('guided', 'distill') if s in tuple(training)]
  if students:
    raise ConfigError(
      f'An ε-student (model.mean_type={config.model.mean_type!r}, '
      f'guided.student_mean_type={config.guided.student_mean_type!r}) is '
      'refused for the '
      f'{" and ".join(students)} stage(s): students predict ε unstably '
      '(x̂ = (z − σ ε̂)/α amplifies their error as α → 0, where few-step '
      "samplers start; PD §4). Use 'v', 'x' or 'both' (the configs' "
      "choices; guided.student_mean_type='v' gives an ε-teacher a "
      'v-student), or set config.allow_eps_students=True to measure '
      'ε-students on purpose.'
    )


def _validate_encoder_input(config: ml_collections.ConfigDict) -> None:
  """What an encoder needs of the stage-one student it starts from.

  Its w inside the student's trained range, and a model whose ε̂ is well
  conditioned at t = 0 (`diffusion.encoding`): not an x model.
  """
  _check(
    config,
    'encoder.w',
    lambda v: config.guided.w_min <= v <= config.guided.w_max,
    f'a number in [guided.w_min, guided.w_max] = [{config.guided.w_min}, '
    f'{config.guided.w_max}] (the stage-one student it starts from was '
    'trained there)',
  )
  if student_mean_type(config) == 'x':
    raise ConfigError(
      'The stage-one student predicts x (model.mean_type='
      f'{config.model.mean_type!r}, guided.student_mean_type='
      f'{config.guided.student_mean_type!r}): refused for the encoder '
      "stage: encoding starts at t = 0, where an x model's ε̂ = (z − α x̂)/σ "
      'divides its x error by σ ≈ 4.5e-5 (λ_max = 20). Encoders need a '
      "model whose ε̂ is well conditioned there: 'both', 'v' or 'eps'."
    )


def _is_rule(rule: Any) -> bool:
  """A (regex, 'fsdp' | 'replicate') pair whose regex compiles."""
  pattern, how = rule
  try:
    re.compile(pattern)
  except re.error:
    return False
  return how in FSDP_RULES


def _validate_memory(config: ml_collections.ConfigDict) -> None:
  _check(config, 'memory.fsdp', checks.is_int, 'a positive int')
  _check(
    config,
    'memory.fsdp_min_size',
    lambda v: checks.is_int(v, 0),
    'an int >= 0 (array elements)',
  )
  _check(
    config,
    'memory.fsdp_rules',
    lambda v: isinstance(v, tuple | list) and all(map(_is_rule, v)),
    f'a tuple of (regex, rule) pairs, rule one of {FSDP_RULES}, e.g. '
    "(('.*', 'fsdp'),)",
  )
  _check(
    config,
    'memory.remat',
    _one_of(REMAT_POLICIES),
    f'one of {REMAT_POLICIES}',
  )


def _validate_distributed(config: ml_collections.ConfigDict) -> None:
  unset_or = lambda predicate: lambda v: v is None or predicate(v)
  _check(
    config,
    'distributed.initialize',
    lambda v: isinstance(v, bool),
    'True or False',
  )
  _check(
    config,
    'distributed.coordinator_address',
    unset_or(lambda v: re.fullmatch(r'[^:\s]+:\d+', v)),
    "'HOST:PORT' (e.g. '10.0.0.2:1234') or unset (auto-detect)",
  )
  _check(
    config,
    'distributed.num_processes',
    unset_or(checks.is_int),
    'a positive int or unset (auto-detect)',
  )
  num_processes = config.distributed.num_processes
  _check(
    config,
    'distributed.process_id',
    unset_or(lambda v: checks.is_int(v, 0) and v < (num_processes or v + 1)),
    'an int in [0, distributed.num_processes) or unset (auto-detect)',
  )
  _check(
    config,
    'distributed.local_device_ids',
    unset_or(
      lambda v: (
        isinstance(v, tuple | list) and all(checks.is_int(i, 0) for i in v)
      )
    ),
    'a tuple of local device indices, e.g. (0, 1, 2, 3), or unset',
  )


def _validate_evaluate(config: ml_collections.ConfigDict) -> None:
  _check(
    config,
    'evaluate.feature_extractor',
    _one_of(FEATURE_EXTRACTORS),
    f'one of {FEATURE_EXTRACTORS}',
  )
  for key in ('num_samples', 'batch_size', 'num_reference'):
    _check(config, f'evaluate.{key}', checks.is_int, 'a positive int')
  _check(
    config,
    'evaluate.ws',
    lambda v: len(v) > 0 and all(_non_negative_number(w) for w in v),
    'a non-empty tuple of guidance strengths w >= 0',
  )
  for key in ('teacher_num_steps', 'guided_num_steps'):
    _check(
      config, f'evaluate.{key}', _positive_int_tuple, 'a tuple of positive ints'
    )
  _check(
    config,
    'evaluate.speed_teacher_num_steps',
    _positive_int_tuple,
    'a tuple of positive ints (empty: no speed benchmark)',
  )
  for key in ('max_stochastic_steps', 'speed_batch_size'):
    _check(config, f'evaluate.{key}', checks.is_int, 'a positive int')
  _check(
    config,
    'evaluate.speed_student_num_steps',
    checks.is_int,
    'a positive int',
  )
  _validate_editing_evaluation(config)


def _validate_editing_evaluation(config: ml_collections.ConfigDict) -> None:
  for key in ('generation', 'editing.enabled'):
    _check(config, f'evaluate.{key}', lambda v: isinstance(v, bool), 'a bool')
  keys = (
    'num_inputs',
    'batch_size',
    'teacher_num_steps',
    'translate_num_steps',
  )
  for key in keys:
    _check(config, f'evaluate.editing.{key}', checks.is_int, 'a positive int')
  for key in ('student_num_steps', 'encoder_num_steps'):
    _check(
      config,
      f'evaluate.editing.{key}',
      _positive_int_tuple,
      'a tuple of positive ints',
    )
  _check(config, 'evaluate.editing.w', _non_negative_number, 'a number >= 0')
  tasks = ('edit', 'inpaint', 'translate')  # gdd.evaluation.editing's.
  _check(
    config,
    'evaluate.editing.tasks',
    lambda v: len(v) > 0 and all(t in tasks for t in v),
    f'a non-empty tuple of {tasks}',
  )
  _check(
    config,
    'evaluate.editing.t_starts',
    lambda v: all(_non_negative_number(t) and 0 < t <= 1 for t in v),
    'a tuple of numbers in (0, 1]',
  )
  _check_off_grid(config, 'evaluate.editing.off_grid')
  _check(
    config,
    'evaluate.editing.mask',
    _one_of(masks.KINDS),
    f'one of {masks.KINDS}',
  )
  _check(
    config,
    'evaluate.editing.inpainting_workdir',
    lambda v: isinstance(v, str),
    'a string',
  )
  methods = ('replacement', 'trained')
  _check(
    config,
    'evaluate.editing.inpainting_methods',
    lambda v: len(v) > 0 and all(m in methods for m in v),
    f'a non-empty tuple of {methods}',
  )


def make_quick(config: ml_collections.ConfigDict) -> None:
  """Shrinks a config in place to a minutes-long smoke run (`:quick`).

  Keeps the dataset and the method, replaces the network with a tiny one and
  the schedule with a few dozen steps; for tests, CI and first tries.
  """
  _make_network_quick(config)
  _make_training_quick(config)
  _make_outputs_quick(config)


def _make_network_quick(config: ml_collections.ConfigDict) -> None:
  """A tiny float32 pixel U-Net with the plain memory layout.

  An SD-architecture model keeps its shape: its config file shrinks it.
  """
  if config.model.kind == 'unet':
    _make_pixel_unet_quick(config)
  # The tiny model fits anywhere: no FSDP or remat; float32, since XLA:CPU
  # runs bfloat16 in float32 and compiles it ~3× slower.
  config.model.dtype = 'float32'
  config.memory.update(fsdp=1, remat='none')


def _make_pixel_unet_quick(config: ml_collections.ConfigDict) -> None:
  config.model.update(
    ch=16,
    emb_ch=64,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(),
    head_dim=16,
    dropout=0.0,
  )


def _make_training_quick(config: ml_collections.ConfigDict) -> None:
  """A few dozen steps per stage; the halving rounds start from 8 steps."""
  config.teacher.update(
    num_train_steps=40,
    batch_size=32,
    ema_decay=0.9,
    log_every=10,
    grids_every=20,
    checkpoint_every=20,
  )
  config.teacher.optimizer.update(learning_rate=1e-3, warmup_steps=5)
  for stage in ('guided', 'distill', 'encoder'):
    config[stage].update(
      num_train_steps=20,
      batch_size=32,
      log_every=10,
      grids_every=20,
      checkpoint_every=20,
    )
  # The tiny model fits anywhere: no gradient accumulation.
  for stage in ('teacher', 'guided', 'distill', 'encoder'):
    config[stage].grad_accum_steps = 1
  for stage in ('guided', 'distill', 'encoder'):
    # No warm-up: a config's own (e.g. Stable Diffusion's 1000) would
    # exceed these runs.
    config[stage].optimizer.update(learning_rate=5e-4, warmup_steps=0)
  config.distill.initial_num_steps = 8
  config.encoder.initial_num_steps = 8


def _make_outputs_quick(config: ml_collections.ConfigDict) -> None:
  """Small sample grids, --mode=sample and --mode=evaluate runs."""
  config.grids.update(teacher_num_steps=8, samples_per_class=1)
  config.sample.update(num_steps=8, num_samples=20)
  config.evaluate.update(
    num_samples=100,
    batch_size=50,
    ws=(0.0, 4.0),
    teacher_num_steps=(8, 2),
    guided_num_steps=(2,),
    max_stochastic_steps=4,
    speed_batch_size=50,
    speed_teacher_num_steps=(8,),
    speed_student_num_steps=1,
  )
  config.evaluate.editing.update(
    num_inputs=20,
    batch_size=20,
    t_starts=(0.6,),
    teacher_num_steps=4,
    student_num_steps=(2,),
    encoder_num_steps=(2,),
    translate_num_steps=2,
  )


def make_inpainting(config: ml_collections.ConfigDict) -> None:
  """Makes the chain's models inpainting models (`:inpaint`), in place: every
  stage trains on random masks (`config.random_masks`)."""
  config.model.inpainting = True


def make_sd_inpainting(config: ml_collections.ConfigDict) -> None:
  """`:inpaint` of the Stable Diffusion configs: the teacher is SD's
  inpainting U-Net (9 input channels, e.g. a stable-diffusion-inpainting
  folder), which reads the encoded masked image ('masked_image',
  `conditioning.INPAINTING_INPUTS`); every stage trains on random masks."""
  make_inpainting(config)
  config.model.inpainting_input = 'masked_image'


# Stable Diffusion 1.x / 2.x's U-Net layout (UNet2DConditionModel), as
# unet/config.json says; the versions differ in heads, projections and
# prediction (configs/sd15_distill.py, sd21_distill.py).
SD_UNET_LAYOUT = dict(
  block_out_channels=(320, 640, 1280, 1280),
  layers_per_block=2,
  down_block_types=(
    'CrossAttnDownBlock2D',
    'CrossAttnDownBlock2D',
    'CrossAttnDownBlock2D',
    'DownBlock2D',
  ),
  up_block_types=(
    'UpBlock2D',
    'CrossAttnUpBlock2D',
    'CrossAttnUpBlock2D',
    'CrossAttnUpBlock2D',
  ),
  norm_num_groups=32,
)
# Stable Diffusion 1.x / 2.x's VAE (AutoencoderKL), as vae/config.json says.
SD_VAE = dict(
  latent_channels=4,
  block_out_channels=(128, 256, 512, 512),
  layers_per_block=2,
  norm_num_groups=32,
)


def stable_diffusion_config(
  unet: dict, text_encoder: dict, *, image_size: int
) -> ml_collections.ConfigDict:
  """A Stable Diffusion distillation chain (configs/sd15_distill.py,
  sd21_distill.py) for SD networks of these layouts.

  Imports the teacher and VAE from `pretrained.folder` (required) and
  distils on webdataset shards on SD's schedule; the schedule, batches and
  w range are the choices the config files document.
  """
  config = base_config()
  config.data.update(name='webdataset', image_size=image_size)
  config.space = 'latent'
  config.diffusion.schedule = 'sd'
  config.autoencoder.model.update(SD_VAE)
  config.model = sd_unet_model_config(**unet, time_input='sd', dtype='bfloat16')
  config.text.update(tokenizer='clip', max_length=77, train_encoder=False)
  config.text.encoder.update(text_encoder)
  # Accumulation from --mode=plan at 8×H100 (README, "Distil your Stable
  # Diffusion"): micro-batches of 4 (stage one: teacher and student
  # activations) and 8 per device.
  config.guided.update(
    w_min=1.0,
    w_max=13.0,
    num_train_steps=20_000,
    batch_size=256,
    grad_accum_steps=8,
    ema_warmup=True,
    grids_every=5_000,
    checkpoint_every=1_000,
  )
  config.guided.optimizer.update(learning_rate=1e-5, warmup_steps=1_000)
  # Rounds 64 → 32 → … → 1: SD samples with ~50 DDIM steps.
  config.distill.update(
    num_train_steps=10_000,
    batch_size=256,
    grad_accum_steps=4,
    initial_num_steps=64,
    grids_every=5_000,
    checkpoint_every=1_000,
  )
  config.distill.optimizer.update(learning_rate=1e-5, warmup_steps=500)
  config.grids.update(teacher_num_steps=50, sample_ws=(1.0, 6.5))
  config.memory.update(fsdp=8, remat='full')
  config.text.num_held_out_captions = 5000
  config.evaluate.update(
    feature_extractor='inception',
    inception_weights='inception_fid.npz',
    num_samples=5000,
    num_reference=5000,
    batch_size=64,
    ws=(1.0, 2.0, 6.5, 13.0),
    teacher_num_steps=(50, 16, 8, 4),
    guided_num_steps=(64, 16, 8, 4),
    speed_teacher_num_steps=(50,),
  )
  return config


def make_tiny_stable_diffusion(config: ml_collections.ConfigDict) -> None:
  """`:tiny` of the SD configs: a toy SD of the same layout (16² images,
  two-level networks, a few steps per stage; float32, one device) for a
  tiny random SD folder, so the whole chain runs on a CPU."""
  make_quick(config)
  config.data.image_size = 16
  config.autoencoder.model.update(
    block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4
  )
  # Rebuilt, not updated: SD 2's per-block heads are a tuple, these an int.
  config.model = sd_unet_model_config(
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
    attention_head_dim=2,
    norm_num_groups=8,
    use_linear_projection=config.model.use_linear_projection,
    mean_type=config.model.mean_type,
    time_input='sd',
    inpainting=config.model.inpainting,
    inpainting_input=config.model.inpainting_input,
  )
  config.text.update(max_length=8, num_held_out_captions=4)
  config.text.encoder.update(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
  )
  config.guided.update(w_min=1.0, w_max=13.0)
  config.grids.sample_ws = (1.0, 6.5)
  config.evaluate.update(ws=(1.0, 6.5), num_reference=64)
  # Rounds 4 → 2 → 1.
  config.distill.initial_num_steps = 4


# 'tiny': only the config files that define it (the Stable Diffusion
# configs: a tiny random SD of the same layout, end to end on a CPU).
VARIANTS = ('quick', 'inpaint', 'tiny')


def apply_variant(
  config: ml_collections.ConfigDict,
  variant: str,
  *,
  quick: Callable[[ml_collections.ConfigDict], None] = make_quick,
  inpaint: Callable[[ml_collections.ConfigDict], None] = make_inpainting,
  tiny: Callable[[ml_collections.ConfigDict], None] | None = None,
) -> ml_collections.ConfigDict:
  """Applies `--config=FILE:variant`: '' (as is), or names from `VARIANTS`
  joined by '+': 'quick' (`quick`: the config file's own shrinking, or
  make_quick), 'inpaint' (`inpaint`: make_inpainting, or the file's own),
  'tiny' (`tiny`, where the file has one); e.g. 'quick+inpaint'."""
  makers = {'quick': quick, 'inpaint': inpaint}
  if tiny is not None:
    makers['tiny'] = tiny
  names = variant.split('+') if variant else []
  if any(name not in makers for name in names) or len(set(names)) < len(names):
    raise ValueError(
      f"Unknown variant {variant!r}; allowed: '' or names from "
      f"{tuple(makers)} joined by '+', e.g. 'quick' or 'quick+inpaint'."
    )
  for name in names:
    makers[name](config)
  return config


def load_file(path: str) -> ml_collections.ConfigDict:
  """A config from `FILE.py` or `FILE.py:variant`, as `--config=` reads it.

  For notebooks and scripts, which have no absl flags. FILE may also be a
  URL (gs://bucket/config.py:variant).
  """
  url_scheme, url_sep, rest = path.rpartition('://')
  filename, _, variant = rest.partition(':')
  file = paths.resolve(url_scheme + url_sep + filename)
  if not file.is_file():
    raise FileNotFoundError(f'No config file {os.fspath(file)!r}.')
  module = types.ModuleType('gdd_user_config')
  module.__file__ = os.fspath(file)
  exec(compile(file.read_text(), module.__file__, 'exec'), module.__dict__)
  return module.get_config(variant)
