"""NIfTI data-set layouts (MSD, nnU-Net): listing, reading and checking cases.

`scan_dataset(root)` tells the layout apart by `dataset.json` (see
`volume_sources` for both layouts) and lists the cases, reading only names
and JSON; every layout problem goes to `Scan.problems`, all at once.
`read_case_arrays` reads one case's channels and label and checks that they
share one geometry; `to_class_map` maps raw label values to class indices;
`find_problems_3d` reads every case of a data set and lists what is wrong.
Nothing here writes anything.
"""

import collections
import csv
import dataclasses
import json
import os
import re

import numpy as np

from medseg_jax.data import volume_io
from medseg_jax.data.errors import broken_link_reason
from medseg_jax.data.errors import is_broken_link
from medseg_jax.data.errors import Problem

AFFINE_RTOL, AFFINE_ATOL = 1e-5, 1e-3  # Image vs label affines (mm, cosines).
_NNUNET_NAME = re.compile(r'^(?P<case>.+)_(?P<channel>\d{4})$')


def nifti_options(data_cfg) -> dict:
  """Returns `config.data.nifti` as a dict ({} when absent)."""
  sub = data_cfg.get('nifti', None)  # Not in configs/default.py.
  return dict(sub) if sub else {}


@dataclasses.dataclass(frozen=True)
class Case:
  """One training case: its image file(s) (one per channel, or one 4D file)."""
  case_id: str
  images: tuple[str, ...]
  label: str


@dataclasses.dataclass
class Scan:
  """What `scan_dataset` found: layout, names, cases, and problems."""
  layout: str = ''
  channel_names: tuple[str, ...] = ()
  class_names: tuple[str, ...] = ()  # Classes 0..K-1, background first.
  cases: list = dataclasses.field(default_factory=list)
  problems: list = dataclasses.field(default_factory=list)  # [Problem]


def _strip_nifti(name: str) -> str:
  for suffix in ('.nii.gz', '.nii'):
    if name.lower().endswith(suffix):
      return name[:-len(suffix)]
  return name


def _listdir(folder: str, ending: str | None = None) -> list[str]:
  if not os.path.isdir(folder):
    return []
  names = sorted(n for n in os.listdir(folder) if not n.startswith('.'))
  if ending is None:
    return [n for n in names if volume_io.is_nifti(n)]
  return [n for n in names if n.endswith(ending)]


def _names_by_index(mapping, path: str, what: str, problems) -> tuple:
  """Returns names ordered by index from {"0": name} or {name: index}."""
  try:
    if all(str(k).isdigit() for k in mapping):
      pairs = {int(k): str(v) for k, v in mapping.items()}
    else:
      if any(not isinstance(v, int) for v in mapping.values()):
        raise ValueError('region-based labels (lists) are not supported')
      pairs = {int(v): str(k) for k, v in mapping.items()}
  except (ValueError, TypeError, AttributeError) as e:
    problems.append(Problem(
        path, f'"{what}" is not a map of indices to names: {e}.'))
    return ()
  if sorted(pairs) != list(range(len(pairs))) or not pairs:
    problems.append(Problem(path, f'"{what}" indices {sorted(pairs)} are not '
                                  '0, 1, ..., n-1.'))
    return ()
  return tuple(pairs[i] for i in range(len(pairs)))


def _msd_cases(root, meta, json_path, problems) -> list:
  """Returns [Case] of an MSD data set (from `training`, else the folder)."""
  pairs = []
  if isinstance(meta.get('training'), list):
    for entry in meta['training']:
      if not isinstance(entry, dict) or 'image' not in entry:
        problems.append(Problem(json_path, f'"training" entry {entry!r} has no '
                                           '"image".'))
        continue
      image = os.path.normpath(os.path.join(root, entry['image']))
      label = os.path.normpath(os.path.join(root, entry.get('label') or (
          os.path.join('labelsTr', os.path.basename(image)))))
      pairs.append((image, label))
  else:
    pairs = [(os.path.join(root, 'imagesTr', n),
              os.path.join(root, 'labelsTr', n))
             for n in _listdir(os.path.join(root, 'imagesTr'))]
  cases = []
  for image, label in pairs:
    if is_broken_link(image) or is_broken_link(label):
      link = image if is_broken_link(image) else label
      problems.append(Problem(link, broken_link_reason(link)))
    elif not os.path.exists(image):  # A folder: a DICOM series.
      problems.append(Problem(
          image, 'image listed in dataset.json does not exist.'))
    elif not os.path.exists(label):  # A folder: PNG slices of a series.
      problems.append(Problem(image, f'no label: expected {label}.'))
    else:
      cases.append(Case(_strip_nifti(os.path.basename(image)), (image,), label))
  return cases


