"""Intensity and elastic augmentation: known answers, invariants, seeding."""

import pickle

import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from medseg_jax.data import geometric as G
from medseg_jax.data import intensity as I
from medseg_jax.data import transforms as T


def _volume(shape=(12, 20, 20), channels=2, seed=0):
  """Returns an element with a smooth random mask and a float image whose
  channel 0 is the mask (z-score-like values elsewhere)."""
  rng = np.random.default_rng(seed)
  mask = ndimage.gaussian_filter(rng.standard_normal(shape), 3) > 0.05
  mask = mask.astype(np.uint8)
  image = rng.standard_normal(shape + (channels,)).astype(np.float32)
  image[..., 0] = mask
  return {'image': image, 'mask': mask, 'case_id': 'c'}


def _apply(op, element, seed=0):
  return op.random_map(element, np.random.default_rng(seed))


INTENSITY_OPS = [
    I.RandomGamma(prob=1.0, invert_prob=0.5),
    I.GaussianNoise(prob=1.0),
    I.GaussianBlur(prob=1.0),
    I.BrightnessContrast(prob=1.0),
]
ALL_OPS = INTENSITY_OPS + [G.ElasticDeform(prob=1.0, alpha=200.0, sigma=4.0)]


@pytest.mark.parametrize('op', ALL_OPS, ids=lambda op: type(op).__name__)
@pytest.mark.parametrize('shape', [(24, 28), (10, 14, 12)])
def test_same_generator_same_output_and_off_at_prob_zero(op, shape):
  element = _volume(shape)
  outputs = set()
  for seed in range(4):
    a, b = _apply(op, element, seed), _apply(op, element, seed)
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['mask'], b['mask'])
    assert a['image'].shape == element['image'].shape
    assert a['image'].dtype == np.float32 and a['case_id'] == 'c'
    outputs.add(a['image'].tobytes())
  assert len(outputs) == 4
  clone = pickle.loads(pickle.dumps(op))
  np.testing.assert_array_equal(_apply(clone, element, 1)['image'],
                                _apply(op, element, 1)['image'])
  off = type(op)(**dict(vars(op), prob=0.0))
  assert _apply(off, element) is element


@pytest.mark.parametrize('op', INTENSITY_OPS, ids=lambda op: type(op).__name__)
def test_intensity_ops_never_touch_the_mask(op):
  element = _volume()
  element['label'] = element['mask'].astype(np.int32)
  out = _apply(op, element)
  assert out['mask'] is element['mask'] and out['label'] is element['label']
  assert not np.array_equal(out['image'], element['image'])


def test_gamma_one_is_the_identity():
  element = _volume()
  for retain in (True, False):
    op = I.RandomGamma(prob=1.0, gamma_range=(1.0, 1.0), invert_prob=0.5,
                       retain_stats=retain)
    for seed in range(4):
      np.testing.assert_allclose(_apply(op, element, seed)['image'],
                                 element['image'], atol=1e-5)


def test_gamma_known_answer_and_retained_statistics():
  image = np.array([[2.0, 10.0], [4.0, 6.0], [6.0, 2.0]], np.float32)
  element = {'image': image}  # 3 pixels (1D), 2 channels.
  squared = _apply(I.RandomGamma(prob=1.0, gamma_range=(2.0, 2.0),
                                 retain_stats=False), element)['image']
  # Channel 0: (x - 2) / 4 = 0, .5, 1 -> 0, .25, 1 -> 2, 3, 6.
  # Channel 1: (x - 2) / 8 = 1, .5, 0 -> 1, .25, 0 -> 10, 4, 2.
  np.testing.assert_allclose(squared, [[2, 10], [3, 4], [6, 2]], atol=1e-5)
  # Inverted: gamma on -x, i.e. it bends the bright end instead.
  inverted = _apply(I.RandomGamma(prob=1.0, gamma_range=(2.0, 2.0),
                                  invert_prob=1.0, retain_stats=False),
                    element)['image']
  np.testing.assert_allclose(inverted[:, 0], [2, 5, 6], atol=1e-5)
  kept = _apply(I.RandomGamma(prob=1.0, gamma_range=(0.5, 0.5)),
                _volume())['image']
  np.testing.assert_allclose(kept.mean(axis=(0, 1, 2)),
                             _volume()['image'].mean(axis=(0, 1, 2)),
                             atol=1e-5)
  np.testing.assert_allclose(kept.std(axis=(0, 1, 2)),
                             _volume()['image'].std(axis=(0, 1, 2)), rtol=1e-4)


