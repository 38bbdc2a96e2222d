"""Encoding images to noise: the Python API of gdd's DDIM encoders.

`load_encoder(workdir, 'encoder', num_steps=4)` loads a distilled encoder
round (`gdd.stages.encoder`); 'guided' and 'teacher' give the many-step
DDIM encoder of a continuous-time model. `encoder(images, cond)` → z_1 in
the diffusion space, jitted with the batch split over all devices like
`sampling.Sampler`; decoding z_1 with a sampler under another condition is
translation (DDIB, method.md §9). The maths: `gdd.diffusion.encoding`.
"""

import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from gdd import checks, conditioning, denoisers, sample, sampling
from gdd.diffusion import encoding
from gdd.stages import common, encoder, registry

# The stages that encode: a distilled round, or a continuous-time model.
ENCODING_STAGES = ('teacher', 'guided', encoder.NAME)

# (params, images, cond, space_params) -> z_1 in the diffusion space.
EncodeFn = Callable[..., jnp.ndarray]


def make_encode_fn(
  config: ml_collections.ConfigDict,
  space,
  make_eps: denoisers.DenoiserFactory,
  *,
  num_steps: int,
  w: float,
) -> EncodeFn:
  """(params, images, cond, space_params) ↦ z_1 of the N-step encoder.

  Images in [−1, 1] are `space.encode`d, then encoded from t = 0 to 1 with
  `make_eps(params, cond, w)`'s ε̂ (`encoding.ddim_encode`).
  """
  logsnr_fn = common.logsnr_fn(config)

  def encode_fn(params, images, cond, space_params=None):
    x = space.encode(space_params, images).astype(jnp.float32)
    return encoding.ddim_encode(
      make_eps(params, cond, w), x, num_steps=num_steps, logsnr_fn=logsnr_fn
    )

  return encode_fn


class Encoder:
  """A model's N-step DDIM encoder at one w, jitted over all devices.

  Called as `encoder(images, cond)`; compiled once per (device-padded)
  batch size, on first use or ahead of time with `compile`. Params are
  replicated; z_1 comes back replicated, so on a multi-host mesh every
  process can read it.

  Attributes:
    num_steps: encoder steps N.
    w: the guidance strength it encodes at.
    nfe: network evaluations per encoded image.
  """

  def __init__(
    self,
    encode_fn: EncodeFn,
    params,
    cond_kind,
    space,
    *,
    num_steps: int,
    w: float,
    nfe: int,
    space_params: Any = None,
  ):
    self._encode_fn = encode_fn
    self._params = params
    self._space = space
    self._space_params = space_params
    self._devices = sampling.DeviceBatches(cond_kind)
    self._executables = {}
    self.num_steps, self.w, self.nfe = num_steps, w, nfe

  def __call__(self, images, cond) -> jax.Array:
    """z_1 of `images` under `cond`, checked on the host first.

    Args:
      images: [B, H, W, C] images in [−1, 1] (a latent model's autoencoder
        encodes them first).
      cond: their condition, as `sampling.Sampler` takes it: {'label': int
        [B]} or the labels themselves (class models), captions (text).

    Returns:
      [B, *space.shape] float32 z_1 in the diffusion space, replicated.
    """
    devices = self._devices
    cond = devices.checked_cond(cond)
    n = conditioning.batch_size(cond)
    images = sampling.checked_images(images, n, self._space, name='images')
    executable = self._executable(devices.padded_size(n))
    images, cond = devices.put(devices.padded((images, cond)))
    return executable(self._params, images, cond, self._space_params)[:n]

  def compile(self, batch_size: int) -> float:
    """Compiles for `batch_size` now; returns the seconds it took."""
    start = time.perf_counter()
    self._executable(self._devices.padded_size(batch_size))
    return time.perf_counter() - start

  def _executable(self, padded_size: int):
    """The compiled encoder for one padded batch size."""
    if padded_size not in self._executables:
      devices = self._devices
      rep, batch = devices.replicated, devices.batch
      images = jax.ShapeDtypeStruct(
        (padded_size, *self._space.image_shape), np.float32, sharding=batch
      )
      self._executables[padded_size] = devices.compile(
        self._encode_fn,
        (rep, batch, batch, rep),
        self._params,
        images,
        devices.abstract_cond(padded_size),
        self._space_params,
      )
    return self._executables[padded_size]


