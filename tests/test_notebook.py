"""colabs/quickstart.ipynb runs headless, top to bottom, at the tiny setting.

Its tiny setting trains exactly the session's chain fixture (the same
training keys), so the notebook starts from a copy of that workdir: its
training cell finds every stage finished, and the cells that sample, plot
and time run as they do for a user.
"""

import os
import shutil

import nbclient
import nbformat

from tests import conftest, helpers

NOTEBOOK = os.path.join(helpers.REPO, 'colabs', 'quickstart.ipynb')


def test_quickstart_notebook_runs(chain_workdir, tmp_path, monkeypatch):
  shutil.copytree(chain_workdir, tmp_path / 'workdir')
  monkeypatch.setenv('GDD_NOTEBOOK_TINY', '1')
  monkeypatch.setenv('GDD_NOTEBOOK_WORKDIR', str(tmp_path / 'workdir'))
  # One CPU device in the kernel, as a user's laptop has (the tests' 8 fake
  # devices would only slow its compiles down).
  monkeypatch.setenv('XLA_FLAGS', conftest.TEST_XLA_FLAGS)
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
    notebook,
    timeout=600,
    kernel_name='python3',
    resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}},
  )
  client.execute()  # Raises CellExecutionError if any cell fails.
  outputs = [o for cell in notebook.cells for o in cell.get('outputs', [])]
  text = ''.join(o.get('text', '') for o in outputs)
  assert 'chain: ' in text
  assert 'distill/1steps: already finished' in text
  assert 'student 4 step(s) (4 NFE)' in text
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) == 2  # The student grid and the teacher grid.
  assert os.path.isdir(tmp_path / 'workdir' / 'distill' / '1steps' / 'params')
