"""Volume I/O: NIfTI files (nibabel) and DICOM series (pydicom), (D, H, W).

Axis convention (used by every volume in medseg_jax): arrays are
`[D, H, W]` or `[D, H, W, C]` with D the slice axis.

* NIfTI: nibabel's array is indexed `(i, j, k[, c])` (x, y, z on disk); it is
  transposed to `(k, j, i[, c])` = `(D, H, W[, C])`, and the header's voxel
  sizes `(sx, sy, sz)` become `spacing = (sz, sy, sx)`. `Volume.affine` stays
  the NIfTI affine, i.e. it maps nibabel's `(i, j, k)` = our `(w, h, d)` to
  RAS+ millimetres; `write_nifti_like` transposes back, so a written mask has
  exactly the input's shape, affine and voxel sizes.
* DICOM (read and checked by `dicom_series`): slices are sorted along the
  slice normal and stacked as `[slice, row, column]` = `(D, H, W)`. The
  affine is that of SimpleITK's DICOM reader (index x = column, y = row,
  z = slice; origin = the first slice's ImagePositionPatient; direction =
  row and column cosines and the slice step) converted from DICOM's LPS to
  NIfTI's RAS+ by negating x and y, i.e. nibabel index `(i, j, k)` =
  (column, row, slice). dcm2niix describes the same world points (it may
  store the rows flipped, with an affine to match). `write_nifti_like`
  hence writes a NIfTI for a DICOM input.

A case's mask is a NIfTI file, or for a DICOM series a folder of one PNG
per slice named like the slice's file (`read_label_volume`).

A volume's intensities are returned as stored (NIfTI scaling and DICOM
RescaleSlope/Intercept applied): float32 for images, integers for labels
stored as integers.
"""

import dataclasses
import os
from typing import Any

import nibabel as nib
import numpy as np

from medseg_jax.data import dicom_series
from medseg_jax.data import image_io
# Re-exported: callers catch it as volume_io.FileError.
from medseg_jax.data.errors import FileError

NIFTI_SUFFIXES = ('.nii', '.nii.gz')


@dataclasses.dataclass
class Volume:
  """A volume in (D, H, W) order and what is needed to write results back.

  Attributes:
    array: `[D, H, W]` or `[D, H, W, C]`; float32, or integer for labels.
    spacing: (D, H, W) voxel size in mm.
    affine: 4x4 NIfTI affine: nibabel voxel index (i, j, k) = (w, h, d) ->
      RAS+ mm.
    header: the nibabel header (NIfTI inputs), None for DICOM.
    slice_files: a DICOM series' files in slice order (d), else ().
  """
  array: np.ndarray
  spacing: tuple[float, float, float]
  affine: np.ndarray
  header: Any = None
  slice_files: tuple[str, ...] = ()


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


def read_dicom_series(directory: str) -> Volume:
  """Reads one DICOM series (a folder of single-frame slices) as a volume.

  Slices are sorted by ImagePositionPatient projected on the slice normal
  (row x column direction of ImageOrientationPatient), or by InstanceNumber
  when positions are missing; every check is `dicom_series.geometry`'s.
  RescaleSlope/Intercept are applied (CT in HU).

  Args:
    directory: the series folder (or a single DICOM file). Files that are
      not DICOM and do not end in .dcm are ignored.

  Returns:
    A Volume: float32 `[D, H, W]` = [slice, row, column]; spacing (slice gap,
    PixelSpacing[0] between rows, PixelSpacing[1] between columns); the RAS+
    NIfTI affine (module docstring): voxel (d, h, w) is at LPS point
    IPP_d + h * PixelSpacing[0] * column cosines + w * PixelSpacing[1] * row
    cosines, with x and y negated; header None; `slice_files` the sorted
    slice files.

  Raises:
    FileError (a ValueError): unreadable file, several series, inconsistent
      slice sizes, spacings or orientations, duplicate, missing or
      non-uniform slice positions.
  """
  array, geo = dicom_series.read_series(directory)
  return Volume(array=array, spacing=geo.spacing, affine=geo.affine,
                header=None, slice_files=geo.files)


def is_volume_path(path: str) -> bool:
  """Whether `path` names a NIfTI file, a .dcm file or a (DICOM) folder."""
  path = os.fspath(path)
  return is_nifti(path) or os.path.isdir(path) or path.lower().endswith(
      '.dcm')


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
  raise FileError(path, 'not a volume; expected a .nii/.nii.gz file or a '
                  'folder holding one DICOM series.')


def read_volume_header(path: str):
  """Returns ((D, H, W), spacing, channels, affine) without decoding voxels.

  A NIfTI file's header, or a DICOM series' tags (`dicom_series`).
  """
  if is_nifti(path):
    return read_nifti_header(path)
  geo = dicom_series.read_geometry(os.fspath(path))
  return geo.shape, geo.spacing, 1, geo.affine


def volume_files(path: str) -> list[str]:
  """Returns the files a volume is read from (a folder: the files in it)."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    return [path]
  return dicom_series.series_files(path)


def read_png_slices(folder: str, reference: Volume) -> np.ndarray:
  """Reads a mask given as one PNG per slice of a DICOM series.

  Slice d's mask is `<folder>/<name of slice d's DICOM file without its
  extension>.png` (e.g. IM0007.dcm -> IM0007.png), so the order comes from
  the series' positions, never from the PNG names.

  Args:
    folder: the folder of PNG files.
    reference: the DICOM series Volume (its `slice_files`).

  Returns:
    The raw mask values `[D, H, W]` (`image_io.read_mask` per slice).

  Raises:
    FileError: the image is not a DICOM series, a PNG is missing (the first
      names are listed), or a PNG's size differs from the slices'.
  """
  if not reference.slice_files:
    raise FileError(folder, 'a folder of PNG masks goes with a DICOM series '
                    'image (one PNG per slice, named like its .dcm file); '
                    'for a NIfTI image give the mask as a NIfTI file.')
  stems = [os.path.splitext(os.path.basename(f))[0]
           for f in reference.slice_files]
  paths = [os.path.join(folder, s + '.png') for s in stems]
  missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
  if missing:
    raise FileError(folder, f'{len(missing)} of {len(paths)} slice mask(s) '
                    f'missing, e.g. {", ".join(missing[:3])}: each DICOM '
                    'slice <name>.dcm needs <name>.png.')
  slices = [image_io.read_mask(p) for p in paths]
  want = tuple(reference.array.shape[1:3])
  for path, mask in zip(paths, slices):
    if mask.shape != want:
      raise FileError(path, f'mask of size {mask.shape} but the DICOM slices '
                      f'are (rows, columns) {want}.')
  return np.stack(slices)


def read_label_volume(path: str, reference: Volume) -> Volume:
  """Reads the mask of a case whose image is `reference`.

  Args:
    path: a NIfTI file, or a folder of PNG slices (`read_png_slices`).
    reference: the case's (first) image volume.

  Returns:
    The mask Volume (a PNG folder takes the reference's geometry).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    array = read_png_slices(path, reference)
    return Volume(array=array, spacing=reference.spacing,
                  affine=reference.affine, header=None)
  return read_volume(path)