def _nnunet_cases(root, ending, channels, json_path, problems) -> list:
  """Returns [Case] of an nnU-Net data set (one file per channel)."""
  if ending not in volume_io.NIFTI_SUFFIXES:
    problems.append(Problem(json_path, f'file_ending {ending!r} is not '
                            'supported; only NIfTI (.nii.gz, .nii).'))
    return []
  images_dir = os.path.join(root, 'imagesTr')
  found = collections.defaultdict(dict)
  broken = set()  # Cases with a broken link, reported once as such.
  for name in _listdir(images_dir, ending):
    path = os.path.join(images_dir, name)
    match = _NNUNET_NAME.match(name[:-len(ending)])
    if is_broken_link(path):
      problems.append(Problem(path, broken_link_reason(path)))
      broken.add(match['case'] if match else name)
      continue
    if not match:
      problems.append(Problem(
          os.path.join(images_dir, name),
          f'not named <case>_<4-digit channel>{ending} (nnU-Net layout).'))
      continue
    found[match['case']][int(match['channel'])] = os.path.join(images_dir,
                                                               name)
  cases = []
  for case_id in sorted(set(found) - broken):
    files = found[case_id]
    missing = [c for c in range(channels) if c not in files]
    extra = sorted(c for c in files if c >= channels)
    label = os.path.join(root, 'labelsTr', case_id + ending)
    where = os.path.join(images_dir, f'{case_id}_XXXX{ending}')
    if missing:
      problems.append(Problem(where, 'missing channel file(s) ' + ', '.join(
          f'{case_id}_{c:04d}{ending}' for c in missing) +
                              f' (dataset.json lists {channels} channels).'))
    elif extra:
      problems.append(Problem(files[extra[0]], f'channel {extra[0]} beyond the '
                              f'{channels} channels of dataset.json.'))
    elif is_broken_link(label):
      problems.append(Problem(label, broken_link_reason(label)))
    elif not os.path.isfile(label):
      problems.append(Problem(files[0], f'no label: expected {label}.'))
    else:
      cases.append(Case(case_id, tuple(files[c] for c in range(channels)),
                        label))
  return cases


def scan_dataset(root: str) -> Scan:
  """Finds the layout, names and cases under `root`; reads only names/JSON.

  Returns:
    A Scan; `problems` lists everything wrong with the layout (all at once).
  """
  scan = Scan()
  json_path = os.path.join(root, 'dataset.json')
  if not os.path.isdir(root):
    scan.problems.append(Problem(root, 'data folder does not exist '
                                       '(config.data.root).'))
    return scan
  try:
    with open(json_path) as f:
      meta = json.load(f)
    if not isinstance(meta, dict):
      raise ValueError('not a JSON object')
  except (OSError, ValueError) as e:
    scan.problems.append(Problem(
        json_path, f'missing or invalid dataset.json ({e}); the MSD and '
        'nnU-Net layouts need one.'))
    return scan
  if 'channel_names' in meta or 'file_ending' in meta:
    scan.layout, names_key = 'nnunet', 'channel_names'
  elif 'modality' in meta:
    scan.layout, names_key = 'msd', 'modality'
  else:
    scan.problems.append(Problem(json_path, 'has neither "modality" (MSD) nor '
                                            '"channel_names" (nnU-Net).'))
    return scan
  for key in (names_key, 'labels'):
    if not isinstance(meta.get(key), dict):
      scan.problems.append(Problem(json_path,
                                   f'"{key}" is missing or not a map.'))
      return scan
  scan.channel_names = _names_by_index(meta[names_key], json_path, names_key,
                                       scan.problems)
  scan.class_names = _names_by_index(meta['labels'], json_path, 'labels',
                                     scan.problems)
  if scan.layout == 'msd':
    scan.cases = _msd_cases(root, meta, json_path, scan.problems)
  elif scan.channel_names:
    scan.cases = _nnunet_cases(root, meta.get('file_ending', '.nii.gz'),
                               len(scan.channel_names), json_path,
                               scan.problems)
  if not scan.cases and not scan.problems:
    scan.problems.append(Problem(os.path.join(root, 'imagesTr'),
                                 'empty data set: no training case found.'))
  return scan


