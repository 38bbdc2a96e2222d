"""Identities of the pure diffusion maths (schedules, parameterisations,
guidance, losses, samplers)."""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdd.diffusion import (
  guidance,
  losses,
  parameterization,
  samplers,
  schedules,
)


def _random(shape, seed):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


class _Prediction(NamedTuple):
  """Denoised estimates for one z_t: data x̂, noise ε̂ and velocity v̂."""

  x: jnp.ndarray
  eps: jnp.ndarray
  v: jnp.ndarray


def _eps_from_x(x, z, logsnr):
  """ε̂ = (z − α x̂)/σ: the noise that maps x̂ to z at this log-SNR."""
  alpha, sigma = schedules.alpha_sigma(schedules.broadcast_to_image(logsnr, z))
  return (z - alpha * x) / sigma


def _prediction_from_x(x, z, logsnr) -> _Prediction:
  """(x̂, ε̂, v̂) from x̂ alone: v̂ = α ε̂ − σ x̂."""
  alpha, sigma = schedules.alpha_sigma(schedules.broadcast_to_image(logsnr, z))
  eps = _eps_from_x(x, z, logsnr)
  return _Prediction(x=x, eps=eps, v=alpha * eps - sigma * x)


def test_schedule_endpoints_and_midpoint():
  logsnr = schedules.logsnr_from_t(jnp.array([0.0, 0.5, 1.0]))
  np.testing.assert_allclose(logsnr, [20.0, 0.0, -20.0], atol=1e-4)


def test_schedule_is_decreasing_and_time_input_tracks_t():
  t = jnp.linspace(0.0, 1.0, 101)
  logsnr = schedules.logsnr_from_t(t)
  assert jnp.all(jnp.diff(logsnr) < 0)
  np.testing.assert_allclose(schedules.time_input(logsnr), t, atol=1e-4)


def test_alpha_sigma_variance_preserving_and_stable_ratios():
  la = jnp.array([-20.0, -3.0, 0.0, 5.0, 20.0])
  lb = jnp.array([-19.0, 4.0, -2.0, 20.0, 19.5])
  alpha_a, sigma_a = schedules.alpha_sigma(la)
  alpha_b, sigma_b = schedules.alpha_sigma(lb)
  np.testing.assert_allclose(alpha_a**2 + sigma_a**2, 1.0, rtol=1e-6)
  np.testing.assert_allclose(
    schedules.sigma_ratio(la, lb), sigma_b / sigma_a, rtol=1e-5
  )
  np.testing.assert_allclose(
    schedules.alpha_ratio(la, lb), alpha_b / alpha_a, rtol=1e-5
  )


def test_transition_variance_composes_with_marginals():
  # Var(z_t) = (α_t/α_s)² Var(z_s) + σ²_{t|s} = 1 for unit-variance data.
  ls, lt = jnp.float32(3.0), jnp.float32(-1.0)
  ratio = schedules.alpha_ratio(ls, lt)
  np.testing.assert_allclose(
    ratio**2 + schedules.transition_variance(ls, lt), 1.0, rtol=1e-6
  )


def _output_for(mean_type, x, eps, z, logsnr):
  """The network output that encodes the true x for `mean_type`."""
  alpha, sigma = schedules.alpha_sigma(schedules.broadcast_to_image(logsnr, z))
  v = alpha * eps - sigma * x
  if mean_type == 'x':
    return x
  if mean_type == 'eps':
    return eps
  if mean_type == 'v':
    return v
  # `both` averages its two estimates with weights σ² and α²; feeding the
  # true (x, ε) must give back x whatever the weights.
  return jnp.concatenate([x, eps], axis=-1)


@pytest.mark.parametrize('mean_type', parameterization.MEAN_TYPES)
def test_parameterisation_round_trip(mean_type):
  x = _random((4, 8, 8, 3), 0)
  eps = _random((4, 8, 8, 3), 1)
  logsnr = jnp.array([-6.0, -1.0, 2.0, 6.0])
  z = schedules.diffuse(x, eps, logsnr)
  x_hat = parameterization.x_from_output(
    _output_for(mean_type, x, eps, z, logsnr), z, logsnr, mean_type
  )
  pred = _prediction_from_x(x_hat, z, logsnr)
  np.testing.assert_allclose(pred.x, x, atol=2e-4)
  np.testing.assert_allclose(pred.eps, eps, atol=2e-4)
  alpha, sigma = schedules.alpha_sigma(schedules.broadcast_to_image(logsnr, z))
  np.testing.assert_allclose(pred.v, alpha * eps - sigma * x, atol=2e-4)


