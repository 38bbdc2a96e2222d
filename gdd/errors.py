"""The base class of the errors a user can fix, so `main` can tell them apart.

An error that derives from `UserError` carries a message that names the
problem and the fix; `gdd.main` prints only that message (no traceback) and
exits non-zero. Anything else is a bug or an unexpected failure and keeps its
traceback. Subclasses also derive from the builtin they refine (ValueError,
FileNotFoundError, …) so callers can catch them as before.
"""

import errno


class UserError(Exception):
  """A problem with the user's input, files or machine, with its fix."""


def chain(error: BaseException, *, implicit: bool = True):
  """The error, its cause, the cause's cause, …

  With `implicit`, also errors that were being handled when one was raised
  (`__context__`), as tracebacks show them.
  """
  while error is not None:
    yield error
    error = error.__cause__ or (error.__context__ if implicit else None)


def user_message(error: BaseException) -> str | None:
  """The message to show for an error the user can fix, else None.

  Covers `UserError`s (the error itself or what it was explicitly raised
  from: an unexpected error raised while handling a user error stays
  unexpected) and a full disk, which reaches gdd wrapped in Orbax's and
  TensorStore's own exceptions.
  """
  for cause in chain(error, implicit=False):
    if isinstance(cause, UserError):
      return str(cause)
  for cause in chain(error):
    full = (
      isinstance(cause, OSError) and cause.errno == errno.ENOSPC
    ) or 'No space left on device' in str(cause)
    if full:
      return (
        f'No space left on device ({first_line(cause)}). Free some space '
        '(or point --workdir at a larger disk) and re-run the same command: '
        'only complete checkpoints and exports are ever kept, and the run '
        'resumes from the newest one.'
      )
  return None


def first_line(error: BaseException) -> str:
  """`Type: first line of the message`, for logs that must stay short."""
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0] if lines else ""}'[:300]
