"""Sampling a model: the traced sample function and the `Sampler` object.

`make_sample_fn` turns a denoiser factory into (params, rng, cond, w,
start, space_params) ↦ images, the pure function that train-time sample
grids jit. `Sampler` wraps it for users: jitted over all devices,
compiled once per batch size and kind of request (ahead of time with
`compile`), called as `sampler(rng, cond, w, *, init=None, t_start=1.0,
mask=None)`. Every request is checked on the host before anything compiles.
`start_steps` is the rule for where a sampler started at t_start < 1 begins.

A `mask` means what the model can do with it: a plain model inpaints by
replacement (method.md §9: after every step the known region is the input
noised to that time); an inpainting model (`config.model.inpainting`) is
conditioned on the mask and the masked input and nothing is replaced: its
output is the network's everywhere, as Stable Diffusion's inpainting
pipeline returns it, so how well it keeps the known region shows. Without
a mask an inpainting model fills in everything (an all-zero mask, which it
was trained on: `masks.RANDOM_KINDS`), so sampling, grids and evaluation
generate as with a plain model.
"""

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gdd import conditioning, config_lib, denoisers, errors, masks, spaces
from gdd.diffusion import samplers, schedules
from gdd.stages import common
from gdd.train import sharding

# (params, rng, cond, w, start, space_params) -> images in [−1, 1]; start is
# None (pure noise at t = 1) or {'t_start'[, 't_grid'][, 'init'][, 'mask']
# [, 'noise']}: the mask at the diffusion space's size, the noise the sampler
# uses instead of its own draw, t_grid where its steps begin (`Start`).
SampleFn = Callable[..., jnp.ndarray]


# The fewest steps each sampler kind takes (the stochastic one jumps two grid
# steps from its first time).
MIN_STEPS = {'ddim': 1, 'ancestral': 1, 'stochastic': 2}
# Slack for t_start·N landing a rounding error off a grid index.
_GRID_TOLERANCE = 1e-6


class SampleRequestError(errors.UserError, ValueError):
  """A request to sample (or encode) that the model cannot serve; says why."""


class Start(NamedTuple):
  """Where an N-step sampler asked to start at t_start runs (`start_steps`).

  Attributes:
    t_start: the time the input is noised to.
    t_grid: where the sampler's steps begin: t_start, or for a distilled
      round started off its grid, the grid point below it, which one DDIM
      step (`samplers.lead_in`) first takes z_{t_start} to.
    num_steps: the sampler's steps from t_grid.
  """

  t_start: float
  t_grid: float
  num_steps: int

  @property
  def lead_in(self) -> bool:
    """Whether one DDIM step takes z from t_start to t_grid first."""
    return self.t_grid < self.t_start

  @property
  def num_evaluations(self) -> int:
    """Network calls per sample (twice that for a CFG teacher)."""
    return self.num_steps + self.lead_in


def start_steps(
  t_start: float,
  num_steps: int,
  *,
  on_grid: bool,
  sampler: str = 'ddim',
  off_grid: str = 'step',
) -> Start:
  """Where an N-step sampler started at t_start runs (`Start`).

  A continuous-time model (the teacher, the stage-one student) spaces its N
  steps evenly from t_start to 0. A distilled round learned the grid
  t = i/N only (method.md §6); from a t_start on it (t_start = k/N) it takes
  its k grid steps. From a t_start between grid points, k/N < t_start <
  (k+1)/N (method.md §9, a choice, `off_grid`):

  - 'step' (default): the input is noised to t_start itself, one DDIM step
    of the round's model takes it to k/N (`samplers.lead_in`), and the k
    grid steps follow: k + 1 network calls, the edit exactly as strong as
    asked. Below the first grid point (k = 0) the one step goes to 0.
  - 'floor': it starts at k/N instead (the input noised to k/N) and takes
    the k grid steps: only noise levels it was trained at, but an edit
    weaker than asked.

  Raises:
    SampleRequestError: a t_start the sampler cannot start from: below its
      first grid point 1/N (2/N for the stochastic sampler), except with
      'step' for the DDIM and ancestral samplers.
  """
  if off_grid not in config_lib.OFF_GRID_RULES:
    raise SampleRequestError(
      f'off_grid={off_grid!r}; allowed: {config_lib.OFF_GRID_RULES}.'
    )
  if not on_grid:
    return Start(t_start, t_start, num_steps)
  k = int(np.floor(t_start * num_steps + _GRID_TOLERANCE))
  on_a_grid_point = t_start * num_steps - k <= _GRID_TOLERANCE
  if on_a_grid_point or off_grid == 'floor' or sampler == 'stochastic':
    _check_first_grid_point(t_start, num_steps, k, sampler)
  if on_a_grid_point or off_grid == 'floor':
    return Start(k / num_steps, k / num_steps, k)
  if k == 0:  # One step from t_start straight to x̂.
    return Start(t_start, t_start, 1)
  return Start(t_start, k / num_steps, k)


