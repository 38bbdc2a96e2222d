"""ImageNet 256 in latent space: config, centre-cropped data, class SD U-Net.

The config and its networks at paper scale (shapes only), the TFDS pipeline
on mocked imagenet2012 examples, the class-conditional SD U-Net, and one
tiny autoencoder → teacher → stage one chain on mocked data.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from gdd import config_lib, data, pipeline, sample, workdir_lib
from gdd.models import class_sd_unet
from gdd.stages import common, guided
from gdd.train import checkpointing, sharding
from tests import helpers

CONFIG = 'imagenet256_latent'
TFDS_NAME = 'imagenet2012'
TRAINED = ('autoencoder', 'teacher', 'guided', 'distill')


def _leaves_size(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('variant', ['', 'quick'])
def test_config_is_a_class_conditional_latent_chain(variant):
  config = helpers.load_config(CONFIG, variant)
  config_lib.validate(config, training=TRAINED)
  info = data.get_info(config.data)
  assert (info.name, info.image_shape, info.num_classes) == (
    'imagenet256',
    (256, 256, 3),
    1000,
  )
  assert common.build_space(config, info).shape == (32, 32, 4)
  model = common.build_model(config, info)
  assert isinstance(model, class_sd_unet.ClassSDUNet)
  assert model.config.unet.num_class_embeds == 1000
  # No text encoder: nothing is frozen in any stage.
  assert common.frozen_subtrees(config, teacher=True) == ()
  assert common.frozen_subtrees(config) == ()
  assert data.held_out_split(config.data) == 'validation'
  assert config.teacher.p_uncond == 0.1
  assert config.evaluate.feature_extractor == 'inception'


@pytest.fixture(scope='module')
def paper():
  """The paper-scale config and its networks' abstract params."""
  config = helpers.load_config(CONFIG)
  info = data.get_info(config.data)
  return config, {
    'teacher': common.abstract_params(common.build_model(config, info)),
    'student': common.abstract_params(guided.build_student(config, info)),
    'space': common.abstract_space_params(config, info),
  }


def test_paper_scale_networks(paper):
  config, abstract = paper
  assert config.distill.initial_num_steps == 1024
  assert (config.guided.w_min, config.guided.w_max) == (0.0, 4.0)
  # Stable Diffusion's VAE shape: diffusers' AutoencoderKL of SD 1.x/2.x
  # has 83,653,863 params.
  assert _leaves_size(abstract['space']['autoencoder']) == 83_653_863
  assert 300e6 < _leaves_size(abstract['teacher']) < 450e6  # LDM-4: ~400M.
  teacher, student = (
    flax.traverse_util.flatten_dict(abstract[k]) for k in ('teacher', 'student')
  )
  extra = set(student) - set(teacher)
  assert extra and all(k[:2] == ('unet', 'w_embedding') for k in extra)
  assert set(teacher) <= set(student)


def test_the_pixel_unet_is_refused_for_captions():
  config = helpers.load_config('shapes', 'quick')
  config.model = config_lib.base_config().model
  with pytest.raises(config_lib.ConfigError, match="'sd_unet' for 'shapes'"):
    config_lib.validate(config)


# ------------------------------------------------------------------ data ---

# (height, width, value inside the centre crop, value outside it): ADM's
# crop keeps the centre square of the short side, resized to 256.
_CROP_CASES = (
  (256, 512, 200, 0),  # Wide, short side 256: the middle 256 columns.
  (512, 256, 100, 0),  # Tall: the middle 256 rows.
  (64, 96, 77, 77),  # Smaller than 256: enlarged ×4, then cropped.
  (1024, 768, 30, 30),  # Larger: shrunk ×3 (antialiased), then cropped.
)


