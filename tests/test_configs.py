"""Every config loads and validates; bad values fail early and clearly."""

import copy
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from gdd import config_lib, data, pipeline
from gdd.models import unet
from gdd.stages import common
from tests import conftest, helpers

CONFIGS = ('digits', 'cifar10', 'imagenet64', 'shapes')
# Old workdirs have no autoencoder folder: only these kinds were recorded.
PIXEL_KINDS = tuple(k for k in config_lib.STAGES if k != 'autoencoder')


def _base_config(space: str) -> 'config_lib.ml_collections.ConfigDict':
  """The base config, or one of a latent chain on a caption data set."""
  config = config_lib.base_config()
  if space == 'latent':
    config.data.name = 'shapes'
    config.space = 'latent'
  return config


@pytest.mark.parametrize('variant', ['', 'quick'])
@pytest.mark.parametrize('name', CONFIGS)
def test_every_config_loads_and_validates(name, variant):
  config = helpers.load_config(name, variant)
  config_lib.validate(config)
  assert config.data.name == name


def test_paper_scale_hyperparameters():
  imagenet = helpers.load_config('imagenet64')
  assert imagenet.model.ch == 192
  assert tuple(imagenet.model.ch_mult) == (1, 2, 3, 4)
  assert tuple(imagenet.model.attn_resolutions) == (32, 16, 8)
  assert imagenet.teacher.batch_size == 2048
  cifar = helpers.load_config('cifar10')
  assert cifar.model.mean_type == 'x'
  assert cifar.teacher.optimizer.weight_decay == 1e-3


def test_unknown_variant_is_rejected():
  with pytest.raises(ValueError, match='quick'):
    helpers.load_config('digits', 'huge')


@pytest.mark.parametrize(
  'key, value, message',
  [
    ('data.name', 'mnist', "config.data.name='mnist' is invalid"),
    ('data.random_flip', True, 'not mirror-symmetric'),
    ('data.held_out_dir', '/data/coco', "only 'webdataset' reads it"),
    ('model.mean_type', 'noise', 'one of'),
    ('model.ch_mult', (), 'non-empty tuple'),
    ('model.dropout', 1.5, 'in \\[0, 1\\)'),
    ('teacher.batch_size', 0, 'config.teacher.batch_size=0'),
    ('teacher.p_uncond', 0.0, 'in \\(0, 1\\)'),
    ('teacher.ema_decay', 1.0, 'ema_decay'),
    ('teacher.optimizer.name', 'sgd', "one of \\('adam', 'adamw'\\)"),
    ('teacher.optimizer.warmup_steps', 10**9, '<= teacher.num_train_steps'),
    ('diffusion.loss_weighting', 'l1', 'snr_trunc'),
    ('diffusion.logsnr_max', -30.0, '> diffusion.logsnr_min'),
    ('sample.w', -1.0, 'config.sample.w=-1.0'),
    ('sample.sampler', 'euler', 'ddim'),
    ('grids.sample_ws', (), 'non-empty'),
    ('evaluate.feature_extractor', 'clip', "one of \\('inception'"),
    ('evaluate.ws', (-1.0,), 'guidance strengths w >= 0'),
    ('evaluate.num_samples', 0, 'config.evaluate.num_samples=0'),
    ('evaluate.teacher_num_steps', (0,), 'tuple of positive ints'),
    ('sample.w', float('inf'), 'config.sample.w=inf is invalid: allowed a fin'),
    ('teacher.optimizer.learning_rate', float('inf'), 'rate=inf .* a finite'),
    ('teacher.optimizer.learning_rate', float('nan'), 'rate=nan .* a finite'),
    ('guided.w_max', float('inf'), 'config.guided.w_max=inf .* a finite'),
    ('guided.w_loss_power', -1.0, 'w_loss_power=-1.0 .* a number >= 0'),
    ('grids.sample_ws', (0.0, float('nan')), r'\(0.0, nan\) .* finite numbers'),
    ('evaluate.ws', (0.0, float('inf')), r'ws=\(0.0, inf\) .* finite numbers'),
  ],
)
def test_bad_values_are_rejected_with_key_value_and_allowed(
  key, value, message
):
  config = helpers.load_config('digits')
  _set(config, key, value)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