def test_gamma_is_below_and_above_one_equally_often():
  rng = np.random.default_rng(0)
  gammas = np.array([I.draw_gamma(rng, (0.7, 1.5)) for _ in range(4000)])
  assert gammas.min() >= 0.7 and gammas.max() <= 1.5
  assert abs((gammas < 1).mean() - 0.5) < 0.03
  assert I.draw_gamma(rng, (2.0, 3.0)) >= 2.0


def test_noise_standard_deviation_is_uniform_up_to_noise_std():
  element = {'image': np.zeros((64, 64, 1), np.float32)}
  op = I.GaussianNoise(prob=1.0, noise_std=0.2)
  stds = np.array([_apply(op, element, seed)['image'].std()
                   for seed in range(300)])
  assert stds.max() < 0.2 * 1.03
  # Uniform in [0, 0.2]: mean 0.1, standard deviation 0.2 / sqrt(12).
  assert abs(stds.mean() - 0.1) < 0.01
  assert abs(stds.std() - 0.2 / np.sqrt(12)) < 0.01
  assert abs(_apply(op, element, 5)['image'].mean()) < 0.01


def test_blur_matches_scipy_per_channel_and_keeps_the_mean():
  element = _volume(channels=3)
  out = _apply(I.GaussianBlur(prob=1.0, sigma_range=(1.5, 1.5)),
               element)['image']
  for c in range(3):
    np.testing.assert_allclose(
        out[..., c], ndimage.gaussian_filter(element['image'][..., c], 1.5),
        atol=1e-6)
  np.testing.assert_allclose(out.mean(axis=(0, 1, 2)),
                             element['image'].mean(axis=(0, 1, 2)), atol=1e-5)
  assert (out.std(axis=(0, 1, 2)) < element['image'].std(axis=(0, 1, 2))).all()
  # Spatial axes only: a channel that is zero stays zero.
  element['image'][..., 2] = 0
  assert not _apply(I.GaussianBlur(prob=1.0), element)['image'][..., 2].any()


def test_brightness_contrast_is_an_affine_map_per_channel():
  element = _volume(channels=2)
  x = element['image']
  op = I.BrightnessContrast(prob=1.0, scale=0.3)
  for seed in range(5):
    y = _apply(op, element, seed)['image']
    for c in range(2):
      xc, yc = x[..., c].ravel(), y[..., c].ravel()
      slope, offset = np.polyfit(xc, yc, 1)
      np.testing.assert_allclose(yc, slope * xc + offset, atol=1e-4)
      # Contrast keeps the mean; brightness multiplies it.
      ratio = yc.mean() / xc.mean()
      assert 0.7 - 1e-4 <= ratio <= 1.3 + 1e-4
      assert 0.49 - 1e-4 <= slope <= 1.69 + 1e-4
  still = _apply(I.BrightnessContrast(prob=1.0, scale=0.0), element)['image']
  np.testing.assert_allclose(still, x, atol=1e-6)


def test_uint8_images_become_float_in_unit_range():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
  element = {'image': image, 'mask': np.zeros((16, 16), np.uint8)}
  out = _apply(I.RandomGamma(prob=1.0, gamma_range=(1.0, 1.0)), element)
  assert out['image'].dtype == np.float32
  np.testing.assert_allclose(out['image'], image / 255.0, atol=1e-5)
  # Normalize then gives what it gives the uint8 image.
  norm = T.Normalize(mean=(0.5,), std=(0.25,))
  np.testing.assert_allclose(norm.map(out)['image'],
                             norm.map(element)['image'], atol=1e-4)
  warped = _apply(G.ElasticDeform(prob=1.0, alpha=50.0, sigma=3.0), element)
  assert warped['image'].dtype == np.uint8


