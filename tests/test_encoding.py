"""DDIM encoding: the maths, the distilled encoder stage and `load_encoder`.

The stage's tests train 2 encoder rounds (4 → 2 → 1 steps) on a copy of
the session's `chain_workdir` (conftest), so they run on its worker.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdd import (
  config_lib,
  data,
  edit,
  encode,
  pipeline,
  sample,
  sampling,
  workdir_lib,
)
from gdd.diffusion import encoding, parameterization, samplers, schedules
from gdd.evaluation import editing, evaluate
from gdd.train import checkpointing
from tests import helpers

N = 8  # Teacher steps of the target tests.


def _teacher_eps(z, logsnr):
  """A nonlinear stand-in teacher whose ε̂ depends on z and λ."""
  scale = schedules.broadcast_to_image(jnp.tanh(0.1 * logsnr) + 1.5, z)
  return jnp.tanh(scale * z - 0.2)


def _float64_step(z, eps, logsnr_t, logsnr_s):
  """A reference DDIM step in float64: α_s x̂ + σ_s ε̂, x̂ = (z − σ_t ε̂)/α_t."""
  alpha = lambda lam: np.sqrt(1 / (1 + np.exp(-lam)))
  sigma = lambda lam: np.sqrt(1 / (1 + np.exp(lam)))
  eps = np.asarray(eps, np.float64)
  x_hat = (z - sigma(logsnr_t) * eps) / alpha(logsnr_t)
  return alpha(logsnr_s) * x_hat + sigma(logsnr_s) * eps


def _logsnr(t: float) -> float:
  return float(schedules.logsnr_from_t(t))


def test_one_student_step_with_the_target_lands_on_two_teacher_steps():
  # Every teacher grid index at once: i = 0 (from z_0, σ_0 ≈ 4.5e-5)
  # through N − 2 (the second teacher step reaches t = 1).
  index = jnp.arange(N - 1)
  z_t = jax.random.normal(jax.random.PRNGKey(0), (N - 1, 4, 4, 2))
  eps_tilde = encoding.encoding_two_step_target(
    _teacher_eps, z_t, index, teacher_num_steps=N
  )
  t, t_end = index / N, (index + 2) / N
  student = encoding.encode_step(
    z_t, eps_tilde, schedules.logsnr_from_t(t), schedules.logsnr_from_t(t_end)
  )
  for i in range(N - 1):
    z = np.asarray(z_t[i : i + 1], np.float64)
    for k in (i, i + 1):  # Two teacher steps, in float64.
      lam = _logsnr(k / N)
      eps = _teacher_eps(jnp.asarray(z, jnp.float32), jnp.full((1,), lam))
      z = _float64_step(z, eps, lam, _logsnr((k + 1) / N))
    np.testing.assert_allclose(student[i], z[0], atol=2e-5, err_msg=i)
  assert np.all(np.isfinite(eps_tilde))


def test_encode_step_is_ddim_step_written_in_eps():
  z = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 4, 1))
  eps = jax.random.normal(jax.random.PRNGKey(2), z.shape)
  logsnr_t, logsnr_s = jnp.full((3,), 2.0), jnp.full((3,), -1.0)
  alpha, sigma = schedules.alpha_sigma(2.0)
  np.testing.assert_allclose(
    encoding.encode_step(z, eps, logsnr_t, logsnr_s),
    samplers.ddim_step(z, (z - sigma * eps) / alpha, logsnr_t, logsnr_s),
    atol=1e-5,
  )
  # The first step from t = 0: the x form divides by σ_0 ≈ 4.5e-5 and
  # loses ~1e-4 to float32 rounding; the ε form matches float64.
  first = encoding.encode_step(z, eps, jnp.full((3,), 20.0), logsnr_s)
  reference = _float64_step(np.asarray(z, np.float64), eps, 20.0, -1.0)
  np.testing.assert_allclose(first, reference, atol=1e-6)


def _x_hat_float64(mean_type, f, z, alpha, sigma):
  """`parameterization.x_from_output` in float64."""
  if mean_type == 'eps':
    return (z - sigma * f) / alpha
  if mean_type == 'v':
    return alpha * z - sigma * f
  return sigma**2 * f[..., :1] + alpha * (z - sigma * f[..., 1:])


@pytest.mark.parametrize('mean_type', ['eps', 'v', 'both'])
def test_eps_from_output_is_well_conditioned_at_t_0(mean_type):
  channels = 2 if mean_type == 'both' else 1
  output = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, channels))
  z = jax.random.normal(jax.random.PRNGKey(4), (2, 4, 4, 1))
  f, z64 = np.asarray(output, np.float64), np.asarray(z, np.float64)
  for logsnr in (-5.0, 0.0, 5.0, 20.0):
    eps = parameterization.eps_from_output(
      output, z, jnp.full((2,), logsnr), mean_type
    )
    # (z − α x̂)/σ in float64: what ε̂ means.
    alpha = np.sqrt(1 / (1 + np.exp(-logsnr)))
    sigma = np.sqrt(1 / (1 + np.exp(logsnr)))
    x_hat = _x_hat_float64(mean_type, f, z64, alpha, sigma)
    expected = (z64 - alpha * x_hat) / sigma
    np.testing.assert_allclose(eps, expected, atol=2e-6, err_msg=logsnr)


def test_ddim_encode_is_the_loop_of_encode_steps():
  x = jax.random.uniform(jax.random.PRNGKey(5), (2, 4, 4, 1), minval=-1)
  z = x
  for i in range(4):
    lam = schedules.logsnr_from_t(jnp.full((2,), i / 4))
    lam_next = schedules.logsnr_from_t(jnp.full((2,), (i + 1) / 4))
    z = encoding.encode_step(z, _teacher_eps(z, lam), lam, lam_next)
  np.testing.assert_allclose(
    encoding.ddim_encode(_teacher_eps, x, num_steps=4), z, atol=1e-5
  )


# Gaussian data x ~ N(μ, s²): its exact denoiser is linear, and the ODE maps
# x to z_t = α_t μ + √(α_t² s² + σ_t²) (x − μ)/s, exactly invertible.
MU, S = 0.3, 0.5


def _gaussian_eps(z, logsnr):
  alpha, sigma = schedules.alpha_sigma(schedules.broadcast_to_image(logsnr, z))
  return sigma / (alpha**2 * S**2 + sigma**2) * (z - alpha * MU)


def _gaussian_x(z, logsnr):
  alpha, sigma = schedules.alpha_sigma(schedules.broadcast_to_image(logsnr, z))
  return MU + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (z - alpha * MU)


def test_encoding_then_decoding_the_exact_gaussian_ode_returns_the_data():
  x = MU + S * jax.random.normal(jax.random.PRNGKey(6), (8, 4, 4, 1))
  alpha_1, sigma_1 = schedules.alpha_sigma(-20.0)
  exact_z1 = alpha_1 * MU + jnp.sqrt(alpha_1**2 * S**2 + sigma_1**2) * (
    (x - MU) / S
  )
  errors = []
  for num_steps in (8, 32, 128):
    z1 = encoding.ddim_encode(_gaussian_eps, x, num_steps=num_steps)
    back = samplers.ddim_sample(_gaussian_x, z1, num_steps=num_steps, clip=None)
    errors.append((jnp.max(jnp.abs(z1 - exact_z1)), jnp.max(jnp.abs(back - x))))
  errors = np.asarray(errors)
  # First order in 1/N: 4× the steps, about a quarter of the error.
  assert np.all(errors[1:] < errors[:-1] / 3), errors
  assert np.all(errors[-1] < 0.03), errors


def test_encoder_config_is_validated():
  config = helpers.load_config('digits')
  config.encoder.w = 5.0
  config_lib.validate(config, training=('guided', 'distill'))
  with pytest.raises(
    config_lib.ConfigError, match=r'encoder.w=5.0 .* \[0.0, 4'
  ):
    config_lib.validate(config, training=('encoder',))
  config = helpers.load_config('digits')
  config.encoder.initial_num_steps = 24
  with pytest.raises(config_lib.ConfigError, match='a power of 2 > encoder'):
    config_lib.validate(config)
  config = helpers.load_config('digits')
  config.model.mean_type = 'x'
  config_lib.validate(config, training=('distill',))
  with pytest.raises(
    config_lib.ConfigError, match="mean_type='x'.* encoder stage"
  ):
    config_lib.validate(config, training=('encoder',))


# ------------------------------------------------- the encoder stage ---


def _encoder_config():
  """The chain's config, with 2 encoder rounds (4 → 2 → 1 steps)."""
  config = helpers.quick_config(num_train_steps=2)
  config.encoder.initial_num_steps = 4
  return config


