"""The stage chain behind `gdd.main`: what runs for each --mode.

Each stage lives in its workdir folder with the config it was trained with
(`config.json`); re-running resumes an unfinished stage from its latest
checkpoint and skips a finished one. A changed config that would silently
mix two trainings is refused.
"""

import json
import os

import jax
import ml_collections
from absl import logging

from gdd import config_lib, data, sample
from gdd.stages import teacher
from gdd.train import loop

MODES = ('all', 'teacher', 'sample')
# Keys that change how a stage trains; other keys (logging cadence, eval
# grids, sampling) may change between a run and its resumption.
_IGNORED_TRAIN_KEYS = (
  'log_every',
  'eval_every',
  'checkpoint_every',
  'max_checkpoints_to_keep',
)


def _training_keys(config: dict, stage: str) -> dict:
  """The flattened config entries that define how `stage` is trained."""
  relevant = {
    'seed': config['seed'],
    'data': config['data'],
    'model': config['model'],
    'diffusion': config['diffusion'],
    stage: {
      k: v for k, v in config[stage].items() if k not in _IGNORED_TRAIN_KEYS
    },
  }
  flat = {}

  def flatten(prefix, value):
    if isinstance(value, dict):
      for k, v in value.items():
        flatten(f'{prefix}.{k}' if prefix else k, v)
    else:
      flat[prefix] = list(value) if isinstance(value, tuple) else value

  flatten('', relevant)
  return flat


class ConfigMismatchError(ValueError):
  """The workdir holds a stage trained with a different config."""


def record_stage_config(
  config: ml_collections.ConfigDict, stage_dir: str, stage: str
) -> None:
  """Writes `config.json`, or checks the config against the one there."""
  path = os.path.join(stage_dir, 'config.json')
  current = json.loads(config.to_json())
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    old, new = _training_keys(stored, stage), _training_keys(current, stage)
    diffs = [
      f'config.{k}: {old.get(k)!r} in the workdir, {new.get(k)!r} now'
      for k in sorted(set(old) | set(new))
      if old.get(k) != new.get(k)
    ]
    if diffs:
      raise ConfigMismatchError(
        f'The {stage!r} stage in {stage_dir} was trained with another '
        'config:\n  ' + '\n  '.join(diffs) + '\nUse a new --workdir, or '
        'restore those values to resume.'
      )
    return
  if jax.process_index() == 0:
    os.makedirs(stage_dir, exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      f.write(config.to_json(indent=2))
    os.replace(tmp, path)


def run_teacher(config: ml_collections.ConfigDict, workdir: str) -> None:
  stage_dir = os.path.join(workdir, teacher.NAME)
  record_stage_config(config, stage_dir, teacher.NAME)
  if os.path.exists(loop.params_dir(stage_dir)):
    logging.info('[teacher] already finished in %s; skipping.', stage_dir)
    print(f'teacher: already finished ({stage_dir}); nothing to do.')
    return
  stage = teacher.make_stage(config, data.get_info(config.data))
  loop.train_stage(stage, config, stage_dir)
  print(f'teacher: finished; params in {loop.params_dir(stage_dir)}')


def run(config: ml_collections.ConfigDict, workdir: str, mode: str) -> None:
  """Validates everything cheap first, then runs the stages of `mode`."""
  if mode not in MODES:
    raise ValueError(f'--mode={mode!r}; allowed: {MODES}.')
  config_lib.validate(config)
  if mode == 'sample':
    print(sample.sample_to_files(config, workdir))
    return
  data.check_available(config.data)
  run_teacher(config, workdir)
