"""NIfTI data sets (MSD and nnU-Net layouts) as Grain sources, 3D or 2D slices.

Layouts under `config.data.root`, told apart by `dataset.json`:

* Medical Segmentation Decathlon: `dataset.json` with `modality`
  ({"0": "FLAIR", ...}), `labels` ({"0": "background", "1": "edema", ...}) and
  usually `training` ([{"image": "./imagesTr/x.nii.gz", "label": ...}]);
  `imagesTr/x.nii.gz` is 3D or 4D (channels, e.g. BraTS' four sequences),
  `labelsTr/x.nii.gz` the 3D label map. Without a `training` list, every
  `imagesTr/*.nii(.gz)` is paired with the label of the same name. Hidden
  files (the `._*` macOS copies inside the MSD archives) are ignored.
* nnU-Net v2: `dataset.json` with `channel_names` ({"0": "CT"}), `labels`
  ({"background": 0, "liver": 1}) and `file_ending` (".nii.gz"); one file
  per channel `imagesTr/<case>_0000.nii.gz`, `<case>_0001...`, and
  `labelsTr/<case>.nii.gz`.

Patient id = case id, unless `config.data.nifti.patients_csv` (relative to
root, or absolute) maps them: a CSV with columns `case_id,patient_id` listing
every case. Records follow the shared data contract: `image` float32
`[D, H, W, C]` after `preprocess.preprocess_case`, `mask` uint8 `[D, H, W]`,
`spacing` after resampling (D, H, W order of `volume_io`).

Decoded, preprocessed cases are cached per `config.data.cache`: 'memory' (an
LRU of at most `config.data.cache_memory_mb` MB per process, 4096 by
default; Grain workers hold their own), 'disk' (`.npz` files in
`config.data.cache_dir`, default ~/.cache/medseg_jax/cases, keyed by the
files' paths, mtimes and sizes and the preprocessing options, written
atomically) or 'none'. Nothing is ever written under `root`.

2D mode (`config.data.volume_mode='2d'`): `SliceSource` yields one record per
axial slice (index along D) with `slice_context` neighbours on each side as
extra channels. Slices keep their (resampled) in-plane size, which differs
between cases in general: batch them with `config.data.patch_size=(H, W)`
(random 2D patches, padded where a slice is smaller), or resample every case
to a common grid with `target_spacing`. Slices are not resized to
`config.data.image_size`, which would distort anatomy and spacing.
"""

import collections
import csv
import dataclasses
import hashlib
import json
import os
import re
import tempfile
import threading
import warnings
import zipfile

import numpy as np

from medseg_jax.data import preprocess
from medseg_jax.data import volume_io

AFFINE_RTOL, AFFINE_ATOL = 1e-5, 1e-3  # Image vs label affines (mm, cosines).
_CACHE_VERSION = 1
_NNUNET_NAME = re.compile(r'^(?P<case>.+)_(?P<channel>\d{4})$')


def default_cache_dir() -> str:
  """Returns ~/.cache/medseg_jax/cases (the default `config.data.cache_dir`)."""
  return os.path.join(os.path.expanduser('~'), '.cache', 'medseg_jax', 'cases')


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
  problems: list = dataclasses.field(default_factory=list)  # (path, reason)


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
    problems.append((path, f'"{what}" is not a map of indices to names: {e}.'))
    return ()
  if sorted(pairs) != list(range(len(pairs))) or not pairs:
    problems.append((path, f'"{what}" indices {sorted(pairs)} are not '
                           '0, 1, ..., n-1.'))
    return ()
  return tuple(pairs[i] for i in range(len(pairs)))


