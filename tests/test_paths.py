"""gs:// workdirs: every file gdd writes must reach the store, none the disk.

`os.path.abspath('gs://b/x')` is `<cwd>/gs:/b/x`, so a URL that slips into
`os.path` quietly becomes a local folder. Here gs:// is served from memory:
with EPATH_USE_TF=0 (as on a machine without TensorFlow) epath hands gs://
to its fsspec backend, which the `gcs` fixture points at an in-memory
filesystem. Each such test runs in an empty working directory and fails if
anything appears there.

Orbax cannot use that stand-in: it writes arrays through TensorStore's own
GCS driver and asks google-cloud-storage about the bucket, both over the
network. `test_orbax_round_trip_on_a_real_store` runs against a real bucket
when GDD_TEST_WORKDIR_URL names one; offline, the tests check that Orbax is
handed the URL unchanged.
"""

import json
import os
import uuid

import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from etils.epath import backend, gpath
from fsspec.implementations import memory
from PIL import Image

from gdd import config_lib, images, paths, pipeline, sample, workdir_lib
from gdd.evaluation import fid, report
from gdd.train import checkpointing, lock
from tests import helpers

RUN = 'gs://bucket/run'


class _InMemoryGcs(memory.MemoryFileSystem):
  """gs://bucket/key objects in memory; folders are key prefixes."""

  protocol = ('gs', 'gcs')
  root_marker = ''
  store = {}
  pseudo_dirs = ['']

  @classmethod
  def _strip_protocol(cls, path):
    return super()._strip_protocol(os.fspath(path).removeprefix('gs://'))


@pytest.fixture
def gcs(monkeypatch, tmp_path):
  """gs:// in memory, in an empty working directory that must stay empty."""
  monkeypatch.setenv('EPATH_USE_TF', '0')
  gpath._is_tf_installed.cache_clear()  # epath caches whether to use TF.
  in_memory = _InMemoryGcs()
  monkeypatch.setattr(backend.fsspec_backend, 'fs', lambda path: in_memory)
  monkeypatch.chdir(tmp_path)
  _InMemoryGcs.store.clear()
  _InMemoryGcs.pseudo_dirs[:] = ['']
  yield
  monkeypatch.undo()
  gpath._is_tf_installed.cache_clear()
  assert list(tmp_path.iterdir()) == [], 'a gs:// path was written locally'


def _stored(url: str) -> bytes:
  return _InMemoryGcs.store[_InMemoryGcs._strip_protocol(url)].getvalue()


