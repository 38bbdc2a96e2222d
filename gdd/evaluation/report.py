"""Evaluation output: results.json, a markdown table and PNG plots.

Reads only the results dict that `evaluate.run` builds, so a report can be
re-made from a saved results.json (`write(read(out_dir), out_dir)`).
"""

import json
from collections.abc import Callable

import jax
import matplotlib
from etils import epath
from matplotlib import figure

from gdd import paths
from gdd.evaluation import shapes_features
from gdd.stages import registry

# Figures are built with matplotlib's object API and saved to files, never
# through pyplot: no global backend is set, so a notebook that imports gdd
# keeps its inline plots.

# The file `write` saves the results dict in and `read` loads it from.
_RESULTS_JSON = 'results.json'
# Plotted series, declared by each stage kind: (model, sampler) → label, and
# → colour family in the quality-vs-w plot (darker = more steps; kinds
# without one are left out of that plot).
_SERIES = {
  (kind.name, sampler): label
  for kind in registry.KINDS
  for sampler, (label, _) in kind.series.items()
}
_COLORMAPS = {
  (kind.name, sampler): colormap
  for kind in registry.KINDS
  for sampler, (_, colormap) in kind.series.items()
  if colormap is not None
}


# Scores beside the Fréchet distance that an extractor may give, in report
# order: key → (table title, format). A table is written for each that a
# record holds (digits and Inception: IS and class accuracy; shapes: caption
# accuracy, in all and per attribute).
_SCORES = {
  'is': ('Inception Score (higher is better)', '.2f'),
  'accuracy': ('Class accuracy', '.3f'),
  'all_correct': (
    'Caption accuracy: images showing every attribute asked for',
    '.3f',
  ),
  **{
    f'{name}_accuracy': (
      f'Caption accuracy: {name.replace("_", " ")} as asked',
      '.3f',
    )
    for name in shapes_features.SCORED_ATTRIBUTES
  },
}
# Scores on each progress line, with their short names.
_LOGGED = {'is': 'IS', 'accuracy': 'accuracy', 'all_correct': 'all correct'}
# The score plotted under the Fréchet distance: the first a record holds.
_PLOTTED = (('is', 'IS'), ('all_correct', 'all attributes correct'))


def _fmt(value, spec: str) -> str:
  return '–' if value is None else format(value, spec)


def row_name(record: dict) -> str:
  if record['model'] == 'real':
    return f'real data ({record["sampler"]} split)'
  name = record['model']
  if record['trained_w'] is not None:
    name += f' (w={record["trained_w"]:g})'
  return name


def format_record(record: dict) -> str:
  """One progress line, printed as each cell is scored."""
  if record['model'] == 'real':
    what = f'{row_name(record)}, {record["num_samples"]} images'
  else:
    what = (
      f'{row_name(record)} {record["sampler"]} {record["num_steps"]} steps '
      f'w={record["w"]:g}'
    )
  scores = [f'FD {record["fd"]:.3f}']
  for key, name in _LOGGED.items():
    if key in record:
      scores.append(f'{name} {_fmt(record[key], _SCORES[key][1])}')
  return (
    f'{what}: {", ".join(scores)}, '
    f'{_fmt(record["seconds_per_sample"], ".2e")} s/sample'
  )


def format_speed_row(row: dict, student_num_steps: int) -> str:
  return (
    f'speed: teacher {row["teacher_num_steps"]} steps '
    f'{row["teacher_seconds"]:.3f} s vs {student_num_steps}-step student: '
    f'{row["measured_ratio"]:.1f}x (ideal {row["ideal_ratio"]:.0f}x)'
  )


def _row_key(record: dict) -> tuple:
  return (
    record['model'],
    record['sampler'],
    record['num_steps'],
    record['trained_w'],
  )


def _row_keys(records: list[dict]) -> list[tuple]:
  """Distinct rows in first-seen order."""
  return list(dict.fromkeys(_row_key(r) for r in records))


def _ws(records: list[dict]) -> list[float]:
  return sorted({r['w'] for r in records if r['w'] is not None})


