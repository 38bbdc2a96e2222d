"""Stage one (w-conditioned student) and stage two (halving) losses."""

import chex
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gdd import conditioning, data, denoisers
from gdd.diffusion import guidance, losses, parameterization, schedules
from gdd.stages import common, guided, progressive
from gdd.train import sharding
from tests import helpers


def _perturbed(params, seed):
  """Params with noise everywhere, so outputs are not trivially zero."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(
    tree,
    [
      x + 0.05 * jax.random.normal(k, x.shape)
      for x, k in zip(leaves, keys, strict=True)
    ],
  )


@pytest.fixture(scope='module')
def setup():
  config = helpers.quick_config()
  info = data.get_info(config.data)
  teacher = common.build_model(config, info)
  student = guided.build_student(config, info)
  teacher_params = _perturbed(
    common.init_params(teacher, jax.random.PRNGKey(0)), 1
  )
  batch = next(data.train_batches(config.data, seed=0, global_batch_size=16))
  batch['image'] = data.to_model_range(batch['image'], info.max_pixel_value)
  return config, info, teacher, student, teacher_params, batch


def test_student_at_init_is_the_conditional_teacher(setup):
  config, _, teacher, student, teacher_params, batch = setup
  params = guided.init_from_teacher(
    student, jax.random.PRNGKey(5), teacher_params
  )
  flat = flax.traverse_util.flatten_dict(params)
  assert {k[0] for k in flat} - set(teacher_params) == {'w_embedding'}
  z = jax.random.normal(jax.random.PRNGKey(2), batch['image'].shape)
  logsnr = jnp.linspace(-5.0, 5.0, 16)
  cond = {'label': batch['label']}
  expected = denoisers.predict_x(teacher, teacher_params, z, logsnr, cond)
  assert float(jnp.abs(expected).mean()) > 1e-3
  for w in (0.0, 1.0, 4.0):
    got = denoisers.predict_x(
      student, params, z, logsnr, cond, jnp.full((16,), w)
    )
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
  'teacher_type, student_type', [('eps', 'v'), ('v', 'x')]
)
def test_a_student_reads_the_teachers_weights_as_its_own_mean_type(
  setup, teacher_type, student_type
):
  # guided.student_mean_type: same channels, same weights, another reading.
  config, info, _, _, _, batch = setup
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.mean_type = teacher_type
  config.guided.student_mean_type = student_type
  teacher = common.build_model(config, info)
  student = guided.build_student(config, info)
  assert student.config.mean_type == student_type
  teacher_params = _perturbed(
    common.init_params(teacher, jax.random.PRNGKey(0)), 1
  )
  params = guided.init_from_teacher(
    student, jax.random.PRNGKey(5), teacher_params
  )
  z = jax.random.normal(jax.random.PRNGKey(2), batch['image'].shape)
  logsnr = jnp.linspace(-5.0, 5.0, 16)
  cond = {'label': batch['label']}
  output = teacher.apply(
    {'params': teacher_params}, z, logsnr, cond, train=False
  )
  got = denoisers.predict_x(student, params, z, logsnr, cond, jnp.zeros(16))
  want = parameterization.x_from_output(output, z, logsnr, student_type)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  teacher_x = parameterization.x_from_output(output, z, logsnr, teacher_type)
  assert float(jnp.abs(got - teacher_x).mean()) > 1e-2


def test_init_from_mismatched_teacher_is_rejected(setup):
  _, _, _, student, teacher_params, _ = setup
  broken = dict(teacher_params)
  broken.pop(sorted(broken)[0])
  with pytest.raises(ValueError, match='same config.model'):
    guided.init_from_teacher(student, jax.random.PRNGKey(0), broken)


@pytest.mark.parametrize('w_loss_power', [0.0, 2.0])
def test_stage_one_target_is_the_cfg_combination(setup, w_loss_power):
  config, _, teacher, student, teacher_params, batch = setup
  config = helpers.quick_config()
  config.guided.w_min = config.guided.w_max = 2.5  # A fixed w for the check.
  config.guided.w_loss_power = w_loss_power
  params = _perturbed(
    guided.init_from_teacher(student, jax.random.PRNGKey(5), teacher_params),
    3,
  )
  rng = jax.random.PRNGKey(9)
  loss, _ = guided.loss_fn(
    params,
    teacher_params,
    batch,
    rng,
    student=student,
    teacher=teacher,
    cond_kind=conditioning.ClassConditioning(10),
    config=config,
  )
  # The same draws by hand, the target built from two separate passes.
  t_rng, noise_rng, _ = jax.random.split(rng, 3)
  logsnr = schedules.logsnr_from_t(jax.random.uniform(t_rng, (16,)))
  z = schedules.diffuse(
    batch['image'], jax.random.normal(noise_rng, batch['image'].shape), logsnr
  )
  labels = batch['label']
  x_cond = denoisers.predict_x(
    teacher, teacher_params, z, logsnr, {'label': labels}
  )
  x_uncond = denoisers.predict_x(
    teacher, teacher_params, z, logsnr, {'label': jnp.full_like(labels, 10)}
  )
  target = guidance.combine(x_cond, x_uncond, 2.5)
  x_pred = denoisers.predict_x(
    student, params, z, logsnr, {'label': labels}, jnp.full((16,), 2.5)
  )
  # 0: the paper's loss; 2: every example weighted by (1 + w)^-2.
  expected = (1.0 + 2.5) ** -w_loss_power * jnp.mean(
    losses.weighted_loss(x_pred, target, logsnr, weighting='snr_trunc')
  )
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_stage_one_loss_is_zero_at_init_for_w_zero(setup):
  config, _, teacher, student, teacher_params, batch = setup
  config = helpers.quick_config()
  config.guided.w_max = 0.0
  params = guided.init_from_teacher(
    student, jax.random.PRNGKey(5), teacher_params
  )
  loss, _ = guided.loss_fn(
    params,
    teacher_params,
    batch,
    jax.random.PRNGKey(0),
    student=student,
    teacher=teacher,
    cond_kind=conditioning.ClassConditioning(10),
    config=config,
  )
  assert float(loss) == 0.0


def test_round_step_counts_and_time_grids():
  config = helpers.quick_config()
  config.distill.initial_num_steps = 64
  assert progressive.round_step_counts(config.distill) == [32, 16, 8, 4, 2, 1]
  config.distill.final_num_steps = 4
  assert progressive.round_step_counts(config.distill) == [32, 16, 8, 4]
  fine = progressive.sample_grid_index(jax.random.PRNGKey(0), 4000, 8, 'fine')
  student = progressive.sample_grid_index(
    jax.random.PRNGKey(0), 4000, 8, 'student'
  )
  assert set(np.asarray(fine).tolist()) == set(range(1, 9))
  assert set(np.asarray(student).tolist()) == {2, 4, 6, 8}


def _params_and_loss(stage, mesh):
  state, metrics = helpers.train_steps(stage, mesh, 2)
  return state.params, metrics['loss']


@pytest.mark.parametrize('kind', ['guided', 'distill'])
def test_sharded_distillation_steps_equal_one_device(setup, kind):
  config, info, _, student, teacher_params, _ = setup
  config = helpers.quick_config()
  config.guided.batch_size = config.distill.batch_size = 16
  if kind == 'guided':
    stage = guided.make_stage(config, info, teacher_params)
  else:
    student_params = _perturbed(
      guided.init_from_teacher(student, jax.random.PRNGKey(5), teacher_params),
      4,
    )
    stage = progressive.make_stage(
      config, info, student_params, student_num_steps=4
    )
  one = _params_and_loss(stage, sharding.make_mesh(jax.devices()[:1]))
  eight = _params_and_loss(stage, sharding.make_mesh())
  # Adam divides by sqrt(v), so a weight with a near-zero gradient moves by
  # an amount that is sensitive to the reduction order; the loss (compared
  # too) pins down the scale of the gradient.
  chex.assert_trees_all_close(one, eight, atol=1e-4, rtol=1e-4)
