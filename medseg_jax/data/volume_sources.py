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

An MSD `training` entry's image may be a DICOM series folder (CT, MR or
PET; `dicom_series`), its label a NIfTI file or a folder of one PNG per
slice (`volume_io.read_png_slices`). With `preprocess.intensity='suv'`
every image is a PET series converted to SUV with its tags.

Decoded, preprocessed cases are cached as `config.data.cache` says
(`cache.CaseCache`). Nothing is ever written under `root`. With
`preprocess.register_to`, `medseg_jax.register_cases` computes each case's
channel transforms (JAX) and hands them to `set_registration`; decoding
applies them (SciPy) and the cache key includes them.
`find_problems(config.data)` is the data-set check of this source.

2D mode (`config.data.volume_mode='2d'`): `SliceSource` yields one record per
axial slice (index along D) with `slice_context` neighbours on each side as
extra channels. Slices keep their (resampled) in-plane size, which differs
between cases in general: batch them with `config.data.patch_size=(H, W)`
(random 2D patches, padded where a slice is smaller), or resample every case
to a common grid with `target_spacing`. Slices are not resized to
`config.data.image_size`, which would distort anatomy and spacing.
"""

import os

import numpy as np

from medseg_jax.data import cache as cache_lib
from medseg_jax.data import dicom_series
from medseg_jax.data import nifti_layout
from medseg_jax.data import patches
from medseg_jax.data import preprocess
from medseg_jax.data import splits
from medseg_jax.data import volume_io
from medseg_jax.data.errors import Problem
from medseg_jax.data.nifti_layout import Case
from medseg_jax.data.nifti_layout import nifti_options
from medseg_jax.data.nifti_layout import read_case_arrays
from medseg_jax.data.nifti_layout import read_patients_csv
from medseg_jax.data.nifti_layout import scan_dataset
from medseg_jax.data.nifti_layout import to_class_map


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
    problems += nifti_layout.num_classes_problems(scan, self.root,
                                                  num_classes)
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
    self._cache = cache_lib.CaseCache(cache, cache_dir, self.root,
                                      cache_memory_mb, kind='nifti')
    self._registration = None  # Per case: a matrix (or None) per channel.

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

  def load(self, index: int) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Returns the preprocessed (image, mask, spacing) of case `index`."""
    case = self.cases[index]
    options = [self.options, self.num_classes,
               [float(v) for v in self.label_values]]
    matrices = self._case_registration(index)
    if matrices is not None:
      options.append([None if m is None else np.asarray(m).tolist()
                      for m in matrices])
    files = [f for path in (*case.images, case.label)
             for f in volume_io.volume_files(path)]
    image, mask, spacing = self._cache.get_or_compute(
        index, case.case_id, lambda: cache_lib.files_key(files, options),
        lambda: self._decode(case, matrices))
    return image, mask, tuple(spacing.tolist())

  def set_registration(self, matrices) -> None:
    """Sets each case's channel transforms (`register_cases.attach`).

    Args:
      matrices: one list per case of one entry per channel: None, or the
        homogeneous matrix mapping register_to-channel physical coordinates
        to that channel's (see `preprocess.apply_channel_transforms`).
    """
    if len(matrices) != len(self.cases):
      raise ValueError(f'{len(matrices)} registrations for {len(self)} cases.')
    self._registration = list(matrices)

  def _case_registration(self, index: int):
    """The channel transforms of case `index`, None without registration."""
    if self.options['register_to'] < 0:
      return None
    if self._registration is None:
      raise ValueError(
          'config.data.preprocess.register_to='
          f'{self.options["register_to"]}, but no registration was computed '
          'for this source: call medseg_jax.register_cases.attach(source, '
          'config.data) after building it.')
    return self._registration[index]

  def read_raw(self, index: int) -> tuple[np.ndarray, tuple]:
    """Returns case `index`'s image `[D, H, W, C]` as stored, and spacing."""
    image, _, spacing = read_case_arrays(self.cases[index])
    return image, tuple(float(s) for s in spacing)

  def _decode(self, case: Case, matrices=None) -> tuple:
    """Reads and preprocesses a case: (image, mask, spacing as an array)."""
    image, raw, spacing = read_case_arrays(case)
    mask = to_class_map(raw, self.num_classes, self.label_values, case.label)
    if self.options['intensity'] == 'suv':
      image = image * dicom_series.suv_factors(case.images, image.shape[-1])
    if matrices is not None:
      image = preprocess.apply_channel_transforms(image, spacing, matrices)
    try:
      image, mask, spacing = preprocess.preprocess_case(image, mask, spacing,
                                                        self.options)
    except ValueError as e:
      raise ValueError(f'{case.images[0]}: {e}') from e
    return image, mask, np.asarray(spacing, np.float64)

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
      shape, spacing, _, _ = volume_io.read_volume_header(case.images[0])
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
  if not data_cfg.root:
    raise ValueError("config.data.source='nifti' needs config.data.root: the "
                     'folder holding dataset.json, imagesTr/ and labelsTr/.')
  source = NiftiSource(
      data_cfg.root, num_classes=int(data_cfg.num_classes),
      preprocess_cfg=data_cfg.preprocess,
      label_values=tuple(data_cfg.label_values),
      cache=data_cfg.cache, cache_dir=data_cfg.cache_dir,
      patients_csv=nifti_options(data_cfg).get('patients_csv', ''),
      # Not in configs/default.py: a memory cap few need to change.
      cache_memory_mb=float(data_cfg.get('cache_memory_mb', 4096)))
  mode = data_cfg.volume_mode
  if mode not in ('2d', '3d'):
    raise ValueError(f"config.data.volume_mode={mode!r} must be '2d' or '3d'.")
  context = int(data_cfg.slice_context) if mode == '2d' else 0
  want = len(source.channel_names) * (2 * context + 1)
  have = int(data_cfg.in_channels)
  if have != want:
    raise ValueError(
        f'config.data.in_channels={have}, but the data set has '
        f'{len(source.channel_names)} channel(s) {list(source.channel_names)}'
        + (f' x {2 * context + 1} slices (slice_context={context})'
           if context else '') + f': set config.data.in_channels={want}.')
  if mode == '3d':
    return source
  sizes = {shape[1:] for shape in source.shapes()}
  if len(sizes) > 1 and not patches.patch_size(data_cfg):
    raise ValueError(
        f'volume_mode=2d: slices have {len(sizes)} different (H, W) sizes, '
        f'e.g. {sorted(sizes)[:3]}, which cannot be batched; set '
        'config.data.patch_size=(H, W) (random 2D patches, padded where a '
        'slice is smaller) or a target_spacing that gives one size.')
  return SliceSource(source, context)


def find_problems(data_cfg) -> list[Problem]:
  """Returns every problem of a 'nifti' data set; reads every case once.

  Args:
    data_cfg: config.data.

  Returns:
    `nifti_layout.find_problems_3d`, then split problems; [] when usable.
  """
  problems = nifti_layout.find_problems_3d(data_cfg)
  if not data_cfg.root:
    return problems
  root = os.path.abspath(data_cfg.root)
  cases = scan_dataset(root).cases
  case_ids = [c.case_id for c in cases]
  if preprocess.options(data_cfg.preprocess)['intensity'] == 'suv':
    problems += dicom_series.suv_problems(cases)
  patients_csv = nifti_options(data_cfg).get('patients_csv')
  mapping = {}
  if patients_csv and case_ids:
    mapping, _ = read_patients_csv(os.path.join(root, patients_csv), case_ids)
  # A split depends only on the set of patients, so volumes stand for their
  # slices in 2D mode.
  return problems + splits.split_problems(
      [mapping.get(c) or c for c in case_ids], data_cfg)