@pytest.fixture(scope='module')
def encoder_workdir(chain_workdir, tmp_path_factory):
  """A copy of the chain's workdir with the encoder's rounds trained."""
  workdir = str(tmp_path_factory.mktemp('encoder') / 'run')
  shutil.copytree(chain_workdir, workdir)
  pipeline.run(_encoder_config(), workdir, 'encoder')
  return workdir


def _digits(num):
  arrays = data.eval_arrays(
    helpers.quick_config().data, split='test', num_examples=num
  )
  return arrays['image'], arrays['label']


def test_encoder_rounds_start_from_the_guided_student(encoder_workdir):
  assert workdir_lib.finished_rounds(encoder_workdir, 'encoder') == [2, 1]
  records = {}
  for n in (2, 1):
    stage_dir = workdir_lib.stage_dir(encoder_workdir, f'encoder/{n}steps')
    records[n] = json.loads(workdir_lib.stage_record(stage_dir).read_text())
  assert records[2]['teacher'] == os.path.join(encoder_workdir, 'guided')
  assert records[2]['teacher_num_steps'] == 4
  assert records[1]['teacher'].endswith(os.path.join('encoder', '2steps'))
  assert records[1]['w'] == 0.0
  # Trained: the round's params moved away from its teacher's.
  first = helpers.exported_params(encoder_workdir, 'encoder/2steps')
  guided = helpers.exported_params(encoder_workdir, 'guided')
  assert not all(
    np.array_equal(a, b)
    for a, b in zip(
      jax.tree.leaves(first), jax.tree.leaves(guided), strict=True
    )
  )


