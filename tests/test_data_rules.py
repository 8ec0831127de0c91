"""Data-set trust rules: broken links, class names, ISIC patients."""

import logging
import os

import pytest

from medseg_jax.data import check
from medseg_jax.data import folder_sources
from medseg_jax.data import nifti_layout
from medseg_jax.data import sources
from tests.test_folder_sources import data_cfg
from tests.test_folder_sources import lesion_mask
from tests.test_folder_sources import make_isic
from tests.test_folder_sources import noise
from tests.test_folder_sources import save
from tests.test_folder_sources import write_csv
from tests.test_volume_sources import data_cfg as nifti_cfg
from tests.test_volume_sources import make_msd


def _folder_with_a_broken_image_link(root):
  save(noise(20, 30), os.path.join(root, 'images', 'a.png'))
  save(lesion_mask(20, 30), os.path.join(root, 'masks', 'a_mask.png'))
  save(lesion_mask(20, 30), os.path.join(root, 'masks', 'b_mask.png'))
  link = os.path.join(root, 'images', 'b.png')
  os.symlink(os.path.join(root, 'gone', 'b.png'), link)
  return link


def test_a_dangling_image_link_is_a_broken_link_not_an_orphan_mask(tmp_path):
  root = tmp_path / 'data'
  link = _folder_with_a_broken_image_link(str(root))
  problems = check.check_dataset(data_cfg(root))
  assert [p.path for p in problems] == [link]
  assert problems[0].reason.startswith('broken link: points to ')
  assert str(root / 'gone' / 'b.png') in problems[0].reason
  assert 'mask without image' not in check.format_problems(problems, root)


def test_a_dangling_mask_link_and_isic_links(tmp_path):
  root = tmp_path / 'data'
  save(noise(20, 30), str(root / 'images' / 'a.png'))
  os.makedirs(root / 'masks')
  os.symlink(str(tmp_path / 'nowhere.png'), str(root / 'masks' / 'a_mask.png'))
  problems = check.check_dataset(data_cfg(root))
  assert [(p.path, p.reason.split(':')[0]) for p in problems] == [
      (str(root / 'masks' / 'a_mask.png'), 'broken link')]
  isic = make_isic(tmp_path / 'isic', validation=False)
  inputs = folder_sources.isic_folders(str(isic), 'Training')[0]
  os.remove(os.path.join(inputs, 'ISIC_0000001.jpg'))
  os.symlink('missing.jpg', os.path.join(inputs, 'ISIC_0000001.jpg'))
  reasons = [p.reason for p in check.check_dataset(data_cfg(isic, 'isic2018'))]
  assert len(reasons) == 1 and reasons[0].startswith('broken link: points to '
                                                     'missing.jpg')


def test_class_names_come_from_dataset_json(tmp_path):
  root = make_msd(str(tmp_path / 'Task'))
  assert sources.class_names(nifti_cfg(root)) == ('oedema', 'core')
  # Config names that agree are accepted; all K names with background too.
  assert sources.class_names(nifti_cfg(
      root, class_names=('oedema', 'core'))) == ('oedema', 'core')
  assert sources.class_names(nifti_cfg(
      root, class_names=('bg', 'oedema', 'core'))) == ('oedema', 'core')


def test_config_class_names_that_contradict_the_data_are_refused(tmp_path):
  root = make_msd(str(tmp_path / 'Task'))
  cfg = nifti_cfg(root, class_names=('enhancing', 'necrosis'),
                  val_fraction=0.0, test_fraction=0.0)
  with pytest.raises(ValueError) as info:
    sources.build_source(cfg)
  message = str(info.value)
  assert '\n' not in message
  assert "('enhancing', 'necrosis')" in message
  assert "('oedema', 'core')" in message
  problems = check.check_dataset(cfg)
  assert [p.path for p in problems] == ['config.data.class_names']


