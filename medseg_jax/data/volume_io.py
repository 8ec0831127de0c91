"""Volume I/O: NIfTI files (nibabel) and DICOM series (pydicom), (D, H, W).

Axis convention (used by every volume in medseg_jax): arrays are
`[D, H, W]` or `[D, H, W, C]` with D the slice axis.

* NIfTI: nibabel's array is indexed `(i, j, k[, c])` (x, y, z on disk); it is
  transposed to `(k, j, i[, c])` = `(D, H, W[, C])`, and the header's voxel
  sizes `(sx, sy, sz)` become `spacing = (sz, sy, sx)`. `Volume.affine` stays
  the NIfTI affine, i.e. it maps nibabel's `(i, j, k)` = our `(w, h, d)` to
  RAS+ millimetres; `write_nifti_like` transposes back, so a written mask has
  exactly the input's shape, affine and voxel sizes.
* DICOM: slices are sorted along the slice normal and stacked as
  `[slice, row, column]` = `(D, H, W)`. The affine is that of SimpleITK's
  DICOM reader (index x = column, y = row, z = slice; origin = the first
  slice's ImagePositionPatient; direction = row and column cosines and the
  slice step) converted from DICOM's LPS to NIfTI's RAS+ by negating x and y,
  i.e. nibabel index `(i, j, k)` = (column, row, slice). dcm2niix describes
  the same world points (it may store the rows flipped, with an affine to
  match). `write_nifti_like` hence writes a NIfTI for a DICOM input.

A volume's intensities are returned as stored (NIfTI scaling and DICOM
RescaleSlope/Intercept applied): float32 for images, integers for labels
stored as integers.
"""

import dataclasses
import os
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from pydicom import errors as dicom_errors

# Re-exported: callers catch it as volume_io.FileError.
from medseg_jax.data.errors import FileError  # pylint: disable=unused-import

NIFTI_SUFFIXES = ('.nii', '.nii.gz')
_ORIENTATION_TOL = 1e-4  # Cosines: identical within float32 text rounding.
_SPACING_RTOL = 0.01  # Slice gaps may differ by 1% (rounding of positions).


@dataclasses.dataclass
class Volume:
  """A volume in (D, H, W) order and what is needed to write results back.

  Attributes:
    array: `[D, H, W]` or `[D, H, W, C]`; float32, or integer for labels.
    spacing: (D, H, W) voxel size in mm.
    affine: 4x4 NIfTI affine: nibabel voxel index (i, j, k) = (w, h, d) ->
      RAS+ mm.
    header: the nibabel header (NIfTI inputs), None for DICOM.
  """
  array: np.ndarray
  spacing: tuple[float, float, float]
  affine: np.ndarray
  header: Any = None


def is_nifti(path: str) -> bool:
  """Returns whether `path` names a NIfTI file (.nii or .nii.gz)."""
  return str(path).lower().endswith(NIFTI_SUFFIXES)


def _to_dhw(data: np.ndarray, path: str) -> np.ndarray:
  """Returns nibabel's (x, y, z[, c]) array as (D, H, W[, C])."""
  if data.ndim == 5 and data.shape[3] == 1:  # NIfTI vectors: (x, y, z, 1, c).
    data = data[:, :, :, 0]
  if data.ndim == 2:  # A single slice.
    data = data[:, :, None]
  if data.ndim == 3:
    return np.ascontiguousarray(data.transpose(2, 1, 0))
  if data.ndim == 4:
    return np.ascontiguousarray(data.transpose(2, 1, 0, 3))
  raise FileError(path, f'NIfTI array of shape {data.shape} is neither 3D '
                  '(x, y, z) nor 4D (x, y, z, channels).')


