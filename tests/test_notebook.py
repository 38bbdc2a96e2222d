"""The notebooks in colabs/ run headless, top to bottom, at the tiny setting.

Each notebook's tiny setting trains exactly one of the session's chain
fixtures (the same training keys), so it starts from a copy of that
workdir: its training cell finds every stage finished, and the cells that
sample, plot and time run as they do for a user.
"""

import os
import shutil

import nbclient
import nbformat

from tests import conftest, helpers


def _run_tiny(name: str, workdir: str, tmp_path, monkeypatch) -> list[dict]:
  """Runs colabs/`name` on a copy of `workdir`; returns its cells' outputs."""
  path = os.path.join(helpers.REPO, 'colabs', name)
  shutil.copytree(workdir, tmp_path / 'workdir')
  monkeypatch.setenv('GDD_NOTEBOOK_TINY', '1')
  monkeypatch.setenv('GDD_NOTEBOOK_WORKDIR', str(tmp_path / 'workdir'))
  # One CPU device in the kernel, as a user's laptop has (the tests' 8 fake
  # devices would only slow its compiles down).
  monkeypatch.setenv('XLA_FLAGS', conftest.TEST_XLA_FLAGS)
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
    notebook,
    timeout=600,
    kernel_name='python3',
    resources={'metadata': {'path': os.path.dirname(path)}},
  )
  client.execute()  # Raises CellExecutionError if any cell fails.
  return [o for cell in notebook.cells for o in cell.get('outputs', [])]


def _text(outputs: list[dict]) -> str:
  return ''.join(o.get('text', '') for o in outputs)


def _num_images(outputs: list[dict]) -> int:
  return sum('image/png' in o.get('data', {}) for o in outputs)


def test_quickstart_notebook_runs(chain_workdir, tmp_path, monkeypatch):
  outputs = _run_tiny('quickstart.ipynb', chain_workdir, tmp_path, monkeypatch)
  text = _text(outputs)
  assert 'chain: ' in text
  assert 'distill/1steps: already finished' in text
  assert 'student 4 step(s) (4 NFE)' in text
  assert _num_images(outputs) == 2  # The student grid and the teacher grid.
  assert os.path.isdir(tmp_path / 'workdir' / 'distill' / '1steps' / 'params')


def test_text_to_image_notebook_runs(shapes_workdir, tmp_path, monkeypatch):
  outputs = _run_tiny(
    'text_to_image.ipynb', shapes_workdir, tmp_path, monkeypatch
  )
  text = _text(outputs)
  assert 'autoencoder: already finished' in text
  assert 'distill/1steps: already finished' in text
  samplers = 'teacher, 8 steps | student, 2 step(s) | student, 1 step(s)'
  assert f'left to right: {samplers}' in text
  assert 'teacher, 8 steps (16 NFE): ' in text
  for num_steps in (1, 2):
    assert f'student, {num_steps} step(s) ({num_steps} NFE): ' in text
  assert text.count('faster than the teacher (ideal') == 2
  assert _num_images(outputs) == 3  # A grid per w.


def test_editing_notebook_runs(
  chain_workdir, shapes_workdir, tmp_path, monkeypatch
):
  # The shapes chain is only read (its cells sample, never train).
  monkeypatch.setenv('GDD_NOTEBOOK_SHAPES_WORKDIR', shapes_workdir)
  outputs = _run_tiny('editing.ipynb', chain_workdir, tmp_path, monkeypatch)
  text = _text(outputs)
  assert 'distill/1steps: already finished' in text
  assert 'encoder finished: step counts [4, 2, 1]' in text
  for name in ('teacher', 'student'):
    assert f'{name}: largest change on the kept half 0' in text
  assert 'teacher: 8-step encoder, cycle PSNR' in text
  assert 'student: 4-step encoder, cycle PSNR' in text
  assert 'skipped' not in text
  # Edit, inpaint, translate and the shapes captions: a figure each.
  assert _num_images(outputs) == 4
