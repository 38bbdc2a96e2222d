"""gdd.weights: diffusers / transformers checkpoints load into gdd's networks.

Tiny random Stable-Diffusion-shaped networks are built with the reference
implementations (diffusers' UNet2DConditionModel and AutoencoderKL,
transformers' CLIPTextModel; torch on CPU, test-only dependencies), saved
with `save_pretrained` into a folder in diffusers' pipeline layout, loaded
by gdd without torch, and both run on the same inputs. Every param is
perturbed away from its initial value, so a wrong transpose, a norm read as
a kernel or a skipped bias shows in the outputs.
"""

import dataclasses
import json
from typing import Any, NamedTuple

import diffusers
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from gdd.diffusion import schedules
from gdd.models import autoencoder, sd_unet, text_encoder
from gdd.weights import (
  diffusers_configs,
  diffusers_export,
  naming,
  safetensors_io,
)
from gdd.weights import stable_diffusion as sd

# Float32: the largest differences seen are 1e-6 to 8e-6 on outputs of
# size 1-4 (README, "Distil your Stable Diffusion").
ATOL, RTOL = 5e-5, 1e-5
TOKENS = 7

SD1_UNET = dict(
  sample_size=8,
  block_out_channels=(32, 64),
  layers_per_block=1,
  down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
  up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
  cross_attention_dim=32,
  attention_head_dim=4,
  norm_num_groups=8,
)
# SD 2.x's options: linear projections, per-block heads (reversed on the
# way up), two transformer layers, upcast attention, v-prediction.
SD2_UNET = dict(
  SD1_UNET,
  down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
  up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
  attention_head_dim=(2, 4),
  transformer_layers_per_block=2,
  use_linear_projection=True,
  upcast_attention=True,
)
VAE = dict(
  block_out_channels=(16, 32),
  down_block_types=('DownEncoderBlock2D',) * 2,
  up_block_types=('UpDecoderBlock2D',) * 2,
  latent_channels=4,
  norm_num_groups=8,
  layers_per_block=1,
)
CLIP = dict(
  vocab_size=99,
  hidden_size=32,
  intermediate_size=37,
  num_hidden_layers=2,
  num_attention_heads=4,
  max_position_embeddings=TOKENS,
  bos_token_id=97,
  eos_token_id=98,
  pad_token_id=1,
)
VARIANTS = {
  'sd1': (SD1_UNET, 'epsilon', 'quick_gelu'),
  'sd2': (SD2_UNET, 'v_prediction', 'gelu'),
}


def _perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for param in module.parameters():
      param.add_(0.1 * torch.randn(param.shape, generator=generator))
  return module.eval()


def _sd_scheduler(prediction_type: str) -> diffusers.DDIMScheduler:
  return diffusers.DDIMScheduler(
    beta_schedule='scaled_linear',
    beta_start=0.00085,
    beta_end=0.012,
    prediction_type=prediction_type,
  )


def _save_pipeline(folder, unet_options, prediction_type, hidden_act):
  torch.manual_seed(0)
  unet = _perturbed(diffusers.UNet2DConditionModel(**unet_options), 1)
  vae = _perturbed(diffusers.AutoencoderKL(**VAE), 2)
  text = _perturbed(
    transformers.CLIPTextModel(
      transformers.CLIPTextConfig(**CLIP, hidden_act=hidden_act)
    ),
    3,
  )
  scheduler = _sd_scheduler(prediction_type)
  unet.save_pretrained(folder / 'unet')
  vae.save_pretrained(folder / 'vae')
  text.save_pretrained(folder / 'text_encoder')
  scheduler.save_pretrained(folder / 'scheduler')
  return unet, vae, text


class Saved(NamedTuple):
  """A tiny SD saved in diffusers' layout, and its torch networks."""

  variant: str
  folder: Any
  unet: Any
  vae: Any
  text: Any


@pytest.fixture(scope='module', params=sorted(VARIANTS))
def pipeline(request, tmp_path_factory) -> Saved:
  folder = tmp_path_factory.mktemp(request.param)
  networks = _save_pipeline(folder, *VARIANTS[request.param])
  return Saved(request.param, folder, *networks)


def _unet_inputs(config: sd_unet.SDUNetConfig):
  rng = np.random.default_rng(0)
  size = config.sample_size
  z = rng.standard_normal((3, size, size, 4)).astype(np.float32)
  context = rng.standard_normal((3, 5, config.cross_attention_dim))
  return z, context.astype(np.float32), np.array([999, 500, 10])