def nifti_geometry(image) -> tuple[tuple[int, ...], tuple[float, ...], int]:
  """Returns ((D, H, W), (D, H, W) spacing in mm, channels) from a header.

  Args:
    image: a nibabel image (only its header is read; no voxel is decoded).
  """
  shape = tuple(int(s) for s in image.shape)
  if len(shape) == 5 and shape[3] == 1:
    shape = shape[:3] + shape[4:]
  if len(shape) == 2:
    shape = shape + (1,)
  # Shortest decimal of the stored float32 (0.8, not 0.800000011920929).
  zooms = tuple(float(str(np.float32(z)))
                for z in image.header.get_zooms()[:3])
  zooms = zooms + (1.0,) * (3 - len(zooms))
  channels = shape[3] if len(shape) > 3 else 1
  return shape[2::-1], zooms[::-1], channels


def read_nifti_header(path: str):
  """Returns ((D, H, W), spacing, channels, affine) of a NIfTI without its data.

  Raises:
    FileError: the file is not a readable NIfTI (a ValueError).
  """
  try:
    image = nib.load(os.fspath(path))
  except Exception as e:  # nibabel raises many types for corrupt files.
    raise FileError(path, f'not a readable NIfTI file ({e}).') from e
  shape, spacing, channels = nifti_geometry(image)
  return shape, spacing, channels, np.asarray(image.affine, np.float64)


def read_nifti(path: str) -> Volume:
  """Reads a NIfTI file as a (D, H, W[, C]) volume.

  Args:
    path: a .nii or .nii.gz file.

  Returns:
    The Volume: integer data stays integer (labels), anything else (or data
    with a scaling slope/intercept) becomes float32.

  Raises:
    FileError: unreadable/corrupt file or unsupported number of axes (a
      ValueError naming the file).
  """
  try:
    image = nib.load(os.fspath(path))
    data = np.asanyarray(image.dataobj)
  except Exception as e:  # Truncated gzip, bad header, ...: say which file.
    raise FileError(path, f'not a readable NIfTI file ({e}).') from e
  if not np.issubdtype(data.dtype, np.integer) and data.dtype != bool:
    data = data.astype(np.float32, copy=False)
  _, spacing, _ = nifti_geometry(image)
  return Volume(array=_to_dhw(data, path), spacing=spacing,
                affine=np.asarray(image.affine, np.float64),
                header=image.header)


def _output_dtype(array: np.ndarray):
  """uint8 for masks (integers/bools), int16 for large labels, else float32."""
  if array.dtype == bool:
    return np.uint8
  if np.issubdtype(array.dtype, np.integer):
    lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
    return np.uint8 if lo >= 0 and hi < 256 else np.int16
  return np.float32


def write_nifti_like(path: str, array: np.ndarray, reference: Volume) -> None:
  """Writes a mask or probability map in the geometry of `reference`.

  Args:
    path: output file (.nii or .nii.gz).
    array: `[D, H, W]` (a mask: integers, written as uint8) or `[D, H, W, K]`
      (probabilities/maps: floats, written as float32), with the spatial
      shape of `reference.array`.
    reference: the volume the array was predicted from; its affine and header
      (voxel sizes, orientation codes) are reused.

  Raises:
    ValueError: the spatial shape differs from the reference's.
  """
  array = np.asarray(array)
  ref_shape = tuple(reference.array.shape[:3])
  if array.ndim not in (3, 4) or tuple(array.shape[:3]) != ref_shape:
    raise ValueError(
        f'{path}: cannot write an array of shape {array.shape} in the geometry '
        f'of a volume of shape (D, H, W) = {ref_shape}; resample it to that '
        'shape first (preprocess.resample_to_shape).')
  dtype = _output_dtype(array)
  data = array.transpose(2, 1, 0) if array.ndim == 3 else array.transpose(
      2, 1, 0, 3)
  data = np.ascontiguousarray(data.astype(dtype, copy=False))
  header = None if reference.header is None else reference.header.copy()
  image = nib.Nifti1Image(data, reference.affine, header=header)
  image.set_data_dtype(dtype)
  # The reference's intensity scaling and intent do not apply to the output.
  image.header.set_slope_inter(1.0, 0.0)
  image.header.set_intent('none')
  if header is None:  # DICOM input: its affine is scanner (patient) space.
    image.set_qform(reference.affine, code='scanner')
    image.set_sform(reference.affine, code='scanner')
  nib.save(image, os.fspath(path))