def test_unknown_mean_type_is_rejected():
  with pytest.raises(ValueError, match='mean_type'):
    parameterization.x_from_output(
      jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 1)), jnp.zeros(1), 'y'
    )


def test_guidance_is_the_same_in_x_eps_and_v_space():
  z = _random((3, 4, 4, 1), 0)
  logsnr = jnp.array([-2.0, 0.5, 3.0])
  x_cond, x_uncond = _random(z.shape, 1), _random(z.shape, 2)
  w = jnp.array([0.0, 1.0, 4.0])
  x_guided = guidance.combine(x_cond, x_uncond, w)
  cond = _prediction_from_x(x_cond, z, logsnr)
  uncond = _prediction_from_x(x_uncond, z, logsnr)
  guided = _prediction_from_x(x_guided, z, logsnr)
  np.testing.assert_allclose(
    guidance.combine(cond.eps, uncond.eps, w), guided.eps, atol=1e-4
  )
  np.testing.assert_allclose(
    guidance.combine(cond.v, uncond.v, w), guided.v, atol=1e-4
  )
  # w = 0 is the conditional model itself.
  np.testing.assert_allclose(x_guided[0], x_cond[0])


def test_guidance_scale_conversion():
  assert guidance.guidance_scale_from_strength(0.0) == 1.0
  assert guidance.guidance_strength_from_scale(7.5) == 6.5


def test_guided_x_runs_one_batch_of_two_b():
  calls = []

  def x_fn(z, logsnr, cond):
    calls.append(z.shape[0])
    null = (cond['label'] == 10)[:, None, None, None]
    return (
      jnp.where(null, 0.0, jnp.ones_like(z)) + 0.0 * logsnr[:, None, None, None]
    )

  z = jnp.zeros((2, 2, 2, 1))
  out = guidance.guided_x(
    x_fn,
    z,
    jnp.zeros(2),
    {'label': jnp.array([3, 4])},
    {'label': jnp.array([10, 10])},
    2.0,
  )
  assert calls == [4]
  np.testing.assert_allclose(out, 3.0)  # (1 + 2)·1 − 2·0.


@pytest.mark.parametrize('weighting', losses.WEIGHTINGS)
def test_loss_weightings_match_their_definitions(weighting):
  x = _random((3, 4, 4, 1), 0)
  x_pred = x + 0.1 * _random(x.shape, 1)
  eps = _random(x.shape, 2)
  logsnr = jnp.array([-3.0, 0.0, 3.0])
  z = schedules.diffuse(x, eps, logsnr)
  x_mse = jnp.mean((x_pred - x) ** 2, axis=(1, 2, 3))
  eps_pred = _eps_from_x(x_pred, z, logsnr)
  eps_mse = jnp.mean((eps_pred - eps) ** 2, axis=(1, 2, 3))
  alpha, sigma = schedules.alpha_sigma(logsnr)
  v_mse = jnp.mean(
    (
      schedules.broadcast_to_image(alpha, x) * (eps_pred - eps)
      - schedules.broadcast_to_image(sigma, x) * (x_pred - x)
    )
    ** 2,
    axis=(1, 2, 3),
  )
  expected = {
    'snr_trunc': jnp.maximum(x_mse, eps_mse),
    'v_mse': v_mse,
    'eps_mse': eps_mse,
  }[weighting]
  got = losses.weighted_loss(x_pred, x, logsnr, weighting=weighting)
  np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_ddim_step_with_exact_x_recovers_forward_process():
  x = _random((2, 4, 4, 1), 0)
  eps = _random(x.shape, 1)
  logsnr_t, logsnr_s = jnp.array([-4.0, 1.0]), jnp.array([2.0, 19.0])
  z_t = schedules.diffuse(x, eps, logsnr_t)
  z_s = samplers.ddim_step(z_t, x, logsnr_t, logsnr_s)
  np.testing.assert_allclose(
    z_s, schedules.diffuse(x, eps, logsnr_s), atol=1e-5
  )