def _metric_table(results: dict, metric: str, title: str, spec: str) -> str:
  records = results['records']
  ws = _ws(records)
  lines = [
    f'### {title}',
    '',
    '| model | sampler | steps | NFE | s/sample | '
    + ' | '.join(f'w={w:g}' for w in ws)
    + ' |',
    '|' + ' --- |' * (5 + len(ws)),
  ]
  for key in _row_keys(records):
    cells = [r for r in records if _row_key(r) == key]
    by_w = {r['w']: r for r in cells}
    # Real data has no w: its value stands in every w column.
    values = [(by_w.get(w) or by_w.get(None) or {}).get(metric) for w in ws]
    seconds = [
      c['seconds_per_sample'] for c in cells if c['seconds_per_sample']
    ]
    first = cells[0]
    lines.append(
      f'| {row_name(first)} | {first["sampler"]} | {first["num_steps"]} | '
      f'{first["nfe"]} | '
      f'{_fmt(sum(seconds) / len(seconds) if seconds else None, ".2e")} | '
      + ' | '.join(_fmt(v, spec) for v in values)
      + ' |'
    )
  return '\n'.join(lines)


def speed_table(speed: dict) -> str:
  lines = [
    '### Sampling speed',
    '',
    f'Device {speed["device"]}, batch {speed["batch_size"]}, one process, '
    'compiled before timing (short calls: median of repeats after a '
    'warm-up call); '
    f'the {speed["student_num_steps"]}-step student takes '
    f'{speed["student_seconds"]:.4f} s per batch.',
    '',
    '| teacher steps | teacher NFE | teacher s/batch | measured ratio | '
    'ideal ratio (NFE) |',
    '| --- | --- | --- | --- | --- |',
  ]
  for row in speed['rows']:
    lines.append(
      f'| {row["teacher_num_steps"]} | '
      f'{registry.nfe("teacher", row["teacher_num_steps"])} | '
      f'{row["teacher_seconds"]:.3f} | {row["measured_ratio"]:.1f}× | '
      f'{row["ideal_ratio"]:.0f}× |'
    )
  return '\n'.join(lines)


def markdown(results: dict) -> str:
  """The whole report as markdown (what results.md holds)."""
  records = results['records']
  num_samples = max(r['num_samples'] for r in records)
  metric = results['metric']
  about = ', '.join(
    f'{k}: {v:.4f}' if isinstance(v, float) else f'{k}: {v}'
    for k, v in results['extractor'].items()
  )
  # results.json files written before captions were scored lack the key.
  conditions = results.get('conditions', 'classes cycled')
  parts = [
    f'## Evaluation of {results["workdir"]}',
    '',
    f'Device: {results["device"]}. {num_samples} samples per cell '
    f'({conditions}), scored against '
    f'{results["reference"]["num_examples"]} real images of the '
    f'{results["reference"]["split"]} split ({about}). NFE: network '
    'evaluations per sample (the CFG teacher makes 2 per step). s/sample: '
    'sampling wall time after compilation (for a latent model, decoding '
    'included), mean over w.',
    '',
    _metric_table(results, 'fd', f'{metric} (lower is better)', '.3f'),
  ]
  for key, (title, spec) in _SCORES.items():
    if any(r.get(key) is not None for r in records):
      parts += ['', _metric_table(results, key, title, spec)]
  if results.get('speed'):
    parts += ['', speed_table(results['speed'])]
  return '\n'.join(parts) + '\n'


def _plotted(records: list[dict]) -> tuple[str, str]:
  """(key, axis label) of the score plotted under the Fréchet distance."""
  for key, label in _PLOTTED:
    if any(r.get(key) is not None for r in records):
      return key, label
  raise ValueError(f'The records hold none of {[k for k, _ in _PLOTTED]}.')


def _series(records: list[dict]) -> dict[tuple, list[dict]]:
  out = {}
  for record in records:
    key = (record['model'], record['sampler'])
    if key in _SERIES:
      out.setdefault(key, []).append(record)
  return out