def _crop_cases_as_dataset(self, split, decoders=None, **kwargs):
  """Mocked `_as_dataset`: example i is `_CROP_CASES[i]`, label i."""
  del self, split, kwargs
  import tensorflow as tf

  examples = []
  for label, (height, width, inside, outside) in enumerate(_CROP_CASES):
    image = np.full((height, width, 3), outside, np.uint8)
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    image[top : top + side, left : left + side] = inside
    if decoders is not None:  # The train pipeline decodes images itself.
      image = tf.io.encode_png(image)
    examples.append(
      tf.data.Dataset.from_tensors({'image': image, 'label': label})
    )
  return functools.reduce(tf.data.Dataset.concatenate, examples)


def _data_config(**overrides):
  config = helpers.load_config(CONFIG).data
  config.update({'data_dir': None, **overrides})
  return config


def test_images_are_adm_centre_crops_scaled_like_every_tfds_set():
  with tfds.testing.mock_data(as_dataset_fn=_crop_cases_as_dataset):
    held_out = data.eval_arrays(_data_config(), split='validation')
    batches = [
      next(
        data.train_batches(
          _data_config(random_flip=True),
          seed=seed,
          global_batch_size=len(_CROP_CASES),
        )
      )
      for seed in (0, 1)
    ]
  inside = np.array([case[2] for case in _CROP_CASES], np.uint8)
  expected = np.broadcast_to(inside[:, None, None, None], (4, 256, 256, 3))
  assert held_out['image'].dtype == np.float32
  np.testing.assert_array_equal(
    held_out['image'], data.to_model_range(expected, 255)
  )
  np.testing.assert_array_equal(held_out['label'], np.arange(4))
  for batch in batches:
    assert batch['image'].shape == (4, 256, 256, 3)
    assert batch['image'].dtype == np.uint8 and batch['label'].dtype == np.int32
    # Each example once, in a seeded order, its crop whatever the flip.
    np.testing.assert_array_equal(batch['image'], expected[batch['label']])
    assert sorted(batch['label']) == [0, 1, 2, 3]


def test_random_examples_of_any_size_become_256_crops():
  # tfds' mock draws each image's height and width in [5, 50).
  with tfds.testing.mock_data(num_examples=8):
    batch = next(
      data.train_batches(_data_config(), seed=0, global_batch_size=8)
    )
    held_out = data.eval_arrays(
      _data_config(), split='validation', num_examples=3
    )
  assert batch['image'].shape == (8, 256, 256, 3)
  assert batch['label'].min() >= 0 and batch['label'].max() < 1000
  assert len(np.unique(batch['image'].reshape(8, -1), axis=0)) == 8
  assert held_out['image'].shape == (3, 256, 256, 3)
  assert -1 <= held_out['image'].min() < held_out['image'].max() <= 1


def test_missing_imagenet_names_the_manual_download(tmp_path):
  with helpers.raises_user_error(
    FileNotFoundError, match=str(tmp_path)
  ) as error:
    data.check_available(_data_config(data_dir=str(tmp_path)))
  message = str(error.value)
  assert f'tfds build {TFDS_NAME} --data_dir={tmp_path}' in message
  assert 'ILSVRC2012_img_train.tar' in message and 'downloads/manual' in message


# --------------------------------------------------------------- network ---


@pytest.fixture(scope='module')
def tiny():
  """The quick config's network (16, 32 channels) on 32×32×4 latents."""
  config = helpers.load_config(CONFIG, 'quick')
  return config, data.get_info(config.data)


def test_the_class_network_reads_the_label(tiny):
  config, info = tiny
  model = common.build_model(config, info)
  params = helpers.noisy_params(model)
  z, _, _, _ = model.example_inputs(3)
  z = jax.random.normal(jax.random.PRNGKey(2), z.shape)
  apply = jax.jit(
    lambda c: model.apply({'params': params}, z, jnp.zeros(3), c, train=False)
  )
  out = apply({'label': jnp.array([0, 7, 7])})
  other = apply({'label': jnp.array([0, 999, 1000])})
  np.testing.assert_allclose(out[0], other[0], rtol=1e-6, atol=1e-6)
  assert np.abs(out[1] - other[1]).max() > 1e-4
  # The null label (K = 1000) is a row of its own, not a class.
  assert np.abs(out[2] - other[2]).max() > 1e-4
  assert np.all(np.isfinite(other))
  with pytest.raises(ValueError, match="'label'"):
    model.apply({'params': params}, z, jnp.zeros(3), {'tokens': z}, train=False)


