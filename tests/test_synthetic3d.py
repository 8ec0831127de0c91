"""Procedural BraTS-like volumes: determinism, format, nesting, contrasts."""

import pickle
import time

import grain
import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from medseg_jax.data import synthetic3d as S

SIZE = (16, 32, 32)


def _source(**kwargs):
  kwargs.setdefault('volume_size', SIZE)
  return S.SyntheticTumours(kwargs.pop('num_patients', 6), **kwargs)


def test_same_index_gives_the_same_record_in_any_instance():
  a, b = _source(), _source()
  for i in (0, 4):
    np.testing.assert_array_equal(a[i]['image'], b[i]['image'])
    np.testing.assert_array_equal(a[i]['mask'], b[i]['mask'])
    assert a[i]['spacing'] == b[i]['spacing']
  assert not np.array_equal(a[0]['image'], a[1]['image'])
  assert not np.array_equal(a[0]['image'], _source(seed=1)[0]['image'])
  clone = pickle.loads(pickle.dumps(a))
  np.testing.assert_array_equal(clone[3]['image'], a[3]['image'])
  np.testing.assert_array_equal(grain.MapDataset.source(a)[2]['mask'],
                                a[2]['mask'])


def test_records_follow_the_data_contract():
  source = _source(num_patients=4)
  assert source.patient_ids == source.case_ids == [
      'synth3d-p00000', 'synth3d-p00001', 'synth3d-p00002', 'synth3d-p00003']
  spacings = set()
  for i in range(4):
    r = source[i]
    assert set(r) == {'image', 'mask', 'spacing', 'patient_id', 'case_id'}
    assert r['image'].dtype == np.float32 and r['image'].shape == SIZE + (4,)
    assert r['mask'].dtype == np.uint8 and r['mask'].shape == SIZE
    assert set(np.unique(r['mask'])) <= {0, 1, 2, 3} and r['mask'].any()
    assert r['patient_id'] == r['case_id'] == source.patient_ids[i]
    # Roughly z-scored per channel.
    np.testing.assert_allclose(r['image'].mean(axis=(0, 1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(r['image'].std(axis=(0, 1, 2)), 1, atol=1e-3)
    # Anisotropic: thick slices (2 mm jittered 0.8-1.25x), ~1 mm in plane.
    d, h, w = r['spacing']
    assert 1.6 <= d <= 2.5 and 0.9 <= h == w <= 1.1
    spacings.add(r['spacing'])
  assert len(spacings) == 4  # Per patient.
  assert source[-1]['case_id'] == source[3]['case_id']
  with pytest.raises(IndexError):
    source[4]


def test_sub_regions_are_nested_with_a_margin():
  source = _source(num_patients=10, volume_size=(24, 48, 48))
  cube = np.ones((3, 3, 3), bool)
  seen = np.zeros(4, int)
  for i in range(len(source)):
    mask = source[i]['mask']
    seen += np.bincount(mask.ravel(), minlength=4) > 0
    # Necrosis (3) only next to enhancing (2) or necrosis; enhancing or
    # necrosis only next to tumour (never touching background).
    assert not (ndimage.binary_dilation(mask == 3, cube) & (mask < 2)).any()
    assert not (ndimage.binary_dilation(mask >= 2, cube) & (mask < 1)).any()
  assert seen[1] == seen[2] == 10 and seen[3] >= 6


def _balanced_accuracy(x, y):
  """Nearest-class-mean classifier on voxels x [N, C], labels y [N]."""
  means = np.stack([x[y == k].mean(axis=0) for k in range(4)])
  pred = np.argmin(((x[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
  return np.mean([(pred[y == k] == k).mean() for k in range(4)])


def test_every_channel_is_needed_to_tell_the_classes_apart():
  source = _source(num_patients=6, volume_size=(20, 40, 40))
  checked = 0
  for i in range(len(source)):
    r = source[i]
    if not (r['mask'] == 3).any():
      continue
    brain = r['image'].max(axis=-1) > 0  # Air is the darkest everywhere.
    x, y = r['image'][brain], r['mask'][brain]
    assert _balanced_accuracy(x, y) > 0.95
    for c in range(4):
      assert _balanced_accuracy(x[:, [c]], y) < 0.9, S.SEQUENCES[c]
    checked += 1
  assert checked >= 3
  # The designed look-alike pairs: oedema ~ enhancing except in T1ce.
  for c in range(4):
    same = S.CONTRAST[c, 2] == S.CONTRAST[c, 3]
    assert same == (S.SEQUENCES[c] != 't1ce')


def test_num_classes_merges_sub_regions():
  full = _source(num_patients=3)
  for k, expected in ((1, lambda m: m > 0), (2, lambda m: m > 0),
                      (3, lambda m: np.minimum(m, 2))):
    merged = _source(num_patients=3, num_classes=k)
    for i in range(3):
      np.testing.assert_array_equal(merged[i]['mask'],
                                    expected(full[i]['mask']))
      np.testing.assert_array_equal(merged[i]['image'], full[i]['image'])


def test_fewer_channels_keep_the_first_sequences():
  two = _source(num_patients=2, in_channels=2)[1]['image']
  assert two.shape == SIZE + (2,)
  four = _source(num_patients=2)[1]['image']
  np.testing.assert_array_equal(two, four[..., :2])


def test_size_jitter_varies_the_volume_size():
  source = _source(num_patients=8, size_jitter=0.25)
  shapes = {source[i]['mask'].shape for i in range(8)}
  assert len(shapes) > 4
  for shape in shapes:
    for n, base in zip(shape, SIZE):
      assert round(base * 0.75) <= n <= round(base * 1.25)
  for i in (0, 5):
    assert source[i]['image'].shape[:3] == source[i]['mask'].shape


def test_bad_arguments_raise_with_the_config_key():
  for kwargs, key in (({'num_patients': 0}, 'num_patients'),
                      ({'in_channels': 5}, 'in_channels'),
                      ({'num_classes': 5}, 'num_classes'),
                      ({'volume_size': (4, 32, 32)}, 'volume_size'),
                      ({'volume_size': (32, 32)}, 'volume_size'),
                      ({'spacing': (1.0, 0.0, 1.0)}, 'spacing'),
                      ({'size_jitter': 0.6}, 'size_jitter')):
    with pytest.raises(ValueError, match=key):
      _source(**kwargs)


def _data_cfg(**changes):
  from configs import default  # pylint: disable=import-outside-toplevel
  cfg = default.get_config().data
  cfg.update(dict(source='synthetic3d', num_classes=4, in_channels=4))
  cfg.synthetic3d.update(dict(num_patients=5, volume_size=SIZE, in_channels=4,
                              seed=3))
  cfg.update(changes)
  return cfg


def test_build_from_config_and_inconsistent_channels():
  source = S.build_synthetic3d_source(_data_cfg())
  assert len(source) == 5 and source.num_classes == 4 and source.seed == 3
  np.testing.assert_array_equal(
      source[1]['mask'],
      S.SyntheticTumours(5, SIZE, seed=3)[1]['mask'])
  binary = S.build_synthetic3d_source(_data_cfg(num_classes=1))
  assert set(np.unique(binary[0]['mask'])) == {0, 1}
  with pytest.raises(ValueError, match='synthetic3d.in_channels'):
    S.build_synthetic3d_source(_data_cfg(in_channels=3))


def test_smooth_noise_has_unit_variance_along_every_axis():
  rng = np.random.default_rng(0)
  fields = np.stack([S.smooth_noise(rng, (12, 16, 20), (3.0, 4.0, 5.0))
                     for _ in range(100)])
  assert fields.shape == (100, 12, 16, 20) and fields.dtype == np.float32
  assert 0.9 < fields.std() < 1.1
  near = np.corrcoef(fields[:, 6, 8, 10], fields[:, 6, 8, 11])[0, 1]
  far = np.corrcoef(fields[:, 6, 8, 0], fields[:, 6, 8, 19])[0, 1]
  assert near > 0.8 and abs(far) < 0.3


def test_generation_is_cheap():
  """A 32x64x64 volume takes ~20 ms of CPU; fail only when 10x slower."""
  source = S.SyntheticTumours(3, (32, 64, 64))
  start = time.process_time()
  for i in range(3):
    source[i]  # pylint: disable=pointless-statement
  ms = (time.process_time() - start) / 3 * 1e3
  print(f'32x64x64: {ms:.1f} ms/volume')
  assert ms < 200, f'{ms:.0f} ms per 32x64x64 volume'
