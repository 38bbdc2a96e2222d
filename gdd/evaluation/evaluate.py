"""`--mode=evaluate`: every finished stage of a workdir, scored like the paper.

A row is (model, sampler, num_steps): the CFG teacher with many DDIM steps
(the reference) and with few (the paper's DDIM baseline), the stage-one
student, the distilled student deterministic and stochastic at every
distilled step count, and the single-w baseline where present. Each row is
sampled at every w of `config.evaluate.ws` from the same noise seeds and the
same conditions (the classes, or the held-out captions, cycled), and scored
against cached reference statistics of real data: Fréchet distance (FID with
Inception-v3, FD-digits or FD-shapes with the digits or shapes classifier),
and beside it Inception Score (or its digits analogue) and class accuracy
where the extractor's classes are the data set's, or on shapes the fraction
of images that show every attribute their caption asks for and each
attribute's accuracy; then NFE per sample, and seconds per sample measured
after compilation (for a latent model, decoding the latents included: the
sampler returns images). Results go to `<workdir>/eval/` (see `report`).
"""

import dataclasses
import json
import os
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from gdd import (
  conditioning,
  config_lib,
  data,
  images,
  paths,
  sample,
  sampling,
  workdir_lib,
)
from gdd.evaluation import editing, features, fid, report
from gdd.stages import common, registry

# Real images scored as if they were a model (the floor of the metric).
REAL = 'real'


@dataclasses.dataclass(frozen=True)
class Row:
  """One sampler configuration to score."""

  model: str  # 'teacher', 'guided', 'distill', 'single_w' or REAL.
  sampler: str
  num_steps: int
  trained_w: float | None = None  # The single-w baseline's one w.

  @property
  def nfe(self) -> int:
    """Network evaluations per sample (none for real images)."""
    return 0 if self.model == REAL else registry.nfe(self.model, self.num_steps)


def plan_rows(
  config: ml_collections.ConfigDict, workdir: epath.PathLike
) -> list[Row]:
  """The rows of the evaluation grid that this workdir's stages can serve."""
  return [
    Row(kind.name, sampler, num_steps, trained_w)
    for kind in registry.KINDS
    for sampler, num_steps, trained_w in kind.eval_rows(
      config.evaluate, workdir
    )
  ]


def _check_request(config, workdir: epath.PathLike, rows: list[Row]) -> None:
  """Everything that can be wrong, checked before any sampling starts."""
  if not rows:
    raise sample.StageNotFoundError(
      f'No finished stage in {workdir}: --mode=evaluate scores trained '
      'stages; train first (python -m gdd.main --config=... '
      f'--workdir={workdir}).'
    )
  trained = sample.load_stage_config(workdir, 'teacher')
  if trained.data.name != config.data.name:
    raise config_lib.ConfigError(
      f'config.data.name={config.data.name!r} but {workdir} was trained on '
      f'{trained.data.name!r}; pass the config the workdir was trained with.'
    )
  for row in rows:
    kind = registry.get(row.model)
    folder = kind.sampler_folder(
      workdir, row.num_steps, row.sampler, row.trained_w
    )
    low, high = kind.w_range(
      sample.load_stage_config(workdir, folder), row.trained_w
    )
    ws = _sample_ws(row, tuple(config.evaluate.ws))
    if any(not low <= w <= high for w in ws):
      raise config_lib.ConfigError(
        f'config.evaluate.ws={ws} leaves the range the {row.model} model '
        f'was trained for [{low:g}, {high:g}]; choose ws inside it.'
      )


def _sample_ws(row: Row, ws: tuple[float, ...]) -> tuple[float, ...]:
  # A model trained for one w (the single-w baseline) samples at that w.
  return ws if row.trained_w is None else (row.trained_w,)


def _generate(
  sampler: sampling.Sampler,
  cond: conditioning.Cond,
  w: float,
  batch_size: int,
  seed: int,
) -> tuple[np.ndarray, float]:
  """Samples for `cond` (uint8-quantised) and seconds per sample.

  Batch k uses the noise key fold_in(seed, k) in every row, so rows differ
  only by their model and sampler. The sampler must be compiled for the
  batch sizes used; the seconds are sampling only.
  """
  chunks, seconds = [], 0.0
  num = conditioning.batch_size(cond)
  for index, begin in enumerate(range(0, num, batch_size)):
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), index)
    batch_cond = conditioning.take(cond, begin, begin + batch_size)
    start = time.perf_counter()
    batch = np.asarray(sampler(rng, batch_cond, w))
    seconds += time.perf_counter() - start
    chunks.append(batch)
  # Scored as saved images are: quantised to 8 bits, as real data is.
  quantised = images.to_uint8(np.concatenate(chunks))
  return quantised.astype(np.float32) / 127.5 - 1.0, seconds / num