@pytest.mark.parametrize(
  'key, value',
  [
    ('model.ch_mult', (1, np.int64(2))),
    ('evaluate.teacher_num_steps', (np.int32(8),)),
    ('distributed.local_device_ids', (np.int64(0),)),
  ],
)
def test_numpy_ints_are_refused(key, value):
  # config.json cannot store a numpy int, so a config may not hold one.
  config = helpers.load_config('digits')
  _set(config, key, value)
  with pytest.raises(config_lib.ConfigError, match=f'config.{key}='):
    config_lib.validate(config)


def _set(config, key: str, value) -> None:
  *sections, leaf = key.split('.')
  for part in sections:
    config = config[part]
  config[leaf] = value


def _changed(value, field_type=None):
  """Another value of the same type, to change one key of a config.

  An unset placeholder (None) gets a value of its declared `field_type`.
  """
  if value is None:
    return {str: 'x', int: 1, tuple: (1,)}[field_type]
  if isinstance(value, bool):
    return not value
  if isinstance(value, int):
    return value + 1
  if isinstance(value, float):
    return value * 2 + 1
  if isinstance(value, tuple):
    return (*value, 1)
  return (value or '') + 'x'


def _is_listed(key: str, entries) -> bool:
  return any(key == entry or key.startswith(entry + '.') for entry in entries)


def test_every_config_key_is_classified_for_the_mismatch_check():
  # A new key fails here until it is added to TRAINING_KEYS or, with its
  # reason, to NOT_TRAINING_KEYS.
  configs = [_base_config(space).to_dict() for space in config_lib.SPACES]
  inpainting = config_lib.base_config()
  config_lib.make_inpainting(inpainting)  # Its random masks are read too.
  configs.append(inpainting.to_dict())
  keys = set(config_lib.flatten(configs[0]))
  assert set(config_lib.TRAINING_KEYS) == set(config_lib.STAGES)
  trained = set().union(
    *(
      config_lib.training_keys(config, kind)
      for kind in config_lib.STAGES
      for config in configs
    )
  )
  not_trained = {k for k in keys if _is_listed(k, config_lib.NOT_TRAINING_KEYS)}
  assert keys - trained - not_trained == set()
  assert trained & not_trained == set()
  entries = {*config_lib.NOT_TRAINING_KEYS}.union(
    *config_lib.TRAINING_KEYS.values()
  )
  stale = [e for e in entries if not any(_is_listed(k, [e]) for k in keys)]
  assert not stale


@pytest.mark.parametrize('space', config_lib.SPACES)
@pytest.mark.parametrize('kind', config_lib.STAGES)
def test_each_training_key_change_is_a_mismatch(kind, space, tmp_path):
  config = _base_config(space)
  pipeline.record_stage_config(config, str(tmp_path), kind)
  for key, value in config_lib.flatten(config).items():
    if key not in config_lib.training_keys(config.to_dict(), kind):
      continue
    changed = copy.deepcopy(config)
    _set(changed, key, _changed(value))
    with pytest.raises(pipeline.ConfigMismatchError) as error:
      pipeline.record_stage_config(changed, str(tmp_path), kind)
    diffs = re.findall(r'config\.(\S+): .* in the workdir', str(error.value))
    # data.name, space and model.inpainting also decide which other keys
    # are read.
    assert diffs == [key] or (
      key in ('data.name', 'space', 'model.inpainting') and key in diffs
    )


@pytest.mark.parametrize('space', config_lib.SPACES)
@pytest.mark.parametrize('kind', config_lib.STAGES)
def test_keys_a_stage_does_not_learn_from_may_change(kind, space, tmp_path):
  config = _base_config(space)
  pipeline.record_stage_config(config, str(tmp_path), kind)
  trained = config_lib.training_keys(config.to_dict(), kind)
  changed = copy.deepcopy(config)
  for key, value in config_lib.flatten(config).items():
    if key not in trained:
      section, _, name = key.rpartition('.')
      field_type = (config[section] if section else config).get_type(name)
      _set(changed, key, _changed(value, field_type))
  pipeline.record_stage_config(changed, str(tmp_path), kind)


