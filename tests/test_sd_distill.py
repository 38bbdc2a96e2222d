"""configs/sd15_distill.py:tiny end to end: a tiny random Stable Diffusion.

A random SD of the tiny config's layout is built with the reference
implementations (diffusers, transformers; torch CPU, test-only) and saved in
diffusers' layout with the tiny CLIP tokenizer files; the chain imports its
VAE and teacher, then trains stage one and a halving round (2 → 1 here;
`:tiny` itself halves 4 → 2 → 1) on mock image–caption shards, as
`python -m gdd.main` runs it. SD 2.1's tiny twin (v-prediction, linear
projections, GELU CLIP) is imported too.
"""

import pathlib
import shutil

import diffusers
import flax
import jax
import numpy as np
import pytest
import torch
import transformers

from gdd import (
  config_lib,
  export,
  pipeline,
  sample,
  workdir_lib,
)
from gdd.weights import stable_diffusion
from tests import helpers, sd_helpers


@pytest.fixture(scope='module')
def chain(tmp_path_factory):
  """(config, SD folder, workdir) of the finished sd15_distill:tiny chain."""
  config, root = sd_helpers.tiny_sd('sd15_distill', tmp_path_factory)
  workdir = str(root / 'workdir')
  pipeline.run(config, workdir, 'all')
  return config, root / 'sd', workdir


def test_the_vae_and_teacher_are_sd_itself(chain):
  _, sd_folder, workdir = chain
  loaded = stable_diffusion.load(sd_folder)
  teacher = helpers.exported_params(workdir, 'teacher')
  expected = {
    'text_encoder': loaded.text_encoder.params,
    'unet': loaded.unet.params,
  }
  jax.tree.map(np.testing.assert_array_equal, teacher, expected)
  autoencoder = helpers.exported_params(workdir, 'autoencoder')
  jax.tree.map(np.testing.assert_array_equal, autoencoder, loaded.vae.params)
  record = workdir_lib.read_latent_record(
    workdir_lib.stage_dir(workdir, 'autoencoder')
  )
  assert record['scaling_factor'] == pytest.approx(0.18215)
  assert record['data_scaling_factor'] > 0


def test_the_chain_distils_to_one_step(chain):
  config, _, workdir = chain
  assert workdir_lib.finished_rounds(workdir, 'distill') == [1]
  guided = flax.traverse_util.flatten_dict(
    helpers.exported_params(workdir, 'guided')
  )
  teacher = flax.traverse_util.flatten_dict(
    helpers.exported_params(workdir, 'teacher')
  )
  # Stage one added the w-embedding and trained the U-Net; the text
  # encoder stayed SD's.
  assert any(path[:2] == ('unet', 'w_embedding') for path in guided)
  changed = [p for p in teacher if not np.array_equal(teacher[p], guided[p])]
  assert changed and all(path[0] == 'unet' for path in changed)
  student = sample.load_sampler(workdir, 'distill', num_steps=1)
  images = student(jax.random.key(0), list(sd_helpers.CAPTIONS[:2]), 6.5)
  assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


def test_a_second_run_reuses_the_imports(chain):
  config, _, workdir = chain
  stage = workdir_lib.stage_dir(workdir, 'teacher')
  before = sorted(p.name for p in stage.iterdir())
  pipeline.run(config, workdir, 'teacher')
  assert sorted(p.name for p in stage.iterdir()) == before


def test_a_config_for_other_networks_is_refused_before_any_import(
  chain, tmp_path
):
  config, sd_folder, _ = chain
  config = config.copy_and_resolve_references()
  config.text.encoder.num_hidden_layers = 2
  with pytest.raises(config_lib.ConfigError, match='num_hidden_layers is 2'):
    pipeline.run(config, str(tmp_path / 'w'), 'all')
  assert not (tmp_path / 'w' / 'teacher' / 'params').exists()


def test_sd21_tiny_imports_its_v_prediction_teacher(tmp_path_factory):
  config, root = sd_helpers.tiny_sd('sd21_distill', tmp_path_factory)
  assert config.model.mean_type == 'v' and config.model.use_linear_projection
  workdir = str(root / 'workdir')
  pipeline.run(config, workdir, 'teacher')
  loaded = stable_diffusion.load(root / 'sd')
  assert loaded.unet.config.mean_type == 'v'
  assert loaded.text_encoder.config.hidden_act == 'gelu'
  teacher = helpers.exported_params(workdir, 'teacher')
  jax.tree.map(
    np.testing.assert_array_equal, teacher['unet'], loaded.unet.params
  )