def _check_first_grid_point(
  t_start: float, num_steps: int, k: int, sampler: str
) -> None:
  """Raises unless the grid point k/N leaves the sampler its fewest steps."""
  fewest = MIN_STEPS[sampler]
  if k < fewest:
    raise SampleRequestError(
      f't_start={t_start!r} is below {fewest}/{num_steps}, the first time '
      f'the {num_steps}-step {sampler} sampler of a distilled round can start '
      f'from (its grid is t = i/{num_steps}); use t_start >= '
      f'{fewest / num_steps:g}, or a round with more steps.'
    )


def _start_z(config, start, noise, known_rng):
  """z at the start time, and the sampler options a `start` adds."""
  if start is None or 'x' not in start:
    return noise, {}
  x = start['x']
  t_start = start['t_start']
  logsnr = jnp.full((x.shape[0],), common.logsnr_fn(config)(t_start))
  options = {'t_start': t_start}
  if 'mask' in start:
    options['known'] = samplers.Known(
      x, start['mask'].astype(jnp.float32), known_rng
    )
  # From t_start = 1 the start is the noise itself, as without init (and as
  # diffusers' inpainting pipeline at strength 1): SD's schedule keeps
  # α = 0.068 at t = 1, which would carry the input, the region to fill in
  # too, into z_1 (gdd's cosine schedule: α = 5e-5).
  z = jnp.where(t_start >= 1.0, noise, schedules.diffuse(x, noise, logsnr))
  return z, options


def draw(
  config: ml_collections.ConfigDict,
  space,
  denoise_fn: samplers.DenoiseFn,
  rng: jax.Array,
  batch_size: int,
  *,
  num_steps: int,
  sampler: str,
  start: dict | None = None,
) -> jnp.ndarray:
  """Runs the named sampler in `space`; returns x̂ in the diffusion space.

  From pure noise z_1 ~ N(0, I) when `start` is None or starts at t = 1;
  otherwise from `start['x']` (data in the diffusion space: an encoded
  init) noised to `start['t_start']` with the same noise draw. Either way
  `start['mask']`'s region is kept if given (replacement).
  `start['noise']`, if given, is that draw
  (z_1 from an encoder: translation, method.md §9). With `start['t_grid']`
  one DDIM step first takes z from t_start to t_grid, where the sampler's
  steps begin (`start_steps`: a distilled round started off its grid).
  """
  noise_rng, sampler_rng = jax.random.split(rng)
  if start is not None and 'noise' in start:
    noise = start['noise'].astype(jnp.float32)
  else:
    shape = (batch_size, *space.shape)
    noise = jax.random.normal(noise_rng, shape, jnp.float32)
  # The known region's per-step noise: a key the start noise does not use.
  known_rng = jax.random.fold_in(noise_rng, 1)
  z, options = _start_z(config, start, noise, known_rng)
  if start is not None and 't_grid' in start:
    z = samplers.lead_in(
      denoise_fn,
      z,
      t_from=start['t_start'],
      t_to=start['t_grid'],
      logsnr_fn=common.logsnr_fn(config),
      clip=space.clip,
      known=options.get('known'),
    )
    options['t_start'] = start['t_grid']
  kwargs = dict(
    num_steps=num_steps,
    logsnr_fn=common.logsnr_fn(config),
    clip=space.clip,
    **options,
  )
  if sampler == 'ddim':
    return samplers.ddim_sample(denoise_fn, z, **kwargs)
  if sampler == 'ancestral':
    return samplers.ancestral_sample(denoise_fn, z, sampler_rng, **kwargs)
  if sampler == 'stochastic':
    return samplers.stochastic_sample(denoise_fn, z, sampler_rng, **kwargs)
  raise ValueError(f'sampler={sampler!r}; allowed: {config_lib.SAMPLERS}.')


