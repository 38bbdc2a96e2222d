"""Editing (SDEdit), inpainting and translation with trained stages:
`--mode=edit|inpaint|translate`.

- edit: each input image is encoded, noised to `t_start` with q(z_t | x) and
  sampled back to t = 0 conditioned on a *target* class or caption at w
  (method.md §9). A distilled round started between its grid points takes
  one DDIM step to the grid point below first, or with `edit.off_grid` =
  'floor' starts there (`sampling.start_steps`).
- inpaint: where the mask says "fill in", the model samples. A plain model
  (any stage) inpaints by replacement (method.md §9): after every step the
  input noised to that step's time is put back elsewhere, and the output
  keeps the input. An inpainting chain's model (`config.model.inpainting`,
  trained and distilled on random masks) is conditioned on the mask and the
  masked input instead, and its output is its own everywhere
  (`sampling`'s module docstring); the workdir's recorded config decides.
- translate: each input is DDIM-encoded to z_1 under its *source* class or
  caption (`gdd.encode`: a distilled encoder round, or the many-step
  encoder of the teacher or stage-one student), then z_1 is sampled from
  t = 1 under the target (dual diffusion implicit bridges, method.md §9).
  Target = source is the cycle: encode and decode under one condition.

All are `sampling.Sampler` calls (`init`, `t_start`, `mask`, `noise`); this
module reads the inputs (npz, PNG files, or held-out examples), checks the
request before anything compiles, and writes the npz and PNG outputs.
"""

import dataclasses
import os

import jax
import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from gdd import (
  conditioning,
  data,
  encode,
  errors,
  images,
  masks,
  paths,
  sample,
  workdir_lib,
)
from gdd.evaluation import npz
from gdd.stages import common

MODES = ('edit', 'inpaint', 'translate')
# Captions in config.edit.targets are separated by this character.
CAPTION_SEPARATOR = '|'


class EditRequestError(errors.UserError, ValueError):
  """An editing or inpainting request that cannot run; says what can."""


@dataclasses.dataclass(frozen=True)
class Inputs:
  """The images to edit and what is known about them.

  Attributes:
    images: float32 [B, H, W, C] in [−1, 1].
    own: their own conditions (held-out examples' classes or captions) as
      a host cond, or None for images read from files.
  """

  images: np.ndarray
  own: conditioning.Cond | None


def read_images(
  path: epath.PathLike, image_shape: tuple[int, ...]
) -> np.ndarray:
  """Images from an .npz ('images', uint8 [B, H, W, C]: what --mode=sample
  writes), a .png file or a folder of .png files (sorted by name).

  Returns float32 [B, H, W, C] in [−1, 1]. Images must already have the
  model's size and channels: nothing is resized.
  """
  path = paths.resolve(path)
  if path.is_dir():
    files = sorted(p for p in path.iterdir() if p.name.endswith('.png'))
    if not files:
      raise EditRequestError(f'{path} holds no .png file.')
    pixels = np.stack([_read_png(f, image_shape) for f in files])
  elif path.name.endswith('.png'):
    pixels = _read_png(path, image_shape)[None]
  elif path.name.endswith('.npz'):
    pixels = _read_npz_images(path)
  else:
    raise EditRequestError(
      f'input={os.fspath(path)!r}: no such .npz, .png or folder of .png files.'
    )
  if pixels.shape[1:] != tuple(image_shape):
    raise EditRequestError(
      f'{path} holds images of shape {pixels.shape[1:]}; this model takes '
      f'{tuple(image_shape)} (height, width, channels): resize them first.'
    )
  return data.to_model_range(pixels, 255)


def _read_png(path: epath.Path, image_shape: tuple[int, ...]) -> np.ndarray:
  if not path.is_file():
    raise EditRequestError(f'input={os.fspath(path)!r}: no such file.')
  mode = {1: 'L', 3: 'RGB'}[image_shape[-1]]
  with path.open('rb') as f:
    pixels = np.asarray(Image.open(f).convert(mode))
  return pixels.reshape(*pixels.shape[:2], image_shape[-1])


def _read_npz_images(path: epath.Path) -> np.ndarray:
  if not path.is_file():
    raise EditRequestError(f'input={os.fspath(path)!r}: no such file.')
  with path.open('rb') as f, np.load(f) as arrays:
    if 'images' not in arrays or arrays['images'].dtype != np.uint8:
      raise EditRequestError(
        f'{path} needs an array images, uint8 [B, H, W, C] (as --mode=sample '
        f'writes); it has {dict((k, arrays[k].dtype) for k in arrays)}.'
      )
    return arrays['images']


def load_inputs(config: ml_collections.ConfigDict) -> Inputs:
  """`config.edit.input`'s images, or the first `num_inputs` held-out
  examples (with their classes or captions) when it is ''."""
  info = data.get_info(config.data)
  if config.edit.input:
    return Inputs(read_images(config.edit.input, info.image_shape), None)
  arrays = data.eval_arrays(
    config.data,
    split=data.held_out_split(config.data),
    num_examples=config.edit.num_inputs,
  )
  own = (
    {'caption': list(arrays['caption'])}
    if 'caption' in arrays
    else {'label': arrays['label']}
  )
  return Inputs(arrays['image'], own)