def test_the_exported_student_samples_in_diffusers(chain, tmp_path, capsys):
  # --mode=export writes a StableDiffusionPipeline folder; diffusers loads
  # it whole and samples the 1-step student at guidance_scale 1 (w = 6.5
  # folded into the U-Net) as gdd's sampler does from the same latents.
  config, _, workdir = chain
  config = config.copy_and_resolve_references()
  config.export.update(stage='distill', num_steps=1, w=6.5)
  # The default folder, WORKDIR/exports/distill_1steps_w6.5, in a copy: the
  # chain's own workdir stays as the other tests (the notebook) expect it.
  shutil.copytree(workdir, tmp_path / 'workdir')
  workdir = str(tmp_path / 'workdir')
  pipeline.run(config, workdir, 'export')
  out = capsys.readouterr().out.strip().splitlines()[-1]
  assert out.endswith('exports/distill_1steps_w6.5')
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(out)
  assert pipe.scheduler.config.timestep_spacing == 'trailing'
  z1 = np.random.default_rng(1).standard_normal((2, 8, 8, 4), np.float32)
  expected = pipe(
    prompt_embeds=sd_helpers.prompt_states(config, pathlib.Path(out))(
      list(sd_helpers.CAPTIONS[:2])
    ),
    latents=torch.from_numpy(z1.transpose(0, 3, 1, 2)),
    num_inference_steps=1,
    guidance_scale=1.0,
    height=16,
    width=16,
    output_type='np',
  ).images
  student = sample.load_sampler(workdir, 'distill', num_steps=1)
  images = student(
    jax.random.key(0), list(sd_helpers.CAPTIONS[:2]), 6.5, noise=z1
  )
  np.testing.assert_allclose(
    (np.asarray(images) + 1.0) / 2.0, expected, atol=1e-4
  )
  with pytest.raises(FileExistsError, match='not empty'):
    pipeline.run(config, workdir, 'export')
  config.export.w = 20.0
  with pytest.raises(export.ExportError, match='outside the w range'):
    pipeline.run(config, workdir, 'export')


def test_the_teacher_samples_as_diffusers_stable_diffusion_pipeline(chain):
  # gdd's CFG teacher, DDIM in 4 steps at w, from the same z1, against
  # diffusers' StableDiffusionPipeline with DDIM 'trailing' timesteps at
  # guidance_scale 1 + w (2.3e-6 apart here; at guidance_scale w, 0.045).
  # The pipeline gets gdd's prompt and empty-prompt token ids through the
  # same torch CLIP (prompt_embeds), so tokenizer files are not compared
  # here (tests/test_tokenization.py does that).
  config, sd_folder, workdir = chain
  w, num_steps, captions = 6.5, 4, ['a cat', 'cats at a cat']
  states = sd_helpers.prompt_states(config, sd_folder)
  clip = transformers.CLIPTextModel.from_pretrained(sd_folder / 'text_encoder')

  pipe = diffusers.StableDiffusionPipeline(
    vae=diffusers.AutoencoderKL.from_pretrained(sd_folder / 'vae'),
    text_encoder=clip,
    tokenizer=None,
    unet=diffusers.UNet2DConditionModel.from_pretrained(sd_folder / 'unet'),
    scheduler=diffusers.DDIMScheduler.from_pretrained(
      sd_folder / 'scheduler',
      timestep_spacing='trailing',
      set_alpha_to_one=True,
    ),
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
  )
  z1 = np.random.default_rng(0).standard_normal((2, 8, 8, 4), np.float32)
  expected = pipe(
    prompt_embeds=states(captions),
    negative_prompt_embeds=states([''] * 2),
    latents=torch.from_numpy(z1.transpose(0, 3, 1, 2)),
    num_inference_steps=num_steps,
    guidance_scale=1.0 + w,
    height=16,
    width=16,
    output_type='np',
  ).images
  teacher = sample.load_sampler(workdir, 'teacher', num_steps=num_steps)
  images = teacher(jax.random.key(0), captions, w, noise=z1)
  np.testing.assert_allclose(
    (np.asarray(images) + 1.0) / 2.0, expected, atol=1e-4
  )


def test_sd_configs_name_their_required_keys():
  config = helpers.load_config('sd15_distill')
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config)
  message = str(error.value)
  assert 'config.pretrained.folder' in message
  assert 'config.data.data_dir' in message
  # The folder's tokenizer/ is the default: no tokenizer files required.
  assert 'vocab_file' not in message


@pytest.mark.parametrize(
  'name, variant',
  [
    ('sd15_distill', 'tiny'),
    ('sd21_distill', 'tiny'),
    ('sd15_distill', 'tiny+inpaint'),
    ('sd15_distill', 'inpaint'),
  ],
)
def test_sd_variants_validate_as_the_command_line_loads_them(name, variant):
  # As `--config=configs/NAME.py:VARIANT` with the two required keys.
  config = helpers.load_config(name, variant)
  config.pretrained.folder, config.data.data_dir = '/models/sd', '/data'
  config_lib.validate(config)
  if 'inpaint' in variant:
    assert config.model.inpainting_input == 'masked_image'
  # v-students, also of SD 1.5's ε-teacher (README, "The student's
  # parameterisation").
  assert config_lib.student_mean_type(config) == 'v'


