"""DICOM series as training data: geometry, checks, SUV, train and predict."""

import json
import math
import os

import nibabel as nib
import numpy as np
from PIL import Image
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
import pytest

from medseg_jax import predict
from medseg_jax import train
from medseg_jax.data import check
from medseg_jax.data import dicom_series
from medseg_jax.data import volume_io
from medseg_jax.data import volume_sources
from tests import test_volume_io
from tests.conftest import set_fields, tiny_config, TINY_OVERRIDES

# An oblique series: rows along ROW, columns down COL (LPS cosines).
def _rotation(z_deg, x_deg):
  z, x = math.radians(z_deg), math.radians(x_deg)
  rz = np.array([[math.cos(z), -math.sin(z), 0], [math.sin(z), math.cos(z), 0],
                 [0, 0, 1]])
  rx = np.array([[1, 0, 0], [0, math.cos(x), -math.sin(x)],
                 [0, math.sin(x), math.cos(x)]])
  return rz @ rx


ROW = _rotation(25, 10) @ [1.0, 0.0, 0.0]  # Oblique coronal: orthonormal.
COL = _rotation(25, 10) @ [0.0, 0.0, -1.0]
NORMAL = np.cross(ROW, COL)
ORIGIN = np.array([-30.0, 12.5, 80.0])
GAP, ROW_GAP, COL_GAP = 2.5, 0.8, 1.2  # Slice gap, PixelSpacing (mm).
SHAPE = (10, 20, 20)  # (slices, rows, columns)


def series_affine(origin=ORIGIN):
  """The RAS affine of nibabel index (column, row, slice), by hand."""
  lps = np.eye(4)
  lps[:3, 0], lps[:3, 1], lps[:3, 2] = ROW * COL_GAP, COL * ROW_GAP, NORMAL * GAP
  lps[:3, 3] = origin
  return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def write_slice(path, k, pixels, series_uid, modality='CT', **tags):
  """Writes slice k (stored uint16, slope 1, intercept -1024 for CT)."""
  ds = test_volume_io.slice_dataset(series_uid, modality)
  ds.Rows, ds.Columns = pixels.shape
  ds.PixelSpacing = [ROW_GAP, COL_GAP]
  ds.SliceThickness = GAP
  ds.ImageOrientationPatient = [float(v) for v in (*ROW, *COL)]
  ds.ImagePositionPatient = [float(v) for v in ORIGIN + k * GAP * NORMAL]
  ds.InstanceNumber = 100 - k  # Misleading on purpose.
  ds.RescaleSlope = 1
  ds.RescaleIntercept = -1024 if modality == 'CT' else 0
  for key, value in tags.items():
    setattr(ds, key, value)
  ds.PixelData = np.ascontiguousarray(pixels, np.uint16).tobytes()
  ds.save_as(str(path), enforce_file_format=True)


def write_series(folder, volume, seed, modality='CT', uid=None, **tags):
  """Writes [D, H, W] stored values as a series with shuffled file names.

  Returns:
    The file stems in slice order (position along the normal).
  """
  os.makedirs(folder, exist_ok=True)
  uid = uid or generate_uid()
  names = [f'IM{n:04d}' for n in
           np.random.default_rng(seed).permutation(len(volume))]
  for k, name in enumerate(names):
    write_slice(os.path.join(folder, name + '.dcm'), k, volume[k], uid,
                modality, **tags)
  return names


def ct_case(seed):
  """A CT-like volume (stored values) with a bright box, and its mask."""
  rng = np.random.default_rng(seed)
  stored = rng.integers(980, 1060, SHAPE).astype(np.uint16)  # ~0 HU.
  mask = np.zeros(SHAPE, np.uint8)
  d, h, w = rng.integers(2, 5), rng.integers(3, 9), rng.integers(3, 9)
  mask[d:d + 4, h:h + 8, w:w + 8] = 1
  stored[mask == 1] += 300
  return stored, mask


