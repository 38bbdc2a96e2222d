r"""Distil Stable Diffusion 1.5 (GD §4.2): a w-conditioned few-step student.

The teacher is SD 1.5 itself, loaded from a folder in diffusers' layout
(unet/, vae/, text_encoder/, scheduler/, tokenizer/; safetensors weights,
no torch at run time): its VAE is the frozen autoencoder (scaling factor
0.18215), its U-Net behind its CLIP ViT-L/14 text encoder the CFG teacher
(null: the empty prompt; SD's guidance scale s = 1 + w). gdd imports them
into the workdir's autoencoder/ and teacher/ folders, then trains stage one
(SD's U-Net plus a zero-initialised w-embedding, for w in [1, 13]) and the
halving rounds 64 → 32 → … → 1 on your image–caption shards, on SD's own
discrete schedule (`diffusion.schedule='sd'`, method.md §11).

  python -m gdd.main --config=configs/sd15_distill.py --workdir=$WORKDIR \
    --config.pretrained.folder=/models/stable-diffusion-v1-5 \
    --config.data.data_dir=/data/laion/shards

Choices, none measured at this size (no accelerator here; README, "Distil
your Stable Diffusion"):
- w in [1, 13]: SD's guidance scales 2-14, around its customary 7.5
  (w = 6.5); the student's w-embedding reads w / 13.
- The student predicts v (`guided.student_mean_type='v'`) where SD 1.5
  predicts ε: it starts from SD's weights read as a v-model. PD §4 finds ε
  students unstable at few steps; on a CPU stand-in with SD's 1/α ≤ 15 the
  ε-student broke at 2 and 1 steps and the v-student did not (README, "The
  student's parameterisation").
- Latents are the VAE posterior's mean (SD samples the posterior; gdd
  keeps each stage's batches a pure function of the step).
- 512² images (64² × 4 latents), batch 256, bf16 compute with float32
  master params, FSDP over 8 devices, full rematerialisation: check with
  --mode=plan --config.plan.target=8xH100 before a run.

`:tiny` is the same chain at toy size, for a tiny random SD of the same
layout (the tests build one with diffusers); it runs end to end on a CPU.
`:inpaint` distils SD's inpainting U-Net instead (a folder such as
stable-diffusion-inpainting: 9 input channels, the mask and the encoded
masked image; random training masks, `config.random_masks`); then
`--mode=inpaint` fills in with the student.
"""

from gdd import config_lib

# SD 1.5's networks, as their config.json files describe them.
SD15_UNET = dict(
  config_lib.SD_UNET_LAYOUT,
  attention_head_dim=8,
  mean_type='eps',
)
SD15_TEXT_ENCODER = dict(
  hidden_size=768,
  intermediate_size=3072,
  num_hidden_layers=12,
  num_attention_heads=12,
  hidden_act='quick_gelu',
)


def get_config(variant: str = ''):
  config = config_lib.stable_diffusion_config(
    SD15_UNET, SD15_TEXT_ENCODER, image_size=512
  )
  config.guided.student_mean_type = 'v'
  return config_lib.apply_variant(
    config,
    variant,
    inpaint=config_lib.make_sd_inpainting,
    tiny=config_lib.make_tiny_stable_diffusion,
  )