def test_the_class_student_starts_as_its_teacher_at_every_w(tiny):
  config, info = tiny
  teacher = common.build_model(config, info)
  student = guided.build_student(config, info)
  teacher_params = helpers.noisy_params(teacher)
  params = guided.init_from_teacher(
    student, jax.random.PRNGKey(3), teacher_params
  )
  z, logsnr, _, _ = teacher.example_inputs(2)
  z, cond = z + 0.3, {'label': jnp.array([3, 1000])}
  expected = teacher.apply(
    {'params': teacher_params}, z, logsnr, cond, train=False
  )
  for w in (0.0, 3.0):
    got = student.apply(
      {'params': params}, z, logsnr, cond, jnp.full((2,), w), train=False
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_fsdp_rules_split_the_paper_networks_large_kernels(paper):
  config, abstract = paper
  memory = config.memory
  for tree in abstract.values():
    specs = flax.traverse_util.flatten_dict(
      sharding.tree_specs(tree, memory, fsdp=memory.fsdp)
    )
    sizes = flax.traverse_util.flatten_dict(
      jax.tree.map(lambda x: x.size, tree)
    )
    big = {k for k, size in sizes.items() if size >= memory.fsdp_min_size}
    assert big and all('fsdp' in specs[k] for k in big)
    assert all('fsdp' not in specs[k] for k in set(sizes) - big)
  specs = sharding.tree_specs(abstract['teacher'], memory, fsdp=memory.fsdp)
  kernel = ('unet', 'down_blocks_2', 'resnets_0', 'conv2', 'kernel')
  assert 'fsdp' in flax.traverse_util.flatten_dict(specs)[kernel]


# ----------------------------------------------------------------- chain ---


@pytest.fixture(scope='module')
def chain(tmp_path_factory):
  """autoencoder → teacher on mocked ImageNet, 2 updates each.

  Not the students: what they add to a class-conditional latent teacher
  (the w-embedding, starting as the teacher) is tested on the network
  directly (`test_the_class_student_starts_as_its_teacher_at_every_w`), and
  their programs are what the shapes chain compiles already.
  """
  root = tmp_path_factory.mktemp('imagenet256')
  config = helpers.quick_latent_config(CONFIG, num_train_steps=2)
  # One batch shape, so measuring s and the PSNR compiles one encoder.
  config.autoencoder.update(scaling_examples=8, eval_examples=8)
  config.data.data_dir = str(root / 'tfds')
  helpers.write_tfds_metadata(TFDS_NAME, config.data.data_dir)
  workdir = str(root / 'run')
  with tfds.testing.mock_data(num_examples=16, data_dir=config.data.data_dir):
    for mode in ('autoencoder', 'teacher'):
      pipeline.run(config, workdir, mode)
  return workdir


def _exported(workdir, name):
  return checkpointing.load_params(
    workdir_lib.params_dir(workdir_lib.stage_dir(workdir, name))
  )


def test_chain_runs_on_imagenet_latents(chain):
  record = workdir_lib.read_latent_record(
    workdir_lib.stage_dir(chain, 'autoencoder')
  )
  assert record['scaling_factor'] > 0 and np.isfinite(record['psnr_db'])
  teacher = _exported(chain, 'teacher')
  assert set(teacher) == {'unet'}
  assert teacher['unet']['class_embedding']['embedding'].shape[0] == 1001
  grids = workdir_lib.grids_dir(workdir_lib.stage_dir(chain, 'teacher'))
  assert [p.name for p in grids.iterdir()] == ['step2_w1.png']
  sampler = sample.load_sampler(chain, 'teacher', num_steps=1)
  images = np.asarray(sampler(jax.random.PRNGKey(0), [0, 999], 1.0))
  assert images.shape == (2, 256, 256, 3)
  assert -1 <= images.min() < images.max() <= 1
