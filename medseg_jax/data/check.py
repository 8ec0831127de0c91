"""Data-set check: every problem of a data set listed at once, before training.

`check_dataset(config.data)` opens every file of the data set that
`config.data.source` names and returns a list of `Problem(path, reason)`:
missing masks (and masks without an image), broken links, a mask whose size
differs from its image, mask values outside the label set, unreadable or
corrupt files, channel counts that do not match `config.data.in_channels`,
an empty data set, a split left empty by too few patients, and class names
that contradict the data set's. DICOM series (`dicom_series`) add: a folder
mixing several series (each SeriesInstanceUID named), missing slices (a gap
that is a multiple of the slice step), inconsistent slice or pixel spacing,
and, with `preprocess.intensity='suv'`, PET series whose SUV tags are
missing (named). It only reads: nothing is written anywhere, least of all
in the data folder.

Before training, `assert_dataset_ok` skips the check of a data set that
passed it before with the same files (paths, sizes, mtimes) and the same
`config.data`: a marker file under `~/.cache/medseg_jax/checks` (or
`config.data.cache_dir`/checks) records each pass, so a resumed run or a new
run on the same BraTS-sized data does not decode every case again.

Run on its own: `python -m medseg_jax.main --mode=check_data --config=...`.
Each source's check is its entry in `sources.REGISTRY`; a new source adds
one entry there.
"""

import hashlib
import json
import os

from medseg_jax import fileio
from medseg_jax.data import cache as cache_lib
from medseg_jax.data import errors
from medseg_jax.data import folder_sources
from medseg_jax.data import sources
from medseg_jax.data import splits

# The check's vocabulary, importable from one place (main, train, tests).
Problem = errors.Problem
DataCheckError = errors.DataCheckError
format_problems = errors.format_problems
relative_to_root = errors.relative_to_root
pair_problems = folder_sources.pair_problems
find_problems_2d = folder_sources.find_problems_2d
split_problems = splits.split_problems


def check_dataset(data_cfg) -> list[Problem]:
  """Returns every problem of the data set that config.data names.

  Args:
    data_cfg: config.data (source, root, and the source's keys).

  Returns:
    Problems, [] when the data set is usable.
  """
  return sources.find_problems(data_cfg)


def check_dataset_report(data_cfg) -> str:
  """Returns `format_problems` of `check_dataset(data_cfg)` (for check_data)."""
  return format_problems(check_dataset(data_cfg), data_cfg.root)


def _file_stats(root: str) -> list:
  """Returns sorted (path, size, mtime_ns) of every file under `root`."""
  stats = []
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      try:
        st = os.stat(path)
      except OSError:
        continue  # Vanished or unreadable: the check itself reports it.
      stats.append((path, st.st_size, st.st_mtime_ns))
  return sorted(stats)


def passed_marker(data_cfg) -> str | None:
  """Returns the marker file of a passed check of this data set, or None.

  None for generated data (no root). The name hashes `config.data` and the
  stats of every file under the root, so any change checks again.
  """
  root = data_cfg.root
  if not root or not os.path.isdir(root):
    return None
  cfg = data_cfg.to_dict() if hasattr(data_cfg, 'to_dict') else dict(data_cfg)
  blob = json.dumps([os.path.abspath(root), cfg, _file_stats(root)],
                    sort_keys=True, default=str)
  cache = data_cfg.cache_dir or cache_lib.cache_home()
  return os.path.join(cache, 'checks',
                      hashlib.sha1(blob.encode()).hexdigest() + '.ok')


def _write_marker(path: str) -> None:
  """Creates the marker atomically; a cache that cannot be written is skipped."""
  try:
    fileio.write_text(path, 'passed\n')
  except OSError:
    pass


def assert_dataset_ok(data_cfg, use_cache: bool = True) -> None:
  """Raises DataCheckError listing every problem, if there is any.

  Call before training: on a file data set it decodes every file once, unless
  the same files passed with the same config before (`passed_marker`).

  Args:
    data_cfg: config.data.
    use_cache: skip a check that passed before, and record a pass.
  """
  marker = passed_marker(data_cfg) if use_cache else None
  if marker and os.path.exists(marker):
    return
  problems = check_dataset(data_cfg)
  if problems:
    raise DataCheckError(problems, data_cfg.root)
  if marker:
    _write_marker(marker)