def _score(
  extractor: features.FeatureExtractor,
  samples: np.ndarray,
  asked: dict[str, np.ndarray],
  reference: tuple[np.ndarray, np.ndarray],
) -> dict:
  """FD against `reference`, and the extractor's scores of the samples
  against what each was asked for."""
  out = extractor.extract(samples)
  mu, sigma = fid.gaussian_stats(out['features'])
  return {
    'fd': fid.frechet_distance(mu, sigma, *reference),
    **extractor.judge(out, asked),
  }


def conditions(
  config: ml_collections.ConfigDict, num: int
) -> tuple[conditioning.Cond, dict[str, np.ndarray]]:
  """`num` conditions, cycled as grids cycle them, and what each asks for.

  Class models ask for their labels. Text models ask for the held-out
  examples whose captions they cycle: each caption with every array the data
  set stores beside it (shapes: its attributes), so that an evaluator can
  judge a sample by what its caption asked for without parsing it.
  """
  info = data.get_info(config.data)
  cond_kind = common.build_conditioning(config, info)
  cond = cond_kind.cycled(num)
  if not info.has_captions:
    return cond, {'label': conditioning.class_labels(cond)}
  # The conditioning's captions are the first of the held-out split
  # (`data.held_out_captions`): these examples, in this order.
  held_out = data.eval_arrays(
    config.data,
    split=data.held_out_split(config.data),
    num_examples=len(cond_kind.captions),
  )
  index = np.arange(num) % len(cond_kind.captions)
  return cond, {k: v[index] for k, v in held_out.items() if k != 'image'}


def _evaluate_row(
  row: Row,
  config: ml_collections.ConfigDict,
  workdir: epath.PathLike,
  extractor: features.FeatureExtractor,
  reference: tuple[np.ndarray, np.ndarray],
  cond: conditioning.Cond,
  asked: dict[str, np.ndarray],
) -> list[dict]:
  """One record per w for a model row; `cond` and what it asks for as
  `conditions` draws them."""
  ev = config.evaluate
  sampler = sample.load_sampler(
    workdir,
    row.model,
    num_steps=row.num_steps,
    sampler=row.sampler,
    w=row.trained_w,
  )
  num = conditioning.batch_size(cond)
  compile_seconds = sampler.compile(min(ev.batch_size, num))
  if num % ev.batch_size and num > ev.batch_size:
    compile_seconds += sampler.compile(num % ev.batch_size)
  records = []
  for w in _sample_ws(row, tuple(ev.ws)):
    samples, seconds = _generate(sampler, cond, w, ev.batch_size, ev.seed)
    records.append(
      dict(
        dataclasses.asdict(row),
        nfe=row.nfe,
        w=float(w),
        num_samples=num,
        seconds_per_sample=seconds,
        compile_seconds=compile_seconds,
        **_score(extractor, samples, asked, reference),
      )
    )
    logging.info('%s', report.format_record(records[-1]))
  return records


def _evaluate_real(config, extractor, reference) -> dict:
  """Real images of `evaluate.real_split` scored like a model's samples."""
  ev = config.evaluate
  split_size = data.split_size(config.data, ev.real_split)
  real = data.eval_arrays(
    config.data,
    split=ev.real_split,
    num_examples=min(ev.num_samples, split_size),
  )
  record = dict(
    dataclasses.asdict(Row(REAL, ev.real_split, 0)),
    nfe=0,
    w=None,
    num_samples=len(real['image']),
    seconds_per_sample=None,
    compile_seconds=None,
    # Each real image is scored against its own label or caption.
    **_score(
      extractor,
      real['image'],
      {k: v for k, v in real.items() if k != 'image'},
      reference,
    ),
  )
  logging.info('%s', report.format_record(record))
  return record


