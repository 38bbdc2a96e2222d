"""launch/ scripts (dry runs, fake srun) and `gdd.distributed.initialize`."""

import logging
import os
import shlex
import socket
import subprocess
import sys
import time

import jax
import pytest
from absl import flags
from ml_collections import config_flags

from gdd import config_lib, distributed
from tests import helpers

_EXTRA_FLAGS = [
  '--config.data.data_dir=gs://b/tfds',
  '--config.plan.target=a b',
]


def _write_executable(path, text: str) -> None:
  path.write_text('#!/usr/bin/env bash\n' + text)
  path.chmod(0o755)


def _bash(script: str, *args: str, env: dict | None = None, **kwargs):
  """Runs launch/`script`; `env` adds to os.environ (None removes a key)."""
  env = {**os.environ, **(env or {})}
  return subprocess.run(
    ['bash', os.path.join(helpers.REPO, 'launch', script), *args],
    env={key: value for key, value in env.items() if value is not None},
    capture_output=True,
    text=True,
    timeout=60,
    **kwargs,
  )


def _option(argv: list[str], name: str) -> str:
  """The value of `--name=value` in argv (exactly one)."""
  (value,) = [a.split('=', 1)[1] for a in argv if a.startswith(f'--{name}=')]
  return value


def _tpu_dry_run() -> list[list[str]]:
  result = _bash(
    'tpu_pod.sh',
    '--dry_run',
    'my-tpu',
    'us-central2-b',
    'configs/imagenet64.py',
    'gs://b/w',
    *_EXTRA_FLAGS,
    check=True,
  )
  return [
    shlex.split(line)
    for line in result.stdout.splitlines()
    if line.startswith(('git ', 'gcloud ', 'rm '))
  ]


def test_tpu_pod_dry_run_copies_installs_starts_detached_and_streams():
  archive, scp, remove, install, start, stream = _tpu_dry_run()
  assert archive[:3] == ['git', '-C', helpers.REPO]
  tarball = archive[-2]
  assert archive[-1] == 'HEAD' and remove == ['rm', '-f', tarball]
  for command in (scp, install, start):
    assert '--worker=all' in command and '--zone=us-central2-b' in command
  assert scp[4:7] == ['scp', tarball, 'my-tpu:~/gdd.tar.gz']
  assert 'pip install -q -c constraints.txt -e .' in _option(install, 'command')
  subprocess.run(['bash', '-n', '-c', _option(install, 'command')], check=True)
  remote = shlex.split(_option(start, 'command'))
  python = remote.index('python')
  assert remote[python - 2 : python] == ['setsid', 'nohup']
  log = remote[remote.index('>') + 1]
  after_log = remote[remote.index('>') + 2 :]
  assert after_log[:4] == ['2>&1', '<', '/dev/null', '&']
  assert remote[python : remote.index('>')] == [
    'python',
    '-m',
    'gdd.main',
    '--config=configs/imagenet64.py',
    '--workdir=gs://b/w',
    '--config.distributed.initialize=True',
    *_EXTRA_FLAGS,
  ]
  assert '--worker=0' in stream
  assert shlex.split(_option(stream, 'command')) == [
    'tail',
    '-n',
    '+1',
    '-F',
    log,
  ]


def test_tpu_pod_start_command_detaches_and_records_the_pid(tmp_path):
  """The printed start command, run here with a fake `python`.

  The fake waits for a file that is only written once the start command has
  returned, then prints its pid, its session id and its arguments.
  """
  start = _tpu_dry_run()[4]
  (tmp_path / 'gdd').mkdir()
  (tmp_path / 'bin').mkdir()
  _write_executable(
    tmp_path / 'bin' / 'python',
    'while [[ ! -e ~/go ]]; do sleep 0.05; done\n'
    'echo "$$" $(ps -o sid= -p "$$"); printf "%s\\n" "$@"',
  )
  env = {'HOME': str(tmp_path), 'PATH': f'{tmp_path}/bin:{os.environ["PATH"]}'}
  subprocess.run(
    ['bash', '-c', _option(start, 'command')], env=env, check=True, timeout=10
  )
  (tmp_path / 'go').touch()
  (pid_file,) = (tmp_path / 'gdd_logs').glob('*.pid')
  log = pid_file.with_suffix('.log')
  deadline = time.monotonic() + 10
  while not (
    log.exists() and log.read_text().endswith(f'{_EXTRA_FLAGS[-1]}\n')
  ):
    assert time.monotonic() < deadline, 'the fake python did not finish'
    time.sleep(0.05)
  ids, *argv = log.read_text().splitlines()
  pid, session = ids.split()
  assert pid_file.read_text().strip() == pid == session  # setsid, no wrapper.
  assert argv[-2:] == _EXTRA_FLAGS


