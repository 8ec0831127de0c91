"""NIfTI data sets (MSD and nnU-Net layouts) as Grain sources, 3D or 2D slices.

Layouts under `config.data.root`, told apart by `dataset.json` (listed,
read and checked by `nifti_layout`):

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
import hashlib
import json
import os
import tempfile
import threading
import warnings
import zipfile

import numpy as np

from medseg_jax.data import preprocess
from medseg_jax.data import volume_io
from medseg_jax.data.nifti_layout import Case
from medseg_jax.data.nifti_layout import nifti_options
from medseg_jax.data.nifti_layout import read_case_arrays
from medseg_jax.data.nifti_layout import read_patients_csv
from medseg_jax.data.nifti_layout import scan_dataset
from medseg_jax.data.nifti_layout import to_class_map

_CACHE_VERSION = 1


def default_cache_dir() -> str:
  """Returns ~/.cache/medseg_jax/cases (the default `config.data.cache_dir`)."""
  return os.path.join(os.path.expanduser('~'), '.cache', 'medseg_jax', 'cases')


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
      patients_csv=nifti_options(data_cfg).get('patients_csv', ''),
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
