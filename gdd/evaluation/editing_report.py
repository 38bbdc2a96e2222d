"""Editing evaluation output: editing.json, markdown tables and a plot.

Reads only the results dict `editing.run` builds, so the report can be
re-made from a saved editing.json (`write(read(out_dir), out_dir)`).
"""

import json

from etils import epath
from matplotlib import figure

from gdd import paths
from gdd.evaluation import report

_RESULTS_JSON = 'editing.json'
_MODEL_NAMES = {'teacher': 'CFG teacher', 'distill': 'distilled student'}
# config.evaluate.editing.off_grid, in words (results before it: 'floor').
_OFF_GRID = {
  'step': 'one DDIM step to the grid point below',
  'floor': 'from the grid point below',
}


def _model(record: dict) -> str:
  return f'{_MODEL_NAMES[record["model"]]}, {_steps(record["num_steps"])}'


def _steps(num_steps: int) -> str:
  return f'{num_steps} step' + ('' if num_steps == 1 else 's')


def format_record(record: dict) -> str:
  """One line for the log."""
  scores = ' '.join(
    f'{key}={record[key]:.4g}'
    for key in (
      'accuracy',
      'psnr',
      'feature_distance',
      'fd',
      'known_error',
      'cycle_psnr',
    )
    if record.get(key) is not None
  )
  return f'{record["task"]} {_model(record)} t={record["t_start"]:g}: {scores}'


def _table(
  header: list[str], rows: list[list[str]], records: list[dict]
) -> str:
  """A markdown table; with a last column of each attribute's accuracy
  when the records have them (shapes: '<attribute>_accuracy')."""
  suffix = '_accuracy'
  names = [k.removesuffix(suffix) for k in records[0] if k.endswith(suffix)]
  if names:
    header = [*header, f'{" / ".join(names)} accuracy']
    rows = [
      [*row, ' / '.join(_fraction(r[f'{name}_accuracy']) for name in names)]
      for row, r in zip(rows, records, strict=True)
    ]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
  return '\n'.join(lines + ['| ' + ' | '.join(row) + ' |' for row in rows])


def _fraction(value: float | None) -> str:
  return '–' if value is None else f'{value:.2f}'


def _edit_table(records: list[dict]) -> str:
  return _table(
    [
      'model',
      't_start (noised to → first grid time)',
      'target accuracy',
      'PSNR to input (dB)',
      'feature distance to input',
    ],
    [
      [
        _model(r),
        _start(r),
        f'{r["accuracy"]:.3f}',
        f'{r["psnr"]:.2f}',
        f'{r["feature_distance"]:.3f}',
      ]
      for r in records
    ],
    records,
  )


def _start(record: dict) -> str:
  """'0.6 (0.6 → 0.5)': asked, noised to, and where a lead-in step went."""
  used = record['t_start_used']
  grid = record.get('t_grid', used)
  lead_in = f' → {grid:g}' if grid < used else ''
  return f'{record["t_start"]:g} ({used:g}{lead_in})'


def _inpaint_table(records: list[dict], metric: str) -> str:
  return _table(
    [
      'model',
      'inpainting',
      'known-region error (mean / max)',
      metric,
      'fill accuracy',
    ],
    [
      [
        _model(r),
        r['inpainting'],
        f'{r["known_error"]:.4f} / {r["known_max_error"]:.4f}',
        f'{r["fd"]:.3f}',
        f'{r["accuracy"]:.3f}',
      ]
      for r in records
    ],
    records,
  )


def _translate_table(records: list[dict]) -> str:
  return _table(
    ['encoder', 'decoder', 'target accuracy', 'cycle PSNR (dB)'],
    [
      [
        f'{r["encoder"]}, {_steps(r["encoder_num_steps"])}',
        _model(r),
        f'{r["accuracy"]:.3f}',
        f'{r["cycle_psnr"]:.2f}',
      ]
      for r in records
    ],
    records,
  )


def markdown(results: dict) -> str:
  """The tables of the tasks scored, with the facts they were measured
  under."""
  c, records = results['config'], results['records']
  sections = {
    'edit': (
      '## Editing (SDEdit; a distilled round started off its grid: '
      f'{_OFF_GRID[c.get("off_grid", "floor")]})',
      _edit_table,
    ),
    'inpaint': (
      f"## Inpainting (mask: {c['mask']}, filled under the input's own "
      'condition)',
      lambda rows: _inpaint_table(rows, results['metric']),
    ),
    'translate': (
      '## Translation (encode under the source at w = 0; cycle: decode '
      'under the source at w = 0)',
      _translate_table,
    ),
  }
  parts = [
    f'# Editing evaluation: {results["workdir"]}',
    f'{results["num_inputs"]} held-out inputs; w = {c["w"]:g} toward the '
    'targets; accuracy: the evaluator says the output shows what was asked '
    '(on shapes: every attribute).',
  ]
  for task, (heading, table) in sections.items():
    rows = [r for r in records if r['task'] == task]
    if rows:
      parts += [heading, table(rows)]
  return '\n\n'.join(parts) + '\n'


def plot_tradeoff(results: dict, path: epath.PathLike) -> None:
  """Editing: target accuracy against PSNR to the input, one line per
  model over t_start (labelled at each point)."""
  edits = [r for r in results['records'] if r['task'] == 'edit']
  fig = figure.Figure(figsize=(5.6, 4.4))
  ax = fig.subplots()
  for name in dict.fromkeys(_model(r) for r in edits):
    points = sorted(
      (r for r in edits if _model(r) == name), key=lambda r: r['t_start']
    )
    ax.plot(
      [p['psnr'] for p in points],
      [p['accuracy'] for p in points],
      marker='o',
      label=name,
    )
    for p in points:
      ax.annotate(f'{p["t_start"]:g}', (p['psnr'], p['accuracy']), fontsize=7)
  ax.set_xlabel('PSNR to the input (dB): faithfulness')
  ax.set_ylabel('target accuracy')
  ax.set_title('SDEdit over t_start')
  ax.legend(fontsize=7)
  fig.tight_layout()
  report.save_png(fig, path)


def read(out_dir: epath.PathLike) -> dict:
  """The results dict that `write` saved in `out_dir`."""
  return json.loads((paths.resolve(out_dir) / _RESULTS_JSON).read_text())


def write(results: dict, out_dir: epath.PathLike) -> None:
  """editing.json, editing.md and, with edit rows, editing_tradeoff.png
  (process 0)."""
  files = {
    _RESULTS_JSON: json.dumps(results, indent=2),
    'editing.md': markdown(results),
  }
  if any(r['task'] == 'edit' for r in results['records']):
    files['editing_tradeoff.png'] = lambda path: plot_tradeoff(results, path)
  report.write_files(out_dir, files)
