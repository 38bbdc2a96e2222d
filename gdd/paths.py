"""How a path the user gives becomes the path gdd reads and writes.

Every file gdd touches goes through `etils.epath`, so a workdir, data_dir,
weights file or output may be a local path or a URL. `os.path` must never
see a URL: `os.path.abspath('gs://b/x')` is `<cwd>/gs:/b/x`, a local folder,
and on a pod each host would write its own. `resolve` is the one place that
tells the two kinds apart.

gs:// is served by `tf.io.gfile` (epath, clu's TensorBoard writer) and by
TensorStore (Orbax's arrays); Orbax also imports google-cloud-storage for a
gs:// checkpoint folder, which must then be installed. epath also names
s3://, az:// and hf://, but with TensorFlow installed it sends them to
`tf.io.gfile`, which does not implement them; they need EPATH_USE_TF=0 and
fsspec's s3fs / adlfs / huggingface_hub, and TensorBoard logs cannot go
there.
"""

import os
import re
import uuid

from etils import epath

from gdd import errors

# The URL schemes epath knows; it takes any other `scheme://` for a relative
# local path.
URL_SCHEMES = ('gs', 's3', 'az', 'hf')
_URL = re.compile(r'([A-Za-z][A-Za-z0-9+.-]*)://')


class UnsupportedPathError(errors.UserError, ValueError):
  """A URL of a scheme that gdd cannot read or write."""


def resolve(path: epath.PathLike) -> epath.Path:
  """`path` as an `epath.Path`: a URL unchanged, a local path made absolute.

  Idempotent, so a function may resolve whatever path it is given.

  Raises:
    UnsupportedPathError: `path` is a URL of another scheme (file://,
      memory://, …), which epath would take for a relative local path.
  """
  text = os.fspath(path)
  url = _URL.match(text)
  if url is None:
    return epath.Path(os.path.abspath(text))
  if url.group(1) not in URL_SCHEMES:
    schemes = ', '.join(f'{scheme}://' for scheme in URL_SCHEMES)
    raise UnsupportedPathError(
      f'{text!r}: gdd reads and writes local paths and {schemes} URLs. '
      'For a local file pass its plain path (without file://).'
    )
  return epath.Path(text)


def is_local(path: epath.PathLike) -> bool:
  """True for a local path, False for a URL (gs://…): no kernel, no flock."""
  return _URL.match(os.fspath(path)) is None


def write_atomically(path: epath.PathLike, data: bytes) -> None:
  """Writes `data` to `path` so that readers see the old file or all of it.

  The bytes go to a uniquely named sibling that is then renamed over `path`
  (on an object store the rename is a copy and a delete, and each object
  appears whole); the sibling is removed if writing fails.
  """
  path = resolve(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f'{path.name}.{uuid.uuid4().hex}.tmp')
  try:
    tmp.write_bytes(data)
    tmp.replace(path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
