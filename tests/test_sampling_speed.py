"""benchmarks/sampling_speed.py on a text-to-image workdir: its tables.

Structure only (rows, columns, finite positive times), never the times
themselves: they belong to the machine.
"""

import itertools
import math
import os
import subprocess
import sys

from tests import conftest, helpers


def _table(stdout: str, heading: str) -> tuple[list[str], list[list[str]]]:
  """(header, body rows) of the first markdown table after `heading`."""
  lines = stdout.split(heading, 1)[1].splitlines()
  table = itertools.takewhile(
    lambda line: line.startswith('|'),
    itertools.dropwhile(lambda line: not line.startswith('|'), lines),
  )
  header, _, *body = [
    [cell.strip() for cell in line.strip('|').split('|')] for line in table
  ]
  return header, body


def test_a_text_workdirs_samplers_are_split_into_their_parts(shapes_workdir):
  result = subprocess.run(
    [
      sys.executable,
      os.path.join('benchmarks', 'sampling_speed.py'),
      '--config=configs/shapes.py:quick',
      f'--workdir={shapes_workdir}',
      '--config.evaluate.speed_batch_size=3',
      '--config.evaluate.speed_teacher_num_steps=(2,)',
      '--config.evaluate.speed_student_num_steps=1',
      '--min_seconds=0',  # One timed call each: structure, not speed.
    ],
    cwd=helpers.REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(
      os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=conftest.TEST_XLA_FLAGS
    ),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith('device: cpu:')
  _, speed = _table(result.stdout, '### Sampling speed')
  assert [row[:2] for row in speed] == [['2', '4']]  # Teacher steps, NFE.
  header, rows = _table(result.stdout, 'spends its time')
  assert header == [
    'model',
    'steps',
    'NFE',
    'total',
    'text encoder',
    'U-Net steps',
    'decoder',
    'rest',
    'rest in encoder passes',
  ]
  assert [row[:3] for row in rows] == [
    ['CFG teacher', '2', '4'],
    ['distilled student', '2', '2'],
    ['distilled student', '1', '1'],
  ]
  for row in rows:
    assert all(float(ms) > 0 for ms in row[3:7]), row
    assert all(math.isfinite(float(value)) for value in row[7:]), row
  assert 'batch 3,' in result.stdout