def target_conditions(
  cond_kind, inputs: Inputs, targets: str, *, key: str = 'targets'
):
  """One target condition per input, checked (`cond_kind.from_request`).

  `targets`: class models: class indices separated by commas ('8', '3,8'),
  text models: captions separated by '|'; cycled over the inputs. '': the
  inputs' own conditions (held-out inputs only). `key` names the
  config.edit field in messages ('sources': translation's source classes).
  """
  num = len(inputs.images)
  if not targets:
    if inputs.own is None:
      raise EditRequestError(
        f'config.edit.{key} is empty, and images read from a file have no '
        "class or caption of their own: name them (e.g. '8' or "
        "'3,8' for classes, 'a red circle|a blue square' for captions)."
      )
    request = inputs.own
  elif isinstance(cond_kind, conditioning.TextConditioning):
    captions = [c.strip() for c in targets.split(CAPTION_SEPARATOR)]
    request = [captions[i % len(captions)] for i in range(num)]
  else:
    try:
      labels = [int(t) for t in targets.split(',')]
    except ValueError:
      raise EditRequestError(
        f'config.edit.{key}={targets!r}: a class model takes class indices '
        "separated by commas, e.g. '8' or '3,8'."
      ) from None
    request = np.asarray([labels[i % len(labels)] for i in range(num)])
  try:
    return cond_kind.from_request(request)
  except conditioning.CondError as error:
    raise EditRequestError(f'config.edit.{key}: {error}') from None


def load_mask(
  spec: str, batch_size: int, image_shape: tuple[int, ...]
) -> np.ndarray:
  """`config.edit.mask` as a [B, H, W, 1] mask (1 kept, 0 filled in).

  A named region (`masks.KINDS`), or a file: .npz with `masks` ([B, H, W]
  or [B, H, W, 1], > 0.5 filled in; one mask for all or one per input) or
  a .png (white filled in), at the images' size.
  """
  height, width = image_shape[:2]
  if spec in masks.KINDS:
    return masks.named(spec, batch_size, height, width)
  path = paths.resolve(spec)
  if not path.is_file() or not path.name.endswith(('.npz', '.png')):
    raise masks.unknown(spec)
  if path.name.endswith('.png'):
    with path.open('rb') as f:
      fill = np.asarray(Image.open(f).convert('L'), np.float32)[None] / 255
  else:
    with path.open('rb') as f, np.load(f) as arrays:
      if 'masks' not in arrays:
        raise EditRequestError(f'{path} has no array named masks.')
      fill = arrays['masks'].astype(np.float32)
  mask = masks.from_fill(fill)
  if mask.shape[1:3] != (height, width) or len(mask) not in (1, batch_size):
    raise EditRequestError(
      f'{path} holds masks of shape {mask.shape}; expected one or '
      f'{batch_size} masks of {height}x{width} (the images).'
    )
  return np.broadcast_to(mask, (batch_size, height, width, 1)).copy()


def edit_to_files(
  config: ml_collections.ConfigDict, workdir: epath.PathLike, mode: str
) -> str:
  """`--mode=edit`, `inpaint` or `translate`: writes an .npz and a PNG;
  returns the npz path.

  The npz holds `images` (the outputs), `inputs` (uint8 [B, H, W, C]),
  `masks` (inpaint: uint8 [B, H, W, 1], 1 kept), the targets (`labels` or
  `captions`), `t_start` (the time the input was noised to), `t_grid`
  (where the sampler's steps began: below t_start after a distilled round's
  lead-in step) and `num_steps` (the steps taken, a lead-in step included:
  network calls per sample, twice that for the CFG teacher); translate
  adds the sources
  (`source_labels` or `source_captions`) and `encoded` (float32 z_1). The
  PNG shows a row per input: input | (masked input |) output.
  """
  if mode not in MODES:
    raise EditRequestError(f'mode={mode!r}; allowed: {MODES}.')
  c = config.edit
  info = data.get_info(config.data)
  cond_kind = common.build_conditioning(config, info)
  inputs = load_inputs(config)
  cond = target_conditions(cond_kind, inputs, c.targets)
  request = _request(workdir, mode, c, cond_kind, inputs)
  sampler = sample.load_sampler(
    workdir,
    c.stage,
    num_steps=c.num_steps,
    sampler=c.sampler,
    w=c.w,
    off_grid=c.off_grid,
  )
  plan = sampler.start(request.t_start)  # Checked first.
  request = request.encoded(inputs.images, c.batch_size)
  outputs = _sample_batches(sampler, c, inputs.images, cond, request)
  output = _output_path(workdir, mode, c, plan.t_start)
  if jax.process_index() > 0:  # Every process holds the outputs; one writes.
    return os.fspath(output)
  saved = dict(
    images=outputs,
    inputs=images.to_uint8(inputs.images),
    t_start=np.float32(plan.t_start),
    t_grid=np.float32(plan.t_grid),
    num_steps=np.int32(plan.num_evaluations),
    **cond_kind.saved_arrays(cond),
    **request.saved(cond_kind),
  )
  npz.atomic_savez(output, **saved)
  _save_grid(output.with_suffix('.png'), saved, info.image_shape[0])
  return os.fspath(output)