def make_sample_fn(
  config: ml_collections.ConfigDict,
  space,
  make_denoiser: denoisers.DenoiserFactory,
  *,
  num_steps: int,
  sampler: str = 'ddim',
) -> SampleFn:
  """(params, rng, cond, w, start=None, space_params=None) ↦ images.

  Images are `space.decode`d, float32 in [−1, 1]. `start` (`SampleFn`) is
  encoded here, once; its mask replaces (`draw`), or for an inpainting
  model joins cond with the masked input (`known_region_request`).
  """

  def sample_fn(params, rng, cond, w, start=None, space_params=None):
    images = None
    if start is not None and 'init' in start:
      images = start['init']
      x = space.encode(space_params, images).astype(jnp.float32)
      start = {'x': x, **{k: v for k, v in start.items() if k != 'init'}}
    if config.model.inpainting:
      cond, start = known_region_request(
        config, space, cond, start, images=images, space_params=space_params
      )
    x = draw(
      config,
      space,
      make_denoiser(params, cond, w),
      rng,
      conditioning.batch_size(cond),
      num_steps=num_steps,
      sampler=sampler,
      start=start,
    )
    return space.decode(space_params, x)

  return sample_fn


def known_region_request(
  config: ml_collections.ConfigDict,
  space,
  cond: conditioning.Cond,
  start: dict | None,
  *,
  images: jnp.ndarray | None,
  space_params=None,
) -> tuple[conditioning.Cond, dict | None]:
  """An inpainting model's (cond, start): the request's known region in cond.

  The mask of `start` (at the space's size) and its data x masked join
  `cond` (`conditioning.with_known_region`) and leave `start`, so nothing
  is replaced; without a mask everything is filled in (an all-zero mask).
  A 'masked_image' network (Stable Diffusion's inpainting U-Net) gets the
  masked `images` encoded instead (`spaces.encode_masked`).
  """
  batch_size = conditioning.batch_size(cond)
  if start is None or 'mask' not in start:
    x = jnp.zeros((batch_size, *space.shape), jnp.float32)
    images = jnp.zeros((batch_size, *space.image_shape), jnp.float32)
    mask, rest = x[..., :1], start
  else:
    x, mask = start['x'], start['mask']
    rest = {k: v for k, v in start.items() if k != 'mask'}
  if common.inpainting_input(config) == 'masked_image':
    masked = spaces.encode_masked(space, space_params, images, mask)
    return conditioning.with_masked_input(cond, mask, masked), rest
  return conditioning.with_known_region(cond, x, mask), rest


class DeviceBatches:
  """Host requests → arrays with the batch split over all devices.

  What the jitted user-facing models share (`Sampler`, `gdd.encode.Encoder`):
  the mesh's shardings, the condition check, padding a batch to a multiple
  of the devices, and compiling ahead of time. Outputs are replicated, so on
  a multi-host mesh every process can read them.
  """

  def __init__(self, cond_kind):
    mesh = sharding.make_mesh()
    self.num_devices = mesh.devices.size
    self.replicated = sharding.replicated(mesh)
    self.batch = sharding.batch_sharded(mesh)
    self.cond_kind = cond_kind

  def checked_cond(self, cond) -> conditioning.Cond:
    """A user's condition as the model's pytree; SampleRequestError if bad."""
    try:
      return self.cond_kind.from_request(cond)
    except conditioning.CondError as error:
      raise SampleRequestError(str(error)) from None

  def padded(self, tree):
    """Every leaf's batch padded to a multiple of the devices."""
    return conditioning.pad_to_multiple(tree, self.num_devices)

  def padded_size(self, batch_size: int) -> int:
    return batch_size + -batch_size % self.num_devices

  def put(self, tree, shardings=None):
    """Host leaves as global arrays, batch-split unless `shardings` (a tree
    of the same structure) says otherwise."""
    if shardings is None:
      shardings = jax.tree.map(lambda _: self.batch, tree)
    return jax.tree.map(sharding.from_host, tree, shardings)

  def abstract_cond(self, batch_size: int) -> conditioning.Cond:
    """Shapes of a (padded) batch of conditions, batch-split."""
    return self.cond_kind.abstract(batch_size, sharding=self.batch)

  def compile(self, fn: Callable, in_shardings, *abstract_args):
    """`fn` jitted with replicated outputs, compiled for shapes only.

    Host arrays cannot be lowered with a multi-host sharding, hence
    `abstract_args` (ShapeDtypeStructs, or the params themselves).
    """
    jitted = jax.jit(
      fn, in_shardings=in_shardings, out_shardings=self.replicated
    )
    executable = jitted.lower(*abstract_args).compile()
    sharding.sync_processes('model_compiled')
    return executable


