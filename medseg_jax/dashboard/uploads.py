"""Reading uploads: images, NIfTI, DICOM (a file or a zipped series), masks.

An upload is a name and its bytes. Each is written into a temporary folder
that is removed as soon as it is read, and read by the same functions as
`--mode=predict` (`Predictor.read_file`; `image_io` and `volume_io` for
ground-truth masks). Any
failure becomes an `UploadError` with one line naming the upload, which the
app shows instead of crashing.
"""

import contextlib
import dataclasses
import os
import re
import tempfile
import zipfile

import numpy as np

from medseg_jax.data import errors
from medseg_jax.data import image_io
from medseg_jax.data import volume_io

IMAGE_TYPES = tuple(e.lstrip('.') for e in image_io.IMAGE_EXTENSIONS)
UPLOAD_TYPES = (*IMAGE_TYPES, 'nii', 'gz', 'dcm', 'zip')
# A zipped DICOM series larger than this unpacked is refused (zip bombs).
MAX_UNZIPPED_BYTES = 4 << 30
# Suffixes that mark a ground-truth mask's name ('ISIC_001_segmentation.png').
MASK_SUFFIXES = ('_segmentation', '_seg', '_mask', '_label', '_labels', '_gt',
                 '-mask', '-seg', '-gt')


class UploadError(ValueError):
  """An upload that cannot be used; `str()` is the line to show."""


@dataclasses.dataclass(frozen=True)
class Case:
  """An uploaded case, ready for `Predictor.predict`.

  Attributes:
    name: the upload's file name.
    kind: 'image' (2D) or 'volume' (3D).
    image: uint8 `[H, W, C]` photograph or float32 `[D, H, W, C]` volume.
    spacing: mm per spatial axis of `image` ((H, W) or (D, H, W)), or None
      when the file does not say (photographs).
    volume: the volume read (affine, header) to write NIfTI masks in the
      input geometry; None for photographs.
  """
  name: str
  kind: str
  image: np.ndarray
  spacing: tuple[float, ...] | None = None
  volume: volume_io.Volume | None = None


def kind_of(name: str) -> str:
  """Returns 'image', 'nifti', 'dicom' or 'zip' for an upload name.

  Raises:
    UploadError: any other file type (names the types accepted).
  """
  lower = name.lower()
  if image_io.is_image_file(lower):
    return 'image'
  if volume_io.is_nifti(lower):
    return 'nifti'
  if lower.endswith(('.dcm', '.dicom')):
    return 'dicom'
  if lower.endswith('.zip'):
    return 'zip'
  raise UploadError(
      f'{name}: unsupported file type; upload PNG/JPEG/TIFF images, NIfTI '
      '(.nii, .nii.gz), DICOM (.dcm) or a ZIP of one DICOM series.')


def _safe_name(name: str) -> str:
  """The upload's base name, usable as a file name in the temp folder."""
  base = os.path.basename(name.replace('\\', '/')) or 'upload'
  return re.sub(r'[^\w.\-]', '_', base)


def _unzip_series(data_path: str, folder: str, name: str) -> str:
  """Extracts a ZIP's files flat into `folder`/series; returns that folder.

  Flat extraction never writes outside `folder` (names with '..' or absolute
  paths cannot escape); two series in one ZIP are then refused by the DICOM
  reader as a mixed series.
  """
  series = os.path.join(folder, 'series')
  os.makedirs(series)
  try:
    with zipfile.ZipFile(data_path) as archive:
      members = [m for m in archive.infolist() if not m.is_dir()
                 and not m.filename.startswith('__MACOSX/')
                 and not os.path.basename(m.filename).startswith('.')]
      if sum(m.file_size for m in members) > MAX_UNZIPPED_BYTES:
        raise UploadError(f'{name}: unpacks to more than '
                          f'{MAX_UNZIPPED_BYTES >> 30} GiB; upload one series.')
      for i, member in enumerate(members):
        target = os.path.join(series, f'{i:05d}_{_safe_name(member.filename)}')
        with archive.open(member) as src, open(target, 'wb') as dst:
          dst.write(src.read())
  except zipfile.BadZipFile as e:
    raise UploadError(f'{name}: not a readable ZIP file ({e}).') from e
  if not members:
    raise UploadError(f'{name}: the ZIP holds no files; zip the folder of '
                      'one DICOM series.')
  return series


@contextlib.contextmanager
def _on_disk(name: str, data: bytes):
  """Yields (the upload's path in a temporary folder, the folder), removed
  afterwards."""
  with tempfile.TemporaryDirectory(prefix='medseg_dashboard_') as folder:
    path = os.path.join(folder, _safe_name(name))
    with open(path, 'wb') as f:
      f.write(data)
    yield path, folder


