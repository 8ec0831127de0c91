"""DICOM series (CT, MR, PET): one folder of single-frame slices -> a volume.

Slices are sorted by ImagePositionPatient projected on the slice normal (the
cross product of ImageOrientationPatient's row and column cosines), never by
file name; InstanceNumber is only used when positions are missing. Geometry
(spacing, the 4x4 affine) comes from the tags; `volume_io` wraps the result
in a `Volume` (its docstring gives the axis and affine conventions).

What a folder must be, else a `FileError` naming the folder and the fix:
one SeriesInstanceUID (a folder holding two series names both), one slice
size, one PixelSpacing, one orientation, distinct positions, uniform slice
gaps (a gap that is a multiple of the others means missing slices).

`suv_factor` is PET's body-weight SUV factor from the tags: SUVbw = stored
activity (Bq/ml) x `suv_factor`. Imports no JAX.
"""

import dataclasses
import datetime
import math
import os

import numpy as np
import pydicom
from pydicom import errors as dicom_errors

from medseg_jax.data.errors import FileError

ORIENTATION_TOL = 1e-4  # Cosines: identical within float32 text rounding.
SPACING_RTOL = 0.01  # Slice gaps may differ by 1% (rounding of positions).


@dataclasses.dataclass(frozen=True)
class SeriesGeometry:
  """A sorted series' geometry, read from the headers only.

  Attributes:
    files: the slice files, sorted along the slice normal (index d).
    shape: (D, H, W) = (slices, Rows, Columns).
    spacing: (slice gap, PixelSpacing[0], PixelSpacing[1]) in mm.
    affine: 4x4 RAS+ NIfTI affine of nibabel index (i, j, k) = (w, h, d).
  """
  files: tuple[str, ...]
  shape: tuple[int, int, int]
  spacing: tuple[float, float, float]
  affine: np.ndarray


def series_files(directory: str) -> list[str]:
  """Returns the candidate files of a series folder (hidden files skipped).

  Raises:
    FileNotFoundError: `directory` is neither a file nor a folder.
  """
  if os.path.isfile(directory):
    return [directory]
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{directory}: no such DICOM file or folder.')
  return [os.path.join(directory, n) for n in sorted(os.listdir(directory))
          if not n.startswith('.') and n.upper() != 'DICOMDIR'
          and os.path.isfile(os.path.join(directory, n))]


def read_slices(directory: str, pixels: bool = True) -> list:
  """Returns the parsed DICOM images of a folder (files without pixels skipped).

  Args:
    directory: the series folder (or one file).
    pixels: also read the pixel data (False: headers only, fast).

  Raises:
    FileError: a .dcm file that is not DICOM, or no DICOM image at all.
  """
  slices = []
  for path in series_files(directory):
    try:
      ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
    except dicom_errors.InvalidDicomError as e:
      if path.lower().endswith('.dcm'):
        raise FileError(path, f'not a readable DICOM file ({e}).') from e
      continue  # A README or similar beside the series.
    except Exception as e:  # Truncated files and the like.
      raise FileError(path, f'not a readable DICOM file ({e}).') from e
    if not _is_image(ds, pixels):
      continue  # Structured reports, presentation states: no image.
    ds.filename = path
    slices.append(ds)
  if not slices:
    raise FileError(directory, 'no DICOM image found.')
  return slices


def _is_image(ds, pixels: bool) -> bool:
  """Whether a dataset is an image (has pixels; headers: Rows/Columns)."""
  if pixels:
    return 'PixelData' in ds
  return 'Rows' in ds and 'Columns' in ds


def check_single_series(slices, directory: str) -> None:
  """Raises FileError naming every series when a folder holds several."""
  groups = {}
  for ds in slices:
    groups.setdefault(str(getattr(ds, 'SeriesInstanceUID', None)),
                      []).append(ds)
  if len(groups) < 2:
    return
  parts = []
  for uid, members in sorted(groups.items(), key=lambda g: -len(g[1])):
    desc = getattr(members[0], 'SeriesDescription', '') or ''
    modality = getattr(members[0], 'Modality', '') or ''
    label = ' '.join(v for v in (modality, repr(desc) if desc else '') if v)
    parts.append(f'{uid} ({len(members)} file(s){", " + label if label else ""})')
  raise FileError(directory, f'the folder mixes {len(groups)} DICOM series: '
                  + '; '.join(parts) + '. Put each series in its own folder.')