def _oracle(x_true):
  def denoise(z, logsnr):
    return jnp.broadcast_to(x_true, z.shape) + 0.0 * logsnr[:, None, None, None]

  return denoise


@pytest.mark.parametrize('num_steps', [1, 2, 7])
def test_ddim_sample_with_oracle_returns_data(num_steps):
  x_true = jnp.clip(_random((3, 4, 4, 1), 0), -1, 1)
  out = samplers.ddim_sample(
    _oracle(x_true), _random(x_true.shape, 1), num_steps=num_steps
  )
  np.testing.assert_allclose(out, x_true, atol=1e-5)


def test_samplers_call_the_network_n_times():
  counter = {'n': 0}

  def denoise(z, logsnr):
    def bump(_):
      counter['n'] += 1

    jax.debug.callback(bump, logsnr)
    return jnp.zeros_like(z)

  noise = _random((2, 4, 4, 1), 0)
  for name, run in {
    'ddim': lambda: samplers.ddim_sample(denoise, noise, num_steps=5),
    'stochastic': lambda: samplers.stochastic_sample(
      denoise, noise, jax.random.PRNGKey(0), num_steps=6
    ),
    'ancestral': lambda: samplers.ancestral_sample(
      denoise, noise, jax.random.PRNGKey(0), num_steps=5
    ),
  }.items():
    counter['n'] = 0
    jax.block_until_ready(run())
    jax.effects_barrier()
    expected = 6 if name == 'stochastic' else 5
    assert counter['n'] == expected, name


def test_stochastic_and_ancestral_samplers_with_oracle_return_data():
  x_true = jnp.clip(_random((2, 4, 4, 1), 0), -1, 1)
  noise = _random(x_true.shape, 1)
  rng = jax.random.PRNGKey(3)
  for out in (
    samplers.stochastic_sample(_oracle(x_true), noise, rng, num_steps=4),
    samplers.ancestral_sample(_oracle(x_true), noise, rng, num_steps=4),
  ):
    np.testing.assert_allclose(out, x_true, atol=1e-5)


def test_stochastic_sampler_matches_a_step_by_step_reference():
  """GD Eq. 5 written out: jump 2/N by DDIM, re-noise back 1/N, repeat."""
  num_steps, rng = 6, jax.random.PRNGKey(4)

  def denoise(z, logsnr):
    return 0.5 * jnp.tanh(z + 0.01 * logsnr[:, None, None, None])

  noise = _random((2, 4, 4, 1), 0)
  logsnr = lambda t: schedules.logsnr_from_t(jnp.full((2,), t))
  z = noise
  for i in range(num_steps - 1):
    t = 1.0 - i / num_steps
    z_k = samplers.ddim_step(
      z, denoise(z, logsnr(t)), logsnr(t), logsnr(t - 2 / num_steps)
    )
    z = samplers.renoise(
      z_k,
      logsnr(t - 2 / num_steps),
      logsnr(t - 1 / num_steps),
      jax.random.fold_in(rng, i),
    )
  reference = denoise(z, logsnr(1 / num_steps))
  out = samplers.stochastic_sample(denoise, noise, rng, num_steps=num_steps)
  np.testing.assert_allclose(out, reference, atol=1e-5)
  other_noise = samplers.stochastic_sample(
    denoise, noise, jax.random.PRNGKey(5), num_steps=num_steps
  )
  assert not np.allclose(out, other_noise)


def test_ancestral_sampler_is_stochastic_and_reproducible():
  def denoise(z, logsnr):
    del logsnr
    return 0.5 * jnp.tanh(z)

  noise = _random((2, 4, 4, 1), 0)
  run = lambda seed: samplers.ancestral_sample(
    denoise, noise, jax.random.PRNGKey(seed), num_steps=4
  )
  chex.assert_trees_all_close(run(0), run(0))
  assert not np.allclose(run(0), run(1))