def read_patients_csv(path: str, case_ids) -> tuple[dict, list]:
  """Returns ({case_id: patient_id}, problems) from a case_id,patient_id CSV."""
  try:
    with open(path, newline='') as f:
      rows = list(csv.DictReader(f))
  except OSError as e:
    return {}, [Problem(path, f'cannot read the patients CSV ({e}).')]
  if not rows or not {'case_id', 'patient_id'} <= set(rows[0]):
    return {}, [Problem(path, 'patients CSV needs columns case_id,patient_id.')]
  mapping = {r['case_id'].strip(): r['patient_id'].strip() for r in rows}
  missing = [c for c in case_ids if not mapping.get(c)]
  if missing:
    return mapping, [Problem(path, f'{len(missing)} case(s) have no '
                             f'patient_id, e.g. {", ".join(missing[:5])}.')]
  return mapping, []


def to_class_map(raw: np.ndarray, num_classes: int, label_values=(),
                 path: str = 'label') -> np.ndarray:
  """Returns raw label values as uint8 class indices, or raises.

  Args:
    raw: the label volume as stored.
    num_classes: config.data.num_classes (K = max(2, num_classes) classes).
    label_values: raw values in class order (config.data.label_values); ()
      means the values already are class indices 0..K-1.
    path: the file, for messages.
  """
  k = max(2, int(num_classes))
  raw = np.asarray(raw)
  if label_values:
    values = np.asarray(label_values)
    uniq, inverse = np.unique(raw, return_inverse=True)
    unknown = uniq[~np.isin(uniq, values)]
    if unknown.size:
      raise volume_io.FileError(
          path, f'label values {unknown[:8].tolist()} are not in '
          f'config.data.label_values={tuple(label_values)}.')
    lut = np.array([int(np.flatnonzero(values == u)[0]) for u in uniq])
    return lut[inverse].reshape(raw.shape).astype(np.uint8)
  if raw.size and (raw.min() < 0 or raw.max() >= k or not np.issubdtype(
      raw.dtype, np.integer) and not np.array_equal(raw, np.round(raw))):
    bad = np.unique(raw)
    bad = bad[(bad < 0) | (bad >= k) | (bad != np.round(bad))]
    raise volume_io.FileError(
        path, f'label values {bad[:8].tolist()} are outside the {k} classes '
        f'0..{k - 1} (config.data.num_classes={num_classes}); set '
        'config.data.label_values to map raw values to classes.')
  return raw.astype(np.uint8)


def read_case_arrays(case: Case) -> tuple:
  """Returns (image [D, H, W, C] float32, raw label, spacing) of a case.

  Raises:
    volume_io.FileError: unreadable file, channels/label of other geometry.
  """
  first = volume_io.read_volume(case.images[0])  # NIfTI or DICOM series.
  channels = [first.array if first.array.ndim == 4 else first.array[..., None]]
  for path in case.images[1:]:
    vol = volume_io.read_volume(path)
    _same_geometry(first, vol, case.images[0], path)
    channels.append(vol.array[..., None] if vol.array.ndim == 3 else vol.array)
  label = volume_io.read_label_volume(case.label, first)
  if label.array.ndim != 3:
    raise volume_io.FileError(case.label, f'label of shape {label.array.shape}'
                              ' is not a 3D map (D, H, W).')
  _same_geometry(first, label, case.images[0], case.label)
  image = np.concatenate(channels, axis=-1).astype(np.float32, copy=False)
  return image, label.array, first.spacing


