"""Editing, inpainting and translation scored on held-out inputs.

`--mode=evaluate`'s second part (`config.evaluate.editing`), on the first
`num_inputs` held-out examples, each with its own class or caption (the
*source*) and a *target*: another class (class models: source + 1 + i mod
K−1, never the source) or the caption of another held-out example (text
models: the next one), with what that caption asks for, so the evaluator
judges the output by it:

- edit (SDEdit, method.md §9): for each t_start, the teacher at many steps
  and the distilled student at few, conditioned on the target at w: target
  accuracy (the evaluator's class accuracy, or on shapes the fraction with
  every attribute right) against faithfulness to the input (PSNR, and the
  distance between the evaluator's features of input and output);
- inpaint: the `mask` region of each input filled in under its own
  condition, by replacement with the teacher and the student, and by the
  trained-and-distilled inpainting model of `inpainting_workdir` if given:
  the error on the known region (mean |output − input| over kept pixels,
  in [−1, 1] units, inputs and outputs 8-bit: 0 for replacement in pixel
  space; a
  latent model's kept latents decode to the autoencoder's reconstruction,
  and the number says how far that is), the FD of the completed images
  against the reference statistics, and the fill's accuracy;
- translate (DDIB): z_1 of each input under its source, by the distilled
  encoder's rounds (decoded by the `translate_num_steps` student) and by
  the teacher's DDIM encoder (decoded by the teacher at as many steps),
  at the rounds' step counts and at `teacher_num_steps`; decoded under the
  target at w (target accuracy), and under the source at w = 0 (the
  cycle: PSNR to the input).

Every row uses the same inputs, targets and noise seeds. Results go to
`<workdir>/eval/editing.{json,md}` and `editing_tradeoff.png`.
"""

import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from gdd import (
  config_lib,
  data,
  encode,
  images,
  masks,
  paths,
  sample,
  sampling,
  workdir_lib,
)
from gdd.evaluation import editing_report, features, fid
from gdd.stages import common, registry

EDIT, INPAINT, TRANSLATE = 'edit', 'inpaint', 'translate'


@dataclasses.dataclass(frozen=True)
class EditRow:
  """One scored configuration.

  Attributes:
    task: EDIT, INPAINT or TRANSLATE.
    model: the sampling stage ('teacher' or 'distill').
    num_steps: its steps from t = 1.
    t_start: edit: SDEdit's start time; 1 otherwise.
    inpainting: inpaint: 'replacement' or 'trained'; '' otherwise.
    encoder: translate: 'encoder' (a distilled round) or 'teacher'.
    encoder_num_steps: translate: the encoder's steps.
  """

  task: str
  model: str
  num_steps: int
  t_start: float = 1.0
  inpainting: str = ''
  encoder: str = ''
  encoder_num_steps: int = 0


@dataclasses.dataclass(frozen=True)
class Inputs:
  """Held-out images with their sources and targets (host arrays).

  `source`/`target` are what each asks for (`evaluate.conditions`' form:
  {'label'} or {'caption', and the attributes}); `*_cond` the model's cond.
  """

  images: np.ndarray
  source: dict
  target: dict
  source_cond: dict
  target_cond: dict


def plan_rows(
  config: ml_collections.ConfigDict, workdir: epath.PathLike
) -> list[EditRow]:
  """The rows this workdir (and `inpainting_workdir`) can serve: a round
  edits from a t_start it can start from (`sampling.start_steps` under
  `editing.off_grid`)."""
  e = config.evaluate.editing
  students = workdir_lib.finished_rounds(workdir, 'distill')
  steps = [n for n in e.student_num_steps if n in students]
  models = [('teacher', e.teacher_num_steps)] + [('distill', n) for n in steps]
  rows = [
    EditRow(EDIT, model, n, t_start=t)
    for t in e.t_starts
    for model, n in models
    if model == 'teacher' or _can_start(t, n, e.off_grid)
  ]
  if 'replacement' in e.inpainting_methods:
    rows += [
      EditRow(INPAINT, m, n, inpainting='replacement') for m, n in models
    ]
  if e.inpainting_workdir and 'trained' in e.inpainting_methods:
    trained = workdir_lib.finished_rounds(e.inpainting_workdir, 'distill')
    rows += [
      EditRow(INPAINT, model, n, inpainting='trained')
      for model, n in models
      if model == 'teacher' or n in trained
    ]
  if e.translate_num_steps in students:
    encoders = workdir_lib.finished_rounds(workdir, 'encoder')
    rows += [
      EditRow(
        TRANSLATE,
        'distill',
        e.translate_num_steps,
        encoder='encoder',
        encoder_num_steps=n,
      )
      for n in e.encoder_num_steps
      if n in encoders
    ]
  # The teacher's DDIM encoder and decoder at the distilled encoder's step
  # counts (like for like) and at teacher_num_steps (the reference).
  rows += [
    EditRow(TRANSLATE, 'teacher', n, encoder='teacher', encoder_num_steps=n)
    for n in sorted({*e.encoder_num_steps, e.teacher_num_steps})
  ]
  return [row for row in rows if row.task in e.tasks]


