"""Tests of medseg_jax.data.volume_io: NIfTI round trips and DICOM series."""

import pickle

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
import pytest
from scipy.spatial.transform import Rotation

from medseg_jax.data import volume_io

SPACING_XYZ = (0.8, 0.8, 2.5)


def oblique_affine(spacing=SPACING_XYZ, origin=(-10.0, 20.0, 5.5)):
  """A rotated, anisotropic NIfTI affine (float32-exact, as stored)."""
  rot = Rotation.from_euler('xyz', [10, 20, 30], degrees=True).as_matrix()
  affine = np.eye(4)
  affine[:3, :3] = rot @ np.diag(spacing)
  affine[:3, 3] = origin
  return affine.astype(np.float32).astype(np.float64)


def save_nifti(path, data, affine=None):
  nib.save(nib.Nifti1Image(data, oblique_affine() if affine is None
                           else affine), str(path))
  return str(path)


def test_read_nifti_transposes_to_dhw_and_reorders_spacing(tmp_path):
  data = np.random.default_rng(0).normal(size=(6, 7, 5)).astype(np.float32)
  vol = volume_io.read_nifti(save_nifti(tmp_path / 'a.nii.gz', data))
  assert vol.array.shape == (5, 7, 6)
  assert vol.array.dtype == np.float32
  # Voxel (d, h, w) is nibabel's (i, j, k) = (w, h, d).
  assert vol.array[4, 2, 1] == data[1, 2, 4]
  assert vol.spacing == (2.5, 0.8, 0.8)
  np.testing.assert_array_equal(vol.affine, oblique_affine())


def test_read_nifti_4d_is_channels_last_and_keeps_integer_labels(tmp_path):
  data = np.arange(6 * 7 * 5 * 2, dtype=np.float32).reshape(6, 7, 5, 2)
  vol = volume_io.read_nifti(save_nifti(tmp_path / 'b.nii.gz', data))
  assert vol.array.shape == (5, 7, 6, 2)
  np.testing.assert_array_equal(vol.array[..., 1], data[..., 1].T)
  labels = np.zeros((6, 7, 5), np.uint8)
  labels[1, 2, 3] = 2
  lab = volume_io.read_nifti(save_nifti(tmp_path / 'l.nii.gz', labels))
  assert lab.array.dtype == np.uint8 and lab.array[3, 2, 1] == 2


def test_read_nifti_applies_scaling(tmp_path):
  image = nib.Nifti1Image(np.full((3, 4, 5), 10, np.int16), np.eye(4))
  image.header.set_slope_inter(2.0, -3.0)
  nib.save(image, str(tmp_path / 's.nii'))
  vol = volume_io.read_nifti(str(tmp_path / 's.nii'))
  assert vol.array.dtype == np.float32
  np.testing.assert_array_equal(vol.array, 17.0)


@pytest.mark.parametrize('channels', [0, 3])
def test_write_nifti_like_round_trip_is_exact(tmp_path, channels):
  data = np.random.default_rng(1).normal(size=(6, 7, 5, 2)).astype(np.float32)
  ref_path = save_nifti(tmp_path / 'img.nii.gz', data)
  ref = volume_io.read_nifti(ref_path)
  rng = np.random.default_rng(2)
  if channels:
    out = rng.random((5, 7, 6, channels)).astype(np.float32)
  else:
    out = rng.integers(0, 3, (5, 7, 6)).astype(np.int64)
  volume_io.write_nifti_like(str(tmp_path / 'out.nii.gz'), out, ref)
  written = nib.load(str(tmp_path / 'out.nii.gz'))
  original = nib.load(ref_path)
  assert written.shape[:3] == original.shape[:3] == (6, 7, 5)
  np.testing.assert_array_equal(written.affine, original.affine)
  assert written.header.get_zooms()[:3] == original.header.get_zooms()[:3]
  assert written.get_data_dtype() == (np.float32 if channels else np.uint8)
  back = volume_io.read_nifti(str(tmp_path / 'out.nii.gz'))
  np.testing.assert_array_equal(back.array, out)
  assert back.spacing == ref.spacing


def test_write_nifti_like_rejects_wrong_shape(tmp_path):
  ref = volume_io.read_nifti(save_nifti(tmp_path / 'a.nii.gz',
                                        np.zeros((6, 7, 5), np.float32)))
  with pytest.raises(ValueError, match=r'\(D, H, W\) = \(5, 7, 6\)'):
    volume_io.write_nifti_like(str(tmp_path / 'o.nii.gz'),
                               np.zeros((6, 7, 5), np.uint8), ref)


def test_corrupt_nifti_names_the_file(tmp_path):
  path = tmp_path / 'bad.nii.gz'
  path.write_bytes(b'not a nifti at all')
  with pytest.raises(volume_io.FileError, match='bad.nii.gz'):
    volume_io.read_nifti(str(path))
  error = volume_io.FileError(str(path), 'reason')
  again = pickle.loads(pickle.dumps(error))
  assert (again.path, again.reason) == (str(path), 'reason')


def test_header_only_geometry_matches_full_read(tmp_path):
  data = np.zeros((6, 7, 5, 2), np.float32)
  path = save_nifti(tmp_path / 'a.nii.gz', data)
  shape, spacing, channels, affine = volume_io.read_nifti_header(path)
  vol = volume_io.read_nifti(path)
  assert shape == vol.array.shape[:3] and spacing == vol.spacing
  assert channels == 2
  np.testing.assert_array_equal(affine, vol.affine)


# ------------------------------------------------------------------ DICOM