@dataclasses.dataclass(frozen=True)
class _Request:
  """What a mode adds to the sampler call, checked before any compile.

  Attributes:
    t_start: the requested start time (1 for translation).
    arrays: host arrays by `Sampler` argument: 'mask' (inpaint), 'encoded'
      (translate: z_1, added by `encoded` once the request is checked).
    encoder: translate: the loaded `gdd.encode.Encoder`.
    source: translate: the inputs' source conditions.
  """

  t_start: float
  arrays: dict
  encoder: encode.Encoder | None = None
  source: conditioning.Cond | None = None

  def encoded(self, inputs: np.ndarray, batch_size: int) -> '_Request':
    """Translate: this request with z_1 of every input; else itself."""
    if self.encoder is None:
      return self
    z1 = sample.run_batches(
      lambda _, images, source: self.encoder(images, source),
      batch_size,
      inputs,
      self.source,
    )
    return dataclasses.replace(self, arrays={**self.arrays, 'encoded': z1})

  def saved(self, cond_kind) -> dict:
    """The npz entries this request adds."""
    saved = {}
    if 'mask' in self.arrays:
      saved['masks'] = self.arrays['mask'].astype(np.uint8)
    if self.source is not None:
      source = cond_kind.saved_arrays(self.source)
      saved.update({f'source_{k}': v for k, v in source.items()})
      saved['encoded'] = self.arrays['encoded']
    return saved


def _request(workdir, mode: str, c, cond_kind, inputs: Inputs) -> _Request:
  """The mode's start time, mask or encoder; every input checked."""
  if mode == 'edit':
    return _Request(c.t_start, {})
  if mode == 'inpaint':
    mask = load_mask(c.mask, len(inputs.images), inputs.images.shape[1:])
    return _Request(c.inpaint_t_start, {'mask': mask})
  source = target_conditions(cond_kind, inputs, c.sources, key='sources')
  encoder = encode.load_encoder(
    workdir, c.encoder_stage, num_steps=c.encoder_num_steps
  )
  return _Request(1.0, {}, encoder, source)


def _sample_batches(sampler, c, inputs, cond, request: _Request):
  """uint8 outputs of the sampler over the inputs, `c.batch_size` at a time:
  from `inputs` noised to t_start, or (translate) from their z_1."""
  rng = jax.random.PRNGKey(c.seed)
  translating = request.encoder is not None

  def sample_batch(index, init, batch_cond, mask, encoded):
    return sampler(
      jax.random.fold_in(rng, index),
      batch_cond,
      c.w,
      init=None if translating else init,
      t_start=request.t_start,
      mask=mask,
      noise=encoded,
    )

  return images.to_uint8(
    sample.run_batches(
      sample_batch,
      c.batch_size,
      inputs,
      cond,
      request.arrays.get('mask'),
      request.arrays.get('encoded'),
    )
  )


def _output_path(workdir, mode: str, c, t_start: float) -> epath.Path:
  if mode == 'translate':  # Which encoder made z_1 names the file too.
    mode = f'translate_from_{c.encoder_stage}_{c.encoder_num_steps}steps'
  return sample.npz_output(
    c.output,
    workdir_lib.edits_file(
      workdir,
      mode=mode,
      stage=c.stage,
      sampler=c.sampler,
      num_steps=c.num_steps,
      w=c.w,
      t_start=t_start,
    ),
  )


def _save_grid(path: epath.Path, saved: dict, image_size: int) -> None:
  """A row per input (the first `sample.MAX_CAPTION_ROWS`): input |
  (masked input, the filled-in region grey |) output; captions as titles."""
  num = min(len(saved['images']), sample.MAX_CAPTION_ROWS)
  columns = [saved['inputs'][:num]]
  if 'masks' in saved:
    grey = np.full_like(saved['inputs'][:num], 128)
    kept = saved['masks'][:num].astype(bool)
    columns.append(np.where(kept, saved['inputs'][:num], grey))
  columns.append(saved['images'][:num])
  rows = np.stack(columns, axis=1).reshape(-1, *saved['images'].shape[1:])
  grid = images.make_grid(rows, num_rows=num)
  upscale = images.display_scale(image_size)
  if 'captions' in saved:
    grid = images.with_row_titles(grid, list(saved['captions'][:num]), upscale)
    upscale = 1
  images.save_png(path, grid, upscale=upscale)
