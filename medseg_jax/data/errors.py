"""What data code reports: a problem of a data set, a file that cannot be used.

`Problem(path, reason)` is one entry of a data-set check (a file, a folder or
a config key, and what is wrong); every check returns a list of them.
`DataCheckError` carries all the problems of a data set at once; `FileError`
is raised by the readers (images, NIfTI, DICOM) about one file. Both are
ValueErrors and survive pickling, so they cross Grain worker processes.
Imports only the standard library.
"""

from collections.abc import Sequence
import os
from typing import NamedTuple


class Problem(NamedTuple):
  """One problem of a data set: the file (or config key) and what is wrong.

  A named tuple, so `path, reason = problem` works too.
  """
  path: str
  reason: str


class FileError(ValueError):
  """A file that cannot be used, with `path` and `reason` for problem lists."""

  def __init__(self, path, reason: str):
    super().__init__(f'{path}: {reason}')
    self.path, self.reason = str(path), reason

  def __reduce__(self):  # Picklable across Grain worker processes.
    return FileError, (self.path, self.reason)

  def problem(self) -> Problem:
    """Returns this error as a `Problem` for a check's list."""
    return Problem(self.path, self.reason)


def is_broken_link(path: str) -> bool:
  """Returns whether `path` is a symbolic link whose target does not exist."""
  return os.path.islink(path) and not os.path.exists(path)


def broken_link_reason(path: str) -> str:
  """Returns why a link to nothing cannot be read, naming its target."""
  return (f'broken link: points to {os.readlink(path)}, which does not exist; '
          'restore the target or remove the link.')


def relative_to_root(path: str, root: str) -> str:
  """Returns how a report shows a problem's path.

  Args:
    path: a file or folder (absolute), or a config key.
    root: the data folder, or ''.

  Returns:
    `path` relative to `root` when it lies inside it, else `path` unchanged
    (the root itself too: '.' would say nothing).
  """
  if root and os.path.isabs(path):
    rel = os.path.relpath(path, os.path.abspath(root))
    if rel != '.' and not rel.startswith('..'):
      return rel
  return path


def format_problems(problems: Sequence[Problem], root: str = '') -> str:
  """Returns a report: one line per problem, then their count and what to do.

  Args:
    problems: what a check found.
    root: the data folder; files inside it are shown relative to it.

  Returns:
    A multi-line string (a one-line "no problems" message when empty).
  """
  where = f' in {os.path.abspath(root)}' if root else ''
  if not problems:
    return f'Data set check: no problems found{where}.'
  lines = [f'  {relative_to_root(p.path, root)}: {p.reason}'
           for p in problems]
  lines.append(
      f'{len(problems)} problem(s) found{where}. Fix or remove the files '
      'named above (or change the config keys named), then check again with '
      'python -m medseg_jax.main --mode=check_data --config=<your config>. '
      'Training does not start while problems remain.')
  return '\n'.join(lines)


class DataCheckError(ValueError):
  """Raised when a data set has problems; `problems` lists them all."""

  def __init__(self, problems: Sequence[Problem], root: str = ''):
    self.problems = list(problems)
    self.root = root
    super().__init__(format_problems(self.problems, root))

  def __reduce__(self):  # Picklable across Grain worker processes.
    return DataCheckError, (self.problems, self.root)
