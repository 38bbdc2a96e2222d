"""End to end: the teacher on digits and on mocked TFDS data, then sampling."""

import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from gdd import data, denoisers, pipeline, sample, workdir_lib
from gdd.diffusion import samplers
from gdd.stages import common
from gdd.train import lock, loop
from tests import helpers


def _teacher_config():
  return helpers.quick_config(num_train_steps=4)


@pytest.fixture(scope='module')
def digits_workdir(tmp_path_factory):
  """A workdir with a 4-step digits teacher, trained once for this module.

  Four steps, not two: with one warm-up step (lr 0) and zero-initialised
  output layers, the class embedding only starts to matter at step 4.
  """
  workdir = str(tmp_path_factory.mktemp('digits'))
  pipeline.run(_teacher_config(), workdir, 'teacher')
  return workdir


def test_teacher_run_writes_the_workdir_layout(digits_workdir):
  stage_dir = os.path.join(digits_workdir, 'teacher')
  assert os.path.isdir(workdir_lib.params_dir(stage_dir))
  assert os.path.isdir(workdir_lib.checkpoints_dir(stage_dir))
  with open(os.path.join(stage_dir, 'config.json')) as f:
    assert json.load(f)['teacher']['num_train_steps'] == 4


def test_rerunning_a_finished_stage_does_nothing(digits_workdir, caplog):
  with caplog.at_level(logging.INFO):
    pipeline.run(_teacher_config(), digits_workdir, 'teacher')
  assert 'already finished' in caplog.text


def test_changed_training_config_is_reported(digits_workdir):
  config = _teacher_config()
  config.teacher.optimizer.learning_rate = 0.5
  config.model.ch = 8
  with pytest.raises(pipeline.ConfigMismatchError) as error:
    pipeline.run(config, digits_workdir, 'teacher')
  message = str(error.value)
  assert 'config.teacher.optimizer.learning_rate' in message
  assert 'config.model.ch: 16 in the workdir, 8 now' in message


def test_logging_cadence_may_change_on_resume(digits_workdir):
  config = _teacher_config()
  config.teacher.log_every = 1
  pipeline.run(config, digits_workdir, 'teacher')


def test_sample_cli_writes_the_npz_contract(digits_workdir, tmp_path):
  output = tmp_path / 'out' / 'teacher.npz'
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'gdd.main',
      '--config=configs/digits.py:quick',
      f'--workdir={digits_workdir}',
      '--mode=sample',
      '--config.sample.stage=teacher',
      '--config.sample.num_steps=3',
      '--config.sample.w=1.5',
      '--config.sample.sampler=ddim',
      '--config.sample.num_samples=13',
      '--config.sample.batch_size=8',
      f'--config.sample.output={output}',
    ],
    cwd=helpers.REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == str(output)
  with np.load(output) as npz:
    assert npz['images'].dtype == np.uint8
    assert npz['images'].shape == (13, 8, 8, 1)
    np.testing.assert_array_equal(npz['labels'], np.arange(13) % 10)
  assert os.path.exists(tmp_path / 'out' / 'teacher.png')


def test_load_sampler_is_jitted_and_deterministic(digits_workdir):
  sampler = sample.load_sampler(digits_workdir, 'teacher', num_steps=2)
  labels = np.array([0, 1, 2, 3, 4])
  first = sampler(jax.random.PRNGKey(0), labels, 1.0)
  assert first.shape == (5, 8, 8, 1)
  assert float(np.abs(first).max()) <= 1.0
  second = sampler(jax.random.PRNGKey(0), labels, 4.0)
  again = sampler(jax.random.PRNGKey(0), labels, 1.0)
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, second)
  # w is traced: one executable per (device-padded) batch size serves every w.
  padded = lambda n: n + -n % jax.device_count()
  assert sampler.compiled_batch_sizes() == [padded(5)]
  assert sampler.compile(11) > 0
  assert sampler.compiled_batch_sizes() == [padded(5), padded(11)]
  sampler(jax.random.PRNGKey(0), np.arange(11) % 10, 2.0)
  assert sampler.compiled_batch_sizes() == [padded(5), padded(11)]


def test_load_sampler_rejects_bad_requests(digits_workdir, tmp_path):
  with helpers.raises_user_error(FileNotFoundError, match='Train it first'):
    sample.load_sampler(str(tmp_path), 'teacher', num_steps=2)
  with helpers.raises_user_error(ValueError, match="stage='student'"):
    sample.load_sampler(digits_workdir, 'student', num_steps=2)
  sampler = sample.load_sampler(digits_workdir, 'teacher', num_steps=2)
  with helpers.raises_user_error(ValueError, match='labels'):
    sampler(jax.random.PRNGKey(0), np.array([10]), 1.0)
  with helpers.raises_user_error(ValueError, match='w=-1'):
    sampler(jax.random.PRNGKey(0), np.array([1]), -1.0)
  keys = jax.random.split(jax.random.PRNGKey(0))
  with helpers.raises_user_error(ValueError, match=r'uint32\[2, 2\]'):
    sampler(keys, np.array([1]), 1.0)


