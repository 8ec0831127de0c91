"""Data-set check: every problem of a data set listed at once, before training.

`check_dataset(config.data)` opens every file of the data set that
`config.data.source` names and returns a list of `Problem(path, reason)`:
missing masks (and masks without an image), a mask whose size differs from
its image, mask values outside the label set, unreadable or corrupt files,
channel counts that do not match `config.data.in_channels`, an empty data
set, and a split left empty by too few patients. It only reads: nothing is
written anywhere, least of all in the data folder.

Before training, `assert_dataset_ok` skips the check of a data set that
passed it before with the same files (paths, sizes, mtimes) and the same
`config.data`: a marker file under `~/.cache/medseg_jax/checks` (or
`config.data.cache_dir`/checks) records each pass, so a resumed run or a new
run on the same BraTS-sized data does not decode every case again.

Run on its own: `python -m medseg_jax.main --mode=check_data --config=...`.
Sources are dispatched through `CHECKS` (source name -> function of
`config.data` returning problems); a new source adds one entry there.
"""

from collections.abc import Sequence
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import tempfile

import numpy as np

from medseg_jax.data import image_io
from medseg_jax.data import splits
from medseg_jax.data.volume_io import FileError

# JPEGs are decoded at 1/8 scale when checking: libjpeg still parses every
# byte of the file (truncation and corruption are found), ~5x faster.
_CHECK_DECODE_SIZE = (8, 8)


@dataclasses.dataclass(frozen=True)
class Problem:
  """One problem of a data set: the file (or config key) and what is wrong."""
  path: str
  reason: str


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
    problems: what `check_dataset` (or `find_problems_2d`) found.
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


def pair_problems(image_path: str, mask_path: str, *, num_classes: int,
                  label_values=(), in_channels: int = 3) -> list[Problem]:
  """Returns the problems of one image/mask pair (both files are decoded).

  Args:
    image_path, mask_path: the two files.
    num_classes, label_values, in_channels: as in config.data.

  Returns:
    Problems: unreadable image or mask, channel count, mask size differing
    from the image's, mask values outside the label set.
  """
  problems, image_hw = [], None
  try:
    image_hw = image_io.read_size(image_path)
    image = image_io.read_image(image_path, min_size=_CHECK_DECODE_SIZE)
    image_io.match_channels(image, in_channels, image_path)
  except FileError as e:
    problems.append(Problem(e.path, e.reason))
  try:
    raw = image_io.read_mask(mask_path)
    if image_hw is not None and raw.shape != image_hw:
      problems.append(Problem(mask_path, (
          f'mask is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image '
          f'{os.path.basename(image_path)} is {image_hw[1]}x{image_hw[0]}; '
          'a mask must have its image\'s size.')))
    image_io.map_labels(raw, label_values, num_classes, mask_path)
  except FileError as e:
    problems.append(Problem(e.path, e.reason))
  return problems


def _label_values_problem(label_values, num_classes) -> list[Problem]:
  """Returns a problem if label_values cannot name K classes (checked once)."""
  try:
    image_io.map_labels(np.zeros((1, 1), np.uint8), label_values,
                        num_classes)
  except FileError:
    pass  # 0 not among the values: a property of the masks, not the config.
  except ValueError as e:
    return [Problem('config.data.label_values', str(e))]
  return []


def find_problems_2d(source, num_threads: int | None = None) -> list[Problem]:
  """Lists every problem of a 2D image/mask source at once (files read only).

  Args:
    source: an `IsicSource` or `FolderSource` (anything with `pairs` of
      `.image`/`.mask` paths, `listing_problems`, `root`, `num_classes`,
      `label_values` and `in_channels`), built with strict=False so files
      without a partner are in `listing_problems`.
    num_threads: decoding threads (Pillow releases the GIL); default: CPUs.

  Returns:
    The source's listing problems (unpaired files, bad manifest or metadata
    rows, missing folders), then each pair's problems in record order, or
    an "empty data set" problem.
  """
  problems = list(source.listing_problems)
  if not source.pairs:
    if not problems:
      where = getattr(source, 'images_dir', source.root)
      problems.append(Problem(where, 'empty data set: no image files ('
                              + ', '.join(image_io.IMAGE_EXTENSIONS) +
                              ') with masks found.'))
    return problems
  config_problems = _label_values_problem(source.label_values,
                                          source.num_classes)
  if config_problems:
    return problems + config_problems

  def check(pair):
    return pair_problems(pair.image, pair.mask,
                         num_classes=source.num_classes,
                         label_values=source.label_values,
                         in_channels=source.in_channels)

  workers = num_threads or min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for found in pool.map(check, source.pairs):
      problems += found
  return problems


