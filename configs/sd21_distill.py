r"""Distil Stable Diffusion 2.1 (768², v-prediction): as sd15_distill.py.

SD 2.1's networks: linear projections and heads of 64 channels in the
U-Net's transformers, cross-attention to 1024-wide states of OpenCLIP
ViT-H/14 (its text_encoder/ folder holds 23 of the 24 layers: SD 2 reads
the penultimate one), v-prediction, 768² images (96² × 4 latents). The
student predicts v as SD 2.1 does (no ε student here). Everything else —
the imported VAE and teacher, w in [1, 13], the rounds 64 → 1, the
documented choices — is configs/sd15_distill.py's.

  python -m gdd.main --config=configs/sd21_distill.py --workdir=$WORKDIR \
    --config.pretrained.folder=/models/stable-diffusion-2-1 \
    --config.data.data_dir=/data/laion/shards

`:tiny` is the same chain at toy size for a tiny random SD 2-like folder;
`:inpaint` distils an SD 2 inpainting U-Net (9 input channels) instead;
where its folder differs from SD 2.1 (image size, prediction type) the
import names each key to set before anything is read.
"""

from gdd import config_lib

SD21_UNET = dict(
  config_lib.SD_UNET_LAYOUT,
  attention_head_dim=(5, 10, 20, 20),
  use_linear_projection=True,
  mean_type='v',
)
SD21_TEXT_ENCODER = dict(
  hidden_size=1024,
  intermediate_size=4096,
  num_hidden_layers=23,
  num_attention_heads=16,
  hidden_act='gelu',
)


def get_config(variant: str = ''):
  config = config_lib.stable_diffusion_config(
    SD21_UNET, SD21_TEXT_ENCODER, image_size=768
  )
  # 768² images: micro-batches of 2 per H100 (--mode=plan at 8xH100).
  config.guided.grad_accum_steps = 16
  config.distill.grad_accum_steps = 16
  return config_lib.apply_variant(
    config,
    variant,
    inpaint=config_lib.make_sd_inpainting,
    tiny=config_lib.make_tiny_stable_diffusion,
  )