def test_a_workdir_recorded_before_the_grids_rename_still_resumes(tmp_path):
  # Older runs recorded the training-time grids as `eval` (and
  # `<stage>.eval_every`); neither is a training key.
  config = config_lib.base_config()
  stored = json.loads(config.to_json())
  stored['eval'] = stored.pop('grids')
  for stage in ('teacher', 'guided', 'distill'):
    stored[stage]['eval_every'] = stored[stage].pop('grids_every')
  (tmp_path / 'config.json').write_text(json.dumps(stored))
  for kind in PIXEL_KINDS:
    pipeline.record_stage_config(config, str(tmp_path), kind)


def test_a_workdir_recorded_before_ema_warmup_resumes_without_it(tmp_path):
  config = config_lib.base_config()
  stored = json.loads(config.to_json())
  for stage in ('teacher', 'guided', 'distill'):
    del stored[stage]['ema_warmup']
  (tmp_path / 'config.json').write_text(json.dumps(stored))
  for kind in PIXEL_KINDS:
    pipeline.record_stage_config(config, str(tmp_path), kind)
  config.teacher.ema_warmup = True
  with pytest.raises(pipeline.ConfigMismatchError, match='ema_warmup'):
    pipeline.record_stage_config(config, str(tmp_path), 'teacher')


@pytest.mark.parametrize(
  'key, value', [('w_loss_power', 2.0), ('student_mean_type', 'x')]
)
def test_a_workdir_recorded_before_a_guided_key_resumes_without_it(
  tmp_path, key, value
):
  config = config_lib.base_config()
  stored = json.loads(config.to_json())
  del stored['guided'][key]
  (tmp_path / 'config.json').write_text(json.dumps(stored))
  for kind in PIXEL_KINDS:
    pipeline.record_stage_config(config, str(tmp_path), kind)
  config.guided[key] = value
  with pytest.raises(pipeline.ConfigMismatchError, match=key):
    pipeline.record_stage_config(config, str(tmp_path), 'guided')


@pytest.mark.parametrize(
  'training, refused',
  [
    ((), ''),
    (('teacher',), ''),  # An ε-teacher is fine (Stable Diffusion 1.x is ε).
    (('guided',), 'guided stage'),
    (('teacher', 'guided', 'distill'), 'guided and distill stage'),
    (('distill',), 'distill stage'),
  ],
)
def test_eps_students_need_an_explicit_opt_in(training, refused):
  config = config_lib.base_config()
  config.model.mean_type = 'eps'
  if refused:
    with helpers.raises_user_error(ValueError, refused) as info:
      config_lib.validate(config, training)
    assert isinstance(info.value, config_lib.ConfigError)
    assert 'PD §4' in str(info.value)
    assert 'config.allow_eps_students=True' in str(info.value)
  else:
    config_lib.validate(config, training)
  config.allow_eps_students = True
  config_lib.validate(config, training)


@pytest.mark.parametrize(
  'teacher, student, message',
  [
    ('eps', 'v', ''),  # An ε-teacher's v-student needs no opt-in.
    ('eps', 'x', ''),
    ('both', '', ''),
    ('v', 'eps', 'allow_eps_students'),
    ('eps', '', 'allow_eps_students'),
    ('eps', 'both', "not switch to or from 'both'"),
    ('both', 'v', "not switch to or from 'both'"),
    ('v', 'V', "one of \\('', 'x', 'v', 'eps'\\)"),
  ],
)
def test_student_mean_type_reads_the_teachers_channels(
  teacher, student, message
):
  config = config_lib.base_config()
  config.model.mean_type = teacher
  config.guided.student_mean_type = student
  if message:
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.validate(config, ('guided', 'distill'))
  else:
    config_lib.validate(config, ('guided', 'distill'))
    assert config_lib.student_mean_type(config) == student or teacher


def test_an_x_student_is_refused_for_the_encoder():
  config = config_lib.base_config()
  config.model.mean_type = 'v'
  config.guided.student_mean_type = 'x'
  with pytest.raises(config_lib.ConfigError, match="student_mean_type='x'"):
    config_lib.validate(config, ('encoder',))