def split_problems(patient_ids: Sequence[str], data_cfg) -> list[Problem]:
  """Returns a problem if the patient split of config.data cannot be made.

  Uses the pipeline's own split (`splits.split_for_config`: val_fraction,
  test_fraction, split_seed, train_fraction, and num_folds/fold), so a
  split left empty by too few patients is reported before training.

  Args:
    patient_ids: one per record.
    data_cfg: config.data.

  Returns:
    [] or one Problem naming the config keys; [] for no records (reported
    as an empty data set elsewhere).
  """
  if not len(patient_ids):
    return []
  try:
    splits.split_for_config(list(patient_ids), data_cfg)
  except ValueError as e:
    return [Problem('config.data', str(e))]
  return []


def _photo_problems(data_cfg) -> list[Problem]:
  """Problems of an 'isic2018' or 'folder' data set."""
  from medseg_jax.data import folder_sources  # pylint: disable=import-outside-toplevel
  try:
    source = folder_sources.build_2d_source(data_cfg, strict=False)
  except ValueError as e:
    return [Problem('config.data', str(e))]
  return find_problems_2d(source) + split_problems(source.patient_ids,
                                                   data_cfg)


def _nifti_problems(data_cfg) -> list[Problem]:
  """Problems of a 'nifti' data set (nifti_layout.find_problems_3d)."""
  from medseg_jax.data import nifti_layout  # pylint: disable=import-outside-toplevel
  problems = [Problem(*p) for p in nifti_layout.find_problems_3d(data_cfg)]
  root = data_cfg.get('root', '')
  if not root:
    return problems
  root = os.path.abspath(root)
  case_ids = [c.case_id for c in nifti_layout.scan_dataset(root).cases]
  patients_csv = dict(data_cfg.get('nifti', None) or {}).get('patients_csv')
  mapping = {}
  if patients_csv and case_ids:
    mapping, _ = nifti_layout.read_patients_csv(
        os.path.join(root, patients_csv), case_ids)
  # A split depends only on the set of patients, so volumes stand for their
  # slices in 2D mode.
  return problems + split_problems([mapping.get(c) or c for c in case_ids],
                                   data_cfg)


def _no_problems(data_cfg) -> list[Problem]:
  del data_cfg  # Generated data: nothing to check.
  return []


CHECKS = {
    'synthetic': _no_problems,
    'synthetic3d': _no_problems,
    'isic2018': _photo_problems,
    'folder': _photo_problems,
    'nifti': _nifti_problems,
}


def check_dataset(data_cfg) -> list[Problem]:
  """Returns every problem of the data set that config.data names.

  Args:
    data_cfg: config.data (source, root, and the source's keys).

  Returns:
    Problems, [] when the data set is usable.
  """
  name = data_cfg.get('source', 'synthetic')
  if name not in CHECKS:
    return [Problem('config.data.source', f'unknown source {name!r}; known: '
                    f'{", ".join(sorted(CHECKS))}.')]
  return CHECKS[name](data_cfg)


def check_dataset_report(data_cfg) -> str:
  """Returns `format_problems` of `check_dataset(data_cfg)` (for check_data)."""
  return format_problems(check_dataset(data_cfg), data_cfg.get('root', ''))


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
  root = data_cfg.get('root', '')
  if not root or not os.path.isdir(root):
    return None
  cfg = data_cfg.to_dict() if hasattr(data_cfg, 'to_dict') else dict(data_cfg)
  blob = json.dumps([os.path.abspath(root), cfg, _file_stats(root)],
                    sort_keys=True, default=str)
  cache = data_cfg.get('cache_dir', '') or os.path.join(
      os.path.expanduser('~'), '.cache', 'medseg_jax')
  return os.path.join(cache, 'checks',
                      hashlib.sha1(blob.encode()).hexdigest() + '.ok')


def _write_marker(path: str) -> None:
  """Creates the marker atomically; a cache that cannot be written is skipped."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.NamedTemporaryFile('w', dir=os.path.dirname(path),
                                     delete=False) as f:
      f.write('passed\n')
    os.replace(f.name, path)
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
    raise DataCheckError(problems, data_cfg.get('root', ''))
  if marker:
    _write_marker(marker)
