"""configs/sd15_distill.py:tiny+inpaint: Stable Diffusion's 9-channel
inpainting U-Net as the teacher of a w-conditioned inpainting student.

A tiny random SD whose U-Net reads [latents, mask (1 = fill in), latents of
the masked image] is imported; gdd's teacher inpaints as diffusers'
StableDiffusionInpaintPipeline does, stage one trains on random masks with
the masked image encoded, and the student exports to a pipeline folder
that diffusers inpaints with.
"""

import diffusers
import flax
import jax
import numpy as np
import pytest
import torch
import transformers

from gdd import pipeline, sample
from tests import helpers, sd_helpers

W = 6.5


@pytest.fixture(scope='module')
def inpaint_chain(tmp_path_factory):
  """(config, SD folder, workdir): SD's inpainting U-Net imported and stage
  one trained (2 updates) on random masks."""
  config, root = sd_helpers.tiny_sd(
    'sd15_distill', tmp_path_factory, 'tiny+inpaint'
  )
  workdir = str(root / 'workdir')
  pipeline.run(config, workdir, 'guided')
  return config, root / 'sd', workdir


def _request():
  """(captions, images in [−1, 1], masks 1 = kept: the right half filled in,
  on the latent grid, start noise z1)."""
  rng = np.random.default_rng(2)
  images = rng.uniform(-1.0, 1.0, (2, 16, 16, 3)).astype(np.float32)
  kept = np.ones((2, 16, 16, 1), np.float32)
  kept[:, :, 8:] = 0.0
  z1 = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  return ['a cat', 'cats at a cat'], images, kept, z1


def _nchw(array: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


def _diffusers_inpaint(pipe, config, folder, *, num_steps, guidance_scale):
  """SD's inpainting pipeline on `_request()`, images in [0, 1]. The masked
  image's latents are the VAE posterior's mean (gdd's; the pipeline would
  draw a sample) and the prompts go in as CLIP states of gdd's token ids."""
  captions, images, kept, z1 = _request()
  states = sd_helpers.prompt_states(config, folder)
  with torch.no_grad():
    posterior = pipe.vae.encode(_nchw(images * kept)).latent_dist
  masked_latents = posterior.mean * pipe.vae.config.scaling_factor
  return pipe(
    prompt_embeds=states(captions),
    negative_prompt_embeds=states([''] * len(captions)),
    image=_nchw((images + 1.0) / 2.0),  # In [0, 1]; unused beside masked.
    mask_image=_nchw(1.0 - kept),
    masked_image_latents=masked_latents,
    latents=_nchw(z1),
    num_inference_steps=num_steps,
    guidance_scale=guidance_scale,
    height=16,
    width=16,
    output_type='np',
  ).images


def _gdd_inpaint(workdir, stage, *, num_steps):
  captions, images, kept, z1 = _request()
  sampler = sample.load_sampler(workdir, stage, num_steps=num_steps)
  out = sampler(
    jax.random.key(0), captions, W, init=images, mask=kept, noise=z1
  )
  return (np.asarray(out) + 1.0) / 2.0


def test_the_teacher_inpaints_as_diffusers_inpaint_pipeline(inpaint_chain):
  # DDIM 'trailing' in 4 steps at guidance scale 1 + w from the same z1,
  # mask and masked-image latents: nothing is replaced, the network alone
  # keeps the known half (2.4e-6 apart here; 0.063 at guidance scale w).
  config, folder, workdir = inpaint_chain
  pipe = diffusers.StableDiffusionInpaintPipeline(
    vae=diffusers.AutoencoderKL.from_pretrained(folder / 'vae'),
    text_encoder=transformers.CLIPTextModel.from_pretrained(
      folder / 'text_encoder'
    ),
    tokenizer=None,
    unet=diffusers.UNet2DConditionModel.from_pretrained(folder / 'unet'),
    scheduler=diffusers.DDIMScheduler.from_pretrained(
      folder / 'scheduler', timestep_spacing='trailing', set_alpha_to_one=True
    ),
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
  )
  expected = _diffusers_inpaint(
    pipe, config, folder, num_steps=4, guidance_scale=1.0 + W
  )
  np.testing.assert_allclose(
    _gdd_inpaint(workdir, 'teacher', num_steps=4), expected, atol=1e-4
  )


def test_stage_one_trains_the_whole_inpainting_input(inpaint_chain):
  _, _, workdir = inpaint_chain
  teacher = flax.traverse_util.flatten_dict(
    helpers.exported_params(workdir, 'teacher')['unet']
  )
  guided = flax.traverse_util.flatten_dict(
    helpers.exported_params(workdir, 'guided')['unet']
  )
  # SD's conv_in is gdd's conv_in (latents) and conv_in_known (mask and
  # masked image); stage one's loss reached both.
  for name in ('conv_in', 'conv_in_known'):
    assert not np.array_equal(
      teacher[(name, 'kernel')], guided[(name, 'kernel')]
    )
  assert guided[('conv_in_known', 'kernel')].shape[2] == 5


def test_the_student_exports_as_an_inpaint_pipeline(
  inpaint_chain, tmp_path, capsys
):
  config, _, workdir = inpaint_chain
  config = config.copy_and_resolve_references()
  config.export.update(stage='guided', num_steps=2, w=W, out=str(tmp_path))
  pipeline.run(config, workdir, 'export')
  out = capsys.readouterr().out.strip().splitlines()[-1]
  pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(out)
  assert pipe.unet.config.in_channels == 9
  expected = _diffusers_inpaint(
    pipe, config, tmp_path, num_steps=2, guidance_scale=1.0
  )
  np.testing.assert_allclose(
    _gdd_inpaint(workdir, 'guided', num_steps=2), expected, atol=1e-4
  )


def test_inpaint_mode_with_the_student(inpaint_chain, tmp_path):
  config, _, workdir = inpaint_chain
  config = config.copy_and_resolve_references()
  config.edit.update(
    stage='guided',
    num_inputs=2,
    num_steps=2,
    w=W,
    mask='center',
    output=str(tmp_path / 'inpaint'),
  )
  pipeline.run(config, workdir, 'inpaint')
  with np.load(tmp_path / 'inpaint.npz') as saved:
    assert saved['images'].shape == (2, 16, 16, 3)
    assert saved['masks'].shape == (2, 16, 16, 1)