@pytest.mark.parametrize('shape', [(30, 34), (10, 16, 18)])
def test_elastic_alpha_zero_is_the_identity(shape):
  element = _volume(shape, channels=3)
  for sigma in (2.0, 9.0):
    out = _apply(G.ElasticDeform(prob=1.0, alpha=0.0, sigma=sigma), element)
    np.testing.assert_array_equal(out['image'], element['image'])
    np.testing.assert_array_equal(out['mask'], element['mask'])


@pytest.mark.parametrize('shape', [(40, 44), (12, 24, 24)])
def test_elastic_moves_image_and_mask_together(shape):
  element = _volume(shape, channels=2)
  element['mask'] = element['mask'] * 3  # Labels {0, 3}.
  element['image'][..., 0] = element['mask'] / 3
  element['label'] = element['mask'].astype(np.int32)
  alpha = 400.0 if len(shape) == 2 else 900.0
  for seed in range(3):
    out = _apply(G.ElasticDeform(prob=1.0, alpha=alpha, sigma=6.0), element,
                 seed)
    assert set(np.unique(out['mask'])) <= {0, 3}
    np.testing.assert_array_equal(out['label'], out['mask'])
    assert not np.array_equal(out['mask'], element['mask'])
    # Linear image vs nearest mask: they differ only on the mask's border.
    mismatch = (out['image'][..., 0] > 0.5) != (out['mask'] == 3)
    m = out['mask']
    border = ndimage.maximum_filter(m, 3) != ndimage.minimum_filter(m, 3)
    assert not (mismatch & ~border).any()


def test_elastic_field_has_the_full_resolution_magnitude():
  # Coarse computation vs scipy's full-resolution Simard field (sigma 8).
  rng = np.random.default_rng(0)
  coarse = np.concatenate([G.elastic_displacement(rng, (96, 96), 100.0, 8.0)
                           for _ in range(4)])
  full = np.stack([ndimage.gaussian_filter(rng.uniform(-1, 1, (96, 96)), 8.0,
                                           mode='constant') * 100.0
                   for _ in range(8)])
  inner = (slice(None), slice(24, -24), slice(24, -24))
  ratio = coarse[inner].std() / full[inner].std()
  assert 0.85 < ratio < 1.15
  # The documented rule of thumb: alpha * 0.58 * (2 sqrt(pi) sigma) ** -1.
  assert abs(full[inner].std() / (100 * 0.577 / (2 * np.sqrt(np.pi) * 8))
             - 1) < 0.15


def _aug(**values):
  return ml_collections.ConfigDict(values)


def test_build_intensity_transforms_follows_the_config():
  assert I.build_intensity_transforms(None) == []
  assert I.build_intensity_transforms(_aug(flip=True)) == []
  assert G.build_elastic_transforms(None) == []
  off = dict(gamma_prob=0.0, gamma_range=(0.7, 1.5), noise_prob=0.0,
             noise_std=0.1, blur_prob=0.0, blur_sigma=(0.5, 1.0),
             intensity_prob=0.0, intensity_scale=0.25, elastic_prob=0.0,
             elastic_alpha=0.0, elastic_sigma=0.0)
  assert I.build_intensity_transforms(_aug(**off)) == []
  assert G.build_elastic_transforms(_aug(**off)) == []
  on = dict(off, gamma_prob=0.3, noise_prob=0.1, blur_prob=0.2,
            intensity_prob=0.15, elastic_prob=0.2, elastic_alpha=500.0,
            elastic_sigma=10.0)
  ops = (G.build_elastic_transforms(_aug(**on)) +
         I.build_intensity_transforms(_aug(**on)))
  assert [type(op) for op in ops] == [G.ElasticDeform, I.GaussianNoise,
                                      I.GaussianBlur, I.BrightnessContrast,
                                      I.RandomGamma]
  assert ops[0].alpha == 500.0 and ops[0].sigma == 10.0
  assert ops[4].gamma_range == (0.7, 1.5) and ops[4].prob == 0.3
  # A plain dict works too; elastic needs a sigma.
  assert len(I.build_intensity_transforms(dict(noise_prob=0.5))) == 1
  with pytest.raises(ValueError, match='elastic_sigma'):
    G.build_elastic_transforms(_aug(**dict(on, elastic_sigma=0.0)))
  with pytest.raises(ValueError, match='gamma_range'):
    I.build_intensity_transforms(_aug(**dict(on, gamma_range=(1.5, 0.7))))