def test_tpu_pod_usage_names_stop_and_status():
  result = _bash('tpu_pod.sh')
  assert result.returncode == 2
  assert 'stop:' in result.stderr and 'status:' in result.stderr
  result = _bash('tpu_pod.sh', '--stop', 'name', 'zone', 'config', 'workdir')
  assert result.returncode == 2
  assert 'unknown option --stop' in result.stderr


def _slurm_env(tmp_path, **overrides) -> dict:
  """SLURM's variables for a 2-node job, and a fake scontrol on PATH."""
  (tmp_path / 'bin').mkdir(exist_ok=True)
  _write_executable(tmp_path / 'bin' / 'scontrol', 'printf "gpu7\\ngpu8\\n"')
  return {
    'PATH': f'{tmp_path}/bin:{os.environ["PATH"]}',
    'SLURM_JOB_NODELIST': 'gpu[7-8]',
    'SLURM_JOB_ID': '4100',
    'SLURM_NTASKS': '2',
    'SLURM_GPUS_ON_NODE': '4',
    'GDD_LOCAL_DEVICE_IDS': None,
    'GDD_DRY_RUN': None,
    **overrides,
  }


def _slurm_python_argv(local_device_ids: str) -> list[str]:
  return [
    'python',
    '-m',
    'gdd.main',
    '--config=configs/imagenet64.py',
    '--workdir=/shared/w',
    '--config.distributed.initialize=True',
    # 4100 % 4096 + 61440: the port JAX would pick for job 4100.
    '--config.distributed.coordinator_address=gpu7:61444',
    '--config.distributed.num_processes=2',
    f'--config.distributed.local_device_ids={local_device_ids}',
    *_EXTRA_FLAGS,
  ]


def test_slurm_dry_run_prints_one_task_per_node_with_all_gpus(tmp_path):
  env = _slurm_env(tmp_path, GDD_DRY_RUN='1')
  args = ('configs/imagenet64.py', '/shared/w', *_EXTRA_FLAGS)
  result = _bash('slurm.sbatch', *args, env=env, check=True)
  srun = shlex.split(result.stdout)
  assert srun[:3] == ['srun', '--ntasks-per-node=1', '--kill-on-bad-exit=1']
  assert srun[-len(_slurm_python_argv('')) :] == _slurm_python_argv('0,1,2,3')
  env['GDD_LOCAL_DEVICE_IDS'] = '0,1'
  result = _bash('slurm.sbatch', *args, env=env, check=True)
  assert shlex.split(result.stdout)[-len(_EXTRA_FLAGS) - 1] == (
    '--config.distributed.local_device_ids=0,1'
  )


def test_slurm_tasks_get_their_own_process_id(tmp_path):
  """Runs the script with fake srun (two tasks) and python (prints argv)."""
  env = _slurm_env(tmp_path)
  _write_executable(
    tmp_path / 'bin' / 'srun',
    'while [[ $1 == -* ]]; do shift; done\n'
    'for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i "$@"; done',
  )
  _write_executable(tmp_path / 'bin' / 'python', 'printf "%q " "$@"; echo')
  args = ('configs/imagenet64.py', '/shared/w', *_EXTRA_FLAGS)
  result = _bash('slurm.sbatch', *args, env=env, check=True)
  tasks = [shlex.split(line) for line in result.stdout.splitlines()]
  expected = _slurm_python_argv('0,1,2,3')[1:]
  assert tasks == [
    [*expected, f'--config.distributed.process_id={i}'] for i in (0, 1)
  ]


def test_slurm_without_gpus_says_how_to_request_them(tmp_path):
  env = _slurm_env(tmp_path, GDD_DRY_RUN='1', SLURM_GPUS_ON_NODE=None)
  result = _bash('slurm.sbatch', 'config', 'workdir', env=env)
  assert result.returncode != 0
  assert '--gpus-per-node' in result.stderr
  assert _bash('slurm.sbatch').returncode == 2