@pytest.fixture(scope='module')
def dicom_dataset(tmp_path_factory):
  """An MSD data set of 6 CT series: 3 NIfTI labels, 3 PNG-slice labels."""
  root = tmp_path_factory.mktemp('dicom_ds')
  training = []
  for i in range(6):
    stored, mask = ct_case(i)
    folder = root / 'dicom' / f'case{i}'
    stems = write_series(folder, stored, seed=i)
    if i % 2:
      (root / 'labelsTr').mkdir(exist_ok=True)
      label = f'labelsTr/case{i}.nii.gz'
      nib.save(nib.Nifti1Image(mask.transpose(2, 1, 0), series_affine()),
               str(root / label))
    else:
      label = f'masks/case{i}'
      (root / label).mkdir(parents=True)
      for k, stem in enumerate(stems):
        Image.fromarray(mask[k]).save(root / label / f'{stem}.png')
    training.append({'image': f'./dicom/case{i}', 'label': f'./{label}'})
  (root / 'dataset.json').write_text(json.dumps({
      'modality': {'0': 'CT'}, 'labels': {'0': 'background', '1': 'lesion'},
      'training': training}))
  return root


def test_series_sorted_by_position_with_hand_geometry(dicom_dataset):
  stored, mask = ct_case(0)
  vol = volume_io.read_volume(str(dicom_dataset / 'dicom' / 'case0'))
  np.testing.assert_array_equal(vol.array, stored.astype(np.float32) - 1024)
  np.testing.assert_allclose(vol.spacing, (GAP, ROW_GAP, COL_GAP))
  np.testing.assert_allclose(vol.affine, series_affine(), atol=1e-6)
  shape, spacing, channels, affine = volume_io.read_volume_header(
      str(dicom_dataset / 'dicom' / 'case0'))
  assert (shape, channels) == (SHAPE, 1)
  np.testing.assert_allclose(affine, vol.affine)
  # PNG masks are matched to slices by file name, not by their own order.
  label = volume_io.read_label_volume(str(dicom_dataset / 'masks' / 'case0'),
                                      vol)
  np.testing.assert_array_equal(label.array, mask)


def data_config(root, **overrides):
  values = dict(
      data__source='nifti', data__root=str(root), data__num_classes=1,
      data__in_channels=1, data__patch_size=(8, 16, 16),
      data__preprocess__intensity='ct', data__cache='memory',
      data__cache_dir=str(root.parent / (root.name + '_cache')))
  return tiny_config(**{**values, **overrides})


def test_manifest_source_reads_series_and_both_mask_kinds(dicom_dataset):
  config = data_config(dicom_dataset)
  assert check.check_dataset(config.data) == []
  source = volume_sources.build_nifti_source(config.data)
  assert source.shapes() == [SHAPE] * 6
  for i in (0, 1):  # PNG slices, NIfTI.
    record = source[i]
    np.testing.assert_array_equal(record['mask'], ct_case(i)[1])
    assert record['image'].shape == (*SHAPE, 1)
    np.testing.assert_allclose(record['spacing'], (GAP, ROW_GAP, COL_GAP))


def test_train_on_dicom_and_predict_into_series_geometry(dicom_dataset,
                                                         tmp_path):
  from configs import unet3d  # pylint: disable=import-outside-toplevel
  config = set_fields(unet3d.get_config('cpu'), {
      **TINY_OVERRIDES, 'data.source': 'nifti', 'data.root': str(dicom_dataset),
      'data.num_classes': 1, 'data.in_channels': 1,
      'data.patch_size': (8, 16, 16), 'data.preprocess.intensity': 'ct',
      'model.features': (4, 8), 'train.num_steps': 3, 'train.batch_size': 2,
      'eval.batch_size': 2})
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  out = tmp_path / 'pred'
  assert predict.predict_paths(config, workdir, f'{dicom_dataset}/dicom/case3',
                               str(out)) == []
  written = nib.load(str(out / 'case3.nii.gz'))
  assert written.shape == SHAPE[::-1]  # nibabel (column, row, slice).
  np.testing.assert_allclose(written.affine, series_affine(), atol=1e-4)