def _can_start(t_start: float, num_steps: int, off_grid: str) -> bool:
  """Whether an N-step round can start at t_start; its edit rows are left
  out otherwise."""
  try:
    sampling.start_steps(t_start, num_steps, on_grid=True, off_grid=off_grid)
  except sampling.SampleRequestError:
    return False
  return True


def _row_workdir(config, workdir: epath.PathLike, row: EditRow):
  """Where a row's sampling model is: the inpainting chain's for 'trained'."""
  if row.inpainting == 'trained':
    return config.evaluate.editing.inpainting_workdir
  return workdir


def check(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> None:
  """Everything the editing rows need, checked before any sampling."""
  e = config.evaluate.editing
  if e.inpainting_workdir and 'inpaint' in e.tasks:
    trained = sample.load_stage_config(e.inpainting_workdir, 'teacher')
    if not trained.model.inpainting or trained.data.name != config.data.name:
      raise config_lib.ConfigError(
        f'config.evaluate.editing.inpainting_workdir={e.inpainting_workdir!r}'
        f' holds a {trained.data.name!r} chain with model.inpainting='
        f'{trained.model.inpainting}; it must be an inpainting chain '
        f'(:inpaint) of {config.data.name!r}.'
      )
  for row in plan_rows(config, workdir):
    kind = registry.get(row.model)
    row_workdir = _row_workdir(config, workdir, row)
    folder = kind.sampler_folder(row_workdir, row.num_steps, 'ddim', None)
    w_range = kind.w_range(sample.load_stage_config(row_workdir, folder), None)
    sample.check_w(e.w, stage=row.model, w_range=w_range)


def held_out_inputs(config: ml_collections.ConfigDict) -> Inputs:
  """The first `num_inputs` held-out examples, their sources and targets."""
  e = config.evaluate.editing
  info = data.get_info(config.data)
  cond_kind = common.build_conditioning(config, info)
  arrays = data.eval_arrays(
    config.data,
    split=data.held_out_split(config.data),
    num_examples=e.num_inputs,
  )
  # Quantised as the outputs are: kept pixels then compare exactly.
  image = _as_scored(arrays.pop('image'))
  num = len(image)
  if info.has_captions:
    target = {k: np.roll(v, -1, axis=0) for k, v in arrays.items()}
    request = lambda asked: list(asked['caption'])
  else:
    shift = 1 + np.arange(num) % (info.num_classes - 1)
    target = {'label': (arrays['label'] + shift) % info.num_classes}
    request = lambda asked: asked['label']
  return Inputs(
    image,
    arrays,
    target,
    cond_kind.from_request(request(arrays)),
    cond_kind.from_request(request(target)),
  )


def _psnr(outputs: np.ndarray, inputs: np.ndarray) -> float:
  """Mean per-image PSNR in dB of images in [−1, 1] (peak-to-peak 2)."""
  mse = np.mean((outputs - inputs) ** 2, axis=(1, 2, 3))
  return float(np.mean(10 * np.log10(4 / np.maximum(mse, 1e-10))))


def _as_scored(batch) -> np.ndarray:
  """Images quantised to 8 bits, as saved images and real data are."""
  return images.to_uint8(np.asarray(batch)).astype(np.float32) / 127.5 - 1


class _Scorer:
  """Samples a row's outputs in batches and scores them."""

  def __init__(self, config, workdir, inputs: Inputs, out_dir: epath.Path):
    self.config, self.workdir, self.inputs = config, workdir, inputs
    self.e = config.evaluate.editing
    self.extractor = features.make_extractor(config, out_dir)
    self.reference = features.reference_stats(config, self.extractor, out_dir)
    self.input_features = self.extractor.extract(inputs.images)['features']

  def run(self, fn, *batched) -> np.ndarray:
    """`fn(rng, *slices)` over the inputs; rng = fold_in(seed, batch)."""
    rng = jax.random.PRNGKey(self.e.seed)
    return _as_scored(
      sample.run_batches(
        lambda index, *slices: fn(jax.random.fold_in(rng, index), *slices),
        self.e.batch_size,
        *batched,
      )
    )

  def judged(self, outputs: np.ndarray, asked: dict) -> dict:
    """Accuracy (or every attribute right, and each attribute's:
    '<attribute>_accuracy' on shapes), PSNR and feature distance to the
    inputs, and the FD against the reference statistics."""
    out = self.extractor.extract(outputs)
    judged = self.extractor.judge(out, asked)
    distance = np.linalg.norm(out['features'] - self.input_features, axis=-1)
    return {
      **{k: v for k, v in judged.items() if k.endswith('_accuracy')},
      'accuracy': judged.get('all_correct', judged.get('accuracy')),
      'psnr': _psnr(outputs, self.inputs.images),
      'feature_distance': float(np.mean(distance)),
      'fd': fid.frechet_distance(
        *fid.gaussian_stats(out['features']), *self.reference
      ),
    }

  def sampler(self, row: EditRow):
    return sample.load_sampler(
      _row_workdir(self.config, self.workdir, row),
      row.model,
      num_steps=row.num_steps,
      off_grid=self.e.off_grid,
    )


def _edit(scorer: _Scorer, row: EditRow) -> dict:
  sampler, inputs, w = scorer.sampler(row), scorer.inputs, scorer.e.w
  outputs = scorer.run(
    lambda rng, init, cond: sampler(
      rng, cond, w, init=init, t_start=row.t_start
    ),
    inputs.images,
    inputs.target_cond,
  )
  plan = sampler.start(row.t_start)
  record = scorer.judged(outputs, inputs.target)
  return dict(
    record,
    t_start_used=plan.t_start,
    t_grid=plan.t_grid,
    num_evaluations=plan.num_evaluations,
  )


def _inpaint(scorer: _Scorer, row: EditRow) -> dict:
  inputs, e = scorer.inputs, scorer.e
  sampler = scorer.sampler(row)
  height, width = inputs.images.shape[1:3]
  mask = masks.named(e.mask, len(inputs.images), height, width)
  outputs = scorer.run(
    lambda rng, init, cond, keep: sampler(rng, cond, e.w, init=init, mask=keep),
    inputs.images,
    inputs.source_cond,
    mask,
  )
  kept = np.broadcast_to(mask, outputs.shape).astype(bool)
  known_error = np.abs(outputs - inputs.images)[kept]
  return dict(
    scorer.judged(outputs, inputs.source),
    known_error=float(np.mean(known_error)),
    known_max_error=float(np.max(known_error)),
  )


def _translate(scorer: _Scorer, row: EditRow) -> dict:
  inputs, e = scorer.inputs, scorer.e
  encoder = encode.load_encoder(
    scorer.workdir, row.encoder, num_steps=row.encoder_num_steps, w=0.0
  )
  z1 = sample.run_batches(
    lambda _, x, cond: encoder(x, cond),
    e.batch_size,
    inputs.images,
    inputs.source_cond,
  )
  sampler = scorer.sampler(row)
  decode = lambda w: lambda rng, cond, noise: sampler(rng, cond, w, noise=noise)
  translated = scorer.run(decode(e.w), inputs.target_cond, z1)
  cycled = scorer.run(decode(0.0), inputs.source_cond, z1)
  return dict(
    scorer.judged(translated, inputs.target),
    cycle_psnr=_psnr(cycled, inputs.images),
  )


_TASKS = {EDIT: _edit, INPAINT: _inpaint, TRANSLATE: _translate}


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict:
  """Scores every row of `plan_rows`; writes editing.{json,md} and a plot."""
  rows = plan_rows(config, workdir)
  out_dir = workdir_lib.eval_dir(workdir)
  out_dir.mkdir(parents=True, exist_ok=True)
  inputs = held_out_inputs(config)
  scorer = _Scorer(config, workdir, inputs, out_dir)
  records = []
  for row in rows:
    record = dict(dataclasses.asdict(row), **_TASKS[row.task](scorer, row))
    logging.info('%s', editing_report.format_record(record))
    records.append(record)
  results = {
    'workdir': os.fspath(paths.resolve(workdir)),
    'inpainting_workdir': config.evaluate.editing.inpainting_workdir,
    'metric': scorer.extractor.metric_name,
    'config': json.loads(config.evaluate.editing.to_json()),
    'num_inputs': len(inputs.images),
    'records': records,
  }
  editing_report.write(results, out_dir)
  return results