def _torch_unet(unet, z, context, steps) -> np.ndarray:
  with torch.no_grad():
    out = unet(
      torch.from_numpy(z.transpose(0, 3, 1, 2)),
      torch.from_numpy(steps),
      encoder_hidden_states=torch.from_numpy(context),
    ).sample
  return out.numpy().transpose(0, 2, 3, 1)


def _gdd_unet(network: sd.Network, z, context, steps, **extra) -> np.ndarray:
  # SD's timestep i is gdd's t = (i + 1)/1000 (schedules.sd_logsnr_from_t).
  logsnr = schedules.sd_logsnr_from_t((steps + 1) / 1000.0)
  return np.asarray(
    sd_unet.SDUNet(network.config).apply(
      {'params': network.params}, z, logsnr, context, train=False, **extra
    )
  )


def test_unet_equals_diffusers(pipeline):
  network = sd.load_unet(pipeline.folder)
  assert network.config.time_input == 'sd'
  z, context, steps = _unet_inputs(network.config)
  expected = _torch_unet(pipeline.unet, z, context, steps)
  np.testing.assert_allclose(
    _gdd_unet(network, z, context, steps), expected, rtol=RTOL, atol=ATOL
  )


def test_inpainting_unet_equals_diffusers_and_exports_back(tmp_path):
  # SD's 9-channel inpainting U-Net reads [z, mask (1 = fill in), masked
  # image latents]; gdd's known region is 'mask' (1 = kept) and 'masked'.
  unet = _perturbed(
    diffusers.UNet2DConditionModel(**SD1_UNET, in_channels=9, out_channels=4),
    4,
  )
  unet.save_pretrained(tmp_path / 'sd' / 'unet')
  _sd_scheduler('epsilon').save_pretrained(tmp_path / 'sd' / 'scheduler')
  network = sd.load_unet(tmp_path / 'sd')
  assert network.config.inpainting and network.config.in_channels == 4
  assert network.config.inpainting_input == 'masked_image'
  z, context, steps = _unet_inputs(network.config)
  rng = np.random.default_rng(1)
  kept = (rng.uniform(size=(*z.shape[:3], 1)) > 0.5).astype(np.float32)
  masked = rng.standard_normal(z.shape).astype(np.float32)
  known = {'mask': kept, 'masked': masked}
  ours = _gdd_unet(network, z, context, steps, known=known)
  sd_input = np.concatenate([z, 1.0 - kept, masked], axis=-1)
  expected = _torch_unet(unet, sd_input, context, steps)
  np.testing.assert_allclose(ours, expected, rtol=RTOL, atol=ATOL)
  out = diffusers_export.export_unet(
    tmp_path / 'export', network.config, network.params
  )
  exported = diffusers.UNet2DConditionModel.from_pretrained(out).eval()
  assert exported.config.in_channels == 9
  np.testing.assert_allclose(
    _torch_unet(exported, sd_input, context, steps), expected, atol=1e-6
  )


def test_prediction_type_sets_the_mean_type(pipeline):
  expected = {'sd1': 'eps', 'sd2': 'v'}[pipeline.variant]
  assert sd.load_unet(pipeline.folder).config.mean_type == expected


def test_vae_equals_diffusers(pipeline):
  network, scaling_factor = sd.load_vae(pipeline.folder)
  assert scaling_factor == pytest.approx(0.18215)
  images = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3))
  images = images.astype(np.float32)
  with torch.no_grad():
    posterior = pipeline.vae.encode(
      torch.from_numpy(images.transpose(0, 3, 1, 2))
    )
    dist = posterior.latent_dist
    decoded = pipeline.vae.decode(dist.mean).sample
  model = autoencoder.Autoencoder(network.config)
  params = {'params': network.params}
  mean, logvar = model.apply(params, images, method='encode')
  for got, want in ((mean, dist.mean), (logvar, dist.logvar)):
    np.testing.assert_allclose(
      got, want.numpy().transpose(0, 2, 3, 1), rtol=RTOL, atol=ATOL
    )
  np.testing.assert_allclose(
    model.apply(params, mean, method='decode'),
    decoded.numpy().transpose(0, 2, 3, 1),
    rtol=RTOL,
    atol=ATOL,
  )


