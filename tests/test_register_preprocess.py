"""config.data.preprocess.register_to: channels registered once, cached."""

import csv
import glob
import json
import os

import nibabel as nib
import numpy as np
from scipy import ndimage
import pytest

from medseg_jax import config_checks
from medseg_jax import register_cases
from medseg_jax import registration
from medseg_jax import train
from medseg_jax.data import volume_sources
from tests.conftest import tiny_config

SPACING = (2.0, 1.0, 1.0)  # (D, H, W) mm
SHIFT_MM = np.array([0.0, 2.0, -3.0])  # Channel 1 = channel 0 moved by this.
FAST = dict(levels=2, iterations=40)  # Enough for a tiny, smooth case.


def blobs(shape=(12, 24, 24)):
  """A smooth asymmetric image: three Gaussian blobs of different sizes."""
  grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in
                                zip(shape, SPACING)], indexing='ij'), -1)
  image = np.zeros(shape, np.float32)
  for centre, sigma, weight in (((10, 8, 9), 4.0, 1.0),
                                ((12, 15, 14), 3.0, 0.7),
                                ((14, 10, 17), 2.0, 0.5)):
    d2 = np.sum((grid - centre) ** 2, -1)
    image += weight * np.exp(-d2 / (2 * sigma**2))
  return image


@pytest.fixture(scope='module')
def shifted_case(tmp_path_factory):
  """An MSD data set of one 2-channel case: channel 1 shifted by SHIFT_MM."""
  root = tmp_path_factory.mktemp('reg_ds')
  fixed = blobs()
  moving = ndimage.shift(fixed, SHIFT_MM / SPACING, order=3)
  image = np.stack([fixed, moving], -1)  # (D, H, W, C)
  affine = np.diag([SPACING[2], SPACING[1], SPACING[0], 1.0])
  (root / 'imagesTr').mkdir()
  (root / 'labelsTr').mkdir()
  nib.save(nib.Nifti1Image(image.transpose(2, 1, 0, 3), affine),
           str(root / 'imagesTr' / 'c0.nii.gz'))
  nib.save(nib.Nifti1Image((fixed > 0.5).astype(np.uint8).transpose(2, 1, 0),
                           affine), str(root / 'labelsTr' / 'c0.nii.gz'))
  (root / 'dataset.json').write_text(json.dumps({
      'modality': {'0': 'T1', '1': 'T2'},
      'labels': {'0': 'background', '1': 'blob'}}))
  return root


def config_for(root, register_to=0, **overrides):
  values = dict(
      data__source='nifti', data__root=str(root), data__num_classes=1,
      data__in_channels=2, data__patch_size=(8, 16, 16),
      data__preprocess__intensity='none', data__cache='disk',
      data__cache_dir=str(root.parent / (root.name + '_cache')),
      data__preprocess__register_to=register_to)
  return tiny_config(**{**values, **overrides})


def misalignment(image):
  """Mean |channel 1 - channel 0| away from the borders."""
  inner = image[2:-2, 3:-3, 3:-3]
  return float(np.abs(inner[..., 1] - inner[..., 0]).mean())


@pytest.fixture(scope='module')
def registered(shifted_case, tmp_path_factory):
  """(source after attach, report rows, report folder)."""
  config = config_for(shifted_case)
  source = volume_sources.build_nifti_source(config.data)
  report_dir = tmp_path_factory.mktemp('report')
  rows = register_cases.attach(source, config.data, str(report_dir), **FAST)
  return source, rows, report_dir