ROW = np.array([np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20)), 0.0])
COL = np.array([0.0, 0.0, -1.0])
NORMAL = np.cross(ROW, COL)
ORIGIN = np.array([10.0, -20.0, 30.0])
GAP = 2.5


_SOP_CLASSES = {'CT': '1.2.840.10008.5.1.4.1.1.2',  # CT image storage.
                'PT': '1.2.840.10008.5.1.4.1.1.128'}  # PET image storage.


def slice_dataset(series_uid, modality='CT'):
  """Returns a single-frame DICOM slice: file meta, UIDs, uint16 grayscale.

  Geometry, rescale and pixel data are the caller's.
  """
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = _SOP_CLASSES[modality]
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.SeriesInstanceUID = series_uid
  ds.Modality = modality
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = 'MONOCHROME2'
  ds.BitsAllocated = ds.BitsStored = 16
  ds.HighBit = 15
  ds.PixelRepresentation = 0
  return ds


def dicom_slice(path, k, series_uid, rows=4, columns=5, instance=None):
  """Writes slice k of an oblique CT series (uint16 stored, slope 2, -1024)."""
  ds = slice_dataset(series_uid)
  ds.Rows, ds.Columns = rows, columns
  ds.PixelSpacing = [0.7, 0.9]  # Between rows, between columns.
  ds.SliceThickness = GAP
  ds.ImageOrientationPatient = [*ROW, *COL]
  ds.ImagePositionPatient = [float(v) for v in ORIGIN + k * GAP * NORMAL]
  ds.InstanceNumber = instance if instance is not None else k + 1
  ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
  ds.PixelData = stored_pixels(k, rows, columns).tobytes()
  ds.save_as(str(path), enforce_file_format=True)


def stored_pixels(k, rows=4, columns=5):
  return (np.arange(rows * columns).reshape(rows, columns) + 100 * k).astype(
      np.uint16)


@pytest.fixture
def series(tmp_path):
  folder = tmp_path / 'series'
  folder.mkdir()
  uid = generate_uid()
  # File names in the reverse order of positions, and misleading instance
  # numbers: the order must come from ImagePositionPatient.
  dicom_slice(folder / 'a.dcm', 1, uid, instance=1)
  dicom_slice(folder / 'b.dcm', 0, uid, instance=2)
  (folder / 'README').write_text('not dicom')
  return folder


def test_dicom_series_values_spacing_and_affine(series):
  vol = volume_io.read_dicom_series(str(series))
  assert vol.array.shape == (2, 4, 5) and vol.array.dtype == np.float32
  for k in range(2):
    np.testing.assert_array_equal(vol.array[k],
                                  2.0 * stored_pixels(k) - 1024.0)
  np.testing.assert_allclose(vol.spacing, (GAP, 0.7, 0.9))
  # DICOM C.7.6.2.1.1: voxel (d, h, w) lies at IPP_d + h * 0.7 * COL +
  # w * 0.9 * ROW (LPS); RAS negates x and y. nibabel index = (w, h, d).
  for d, h, w in [(0, 0, 0), (1, 3, 4), (1, 2, 0), (0, 1, 3)]:
    lps = ORIGIN + d * GAP * NORMAL + h * 0.7 * COL + w * 0.9 * ROW
    ras = lps * [-1, -1, 1]
    np.testing.assert_allclose(vol.affine @ [w, h, d, 1], [*ras, 1],
                               atol=1e-9)


def test_dicom_series_written_as_nifti(series, tmp_path):
  vol = volume_io.read_volume(str(series))
  mask = (vol.array > 0).astype(np.uint8)
  volume_io.write_nifti_like(str(tmp_path / 'm.nii.gz'), mask, vol)
  back = volume_io.read_nifti(str(tmp_path / 'm.nii.gz'))
  np.testing.assert_array_equal(back.array, mask)
  np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
  np.testing.assert_allclose(back.spacing, vol.spacing, rtol=1e-6)
  assert back.header['sform_code'] == 1  # Scanner coordinates.


def test_dicom_mixed_series_and_sizes_are_errors(series, tmp_path):
  dicom_slice(series / 'c.dcm', 2, generate_uid())
  with pytest.raises(ValueError, match='series'):
    volume_io.read_dicom_series(str(series))
  other = tmp_path / 'sizes'
  other.mkdir()
  uid = generate_uid()
  dicom_slice(other / 'a.dcm', 0, uid)
  dicom_slice(other / 'b.dcm', 1, uid, rows=3)
  with pytest.raises(ValueError, match='different sizes'):
    volume_io.read_dicom_series(str(other))


def test_dicom_duplicate_positions_and_corrupt_file(tmp_path):
  folder = tmp_path / 'dup'
  folder.mkdir()
  uid = generate_uid()
  dicom_slice(folder / 'a.dcm', 0, uid)
  dicom_slice(folder / 'b.dcm', 0, uid)
  with pytest.raises(ValueError, match='share a position'):
    volume_io.read_dicom_series(str(folder))
  (folder / 'b.dcm').write_bytes(b'garbage')
  with pytest.raises(ValueError, match='b.dcm'):
    volume_io.read_dicom_series(str(folder))


def test_read_volume_dispatch(tmp_path, series):
  path = save_nifti(tmp_path / 'x.nii', np.zeros((3, 4, 5), np.float32))
  assert volume_io.read_volume(path).array.shape == (5, 4, 3)
  assert volume_io.read_volume(str(series)).array.shape == (2, 4, 5)
  (tmp_path / 'x.txt').write_text('hi')
  with pytest.raises(ValueError, match='not a volume'):
    volume_io.read_volume(str(tmp_path / 'x.txt'))