def _same_geometry(ref, other, ref_path, other_path):
  """Raises if two volumes differ in spatial shape or affine."""
  if ref.array.shape[:3] != other.array.shape[:3]:
    raise volume_io.FileError(
        other_path, f'shape (D, H, W) {other.array.shape[:3]} differs from '
        f'{ref.array.shape[:3]} of {ref_path}.')
  if not np.allclose(ref.affine, other.affine, rtol=AFFINE_RTOL,
                     atol=AFFINE_ATOL):
    diff = float(np.abs(ref.affine - other.affine).max())
    raise volume_io.FileError(
        other_path, f'affine differs from that of {ref_path} (max difference '
        f'{diff:.3g}); they are not aligned.')


def _case_problems(case: Case, num_classes, label_values, channels) -> list:
  """Returns the problems of one case's files (all read)."""
  try:
    image, raw, _ = read_case_arrays(case)
  except volume_io.FileError as e:
    return [e.problem()]
  problems = []
  if channels and image.shape[-1] != channels:
    problems.append(Problem(case.images[0], f'{image.shape[-1]} channel(s), '
                            f'but dataset.json lists {channels}.'))
  if not np.isfinite(image).all():
    problems.append(Problem(case.images[0], 'image has NaN or inf values.'))
  try:
    to_class_map(raw, num_classes, label_values, case.label)
  except volume_io.FileError as e:
    problems.append(e.problem())
  return problems


def find_problems_3d(data_cfg) -> list[Problem]:
  """Lists every problem of a `nifti` data set at once; writes nothing.

  Checks: dataset.json missing/invalid, layout (missing labels, missing
  nnU-Net channel files, listed files absent), empty data set, num_classes /
  in_channels against dataset.json, the patients CSV, and every case's files
  (readable, image/label shapes and affines equal within AFFINE_RTOL/ATOL,
  label values in 0..K-1 or config.data.label_values, finite intensities).

  Every file is decoded once (about a second per BraTS-sized case), nothing
  is cached or written.

  Args:
    data_cfg: config.data (as for `build_nifti_source`).

  Returns:
    [Problem], empty when the data set is usable.
  """
  if not data_cfg.root:
    return [Problem('config.data.root', "not set; source 'nifti' needs the "
                    'folder holding dataset.json, imagesTr/ and labelsTr/.')]
  root = os.path.abspath(data_cfg.root)
  scan = scan_dataset(root)
  problems = list(scan.problems)
  json_path = os.path.join(root, 'dataset.json')
  num_classes = int(data_cfg.num_classes)
  problems += num_classes_problems(scan, root, num_classes)
  context = (int(data_cfg.slice_context)
             if data_cfg.volume_mode == '2d' else 0)
  want = len(scan.channel_names) * (2 * context + 1)
  have = int(data_cfg.in_channels)
  if scan.channel_names and have != want:
    problems.append(Problem(json_path, (
        f'{len(scan.channel_names)} channel(s) {list(scan.channel_names)} '
        f'(x {2 * context + 1} slices) but config.data.in_channels={have}; '
        f'set it to {want}.')))
  patients_csv = nifti_options(data_cfg).get('patients_csv', '')
  if patients_csv and scan.cases:
    problems += read_patients_csv(os.path.join(root, patients_csv),
                                  [c.case_id for c in scan.cases])[1]
  label_values = tuple(data_cfg.label_values)
  for case in scan.cases:
    problems += _case_problems(case, num_classes, label_values,
                               len(scan.channel_names))
  return problems


def num_classes_problems(scan: Scan, root: str, num_classes: int
                         ) -> list[Problem]:
  """Returns a problem if dataset.json's labels are not K classes.

  Args:
    scan: what `scan_dataset(root)` found.
    root: the data folder.
    num_classes: config.data.num_classes (1 stands for 2 labels).

  Returns:
    [] or one Problem naming dataset.json and the value to set.
  """
  k = len(scan.class_names)
  if not k or max(2, int(num_classes)) == k:
    return []
  return [Problem(os.path.join(root, 'dataset.json'), (
      f'{k} labels {list(scan.class_names)} but config.data.num_classes='
      f'{num_classes}; set it to {1 if k == 2 else k}.'))]