def test_ddim_from_t_start_visits_the_scaled_grid():
  """N steps from t_start land on t_start·(1 − i/N), as DDIM by hand."""
  num_steps, t_start = 4, 0.6

  def denoise(z, logsnr):
    return 0.5 * jnp.tanh(z + 0.01 * logsnr[:, None, None, None])

  z = _random((2, 4, 4, 1), 0)
  logsnr = lambda t: schedules.logsnr_from_t(jnp.full((2,), t))
  reference = z
  for i in range(num_steps - 1):
    t = t_start * (1 - i / num_steps)
    s = t - t_start / num_steps
    x_hat = jnp.clip(denoise(reference, logsnr(t)), -1, 1)
    reference = samplers.ddim_step(reference, x_hat, logsnr(t), logsnr(s))
  reference = denoise(reference, logsnr(t_start / num_steps))
  out = samplers.ddim_sample(
    denoise, z, num_steps=num_steps, t_start=jnp.float32(t_start)
  )
  np.testing.assert_allclose(out, reference, atol=1e-5)


def _tanh_denoiser(z, logsnr):
  return 0.5 * jnp.tanh(z + 0.01 * logsnr[:, None, None, None])


@pytest.mark.parametrize('t_start', [1.0, 0.6])
def test_stochastic_sampler_with_a_known_region_matches_a_reference(t_start):
  """GD Eq. 5 from t_start, the known region replaced after every step."""
  num_steps, rng = 4, jax.random.PRNGKey(4)
  x = jnp.clip(_random((2, 4, 4, 1), 5), -1, 1)
  mask = jnp.zeros((2, 4, 4, 1)).at[:, :2].set(1.0)
  known = samplers.Known(x, mask, jax.random.PRNGKey(6))
  logsnr = lambda t: schedules.logsnr_from_t(jnp.full((2,), t))
  step = t_start / num_steps
  z_start = _random(x.shape, 0)
  z = z_start
  for i in range(num_steps - 1):
    t = t_start * (1 - i / num_steps)
    x_hat = jnp.clip(_tanh_denoiser(z, logsnr(t)), -1, 1)
    z_k = samplers.ddim_step(z, x_hat, logsnr(t), logsnr(t - 2 * step))
    z = samplers.renoise(
      z_k, logsnr(t - 2 * step), logsnr(t - step), jax.random.fold_in(rng, i)
    )
    fresh = jax.random.normal(jax.random.fold_in(known.rng, i), x.shape)
    z = mask * schedules.diffuse(x, fresh, logsnr(t - step)) + (1 - mask) * z
  reference = _tanh_denoiser(z, logsnr(step))
  reference = mask * x + (1 - mask) * reference
  out = samplers.stochastic_sample(
    _tanh_denoiser,
    z_start,
    rng,
    num_steps=num_steps,
    t_start=jnp.float32(t_start),
    known=known,
  )
  np.testing.assert_allclose(out, reference, atol=1e-5)
  np.testing.assert_array_equal(out[:, :2], x[:, :2])


def test_known_replace_draws_q_of_z_given_x():
  x = _random((2, 4, 4, 1), 0)
  mask = jnp.ones((2, 4, 4, 1)).at[:, :, 2:].set(0.0)
  known = samplers.Known(x, mask, jax.random.PRNGKey(7))
  z = _random(x.shape, 1)
  logsnr = jnp.full((2,), 1.5)
  out = known.replace(z, logsnr, 3)
  noise = jax.random.normal(
    jax.random.fold_in(jax.random.PRNGKey(7), 3), x.shape
  )
  expected = schedules.diffuse(x, noise, logsnr)
  np.testing.assert_allclose(out[:, :, :2], expected[:, :, :2], atol=1e-6)
  np.testing.assert_array_equal(out[:, :, 2:], z[:, :, 2:])


def test_sampler_rejects_bad_step_counts():
  with pytest.raises(ValueError, match='num_steps'):
    samplers.ddim_sample(_oracle(0.0), jnp.zeros((1, 2, 2, 1)), num_steps=0)
  with pytest.raises(ValueError, match='num_steps'):
    samplers.stochastic_sample(
      _oracle(0.0),
      jnp.zeros((1, 2, 2, 1)),
      jax.random.PRNGKey(0),
      num_steps=1,
    )
