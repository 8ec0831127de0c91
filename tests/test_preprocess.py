"""Tests of medseg_jax.data.preprocess: intensity normalisation, resampling."""

import ml_collections
import numpy as np
import pytest

from medseg_jax.data import preprocess


def test_zscore_by_hand():
  image = np.array([1.0, 2.0, 3.0, 6.0], np.float32).reshape(1, 2, 2, 1)
  image = np.concatenate([image, 10 * image], axis=-1)
  out = preprocess.zscore(image)
  values = np.array([1.0, 2.0, 3.0, 6.0])
  expected = (values - 3.0) / np.sqrt(((values - 3.0) ** 2).mean())
  np.testing.assert_allclose(out[..., 0].ravel(), expected, rtol=1e-6)
  np.testing.assert_allclose(out[..., 1].ravel(), expected, rtol=1e-6)
  assert out.dtype == np.float32


def test_zscore_foreground_uses_nonzero_voxels_and_zeroes_outside():
  # Channel 0 is 0 on two voxels where channel 1 is nonzero: the foreground
  # is the union, so those stay in the statistics.
  image = np.array([[0, 0], [0, 5], [2, 1], [4, 1], [0, 0]], np.float32)
  image = image.reshape(1, 5, 1, 2)
  fg = preprocess.foreground_mask(image)
  np.testing.assert_array_equal(fg.ravel(), [False, True, True, True, False])
  out = preprocess.zscore(image, fg)
  c0 = np.array([0.0, 2.0, 4.0])  # Channel 0 on the foreground.
  np.testing.assert_allclose(out[0, 1:4, 0, 0], (c0 - 2.0) / c0.std(),
                             rtol=1e-6)
  np.testing.assert_array_equal(out[0, [0, 4], 0], 0.0)


def test_ct_window_by_hand():
  hu = np.array([-2000.0, -1000.0, 0.0, 40.0, 500.0, 3000.0], np.float32)
  out = preprocess.ct_window(hu, (-1000.0, 1000.0))
  np.testing.assert_allclose(out, [-1.0, -1.0, 0.0, 0.04, 0.5, 1.0],
                             atol=1e-7)
  # Soft-tissue window (-160, 240): centre 40, half width 200.
  np.testing.assert_allclose(preprocess.ct_window(hu, (-160, 240)),
                             [-1, -1, -0.2, 0.0, 1.0, 1.0], atol=1e-7)


def test_percentile_clip_then_zscore():
  values = np.arange(101, dtype=np.float32)  # Percentile p is the value p.
  image = values.reshape(1, 1, 101, 1)
  clipped = preprocess.percentile_clip(image, (10, 90))
  np.testing.assert_array_equal(clipped.ravel(), np.clip(values, 10, 90))
  cfg = preprocess.options(dict(intensity='percentile',
                                clip_percentiles=(10, 90)))
  out = preprocess.normalize_intensity(image, cfg)
  c = np.clip(values, 10, 90)
  np.testing.assert_allclose(out.ravel(), (c - c.mean()) / c.std(), rtol=1e-5)


def test_resampled_shape_rounding():
  assert preprocess.resampled_shape((5, 7, 6), (2.5, 0.8, 0.8),
                                    (1.0, 1.0, 1.0)) == (12, 6, 5)  # 12.5 -> 12
  assert preprocess.resampled_shape((5, 7, 6), (2.5, 0.8, 0.8), ()) == (5, 7, 6)
  assert preprocess.resampled_shape((5, 7, 6), (2.5, 0.8, 0.8),
                                    (0, 1.6, 0)) == (5, 4, 6)  # 3.5 -> 4
  assert preprocess.resampled_shape((1, 2, 2), (1, 1, 1),
                                    (9, 9, 9)) == (1, 1, 1)


def test_resample_labels_nearest_keeps_label_set_and_blocks():
  mask = np.zeros((4, 6, 6), np.uint8)
  mask[:, :3, :3] = 1
  mask[:, 3:, 3:] = 2
  up = preprocess.resample_to_shape(mask, (8, 12, 12), order=0)
  assert up.dtype == np.uint8 and up.shape == (8, 12, 12)
  # Upsampling by 2 repeats every voxel: an exact known answer.
  np.testing.assert_array_equal(up, mask.repeat(2, 0).repeat(2, 1).repeat(2, 2))
  # Down by 3: output centres at input coordinates 1.5 and 4.5, i.e. the
  # input voxels 1 and 4.
  down = preprocess.resample_to_shape(mask, (4, 2, 2), order=0)
  assert set(np.unique(down)) == {0, 1, 2}
  np.testing.assert_array_equal(down, mask[:, 1::3, 1::3])


