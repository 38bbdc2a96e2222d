r"""Command line: train the stage chain, sample from it or evaluate it.

  python -m gdd.main --config=configs/digits.py --workdir=/tmp/gdd_digits
  python -m gdd.main --config=configs/digits.py --workdir=/tmp/gdd_digits \
      --mode=sample --config.sample.num_steps=64 --config.sample.w=1
  python -m gdd.main --config=configs/digits.py --workdir=/tmp/gdd_digits \
      --mode=evaluate
"""

import logging
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from gdd import pipeline

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Path to a config file (configs/*.py).', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory.')
_MODE = flags.DEFINE_enum(
  'mode', 'all', pipeline.MODES, 'Which stages to run, or sample / evaluate.'
)
flags.mark_flags_as_required(['config', 'workdir'])


class _DropLibraryInfo(logging.Filter):
  """Hides Orbax's per-save INFO chatter; its warnings still show."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or (
      f'{os.sep}orbax{os.sep}' not in record.pathname
    )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  for handler in logging.getLogger().handlers:
    handler.addFilter(_DropLibraryInfo())
  config = _CONFIG.value
  if config.distributed.initialize:
    jax.distributed.initialize()
  pipeline.run(config, _WORKDIR.value, _MODE.value)


if __name__ == '__main__':
  app.run(main)
