"""The notebooks in colabs/ run headless, top to bottom, at the tiny setting.

Each starts from a copy of the session's chain fixture its tiny setting
trains (`helpers.run_tiny_notebook`); colabs/stable_diffusion.ipynb runs in
tests/test_sd_distill.py, on that module's tiny SD chain.
"""

import os

from tests import helpers


def test_quickstart_notebook_runs(chain_workdir, tmp_path, monkeypatch):
  outputs = helpers.run_tiny_notebook(
    'quickstart.ipynb', chain_workdir, tmp_path, monkeypatch
  )
  text = helpers.notebook_text(outputs)
  assert 'chain: ' in text
  assert 'distill/1steps: already finished' in text
  assert 'student 4 step(s) (4 NFE)' in text
  assert (
    helpers.notebook_images(outputs) == 2
  )  # The student grid and the teacher grid.
  assert os.path.isdir(tmp_path / 'workdir' / 'distill' / '1steps' / 'params')


def test_text_to_image_notebook_runs(shapes_workdir, tmp_path, monkeypatch):
  outputs = helpers.run_tiny_notebook(
    'text_to_image.ipynb', shapes_workdir, tmp_path, monkeypatch
  )
  text = helpers.notebook_text(outputs)
  assert 'autoencoder: already finished' in text
  assert 'distill/1steps: already finished' in text
  samplers = 'teacher, 8 steps | student, 2 step(s) | student, 1 step(s)'
  assert f'left to right: {samplers}' in text
  assert 'teacher, 8 steps (16 NFE): ' in text
  for num_steps in (1, 2):
    assert f'student, {num_steps} step(s) ({num_steps} NFE): ' in text
  assert text.count('faster than the teacher (ideal') == 2
  assert helpers.notebook_images(outputs) == 3  # A grid per w.


def test_editing_notebook_runs(
  chain_workdir, shapes_workdir, tmp_path, monkeypatch
):
  # The shapes chain is only read (its cells sample, never train).
  monkeypatch.setenv('GDD_NOTEBOOK_SHAPES_WORKDIR', shapes_workdir)
  outputs = helpers.run_tiny_notebook(
    'editing.ipynb', chain_workdir, tmp_path, monkeypatch
  )
  text = helpers.notebook_text(outputs)
  assert 'distill/1steps: already finished' in text
  assert 'encoder finished: step counts [4, 2, 1]' in text
  for name in ('teacher', 'student'):
    assert f'{name}: largest change on the kept half 0' in text
  assert 'teacher: 8-step encoder, cycle PSNR' in text
  assert 'student: 4-step encoder, cycle PSNR' in text
  assert 'skipped' not in text
  # Edit, inpaint, translate and the shapes captions: a figure each.
  assert helpers.notebook_images(outputs) == 4