def _msd_cases(root, meta, json_path, problems) -> list:
  """Returns [Case] of an MSD data set (from `training`, else the folder)."""
  pairs = []
  if isinstance(meta.get('training'), list):
    for entry in meta['training']:
      if not isinstance(entry, dict) or 'image' not in entry:
        problems.append((json_path, f'"training" entry {entry!r} has no '
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
    if not os.path.isfile(image):
      problems.append((image, 'image listed in dataset.json does not exist.'))
    elif not os.path.isfile(label):
      problems.append((image, f'no label: expected {label}.'))
    else:
      cases.append(Case(_strip_nifti(os.path.basename(image)), (image,), label))
  return cases


def _nnunet_cases(root, ending, channels, json_path, problems) -> list:
  """Returns [Case] of an nnU-Net data set (one file per channel)."""
  if ending not in volume_io.NIFTI_SUFFIXES:
    problems.append((json_path, f'file_ending {ending!r} is not supported; '
                                'only NIfTI (.nii.gz, .nii).'))
    return []
  images_dir = os.path.join(root, 'imagesTr')
  found = collections.defaultdict(dict)
  for name in _listdir(images_dir, ending):
    match = _NNUNET_NAME.match(name[:-len(ending)])
    if not match:
      problems.append((os.path.join(images_dir, name), 'not named '
                       f'<case>_<4-digit channel>{ending} (nnU-Net layout).'))
      continue
    found[match['case']][int(match['channel'])] = os.path.join(images_dir,
                                                               name)
  cases = []
  for case_id in sorted(found):
    files = found[case_id]
    missing = [c for c in range(channels) if c not in files]
    extra = sorted(c for c in files if c >= channels)
    label = os.path.join(root, 'labelsTr', case_id + ending)
    where = os.path.join(images_dir, f'{case_id}_XXXX{ending}')
    if missing:
      problems.append((where, 'missing channel file(s) ' + ', '.join(
          f'{case_id}_{c:04d}{ending}' for c in missing) +
                       f' (dataset.json lists {channels} channels).'))
    elif extra:
      problems.append((files[extra[0]], f'channel {extra[0]} beyond the '
                       f'{channels} channels of dataset.json.'))
    elif not os.path.isfile(label):
      problems.append((files[0], f'no label: expected {label}.'))
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
    scan.problems.append((root, 'data folder does not exist '
                                '(config.data.root).'))
    return scan
  try:
    with open(json_path) as f:
      meta = json.load(f)
    if not isinstance(meta, dict):
      raise ValueError('not a JSON object')
  except (OSError, ValueError) as e:
    scan.problems.append((json_path, f'missing or invalid dataset.json ({e}); '
                                     'the MSD and nnU-Net layouts need one.'))
    return scan
  if 'channel_names' in meta or 'file_ending' in meta:
    scan.layout, names_key = 'nnunet', 'channel_names'
  elif 'modality' in meta:
    scan.layout, names_key = 'msd', 'modality'
  else:
    scan.problems.append((json_path, 'has neither "modality" (MSD) nor '
                                     '"channel_names" (nnU-Net).'))
    return scan
  for key in (names_key, 'labels'):
    if not isinstance(meta.get(key), dict):
      scan.problems.append((json_path, f'"{key}" is missing or not a map.'))
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
    scan.problems.append((os.path.join(root, 'imagesTr'),
                          'empty data set: no training case found.'))
  return scan


def read_patients_csv(path: str, case_ids) -> tuple[dict, list]:
  """Returns ({case_id: patient_id}, problems) from a case_id,patient_id CSV."""
  try:
    with open(path, newline='') as f:
      rows = list(csv.DictReader(f))
  except OSError as e:
    return {}, [(path, f'cannot read the patients CSV ({e}).')]
  if not rows or not {'case_id', 'patient_id'} <= set(rows[0]):
    return {}, [(path, 'patients CSV needs columns case_id,patient_id.')]
  mapping = {r['case_id'].strip(): r['patient_id'].strip() for r in rows}
  missing = [c for c in case_ids if not mapping.get(c)]
  if missing:
    return mapping, [(path, f'{len(missing)} case(s) have no patient_id, e.g. '
                            f'{", ".join(missing[:5])}.')]
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
  first = volume_io.read_nifti(case.images[0])
  channels = [first.array if first.array.ndim == 4 else first.array[..., None]]
  for path in case.images[1:]:
    vol = volume_io.read_nifti(path)
    _same_geometry(first, vol, case.images[0], path)
    channels.append(vol.array[..., None] if vol.array.ndim == 3 else vol.array)
  label = volume_io.read_nifti(case.label)
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


class _CaseCache:
  """Preprocessed cases in memory (byte-capped LRU) and/or on disk (.npz)."""

  def __init__(self, mode: str, cache_dir: str, root: str, memory_mb: float):
    if mode not in ('memory', 'disk', 'none'):
      raise ValueError(f"config.data.cache={mode!r} must be 'memory', 'disk' "
                       "or 'none'.")
    self.mode = mode
    self.memory_bytes = int(memory_mb * 2**20)
    self.folder = ''
    if mode == 'disk':
      base = os.path.realpath(cache_dir or default_cache_dir())
      real_root = os.path.realpath(root)
      if os.path.commonpath([base, real_root]) == real_root:
        raise ValueError(f'config.data.cache_dir={base} is inside the data '
                         f'folder {real_root}, which is never written to; '
                         'choose another folder.')
      tag = hashlib.sha1(real_root.encode()).hexdigest()[:12]
      self.folder = os.path.join(base, f'nifti-{tag}')
    self._memory = collections.OrderedDict()
    self._used = 0
    self._lock = threading.Lock()  # Grain reads with several threads.

  def __getstate__(self):
    state = dict(self.__dict__)  # Workers start with an empty memory cache.
    del state['_lock']
    state['_memory'], state['_used'] = collections.OrderedDict(), 0
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def get(self, key: str, name: str):
    """Returns the cached (image, mask, spacing) or None."""
    with self._lock:
      if key in self._memory:
        self._memory.move_to_end(key)
        return self._memory[key]
    if self.mode != 'disk':
      return None
    try:
      with np.load(self._path(key, name)) as npz:
        image, mask = npz['image'], npz['mask']
        spacing = tuple(npz['spacing'].tolist())
      for array in (image, mask):
        array.setflags(write=False)
      return image, mask, spacing
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
      return None  # Absent or unreadable: recomputed and rewritten.

  def put(self, key: str, name: str, value):
    """Stores (image, mask, spacing) in memory or atomically on disk."""
    if self.mode == 'memory':
      with self._lock:
        if key not in self._memory:  # Another thread may have stored it.
          self._memory[key] = value
          self._used += value[0].nbytes + value[1].nbytes
        while self._used > self.memory_bytes and len(self._memory) > 1:
          _, (image, mask, _) = self._memory.popitem(last=False)
          self._used -= image.nbytes + mask.nbytes
    elif self.mode == 'disk':
      try:
        self._write(key, name, value)
      except OSError as e:  # A full or read-only disk slows, never stops, us.
        warnings.warn(f'Could not cache {name} in {self.folder}: {e}')

  def _write(self, key: str, name: str, value):
    """Writes a .npz next to its final name, then renames it (atomic)."""
    os.makedirs(self.folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=self.folder, suffix='.tmp')
    try:
      with os.fdopen(fd, 'wb') as f:
        np.savez(f, image=value[0], mask=value[1],
                 spacing=np.asarray(value[2], np.float64))
      os.replace(tmp, self._path(key, name))
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)

  def _path(self, key: str, name: str) -> str:
    return os.path.join(self.folder, f'{name}-{key[:20]}.npz')


class NiftiSource:
  """Grain random-access source of NIfTI cases (MSD or nnU-Net layout).

  Record i: {'image': float32 [D, H, W, C], 'mask': uint8 [D, H, W],
  'spacing': (D, H, W) mm, 'patient_id', 'case_id'}, preprocessed by
  `preprocess.preprocess_case` with the options given.
  """

  def __init__(self, root: str, num_classes: int, preprocess_cfg=None,
               label_values=(), cache: str = 'memory', cache_dir: str = '',
               patients_csv: str = '', cache_memory_mb: float = 4096):
    """Args:
      root: the data folder (config.data.root); only read.
      num_classes: config.data.num_classes; must match dataset.json's labels
        (1 for two labels, background and foreground).
      preprocess_cfg: config.data.preprocess (None = defaults).
      label_values: config.data.label_values (see `to_class_map`).
      cache, cache_dir, cache_memory_mb: see the module docstring.
      patients_csv: optional case_id,patient_id CSV (relative to root).

    Raises:
      ValueError: every layout problem at once, or num_classes mismatch.
    """
    self.root = os.path.abspath(root)
    scan = scan_dataset(self.root)
    problems = list(scan.problems)
    k = len(scan.class_names)
    if k and max(2, int(num_classes)) != k:
      problems.append((os.path.join(self.root, 'dataset.json'),
                       f'{k} labels {list(scan.class_names)} but config.data.'
                       f'num_classes={num_classes}; set it to '
                       f'{1 if k == 2 else k}.'))
    self.patient_map = {}
    if patients_csv and scan.cases:
      csv_path = os.path.join(self.root, patients_csv)
      self.patient_map, more = read_patients_csv(
          csv_path, [c.case_id for c in scan.cases])
      problems += more
    if problems:
      raise ValueError(f'NIfTI data set {self.root}: {len(problems)} '
                       'problem(s):\n' + '\n'.join(
                           f'  {p}: {r}' for p, r in problems))
    self.layout = scan.layout
    self.cases = scan.cases
    self.channel_names = scan.channel_names
    self.class_names = scan.class_names[1:]  # Classes 1..K-1, for reports.
    self.num_classes = int(num_classes)
    self.label_values = tuple(label_values)
    self.options = preprocess.options(preprocess_cfg)
    self._case_ids = tuple(c.case_id for c in self.cases)
    self._patient_ids = tuple(self.patient_map.get(c, c)
                              for c in self._case_ids)
    self._cache = _CaseCache(cache, cache_dir, self.root, cache_memory_mb)

  def __len__(self) -> int:
    return len(self.cases)

  def __repr__(self) -> str:
    return (f'NiftiSource({self.root!r}, layout={self.layout}, '
            f'cases={len(self)}, channels={len(self.channel_names)})')

  @property
  def case_ids(self) -> list[str]:
    """The case id of every record (file name without extension)."""
    return list(self._case_ids)

  @property
  def patient_ids(self) -> list[str]:
    """The patient of every record: the patients CSV's, else the case id."""
    return list(self._patient_ids)

  def _key(self, case: Case) -> str:
    """Hash of the files (path, mtime, size) and everything that shapes data."""
    files = [(p, os.stat(p).st_mtime_ns, os.stat(p).st_size)
             for p in (*case.images, case.label)]
    blob = json.dumps([_CACHE_VERSION, files, self.options, self.num_classes,
                       [float(v) for v in self.label_values]], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()

  def load(self, index: int) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Returns the preprocessed (image, mask, spacing) of case `index`."""
    case = self.cases[index]
    key = self._key(case)
    cached = self._cache.get(key, case.case_id)
    if cached is not None:
      return cached
    image, raw, spacing = read_case_arrays(case)
    mask = to_class_map(raw, self.num_classes, self.label_values, case.label)
    try:
      value = preprocess.preprocess_case(image, mask, spacing, self.options)
    except ValueError as e:
      raise ValueError(f'{case.images[0]}: {e}') from e
    for array in value[:2]:
      array.setflags(write=False)  # Shared by every later access: no edits.
    self._cache.put(key, case.case_id, value)
    return value

  def __getitem__(self, index: int) -> dict:
    n = len(self)
    index = int(index)
    if not -n <= index < n:
      raise IndexError(f'NiftiSource index {index} out of range [0, {n}).')
    index %= n
    image, mask, spacing = self.load(index)
    return {'image': image, 'mask': mask, 'spacing': tuple(spacing),
            'patient_id': self._patient_ids[index],
            'case_id': self._case_ids[index]}

  def shapes(self) -> list[tuple[int, ...]]:
    """Returns each case's (D, H, W) after preprocessing, from headers only."""
    target = self.options['target_spacing']
    out = []
    for case in self.cases:
      shape, spacing, _, _ = volume_io.read_nifti_header(case.images[0])
      out.append(preprocess.resampled_shape(shape, spacing, target))
    return out

  def depths(self) -> list[int]:
    """Returns each case's D after preprocessing, from headers only."""
    return [shape[0] for shape in self.shapes()]


def _context_indices(z, context: int, depth: int) -> np.ndarray:
  """Slice indices z - context .. z + context, clamped to [0, depth)."""
  offsets = np.arange(-context, context + 1)
  return np.clip(np.asarray(z)[..., None] + offsets, 0, depth - 1)


def stack_slice_context(image: np.ndarray, context: int) -> np.ndarray:
  """Returns every slice of `[D, H, W, C]` with its context, for prediction.

  Returns:
    `[D, H, W, C * (2 * context + 1)]`; entry z equals
    `slice_with_context(image, z, context)`.
  """
  d, h, w, _ = image.shape
  # [D, 2c + 1, H, W, C] -> [D, H, W, 2c + 1, C] -> channels merged.
  picked = image[_context_indices(np.arange(d), context, d)]
  return np.ascontiguousarray(np.moveaxis(picked, 1, 3).reshape(d, h, w, -1))


def slice_with_context(image: np.ndarray, z: int, context: int) -> np.ndarray:
  """Returns slice z of `[D, H, W, C]` with `context` neighbours each side.

  Returns:
    `[H, W, C * (2 * context + 1)]`: slices z - context .. z + context in that
    order, each with its C channels; indices beyond the volume are clamped to
    the edge slice.
  """
  picked = image[_context_indices(z, context, image.shape[0])]
  return np.ascontiguousarray(np.moveaxis(picked, 0, 2).reshape(
      image.shape[1], image.shape[2], -1))


class SliceSource:
  """Axial slices (along D) of a volume source, for 2D training.

  Record: {'image': [H, W, C * (2 * context + 1)] (see
  `slice_with_context`), 'mask': uint8 [H, W] (the centre slice), 'spacing':
  (H, W) mm, 'patient_id' of its volume, 'case_id' like 'case_017:z042'}.
  Needs a source with `load(i)` and `depths()` (`NiftiSource`); a volume is
  decoded once per cache, so use config.data.cache 'memory' or 'disk'.
  """

  def __init__(self, volume_source, context: int = 0):
    if int(context) < 0:
      raise ValueError(f'config.data.slice_context={context} must be >= 0.')
    self.volumes = volume_source
    self.context = int(context)
    self._depths = [int(d) for d in volume_source.depths()]
    self._offsets = np.concatenate([[0], np.cumsum(self._depths)]).astype(
        np.int64)
    self._volume_ids = (tuple(volume_source.case_ids),
                        tuple(volume_source.patient_ids))
    self.channel_names = getattr(volume_source, 'channel_names', ())
    self.class_names = getattr(volume_source, 'class_names', ())

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def __repr__(self) -> str:
    return f'SliceSource({self.volumes!r}, context={self.context})'

  def locate(self, index: int) -> tuple[int, int]:
    """Returns (volume index, slice index z) of record `index`."""
    v = int(np.searchsorted(self._offsets, index, side='right')) - 1
    return v, int(index - self._offsets[v])

  @property
  def patient_ids(self) -> list[str]:
    """Each slice's patient: that of its volume."""
    return [p for p, d in zip(self._volume_ids[1], self._depths)
            for _ in range(d)]

  @property
  def case_ids(self) -> list[str]:
    """Each slice's id: '<volume case id>:z<slice index, 3 digits>'."""
    return [f'{c}:z{z:03d}' for c, d in zip(self._volume_ids[0], self._depths)
            for z in range(d)]

  def __getitem__(self, index: int) -> dict:
    n = len(self)
    index = int(index)
    if not -n <= index < n:
      raise IndexError(f'SliceSource index {index} out of range [0, {n}).')
    v, z = self.locate(index % n)
    image, mask, spacing = self.volumes.load(v)
    case_id, patient_id = (ids[v] for ids in self._volume_ids)
    if image.shape[0] != self._depths[v]:
      raise ValueError(f'{case_id}: {image.shape[0]} slices after '
                       'preprocessing, but its header promised '
                       f'{self._depths[v]}.')
    return {'image': slice_with_context(image, z, self.context),
            'mask': mask[z], 'spacing': tuple(spacing[1:]),
            'patient_id': patient_id, 'case_id': f'{case_id}:z{z:03d}'}


def _nifti_cfg(data_cfg) -> dict:
  sub = data_cfg.get('nifti', None)
  return dict(sub) if sub else {}


def build_nifti_source(data_cfg):
  """Returns the `nifti` source of `config.data`: volumes or 2D slices.

  Args:
    data_cfg: config.data; reads root, num_classes, in_channels, label_values,
      preprocess, cache, cache_dir, cache_memory_mb, volume_mode,
      slice_context and nifti.patients_csv.

  Returns:
    A NiftiSource ('3d') or a SliceSource over one ('2d').

  Raises:
    ValueError: missing root, data set problems, in_channels that does not
      match the data (names the value to set), or 2D slices of several sizes
      without config.data.patch_size.
  """
  root = data_cfg.get('root', '')
  if not root:
    raise ValueError("config.data.source='nifti' needs config.data.root: the "
                     'folder holding dataset.json, imagesTr/ and labelsTr/.')
  source = NiftiSource(
      root, num_classes=int(data_cfg.get('num_classes', 1)),
      preprocess_cfg=data_cfg.get('preprocess', None),
      label_values=tuple(data_cfg.get('label_values', ())),
      cache=data_cfg.get('cache', 'memory'),
      cache_dir=data_cfg.get('cache_dir', ''),
      patients_csv=_nifti_cfg(data_cfg).get('patients_csv', ''),
      cache_memory_mb=float(data_cfg.get('cache_memory_mb', 4096)))
  mode = data_cfg.get('volume_mode', '3d')
  if mode not in ('2d', '3d'):
    raise ValueError(f"config.data.volume_mode={mode!r} must be '2d' or '3d'.")
  context = int(data_cfg.get('slice_context', 0)) if mode == '2d' else 0
  want = len(source.channel_names) * (2 * context + 1)
  have = int(data_cfg.get('in_channels', want))
  if have != want:
    raise ValueError(
        f'config.data.in_channels={have}, but the data set has '
        f'{len(source.channel_names)} channel(s) {list(source.channel_names)}'
        + (f' x {2 * context + 1} slices (slice_context={context})'
           if context else '') + f': set config.data.in_channels={want}.')
  if mode == '3d':
    return source
  sizes = {shape[1:] for shape in source.shapes()}
  if len(sizes) > 1 and not tuple(data_cfg.get('patch_size', ()) or ()):
    raise ValueError(
        f'volume_mode=2d: slices have {len(sizes)} different (H, W) sizes, '
        f'e.g. {sorted(sizes)[:3]}, which cannot be batched; set '
        'config.data.patch_size=(H, W) (random 2D patches, padded where a '
        'slice is smaller) or a target_spacing that gives one size.')
  return SliceSource(source, context)


def _case_problems(case: Case, num_classes, label_values, channels) -> list:
  """Returns the (path, reason) problems of one case's files (all read)."""
  try:
    image, raw, _ = read_case_arrays(case)
  except volume_io.FileError as e:
    return [(e.path, e.reason)]
  problems = []
  if channels and image.shape[-1] != channels:
    problems.append((case.images[0], f'{image.shape[-1]} channel(s), but '
                                     f'dataset.json lists {channels}.'))
  if not np.isfinite(image).all():
    problems.append((case.images[0], 'image has NaN or inf values.'))
  try:
    to_class_map(raw, num_classes, label_values, case.label)
  except volume_io.FileError as e:
    problems.append((e.path, e.reason))
  return problems


def find_problems_3d(data_cfg) -> list[tuple[str, str]]:
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
    [(path, reason)] tuples (medseg_jax/data/check.py's `Problem` did not
    exist yet), empty when the data set is usable.
  """
  if not data_cfg.get('root', ''):
    return [('config.data.root', "not set; source 'nifti' needs the folder "
             'holding dataset.json, imagesTr/ and labelsTr/.')]
  root = os.path.abspath(data_cfg.get('root'))
  scan = scan_dataset(root)
  problems = list(scan.problems)
  json_path = os.path.join(root, 'dataset.json')
  num_classes = int(data_cfg.get('num_classes', 1))
  k = len(scan.class_names)
  if k and max(2, num_classes) != k:
    problems.append((json_path, f'{k} labels {list(scan.class_names)} but '
                                f'config.data.num_classes={num_classes}; set '
                                f'it to {1 if k == 2 else k}.'))
  context = (int(data_cfg.get('slice_context', 0))
             if data_cfg.get('volume_mode', '3d') == '2d' else 0)
  want = len(scan.channel_names) * (2 * context + 1)
  have = data_cfg.get('in_channels', None)
  if scan.channel_names and have is not None and int(have) != want:
    problems.append((json_path, f'{len(scan.channel_names)} channel(s) '
                                f'{list(scan.channel_names)} (x '
                                f'{2 * context + 1}'
                                f' slices) but config.data.in_channels={have}; '
                                f'set it to {want}.'))
  patients_csv = _nifti_cfg(data_cfg).get('patients_csv', '')
  if patients_csv and scan.cases:
    problems += read_patients_csv(os.path.join(root, patients_csv),
                                  [c.case_id for c in scan.cases])[1]
  label_values = tuple(data_cfg.get('label_values', ()))
  for case in scan.cases:
    problems += _case_problems(case, num_classes, label_values,
                               len(scan.channel_names))
  return problems