def test_text_encoder_equals_transformers(pipeline):
  network = sd.load_text_encoder(pipeline.folder)
  tokens = np.array([[97, 5, 6, 98, 1, 1, 1], [97, 40, 41, 42, 43, 44, 98]])
  with torch.no_grad():
    expected = pipeline.text(torch.from_numpy(tokens))
  got = text_encoder.TextEncoder(network.config).apply(
    {'params': network.params}, jnp.asarray(tokens)
  )
  for name in ('last_hidden_state', 'pooler_output'):
    np.testing.assert_allclose(
      getattr(got, name),
      getattr(expected, name).numpy(),
      rtol=RTOL,
      atol=ATOL,
      err_msg=name,
    )


def test_load_checks_the_networks_fit_together(pipeline):
  loaded = sd.load(pipeline.folder)
  assert loaded.unet.config.cross_attention_dim == 32
  assert loaded.text_encoder.config.hidden_size == 32
  assert loaded.vae.config.latent_channels == loaded.unet.config.in_channels


def test_schedule_is_diffusers_scaled_linear():
  # λ of every SD timestep as diffusers computes ᾱ. diffusers works in
  # float32, gdd (as CompVis' training code) in float64: 1 − ᾱ_0 ≈ 8.5e-4
  # loses digits in float32, hence 3e-5 on λ_0.
  scheduler = diffusers.DDIMScheduler(
    beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012
  )
  alphas = scheduler.alphas_cumprod.numpy().astype(np.float64)
  expected = np.log(alphas / (1 - alphas))
  np.testing.assert_allclose(schedules.sd_logsnr_table(), expected, atol=3e-5)
  steps = np.arange(1000)
  np.testing.assert_allclose(
    schedules.sd_logsnr_from_t((steps + 1) / 1000), expected, atol=3e-5
  )
  np.testing.assert_allclose(
    schedules.sd_timestep(schedules.sd_logsnr_table()), steps, atol=1e-3
  )


@pytest.mark.parametrize('num_steps', [1, 2, 4, 8])
def test_student_grid_is_ddim_trailing_timesteps(num_steps):
  # The grid t = k/N of an N-step student is what diffusers' DDIM with
  # 'trailing' spacing samples at, so an exported student runs there.
  scheduler = diffusers.DDIMScheduler(
    beta_schedule='scaled_linear',
    beta_start=0.00085,
    beta_end=0.012,
    timestep_spacing='trailing',
  )
  scheduler.set_timesteps(num_steps)
  grid = np.arange(num_steps, 0, -1) / num_steps
  np.testing.assert_allclose(
    schedules.sd_timestep(schedules.sd_logsnr_from_t(grid)),
    scheduler.timesteps.numpy(),
    atol=1e-3,
  )
  assert schedules.sd_logsnr_from_t(0.0) == schedules.LOGSNR_MAX


def test_exported_student_runs_in_diffusers_at_its_w(pipeline, tmp_path):
  teacher = sd.load_unet(pipeline.folder)
  config = dataclasses.replace(teacher.config, use_w_embedding=True)
  fresh = sd.abstract_unet_params(config)['w_embedding']
  rng = np.random.default_rng(5)
  w_embedding = jax.tree.map(
    lambda s: 0.1 * rng.standard_normal(s.shape).astype(np.float32), fresh
  )
  student = sd.Network(config, dict(teacher.params, w_embedding=w_embedding))
  out = diffusers_export.export_unet(
    tmp_path / 'unet', config, student.params, w=1.5
  )
  exported = diffusers.UNet2DConditionModel.from_pretrained(out).eval()
  z, context, steps = _unet_inputs(config)
  w = np.full((3,), 1.5, np.float32)
  np.testing.assert_allclose(
    _torch_unet(exported, z, context, steps),
    _gdd_unet(student, z, context, steps, w=w),
    rtol=RTOL,
    atol=ATOL,
  )
  # The w-embedding mattered: the teacher's output differs.
  assert not np.allclose(
    _gdd_unet(teacher, z, context, steps),
    _gdd_unet(student, z, context, steps, w=w),
    atol=1e-3,
  )


def test_export_refuses_to_overwrite_and_needs_w(pipeline, tmp_path):
  teacher = sd.load_unet(pipeline.folder)
  diffusers_export.export_unet(tmp_path, teacher.config, teacher.params)
  with pytest.raises(FileExistsError, match='does not overwrite'):
    diffusers_export.export_unet(tmp_path, teacher.config, teacher.params)
  with pytest.raises(ValueError, match='Pass w exactly'):
    diffusers_export.export_unet(
      tmp_path / 'b', teacher.config, teacher.params, w=1.0
    )
  exported = diffusers_configs.unet_config(
    json.loads((tmp_path / 'config.json').read_text()),
    mean_type=teacher.config.mean_type,
    where='export',
  )
  assert exported == teacher.config