def test_eps_students_are_refused_before_any_work(tmp_path):
  config = helpers.load_config('digits')
  config.model.mean_type = 'eps'
  workdir = tmp_path / 'run'
  with pytest.raises(config_lib.ConfigError, match='allow_eps_students'):
    pipeline.run(config, str(workdir), 'distill_single_w')
  assert not workdir.exists()


def test_invalid_config_fails_before_any_work(tmp_path):
  config = helpers.load_config('digits')
  config.teacher.batch_size = -4
  workdir = tmp_path / 'run'
  with pytest.raises(config_lib.ConfigError):
    pipeline.run(config, str(workdir), 'teacher')
  assert not workdir.exists()


def test_cli_prints_user_errors_as_one_message(tmp_path):
  def run(*overrides):
    return subprocess.run(
      [
        sys.executable,
        '-m',
        'gdd.main',
        '--config=configs/digits.py',
        f'--workdir={tmp_path}/run',
        *overrides,
      ],
      cwd=helpers.REPO,
      capture_output=True,
      text=True,
      env=dict(
        os.environ,
        JAX_PLATFORMS='cpu',
        XLA_FLAGS=conftest.TEST_XLA_FLAGS,
        GDD_VERBOSE='',
      ),
      timeout=300,
    )

  typo = run('--config.teacher.num_train_step=1')
  assert typo.returncode == 2
  assert 'Did you mean "num_train_steps"' in typo.stderr
  assert 'Traceback' not in typo.stderr
  assert len(typo.stderr.splitlines()) <= 3
  # Refused before sampling looks for the (missing) teacher.
  bad = run('--mode=sample', '--config.sample.w=inf')
  assert bad.returncode == 1
  assert 'config.sample.w=inf is invalid: allowed a finite' in bad.stderr
  assert 'Traceback' not in bad.stderr
  verbose = run('--mode=sample', '--config.sample.w=inf', '--verbose')
  assert verbose.returncode == 1 and 'Traceback' in verbose.stderr
  assert not (tmp_path / 'run').exists()


def test_load_file_reads_variants_and_names_missing_files(tmp_path):
  path = os.path.join(helpers.REPO, 'configs', 'digits.py')
  quick = config_lib.load_file(path + ':quick')
  assert (
    quick.teacher.num_train_steps
    < config_lib.load_file(path).teacher.num_train_steps
  )
  with pytest.raises(FileNotFoundError, match='nope.py'):
    config_lib.load_file(str(tmp_path / 'nope.py'))


def test_a_record_from_before_latent_keys_builds_its_network():
  # Recorded before config.space, model.kind, data.image_size,
  # data.held_out_dir, text and autoencoder existed: read back as the pixel
  # digits config it was.
  stored = json.loads(config_lib.base_config().to_json())
  for section in ('space', 'text', 'autoencoder'):
    del stored[section]
  del stored['model']['kind'], stored['data']['image_size']
  del stored['data']['held_out_dir']
  del stored['sample']['prompts']
  del stored['guided']['w_loss_power'], stored['guided']['student_mean_type']
  config = config_lib.from_record(stored)
  assert config.space == 'pixel' and config.model.kind == 'unet'
  assert config.guided.student_mean_type == ''
  config_lib.validate(config)
  info = data.get_info(config.data)
  assert isinstance(common.build_model(config, info), unet.UNet)
  assert common.build_space(config, info).shape == info.image_shape


def test_a_latent_record_from_before_the_sd_schedule_samples_as_before():
  # A shapes workdir recorded before diffusion.schedule, model.time_input
  # and pretrained existed: cosine schedule, gdd's time input, no SD start.
  stored = json.loads(helpers.load_config('shapes').to_json())
  del stored['diffusion']['schedule'], stored['model']['time_input']
  del stored['pretrained']
  config = config_lib.from_record(stored)
  assert config.diffusion.schedule == 'cosine'
  assert config.model.time_input == 'arctan'
  assert config.pretrained.folder == ''
  config_lib.validate(config)
  assert common.logsnr_fn(config)(1.0) == config.diffusion.logsnr_min