class Sampler:
  """A model's sampler, jitted over all devices; see `__call__`.

  Built once per (model, step count, sampler kind); compiled once per
  (device-padded) batch size and request kind (from noise, from `init`,
  with a `mask`, and the steps a `t_start` leaves: `start_steps`). Params
  are replicated; samples come back replicated, so on a multi-host mesh
  every process can read (save, score, show) them.
  """

  def __init__(
    self,
    make_sample_fn: Callable[[int], SampleFn],
    params,
    cond_kind,
    space,
    *,
    num_steps: int,
    start_rule: Callable[[float], tuple[float, int]],
    check_w: Callable[[float], None],
    space_params: Any = None,
  ):
    """See the class docstring.

    Args:
      make_sample_fn: `num_steps=k` ↦ the traced `SampleFn` of k steps.
      params: the network's params.
      cond_kind: its conditioning (`conditioning.ClassConditioning`, …).
      space: where it diffuses (`spaces.PixelSpace`, `LatentSpace`).
      num_steps: N, the steps from t_start = 1.
      start_rule: t_start ↦ `Start`, `start_steps` for this sampler;
        raises `SampleRequestError` for a t_start it cannot serve.
      check_w: raises `SampleRequestError` for a w the model cannot serve.
      space_params: the frozen autoencoder's params in a latent space.
    """
    self._make_sample_fn = make_sample_fn
    self._params = params
    self._space = space
    self.num_steps = num_steps
    self._start_rule = start_rule
    self._check_w = check_w
    self._space_params = space_params
    self._devices = DeviceBatches(cond_kind)
    self._executables = {}

  def start(self, t_start: float) -> Start:
    """Where sampling from `t_start` runs: (t_start, t_grid, num_steps).

    For the teacher and the stage-one student t_start itself and N steps;
    for a distilled round its grid steps from the grid point at or below
    t_start, after a lead-in step from t_start when it is off the grid
    (`start_steps`).
    """
    _check_t_start(t_start)
    return self._start_rule(t_start)

  def __call__(
    self,
    rng: jax.Array,
    cond,
    w: float,
    *,
    init=None,
    t_start: float = 1.0,
    mask=None,
    noise=None,
  ) -> jax.Array:
    """Samples for `cond` at guidance strength w.

    Args:
      rng: one key, `jax.random.key(seed)` or `jax.random.PRNGKey(seed)`.
      cond: the condition, e.g. {'label': int [B]}; class labels alone
        (int [B]) are accepted too.
      w: guidance strength (GD's w; diffusers' guidance_scale is 1 + w).
      init: optional [B, H, W, C] images in [−1, 1] to start from: they are
        encoded, noised to `t_start` with q(z_t | x), and sampled from
        there (SDEdit). Without `init`, sampling starts from pure noise.
      t_start: start time in (0, 1]; below 1 only with `init`. The
        teacher's and the stage-one student's N steps are spaced evenly from
        t_start to 0; a distilled round takes its grid steps from the grid
        point at or below t_start, after one DDIM step from t_start to
        there when t_start is off its grid (`start`, `start_steps`).
      mask: optional [B, H, W, 1] in [0, 1] at the images' size (or
        [B, h, w, 1] at a latent space's), 1 where `init` is kept. In a
        latent space a latent is kept only where its whole patch of pixels
        is (`masks.to_space`). Needs `init`. A plain model inpaints by
        replacement: the known region is `init` noised to each step's time,
        and the result's is `init` itself (the autoencoder's reconstruction
        of it in a latent space). An inpainting model is conditioned on the
        mask and the masked `init` and nothing is replaced; without a mask
        it fills in everything (module docstring).
      noise: optional [B, *space.shape] float32, the standard-normal draw
        to use instead of the sampler's own: z_1 itself from t_start = 1
        (e.g. a `gdd.encode.Encoder`'s: translation), else what `init` is
        noised with. The stochastic samplers' later noise is still drawn
        from `rng`.

    Returns:
      [B, H, W, C] float32 images in [−1, 1], replicated over the devices.
    """
    devices = self._devices
    rng = _raw_key(rng)
    cond = devices.checked_cond(cond)
    self._check_w(w)
    n = conditioning.batch_size(cond)
    start = _checked_start(self._space, n, init, t_start, mask, noise)
    plan = self.start(t_start)
    cond = devices.padded(cond)
    args = (
      self._params,
      sharding.from_host(rng, devices.replicated),
      devices.put(cond),
      sharding.from_host(np.float32(w), devices.replicated),
      None if start is None else self._put_start(devices.padded(start), plan),
      self._space_params,
    )
    executable = self._executable(
      _Request(
        conditioning.batch_size(cond),
        init is not None,
        mask is not None,
        noise is not None,
        plan.num_steps,
        plan.lead_in,
      )
    )
    return executable(*args)[:n]

  def compile(
    self,
    batch_size: int,
    *,
    init: bool = False,
    mask: bool = False,
    noise: bool = False,
    t_start: float = 1.0,
  ) -> float:
    """Compiles for `batch_size` (and an `init`/`mask`/`noise`/`t_start`
    request).

    Returns the seconds it took, so that timed calls measure sampling only.
    """
    if (mask or t_start != 1) and not init:
      raise SampleRequestError(
        'compile(mask=True) and compile(t_start<1) need init=True too.'
      )
    plan = self.start(t_start)
    start = time.perf_counter()
    padded_size = self._devices.padded_size(batch_size)
    self._executable(
      _Request(padded_size, init, mask, noise, plan.num_steps, plan.lead_in)
    )
    return time.perf_counter() - start

  def compiled_batch_sizes(self) -> list[int]:
    """The (device-padded) batch sizes compiled so far."""
    return sorted({key.padded_size for key in self._executables})

  def compiled_requests(
    self,
  ) -> list[tuple[int, bool, bool, bool, int, bool]]:
    """(padded batch size, with init, with mask, with noise, steps, with a
    lead-in step) of each executable."""
    return sorted(tuple(key) for key in self._executables)

  def _put_start(self, start: dict, plan: Start) -> dict:
    """The start arrays as global arrays, with the plan's times added."""
    times = {'t_start': np.float32(plan.t_start)}
    if plan.lead_in:
      times['t_grid'] = np.float32(plan.t_grid)
    start = dict(start, **times)
    return self._devices.put(start, self._start_shardings(start))

  def _start_shardings(self, start: dict) -> dict:
    """Batch-sharded arrays; the times (scalars) replicated."""
    return {
      key: self._devices.replicated if key in _TIMES else self._devices.batch
      for key in start
    }

  def _executable(self, request: '_Request'):
    """The compiled sampler for one padded size and request kind."""
    if request not in self._executables:
      rep, batch = self._devices.replicated, self._devices.batch
      start = self._abstract_start(request)
      self._executables[request] = self._devices.compile(
        self._make_sample_fn(num_steps=request.num_steps),
        (
          rep,
          rep,
          batch,
          rep,
          rep if start is None else self._start_shardings(start),
          rep,
        ),
        self._params,
        jax.ShapeDtypeStruct((2,), np.uint32, sharding=rep),
        self._devices.abstract_cond(request.padded_size),
        jax.ShapeDtypeStruct((), np.float32, sharding=rep),
        start,
        self._space_params,
      )
    return self._executables[request]

  def _abstract_start(self, request: '_Request') -> dict | None:
    """The shapes of a request's `start` (`SampleFn`), or None."""
    batch = self._devices.batch
    size, space = request.padded_size, self._space
    shapes = {
      'init': (size, *space.image_shape),
      'mask': (size, *space.shape[:2], 1),
      'noise': (size, *space.shape),
    }
    start = {
      key: jax.ShapeDtypeStruct(shape, np.float32, sharding=batch)
      for key, shape in shapes.items()
      if getattr(request, key)
    }
    if not start:
      return None
    scalar = jax.ShapeDtypeStruct(
      (), np.float32, sharding=self._devices.replicated
    )
    times = _TIMES if request.lead_in else _TIMES[:1]
    return dict(start, **dict.fromkeys(times, scalar))