def test_two_series_in_one_folder_is_one_line_before_training(
    dicom_dataset, tmp_path):
  root = tmp_path / 'mixed'
  stored, _ = ct_case(0)
  write_series(root / 'dicom' / 'case0', stored, seed=0)
  other = generate_uid()
  write_slice(root / 'dicom' / 'case0' / 'X.dcm', 11, stored[0], other)
  label = root / 'labelsTr' / 'case0.nii.gz'
  label.parent.mkdir()
  nib.save(nib.Nifti1Image(np.zeros(SHAPE[::-1], np.uint8), series_affine()),
           str(label))
  (root / 'dataset.json').write_text(json.dumps({
      'modality': {'0': 'CT'}, 'labels': {'0': 'background', '1': 'x'},
      'training': [{'image': './dicom/case0',
                    'label': './labelsTr/case0.nii.gz'}]}))
  config = data_config(root, data__val_fraction=0.0, data__test_fraction=0.0)
  problems = check.check_dataset(config.data)
  assert len(problems) == 1
  path, reason = problems[0]
  assert path == str(root / 'dicom' / 'case0')
  assert 'mixes 2 DICOM series' in reason and other in reason
  assert '\n' not in reason
  workdir = tmp_path / 'w'
  with pytest.raises(check.DataCheckError) as error:
    train.train_and_evaluate(config, str(workdir))
  lines = [l for l in str(error.value).splitlines() if 'mixes 2' in l]
  assert len(lines) == 1 and 'dicom/case0' in lines[0]
  assert not (workdir / 'config.json').exists()


def test_missing_slice_and_inconsistent_spacing(tmp_path):
  stored, _ = ct_case(1)
  stems = write_series(tmp_path / 's', stored, seed=1)
  os.remove(tmp_path / 's' / f'{stems[4]}.dcm')
  with pytest.raises(ValueError, match=r'1 slice\(s\) missing'):
    dicom_series.read_geometry(str(tmp_path / 's'))
  ds = pydicom.dcmread(tmp_path / 's' / f'{stems[6]}.dcm')
  ds.ImagePositionPatient = [float(v) for v in
                             ORIGIN + 6.4 * GAP * NORMAL]
  ds.save_as(tmp_path / 's' / f'{stems[6]}.dcm')
  with pytest.raises(ValueError, match='inconsistent slice spacing'):
    volume_io.read_volume(str(tmp_path / 's'))


PET_TAGS = dict(Units='BQML', PatientWeight=72.5, SeriesDate='20240102',
                SeriesTime='104512.000000', DecayCorrection='START')


def pet_drug(**fields):
  drug = Dataset()
  drug.RadionuclideTotalDose = 350e6  # Bq
  drug.RadionuclideHalfLife = 6586.2  # F-18, s
  drug.RadiopharmaceuticalStartTime = '093000.000000'
  for key, value in fields.items():
    setattr(drug, key, value)
  return pydicom.Sequence([drug])


def test_suv_factor_matches_hand_computation_and_training_source(tmp_path):
  stored = np.random.default_rng(0).integers(0, 5000, (4, 6, 6))
  folder = tmp_path / 'pet' / 'dicom' / 'p0'
  write_series(folder, stored, seed=0, modality='PT',
               RadiopharmaceuticalInformationSequence=pet_drug(), **PET_TAGS)
  # 09:30:00 -> 10:45:12 is 4512 s of decay.
  expected = 72.5 * 1000 / (350e6 * 2 ** (-4512 / 6586.2))
  assert dicom_series.suv_factor(str(folder)) == pytest.approx(expected,
                                                               rel=1e-9)
  root = tmp_path / 'pet'
  (root / 'labelsTr').mkdir()
  nib.save(nib.Nifti1Image(np.zeros((6, 6, 4), np.uint8), series_affine()),
           str(root / 'labelsTr' / 'p0.nii.gz'))
  (root / 'dataset.json').write_text(json.dumps({
      'modality': {'0': 'PT'}, 'labels': {'0': 'background', '1': 'x'},
      'training': [{'image': './dicom/p0', 'label': './labelsTr/p0.nii.gz'}]}))
  config = data_config(root, data__preprocess__intensity='suv')
  source = volume_sources.NiftiSource(str(root), 1, config.data.preprocess)
  np.testing.assert_allclose(source[0]['image'][..., 0],
                             stored * np.float32(expected), rtol=1e-6)


def test_suv_without_tags_is_one_clear_problem(tmp_path):
  folder = tmp_path / 'p1'
  tags = {k: v for k, v in PET_TAGS.items() if k != 'PatientWeight'}
  write_series(folder, np.ones((3, 4, 4)), seed=0, modality='PT',
               RadiopharmaceuticalInformationSequence=pet_drug(), **tags)
  with pytest.raises(ValueError, match='missing DICOM tag.*PatientWeight'):
    dicom_series.suv_factor(str(folder))
  ct = tmp_path / 'ct'
  write_series(ct, np.ones((3, 4, 4)), seed=0)
  with pytest.raises(ValueError, match="needs a PET series"):
    dicom_series.suv_factor(str(ct))
