"""Atomic file writes: a reader (or a crash) sees the whole new file or the old one.

Every file the project writes into a workdir, a report folder, a cache or a
prediction folder goes through `atomic_write`:

    with atomic_write(path, 'w') as f:
      f.write(text)

The data goes to a hidden temporary file in the same folder (so the final
rename never crosses file systems), is flushed to disk, and replaces `path`
with `os.replace`. If anything fails on the way, the temporary file is removed
and `path` is left as it was. Imports only the standard library, so data code
(which imports no JAX) can use it.
"""

import contextlib
import os
import tempfile
from typing import IO, Iterator


def _read_umask() -> int:
  # os.umask can only be read by setting it; done once, at import, because
  # doing it per write would race with files created by other threads.
  umask = os.umask(0o022)
  os.umask(umask)
  return umask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'w', *,
                 make_dirs: bool = True) -> Iterator[IO]:
  """Opens a temporary file that replaces `path` when the block exits cleanly.

  Args:
    path: the final file.
    mode: 'w' (text, newline='' so CSV writers control line ends) or 'wb'.
    make_dirs: create the parent folder if it does not exist.

  Yields:
    The open temporary file.

  Raises:
    ValueError: `mode` is neither 'w' nor 'wb'.
    OSError: the folder is not writable or the disk is full; `path` is intact.
  """
  if mode not in ('w', 'wb'):
    raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}.")
  folder = os.path.dirname(os.path.abspath(path))
  if make_dirs:
    os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder,
                             prefix='.' + os.path.basename(path) + '.',
                             suffix='.tmp')
  try:
    # mkstemp creates 0600 files; give the final file the usual permissions.
    os.fchmod(fd, 0o666 & ~_UMASK)
    with os.fdopen(fd, mode, **({} if 'b' in mode else {'newline': ''})) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically (see `atomic_write`)."""
  with atomic_write(path, 'w') as f:
    f.write(text)


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically (see `atomic_write`)."""
  with atomic_write(path, 'wb') as f:
    f.write(data)