# The scalar times of a `start` (replicated; the arrays are batch-sharded).
_TIMES = ('t_start', 't_grid')


class _Request(NamedTuple):
  """What a `Sampler` executable is compiled for (its cache key)."""

  padded_size: int
  init: bool
  mask: bool
  noise: bool
  num_steps: int
  lead_in: bool


def _check_t_start(t_start) -> None:
  if isinstance(t_start, bool) or not (
    isinstance(t_start, int | float | np.floating) and 0 < t_start <= 1
  ):
    raise SampleRequestError(
      f't_start={t_start!r}; must be a number in (0, 1].'
    )


def _checked_start(
  space, batch_size: int, init, t_start, mask, noise
) -> dict | None:
  """{['init'][, 'mask'][, 'noise']} as host float32 arrays, or None; checks
  all four."""
  _check_t_start(t_start)
  start = {}
  if init is None:
    if t_start != 1 or mask is not None:
      raise SampleRequestError(
        't_start < 1 and mask need init: the images to start from '
        f'([B, {", ".join(map(str, space.image_shape))}] in [-1, 1]).'
      )
  else:
    start['init'] = checked_images(init, batch_size, space, name='init')
  if mask is not None:
    start['mask'] = _checked_mask(space, batch_size, mask)
  if noise is not None:
    start['noise'] = _checked_noise(space, batch_size, noise)
  return start or None