def time_call(fn: Callable[[], object], min_seconds: float = 5.0) -> float:
  """Seconds per call of a compiled function, after compilation.

  Each call is timed until its outputs are ready on the device
  (`jax.block_until_ready`). A call shorter than `min_seconds` counts as
  warm-up (first-call effects such as allocation and thread start-up are not
  negligible on it) and the median of repeated calls filling `min_seconds`
  (at least 3) is returned; a longer call is timed once.
  """
  start = time.perf_counter()
  jax.block_until_ready(fn())
  elapsed = time.perf_counter() - start
  if elapsed >= min_seconds:
    return elapsed
  times = []
  for _ in range(max(3, int(np.ceil(min_seconds / max(elapsed, 1e-4))))):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def measure_speed(
  config: ml_collections.ConfigDict,
  workdir: epath.PathLike,
  *,
  min_seconds: float = 5.0,
) -> dict | None:
  """Wall time of the CFG teacher at many steps against the N-step student.

  One process, one device set, one batch size, compiled before timing
  (`time_call` with `min_seconds`). The ideal ratio is the ratio of network
  evaluations.
  """
  ev = config.evaluate
  student_steps = ev.speed_student_num_steps
  if not ev.speed_teacher_num_steps:
    return None
  if student_steps not in workdir_lib.finished_rounds(workdir):
    logging.warning('Speed: no finished %d-step round; skipped.', student_steps)
    return None
  info = data.get_info(config.data)
  cond = common.build_conditioning(config, info).cycled(ev.speed_batch_size)
  rng = jax.random.PRNGKey(ev.seed)

  def seconds(model: str, num_steps: int) -> float:
    sampler = sample.load_sampler(workdir, model, num_steps=num_steps)
    sampler.compile(ev.speed_batch_size)
    return time_call(lambda: sampler(rng, cond, 1.0), min_seconds)

  student_seconds = seconds('distill', student_steps)
  rows = []
  for teacher_steps in ev.speed_teacher_num_steps:
    teacher_seconds = seconds('teacher', teacher_steps)
    rows.append(
      {
        'teacher_num_steps': teacher_steps,
        'teacher_seconds': teacher_seconds,
        'measured_ratio': teacher_seconds / student_seconds,
        'ideal_ratio': (
          registry.nfe('teacher', teacher_steps)
          / registry.nfe('distill', student_steps)
        ),
      }
    )
    logging.info('%s', report.format_speed_row(rows[-1], student_steps))
  return {
    'device': device_description(),
    'batch_size': ev.speed_batch_size,
    'student_num_steps': student_steps,
    'student_seconds': student_seconds,
    'rows': rows,
  }


def _describe_conditions(asked: dict[str, np.ndarray]) -> str:
  """What the samples of a cell were asked for, in words."""
  if 'caption' in asked:
    return f'{len(set(asked["caption"]))} distinct held-out captions cycled'
  return 'classes cycled'


def device_description() -> str:
  devices = jax.devices()
  return f'{devices[0].platform}:{devices[0].device_kind} x{len(devices)}'


def check(
  config: ml_collections.ConfigDict, workdir: epath.PathLike
) -> list[Row]:
  """Validates an evaluate request (cheap); returns the generation rows it
  will score (none when `evaluate.generation` is off)."""
  ev = config.evaluate
  if not (ev.generation or ev.editing.enabled):
    raise config_lib.ConfigError(
      'config.evaluate.generation and config.evaluate.editing.enabled are '
      'both False: --mode=evaluate would score nothing; enable one.'
    )
  rows = plan_rows(config, workdir)
  _check_request(config, workdir, rows)
  features.check_config(config)
  if ev.editing.enabled:
    editing.check(config, workdir)
  return rows if ev.generation else []


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict:
  """Scores every finished stage: the generation rows (results.json,
  results.md, plots) and the editing rows (`editing`), as enabled."""
  rows = check(config, workdir)
  results = _run_generation(config, workdir, rows) if rows else {}
  if config.evaluate.editing.enabled:
    results['editing'] = editing.run(config, workdir)
  return results


def _run_generation(
  config: ml_collections.ConfigDict, workdir: epath.PathLike, rows: list[Row]
) -> dict:
  """Scores the generation rows; writes results.json, results.md, plots."""
  ev = config.evaluate
  out_dir = workdir_lib.eval_dir(workdir)
  out_dir.mkdir(parents=True, exist_ok=True)
  extractor = features.make_extractor(config, out_dir)
  reference = features.reference_stats(config, extractor, out_dir)
  cond, asked = conditions(config, ev.num_samples)
  records = []
  if ev.real_split:
    records.append(_evaluate_real(config, extractor, reference))
  for row in rows:
    records += _evaluate_row(
      row, config, workdir, extractor, reference, cond, asked
    )
  results = {
    'workdir': os.fspath(paths.resolve(workdir)),
    'device': device_description(),
    'metric': extractor.metric_name,
    'conditions': _describe_conditions(asked),
    'extractor': extractor.about,
    'reference': {
      'split': ev.reference_split,
      'num_examples': features.reference_size(config),
    },
    'config': json.loads(ev.to_json()),
    'records': records,
    'speed': measure_speed(config, workdir),
  }
  report.write(results, out_dir)
  return results