def _parse_config_flags(*overrides: str):
  """The config as gdd.main's --config flag parses `overrides`."""
  path = os.path.join(helpers.REPO, 'configs', 'digits.py')
  argv = ['gdd', f'--config={path}', *overrides]
  flag_values = flags.FlagValues()
  # sys_argv: the overrides to define flags for (default: sys.argv).
  config = config_flags.DEFINE_config_file(
    'config', None, flag_values=flag_values, lock_config=True, sys_argv=argv
  )
  flag_values(argv)
  return config.value


@pytest.mark.parametrize(
  ('value', 'ids'),
  [
    ('0,1,2,3', (0, 1, 2, 3)),
    ('(0,1,2,3)', (0, 1, 2, 3)),
    ('[0,1,2,3]', (0, 1, 2, 3)),
    ('0', (0,)),
  ],
)
def test_local_device_ids_override_parses_as_documented(value, ids):
  config = _parse_config_flags(f'--config.distributed.local_device_ids={value}')
  assert config.distributed.local_device_ids == ids
  config_lib.validate(config)


def test_repeated_local_device_ids_flags_append():
  """Why launch/slurm.sbatch takes GDD_LOCAL_DEVICE_IDS, not a second flag."""
  config = _parse_config_flags(
    '--config.distributed.local_device_ids=0,1',
    '--config.distributed.local_device_ids=2',
  )
  assert config.distributed.local_device_ids == (0, 1, 2)


@pytest.fixture
def jax_initialize_calls(monkeypatch):
  """Records jax.distributed.initialize's keyword arguments instead."""
  calls = []
  monkeypatch.setattr(
    jax.distributed, 'initialize', lambda **kwargs: calls.append(kwargs)
  )
  return calls


def _distributed_config(**values):
  config = config_lib.base_config().distributed
  config.update(values)
  return config


def test_initialize_false_does_nothing(jax_initialize_calls):
  distributed.initialize(_distributed_config(coordinator_address='x:1'))
  assert jax_initialize_calls == []


def test_initialize_passes_no_keys_when_all_are_auto_detected(
  jax_initialize_calls,
):
  distributed.initialize(_distributed_config(initialize=True))
  assert jax_initialize_calls == [{}]


def test_initialize_passes_exactly_the_set_keys(jax_initialize_calls, caplog):
  caplog.set_level(logging.INFO, logger='absl')
  # Process 1 waits for the coordinator's port, so one is listening.
  with socket.create_server(('localhost', 0)) as coordinator:
    address = f'localhost:{coordinator.getsockname()[1]}'
    keys = dict(
      coordinator_address=address,
      num_processes=2,
      process_id=1,
      local_device_ids=(0, 1),
    )
    distributed.initialize(_distributed_config(initialize=True, **keys))
  distributed.initialize(_distributed_config(initialize=True, num_processes=2))
  assert jax_initialize_calls == [keys, {'num_processes': 2}]
  connected = f'connected: {jax.local_device_count()} local devices'
  assert connected in caplog.text


def test_unreachable_coordinator_is_a_user_error(
  jax_initialize_calls, monkeypatch
):
  monkeypatch.setattr(distributed, '_TIMEOUT_S', 0.3)
  with socket.create_server(('localhost', 0)) as closed:
    address = f'localhost:{closed.getsockname()[1]}'
  config = _distributed_config(
    initialize=True, coordinator_address=address, process_id=1
  )
  with helpers.raises_user_error(RuntimeError, rf"'{address}' did not accept"):
    distributed.initialize(config)
  config.coordinator_address = 'no-such-host.invalid:1234'
  with helpers.raises_user_error(RuntimeError, 'does not resolve'):
    distributed.initialize(config)
  assert jax_initialize_calls == []


def test_no_cluster_to_auto_detect_from_is_a_user_error():
  """Real jax, in a fresh process: its backends must not be started yet."""
  code = (
    'from gdd import config_lib, distributed\n'
    'config = config_lib.base_config().distributed\n'
    'config.initialize = True\n'
    'try:\n'
    '  distributed.initialize(config)\n'
    'except distributed.DistributedInitError as error:\n'
    '  print(error)\n'
  )
  env = {
    key: value
    for key, value in os.environ.items()
    if not key.startswith(('SLURM_', 'OMPI_', 'JAX_COORDINATOR'))
  }
  result = subprocess.run(
    [sys.executable, '-c', code],
    cwd=helpers.REPO,
    env={**env, 'JAX_PLATFORMS': 'cpu'},
    capture_output=True,
    text=True,
    timeout=120,
    check=True,
  )
  assert 'coordinator_address should be defined' in result.stdout
  assert 'distributed.num_processes' in result.stdout