def test_finished_encoder_rerun_trains_nothing(encoder_workdir, capsys):
  stage_dir = workdir_lib.stage_dir(encoder_workdir, 'encoder/1steps')
  before = helpers.checkpoint_steps(stage_dir)
  pipeline.run(_encoder_config(), encoder_workdir, 'encoder')
  assert helpers.checkpoint_steps(stage_dir) == before
  assert 'encoder finished: step counts [2, 1]' in capsys.readouterr().out


@pytest.mark.parametrize(
  'stage, num_steps, w, nfe',
  [
    ('encoder', 2, None, 2),
    ('encoder', 1, None, 1),
    ('guided', 3, 0.5, 3),
    ('teacher', 2, None, 2),  # At w = 0, the conditional network alone.
    ('teacher', 2, 1.0, 4),  # The CFG pair.
  ],
)
def test_load_encoder_serves_rounds_and_continuous_models(
  encoder_workdir, stage, num_steps, w, nfe
):
  images, labels = _digits(3)  # Not a multiple of the 8 devices: padded.
  encoder = encode.load_encoder(
    encoder_workdir, stage, num_steps=num_steps, w=w
  )
  assert (encoder.num_steps, encoder.nfe) == (num_steps, nfe)
  z1 = np.asarray(encoder(images, labels))
  assert z1.shape == (3, 8, 8, 1) and z1.dtype == np.float32
  assert np.all(np.isfinite(z1))
  # Each image is encoded on its own: the first alone gives the same z_1.
  np.testing.assert_allclose(
    encoder(images[:1], labels[:1])[0], z1[0], atol=1e-5
  )


def test_bad_encoding_requests_say_what_exists(encoder_workdir):
  with helpers.raises_user_error(
    sampling.SampleRequestError, r'4 steps .* step counts: \[2, 1\]'
  ):
    encode.load_encoder(encoder_workdir, 'encoder', num_steps=4)
  with helpers.raises_user_error(sampling.SampleRequestError, 'one w'):
    encode.load_encoder(encoder_workdir, 'encoder', num_steps=2, w=1.0)
  with helpers.raises_user_error(sampling.SampleRequestError, 'does not'):
    encode.load_encoder(encoder_workdir, 'distill', num_steps=2)
  with helpers.raises_user_error(sampling.SampleRequestError, 'load_encoder'):
    sample.load_sampler(encoder_workdir, 'encoder', num_steps=2)
  encoder = encode.load_encoder(encoder_workdir, 'encoder', num_steps=1)
  images, labels = _digits(3)
  with helpers.raises_user_error(
    sampling.SampleRequestError, r'\(3, 8, 8\); expected \(3, 8, 8, 1\)'
  ):
    encoder(images[..., 0], labels)
  with helpers.raises_user_error(sampling.SampleRequestError, 'label'):
    encoder(images, labels[:2].astype(np.float32))


