"""The one base class of the errors a user can fix, so `main` can tell them apart.

An error that derives from `UserError` carries a message that names the
problem and the fix; `gdd.main` prints only that message (no traceback) and
exits non-zero. Anything else is a bug or an unexpected failure and keeps its
traceback. Subclasses also derive from the builtin they refine (ValueError,
FileNotFoundError, …) so callers can catch them as before.
"""


class UserError(Exception):
  """A problem with the user's input, files or machine, with its fix."""
