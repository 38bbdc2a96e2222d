"""Test set-up: 8 fake CPU devices, so sharded code runs as on a pod slice.

The flag must be set before JAX initialises its backends, hence here.
"""

import fcntl
import os

# XLA:CPU's LLVM optimisations are most of the compile time of the tests'
# tiny programs, and compiling is most of the suite's time; at level 0 the
# suite runs about twice as fast, and XLA:CPU's older elemental emitters
# (fusion emitters off) compile its programs about 1.8x faster again. One
# Eigen thread per process suits two xdist workers on two cores. The
# programs compute the same values up to float rounding; gdd itself runs
# with XLA's defaults. Subprocesses started by tests (CLI, multi-host,
# notebooks) pass these flags on.
TEST_XLA_FLAGS = (
  '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
  ' --xla_cpu_multi_thread_eigen=false'
)
os.environ['XLA_FLAGS'] = (
  f'{os.environ.get("XLA_FLAGS", "")} {TEST_XLA_FLAGS}'
  ' --xla_force_host_platform_device_count=8'
)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402  (after the flags above)
import pytest  # noqa: E402

# Stages rebuilt from the same config compile to the same programs; a
# persistent cache lets the tests reuse them instead of recompiling.
jax.config.update(
  'jax_compilation_cache_dir',
  os.path.join(os.path.dirname(__file__), '..', '.pytest_cache', 'jax'),
)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


# The session's trained chains (fixtures below), each with the modules that
# test it: all of a module's tests run on its chain's worker (module-scoped
# fixtures are built once), and so does any other test that uses the chain.
_CHAIN_GROUPS = {
  'chain_workdir': ('test_chain', 'test_evaluation'),
  'shapes_workdir': ('test_latent',),
}


# The longest groups (minutes of one worker each in a CI run), started first
# so that the run does not end on one of them while the other worker idles.
# pytest-xdist would otherwise order groups by their number of tests
# (`--no-loadscope-reorder` in pyproject.toml keeps this order).
_LONG_GROUPS = (
  'shapes_workdir',
  'chain_workdir',
  'test_multihost',
  'test_sd_distill',
  'test_shapes_evaluator',
  'test_imagenet256_latent',
  'test_faults',
  'test_end_to_end',
)


def _group(item) -> str:
  """The pytest-xdist group of a test: its chain's, else its module's."""
  module = item.module.__name__.rsplit('.', 1)[-1]
  for fixture, modules in _CHAIN_GROUPS.items():
    if module in modules or fixture in item.fixturenames:
      return fixture
  return module


# First: pytest-xdist reads the groups in its own collection hook, and a
# group marked after it has run is silently ignored (each module's fixtures
# were then built on both workers, the chain trained twice).
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
  """Under pytest-xdist (`-n 2 --dist loadgroup`), one worker per group.

  Module-scoped fixtures are then built once, and the tests that use one of
  the session's trained chains share one worker, so it is trained once too.
  The long groups go first (`_LONG_GROUPS`).
  """
  groups = {item: _group(item) for item in items}
  for item, group in groups.items():
    item.add_marker(pytest.mark.xdist_group(group))
  items.sort(key=lambda item: _rank(groups[item]))


def _rank(group: str) -> int:
  """Where a group starts: the long ones first, in `_LONG_GROUPS` order."""
  if group in _LONG_GROUPS:
    return _LONG_GROUPS.index(group)
  return len(_LONG_GROUPS)


@pytest.fixture(scope='session')
def chain_workdir(tmp_path_factory):
  """teacher → guided → 4 → 2 → 1 steps on digits, 2 updates per stage.

  Shared by the chain, evaluation and quickstart notebook tests (the
  notebook's tiny setting trains exactly this); tests may add to it but
  must not change what is there.
  """
  # Imported here: gdd must load after the XLA flags above.
  from gdd import pipeline
  from tests import helpers

  workdir = str(tmp_path_factory.mktemp('chain'))
  pipeline.run(helpers.quick_config(num_train_steps=2), workdir, 'all')
  return workdir


@pytest.fixture(scope='session')
def shapes_workdir(tmp_path_factory, worker_id):
  """autoencoder → teacher → guided → 2 → 1 steps on 16×16 `shapes`
  (`helpers.quick_latent_config`, 4 updates per stage).

  Shared by the latent chain's tests, the text-to-image and editing notebook
  tests (their tiny settings train exactly this) and the sampling-speed
  benchmark's; tests may add to it but must not change what is there. Built
  once per run: under pytest-xdist in the run's shared temp folder, by the
  first worker that needs it while a file lock makes any other wait (the
  editing notebook's test runs on the digits chain's worker).
  """
  from gdd import pipeline
  from tests import helpers

  root = tmp_path_factory.getbasetemp()
  if worker_id != 'master':
    root = root.parent  # Shared by the workers of this run.
  workdir = root / 'shapes_chain'
  with (root / 'shapes_chain.lock').open('w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes.
    built = root / 'shapes_chain.built'
    if not built.exists():
      pipeline.run(helpers.quick_latent_config(), str(workdir), 'all')
      built.touch()
  return str(workdir)