def plot_quality_vs_nfe(results: dict, path: epath.PathLike) -> None:
  """FD and IS (shapes: the all-correct rate) against NFE (log axis), one
  column per w."""
  records = results['records']
  ws = _ws(records)
  real = [r for r in records if r['model'] == 'real']
  fig = figure.Figure(figsize=(3.6 * len(ws), 6.4))
  axes = fig.subplots(2, len(ws), squeeze=False)
  for col, w in enumerate(ws):
    cells = [r for r in records if r['w'] == w]
    for row, (metric, label) in enumerate(
      (('fd', results['metric']), _plotted(records))
    ):
      ax = axes[row][col]
      for key, points in _series(cells).items():
        points = sorted(points, key=lambda r: r['nfe'])
        ax.plot(
          [p['nfe'] for p in points],
          [p[metric] for p in points],
          marker='o',
          label=_SERIES[key],
        )
      for r in real:
        ax.axhline(r[metric], color='gray', linestyle=':', label='real data')
      ax.set_xscale('log', base=2)
      ax.set_xlabel('NFE per sample')
      ax.set_ylabel(label)
      ax.set_title(f'w = {w:g}')
      if metric == 'fd':
        ax.set_yscale('log')
  axes[0][-1].legend(fontsize=7)
  fig.tight_layout()
  save_png(fig, path)


def plot_quality_vs_w(results: dict, path: epath.PathLike) -> None:
  """FD and IS (shapes: the all-correct rate) against w, one line per
  (model, sampler, steps).

  Each series has its own colour family, darker for more steps. Single-w
  models have one w each and appear in the NFE plot only.
  """
  records = [r for r in results['records'] if r['w'] is not None]
  score, score_label = _plotted(records)
  fig = figure.Figure(figsize=(12, 4.6))
  axes = fig.subplots(1, 2)
  for key, points in _series(records).items():
    if key not in _COLORMAPS:
      continue
    steps = sorted({p['num_steps'] for p in points})
    colormap = matplotlib.colormaps[_COLORMAPS[key]]
    for index, num_steps in enumerate(steps):
      cells = sorted(
        (p for p in points if p['num_steps'] == num_steps),
        key=lambda p: p['w'],
      )
      shade = 0.35 + 0.65 * (index + 1) / len(steps)
      for ax, metric in zip(axes, ('fd', score), strict=True):
        ax.plot(
          [c['w'] for c in cells],
          [c[metric] for c in cells],
          marker='.',
          color=colormap(shade),
          label=f'{_SERIES[key]}, {num_steps} steps',
        )
  axes[0].set_ylabel(results['metric'])
  axes[0].set_yscale('log')
  axes[1].set_ylabel(score_label)
  for ax in axes:
    ax.set_xlabel('guidance strength w')
  axes[0].legend(fontsize=6, ncol=2)
  fig.tight_layout()
  save_png(fig, path)


def save_png(fig: figure.Figure, path: epath.PathLike) -> None:
  with paths.resolve(path).open('wb') as f:
    fig.savefig(f, format='png', dpi=110)


def read(out_dir: epath.PathLike) -> dict:
  """The results dict that `write` saved in `out_dir`."""
  return json.loads((paths.resolve(out_dir) / _RESULTS_JSON).read_text())


def write(results: dict, out_dir: epath.PathLike) -> None:
  """results.json, results.md, quality_vs_nfe.png and quality_vs_w.png.

  Process 0 writes them; the other processes of a multi-host run hold the
  same results.
  """
  write_files(
    out_dir,
    {
      _RESULTS_JSON: json.dumps(results, indent=2),
      'results.md': markdown(results),
      'quality_vs_nfe.png': lambda path: plot_quality_vs_nfe(results, path),
      'quality_vs_w.png': lambda path: plot_quality_vs_w(results, path),
    },
  )


def write_files(
  out_dir: epath.PathLike, files: dict[str, str | Callable[[epath.Path], None]]
) -> None:
  """Writes each file into out_dir: text as it is, or by its writer (a
  plot). Process 0 only: the others of a multi-host run hold the same
  results."""
  if jax.process_index() > 0:
    return
  out_dir = paths.resolve(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  for name, content in files.items():
    if isinstance(content, str):
      (out_dir / name).write_text(content)
    else:
      content(out_dir / name)
