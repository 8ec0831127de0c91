"""Augmentation moves image and mask together; colour and normalisation."""

import pickle

import grain
import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from medseg_jax.data import synthetic
from medseg_jax.data import geometric as G
from medseg_jax.data import intensity as I
from medseg_jax.data import transforms as T


def _marked(shape=(48, 56), dtype=np.uint8, seed=0):
  """Returns an element whose image channel 0 is mask * 255 (or * 1.0)."""
  rng = np.random.default_rng(seed)
  mask = (ndimage.gaussian_filter(rng.standard_normal(shape), 4) > 0.05)
  mask = mask.astype(np.uint8)
  top = 255 if dtype == np.uint8 else 1.0
  image = (rng.random(shape + (3,)) * top).astype(dtype)
  image[..., 0] = mask * top
  return {'image': image, 'mask': mask, 'patient_id': 'p', 'case_id': 'c'}


def _agrees(element, tolerance_px=1):
  """Whether thresholded channel 0 equals the mask, except within
  `tolerance_px` of the mask's border (linear vs nearest sampling)."""
  image, mask = element['image'], element['mask']
  top = 255 if image.dtype == np.uint8 else 1.0
  mismatch = (image[..., 0] > top / 2) != (mask == 1)
  size = 2 * tolerance_px + 1
  border = (ndimage.maximum_filter(mask, size) !=
            ndimage.minimum_filter(mask, size))
  return not (mismatch & ~border).any() and mismatch.mean() < 0.02


def _apply(op, element, seed):
  return op.random_map(element, np.random.default_rng(seed))


def test_flip_rot90_moves_image_and_mask_identically():
  square = _marked((40, 40))
  outcomes = set()
  for seed in range(40):
    out = _apply(G.RandomFlipRot90(), square, seed)
    np.testing.assert_array_equal(out['image'][..., 0] == 255,
                                  out['mask'] == 1)
    assert out['case_id'] == 'c'
    outcomes.add(out['mask'].tobytes())
  assert len(outcomes) == 8  # The whole dihedral group of the square.
  # A non-square plane keeps its shape (only 180-degree turns).
  wide = _marked((32, 48))
  for seed in range(10):
    out = _apply(G.RandomFlipRot90(), wide, seed)
    assert out['image'].shape == (32, 48, 3) and out['mask'].shape == (32, 48)
    np.testing.assert_array_equal(out['image'][..., 0] == 255,
                                  out['mask'] == 1)


@pytest.mark.parametrize('dtype', [np.uint8, np.float32])
@pytest.mark.parametrize('mode', G.PADDING_MODES)
def test_affine_moves_image_and_mask_together(dtype, mode):
  element = _marked(dtype=dtype)
  op = G.RandomAffine(prob=1.0, max_rotate_degrees=30, scale_range=(0.8, 1.25),
                      mode=mode)
  changed = 0
  for seed in range(6):
    out = _apply(op, element, seed)
    assert out['image'].dtype == dtype and out['mask'].dtype == np.uint8
    assert out['image'].shape == element['image'].shape
    assert _agrees(out)
    changed += not np.array_equal(out['mask'], element['mask'])
  assert changed == 6


@pytest.mark.parametrize('mode,scipy_mode', [('reflect', 'reflect'),
                                             ('nearest', 'nearest'),
                                             ('constant', 'grid-constant')])
def test_affine_sampling_matches_scipy(mode, scipy_mode):
  element = _marked((37, 52))
  element['image'] = ndimage.gaussian_filter(
      element['image'].astype(np.float32), (1.5, 1.5, 0))
  matrix = G._rotation_scale_matrix(2, (0, 1), 12.0, 1.1)
  centre = (np.array([37, 52]) - 1) / 2
  offset = centre - matrix @ centre
  expected = np.stack([ndimage.affine_transform(
      element['image'][..., c], matrix, offset, order=1, mode=scipy_mode)
                       for c in range(3)], axis=-1)
  expected_mask = ndimage.affine_transform(element['mask'], matrix, offset,
                                           order=0, mode=scipy_mode)
  out = G._warp(element, 2, matrix, mode)
  np.testing.assert_allclose(out['image'], expected, atol=1e-3)
  np.testing.assert_array_equal(out['mask'], expected_mask)
  # The uint8 fast path blends in 1/16-pixel steps: within a few levels.
  as_uint8 = dict(element, image=np.round(element['image']).astype(np.uint8))
  fast = G._warp(as_uint8, 2, matrix, mode)['image'].astype(np.float32)
  assert np.abs(fast - expected).max() <= 6
  assert np.abs(fast - expected).mean() < 0.6


def test_geometric_transforms_handle_volumes():
  rng = np.random.default_rng(0)
  mask = (ndimage.gaussian_filter(rng.standard_normal((12, 20, 20)), 3) > 0)
  mask = mask.astype(np.uint8)
  image = np.stack([mask.astype(np.float32),
                    rng.random(mask.shape, dtype=np.float32)], axis=-1)
  element = {'image': image, 'mask': mask}
  flipped = _apply(G.RandomFlipRot90(axes=(1, 2)), element, 3)
  np.testing.assert_array_equal(flipped['image'][..., 0] == 1,
                                flipped['mask'] == 1)
  warped = _apply(G.RandomAffine(prob=1.0, max_rotate_degrees=20,
                                 axes=(1, 2)), element, 3)
  assert warped['image'].shape == image.shape
  assert warped['mask'].shape == mask.shape
  assert _agrees(warped)