def test_user_paths_stay_urls_or_become_absolute(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(paths.resolve('gs://b/x')) == 'gs://b/x'
  assert os.fspath(paths.resolve('gs://b/x/') / 'y') == 'gs://b/x/y'
  assert paths.resolve('run') == epath.Path(tmp_path / 'run')
  assert paths.resolve(paths.resolve('gs://b/x')) == paths.resolve('gs://b/x')
  assert not paths.is_local(paths.resolve('gs://b/x'))
  assert paths.is_local(paths.resolve('run'))
  for url in ('file:///tmp/run', 'memory://run'):
    with pytest.raises(paths.UnsupportedPathError, match='gs://'):
      paths.resolve(url)


def test_stage_config_is_recorded_and_checked_on_gcs(gcs):
  config = config_lib.base_config()
  stage_dir = f'{RUN}/teacher'
  pipeline.record_stage_config(config, stage_dir, 'teacher', {'w': 1.0})
  stored = json.loads(_stored(f'{stage_dir}/config.json'))
  assert stored == json.loads(config.to_json())
  assert json.loads(_stored(f'{stage_dir}/stage.json')) == {'w': 1.0}
  assert sample.load_stage_config(RUN, 'teacher').to_dict() == stored
  changed = config_lib.base_config()
  changed.model.ch += 1
  with pytest.raises(pipeline.ConfigMismatchError, match='config.model.ch'):
    pipeline.record_stage_config(changed, stage_dir, 'teacher')


def test_the_stage_lock_on_gcs_names_its_holder_and_goes_on_release(gcs):
  stage_dir = f'{RUN}/teacher'
  lock_file = workdir_lib.lock_file(stage_dir)
  with lock.hold(stage_dir):
    assert json.loads(lock_file.read_text())['pid'] == os.getpid()
    refused = pytest.raises(lock.LockHeldError, match=f'pid {os.getpid()} on')
    with refused as error, lock.hold(stage_dir):
      pass
    assert f'delete {lock_file}' in str(error.value)
  assert not lock_file.exists()
  with lock.hold(stage_dir):
    pass


def test_a_dead_runs_lock_on_gcs_holds_until_deleted(gcs):
  stage_dir = f'{RUN}/teacher'
  lock_file = workdir_lib.lock_file(stage_dir)
  dead = {'host': 'lost-host', 'pid': 12, 'started': 'then', 'command': 'x'}
  lock_file.write_text(json.dumps(dead))
  refused = pytest.raises(lock.LockHeldError, match='pid 12 on host lost-host')
  with refused, lock.hold(stage_dir):
    pass
  assert json.loads(lock_file.read_text()) == dead  # Not taken over.
  lock_file.unlink()
  with lock.hold(stage_dir):
    pass


def test_move_aside_on_gcs_keeps_the_files(gcs):
  step = epath.Path(f'{RUN}/teacher/checkpoints/8')
  step.mkdir(parents=True)
  (step / 'data').write_bytes(b'\x01\x02')
  moved = checkpointing.move_aside(step, f'{RUN}/teacher/unreadable')
  assert os.fspath(moved).startswith(f'{RUN}/teacher/unreadable/checkpoints_8_')
  assert (moved / 'data').read_bytes() == b'\x01\x02'
  assert not (step / 'data').exists()


def test_finished_rounds_are_listed_on_gcs(gcs):
  for folder in ('distill/4steps/params', 'distill/2steps/checkpoints'):
    epath.Path(f'{RUN}/{folder}/x').write_bytes(b'')
  assert workdir_lib.finished_rounds(RUN) == [4]
  assert workdir_lib.finished_rounds(f'{RUN}/nothing') == []


def test_evaluation_files_and_images_go_to_gcs(gcs):
  mu, sigma = np.arange(3.0), np.eye(3)
  fid.save_stats(f'{RUN}/eval/reference.npz', mu, sigma)
  loaded = fid.load_stats(f'{RUN}/eval/reference.npz')
  np.testing.assert_array_equal(loaded[0], mu)
  np.testing.assert_array_equal(loaded[1], sigma)
  image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
  images.save_png(f'{RUN}/samples/grid.png', image)
  with epath.Path(f'{RUN}/samples/grid.png').open('rb') as f:
    np.testing.assert_array_equal(np.asarray(Image.open(f)), image)
  report.write(_tiny_results(), f'{RUN}/eval')
  assert json.loads(_stored(f'{RUN}/eval/results.json')) == _tiny_results()
  assert '| teacher | ddim | 8 |' in _stored(f'{RUN}/eval/results.md').decode()
  for plot in ('quality_vs_nfe.png', 'quality_vs_w.png'):
    assert _stored(f'{RUN}/eval/{plot}').startswith(b'\x89PNG')


def _tiny_results() -> dict:
  """Results of one teacher row at two w, as `evaluate.run` builds them."""
  records = [
    {
      'model': 'teacher',
      'sampler': 'ddim',
      'num_steps': 8,
      'trained_w': None,
      'nfe': 16,
      'w': w,
      'num_samples': 10,
      'seconds_per_sample': 0.01,
      'compile_seconds': 1.0,
      'fd': 5.0 - w,
      'is': 2.0,
      'is_std': 0.1,
      'accuracy': 0.5,
    }
    for w in (0.0, 1.0)
  ]
  return {
    'workdir': RUN,
    'device': 'cpu',
    'metric': 'FD-digits',
    'extractor': {},
    'reference': {'split': 'test', 'num_examples': 10},
    'records': records,
    'speed': None,
  }


def test_a_config_file_loads_from_gcs(gcs):
  local = os.path.join(helpers.REPO, 'configs', 'digits.py')
  with open(local) as f:
    epath.Path(f'{RUN}/digits.py').write_text(f.read())
  loaded = config_lib.load_file(f'{RUN}/digits.py:quick')
  assert loaded == config_lib.load_file(f'{local}:quick')


def test_orbax_is_handed_the_url_unchanged(gcs, monkeypatch):
  handed = []

  def record_directory(directory, **unused_options):
    handed.append(directory)

  monkeypatch.setattr(checkpointing.ocp, 'CheckpointManager', record_directory)
  checkpointing.Checkpointer(f'{RUN}/teacher', max_to_keep=1)
  assert handed == [epath.Path(f'{RUN}/teacher/checkpoints')]
  with pytest.raises(checkpointing.MissingExportError, match=f'{RUN}/guided'):
    checkpointing.load_params(workdir_lib.params_dir(f'{RUN}/guided'))


@pytest.mark.skipif(
  not os.environ.get('GDD_TEST_WORKDIR_URL'),
  reason='Orbax on gs:// needs a real bucket (TensorStore and '
  'google-cloud-storage go over the network); set '
  'GDD_TEST_WORKDIR_URL=gs://BUCKET/PREFIX to run it',
)
def test_orbax_round_trip_on_a_real_store():
  run = paths.resolve(os.environ['GDD_TEST_WORKDIR_URL']) / uuid.uuid4().hex
  state = {'w': jnp.arange(4.0)}
  try:
    ckpt = checkpointing.Checkpointer(run, max_to_keep=1)
    ckpt.save(3, state)
    ckpt.wait_until_finished()
    restored = ckpt.restore_latest(state)
    ckpt.close()
    np.testing.assert_array_equal(restored['w'], state['w'])
    checkpointing.export_params(run / 'params', state)
    exported = checkpointing.load_params(run / 'params', state)
    np.testing.assert_array_equal(exported['w'], state['w'])
  finally:
    run.rmtree(missing_ok=True)
