"""Measurements of the shown masks and what the dashboard lets one download.

Areas in mm² and volumes in mL when the file gives the spacing, pixels or
voxels otherwise; per-class Dice against an uploaded ground truth; the batch
table, its CSV, and a ZIP of the masks in each input's geometry (PNG for
images, NIfTI with the input's affine and header for volumes).
"""

import csv
import io
import os
import tempfile
import zipfile

import numpy as np

from medseg_jax.data import image_io
from medseg_jax.data import volume_io

CSV_NAME = 'measurements.csv'


def size_unit(case) -> tuple[float, str]:
  """Returns (size of one pixel/voxel, unit) of a case.

  Args:
    case: an `uploads.Case`.

  Returns:
    (mm², 'mm²') for a 2D case with spacing, (mm³ / 1000, 'mL') for a volume
    with spacing, (1, 'px') or (1, 'voxels') when the spacing is unknown.
  """
  if case.spacing is None:
    return 1.0, 'px' if case.kind == 'image' else 'voxels'
  size = float(np.prod(case.spacing))
  return (size, 'mm²') if case.kind == 'image' else (size / 1000.0, 'mL')


def class_sizes(labels: np.ndarray, case, names) -> dict[str, float]:
  """Returns {class name: area or volume} of a label map, in `size_unit`.

  Args:
    labels: integer `[*spatial]`, class k >= 1 named `names[k - 1]`.
    case: its `uploads.Case` (spacing, kind).
    names: the foreground class names (`sources.class_names`).
  """
  size, _ = size_unit(case)
  counts = np.bincount(np.asarray(labels).ravel().astype(np.int64),
                       minlength=len(names) + 1)
  return {name: float(counts[k]) * size for k, name in enumerate(names, 1)}


def dice_per_class(labels: np.ndarray, truth: np.ndarray,
                   num_foreground: int) -> list[float]:
  """Returns the Dice of each foreground class, 2|A∩B| / (|A| + |B|).

  A class absent from both the prediction and the truth scores 1.0 (they
  agree), as the per-image Dice of the ISIC challenge.

  Args:
    labels: predicted class map `[*spatial]`.
    truth: ground-truth class map of the same shape.
    num_foreground: classes 1..num_foreground are scored.
  """
  labels, truth = np.asarray(labels), np.asarray(truth)
  if labels.shape != truth.shape:
    raise ValueError(f'Dice: prediction {labels.shape} and ground truth '
                     f'{truth.shape} differ in shape.')
  scores = []
  for k in range(1, num_foreground + 1):
    a, b = labels == k, truth == k
    total = int(a.sum()) + int(b.sum())
    scores.append(1.0 if total == 0 else 2.0 * int((a & b).sum()) / total)
  return scores


def format_size(value: float, unit: str) -> str:
  """Returns '1,024 px', '12.5 mm²' or '3.21 mL'."""
  if unit in ('px', 'voxels'):
    return f'{int(round(value)):,} {unit}'
  return f'{value:,.1f} {unit}' if unit == 'mm²' else f'{value:,.2f} {unit}'


def table_row(case, labels, names, truth=None) -> dict:
  """Returns one case's row of the batch table (and of the CSV).

  Args:
    case: the `uploads.Case`.
    labels: its shown label map.
    names: the foreground class names.
    truth: its ground truth (class map), or None.

  Returns:
    {'file', 'kind', 'shape', 'spacing_mm', 'unit', '<class>' sizes...,
    'dice_<class>'... (when `truth` is given)}.
  """
  _, unit = size_unit(case)
  row = {'file': case.name, 'kind': case.kind,
         'shape': 'x'.join(map(str, case.image.shape[:-1])),
         'spacing_mm': ('' if case.spacing is None else
                        'x'.join(f'{s:g}' for s in case.spacing)),
         'unit': unit}
  row.update({name: round(v, 4) for name, v in
              class_sizes(labels, case, names).items()})
  if truth is not None:
    scores = dice_per_class(labels, truth, len(names))
    row.update({f'dice_{name}': round(s, 4) for name, s in zip(names, scores)})
  return row


def failure_row(name: str, message: str) -> dict:
  """Returns the table row of an upload that could not be read."""
  return {'file': name, 'kind': 'error', 'error': message}


def csv_text(rows) -> str:
  """Returns the rows as CSV, with the union of their columns in order."""
  columns = []
  for row in rows:
    columns.extend(k for k in row if k not in columns)
  out = io.StringIO()
  writer = csv.DictWriter(out, columns, restval='', lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  return out.getvalue()


def mask_name(case, taken=()) -> str:
  """Returns the mask's file name in the ZIP: '<stem>.png' or '<stem>.nii.gz'.

  A name already in `taken` gets '_2', '_3', ... appended to its stem.
  """
  base = os.path.basename(case.name)
  for suffix in (*volume_io.NIFTI_SUFFIXES, '.zip', '.dcm', '.dicom',
                 *image_io.IMAGE_EXTENSIONS):
    if base.lower().endswith(suffix):
      base = base[:-len(suffix)]
      break
  extension = '.nii.gz' if case.volume is not None else '.png'
  name, n = base + extension, 1
  while name in taken:
    n += 1
    name = f'{base}_{n}{extension}'
  return name


def _write_mask(path: str, case, labels, config) -> None:
  labels = np.asarray(labels)
  if case.volume is None:
    image_io.write_mask_png(path, labels, num_classes=config.data.num_classes,
                            label_values=tuple(config.data.label_values))
    return
  if labels.ndim == 2:  # A single slice shown as an image.
    labels = labels[None]
  volume_io.write_nifti_like(path, labels.astype(np.uint8), case.volume)


def zip_bytes(items, rows, config) -> bytes:
  """Returns a ZIP of the masks and the measurements CSV.

  Args:
    items: [(case, shown label map)]: images become PNG masks (0/255 for a
      binary run, config.data.label_values when set), volumes NIfTI masks
      with the input's shape, affine and header (DICOM: its affine).
    rows: the batch table (written as CSV_NAME).
    config: the run's config.

  Returns:
    The ZIP file's bytes (masks are written through a temporary folder
    that is removed).
  """
  buffer = io.BytesIO()
  with tempfile.TemporaryDirectory(prefix='medseg_dashboard_') as folder, \
      zipfile.ZipFile(buffer, 'w', zipfile.ZIP_DEFLATED) as archive:
    taken = set()
    for case, labels in items:
      name = mask_name(case, taken)
      taken.add(name)
      path = os.path.join(folder, name)
      _write_mask(path, case, labels, config)
      archive.write(path, name)
    archive.writestr(CSV_NAME, csv_text(rows))
  return buffer.getvalue()
