r"""Command line: train the stage chain, sample, edit, translate or evaluate it.

  python -m gdd.main --config=configs/digits.py --workdir=/tmp/gdd_digits
  python -m gdd.main --config=configs/digits.py --workdir=/tmp/gdd_digits \
      --mode=sample --config.sample.num_steps=64 --config.sample.w=1
  python -m gdd.main --config=configs/digits.py --workdir=/tmp/gdd_digits \
      --mode=evaluate
  python -m gdd.main --config=configs/digits.py --workdir=/tmp/gdd_digits \
      --mode=edit --config.edit.targets=8 --config.edit.t_start=0.6

Errors the user can fix (a bad config value, a config that differs from the
workdir's, a missing data set, a stage folder another run holds, a full disk,
an unreadable checkpoint, a diverged run) print one message and exit 1;
`--verbose` (or GDD_VERBOSE=1) shows their traceback too. SIGTERM/SIGINT
during training save the current step and exit with
`preemption.EXIT_CODE` (75); re-running resumes.
"""

import logging
import os
import sys

# TensorFlow (tf.data input, clu's writers) prints a notice about its oneDNN
# ops to stderr on import on CPUs with AVX-512, which TF_CPP_MIN_LOG_LEVEL no
# longer silences (TF 2.21); with it, a user error would not be one message.
# gdd runs no TF math where oneDNN matters. Set before anything imports TF.
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from gdd import config_lib, distributed, errors, pipeline  # noqa: E402
from gdd.train import preemption  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Path to a config file (configs/*.py).', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory.')
_MODE = flags.DEFINE_enum(
  'mode',
  'all',
  pipeline.MODES,
  'Stages to train, or sample / edit / inpaint / translate / evaluate / plan.',
)
_VERBOSE = flags.DEFINE_bool(
  'verbose', False, 'Show tracebacks of user errors too (or GDD_VERBOSE=1).'
)
flags.mark_flags_as_required(['config'])


class _QuietOrbaxLogs(logging.Filter):
  """Hides Orbax's per-save INFO chatter and the tracebacks it logs.

  Its warnings and errors still show as one line each; a failed save also
  reaches `main`, which says what went wrong (e.g. a full disk) and what to
  do. --verbose keeps Orbax's tracebacks.
  """

  def __init__(self, verbose: bool):
    super().__init__()
    self._verbose = verbose

  def filter(self, record: logging.LogRecord) -> bool:
    if f'{os.sep}orbax{os.sep}' not in record.pathname:
      return True
    if not self._verbose:
      record.exc_info, record.exc_text = None, None
    return record.levelno >= logging.WARNING


def _verbose_from_env() -> bool:
  return os.environ.get('GDD_VERBOSE', '') not in ('', '0')


def _fail(message: str, code: int) -> None:
  print(f'gdd: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a one-line error for a bad --config.* override.

  A misspelt key raises inside ml_collections, where the "did you mean" hint
  sits at the bottom of a long chained traceback.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    _fail(f'{error}\nPass --helpshort or --helpfull to see the flags.', 2)
  except (AttributeError, KeyError, TypeError, ValueError) as error:
    # Flags are not parsed yet, so --verbose is looked for by hand.
    if _verbose_from_env() or '--verbose' in argv:
      raise
    _fail(_config_flag_message(error), 2)


def _config_flag_message(error: Exception) -> str:
  """One line for an error in the config file or a --config.* override."""
  missing = [
    cause for cause in errors.chain(error) if isinstance(cause, KeyError)
  ]
  if not missing:
    return f'bad --config (file or override): {errors.first_line(error)}'
  # The outermost KeyError carries ml_collections' "Did you mean" hint.
  key, _, hint = str(missing[0].args[0]).partition('\n')
  return ' '.join(
    part
    for part in (
      f'unknown config key {key} in a --config.* override.',
      hint,
      '(Configs are locked: gdd/config_lib.py lists every key.)',
    )
    if part
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietOrbaxLogs(_VERBOSE.value or _verbose_from_env()))
  config = _CONFIG.value
  if _WORKDIR.value is None and _MODE.value != 'plan':
    raise app.UsageError(f'--mode={_MODE.value} needs --workdir.')
  try:
    # Validated here too: a bad distributed.* key fails before connecting.
    config_lib.validate(config)
    distributed.initialize(config.distributed)
    pipeline.run(config, _WORKDIR.value, _MODE.value)
  except preemption.InterruptedRunError as stop:
    _fail(str(stop), preemption.EXIT_CODE)
  except Exception as error:
    message = errors.user_message(error)
    if message is None or _VERBOSE.value or _verbose_from_env():
      raise
    _fail(f'error: {message}\n(--verbose shows the traceback)', 1)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
