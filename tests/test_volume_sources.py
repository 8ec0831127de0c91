"""Tests of medseg_jax.data.volume_sources: MSD/nnU-Net, slices, checks."""

import concurrent.futures
import json
import os
import pickle
import sys

import ml_collections
import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from medseg_jax.data import nifti_layout
from medseg_jax.data import preprocess
from medseg_jax.data import volume_io
from medseg_jax.data import volume_sources
from tests import conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE_XYZ = (6, 7, 5)  # (D, H, W) = (5, 7, 6).
SPACING_DHW = (2.5, 0.8, 0.8)


def affine(shift=0.0):
  rot = Rotation.from_euler('xyz', [10, 20, 30], degrees=True).as_matrix()
  out = np.eye(4)
  out[:3, :3] = rot @ np.diag([0.8, 0.8, 2.5])
  out[:3, 3] = (-10.0 + shift, 20.0, 5.5)
  return out


def save(path, data, aff=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  nib.save(nib.Nifti1Image(data, affine() if aff is None else aff), path)


def image_xyz(seed, channels):
  rng = np.random.default_rng(seed)
  data = rng.normal(100 + seed, 10, SHAPE_XYZ + (channels,)).astype(np.float32)
  return data if channels > 1 else data[..., 0]


def label_xyz(seed, classes=3):
  label = np.zeros(SHAPE_XYZ, np.uint8)
  label[1:5, 2:6, 1:4] = 1
  label[2 + seed % 2, 3, 1:3] = classes - 1
  return label


def make_msd(root, n=3, channels=2, training_list=True):
  """An MSD task: 4D 2-channel images, 3 classes, macOS '._' junk files."""
  for i in range(n):
    save(os.path.join(root, 'imagesTr', f'case_{i:03d}.nii.gz'),
         image_xyz(i, channels))
    save(os.path.join(root, 'labelsTr', f'case_{i:03d}.nii.gz'), label_xyz(i))
  for folder in ('imagesTr', 'labelsTr'):
    with open(os.path.join(root, folder, '._case_000.nii.gz'), 'wb') as f:
      f.write(b'\x00\x05\x16\x07 AppleDouble')
  meta = dict(name='Tiny',
              modality={str(c): f'seq{c}' for c in range(channels)},
              labels={'0': 'background', '1': 'oedema', '2': 'core'},
              numTraining=n, test=[])
  if training_list:
    meta['training'] = [dict(image=f'./imagesTr/case_{i:03d}.nii.gz',
                             label=f'./labelsTr/case_{i:03d}.nii.gz')
                        for i in range(n)]
  with open(os.path.join(root, 'dataset.json'), 'w') as f:
    json.dump(meta, f)
  return str(root)


def make_nnunet(root, n=3, channels=2):
  """An nnU-Net v2 data set: one file per channel, binary labels."""
  for i in range(n):
    for c in range(channels):
      save(os.path.join(root, 'imagesTr', f'pat{i}_{c:04d}.nii.gz'),
           image_xyz(10 * i + c, 1))
    save(os.path.join(root, 'labelsTr', f'pat{i}.nii.gz'),
         label_xyz(i, classes=2))
  with open(os.path.join(root, 'dataset.json'), 'w') as f:
    json.dump(dict(channel_names={'0': 'CT', '1': 'PET'},
                   labels={'background': 0, 'lesion': 1}, numTraining=n,
                   file_ending='.nii.gz'), f)
  return str(root)


def snapshot(root):
  return sorted((os.path.relpath(os.path.join(d, n), root),
                 os.stat(os.path.join(d, n)).st_mtime_ns,
                 os.stat(os.path.join(d, n)).st_size)
                for d, _, names in os.walk(root) for n in names)


def data_cfg(root, **overrides):
  sys.path.insert(0, REPO)
  from configs import default  # pylint: disable=import-outside-toplevel
  cfg = default.get_config().data
  cfg.source = 'nifti'
  cfg.root = root
  cfg.num_classes = 3
  cfg.in_channels = 2
  cfg.preprocess.intensity = 'none'
  return conftest.set_fields(cfg, overrides)


def test_msd_records_follow_the_contract(tmp_path):
  root = make_msd(str(tmp_path / 'Task'))
  before = snapshot(root)
  source = volume_sources.build_nifti_source(data_cfg(root))
  assert isinstance(source, volume_sources.NiftiSource)
  assert source.layout == 'msd' and len(source) == 3
  assert source.case_ids == ['case_000', 'case_001', 'case_002']
  assert source.patient_ids == source.case_ids
  assert source.channel_names == ('seq0', 'seq1')
  assert source.class_names == ('oedema', 'core')
  record = source[1]
  assert record['image'].shape == (5, 7, 6, 2)
  assert record['image'].dtype == np.float32
  assert record['mask'].dtype == np.uint8
  assert record['spacing'] == SPACING_DHW
  assert (record['patient_id'], record['case_id']) == ('case_001',) * 2
  # intensity='none': exactly the file's data, transposed to (D, H, W, C).
  np.testing.assert_array_equal(record['image'],
                                image_xyz(1, 2).transpose(2, 1, 0, 3))
  np.testing.assert_array_equal(record['mask'], label_xyz(1).T)
  assert snapshot(root) == before


def test_msd_zscore_equals_preprocess_of_the_read_volume(tmp_path):
  root = make_msd(str(tmp_path / 'Task'), training_list=False)
  source = volume_sources.build_nifti_source(
      data_cfg(root, preprocess__intensity='zscore'))
  assert len(source) == 3  # Found from the folder; '._' files ignored.
  vol = volume_io.read_nifti(os.path.join(root, 'imagesTr',
                                          'case_002.nii.gz'))
  np.testing.assert_allclose(source[2]['image'], preprocess.zscore(vol.array),
                             rtol=1e-6)


def test_nnunet_channels_in_file_order(tmp_path):
  root = make_nnunet(str(tmp_path / 'Dataset001'))
  source = volume_sources.build_nifti_source(data_cfg(root, num_classes=1))
  assert source.layout == 'nnunet' and source.case_ids == ['pat0', 'pat1',
                                                           'pat2']
  record = source[2]
  for c in range(2):
    np.testing.assert_array_equal(record['image'][..., c],
                                  image_xyz(20 + c, 1).T)
  assert set(np.unique(record['mask'])) == {0, 1}


def test_config_mismatches_are_clear(tmp_path):
  root = make_msd(str(tmp_path / 'Task'))
  with pytest.raises(ValueError, match='set it to 3'):
    volume_sources.build_nifti_source(data_cfg(root, num_classes=1))
  with pytest.raises(ValueError, match='in_channels=6'):
    volume_sources.build_nifti_source(
        data_cfg(root, volume_mode='2d', slice_context=1))
  with pytest.raises(ValueError, match='config.data.root'):
    volume_sources.build_nifti_source(data_cfg(''))


def test_slice_source_lengths_ids_and_context(tmp_path):
  root = make_msd(str(tmp_path / 'Task'))
  cfg = data_cfg(root, volume_mode='2d', slice_context=1, in_channels=6)
  slices = volume_sources.build_nifti_source(cfg)
  assert isinstance(slices, volume_sources.SliceSource)
  assert len(slices) == 3 * 5
  assert slices.case_ids[:2] == ['case_000:z000', 'case_000:z001']
  assert slices.case_ids[7] == 'case_001:z002'
  assert slices.patient_ids[7] == 'case_001'
  volume = slices.volumes[1]
  for z in (0, 2, 4):
    record = slices[5 + z]
    assert record['case_id'] == f'case_001:z{z:03d}'
    assert record['image'].shape == (7, 6, 6)
    assert record['spacing'] == (0.8, 0.8)
    np.testing.assert_array_equal(record['mask'], volume['mask'][z])
    # Channels: slices z-1, z, z+1 (clamped at the edges), C=2 each.
    for block, dz in enumerate((-1, 0, 1)):
      np.testing.assert_array_equal(
          record['image'][..., 2 * block:2 * block + 2],
          volume['image'][min(max(z + dz, 0), 4)])


def test_slice_depths_from_headers_match_resampling(tmp_path):
  root = make_msd(str(tmp_path / 'Task'))
  cfg = data_cfg(root, volume_mode='2d', preprocess__target_spacing=(1.0, 1.0,
                                                                    1.0))
  slices = volume_sources.build_nifti_source(cfg)
  # D: 5 * 2.5 / 1 = 12.5 -> 12 (ties to even); H: 5.6; W: 4.8 -> 5.
  assert len(slices) == 3 * 12
  record = slices[len(slices) - 1]
  assert record['image'].shape == (6, 5, 2)
  assert record['case_id'] == 'case_002:z011'


def test_pickling_drops_the_memory_cache(tmp_path):
  root = make_msd(str(tmp_path / 'Task'))
  slices = volume_sources.build_nifti_source(data_cfg(root, volume_mode='2d'))
  first = slices[3]
  blob = pickle.dumps(slices)
  assert len(blob) < 20_000  # No decoded volume travels to the workers.
  again = pickle.loads(blob)
  np.testing.assert_array_equal(again[3]['image'], first['image'])
  assert again.case_ids == slices.case_ids


def test_memory_cache_reuses_decoded_cases(tmp_path, monkeypatch):
  root = make_msd(str(tmp_path / 'Task'))
  source = volume_sources.build_nifti_source(data_cfg(root))
  first = source[0]
  monkeypatch.setattr(volume_sources, 'read_case_arrays', _no_reading)
  assert source[0]['image'] is first['image']
  assert not first['image'].flags.writeable  # Shared: protected from edits.


def _no_reading(case):
  raise AssertionError(f'{case.case_id} decoded again instead of cached')


def test_disk_cache_reuse_and_invalidation(tmp_path, monkeypatch):
  root = make_msd(str(tmp_path / 'Task'))
  before = snapshot(root)
  cache_dir = str(tmp_path / 'cache')
  cfg = data_cfg(root, cache='disk', cache_dir=cache_dir,
                 preprocess__intensity='zscore')
  expected = volume_sources.build_nifti_source(cfg)[1]
  files = [f for _, _, names in os.walk(cache_dir) for f in names]
  assert len(files) == 1 and files[0].startswith('case_001-')
  assert files[0].endswith('.npz')
  with monkeypatch.context() as patch:
    patch.setattr(volume_sources, 'read_case_arrays', _no_reading)
    fresh = volume_sources.build_nifti_source(cfg)  # A new process, say.
    np.testing.assert_array_equal(fresh[1]['image'], expected['image'])
    np.testing.assert_array_equal(fresh[1]['mask'], expected['mask'])
    assert fresh[1]['spacing'] == expected['spacing']
    # Other options are another key: decoded again.
    other = volume_sources.build_nifti_source(
        data_cfg(root, cache='disk', cache_dir=cache_dir))
    with pytest.raises(AssertionError, match='decoded again'):
      other[1]  # pylint: disable=pointless-statement
  assert snapshot(root) == before
  with pytest.raises(ValueError, match='inside the data folder'):
    volume_sources.build_nifti_source(
        data_cfg(root, cache='disk', cache_dir=os.path.join(root, 'c')))


def test_patients_csv_groups_cases(tmp_path):
  root = make_msd(str(tmp_path / 'Task'))
  with open(os.path.join(root, 'patients.csv'), 'w') as f:
    f.write('case_id,patient_id\ncase_000,A\ncase_001,A\ncase_002,B\n')
  cfg = data_cfg(root)
  cfg.nifti = ml_collections.ConfigDict(dict(patients_csv='patients.csv'))
  source = volume_sources.build_nifti_source(cfg)
  assert source.patient_ids == ['A', 'A', 'B']
  with open(os.path.join(root, 'patients.csv'), 'w') as f:
    f.write('case_id,patient_id\ncase_000,A\n')
  with pytest.raises(ValueError, match='2 case'):
    volume_sources.build_nifti_source(cfg)


def test_find_problems_3d_lists_every_planted_problem(tmp_path):
  root = make_msd(str(tmp_path / 'Task'), n=6)
  images, labels = os.path.join(root, 'imagesTr'), os.path.join(root,
                                                                'labelsTr')
  os.remove(os.path.join(labels, 'case_000.nii.gz'))  # Missing label.
  save(os.path.join(labels, 'case_001.nii.gz'),
       np.zeros((6, 7, 4), np.uint8))  # Other shape.
  save(os.path.join(labels, 'case_002.nii.gz'), label_xyz(2),
       affine(shift=1.0))  # Shifted 1 mm: not aligned.
  with open(os.path.join(images, 'case_003.nii.gz'), 'wb') as f:
    f.write(b'\x1f\x8b truncated')  # Corrupt.
  bad = label_xyz(4)
  bad[0, 0, 0] = 7
  save(os.path.join(labels, 'case_004.nii.gz'), bad)  # Value 7 >= 3 classes.
  with open(os.path.join(root, 'dataset.json')) as f:
    meta = json.load(f)
  meta['training'].append(dict(image='./imagesTr/gone.nii.gz',
                               label='./labelsTr/gone.nii.gz'))
  with open(os.path.join(root, 'dataset.json'), 'w') as f:
    json.dump(meta, f)
  before = snapshot(root)
  problems = nifti_layout.find_problems_3d(data_cfg(root))
  assert snapshot(root) == before
  found = {os.path.basename(p): r for p, r in problems}
  assert len(problems) == 6, problems
  assert 'no label' in found['case_000.nii.gz']
  assert 'differs from (5, 7, 6)' in found['case_001.nii.gz']
  assert 'affine differs' in found['case_002.nii.gz']
  assert 'not a readable NIfTI' in found['case_003.nii.gz']
  assert '[7]' in found['case_004.nii.gz']
  assert 'does not exist' in found['gone.nii.gz']
  assert 'case_005.nii.gz' not in found


def test_find_problems_3d_layout_and_config(tmp_path):
  root = make_nnunet(str(tmp_path / 'Dataset002'))
  os.remove(os.path.join(root, 'imagesTr', 'pat1_0001.nii.gz'))
  problems = nifti_layout.find_problems_3d(data_cfg(root))
  reasons = ' | '.join(r for _, r in problems)
  assert 'pat1_0001.nii.gz' in reasons and 'missing channel' in reasons
  assert 'num_classes=3; set it to 1' in reasons
  assert len(problems) == 2
  empty = str(tmp_path / 'empty')
  os.makedirs(os.path.join(empty, 'imagesTr'))
  with open(os.path.join(empty, 'dataset.json'), 'w') as f:
    json.dump(dict(modality={'0': 'MR'}, labels={'0': 'bg', '1': 'x'}), f)
  assert 'empty data set' in nifti_layout.find_problems_3d(
      data_cfg(empty, num_classes=1, in_channels=1))[0][1]
  with open(os.path.join(empty, 'dataset.json'), 'w') as f:
    f.write('{not json')
  problems = nifti_layout.find_problems_3d(data_cfg(empty))
  assert problems[0][0].endswith('dataset.json')
  assert 'invalid dataset.json' in problems[0][1]
  os.remove(os.path.join(empty, 'dataset.json'))
  assert 'missing' in nifti_layout.find_problems_3d(data_cfg(empty))[0][1]
  with pytest.raises(ValueError, match='dataset.json'):
    volume_sources.build_nifti_source(data_cfg(empty))


def test_stacked_context_equals_slices_for_prediction():
  image = np.random.default_rng(0).normal(size=(4, 3, 2, 2)).astype(np.float32)
  stacked = volume_sources.stack_slice_context(image, 2)
  assert stacked.shape == (4, 3, 2, 10)
  for z in range(4):
    np.testing.assert_array_equal(
        stacked[z], volume_sources.slice_with_context(image, z, 2))
  np.testing.assert_array_equal(volume_sources.stack_slice_context(image, 0),
                                image)


def test_2d_slices_of_several_sizes_need_a_patch_size(tmp_path):
  root = make_msd(str(tmp_path / 'Task'), n=2)
  save(os.path.join(root, 'imagesTr', 'case_001.nii.gz'),
       np.zeros((8, 7, 5, 2), np.float32))
  save(os.path.join(root, 'labelsTr', 'case_001.nii.gz'),
       np.zeros((8, 7, 5), np.uint8))
  with pytest.raises(ValueError, match='patch_size'):
    volume_sources.build_nifti_source(data_cfg(root, volume_mode='2d'))
  slices = volume_sources.build_nifti_source(
      data_cfg(root, volume_mode='2d', patch_size=(8, 8)))
  assert slices[len(slices) - 1]['image'].shape == (7, 8, 2)


def test_corrupt_disk_cache_entry_is_recomputed(tmp_path):
  root = make_msd(str(tmp_path / 'Task'), n=1)
  cache_dir = str(tmp_path / 'cache')
  cfg = data_cfg(root, cache='disk', cache_dir=cache_dir)
  expected = volume_sources.build_nifti_source(cfg)[0]['image']
  (entry,) = [os.path.join(d, n) for d, _, names in os.walk(cache_dir)
              for n in names]
  with open(entry, 'wb') as f:
    f.write(b'PK truncated')
  again = volume_sources.build_nifti_source(cfg)[0]['image']
  np.testing.assert_array_equal(again, expected)
  assert os.path.getsize(entry) > 100  # Rewritten whole.


def test_memory_cache_is_capped_and_thread_safe(tmp_path):
  root = make_msd(str(tmp_path / 'Task'), n=4)
  # 2 cases: image (2 float32 channels) and mask per voxel, and the spacing.
  cfg = data_cfg(root, cache_memory_mb=2 * (5 * 7 * 6 * 9 + 3 * 8) / 2**20)
  source = volume_sources.build_nifti_source(cfg)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    records = list(pool.map(source.__getitem__, [0, 1, 2, 3] * 5))
  for i, record in enumerate(records):
    assert record['case_id'] == f'case_{i % 4:03d}'
  cache = source._cache  # pylint: disable=protected-access
  assert len(cache._memory) == 2  # pylint: disable=protected-access
  assert cache._used <= cache.memory_bytes  # pylint: disable=protected-access