def load_encoder(
  workdir: epath.PathLike,
  stage: str,
  *,
  num_steps: int,
  w: float | None = None,
) -> Encoder:
  """The N-step DDIM encoder of a finished stage.

  Args:
    workdir: the run's workdir.
    stage: 'encoder' (a distilled round; num_steps picks it), 'guided' (the
      stage-one student, any step count) or 'teacher' (the CFG teacher; at
      w = 0 its conditional network alone, 1 NFE per step, else 2).
    num_steps: encoder steps N.
    w: the guidance strength to encode at; None: the stage's recorded
      config.encoder.w (0 by default: the plain conditional model). A
      distilled encoder accepts only the w it was trained at.

  Returns:
    An `Encoder`: `encoder(images, cond)` → z_1 [B, *space.shape].

  Raises:
    sampling.SampleRequestError: a stage that does not encode, an
      untrained round (the message lists the trained ones), a w outside the
      stage's range, or an x-parameterised model (`diffusion.encoding`).
  """
  folder = _folder(workdir, stage, num_steps)
  config = sample.load_stage_config(workdir, folder)
  _check_mean_type(config, stage)
  w = config.encoder.w if w is None else w
  sample.check_w(
    w, stage=stage, w_range=registry.get(stage).w_range(config, None)
  )
  loaded = sample.load_folder(workdir, stage, folder)
  guided_pair = stage == 'teacher' and w > 0
  return Encoder(
    make_encode_fn(
      config,
      loaded.space,
      _eps_factory(loaded, guided_pair),
      num_steps=num_steps,
      w=w,
    ),
    loaded.params,
    loaded.cond_kind,
    loaded.space,
    num_steps=num_steps,
    w=w,
    nfe=(2 if guided_pair else 1) * num_steps,
    space_params=loaded.space_params,
  )


def _folder(workdir: epath.PathLike, stage: str, num_steps: int) -> str:
  """The stage folder that encodes in `num_steps`; errors say what can."""
  if stage not in ENCODING_STAGES:
    raise sampling.SampleRequestError(
      f'stage={stage!r} does not encode; allowed: {ENCODING_STAGES}.'
    )
  if not checks.is_int(num_steps):
    raise sampling.SampleRequestError(
      f'num_steps={num_steps!r}; must be a positive int.'
    )
  if stage == encoder.NAME:
    return encoder.round_folder(workdir, num_steps)
  return stage


def _check_mean_type(config: ml_collections.ConfigDict, stage: str) -> None:
  """Refuses x-parameterised models (the first step's choice, `encoding`)."""
  if config.model.mean_type == 'x':
    raise sampling.SampleRequestError(
      f"The {stage} model predicts x (config.model.mean_type='x'): its "
      'ε̂ = (z − α x̂)/σ divides its x error by σ ≈ 4.5e-5 at t = 0, where '
      "encoding starts, so gdd encodes only with 'both', 'v' or 'eps' "
      'models.'
    )


def _eps_factory(
  loaded: sample.LoadedStage, guided_pair: bool
) -> denoisers.DenoiserFactory:
  """(params, cond, w) → ε̂: the CFG pair of the teacher where w > 0, else
  the network alone (a student's w-input, if it has one, set to w)."""
  if guided_pair:
    return functools.partial(
      denoisers.guided, loaded.model, loaded.cond_kind, estimate='eps'
    )
  return functools.partial(denoisers.plain, loaded.model, estimate='eps')