# ----------------------------------------------------------------- DICOM


def _dicom_files(directory: str) -> list[str]:
  """Returns the candidate files of a series folder (hidden files skipped)."""
  if os.path.isfile(directory):
    return [directory]
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{directory}: no such DICOM file or folder.')
  return [os.path.join(directory, n) for n in sorted(os.listdir(directory))
          if not n.startswith('.') and n.upper() != 'DICOMDIR'
          and os.path.isfile(os.path.join(directory, n))]


def _read_slices(directory: str) -> list:
  """Returns the parsed DICOM images of a folder; raises on a bad .dcm file."""
  slices = []
  for path in _dicom_files(directory):
    try:
      ds = pydicom.dcmread(path)
    except dicom_errors.InvalidDicomError as e:
      if path.lower().endswith('.dcm'):
        raise ValueError(f'{path}: not a readable DICOM file ({e}).') from e
      continue  # A README or similar beside the series.
    except Exception as e:  # Truncated files and the like.
      raise ValueError(f'{path}: not a readable DICOM file ({e}).') from e
    if 'PixelData' not in ds:
      continue  # Structured reports, presentation states: no image.
    ds.filename = path
    slices.append(ds)
  if not slices:
    raise ValueError(f'{directory}: no DICOM image found.')
  return slices


def _same(slices, key, directory, what):
  """Returns the single value of `key` over `slices`, or raises naming both."""
  values = {str(getattr(ds, key, None)) for ds in slices}
  if len(values) > 1:
    raise ValueError(
        f'{directory}: the files mix {len(values)} different {what} '
        f'({key}: {sorted(values)[:3]}...); put each series in its own '
        'folder.')
  return getattr(slices[0], key, None)


def _orientation(slices, directory) -> np.ndarray:
  """Returns [row direction, column direction, normal] (3x3, LPS) or raises."""
  iops = np.array([[float(v) for v in ds.ImageOrientationPatient]
                   for ds in slices])
  if np.abs(iops - iops[0]).max() > _ORIENTATION_TOL:
    raise ValueError(f'{directory}: slices have different '
                     'ImageOrientationPatient values (mixed series?).')
  row, col = iops[0, :3], iops[0, 3:]
  return np.stack([row, col, np.cross(row, col)])


def _sorted_slices(slices, normal, directory):
  """Returns (slices sorted along the normal, their positions along it)."""
  if all('ImagePositionPatient' in ds for ds in slices):
    pos = np.array([np.dot([float(v) for v in ds.ImagePositionPatient],
                           normal) for ds in slices])
    order = np.argsort(pos, kind='stable')
    pos = pos[order]
    if len(pos) > 1 and np.min(np.diff(pos)) < 1e-4:
      raise ValueError(
          f'{directory}: two slices share a position along the slice normal; '
          'the folder mixes time points, echoes or series. Put each 3D series '
          'in its own folder.')
    return [slices[i] for i in order], pos
  numbers = [int(getattr(ds, 'InstanceNumber', 0) or 0) for ds in slices]
  order = np.argsort(numbers, kind='stable')
  return [slices[i] for i in order], None


def _slice_step(slices, positions, directory) -> float:
  """Returns the distance between slices in mm (uniform, or raises)."""
  if positions is not None and len(positions) > 1:
    gaps = np.diff(positions)
    step = float(np.median(gaps))
    if np.abs(gaps - step).max() > _SPACING_RTOL * step + 1e-3:
      raise ValueError(
          f'{directory}: slice gaps are not uniform (from {gaps.min():.4g} to '
          f'{gaps.max():.4g} mm): missing slices or a mixed series.')
    return step
  ds = slices[0]
  return float(getattr(ds, 'SpacingBetweenSlices', None) or
               getattr(ds, 'SliceThickness', None) or 1.0)


