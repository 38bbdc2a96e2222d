"""The two-step distillation target against a brute-force reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdd.diffusion import distillation, samplers, schedules

N = 8  # Teacher steps.


def _teacher_x(z, logsnr):
  """A nonlinear stand-in teacher whose estimate depends on z and λ."""
  scale = schedules.broadcast_to_image(jnp.tanh(0.1 * logsnr) + 1.5, z)
  return jnp.tanh(scale * z + 0.3)


def _teacher_two_steps(z, i):
  """Two explicit teacher DDIM steps from t = i/N; returns (z or x̂ at end)."""
  z_cur = z
  for k in (i, i - 1):
    logsnr_k = schedules.logsnr_from_t(jnp.full(z.shape[:1], k / N))
    x_hat = _teacher_x(z_cur, logsnr_k)
    if k - 1 == 0:
      return x_hat  # The last step of a sampler returns x̂.
    logsnr_next = schedules.logsnr_from_t(jnp.full(z.shape[:1], (k - 1) / N))
    z_cur = samplers.ddim_step(z_cur, x_hat, logsnr_k, logsnr_next)
  return z_cur


@pytest.mark.parametrize('i', list(range(1, N + 1)))
def test_one_student_step_reproduces_two_teacher_steps(i):
  z_t = jax.random.normal(jax.random.PRNGKey(i), (3, 4, 4, 2))
  step_index = jnp.full((3,), i)
  x_tilde = distillation.two_step_target(
    _teacher_x, z_t, step_index, teacher_num_steps=N
  )
  if i == 1:
    # t = 1/N: one teacher step already reaches 0; its x̂ is the target.
    logsnr = schedules.logsnr_from_t(jnp.full((3,), 1 / N))
    np.testing.assert_allclose(x_tilde, _teacher_x(z_t, logsnr), atol=1e-6)
    return
  expected = _teacher_two_steps(z_t, i)
  if i == 2:
    # t'' = 0: the student's (last) step returns x̃ itself.
    np.testing.assert_allclose(x_tilde, expected, atol=1e-5)
    return
  logsnr_t = schedules.logsnr_from_t(jnp.full((3,), i / N))
  logsnr_end = schedules.logsnr_from_t(jnp.full((3,), (i - 2) / N))
  student = samplers.ddim_step(z_t, x_tilde, logsnr_t, logsnr_end)
  np.testing.assert_allclose(student, expected, atol=1e-4, rtol=1e-4)


def test_mixed_grid_indices_in_one_batch():
  indices = jnp.arange(1, N + 1)
  z_t = jax.random.normal(jax.random.PRNGKey(0), (N, 4, 4, 1))
  batched = distillation.two_step_target(
    _teacher_x, z_t, indices, teacher_num_steps=N
  )
  for row, i in enumerate(indices):
    single = distillation.two_step_target(
      _teacher_x,
      z_t[row : row + 1],
      indices[row : row + 1],
      teacher_num_steps=N,
    )
    np.testing.assert_allclose(batched[row], single[0], atol=1e-6, err_msg=i)
