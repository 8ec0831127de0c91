"""dataset.json describes the data set; config_lib.fill_from_data uses it."""

import json
import os
import sys

import pytest

from medseg_jax import config_lib
from medseg_jax.data import dataset_json
from tests import conftest
from tests.test_planning import write_msd


def _json(root, meta):
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, 'dataset.json'), 'w') as f:
    json.dump(meta, f)
  return str(root)


def _config(name, arg, **overrides):
  sys.path.insert(0, conftest.REPO)
  module = __import__(f'configs.{name}', fromlist=['get_config'])
  return conftest.set_fields(module.get_config(arg), overrides)


def test_msd_and_nnunet_layouts_describe_channels_and_labels(tmp_path):
  msd = dataset_json.read_dataset_json(_json(tmp_path / 'msd', {
      'modality': {'0': 'CT'}, 'labels': {'0': 'background', '1': 'liver',
                                          '2': 'tumour'}}))
  assert (msd.layout, msd.channel_names, msd.num_classes) == ('msd', ('CT',),
                                                              3)
  assert msd.normalization == ('ct',)
  nnunet = dataset_json.read_dataset_json(_json(tmp_path / 'nnunet', {
      'channel_names': {'0': 'T2', '1': 'ADC'},
      'labels': {'background': 0, 'prostate': 1}, 'file_ending': '.nii.gz'}))
  assert nnunet.layout == 'nnunet' and nnunet.num_channels == 2
  assert nnunet.class_names == ('background', 'prostate')
  assert nnunet.num_classes == 1  # Two labels: binary, sigmoid.
  assert nnunet.normalization == ('zscore', 'zscore')


def test_region_based_labels_are_refused_in_one_line(tmp_path):
  root = _json(tmp_path / 'brats', {
      'channel_names': {'0': 'FLAIR'}, 'file_ending': '.nii.gz',
      'labels': {'background': 0, 'whole tumor': [1, 2, 3], 'core': [2, 3]},
      'regions_class_order': [1, 2]})
  with pytest.raises(dataset_json.RegionLabelsError) as error:
    dataset_json.read_dataset_json(root)
  message = str(error.value)
  assert '\n' not in message and 'dataset.json' in message
  assert 'region-based' in message
  # Training refuses it too, before anything else.
  config = _config('unet3d', 'cpu', data__source='nifti', data__root=root)
  with pytest.raises(ValueError, match='region-based'):
    config_lib.fill_from_data(config)


def test_defaults_are_filled_from_dataset_json(tmp_path):
  root = write_msd(str(tmp_path / 'ct'), 'ct', n=2)
  config = _config('unet', 'cpu', data__source='nifti', data__root=root)
  assert config.data.in_channels == 3 and config.data.num_classes == 1
  filled = config_lib.fill_from_data(config)
  assert filled.data.in_channels == 1  # One CT channel.
  assert filled.data.num_classes == 3  # background, organ, lesion.
  assert filled.data.preprocess.intensity == 'ct'
  # Never the photo statistics on volumes.
  assert (filled.data.mean, filled.data.std) == ((0.0,), (1.0,))
  assert config.data.in_channels == 3  # The input is not changed.


def test_photo_sources_keep_their_statistics():
  config = conftest.tiny_config()
  filled = config_lib.fill_from_data(config)
  assert filled.to_dict() == config.to_dict()


def test_contradictions_name_both_values(tmp_path):
  root = write_msd(str(tmp_path / 'mr2'), 'mr2', n=2)
  config = _config('unet', 'cpu', data__source='nifti', data__root=root,
                   data__in_channels=4)
  with pytest.raises(ValueError) as error:
    config_lib.fill_from_data(config)
  message = str(error.value)
  assert 'config.data.in_channels=4' in message
  assert "2 channel(s) ['T1', 'T2']" in message and 'set it to 2' in message
  config = _config('unet', 'cpu', data__source='nifti', data__root=root,
                   data__num_classes=2, data__in_channels=2)
  with pytest.raises(ValueError, match=r'num_classes=2 contradicts .*3 '
                     r'labels.*set it to 3'):
    config_lib.fill_from_data(config)


def test_a_file_for_another_source_binds_only_explicit_keys(tmp_path):
  # configs/unet3d.py sets 4 channels and 4 classes for synthetic3d; with
  # --config.data.source=nifti those are not the user's statement.
  root = write_msd(str(tmp_path / 'mr2'), 'mr2', n=2)
  config = _config('unet3d', 'cpu', data__source='nifti', data__root=root)
  with pytest.raises(ValueError, match='in_channels=4'):
    config_lib.fill_from_data(config)  # Read as a NIfTI config: refused.
  filled = config_lib.fill_from_data(
      config, explicit={'data.source', 'data.root'})
  assert (filled.data.in_channels, filled.data.num_classes) == (2, 3)
  with pytest.raises(ValueError, match='in_channels=4'):
    config_lib.fill_from_data(
        config, explicit={'data.source', 'data.root', 'data.in_channels'})


def test_slice_mode_derives_channels_and_patch(tmp_path):
  root = write_msd(str(tmp_path / 'mr2'), 'mr2', n=2)  # 12 x 16 x 16 voxels.
  config = _config('unet', 'cpu', data__source='nifti', data__root=root,
                   data__volume_mode='2d', data__slice_context=1)
  filled = config_lib.fill_from_data(config)
  assert filled.data.in_channels == 2 * 3  # 2 channels x 3 slices.
  # Slices are 16 x 16, not image_size 64: the median slice, rounded up to
  # the U-Net's downsampling (4 levels: 8).
  assert tuple(filled.data.patch_size) == (16, 16)
  assert (filled.data.mean, filled.data.std) == ((0.0,), (1.0,))
  assert config_lib.volume_channels(filled) == 2