def _pixels(ds) -> np.ndarray:
  """Returns one slice as float32 [rows, columns], rescale applied."""
  if int(getattr(ds, 'NumberOfFrames', 1) or 1) > 1:
    raise ValueError(f'{ds.filename}: multi-frame DICOM is not supported; '
                     'convert it with dcm2niix and use the NIfTI file.')
  if int(getattr(ds, 'SamplesPerPixel', 1)) != 1:
    raise ValueError(f'{ds.filename}: colour DICOM images are not volumes.')
  slope = float(getattr(ds, 'RescaleSlope', 1.0) or 1.0)
  intercept = float(getattr(ds, 'RescaleIntercept', 0.0) or 0.0)
  try:
    pixels = ds.pixel_array.astype(np.float32)
  except Exception as e:  # Compressed syntax without a decoder, bad data.
    raise ValueError(f'{ds.filename}: cannot decode the pixels ({e}).') from e
  return pixels * np.float32(slope) + np.float32(intercept)


def read_dicom_series(directory: str) -> Volume:
  """Reads one DICOM series (a folder of single-frame slices) as a volume.

  Slices are sorted by ImagePositionPatient projected on the slice normal
  (row x column direction of ImageOrientationPatient), or by InstanceNumber
  when positions are missing. RescaleSlope/Intercept are applied (CT in HU).

  Args:
    directory: the series folder (or a single DICOM file). Files that are
      not DICOM and do not end in .dcm are ignored.

  Returns:
    A Volume: float32 `[D, H, W]` = [slice, row, column]; spacing (slice gap,
    PixelSpacing[0] between rows, PixelSpacing[1] between columns); the RAS+
    NIfTI affine (module docstring): voxel (d, h, w) is at LPS point
    IPP_d + h * PixelSpacing[0] * column cosines + w * PixelSpacing[1] * row
    cosines, with x and y negated; header None.

  Raises:
    ValueError: unreadable file, several series, inconsistent slice sizes or
      orientations, duplicate or non-uniform slice positions.
  """
  slices = _read_slices(directory)
  _same(slices, 'SeriesInstanceUID', directory, 'series')
  sizes = {(int(ds.Rows), int(ds.Columns)) for ds in slices}
  if len(sizes) > 1:
    raise ValueError(f'{directory}: slices have different sizes '
                     f'(rows, columns) {sorted(sizes)}; mixed series?')
  _same(slices, 'PixelSpacing', directory, 'pixel spacings')
  if 'ImageOrientationPatient' in slices[0]:
    axes = _orientation(slices, directory)
  else:
    axes = np.eye(3)
  slices, positions = _sorted_slices(slices, axes[2], directory)
  step = _slice_step(slices, positions, directory)
  row_gap, col_gap = (float(v) for v in getattr(slices[0], 'PixelSpacing',
                                                (1.0, 1.0)))
  origin = np.array([float(v) for v in getattr(
      slices[0], 'ImagePositionPatient', (0.0, 0.0, 0.0))])
  if positions is not None and len(slices) > 1:
    last = np.array([float(v) for v in slices[-1].ImagePositionPatient])
    slice_vector = (last - origin) / (len(slices) - 1)
  else:
    slice_vector = axes[2] * step
  # Columns of the LPS affine for nibabel's (i, j, k) = (column, row, slice).
  lps = np.eye(4)
  lps[:3, 0] = axes[0] * col_gap
  lps[:3, 1] = axes[1] * row_gap
  lps[:3, 2] = slice_vector
  lps[:3, 3] = origin
  affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS.
  array = np.stack([_pixels(ds) for ds in slices])
  return Volume(array=array, spacing=(abs(step), row_gap, col_gap),
                affine=affine, header=None)


def read_volume(path: str) -> Volume:
  """Reads a NIfTI file (.nii/.nii.gz) or a DICOM series folder (or file).

  Raises:
    ValueError: neither a NIfTI file nor DICOM, or unreadable (names the path).
  """
  path = os.fspath(path)
  if is_nifti(path):
    return read_nifti(path)
  if os.path.isdir(path) or path.lower().endswith('.dcm'):
    return read_dicom_series(path)
  raise ValueError(f'{path}: not a volume; expected a .nii/.nii.gz file or a '
                   'folder holding one DICOM series.')