def test_old_checkpoint_names_load(pipeline, tmp_path):
  # Older transformers prefix CLIP's keys with 'text_model.' and save the
  # position_ids buffer; older diffusers VAEs name attention query/key/
  # value/proj_attn (some as 1x1 convs). All load to the same params.
  text = sd.read_weights(pipeline.folder / 'text_encoder', 'model')
  old_text = {f'text_model.{k}': v for k, v in text.items()}
  old_text['text_model.embeddings.position_ids'] = np.arange(TOKENS)[None]
  vae = sd.read_weights(pipeline.folder / 'vae', 'diffusion_pytorch_model')
  renames = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value'}
  old_vae = {}
  for key, value in vae.items():
    for new, old in renames.items():
      key = key.replace(f'.{new}.', f'.{old}.')
    if '.query.weight' in key or '.key.weight' in key:
      value = value[:, :, None, None]  # stored as a 1x1 conv
    old_vae[key.replace('.to_out.0.', '.proj_attn.')] = value
  for sub, stem, state_dict in (
    ('text_encoder', 'model', old_text),
    ('vae', 'diffusion_pytorch_model', old_vae),
  ):
    (tmp_path / sub).mkdir()
    (tmp_path / sub / 'config.json').write_text(
      (pipeline.folder / sub / 'config.json').read_text()
    )
    safetensors_io.save(state_dict, tmp_path / sub / f'{stem}.safetensors')
  for got, want in (
    (sd.load_text_encoder(tmp_path), sd.load_text_encoder(pipeline.folder)),
    (sd.load_vae(tmp_path)[0], sd.load_vae(pipeline.folder)[0]),
  ):
    jax.tree.map(np.testing.assert_array_equal, got.params, want.params)


def test_sharded_and_variant_weights(pipeline, tmp_path):
  state_dict = sd.read_weights(
    pipeline.folder / 'unet', 'diffusion_pytorch_model'
  )
  keys = sorted(state_dict)
  shards = {
    'diffusion_pytorch_model.fp16-00001-of-00002.safetensors': keys[::2],
    'diffusion_pytorch_model.fp16-00002-of-00002.safetensors': keys[1::2],
  }
  weight_map = {}
  for name, shard_keys in shards.items():
    half = {k: state_dict[k].astype(np.float16) for k in shard_keys}
    safetensors_io.save(half, tmp_path / name)
    weight_map.update(dict.fromkeys(shard_keys, name))
  index = tmp_path / 'diffusion_pytorch_model.safetensors.index.fp16.json'
  index.write_text(json.dumps({'weight_map': weight_map}))
  got = sd.read_weights(tmp_path, 'diffusion_pytorch_model', variant='fp16')
  assert sorted(got) == keys
  for key in keys:
    assert got[key].dtype == np.float16
    np.testing.assert_array_equal(got[key], state_dict[key].astype(np.float16))
  with pytest.raises(sd.WeightsNotFoundError, match='variant='):
    sd.read_weights(tmp_path, 'diffusion_pytorch_model')


def test_pickle_only_folder_is_refused_with_the_fix(tmp_path):
  (tmp_path / 'diffusion_pytorch_model.bin').write_bytes(b'not read')
  with pytest.raises(sd.WeightsNotFoundError, match='safe_serialization'):
    sd.read_weights(tmp_path, 'diffusion_pytorch_model')


def test_safetensors_round_trip_and_reference_files(tmp_path):
  # gdd's reader and writer against the reference (torch) implementation,
  # bfloat16 included, which the safetensors package's numpy API refuses.
  from safetensors import torch as safetensors_torch  # noqa: PLC0415

  reference = {
    'bf16': torch.randn(3, 4).to(torch.bfloat16),
    'f16': torch.randn(5).half(),
    'f32': torch.randn(2, 1, 3),
    'i64': torch.arange(6).reshape(2, 3),
    'scalar': torch.tensor(2.5),
  }
  safetensors_torch.save_file(reference, tmp_path / 'ref.safetensors')
  loaded = safetensors_io.load(tmp_path / 'ref.safetensors')
  assert loaded['bf16'].dtype == ml_dtypes.bfloat16
  for name, tensor in reference.items():
    np.testing.assert_array_equal(
      loaded[name].astype(np.float64), tensor.double().numpy(), err_msg=name
    )
  safetensors_io.save(loaded, tmp_path / 'gdd.safetensors', {'format': 'pt'})
  back = safetensors_torch.load_file(tmp_path / 'gdd.safetensors')
  for name, tensor in reference.items():
    assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor)