def _same(slices, key, directory, what) -> None:
  """Raises when `key` differs between slices (names a few values)."""
  values = {str(getattr(ds, key, None)) for ds in slices}
  if len(values) > 1:
    raise FileError(directory, f'inconsistent {what}: {key} takes '
                    f'{len(values)} values ({", ".join(sorted(values)[:3])}); '
                    'mixed series? Put each series in its own folder.')


def _orientation(slices, directory) -> np.ndarray:
  """Returns [row direction, column direction, normal] (3x3, LPS) or raises."""
  if 'ImageOrientationPatient' not in slices[0]:
    return np.eye(3)
  iops = np.array([[float(v) for v in ds.ImageOrientationPatient]
                   for ds in slices])
  if np.abs(iops - iops[0]).max() > ORIENTATION_TOL:
    raise FileError(directory, 'slices have different '
                    'ImageOrientationPatient values (mixed series?).')
  row, col = iops[0, :3], iops[0, 3:]
  return np.stack([row, col, np.cross(row, col)])


def _position(ds) -> np.ndarray:
  return np.array([float(v) for v in ds.ImagePositionPatient])


def sort_slices(slices, normal, directory):
  """Returns (slices sorted along `normal`, their positions along it or None).

  Raises:
    FileError: two slices at one position (time points, echoes, series).
  """
  if all('ImagePositionPatient' in ds for ds in slices):
    pos = np.array([np.dot(_position(ds), normal) for ds in slices])
    order = np.argsort(pos, kind='stable')
    pos = pos[order]
    if len(pos) > 1 and np.min(np.diff(pos)) < 1e-4:
      raise FileError(
          directory, 'two slices share a position along the slice normal; '
          'the folder mixes time points, echoes or series. Put each 3D series '
          'in its own folder.')
    return [slices[i] for i in order], pos
  numbers = [int(getattr(ds, 'InstanceNumber', 0) or 0) for ds in slices]
  order = np.argsort(numbers, kind='stable')
  return [slices[i] for i in order], None


def slice_step(slices, positions, directory) -> float:
  """Returns the distance between slices in mm (uniform, or raises).

  Raises:
    FileError: gaps that are whole multiples of the usual one (missing
      slices, counted) or otherwise non-uniform (inconsistent spacing).
  """
  if positions is None or len(positions) < 2:
    ds = slices[0]
    return float(getattr(ds, 'SpacingBetweenSlices', None) or
                 getattr(ds, 'SliceThickness', None) or 1.0)
  gaps = np.diff(positions)
  step = float(np.min(gaps)) if len(gaps) < 3 else float(np.median(gaps))
  tol = SPACING_RTOL * step + 1e-3
  if np.abs(gaps - step).max() <= tol:
    return step
  multiples = np.round(gaps / step)
  if np.all(np.abs(gaps - multiples * step) <= tol * multiples) and (
      multiples.min() >= 1):
    where = int(np.argmax(multiples))
    missing = int((multiples - 1).sum())
    raise FileError(directory, f'{missing} slice(s) missing: a gap of '
                    f'{gaps[where]:.4g} mm between positions '
                    f'{positions[where]:.4g} and {positions[where + 1]:.4g} '
                    f'mm along the normal, where slices are {step:.4g} mm '
                    'apart. Export the complete series.')
  raise FileError(directory, 'inconsistent slice spacing: gaps from '
                  f'{gaps.min():.4g} to {gaps.max():.4g} mm along the normal '
                  '(a mixed or irregular series); resample it, e.g. with '
                  'dcm2niix, and use the NIfTI file.')