@pytest.mark.parametrize(
  'key, value, message',
  [
    ('diffusion.schedule', 'cosine', "'sd' exactly when model.time_input"),
    ('model.time_input', 'arctan', "'sd' exactly when model.time_input"),
    ('space', 'pixel', 'with pretrained.folder set'),
    ('text.tokenizer', 'word', "'clip'"),
  ],
)
def test_a_stable_diffusion_start_needs_an_sd_chain(key, value, message):
  config = helpers.load_config('sd21_distill', 'tiny')
  config.update_from_flattened_dict(
    {'pretrained.folder': '/sd', 'data.data_dir': '/shards', key: value}
  )
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


def test_stable_diffusion_notebook_runs(chain, tmp_path, monkeypatch):
  config, sd_folder, workdir = chain
  monkeypatch.setenv('GDD_NOTEBOOK_SD_FOLDER', str(sd_folder))
  monkeypatch.setenv('GDD_NOTEBOOK_DATA_DIR', config.data.data_dir)
  outputs = helpers.run_tiny_notebook(
    'stable_diffusion.ipynb', workdir, tmp_path, monkeypatch
  )
  text = helpers.notebook_text(outputs)
  assert 'teacher: already imported' in text
  assert 'distill/1steps: already finished' in text
  assert 'left to right: SD teacher, 4 steps | student, 1 step(s)' in text
  assert 'SD teacher, 4 steps (8 NFE): ' in text
  assert 'student, 1 step(s) (1 NFE): ' in text
  assert 'faster than the teacher (ideal 8x)' in text
  assert 'exported: ' in text and "'unet', 'vae'" in text
  assert helpers.notebook_images(outputs) == 2  # A grid per w.


def test_sample_mode_runs_straight_from_the_sd_folder(chain, tmp_path, capsys):
  # A fresh workdir: --mode=sample imports SD's VAE and teacher (nothing
  # trains) and samples SD with DDIM at guidance scale 1 + w.
  config = chain[0].copy_and_resolve_references()
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('a cat\ncats\n')
  config.sample.update(
    stage='teacher', num_steps=2, w=6.5, prompts=str(prompts), num_samples=2
  )
  workdir = tmp_path / 'fresh'
  pipeline.run(config, str(workdir), 'sample')
  path = capsys.readouterr().out.strip().splitlines()[-1]
  with np.load(path) as saved:
    assert saved['images'].shape == (2, 16, 16, 3)
    assert list(saved['captions']) == ['a cat', 'cats']
  assert sorted(p.name for p in workdir.iterdir()) == [
    'autoencoder',
    'samples',
    'teacher',
  ]


def test_edit_inpaint_and_translate_run_with_sd_weights(chain, tmp_path):
  # SDEdit with the 1-step student, replacement inpainting and DDIB
  # translation (SD's teacher as the DDIM encoder) on held-out shard images.
  config, _, workdir = chain
  config = config.copy_and_resolve_references()
  config.edit.update(
    num_inputs=2, num_steps=1, w=6.5, targets='cats|a cat at a cat'
  )
  outputs = {}
  for mode, options in (
    ('edit', {}),
    ('inpaint', dict(targets='')),
    ('translate', dict(encoder_stage='teacher', encoder_num_steps=2)),
  ):
    config.edit.update(output=str(tmp_path / mode), **options)
    pipeline.run(config, workdir, mode)
    with np.load(tmp_path / f'{mode}.npz') as saved:
      outputs[mode] = dict(saved)
  for saved in outputs.values():
    assert saved['images'].shape == (2, 16, 16, 3)
  assert list(outputs['edit']['captions']) == ['cats', 'a cat at a cat']
  assert outputs['inpaint']['masks'].shape == (2, 16, 16, 1)
  assert outputs['translate']['encoded'].shape == (2, 8, 8, 4)  # Latents.
  # The held-out captions come from the shards.
  assert set(outputs['translate']['source_captions']) <= set(
    sd_helpers.CAPTIONS
  )


def test_edit_runs_straight_from_the_sd_folder(chain, tmp_path):
  # A fresh workdir: --mode=edit imports SD and edits with the teacher.
  config = chain[0].copy_and_resolve_references()
  config.edit.update(
    stage='teacher',
    num_inputs=1,
    num_steps=2,
    w=6.5,
    targets='cats',
    output=str(tmp_path / 'edit'),
  )
  workdir = tmp_path / 'fresh'
  pipeline.run(config, str(workdir), 'edit')
  with np.load(tmp_path / 'edit.npz') as saved:
    assert saved['images'].shape == (1, 16, 16, 3)
  assert (workdir / 'teacher').is_dir() and not (workdir / 'guided').exists()
