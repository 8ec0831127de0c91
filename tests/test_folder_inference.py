"""Folder/ISIC data sets state channels and labels in their files."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from medseg_jax import config_lib
from medseg_jax.data import check
from medseg_jax.data import folder_inference
from tests import conftest


def write_folder(root, n=6, mode='L', values=(0, 255), size=(12, 10),
                 mask_ext='.png', stray=None):
  """Writes root/images/c<i>.png and root/masks/c<i><ext>; returns root.

  Every mask holds all of `values` (bands of rows); `stray` = (index, value)
  puts one extra value in one mask.
  """
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(root, 'images'), exist_ok=True)
  os.makedirs(os.path.join(root, 'masks'), exist_ok=True)
  h, w = size
  for i in range(n):
    shape = (h, w) if mode == 'L' else (h, w, len(mode))
    Image.fromarray(rng.integers(0, 256, shape, np.uint8), mode).save(
        os.path.join(root, 'images', f'c{i}.png'))
    mask = np.zeros((h, w), np.uint8)
    for k, v in enumerate(values):
      mask[k * h // len(values):(k + 1) * h // len(values)] = v
    if stray is not None and stray[0] == i:
      mask[0, 0] = stray[1]
    Image.fromarray(mask).save(os.path.join(root, 'masks', f'c{i}{mask_ext}'),
                               **({'quality': 95} if mask_ext == '.jpg'
                                  else {}))
  return str(root)


def folder_config(root, **overrides):
  config = config_lib.default_config()
  config.data.source, config.data.root = 'folder', str(root)
  return conftest.set_fields(config, overrides)


def test_grayscale_binary_gets_one_channel_and_one_value_statistics(tmp_path):
  filled = config_lib.fill_from_data(folder_config(write_folder(tmp_path)))
  assert filled.data.in_channels == 1
  assert (filled.data.num_classes, filled.data.label_values) == (1, ())
  # The mean of ImageNet's three values (module docstring).
  assert filled.data.mean == (0.449,) and filled.data.std == (0.226,)
  assert check.check_dataset(filled.data) == []


def test_rgb_and_rgba_keep_three_channels_and_photo_statistics(tmp_path):
  for mode in ('RGB', 'RGBA'):
    root = write_folder(tmp_path / mode, mode=mode, values=(0, 1))
    filled = config_lib.fill_from_data(folder_config(root))
    assert filled.data.in_channels == 3  # read_image drops the alpha.
    assert filled.data.num_classes == 1
    assert filled.data.mean == config_lib.default_config().data.mean


@pytest.mark.parametrize('values, classes, label_values', [
    ((0, 1, 2), 3, ()),
    ((0, 128, 255), 3, (0, 128, 255)),
    ((0, 128), 1, (0, 128)),  # Two values: binary, with its raw values.
])
def test_mask_values_give_the_classes(tmp_path, values, classes,
                                      label_values):
  filled = config_lib.fill_from_data(folder_config(
      write_folder(tmp_path, values=values)))
  assert filled.data.num_classes == classes
  assert tuple(filled.data.label_values) == label_values
  assert check.check_dataset(filled.data) == []


def test_one_stray_mask_stays_a_data_check_problem(tmp_path):
  root = write_folder(tmp_path, stray=(2, 7))
  filled = config_lib.fill_from_data(folder_config(root))
  assert (filled.data.num_classes, filled.data.label_values) == (1, ())
  problems = check.check_dataset(filled.data)
  assert [os.path.basename(p.path) for p in problems] == ['c2.png']
  assert '[0, 7, 255]' in problems[0].reason


def test_jpeg_masks_and_given_values_are_not_inferred(tmp_path):
  root = write_folder(tmp_path / 'jpeg', values=(0, 128, 255), mask_ext='.jpg')
  assert config_lib.fill_from_data(folder_config(root)).data.num_classes == 1
  root = write_folder(tmp_path / 'png', values=(0, 128, 255))
  given = config_lib.fill_from_data(folder_config(
      root, data__label_values=(0, 255, 128), data__num_classes=3))
  assert tuple(given.data.label_values) == (0, 255, 128)  # Order kept.
  # num_classes given: only the raw values are filled.
  only_k = config_lib.fill_from_data(folder_config(root, data__num_classes=3))
  assert tuple(only_k.data.label_values) == (0, 128, 255)


def test_contradicting_channels_are_refused_in_one_line(tmp_path):
  gray = write_folder(tmp_path / 'gray')
  with pytest.raises(ValueError) as e:
    config_lib.fill_from_data(folder_config(gray, data__in_channels=3),
                              explicit={'data.in_channels'})
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith(
      f'config.data.in_channels=3 but the images under '
      f'{os.path.join(gray, "images")} have 1 channel;')
  rgb = write_folder(tmp_path / 'rgb', mode='RGB')
  with pytest.raises(ValueError, match='in_channels=1 but .* have 3 '
                     'channels'):
    config_lib.fill_from_data(folder_config(rgb, data__in_channels=1))
  with pytest.raises(ValueError, match=r'config.data.mean=.* has 3 values but '
                     'config.data.in_channels=1'):
    config_lib.fill_from_data(folder_config(gray, data__mean=(0.5, 0.5, 0.5)))


def test_mixed_gray_and_colour_takes_three_channels_and_says_so(tmp_path,
                                                                caplog):
  root = write_folder(tmp_path, n=10)
  # One colour image after ten gray ones: every header is read, not a sample.
  Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(
      os.path.join(root, 'images', 'z.png'))
  Image.fromarray(np.zeros((12, 10), np.uint8)).save(
      os.path.join(root, 'masks', 'z.png'))
  config = folder_config(root)
  assert config_lib.fill_from_data(config).data.in_channels == 3
  assert config_lib.fill_from_data(config).data.mean == config.data.mean
  lines = [r.getMessage() for r in caplog.records
           if r.name == folder_inference.__name__]
  assert len(lines) == 1, lines  # Once, though filled twice.
  assert '1 and 3 channels (10 of 11 are grayscale, e.g. c0.png)' in lines[0]
  assert '\n' not in lines[0]


def test_isic_layout_and_missing_folders(tmp_path):
  root = tmp_path / 'isic'
  inputs = root / 'ISIC2018_Task1-2_Training_Input'
  truth = root / 'ISIC2018_Task1_Training_GroundTruth'
  inputs.mkdir(parents=True)
  truth.mkdir()
  for i in range(3):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(inputs / f'ISIC_{i}.png')
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(
        truth / f'ISIC_{i}_segmentation.png')
  config = folder_config(root, data__source='isic2018')
  assert config_lib.fill_from_data(config).data.in_channels == 1
  # Nothing to read: unchanged, the data check reports it.
  missing = folder_config(tmp_path / 'none')
  assert config_lib.fill_from_data(missing).to_dict() == missing.to_dict()


def test_main_refuses_before_writing_and_trains_filled(tmp_path):
  root = write_folder(tmp_path / 'data', n=10, values=(0, 1, 2))
  args = dict(config_arg='configs/unet.py:cpu', data__source='folder',
              data__root=root, data__image_size=16, model__features=(4, 8),
              train__batch_size=2, eval__batch_size=2, train__num_steps=2,
              data__val_fraction=0.2, data__test_fraction=0.2)
  refused = tmp_path / 'refused'
  proc = conftest.run_main(refused, check=False, data__in_channels=3, **args)
  assert proc.returncode != 0
  assert 'config.data.in_channels=3 but the images under' in proc.stderr
  assert not refused.exists()
  workdir = tmp_path / 'run'
  conftest.run_main(workdir, **args)
  with open(workdir / 'config.json') as f:
    data = json.load(f)['data']
  assert (data['in_channels'], data['num_classes']) == (1, 3)
  assert data['mean'] == [0.449]