def test_a_finished_input_is_read_without_its_lock(digits_workdir):
  """Partial modes read their input's export: no lock, no training."""
  config = _teacher_config()
  ctx = pipeline.TrainContext(
    config, epath.Path(digits_workdir), data.get_info(config.data)
  )
  with lock.hold(os.path.join(digits_workdir, 'teacher')):
    params = ctx.input_loader('teacher')()
  assert 'class_embedding' in params
  config.teacher.p_uncond = 0.2
  changed = pipeline.TrainContext(config, ctx.workdir, ctx.info)
  with pytest.raises(pipeline.ConfigMismatchError, match='p_uncond'):
    changed.input_loader('teacher')()


def _digits_images(num: int) -> np.ndarray:
  config = _teacher_config()
  return data.eval_arrays(config.data, split='test', num_examples=num)['image']


def test_sampler_defaults_are_plain_ddim_from_noise(digits_workdir):
  """t_start=1, no init, no mask: the sampler as it always was."""
  sampler = sample.load_sampler(digits_workdir, 'teacher', num_steps=4)
  labels = np.arange(6) % 10
  rng = jax.random.PRNGKey(1)
  plain = sampler(rng, labels, 1.5)
  np.testing.assert_array_equal(
    plain,
    sampler(rng, {'label': labels}, 1.5, init=None, t_start=1.0, mask=None),
  )
  # By hand: z_1 from the first half of the key, 4 guided DDIM steps.
  config = sample.load_stage_config(digits_workdir, 'teacher')
  info = data.get_info(config.data)
  model = common.build_model(config, info)
  params = loop.load_exported_params(
    os.path.join(digits_workdir, 'teacher'), common.abstract_params(model)
  )
  denoise = denoisers.guided(
    model,
    common.build_conditioning(config, info),
    params,
    {'label': jax.numpy.asarray(labels)},
    1.5,
  )
  z = jax.random.normal(jax.random.split(rng)[0], (6, 8, 8, 1))
  logsnr = lambda t: common.logsnr_fn(config)(jax.numpy.full((6,), t))
  for i in range(4):
    t, s = 1 - i / 4, 1 - (i + 1) / 4
    x_hat = jax.numpy.clip(denoise(z, logsnr(t)), -1, 1)
    z = x_hat if i == 3 else samplers.ddim_step(z, x_hat, logsnr(t), logsnr(s))
  np.testing.assert_allclose(plain, z, atol=1e-6)


def test_sampler_starts_from_init_and_keeps_the_mask(digits_workdir):
  sampler = sample.load_sampler(digits_workdir, 'teacher', num_steps=4)
  labels = np.arange(6) % 10
  init = _digits_images(6)
  rng = jax.random.PRNGKey(2)
  ones = np.ones((6, 8, 8, 1), np.float32)
  kept = sampler(rng, labels, 1.0, init=init, t_start=0.7, mask=ones)
  np.testing.assert_array_equal(kept, init)
  # Almost no noise added: the model returns (almost) its input.
  near = sampler(rng, labels, 1.0, init=init, t_start=1e-3)
  assert float(np.abs(near - init).max()) < 0.05
  edited = sampler(rng, labels, 1.0, init=init, t_start=0.8)
  assert float(np.abs(edited - init).max()) > 0.1
  left = ones.copy()
  left[:, :, 4:] = 0.0
  half = sampler(rng, labels, 1.0, init=init, t_start=0.8, mask=left)
  np.testing.assert_array_equal(half[:, :, :4], init[:, :, :4])
  assert not np.allclose(half[:, :, 4:], init[:, :, 4:])
  # One executable per request kind at this (padded) batch size.
  assert sampler.compiled_requests() == [
    (8, True, False, False, 4, False),
    (8, True, True, False, 4, False),
  ]
  with helpers.raises_user_error(ValueError, match='need init=True'):
    sampler.compile(6, mask=True)


