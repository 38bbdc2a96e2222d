"""The latent, text-conditional chain: conditioning, space, stages, CLI.

Unit tests of the pieces, then end-to-end tests on the session's tiny
`shapes:quick` chain (`conftest.shapes_workdir`: autoencoder → teacher →
stage one → 2 → 1 steps).
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gdd import (
  conditioning,
  config_lib,
  data,
  pipeline,
  sample,
  sampling,
  workdir_lib,
)
from gdd.stages import Stage, common, guided
from gdd.train import checkpointing, optim, sharding
from tests import helpers


@pytest.fixture(scope='module')
def info():
  return data.get_info(helpers.quick_latent_config().data)


@pytest.fixture(scope='module')
def text_kind(info):
  return common.build_conditioning(helpers.quick_latent_config(), info)


def test_text_condition_null_is_the_empty_caption(text_kind):
  cond = text_kind.from_request(['a red circle', 'a small blue square'])
  null = text_kind.null_like(cond)
  np.testing.assert_array_equal(null['tokens'][1], text_kind.tokens([''])[0])
  dropped = text_kind.drop_to_null(cond, jax.random.PRNGKey(0), 1.0)
  np.testing.assert_array_equal(dropped['tokens'], null['tokens'])
  kept = text_kind.drop_to_null(cond, jax.random.PRNGKey(0), 0.0)
  np.testing.assert_array_equal(kept['tokens'], cond['tokens'])


def test_text_requests_are_captions_or_tokens(text_kind):
  captions = ['a red circle', 'a large white cross']
  cond = text_kind.from_request(captions)
  assert cond['tokens'].shape == (2, text_kind.tokenizer.max_length)
  same = text_kind.from_request({'caption': captions})
  np.testing.assert_array_equal(same['tokens'], cond['tokens'])
  again = text_kind.from_request({'tokens': cond['tokens']})
  np.testing.assert_array_equal(again['tokens'], cond['tokens'])
  assert list(text_kind.saved_arrays(cond)['captions']) == captions
  for bad in ([], [3, 4], {'label': [1]}, {'tokens': np.zeros((2, 3))}):
    with pytest.raises(conditioning.CondError):
      text_kind.from_request(bad)
  with pytest.raises(conditioning.CondError, match='purple'):
    text_kind.from_request(['a purple circle'])


def test_text_grids_show_a_held_out_caption_per_row(text_kind):
  cond, rows = text_kind.grid(per_row=3, max_rows=2)
  assert rows == 2
  titles = text_kind.grid_titles(rows)
  assert titles == list(text_kind.captions[:2])
  expected = text_kind.tokens([titles[0]] * 3 + [titles[1]] * 3)
  np.testing.assert_array_equal(cond['tokens'], expected)
  batch = text_kind.host_batch({'image': np.zeros(2), 'caption': titles})
  assert set(batch) == {'image', 'tokens'}


def test_held_out_captions_come_from_the_test_split():
  config = helpers.quick_latent_config()
  held_out = data.held_out_captions(config.data, 3)
  test = data.eval_arrays(config.data, split='test', num_examples=3)
  assert list(held_out) == [str(c) for c in test['caption']]
  assert data.held_out_split(config.data) == 'test'


def test_the_text_network_reads_the_caption(info, text_kind):
  config = helpers.quick_latent_config()
  model = common.build_model(config, info)
  params = helpers.noisy_params(model)
  z = jax.random.normal(
    jax.random.PRNGKey(2), (2, *model.example_inputs(1)[0].shape[1:])
  )
  logsnr = jnp.zeros((2,))
  first = text_kind.from_request(['a red circle', 'a red circle'])
  second = text_kind.from_request(['a red circle', 'a small blue square'])
  apply = jax.jit(functools.partial(model.apply, train=False))
  out_first = apply({'params': params}, z, logsnr, first)
  out_second = apply({'params': params}, z, logsnr, second)
  np.testing.assert_allclose(out_first[0], out_second[0], rtol=1e-6, atol=1e-6)
  assert np.abs(out_first[1] - out_second[1]).max() > 1e-4
  with pytest.raises(ValueError, match="'tokens'"):
    model.apply(
      {'params': params}, z, logsnr, {'label': jnp.zeros(2)}, train=False
    )


def test_the_text_student_starts_as_its_teacher_at_every_w(info, text_kind):
  config = helpers.quick_latent_config()
  teacher = common.build_model(config, info)
  student = guided.build_student(config, info)
  teacher_params = helpers.noisy_params(teacher)
  params = guided.init_from_teacher(
    student, jax.random.PRNGKey(3), teacher_params
  )
  new = set(flax.traverse_util.flatten_dict(params)) - set(
    flax.traverse_util.flatten_dict(teacher_params)
  )
  assert new and all(k[:2] == ('unet', 'w_embedding') for k in new)
  z, logsnr, _, _ = teacher.example_inputs(2)
  z = z + 0.3
  cond = text_kind.from_request(['a red circle', 'a large green diamond'])
  expected = teacher.apply(
    {'params': teacher_params}, z, logsnr, cond, train=False
  )
  for w in (0.0, 3.0):
    got = student.apply(
      {'params': params}, z, logsnr, cond, jnp.full((2,), w), train=False
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_frozen_subtrees_never_change():
  params = {'text_encoder': {'w': jnp.ones(3)}, 'unet': {'w': jnp.ones(3)}}
  opt_config = config_lib.optimizer_config(
    name='adamw', weight_decay=0.1, warmup_steps=0, learning_rate=0.1
  )
  tx = optim.make_optimizer(opt_config, 10, frozen=('text_encoder',))
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new['text_encoder']['w'], jnp.ones(3))
  assert np.all(new['unet']['w'] < 1)


def test_only_a_training_teacher_updates_the_text_encoder():
  config = helpers.quick_latent_config()
  assert common.frozen_subtrees(config, teacher=True) == ()
  assert common.frozen_subtrees(config) == ('text_encoder',)
  config.text.train_encoder = False
  assert common.frozen_subtrees(config, teacher=True) == ('text_encoder',)
  assert common.frozen_subtrees(helpers.quick_config()) == ()


def _autoencoder_params(config, info):
  model = common.build_autoencoder(config, info)
  params = _random_params_of(
    model.init(
      jax.random.PRNGKey(0),
      jnp.zeros((1, *info.image_shape)),
      sample_posterior=False,
    )['params']
  )
  return {'autoencoder': params, 'scaling_factor': np.float32(0.5)}


def _random_params_of(params):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
  return jax.tree.unflatten(
    tree,
    [
      x + 0.05 * jax.random.normal(k, x.shape)
      for x, k in zip(leaves, keys, strict=True)
    ],
  )


def test_latent_space_scales_posterior_means(info):
  config = helpers.quick_latent_config()
  space = common.build_space(config, info)
  space_params = _autoencoder_params(config, info)
  model = space.autoencoder
  images = jax.random.uniform(
    jax.random.PRNGKey(1), (2, *info.image_shape), minval=-1, maxval=1
  )
  ae = {'params': space_params['autoencoder']}
  mean, _ = model.apply(ae, images, method='encode')
  x = space.encode(space_params, images)
  assert x.shape == (2, *space.shape)
  np.testing.assert_allclose(x, 0.5 * mean, rtol=1e-6)
  decoded = space.decode(space_params, x)
  raw = model.apply(ae, mean, method='decode')
  np.testing.assert_allclose(decoded, jnp.clip(raw, -1, 1), atol=1e-5)
  assert space.clip is None and decoded.shape == images.shape


def test_in_space_encodes_the_batch_for_the_loss(info):
  config = helpers.quick_latent_config()
  space = common.build_space(config, info)
  space_params = _autoencoder_params(config, info)
  seen = {}

  def loss_fn(params, frozen, batch, rng):
    seen['frozen'], seen['x'] = frozen, batch['image']
    return jnp.float32(0), {}

  stage = Stage(
    name='teacher',
    train_config=config.teacher,
    init_params=lambda rng, frozen: {'frozen': frozen},
    loss_fn=loss_fn,
    frozen_params='teacher params',
    sample_panels={},
    sample_ws=(),
  )
  assert common.in_space(stage, space, None) is stage
  latent = common.in_space(stage, space, space_params)
  images = jnp.zeros((2, *info.image_shape))
  latent.loss_fn({}, latent.frozen_params, {'image': images}, None)
  assert seen['frozen'] == 'teacher params'
  np.testing.assert_allclose(seen['x'], space.encode(space_params, images))
  assert latent.init_params(None, latent.frozen_params) == {
    'frozen': 'teacher params'
  }


def test_autoencoder_mode_is_refused_for_pixel_configs(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="space='latent'"):
    pipeline.run(helpers.quick_config(), str(tmp_path), 'autoencoder')


def test_a_latent_stage_needs_its_autoencoder(tmp_path):
  config = helpers.quick_latent_config()
  with pytest.raises(checkpointing.MissingExportError, match='autoencoder'):
    pipeline.run(config, str(tmp_path), 'teacher')


def test_chain_runs_every_stage_in_latent_space(shapes_workdir):
  assert workdir_lib.finished_rounds(shapes_workdir) == [2, 1]
  ae_dir = workdir_lib.stage_dir(shapes_workdir, 'autoencoder')
  record = workdir_lib.read_latent_record(ae_dir)
  assert record['scaling_factor'] > 0 and np.isfinite(record['psnr_db'])
  assert workdir_lib.reconstruction_grid_file(ae_dir).exists()
  grids = workdir_lib.grids_dir(workdir_lib.stage_dir(shapes_workdir, 'guided'))
  assert sorted(p.name for p in grids.iterdir()) == ['step4_w1.png']


def test_students_keep_the_teachers_text_encoder(shapes_workdir, info):
  teacher = helpers.exported_params(shapes_workdir, 'teacher')['text_encoder']
  fresh = common.init_params(
    common.build_model(helpers.quick_latent_config(), info),
    jax.random.PRNGKey(0),
  )
  for name in ('guided', 'distill/2steps', 'distill/1steps'):
    student = helpers.exported_params(shapes_workdir, name)['text_encoder']
    jax.tree.map(np.testing.assert_array_equal, student, teacher)
  # The teacher trained it (not only the U-Net).
  changed = jax.tree.map(
    lambda a, b: bool(np.any(a != b)), teacher, fresh['text_encoder']
  )
  assert any(jax.tree.leaves(changed))


def test_distilled_sampler_takes_prompts(shapes_workdir, info):
  sampler = sample.load_sampler(shapes_workdir, 'distill', num_steps=1)
  captions = ['a red circle', 'a large blue square above a small red circle']
  images = np.asarray(sampler(jax.random.PRNGKey(0), captions, 1.0))
  assert images.shape == (2, *info.image_shape)
  assert images.min() >= -1 and images.max() <= 1
  with pytest.raises(sampling.SampleRequestError, match='strings'):
    sampler(jax.random.PRNGKey(0), [1, 2], 1.0)


def test_sample_cli_writes_captions(shapes_workdir, tmp_path):
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('a red circle\n\na small white cross\n')
  config = helpers.quick_latent_config()
  config.sample.update(stage='distill', num_steps=1, prompts=str(prompts))
  path = sample.sample_to_files(config, shapes_workdir)
  with np.load(path) as saved:
    assert saved['images'].shape == (6, *data.get_info(config.data).image_shape)
    assert (
      list(saved['captions']) == ['a red circle', 'a small white cross'] * 3
    )
  assert (tmp_path / 'prompts.txt').exists()
  config.sample.prompts = str(tmp_path / 'missing.txt')
  with pytest.raises(sample.StageNotFoundError, match='missing.txt'):
    sample.sample_to_files(config, shapes_workdir)


def test_sample_cli_cycles_held_out_captions(shapes_workdir):
  config = helpers.quick_latent_config()
  config.sample.update(stage='guided', num_steps=2)
  path = sample.sample_to_files(config, shapes_workdir)
  held_out = common.build_conditioning(
    config, data.get_info(config.data)
  ).captions
  with np.load(path) as saved:
    assert list(saved['captions']) == [held_out[i % 4] for i in range(6)]


def test_fsdp_rules_split_the_latent_models_large_kernels(info):
  # Stable Diffusion's sizes: the default threshold (2**20 elements) then
  # splits the U-Net's, text encoder's and autoencoder's big kernels.
  config = helpers.quick_latent_config()
  config.model.update(block_out_channels=(320, 640), attention_head_dim=8)
  config.text.encoder.update(hidden_size=768, intermediate_size=3072)
  config.autoencoder.model.update(
    block_out_channels=(128, 512), norm_num_groups=32
  )
  memory = config_lib.base_config().memory
  network = jax.eval_shape(
    functools.partial(common.init_params, common.build_model(config, info)),
    jax.random.PRNGKey(0),
  )
  space = common.abstract_space_params(config, info)
  for tree in (network, space):
    specs = sharding.tree_specs(tree, memory, fsdp=4)
    flat = flax.traverse_util.flatten_dict(specs)
    sizes = flax.traverse_util.flatten_dict(
      jax.tree.map(lambda x: x.size, tree)
    )
    big = [k for k, size in sizes.items() if size >= 2**20]
    assert big
    for path in big:
      assert 'fsdp' in flat[path], path
    small = [k for k, size in sizes.items() if size < 2**20]
    assert all('fsdp' not in flat[k] for k in small)
  unet_kernel = ('unet', 'down_blocks_1', 'resnets_0', 'conv2', 'kernel')
  assert (
    'fsdp'
    in flax.traverse_util.flatten_dict(
      sharding.tree_specs(network, memory, fsdp=4)
    )[unet_kernel]
  )
