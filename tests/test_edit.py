"""Editing and inpainting: the start-time rule, masks, and --mode=edit|inpaint
end to end on the session's digits and shapes chains."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from gdd import edit, images, masks, pipeline, sample, sampling, spaces
from gdd.diffusion import samplers, schedules
from gdd.stages import common
from tests import helpers


@pytest.mark.parametrize(
  't_start, num_steps, expected',
  [
    (1.0, 4, (1.0, 4)),
    (0.6, 4, (0.5, 2)),
    (0.75, 4, (0.75, 3)),  # On the grid: t_start·N = 3 up to rounding.
    (0.3, 8, (0.25, 2)),
    (0.26, 4, (0.25, 1)),
  ],
)
def test_the_floor_rule_starts_a_distilled_round_on_its_grid(
  t_start, num_steps, expected
):
  plan = sampling.start_steps(
    t_start, num_steps, on_grid=True, off_grid='floor'
  )
  assert (plan.t_start, plan.num_steps) == expected
  assert plan.t_grid == plan.t_start and not plan.lead_in
  assert plan.t_start * num_steps == plan.num_steps  # k steps of 1/N down.
  assert plan.t_start <= t_start
  # Continuous-time models start where asked, with all N steps.
  assert sampling.start_steps(t_start, num_steps, on_grid=False) == (
    t_start,
    t_start,
    num_steps,
  )


@pytest.mark.parametrize(
  't_start, num_steps, sampler, expected',
  [
    (1.0, 4, 'ddim', (1.0, 1.0, 4)),
    (0.6, 4, 'ddim', (0.6, 0.5, 2)),
    (0.75, 4, 'ddim', (0.75, 0.75, 3)),  # On the grid: no lead-in step.
    (0.3, 8, 'ancestral', (0.3, 0.25, 2)),
    (0.2, 4, 'ddim', (0.2, 0.2, 1)),  # Below 1/N: one step straight to x̂.
    (0.6, 8, 'stochastic', (0.6, 0.5, 4)),
  ],
)
def test_the_step_rule_noises_to_t_start_and_steps_onto_the_grid(
  t_start, num_steps, sampler, expected
):
  plan = sampling.start_steps(t_start, num_steps, on_grid=True, sampler=sampler)
  assert plan == expected
  assert plan.t_grid * num_steps == plan.num_steps or plan.t_grid == t_start
  assert plan.num_evaluations == plan.num_steps + (plan.t_grid < t_start)


def _off_grid_draw(sampler: str, num_steps: int):
  """`sampling.draw` from t_start 0.6 under 'step' with a toy denoiser:
  (output, the log-SNRs it was called at, x, noise, t ↦ [B] log-SNR)."""
  config = helpers.quick_config()
  space = spaces.PixelSpace((4, 4, 1), (-1.0, 1.0))
  plan = sampling.start_steps(0.6, num_steps, on_grid=True, sampler=sampler)
  called = []

  def denoise(z, logsnr):
    jax.debug.callback(lambda lam: called.append(lam[0]), logsnr, ordered=True)
    return 0.5 * jnp.tanh(z + 0.01 * logsnr[:, None, None, None])

  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 4, 4, 1), minval=-1)
  noise = jax.random.normal(jax.random.PRNGKey(2), x.shape)
  start = dict(
    x=x,
    noise=noise,
    t_start=np.float32(plan.t_start),
    t_grid=np.float32(plan.t_grid),
  )
  out = jax.jit(
    lambda start: sampling.draw(
      config,
      space,
      denoise,
      jax.random.PRNGKey(0),
      2,
      num_steps=plan.num_steps,
      sampler=sampler,
      start=start,
    )
  )(start)
  jax.effects_barrier()
  logsnr = lambda t: common.logsnr_fn(config)(jnp.full((2,), t, jnp.float32))
  return out, called, (x, noise, denoise), logsnr


def test_an_off_grid_start_calls_the_model_at_t_start_then_on_its_grid():
  """'step' from 0.6 with a 4-step round: the model is called at 0.6, 0.5
  and 0.25, and the result is DDIM by hand through those times."""
  out, called, (x, noise, denoise), logsnr = _off_grid_draw('ddim', 4)
  times = (0.6, 0.5, 0.25)
  np.testing.assert_allclose(called, [logsnr(t)[0] for t in times], rtol=1e-6)
  z = schedules.diffuse(x, noise, logsnr(0.6))
  for t, s in zip(times, times[1:], strict=False):
    x_hat = jnp.clip(denoise(z, logsnr(t)), -1, 1)
    z = samplers.ddim_step(z, x_hat, logsnr(t), logsnr(s))
  np.testing.assert_allclose(out, denoise(z, logsnr(0.25)), atol=1e-5)


def test_the_stochastic_sampler_steps_onto_its_grid_from_off_it():
  """GD's 8-step stochastic sampler (the 4-step model) from 0.6: the
  lead-in at 0.6, then its grid from 0.5 in steps of 1/8."""
  out, called, _, logsnr = _off_grid_draw('stochastic', 8)
  times = (0.6, 0.5, 0.375, 0.25, 0.125)
  np.testing.assert_allclose(called, [logsnr(t)[0] for t in times], rtol=1e-6)
  assert np.all(np.isfinite(out))


@pytest.mark.parametrize(
  't_start, num_steps, sampler, off_grid, match',
  [
    (0.2, 4, 'ddim', 'floor', r'below 1/4.*t_start >= 0\.25'),
    (0.4, 4, 'stochastic', 'step', r'below 2/4.*t_start >= 0\.5'),
    (0.4, 4, 'stochastic', 'floor', r'below 2/4.*t_start >= 0\.5'),
    (0.6, 4, 'ddim', 'nearest', r"off_grid='nearest'; allowed"),
  ],
)
def test_a_t_start_the_rule_cannot_serve_is_refused(
  t_start, num_steps, sampler, off_grid, match
):
  with helpers.raises_user_error(ValueError, match=match):
    sampling.start_steps(
      t_start, num_steps, on_grid=True, sampler=sampler, off_grid=off_grid
    )


def test_named_masks_fill_the_named_region():
  right = masks.named('right', 2, 4, 6)
  assert right.shape == (2, 4, 6, 1)
  assert np.all(right[:, :, :3] == 1) and np.all(right[:, :, 3:] == 0)
  center = masks.named('center', 1, 8, 8)[0, ..., 0]
  assert center[2:6, 2:6].sum() == 0 and center.sum() == 64 - 16
  with helpers.raises_user_error(ValueError, match='allowed'):
    masks.named('middle', 1, 4, 4)


def test_a_latent_keeps_only_wholly_kept_patches():
  mask = np.ones((1, 4, 4, 1), np.float32)
  mask[0, 0, 0] = 0.0  # One pixel of the top-left 2x2 patch is filled in.
  latent = masks.to_space(mask, (2, 2, 4))
  np.testing.assert_array_equal(latent[0, ..., 0], [[0, 1], [1, 1]])
  with helpers.raises_user_error(ValueError, match='does not divide'):
    masks.to_space(mask, (3, 3, 4))


def test_a_distilled_sampler_starts_off_its_grid_by_the_rule(chain_workdir):
  init = _held_out(chain_workdir, 4)
  labels = np.arange(4)
  rng = jax.random.PRNGKey(0)
  floor = sample.load_sampler(
    chain_workdir, 'distill', num_steps=4, off_grid='floor'
  )
  assert floor.start(0.6) == (0.5, 0.5, 2)
  snapped = floor(rng, labels, 1.0, init=init, t_start=0.6)
  on_grid = floor(rng, labels, 1.0, init=init, t_start=0.5)
  np.testing.assert_array_equal(snapped, on_grid)
  assert floor.compiled_requests() == [(8, True, False, False, 2, False)]
  # 'step' (the default): noised to 0.6, one step to 0.5, then the grid.
  step = sample.load_sampler(chain_workdir, 'distill', num_steps=4)
  assert step.start(0.6) == (0.6, 0.5, 2)
  stepped = step(rng, labels, 1.0, init=init, t_start=0.6)
  assert step.compiled_requests() == [(8, True, False, False, 2, True)]
  assert not np.allclose(stepped, on_grid)
  # On the grid both rules are one program.
  np.testing.assert_array_equal(
    step(rng, labels, 1.0, init=init, t_start=0.5), on_grid
  )
  # The teacher is a continuous-time model: it starts where asked.
  teacher = sample.load_sampler(chain_workdir, 'teacher', num_steps=4)
  assert teacher.start(0.6) == (0.6, 0.6, 4)


def _held_out(workdir, num):
  config = sample.load_stage_config(workdir, 'teacher')
  config.edit.num_inputs = num
  return edit.load_inputs(config).images


def _edit_config(**edit_options):
  config = helpers.quick_config(num_train_steps=2)
  config.edit.update(num_inputs=6, batch_size=4, **edit_options)
  return config


def test_edit_mode_writes_targets_inputs_and_outputs(chain_workdir, tmp_path):
  config = _edit_config(targets='8', output=str(tmp_path / 'edit'))
  pipeline.run(config, chain_workdir, 'edit')
  with np.load(tmp_path / 'edit.npz') as f:
    saved = dict(f)
  assert saved['images'].shape == saved['inputs'].shape == (6, 8, 8, 1)
  np.testing.assert_array_equal(saved['labels'], 8)
  np.testing.assert_array_equal(
    saved['inputs'], images.to_uint8(_held_out(chain_workdir, 6))
  )
  # The 4-step round: noised to t_start = 0.6, one step to its grid point
  # 0.5, two grid steps from there.
  assert float(saved['t_start']) == np.float32(0.6)
  assert (float(saved['t_grid']), int(saved['num_steps'])) == (0.5, 3)
  assert 'masks' not in saved
  assert os.path.isfile(tmp_path / 'edit.png')


def test_inpaint_mode_keeps_the_known_region_exactly(chain_workdir):
  config = _edit_config(stage='teacher', mask='right')
  written = edit.edit_to_files(config, chain_workdir, 'inpaint')
  assert written == os.path.join(
    chain_workdir, 'edits', 'inpaint_teacher_ddim_4steps_w1_t1.npz'
  )
  with np.load(written) as f:
    outputs, inputs, kept = f['images'], f['inputs'], f['masks']
  assert kept.shape == (6, 8, 8, 1) and kept.dtype == np.uint8
  np.testing.assert_array_equal(outputs[:, :, :4], inputs[:, :, :4])
  assert np.all(kept[:, :, :4] == 1) and np.all(kept[:, :, 4:] == 0)
  # Own labels (held-out inputs, no targets named).
  assert len(set(np.load(written)['labels'].tolist())) > 1


def test_inputs_come_from_png_files_and_npz(chain_workdir, tmp_path):
  pixels = images.to_uint8(_held_out(chain_workdir, 2))
  for i, image in enumerate(pixels):
    Image.fromarray(image[..., 0]).save(tmp_path / f'{i}.png')
  np.savez(tmp_path / 'in.npz', images=pixels)
  for path in (tmp_path, tmp_path / 'in.npz'):
    read = edit.read_images(path, (8, 8, 1))
    np.testing.assert_array_equal(images.to_uint8(read), pixels)


@pytest.mark.parametrize(
  'options, match',
  [
    (dict(input='{tmp}/big.png'), r'\(16, 16, 1\); this model takes'),
    (dict(input='{tmp}/none.npz'), 'no such file'),
    (dict(input='{tmp}/small.png', targets=''), 'no class or caption'),
    (dict(targets='eight'), 'class indices separated by commas'),
    (dict(targets='12'), r'labels must be .* in \[0, 10\)'),
    (dict(t_start=0.2, off_grid='floor'), r'below 1/4'),
    (dict(t_start=0.2, sampler='stochastic', num_steps=8), r'below 2/8'),
    (dict(num_steps=8), r'distilled step counts: \[4, 2, 1\]'),
    (dict(mask='{tmp}/mask.npz'), 'expected one or 6 masks of 8x8'),
    (dict(mask='middle'), 'allowed'),
  ],
)
def test_bad_edit_requests_are_refused(chain_workdir, tmp_path, options, match):
  Image.new('L', (16, 16)).save(tmp_path / 'big.png')
  Image.new('L', (8, 8)).save(tmp_path / 'small.png')
  np.savez(tmp_path / 'mask.npz', masks=np.ones((6, 4, 4)))
  options = {
    key: value.format(tmp=tmp_path) if isinstance(value, str) else value
    for key, value in options.items()
  }
  output = str(tmp_path / 'out')
  config = _edit_config(**{'targets': '3', 'output': output, **options})
  mode = 'inpaint' if 'mask' in options else 'edit'
  with helpers.raises_user_error(ValueError, match=match):
    edit.edit_to_files(config, chain_workdir, mode)
  assert not os.path.exists(output + '.npz')


def test_text_edit_and_inpaint_on_shapes(shapes_workdir, tmp_path):
  config = helpers.quick_latent_config()
  config.edit.update(
    num_inputs=2,
    num_steps=2,
    targets='a large red circle|a small blue square',
    output=str(tmp_path / 'edit'),
  )
  pipeline.run(config, shapes_workdir, 'edit')
  with np.load(tmp_path / 'edit.npz') as f:
    assert f['images'].shape == f['inputs'].shape == (2, 16, 16, 3)
    assert list(f['captions']) == ['a large red circle', 'a small blue square']
    # Noised to 0.6, one step to the 2-step grid's 0.5, then one more.
    assert float(f['t_start']) == np.float32(0.6)
    assert float(f['t_grid']) == 0.5 and int(f['num_steps']) == 2
  config.edit.update(targets='', output=str(tmp_path / 'inpaint'))
  pipeline.run(config, shapes_workdir, 'inpaint')
  with np.load(tmp_path / 'inpaint.npz') as f:
    # Latents are kept, not pixels: the decoded known half is close to the
    # input, not equal (the autoencoder reconstructs it).
    assert f['masks'].shape == (2, 16, 16, 1)
    assert os.path.isfile(tmp_path / 'inpaint.png')
  # Translation: encoded under the held-out captions by the stage-one
  # student's DDIM encoder, decoded under the targets by the 2-step round.
  config.edit.update(
    targets='a small blue square',
    encoder_stage='guided',
    encoder_num_steps=2,
    output=str(tmp_path / 'translate'),
  )
  pipeline.run(config, shapes_workdir, 'translate')
  with np.load(tmp_path / 'translate.npz') as f:
    assert f['images'].shape == (2, 16, 16, 3)
    assert f['encoded'].shape == (2, 8, 8, 4)  # The quick latents: 8×8×4.
    assert len(f['source_captions']) == 2
    assert list(f['captions']) == ['a small blue square'] * 2