def _checked_noise(space, batch_size: int, noise) -> np.ndarray:
  """The noise as host float32 [B, *space.shape]; finite."""
  noise = _checked_array(
    noise,
    (batch_size, *space.shape),
    'noise',
    'z_1 in the diffusion space, one per condition',
  )
  if not np.all(np.isfinite(noise)):
    raise SampleRequestError('noise has NaN or Inf values.')
  return noise


def _checked_mask(space, batch_size: int, mask) -> np.ndarray:
  """The mask at the diffusion space's size (`masks.to_space`), checked."""
  mask = np.asarray(mask, np.float32)
  sizes = {tuple(space.image_shape[:2]), tuple(space.shape[:2])}
  if (
    mask.ndim != 4
    or mask.shape[0] != batch_size
    or mask.shape[1:] not in {(*size, 1) for size in sizes}
  ):
    expected = ' or '.join(f'{(batch_size, *size, 1)}' for size in sizes)
    raise SampleRequestError(
      f'mask has shape {mask.shape}; expected {expected} (1 where init is '
      'kept, 0 where the sampler fills in).'
    )
  if not np.all((mask >= 0) & (mask <= 1)):
    raise SampleRequestError('mask values must lie in [0, 1].')
  return masks.to_space(mask, space.shape)


def checked_images(images, batch_size: int, space, *, name: str) -> np.ndarray:
  """`images` as host float32 [B, H, W, C]; SampleRequestError otherwise.

  B is the conditions' batch size, (H, W, C) the images `space` encodes;
  `name` is the argument's name in the message.
  """
  return _checked_array(
    images,
    (batch_size, *space.image_shape),
    name,
    'one image per condition, in [-1, 1]',
  )


def _checked_array(array, expected: tuple, name: str, meaning: str):
  """`array` as host float32 of the `expected` shape, or a message naming
  the argument, both shapes and what the array should hold."""
  array = np.asarray(array, np.float32)
  if array.shape != expected:
    raise SampleRequestError(
      f'{name} has shape {array.shape}; expected {expected} ({meaning}).'
    )
  return array


def _raw_key(rng: jax.Array) -> jax.Array:
  """`rng` as the uint32[2] raw key the sampler is compiled for.

  Accepts `jax.random.key(seed)` (typed, unwrapped here) as well as
  `jax.random.PRNGKey(seed)`, so callers need not know which one it wants.
  """
  dtype = getattr(rng, 'dtype', None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
    dtype = rng.dtype
  if dtype != np.uint32 or np.shape(rng) != (2,):
    raise SampleRequestError(
      'rng must be one key, jax.random.key(seed) or jax.random.PRNGKey(seed); '
      f'got {type(rng).__name__ if dtype is None else dtype}'
      f'{list(np.shape(rng))}.'
    )
  return rng