def _message(error: Exception, name: str, folder: str) -> str:
  """One line for a failed read, naming the upload instead of temp paths."""
  if isinstance(error, errors.FileError):
    text = error.reason
  else:
    text = str(error) or type(error).__name__
  text = re.sub(re.escape(folder) + r'[^\s:,)]*', name, text)
  text = text.removeprefix(f'{name}: ')
  return f'{name}: {text}'


def _case(name: str, read, two_d: bool) -> Case:
  """The Case of a `predictor.InputCase` (one slice: an image for 2D runs)."""
  if read.kind == 'image':
    return Case(name, 'image', read.image)
  if two_d and read.image.shape[0] == 1:
    image = image_io._stretch_to_uint8(read.image[0])  # pylint: disable=protected-access
    return Case(name, 'image', image, tuple(read.spacing[1:]), read.volume)
  return Case(name, 'volume', read.image, tuple(read.spacing), read.volume)


def read_case(name: str, data: bytes, read_file, two_d: bool) -> Case:
  """Reads one uploaded image, NIfTI file, DICOM file or zipped DICOM series.

  Args:
    name: the upload's file name (its extension says what it is).
    data: its bytes.
    read_file: the model's reader, `Predictor.read_file` (so the upload is
      read exactly as `--mode=predict` reads a file, e.g. SUV for PET runs).
    two_d: the model predicts 2D images: a single-slice DICOM/NIfTI is then
      given to it as an image (stretched to 0..255, as 16-bit images are),
      keeping its pixel spacing.

  Returns:
    The Case.

  Raises:
    UploadError: an unsupported, corrupt or unreadable upload (one line).
  """
  kind = kind_of(name)
  with _on_disk(name, data) as (path, folder):
    try:
      if kind == 'zip':
        path = _unzip_series(path, folder, name)
      return _case(name, read_file(path), two_d)
    except UploadError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # Readers raise many types for corrupt files; the app must go on.
      raise UploadError(_message(e, name, folder)) from e


def read_ground_truth(name: str, data: bytes, case: Case, config) -> np.ndarray:
  """Reads a ground-truth mask for `case` as class indices of its shape.

  Args:
    name: the mask upload's name: an image mask (values as the training
      masks: 0/255, 0/1, 0..K-1 or config.data.label_values) or a NIfTI /
      DICOM label volume (class indices).
    data: its bytes.
    case: the case it belongs to.
    config: the run's config (data.num_classes, data.label_values).

  Returns:
    uint8 class indices with the spatial shape of `case.image`.

  Raises:
    UploadError: unreadable mask, values outside the classes, or another
      shape than the case's (names both).
  """
  kind = kind_of(name)
  with _on_disk(name, data) as (path, folder):
    try:
      if kind == 'image':
        raw = image_io.read_mask(path)
      else:
        if kind == 'zip':
          path = _unzip_series(path, folder, name)
        raw = np.rint(volume_io.read_volume(path).array).astype(np.int64)
        if raw.ndim == 4 and raw.shape[-1] == 1:
          raw = raw[..., 0]
        if case.kind == 'image' and raw.ndim == 3 and raw.shape[0] == 1:
          raw = raw[0]
      labels = image_io.map_labels(
          raw.reshape(-1, raw.shape[-1]), tuple(config.data.label_values),
          config.data.num_classes, name).reshape(raw.shape)
    except UploadError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise UploadError(_message(e, name, folder)) from e
  shape = case.image.shape[:-1]
  if labels.shape != shape:
    raise UploadError(f'{name}: the mask has shape {labels.shape}, its image '
                      f'{case.name} has {shape}; upload the mask of that '
                      'image.')
  return labels


def stem(name: str) -> str:
  """Returns the lower-case name without extension(s) and mask suffix."""
  base = os.path.basename(name).lower()
  for suffix in ('.nii.gz', '.nii', '.zip', '.dcm', *image_io.IMAGE_EXTENSIONS):
    if base.endswith(suffix):
      base = base[:-len(suffix)]
      break
  for suffix in MASK_SUFFIXES:
    if base.endswith(suffix):
      return base[:-len(suffix)]
  return base


def match_ground_truth(case_names, mask_names) -> dict[str, str]:
  """Pairs cases with ground-truth masks by file name.

  'ISIC_0001.jpg' pairs with 'ISIC_0001_segmentation.png' (or '_mask',
  '_seg', '_gt', ...; see MASK_SUFFIXES); 'case_7.nii.gz' with a mask upload
  of the same name. A mask that fits several cases, or none, is not paired.

  Args:
    case_names: the uploaded cases' names.
    mask_names: the uploaded masks' names.

  Returns:
    {case name: mask name} for the cases with exactly one matching mask.
  """
  by_stem = {}
  for mask in mask_names:
    by_stem.setdefault(stem(mask), []).append(mask)
  case_stems = [stem(c) for c in case_names]
  pairs = {}
  for case, key in zip(case_names, case_stems):
    masks = by_stem.get(key, [])
    if len(masks) == 1 and case_stems.count(key) == 1:
      pairs[case] = masks[0]
  return pairs