def test_class_names_of_other_sources_and_counts(tmp_path):
  synth3d = nifti_cfg('', source='synthetic3d', num_classes=4, in_channels=4)
  assert sources.class_names(synth3d) == ('oedema', 'enhancing', 'necrosis')
  merged = nifti_cfg('', source='synthetic3d', num_classes=3, in_channels=4)
  assert sources.class_names(merged) == ('oedema', 'core')
  # The synthetic names are the generator's, not a data set's on disk.
  with pytest.raises(ValueError, match='enhancing'):
    sources.class_names(nifti_cfg(
        '', source='synthetic3d', num_classes=4, in_channels=4,
        class_names=('grey matter', 'white matter', 'csf')))
  folder = data_cfg(tmp_path, num_classes=3)
  assert sources.class_names(folder) == ('class_1', 'class_2')
  assert sources.class_names(data_cfg(tmp_path)) == ('foreground',)
  named = data_cfg(tmp_path, num_classes=3, class_names=('grey', 'white'))
  assert sources.class_names(named) == ('grey', 'white')
  with pytest.raises(ValueError, match='names 1 class'):
    sources.class_names(data_cfg(tmp_path, num_classes=3,
                                 class_names=('grey',)))


def test_an_isic_metadata_file_in_the_root_groups_patients(tmp_path, caplog):
  root = make_isic(tmp_path / 'isic', validation=False)
  write_csv(root / 'metadata.csv', ['isic_id', 'patient_id', 'lesion_id'], [
      ['ISIC_0000000', 'IP_1', 'IL_1'], ['ISIC_0000001', 'IP_1', 'IL_2'],
      ['ISIC_0000002', '', 'IL_3']])
  with caplog.at_level(logging.INFO):
    source = folder_sources.build_isic_source(data_cfg(root, 'isic2018'))
  assert source.patient_ids == ['IP_1', 'IP_1', 'IL_3']
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 1 and 'metadata.csv found in' in lines[0]
  # A named file wins over the one found.
  write_csv(root / 'other.csv', ['image_id', 'patient_id'], [
      [f'ISIC_{i:07d}', 'P'] for i in range(3)])
  named = folder_sources.build_isic_source(
      data_cfg(root, 'isic2018', isic__metadata_csv='other.csv'))
  assert named.patient_ids == ['P', 'P', 'P']


def test_isic_without_metadata_warns_that_the_split_is_per_image(tmp_path,
                                                                  caplog):
  root = make_isic(tmp_path / 'isic', validation=False)
  write_csv(root / 'notes.csv', ['file', 'comment'], [['x', 'y']])
  with caplog.at_level(logging.INFO):
    source = folder_sources.build_isic_source(data_cfg(root, 'isic2018'))
  assert source.patient_ids == source.case_ids
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and 'PER IMAGE' in warnings[0].getMessage()
  # 'none' opts out of a metadata file in the root, still loudly.
  write_csv(root / 'metadata.csv', ['isic_id', 'patient_id'],
            [[f'ISIC_{i:07d}', 'P'] for i in range(3)])
  caplog.clear()
  with caplog.at_level(logging.INFO):
    source = folder_sources.build_isic_source(
        data_cfg(root, 'isic2018', isic__metadata_csv='none'))
  assert source.patient_ids == source.case_ids
  assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_both_checks_return_problem_objects(tmp_path):
  problems = nifti_layout.find_problems_3d(nifti_cfg(str(tmp_path / 'none')))
  assert problems and all(isinstance(p, check.Problem) for p in problems)
  path, reason = problems[0]  # Still unpacks like the tuples it replaced.
  assert (path, reason) == (problems[0].path, problems[0].reason)


def test_broken_links_in_nifti_data_sets(tmp_path):
  root = make_msd(str(tmp_path / 'Task'))
  label = os.path.join(root, 'labelsTr', 'case_001.nii.gz')
  os.remove(label)
  os.symlink(os.path.join(root, 'elsewhere.nii.gz'), label)
  problems = check.check_dataset(nifti_cfg(root, val_fraction=0.0,
                                           test_fraction=0.0))
  assert [p.path for p in problems] == [label]
  assert problems[0].reason.startswith('broken link: points to ')