def test_sampler_noise_replaces_its_own_draw(digits_workdir):
  sampler = sample.load_sampler(digits_workdir, 'teacher', num_steps=2)
  labels = np.arange(4)
  rng = jax.random.PRNGKey(3)
  drawn = jax.random.normal(jax.random.split(rng)[0], (4, 8, 8, 1))
  # Two programs: equal up to float rounding.
  np.testing.assert_allclose(
    sampler(rng, labels, 1.0, noise=drawn),
    sampler(rng, labels, 1.0),
    atol=1e-5,
  )
  other = sampler(rng, labels, 1.0, noise=-drawn)
  assert float(np.abs(other - sampler(rng, labels, 1.0)).max()) > 0.1
  with helpers.raises_user_error(ValueError, match=r'noise has shape'):
    sampler(rng, labels, 1.0, noise=drawn[:3])
  with helpers.raises_user_error(ValueError, match='NaN or Inf'):
    sampler(rng, labels, 1.0, noise=np.full((4, 8, 8, 1), np.nan))


@pytest.mark.parametrize(
  'kwargs, match',
  [
    (dict(t_start=0.5), 'need init'),
    (dict(cond={'text': np.zeros(2)}), "keys \\['text'\\]"),
    (dict(mask=np.ones((2, 8, 8, 1))), 'need init'),
    (dict(init=np.zeros((2, 8, 8, 1)), t_start=0.0), r't_start=0.0'),
    (dict(init=np.zeros((2, 8, 8, 1)), t_start=1.5), r'\(0, 1\]'),
    (dict(init=np.zeros((3, 8, 8, 1))), r'expected \(2, 8, 8, 1\)'),
    (
      dict(init=np.zeros((2, 8, 8, 1)), mask=np.ones((2, 8, 8, 3))),
      r'mask has shape',
    ),
    (
      dict(init=np.zeros((2, 8, 8, 1)), mask=np.full((2, 8, 8, 1), 2.0)),
      r'\[0, 1\]',
    ),
  ],
)
def test_sampler_refuses_bad_start_arguments(digits_workdir, kwargs, match):
  sampler = sample.load_sampler(digits_workdir, 'teacher', num_steps=2)
  kwargs = dict(kwargs)
  cond = kwargs.pop('cond', np.array([1, 2]))
  with helpers.raises_user_error(ValueError, match=match):
    sampler(jax.random.PRNGKey(0), cond, 1.0, **kwargs)
  assert sampler.compiled_batch_sizes() == []


def test_sampler_takes_typed_and_raw_keys_alike(digits_workdir):
  sampler = sample.load_sampler(digits_workdir, 'teacher', num_steps=2)
  labels = np.arange(4)
  np.testing.assert_array_equal(
    sampler(jax.random.key(0), labels, 1.0),
    sampler(jax.random.PRNGKey(0), labels, 1.0),
  )


def test_sample_to_files_returns_the_file_it_wrote(digits_workdir, tmp_path):
  config = _teacher_config()
  config.sample.output = str(tmp_path / 'noext')
  written = sample.sample_to_files(config, digits_workdir)
  assert written == str(tmp_path / 'noext.npz')
  assert sorted(os.listdir(tmp_path)) == ['noext.npz', 'noext.png']


def test_teacher_runs_on_mocked_tfds_with_the_paper_memory_settings(tmp_path):
  # A TFDS data set through pipeline.run, under the ImageNet 64 config's
  # memory settings (bfloat16, FSDP over 8 devices, micro-batches) scaled
  # down: one example per device and micro-batch, every array split (a tiny
  # model has none of 2**20 elements), and 2 micro-batches, not the paper's
  # 8 (the same scan; each one more cost about 35 s here). On CIFAR-10's
  # 32×32 images: ImageNet 64's pipeline is tests/test_data.py's, and its
  # 64×64 images doubled this test's time.
  config = helpers.quick_config('cifar10', num_train_steps=2)
  config.model.update(ch=8, emb_ch=16, head_dim=8)
  paper = helpers.load_config('imagenet64')
  assert paper.teacher.grad_accum_steps > 1
  config.model.dtype = paper.model.dtype
  config.memory.update(fsdp=paper.memory.fsdp, fsdp_min_size=0)
  config.teacher.update(grad_accum_steps=2, batch_size=8 * 2)
  config.data.data_dir = str(tmp_path / 'tfds')
  helpers.write_tfds_metadata('cifar10', config.data.data_dir)
  workdir = str(tmp_path / 'run')
  with tfds.testing.mock_data(num_examples=16, data_dir=config.data.data_dir):
    pipeline.run(config, workdir, 'teacher')
  assert os.path.isdir(workdir_lib.params_dir(os.path.join(workdir, 'teacher')))


def test_missing_tfds_dataset_fails_before_compiling(tmp_path):
  config = helpers.quick_config('cifar10')
  config.data.data_dir = str(tmp_path / 'empty')
  with helpers.raises_user_error(
    FileNotFoundError, match=str(tmp_path / 'empty')
  ):
    pipeline.run(config, str(tmp_path / 'run'), 'teacher')
  assert not (tmp_path / 'run').exists()