def test_encoder_needs_a_finished_guided_stage(tmp_path):
  with helpers.raises_user_error(
    checkpointing.MissingExportError, "finished 'guided' stage"
  ):
    pipeline.run(_encoder_config(), str(tmp_path), 'encoder')


def test_x_models_do_not_encode(tmp_path):
  # Refused from the recorded config, before any params are read.
  config = helpers.quick_config()
  config.model.mean_type = 'x'
  workdir_lib.write_config_record(
    workdir_lib.stage_dir(str(tmp_path), 'teacher'), config
  )
  with helpers.raises_user_error(sampling.SampleRequestError, "'x'"):
    encode.load_encoder(str(tmp_path), 'teacher', num_steps=4)


def _psnr(a, b) -> float:
  """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
  mse = float(np.mean((np.asarray(a) - np.asarray(b)) ** 2))
  return 10 * np.log10(4 / mse)


def test_teacher_encode_then_decode_reconstructs_the_input(encoder_workdir):
  # DDIM's ODE run both ways under one condition at w = 0: the input comes
  # back up to the discretisation error, whatever the (2-update) model.
  images, labels = _digits(8)
  encoder = encode.load_encoder(encoder_workdir, 'teacher', num_steps=64)
  z1 = encoder(images, labels)
  sampler = sample.load_sampler(encoder_workdir, 'teacher', num_steps=64)
  rng = jax.random.PRNGKey(0)
  cycled = sampler(rng, labels, 0.0, noise=z1)
  drawn = sampler(rng, labels, 0.0)
  assert _psnr(cycled, images) > 25
  assert _psnr(drawn, images) < 15  # Not the input without its z_1.


def _translate_config(tmp_path, **options):
  config = _encoder_config()
  config.edit.update(
    num_inputs=5,
    batch_size=4,
    stage='distill',
    num_steps=2,
    encoder_num_steps=2,
    output=str(tmp_path / 'translated'),
  )
  config.edit.update(options)
  return config


def test_translate_mode_encodes_with_sources_and_decodes_targets(
  encoder_workdir, tmp_path
):
  config = _translate_config(tmp_path, targets='8')
  pipeline.run(config, encoder_workdir, 'translate')
  images, labels = _digits(5)
  with np.load(tmp_path / 'translated.npz') as f:
    saved = dict(f)
  np.testing.assert_array_equal(saved['labels'], np.full(5, 8))
  np.testing.assert_array_equal(saved['source_labels'], labels)
  assert saved['images'].shape == (5, 8, 8, 1)
  assert (saved['t_start'], saved['num_steps']) == (1.0, 2)
  # z_1 is the 2-step distilled encoder's, under the inputs' own classes.
  encoder = encode.load_encoder(encoder_workdir, 'encoder', num_steps=2)
  np.testing.assert_allclose(
    saved['encoded'], encoder(images, labels), atol=1e-5
  )
  assert os.path.isfile(tmp_path / 'translated.png')
  # Default name: the encoder's round is part of it.
  config.edit.output = ''
  written = edit.edit_to_files(config, encoder_workdir, 'translate')
  assert written == os.path.join(
    encoder_workdir,
    'edits',
    'translate_from_encoder_2steps_distill_ddim_2steps_w1_t1.npz',
  )


@pytest.mark.parametrize(
  'options, match',
  [
    ({'encoder_num_steps': 4}, r'4 steps .* step counts: \[2, 1\]'),
    ({'sources': '3,12'}, 'sources'),
    ({'encoder_stage': 'distill'}, 'encoder_stage'),
  ],
)
def test_bad_translate_requests_are_refused(
  encoder_workdir, tmp_path, options, match
):
  config = _translate_config(tmp_path, targets='8', **options)
  with helpers.raises_user_error(ValueError, match):
    pipeline.run(config, encoder_workdir, 'translate')
  assert not os.path.exists(tmp_path / 'translated.npz')


def test_editing_evaluation_scores_every_task(encoder_workdir):
  config = _encoder_config()
  config.evaluate.update(generation=False, batch_size=16)
  config.evaluate.editing.update(
    num_inputs=12,
    batch_size=8,
    student_num_steps=(2,),
    t_starts=(0.3, 0.6, 1.0),
  )
  results = evaluate.run(config, encoder_workdir)['editing']
  records = results['records']
  rows = [
    (r['task'], r['model'], r['num_steps'], r['t_start'], r['encoder'])
    for r in records
  ]
  assert rows == [
    ('edit', 'teacher', 4, 0.3, ''),
    ('edit', 'distill', 2, 0.3, ''),  # Below 1/2: one step from 0.3.
    ('edit', 'teacher', 4, 0.6, ''),
    ('edit', 'distill', 2, 0.6, ''),
    ('edit', 'teacher', 4, 1.0, ''),
    ('edit', 'distill', 2, 1.0, ''),
    ('inpaint', 'teacher', 4, 1.0, ''),
    ('inpaint', 'distill', 2, 1.0, ''),
    ('translate', 'distill', 2, 1.0, 'encoder'),
    ('translate', 'teacher', 2, 1.0, 'teacher'),  # Like for like.
    ('translate', 'teacher', 4, 1.0, 'teacher'),
  ]
  by_row = {row: record for row, record in zip(rows, records, strict=True)}
  for record in records:
    assert 0 <= record['accuracy'] <= 1 and np.isfinite(record['fd'])
  # The 2-step student, noised to 0.6, steps to its grid point 0.5 first.
  student = by_row[rows[3]]
  assert student['t_start_used'] == 0.6 and student['t_grid'] == 0.5
  assert student['num_evaluations'] == 2
  # Less noise, closer to the input.
  assert by_row[rows[0]]['psnr'] > by_row[rows[2]]['psnr']
  assert by_row[rows[2]]['psnr'] > by_row[rows[4]]['psnr']
  # Replacement keeps the known pixels exactly.
  for row in rows[6:8]:
    assert by_row[row]['known_max_error'] == 0
  assert by_row[rows[-1]]['cycle_psnr'] > 10
  # More encoding and decoding steps, a closer cycle.
  assert by_row[rows[-1]]['cycle_psnr'] > by_row[rows[-2]]['cycle_psnr']
  eval_dir = workdir_lib.eval_dir(encoder_workdir)
  table = (eval_dir / 'editing.md').read_text()
  assert '| CFG teacher, 4 steps | 0.6 (0.6) |' in table
  assert '| distilled student, 2 steps | 0.6 (0.6 → 0.5) |' in table
  # Under 'floor' a round serves only t_start >= 1/N.
  config.evaluate.editing.off_grid = 'floor'
  floor_rows = {
    (r.task, r.model, r.t_start)
    for r in editing.plan_rows(config, encoder_workdir)
  }
  assert ('edit', 'distill', 0.3) not in floor_rows
  assert ('edit', 'distill', 0.6) in floor_rows
  # inpainting_methods picks the inpainting rows.
  config.evaluate.editing.update(
    inpainting_workdir=encoder_workdir, inpainting_methods=('trained',)
  )
  methods = {
    r.inpainting
    for r in editing.plan_rows(config, encoder_workdir)
    if r.task == 'inpaint'
  }
  assert methods == {'trained'}
  assert '| encoder, 2 steps | distilled student, 2 steps |' in table
  assert (eval_dir / 'editing_tradeoff.png').exists()


def test_editing_evaluation_refuses_bad_requests(encoder_workdir, tmp_path):
  config = _encoder_config()
  config.evaluate.editing.update(student_num_steps=(2,), t_starts=(0.4,), w=9.0)
  with helpers.raises_user_error(ValueError, 'outside the range'):
    evaluate.check(config, encoder_workdir)
  config.evaluate.editing.update(w=1.0, inpainting_workdir=encoder_workdir)
  with helpers.raises_user_error(ValueError, 'must be an inpainting chain'):
    evaluate.check(config, encoder_workdir)
  config.evaluate.update(generation=False)
  config.evaluate.editing.update(enabled=False)
  with helpers.raises_user_error(ValueError, 'score nothing'):
    evaluate.check(config, encoder_workdir)