@pytest.mark.parametrize('dtype', [np.uint8, np.float32])
def test_color_jitter_changes_only_the_image_and_keeps_its_range(dtype):
  element = _marked(dtype=dtype)
  op = I.ColorJitter(prob=1.0, brightness=0.4, contrast=0.4, saturation=0.4,
                     hue=0.1)
  out = _apply(op, element, 1)
  assert out['mask'] is element['mask']
  assert out['image'].dtype == dtype
  assert out['image'].shape == element['image'].shape
  assert not np.array_equal(out['image'], element['image'])
  if dtype == np.float32:
    assert out['image'].min() >= 0 and out['image'].max() <= 1


def test_color_jitter_keeps_grey_grey_and_is_off_at_zero():
  grey = np.repeat(np.linspace(0, 200, 64, dtype=np.uint8)[:, None], 3, 1)
  element = {'image': grey.reshape(8, 8, 3), 'mask': np.zeros((8, 8))}
  out = _apply(I.ColorJitter(prob=1.0, brightness=0, contrast=0,
                             saturation=0.5, hue=0.5), element, 0)
  channels = out['image'].astype(int)
  assert np.abs(channels - channels[..., :1]).max() <= 1
  element = _marked()
  still = _apply(I.ColorJitter(prob=1.0, brightness=0, contrast=0,
                               saturation=0, hue=0), element, 0)
  assert np.abs(still['image'].astype(int) - element['image']).max() <= 1


@pytest.mark.parametrize('op', [
    G.RandomFlipRot90(),
    G.RandomAffine(prob=0.7),
    I.ColorJitter(prob=0.7),
], ids=lambda op: type(op).__name__)
def test_random_transforms_are_deterministic_given_the_generator(op):
  element = _marked((32, 32))
  outputs = []
  for seed in range(6):
    a, b = _apply(op, element, seed), _apply(op, element, seed)
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['mask'], b['mask'])
    outputs.append(a['image'].tobytes())
  assert len(set(outputs)) > 1


def test_normalize_returns_float_image_and_int_label_only():
  element = _marked((16, 24))
  element['image'][0, 0] = (255, 0, 51)
  out = T.Normalize(mean=(0.5, 0.5, 0.2), std=(0.25, 0.5, 0.1)).map(element)
  assert set(out) == {'image', 'label'}
  assert out['image'].dtype == np.float32
  assert out['image'].shape == (16, 24, 3)
  assert out['label'].dtype == np.int32 and out['label'].shape == (16, 24)
  np.testing.assert_array_equal(out['label'], element['mask'])
  np.testing.assert_allclose(out['image'][0, 0], [2.0, -1.0, 0.0], atol=1e-5)
  # One value for all channels, and float input taken as [0, 1].
  single = T.Normalize(mean=0.5, std=0.5).map(
      {'image': np.ones((4, 4, 2), np.float32)})
  assert set(single) == {'image'}
  np.testing.assert_allclose(single['image'], 1.0)
  with pytest.raises(ValueError, match='config.data.mean'):
    T.Normalize(mean=(0.5, 0.5), std=(0.2, 0.2)).map(element)


def _aug_config(**changes):
  cfg = ml_collections.ConfigDict(dict(T.DEFAULT_AUGMENT))
  cfg.update(changes)
  return cfg


def test_build_train_transforms_follows_the_config():
  ops = T.build_train_transforms(_aug_config(), (0.5,) * 3, (0.25,) * 3)
  assert [type(op) for op in ops] == [G.RandomFlipRot90, G.RandomAffine,
                                      I.ColorJitter, T.Normalize]
  off = _aug_config(flip=False, rot90=False, affine_prob=0.0, color_prob=0.0)
  assert [type(op) for op in T.build_train_transforms(off, 0.5, 0.25)] == [
      T.Normalize]
  assert [type(op) for op in T.build_train_transforms(None, 0.5, 0.25)] == [
      T.Normalize]
  only_rot = T.build_train_transforms(_aug_config(flip=False), 0.5, 0.25)[0]
  assert only_rot.flip_prob == 0.0 and only_rot.rot90
  assert [type(op) for op in T.build_eval_transforms(0.5, 0.25)] == [
      T.Normalize]
  with pytest.raises(ValueError, match='scale_min'):
    T.build_train_transforms(_aug_config(scale_min=1.2, scale_max=1.0), 0.5,
                             0.25)


def test_the_chain_runs_in_grain_on_synthetic_lesions():
  source = synthetic.SyntheticLesions(3, 2, 40)
  ops = T.build_train_transforms(_aug_config(affine_prob=1.0, color_prob=1.0),
                                 (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  dataset = grain.MapDataset.source(source).seed(0)
  for op in ops:
    if isinstance(op, grain.transforms.RandomMap):
      dataset = dataset.random_map(op)
    else:
      dataset = dataset.map(op)
  batch = dataset.batch(3)[0]
  assert set(batch) == {'image', 'label'}
  assert batch['image'].shape == (3, 40, 40, 3)
  assert batch['image'].dtype == np.float32
  assert batch['label'].dtype == np.int32
  assert set(np.unique(batch['label'])) <= {0, 1}
  assert batch['label'].any()


def test_transforms_pickle_for_grain_workers():
  ops = T.build_train_transforms(_aug_config(), (0.5,) * 3, (0.25,) * 3)
  clones = pickle.loads(pickle.dumps(ops))
  assert clones == ops
  element = _marked((24, 24))
  a = _apply(clones[1], element, 4)
  b = _apply(ops[1], element, 4)
  np.testing.assert_array_equal(a['image'], b['image'])
