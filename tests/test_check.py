"""Tests of the data-set check: every planted problem is reported, together."""

import os
import pickle

import pytest

from medseg_jax.data import check
from medseg_jax.data import folder_sources
from tests.test_folder_sources import data_cfg
from tests.test_folder_sources import lesion_mask
from tests.test_folder_sources import make_isic
from tests.test_folder_sources import noise
from tests.test_folder_sources import save
from tests.test_folder_sources import snapshot
from tests.test_folder_sources import write_csv


def make_broken_folder(root):
  """Grayscale images/masks with each kind of problem planted once."""
  images, masks = os.path.join(root, 'images'), os.path.join(root, 'masks')
  for stem in ('ok', 'size', 'values', 'corrupt', 'rgb', 'nomask'):
    ext = '.jpg' if stem == 'corrupt' else '.png'
    image = noise(20, 30) if stem == 'rgb' else noise(20, 30, c=1)
    save(image, os.path.join(images, stem + ext))
  for stem in ('ok', 'corrupt', 'rgb', 'orphan'):
    save(lesion_mask(20, 30), os.path.join(masks, f'{stem}_mask.png'))
  save(lesion_mask(24, 36), os.path.join(masks, 'size_mask.png'))
  save(lesion_mask(20, 30, value=7), os.path.join(masks, 'values_mask.png'))
  corrupt = os.path.join(images, 'corrupt.jpg')
  with open(corrupt, 'rb') as f:
    data = f.read()
  with open(corrupt, 'wb') as f:
    f.write(data[:len(data) // 2])  # Truncated.
  return root


def make_clean_folder(root):
  """The broken folder with every planted problem removed ('ok', 'rgb')."""
  make_broken_folder(root)
  for name in ('images/nomask.png', 'masks/orphan_mask.png',
               'masks/size_mask.png', 'images/values.png',
               'masks/values_mask.png', 'images/corrupt.jpg',
               'masks/corrupt_mask.png', 'images/size.png'):
    os.remove(os.path.join(root, name))
  return root


EXPECTED = {  # File -> words its reason must contain.
    'images/nomask.png': 'no mask',
    'masks/orphan_mask.png': 'mask without image',
    'masks/size_mask.png': 'but its image size.png is 30x20',
    'masks/values_mask.png': '[0, 7]',
    'images/corrupt.jpg': 'truncated',
    'images/rgb.png': '3 channel(s) but config.data.in_channels=1',
    'config.data': 'The val split is empty',
}


def test_every_problem_reported_at_once(tmp_path):
  root = make_broken_folder(str(tmp_path / 'data'))
  before = snapshot(root)
  # 5 paired images: round(5 * 0.1) = 0 validation patients.
  cfg = data_cfg(root, in_channels=1, val_fraction=0.1)
  problems = check.check_dataset(cfg)
  found = {check.relative_to_root(p.path, root): p.reason for p in problems}
  assert len(problems) == len(EXPECTED) == len(found)
  assert set(found) == set(EXPECTED)
  for path, words in EXPECTED.items():
    assert words in found[path], (path, found[path])
  report = check.format_problems(problems, root)
  lines = report.splitlines()
  assert len(lines) == len(EXPECTED) + 1
  assert lines[-1].startswith('7 problem(s) found')
  assert any(line.strip().startswith('images/nomask.png: no mask')
             for line in lines)
  assert snapshot(root) == before  # The data folder is only read.
  with pytest.raises(check.DataCheckError) as info:
    check.assert_dataset_ok(cfg)
  assert info.value.problems == problems
  clone = pickle.loads(pickle.dumps(info.value))
  assert clone.problems == problems and str(clone) == str(info.value)


def test_clean_data_set_has_no_problems(tmp_path):
  root = make_clean_folder(str(tmp_path / 'data'))
  cfg = data_cfg(root, in_channels=3)  # Gray 'ok' is repeated to RGB.
  assert check.check_dataset(cfg) == []
  assert 'no problems found' in check.check_dataset_report(cfg)
  check.assert_dataset_ok(cfg)


def test_empty_data_set(tmp_path):
  root = tmp_path / 'data'
  os.makedirs(root / 'images')
  os.makedirs(root / 'masks')
  problems = check.check_dataset(data_cfg(root))
  assert len(problems) == 1
  assert problems[0].path == str(root / 'images')
  assert 'empty data set' in problems[0].reason


def test_isic_missing_ground_truth_folder_and_metadata_rows(tmp_path):
  root = make_isic(tmp_path / 'isic', validation=False)
  truth = folder_sources.isic_folders(str(root), 'Training')[1]
  for name in os.listdir(truth):
    os.remove(os.path.join(truth, name))
  os.rmdir(truth)
  write_csv(root / 'meta.csv', ['image_id', 'lesion_id'],
            [['ISIC_0000000', 'IL_1']])
  problems = check.check_dataset(
      data_cfg(root, 'isic2018', isic__metadata_csv='meta.csv'))
  reasons = {os.path.basename(p.path): p.reason for p in problems}
  assert 'folder not found' in reasons['ISIC2018_Task1_Training_GroundTruth']
  for i in range(3):
    assert reasons[f'ISIC_{i:07d}.jpg'].startswith('no mask: expected')
  assert len(problems) == 4  # No pair left, so no metadata or split check.


def test_isic_metadata_missing_rows(tmp_path):
  root = make_isic(tmp_path / 'isic')
  write_csv(root / 'meta.csv', ['image_id', 'lesion_id'],
            [['ISIC_0000000', 'IL_1'], ['ISIC_0000001', 'IL_1']])
  problems = check.check_dataset(
      data_cfg(root, 'isic2018', isic__metadata_csv='meta.csv'))
  assert len(problems) == 1
  assert problems[0].path == str(root / 'meta.csv')
  assert '2 image(s) have no row' in problems[0].reason
  assert 'ISIC_0000002' in problems[0].reason


def test_manifest_problems(tmp_path):
  root = tmp_path / 'data'
  save(noise(20, 30), str(root / 'images' / 'a.png'))
  save(noise(20, 30), str(root / 'images' / 'b.png'))
  save(lesion_mask(20, 30), str(root / 'masks' / 'a.png'))
  write_csv(root / 'list.csv', ['image', 'mask', 'patient_id', 'split'], [
      ['images/a.png', 'masks/a.png', 'P1', 'train'],
      ['images/gone.png', 'masks/a.png', 'P2', 'train'],
      ['images/b.png', 'masks/b.png', 'P3', 'train'],
      ['images/a.png', 'masks/a.png', '', 'holdout'],
  ])
  problems = check.check_dataset(data_cfg(root, folder__manifest='list.csv'))
  got = sorted((check.relative_to_root(p.path, str(root)), p.reason)
               for p in problems)
  assert got == [
      ('images/b.png', 'no mask: ' + str(root / 'masks' / 'b.png') +
       ' on line 4 of list.csv does not exist.'),
      ('images/gone.png', 'image on line 3 of list.csv does not exist.'),
      ('list.csv', 'line 5 of list.csv: empty patient_id.'),
      ('list.csv', 'line 5 of list.csv: images/a.png is already on line 2.'),
      ('list.csv', "line 5 of list.csv: split 'holdout' is not train, val or "
                   'test.'),
  ]


def test_split_problems():
  cfg = data_cfg('/nowhere', val_fraction=0.15, test_fraction=0.15)
  many = [f'p{i}' for i in range(20)]
  assert check.split_problems(many, cfg) == []
  # Two patients: round(2 * 0.15) = 0 test patients.
  problems = check.split_problems(['p0', 'p0', 'p1'], cfg)
  assert len(problems) == 1 and problems[0].path == 'config.data'
  assert 'split is empty: 2 patient(s)' in problems[0].reason
  assert check.split_problems([], cfg) == []


def test_dispatch_other_sources(tmp_path):
  assert check.check_dataset(data_cfg('', 'synthetic')) == []
  assert check.check_dataset(data_cfg('', 'synthetic3d')) == []
  unknown = check.check_dataset(data_cfg('', 'dicomweb'))
  assert unknown[0].path == 'config.data.source'
  assert 'needs config.data.root' in check.check_dataset(
      data_cfg('', 'folder'))[0].reason
  missing = tmp_path / 'nothing'
  problems = check.check_dataset(data_cfg(missing, 'nifti'))
  assert problems and problems[0].path == str(missing)
  problems = check.check_dataset(data_cfg(missing, 'folder'))
  assert [(p.path, p.reason) for p in problems] == [
      (str(missing), 'data folder does not exist (config.data.root).')]


def test_format_problems_paths_and_empty():
  problems = [check.Problem('/d/images/x.png', 'bad.'),
              check.Problem('/elsewhere/y.csv', 'worse.'),
              check.Problem('config.data', 'split.'),
              check.Problem('/d', 'data folder does not exist.')]
  lines = check.format_problems(problems, '/d').splitlines()
  assert lines[:4] == ['  images/x.png: bad.', '  /elsewhere/y.csv: worse.',
                       '  config.data: split.',
                       '  /d: data folder does not exist.']
  assert lines[4].startswith('4 problem(s) found in /d.')
  assert check.format_problems([], '/d') == (
      'Data set check: no problems found in /d.')


def test_pair_problems_reads_nothing_else(tmp_path):
  image = save(noise(20, 30), str(tmp_path / 'x.png'))
  mask = save(lesion_mask(20, 30), str(tmp_path / 'x_mask.png'))
  assert check.pair_problems(image, mask, num_classes=1) == []
  bad = tmp_path / 'y.png'
  bad.write_bytes(b'not a png')
  problems = check.pair_problems(image, str(bad), num_classes=1)
  assert [(p.path, 'cannot be opened' in p.reason) for p in problems] == [
      (str(bad), True)]
  assert check.pair_problems(
      image, mask, num_classes=3, label_values=(0, 255, 128)) == []
  got = check.pair_problems(image, mask, num_classes=2, label_values=(0, 1))
  assert len(got) == 1 and '[255]' in got[0].reason


def test_two_images_with_one_stem(tmp_path):
  root = tmp_path / 'data'
  save(noise(20, 30), str(root / 'images' / 'a.png'))
  save(noise(20, 30), str(root / 'images' / 'a.jpg'))
  save(lesion_mask(20, 30), str(root / 'masks' / 'a_mask.png'))
  problems = check.check_dataset(data_cfg(root))
  assert [(os.path.basename(p.path), p.reason) for p in problems] == [
      ('a.jpg', "several files for 'a': a.jpg, a.png; keep one.")]


def test_passed_check_is_remembered_until_a_file_changes(tmp_path,
                                                         monkeypatch):
  root = make_clean_folder(str(tmp_path / 'data'))
  cfg = data_cfg(root, cache_dir=str(tmp_path / 'cache'))
  calls = []
  real = check.check_dataset
  monkeypatch.setattr(check, 'check_dataset',
                      lambda c: calls.append(1) or real(c))
  before = snapshot(root)
  check.assert_dataset_ok(cfg)
  check.assert_dataset_ok(cfg)
  assert len(calls) == 1  # The second call found the marker of the first.
  assert os.path.exists(check.passed_marker(cfg))
  assert snapshot(root) == before  # The marker is not in the data folder.
  # Another config, or a file rewritten with a problem: checked again.
  check.assert_dataset_ok(data_cfg(root, cache_dir=cfg.cache_dir,
                                   image_size=24))
  assert len(calls) == 2
  save(lesion_mask(20, 30, value=7), os.path.join(root, 'masks', 'ok_mask.png'))
  os.utime(os.path.join(root, 'masks', 'ok_mask.png'), ns=(1, 1))
  with pytest.raises(check.DataCheckError, match=r'\[0, 7\]'):
    check.assert_dataset_ok(cfg)
  assert len(calls) == 3
  with pytest.raises(check.DataCheckError):  # A failure is not remembered.
    check.assert_dataset_ok(cfg)
  assert len(calls) == 4