def test_resample_image_linear_keeps_constant_and_linear_ramp():
  ramp = np.arange(8, dtype=np.float32)[None, None, :, None] * np.ones(
      (2, 3, 1, 2), np.float32)
  out = preprocess.resample_to_shape(ramp, (2, 3, 16), order=1)
  assert out.shape == (2, 3, 16, 2) and out.dtype == np.float32
  # grid_mode: output centre j sits at input coordinate (j + 0.5) / 2 - 0.5;
  # linear interpolation of a ramp is exact away from the clamped edges.
  np.testing.assert_allclose(out[0, 0, 1:-1, 0],
                             (np.arange(1, 15) + 0.5) / 2 - 0.5, atol=1e-5)


def test_preprocess_case_resamples_image_mask_and_spacing():
  rng = np.random.default_rng(0)
  image = rng.normal(5, 2, (5, 7, 6, 2)).astype(np.float32)
  mask = np.zeros((5, 7, 6), np.uint8)
  mask[1:4, 2:6, 1:5] = 1
  mask[2, 3:5, 2:4] = 2
  cfg = ml_collections.ConfigDict(dict(
      intensity='zscore', zscore_foreground=False, ct_window=(-1000., 1000.),
      clip_percentiles=(0.5, 99.5), target_spacing=(1.25, 0.8, 0.8)))
  out, out_mask, spacing = preprocess.preprocess_case(image, mask,
                                                      (2.5, 0.8, 0.8), cfg)
  assert out.shape == (10, 7, 6, 2) and out.dtype == np.float32
  assert out_mask.shape == (10, 7, 6) and out_mask.dtype == np.uint8
  assert spacing == (1.25, 0.8, 0.8)
  assert set(np.unique(out_mask)) == {0, 1, 2}
  np.testing.assert_array_equal(out_mask, mask.repeat(2, axis=0))
  # Normalised before resampling: the native-grid statistics are 0 and 1.
  native, _, _ = preprocess.preprocess_case(image, None, (2.5, 0.8, 0.8),
                                            dict(intensity='zscore'))
  np.testing.assert_allclose(native.mean(axis=(0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(native.std(axis=(0, 1, 2)), 1, atol=1e-5)


def test_preprocess_case_rounding_gives_actual_spacing():
  image = np.ones((5, 7, 6, 1), np.float32)
  out, _, spacing = preprocess.preprocess_case(
      image, None, (2.5, 0.8, 0.8), dict(target_spacing=(1.0, 1.0, 1.0)))
  assert out.shape[:3] == (12, 6, 5)
  # Same field of view: n * spacing / new n, not the target exactly.
  assert spacing == pytest.approx((12.5 / 12, 5.6 / 6, 4.8 / 5))


def test_inverse_resampling_restores_shape():
  probs = np.random.default_rng(0).random((10, 7, 6, 3)).astype(np.float32)
  back = preprocess.resample_to_shape(probs, (5, 7, 6), order=1)
  assert back.shape == (5, 7, 6, 3)
  same = preprocess.resample_to_shape(probs, (10, 7, 6), order=1)
  np.testing.assert_array_equal(same, probs)


def test_bad_options_and_inputs_are_clear():
  with pytest.raises(ValueError, match='intensity'):
    preprocess.options(dict(intensity='minmax'))
  with pytest.raises(ValueError, match='ct_window'):
    preprocess.options(dict(ct_window=(100, -100)))
  with pytest.raises(ValueError, match='target_spacing'):
    preprocess.options(dict(target_spacing=(1.0, 1.0)))
  image = np.ones((2, 3, 4, 1), np.float32)
  with pytest.raises(ValueError, match='Mask shape'):
    preprocess.preprocess_case(image, np.zeros((2, 3, 5)), (1, 1, 1), None)
  image[0, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match='non-finite'):
    preprocess.preprocess_case(image, None, (1, 1, 1), None)