def geometry(slices, directory) -> SeriesGeometry:
  """Checks a series' slices and returns its sorted geometry.

  Args:
    slices: parsed datasets (headers suffice), any order.
    directory: the folder, for messages.

  Returns:
    The SeriesGeometry (files sorted along the slice normal).

  Raises:
    FileError: several series, sizes, pixel spacings or orientations, or
      duplicate, missing or irregular slice positions.
  """
  check_single_series(slices, directory)
  sizes = {(int(ds.Rows), int(ds.Columns)) for ds in slices}
  if len(sizes) > 1:
    raise FileError(directory, f'slices have different sizes (rows, '
                    f'columns) {sorted(sizes)}; mixed series?')
  _same(slices, 'PixelSpacing', directory, 'pixel spacing')
  axes = _orientation(slices, directory)
  slices, positions = sort_slices(slices, axes[2], directory)
  step = slice_step(slices, positions, directory)
  row_gap, col_gap = (float(v) for v in getattr(slices[0], 'PixelSpacing',
                                                (1.0, 1.0)))
  origin = (_position(slices[0]) if 'ImagePositionPatient' in slices[0]
            else np.zeros(3))
  if positions is not None and len(slices) > 1:
    slice_vector = (_position(slices[-1]) - origin) / (len(slices) - 1)
  else:
    slice_vector = axes[2] * step
  # Columns of the LPS affine for nibabel's (i, j, k) = (column, row, slice).
  lps = np.eye(4)
  lps[:3, 0] = axes[0] * col_gap
  lps[:3, 1] = axes[1] * row_gap
  lps[:3, 2] = slice_vector
  lps[:3, 3] = origin
  affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS.
  rows, columns = sizes.pop()
  return SeriesGeometry(
      files=tuple(ds.filename for ds in slices),
      shape=(len(slices), rows, columns),
      spacing=(abs(step), row_gap, col_gap), affine=affine)


def read_geometry(directory: str) -> SeriesGeometry:
  """Returns a series folder's checked geometry, reading headers only."""
  return geometry(read_slices(directory, pixels=False), directory)


def _pixels(ds) -> np.ndarray:
  """Returns one slice as float32 [rows, columns], rescale applied."""
  if int(getattr(ds, 'NumberOfFrames', 1) or 1) > 1:
    raise FileError(ds.filename, 'multi-frame DICOM is not supported; '
                    'convert it with dcm2niix and use the NIfTI file.')
  if int(getattr(ds, 'SamplesPerPixel', 1)) != 1:
    raise FileError(ds.filename, 'colour DICOM images are not volumes.')
  slope = float(getattr(ds, 'RescaleSlope', 1.0) or 1.0)
  intercept = float(getattr(ds, 'RescaleIntercept', 0.0) or 0.0)
  try:
    pixels = ds.pixel_array.astype(np.float32)
  except Exception as e:  # Compressed syntax without a decoder, bad data.
    raise FileError(ds.filename, f'cannot decode the pixels ({e}).') from e
  return pixels * np.float32(slope) + np.float32(intercept)


def read_series(directory: str) -> tuple[np.ndarray, SeriesGeometry]:
  """Reads one series: (float32 [D, H, W] = [slice, row, column], geometry).

  RescaleSlope/Intercept are applied per slice (CT in HU, PET in its Units).

  Raises:
    FileError: see `geometry`, plus undecodable or multi-frame files.
  """
  slices = read_slices(directory)
  geo = geometry(slices, directory)
  by_file = {ds.filename: ds for ds in slices}
  return np.stack([_pixels(by_file[f]) for f in geo.files]), geo


# ------------------------------------------------------------------- PET

def _seconds(value: str) -> float:
  """Seconds since midnight of a DICOM TM ('HHMMSS.FFFFFF', 'HHMM', ...)."""
  text = str(value).strip().replace(':', '')
  whole, _, frac = text.partition('.')
  whole = whole.ljust(6, '0')
  return (int(whole[:2]) * 3600 + int(whole[2:4]) * 60 + int(whole[4:6])
          + (float('0.' + frac) if frac else 0.0))


def _moment(date, time) -> datetime.datetime | None:
  """A datetime from DICOM DA + TM (None without a date)."""
  if not date:
    return None
  day = datetime.datetime.strptime(str(date).strip()[:8], '%Y%m%d')
  return day + datetime.timedelta(seconds=_seconds(time))