def test_cached_case_has_channels_aligned(registered, shifted_case):
  source, rows, report_dir = registered
  raw, _ = source.read_raw(0)
  before, after = misalignment(raw), misalignment(source[0]['image'])
  assert after < 0.25 * before, (before, after)
  # The transform maps channel-0 points to channel-1 points: + the shift.
  path = glob.glob(os.path.join(str(shifted_case) + '_cache', 'registration',
                                'c0-*.json'))
  assert len(path) == 1
  with open(path[0]) as f:
    matrix = np.asarray(json.load(f)['matrices'][1])
  np.testing.assert_allclose(matrix[:3, 3], SHIFT_MM, atol=0.5)
  np.testing.assert_allclose(matrix[:3, :3], np.eye(3), atol=0.03)
  assert glob.glob(os.path.join(str(shifted_case) + '_cache', 'nifti-*',
                                'c0-*.npz'))
  with open(report_dir / register_cases.REPORT_NAME) as f:
    report = list(csv.DictReader(f))
  assert [(r['case_id'], r['channel'], r['register_to']) for r in report] == [
      ('c0', '1', '0')]
  assert report[0]['converged'] == 'True'
  assert float(report[0]['metric_before']) < float(report[0]['final_metric'])
  assert float(report[0]['final_metric']) == pytest.approx(
      rows[0]['final_metric'], rel=1e-5)


def test_second_run_reads_the_cache_and_key_holds_the_settings(
    registered, shifted_case):
  source, _, _ = registered
  again = volume_sources.build_nifti_source(config_for(shifted_case).data)
  rows = register_cases.attach(again, config_for(shifted_case).data, **FAST)
  assert [r['cached'] for r in rows] == [True]
  np.testing.assert_array_equal(again[0]['image'], source[0]['image'])
  # Same disk cache, registration off: the unregistered case, not the cached
  # registered one.
  plain = volume_sources.build_nifti_source(
      config_for(shifted_case, register_to=-1).data)
  raw, _ = plain.read_raw(0)
  np.testing.assert_array_equal(plain[0]['image'], raw)
  # Prediction registers a new case the same way.
  aligned = register_cases.align_channels(
      raw, SPACING, config_for(shifted_case).data.preprocess, **FAST)
  np.testing.assert_allclose(aligned, source[0]['image'], atol=1e-5)


def test_source_without_registration_refuses_to_load(shifted_case):
  source = volume_sources.build_nifti_source(config_for(shifted_case).data)
  with pytest.raises(ValueError, match='register_cases.attach'):
    source.load(0)


def test_register_to_out_of_range_is_refused_before_training(shifted_case,
                                                             tmp_path):
  config = config_for(shifted_case, register_to=2)
  problems = config_checks.config_problems(config)
  assert problems == ['config.data.preprocess.register_to=2: out of range, '
                      'the cases have 2 channel(s) (0..1); set a channel '
                      'index or -1 (off).']
  with pytest.raises(ValueError, match='register_to=2: out of range'):
    train.train_and_evaluate(config, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w' / 'config.json')
  # Slices: in_channels counts the context slices (2 channels x 3 slices).
  config = config_for(shifted_case, register_to=2, data__volume_mode='2d',
                      data__slice_context=1, data__in_channels=6)
  assert len(config_checks.config_problems(config)) == 1


def result_with(history, final, level_steps=(10, 50)):
  return registration.Registration(
      matrix=np.eye(4), warped=np.zeros((4, 4, 4), np.float32),
      metric_history=np.asarray(history, np.float32),
      level_steps=level_steps, final_metric=final)


def test_convergence_flag():
  coarse = [0.1] * 10
  # Settled at 1.0 with a 1 % wobble, from 0.4 before: converged.
  wobble = 1.0 + 0.01 * np.sin(np.arange(50))
  assert register_cases.converged(result_with(coarse + list(wobble), 1.0), 0.4)
  # Ended worse than the unregistered pair (diverged): flagged.
  assert not register_cases.converged(
      result_with(coarse + [0.2] * 50, 0.2), 0.4)
  # Still climbing at the end (0.6 -> 1.0 over the level): flagged.
  rising = np.linspace(0.6, 1.0, 50)
  assert not register_cases.converged(result_with(coarse + list(rising), 1.0),
                                      0.4)
  assert not register_cases.converged(result_with(coarse + [1.0] * 50,
                                                  float('nan')), 0.4)