def test_safetensors_errors(tmp_path):
  bad = tmp_path / 'bad.safetensors'
  bad.write_bytes((10**9).to_bytes(8, 'little') + b'{}')
  with pytest.raises(safetensors_io.SafetensorsError, match='header length'):
    safetensors_io.load(bad)
  with pytest.raises(safetensors_io.SafetensorsError, match='cannot store'):
    safetensors_io.save({'c': np.zeros(2, np.complex64)}, tmp_path / 'c')


def test_torch_key_rule():
  assert (
    naming.torch_key(
      (
        'down_blocks_0',
        'attentions_1',
        'transformer_blocks_0',
        'attn1',
        'to_out_0',
        'kernel',
      )
    )
    == 'down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.weight'
  )
  # Names ending in _1 that are not lists keep it.
  assert naming.torch_key(('time_embedding', 'linear_1', 'bias')) == (
    'time_embedding.linear_1.bias'
  )
  assert naming.torch_key(('encoder', 'layers_3', 'mlp', 'fc2', 'kernel')) == (
    'encoder.layers.3.mlp.fc2.weight'
  )
  assert naming.torch_key(('ff', 'net_2', 'kernel')) == 'ff.net.2.weight'


def test_mismatch_lists_every_problem():
  abstract = {
    'conv': {'kernel': jax.ShapeDtypeStruct((3, 3, 2, 4), jnp.float32)},
    'norm': {'scale': jax.ShapeDtypeStruct((4,), jnp.float32)},
    'dense': {'kernel': jax.ShapeDtypeStruct((4, 5), jnp.float32)},
  }
  state_dict = {
    'conv.weight': np.zeros((4, 2, 3, 3)),
    'dense.weight': np.zeros((4, 5)),  # transposed: [out, in] is (5, 4)
    'extra.bias': np.zeros(2),
  }
  with pytest.raises(naming.WeightsMismatchError) as error:
    naming.to_flax(state_dict, abstract, what='ckpt')
  message = str(error.value)
  assert '1 missing' in message and 'norm.weight' in message
  assert '1 unexpected' in message and 'extra.bias' in message
  assert 'dense.weight: stored (4, 5), the network needs (5, 4)' in message
  good = dict(
    state_dict, **{'norm.weight': np.ones(4), 'dense.weight': np.ones((5, 4))}
  )
  del good['extra.bias']
  params = naming.to_flax(good, abstract, what='ckpt')
  assert params['conv']['kernel'].shape == (3, 3, 2, 4)
  assert params['dense']['kernel'].dtype == np.float32
  back = naming.to_torch(params)
  assert {k: v.shape for k, v in back.items()} == {
    k: v.shape for k, v in good.items()
  }


@pytest.mark.parametrize(
  'change, message',
  [
    (dict(addition_embed_type='text_time'), 'addition_embed_type'),
    (dict(class_embed_type='timestep'), 'class_embed_type'),
    (dict(resnet_time_scale_shift='scale_shift'), 'gdd builds'),
    (dict(some_new_option=3), 'an option gdd does not know'),
    (dict(in_channels=7), r'in = 2·out \+ 1'),
  ],
)
def test_unsupported_unet_configs_are_refused(pipeline, change, message):
  config = json.loads((pipeline.folder / 'unet' / 'config.json').read_text())
  with pytest.raises(diffusers_configs.UnsupportedConfigError, match=message):
    diffusers_configs.unet_config(
      dict(config, **change), mean_type='eps', where='unet/config.json'
    )


def test_other_schedules_are_refused(pipeline, tmp_path):
  for sub in ('unet', 'scheduler'):
    (tmp_path / sub).symlink_to(pipeline.folder / sub)
  path = pipeline.folder / 'scheduler' / 'scheduler_config.json'
  config = json.loads(path.read_text())
  (tmp_path / 'scheduler').unlink()
  (tmp_path / 'scheduler').mkdir()
  (tmp_path / 'scheduler' / 'scheduler_config.json').write_text(
    json.dumps(dict(config, beta_schedule='linear'))
  )
  with pytest.raises(diffusers_configs.UnsupportedConfigError, match='linear'):
    sd.load_unet(tmp_path)