def _decay_seconds(ds, drug) -> float:
  """Seconds from injection to the series start (the decay to correct)."""
  start = getattr(drug, 'RadiopharmaceuticalStartDateTime', None)
  scan = _moment(getattr(ds, 'SeriesDate', None), ds.SeriesTime)
  if start and scan is not None:
    text = str(start).split('+')[0].split('-')[0]
    injected = _moment(text[:8], text[8:] or '0')
    return (scan - injected).total_seconds()
  dt = _seconds(ds.SeriesTime) - _seconds(drug.RadiopharmaceuticalStartTime)
  return dt + 86400 if dt < 0 else dt  # An injection before midnight.


def suv_factor(directory: str) -> float:
  """Returns the body-weight SUV factor of a PET series from its tags.

  SUVbw = activity (Bq/ml) x weight (g) / injected dose decayed to the
  series start (Bq): the factor is PatientWeight x 1000 /
  (RadionuclideTotalDose x 2^(-t / RadionuclideHalfLife)), t = SeriesTime -
  RadiopharmaceuticalStartTime (DecayCorrection 'START'); t = 0 for 'ADMIN';
  Units 'GML' are SUV already (factor 1).

  Args:
    directory: the PET series folder (or one of its files).

  Raises:
    FileError: not PET, or a tag the factor needs is missing (named).
  """
  ds = read_slices(directory, pixels=False)[0]
  if getattr(ds, 'Modality', '') != 'PT':
    raise FileError(directory, f"intensity='suv' needs a PET series "
                    f"(Modality PT); this one is {ds.get('Modality', '?')!r}.")
  units = str(getattr(ds, 'Units', '') or '').upper()
  if units == 'GML':
    return 1.0
  drug = (ds.RadiopharmaceuticalInformationSequence[0]
          if ds.get('RadiopharmaceuticalInformationSequence') else None)
  need = {'PatientWeight': ds, 'SeriesTime': ds}
  if drug is not None:
    need.update({'RadionuclideTotalDose': drug, 'RadionuclideHalfLife': drug})
    if not drug.get('RadiopharmaceuticalStartDateTime'):
      need['RadiopharmaceuticalStartTime'] = drug
  missing = [k for k, where in need.items() if not where.get(k)]
  if drug is None:
    missing.insert(0, 'RadiopharmaceuticalInformationSequence')
  if units != 'BQML':
    missing.insert(0, f"Units=BQML (found {units or 'none'})")
  if missing:
    raise FileError(directory, 'cannot compute SUV (body weight): missing '
                    'DICOM tag(s) ' + ', '.join(missing) + "; use "
                    "intensity='zscore' or 'percentile' for this data, or "
                    'fix the export.')
  correction = str(getattr(ds, 'DecayCorrection', 'START') or 'START').upper()
  if correction not in ('START', 'ADMIN'):
    raise FileError(directory, f'DecayCorrection {correction!r} is not '
                    "supported for SUV (only 'START' and 'ADMIN').")
  t = 0.0 if correction == 'ADMIN' else _decay_seconds(ds, drug)
  dose = float(drug.RadionuclideTotalDose) * math.pow(
      2.0, -t / float(drug.RadionuclideHalfLife))
  return float(ds.PatientWeight) * 1000.0 / dose


def suv_factors(images, channels: int) -> np.ndarray:
  """Returns float32 [C]: each channel's SUV factor (one PET series each).

  Raises:
    FileError: an image that is not a PET DICOM series with the SUV tags.
  """
  if len(images) != channels or not all(os.path.isdir(p) for p in images):
    raise FileError(
        images[0], "intensity='suv' needs DICOM PET series (one folder per "
        'channel): the SUV factor comes from their tags. Convert other '
        "images to SUV first and use intensity='none'.")
  return np.array([suv_factor(p) for p in images], np.float32)


def suv_problems(cases) -> list:
  """Returns one `Problem` per case (`Case.images`) without SUV factors."""
  problems = []
  for case in cases:
    try:
      suv_factors(case.images, len(case.images))
    except FileError as e:
      problems.append(e.problem())
  return problems
