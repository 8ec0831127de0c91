"""Patch sampling: shapes, padding, foreground oversampling, alignment."""

import pickle

import grain
import ml_collections
import numpy as np
import pytest

from medseg_jax.data import geometric
from medseg_jax.data import intensity
from medseg_jax.data import patches as P
from medseg_jax.data import synthetic3d
from medseg_jax.data import transforms


def _coded(shape, channels=2):
  """Returns an element whose image holds each voxel's coordinates (+1).

  Channel a is the coordinate along spatial axis a plus 1 (so padding, 0,
  is recognisable); the mask is the flat index mod 5, so image and mask
  can be checked to come from the same voxels.
  """
  grid = np.indices(shape).astype(np.float32) + 1
  image = np.stack([grid[a % len(shape)] for a in range(channels)], axis=-1)
  mask = (np.arange(np.prod(shape)) % 5).reshape(shape).astype(np.uint8)
  return {'image': image, 'mask': mask, 'case_id': 'c'}


def _aligned(out, shape):
  """Whether every non-padded voxel of the patch has image and mask of the
  same source voxel (and padded voxels are 0 in both)."""
  nd = len(shape)
  coords = out['image'][..., :nd].astype(int) - 1
  inside = (coords >= 0).all(axis=-1)
  flat = np.ravel_multi_index(tuple(np.moveaxis(coords[inside], -1, 0)),
                              shape)
  return (np.array_equal(out['mask'][inside], flat % 5) and
          not out['mask'][~inside].any() and
          not out['image'][~inside].any())


def _patch_origin(out, nd):
  """Returns the source coordinates of the patch's first voxel (inside)."""
  return tuple(int(v) - 1 for v in out['image'][(0,) * nd][:nd])


@pytest.mark.parametrize('shape,patch', [
    ((20, 30), (8, 12)),
    ((10, 24, 24), (6, 16, 8)),
    ((10, 24, 24), (16, 16, 30)),  # Larger along two axes: padded.
    ((10, 24, 24), (10, 24, 24)),  # Exactly the volume.
    ((5, 6), (9, 9)),  # Smaller everywhere.
])
def test_patches_have_the_patch_size_and_stay_aligned(shape, patch):
  element = _coded(shape, channels=len(shape))
  ops = [P.RandomPatch(patch, 0.5), P.CenterPatch(patch),
         P.ForegroundPatch(patch)]
  for seed in range(8):
    for op in ops:
      if isinstance(op, grain.transforms.RandomMap):
        out = op.random_map(element, np.random.default_rng(seed))
      else:
        out = op.map(element)
      assert out['image'].shape == patch + (len(shape),)
      assert out['mask'].shape == patch
      assert out['image'].dtype == np.float32 and out['mask'].dtype == np.uint8
      assert out['case_id'] == 'c'
      assert _aligned(out, shape)


def test_padding_is_centred_with_zeros():
  element = _coded((3, 5), channels=2)
  out = P.RandomPatch((7, 8), 0.0).random_map(element,
                                              np.random.default_rng(0))
  # (7 - 3) // 2 = 2 rows before, (8 - 5) // 2 = 1 column before.
  np.testing.assert_array_equal(out['image'][2:5, 1:6], element['image'])
  np.testing.assert_array_equal(out['mask'][2:5, 1:6], element['mask'])
  assert out['image'].sum() == element['image'].sum()
  assert out['mask'].sum() == element['mask'].sum()
  padded = P.pad_to_shape(element['mask'], (7, 8))
  np.testing.assert_array_equal(padded, out['mask'])
  # Axes already long enough stay as they are; nothing short: the same array.
  assert P.pad_to_shape(element['image'], (6, 2)).shape == (6, 5, 2)
  assert P.pad_to_shape(element['image'], (3, 5)) is element['image']


def test_crop_fills_outside_the_array():
  array = np.arange(12).reshape(3, 4)
  out = P.crop(array, (-1, 2), (3, 3), fill=-7)
  np.testing.assert_array_equal(out, [[-7, -7, -7], [2, 3, -7], [6, 7, -7]])
  assert (P.crop(array, (5, 0), (2, 2), fill=9) == 9).all()


def test_random_patches_cover_every_position_uniformly():
  element = _coded((6, 7), channels=2)
  counts = {}
  for seed in range(2000):
    out = P.RandomPatch((4, 4), 0.0).random_map(element,
                                                np.random.default_rng(seed))
    origin = _patch_origin(out, 2)
    counts[origin] = counts.get(origin, 0) + 1
  # Starts 0..2 x 0..3: 12 positions, each ~2000 / 12 = 167 times.
  assert set(counts) == {(i, j) for i in range(3) for j in range(4)}
  assert min(counts.values()) > 120 and max(counts.values()) < 215


def _one_foreground_voxel(shape, voxel):
  element = _coded(shape, channels=len(shape))
  element['mask'] = np.zeros(shape, np.uint8)
  element['mask'][voxel] = 1
  return element


@pytest.mark.parametrize('rate', [0.0, 0.33, 1.0])
def test_foreground_oversampling_rate(rate):
  shape, patch, voxel = (12, 40, 40), (4, 8, 8), (6, 20, 17)
  element = _one_foreground_voxel(shape, voxel)
  op = P.RandomPatch(patch, rate)
  n = 1500
  centred = 0
  for seed in range(n):
    out = op.random_map(element, np.random.default_rng(seed))
    centre = tuple(int(v) - 1 for v in out['image'][2, 4, 4])
    centred += centre == voxel
  # A uniformly random patch is centred there with probability
  # 1 / (9 * 33 * 33) ~ 1e-4.
  if rate == 1.0:
    assert centred == n
  else:
    assert abs(centred / n - rate) < 0.04  # ~3.3 standard deviations.


def test_foreground_classes_are_drawn_uniformly_like_nnunet():
  shape = (30, 30)
  element = _coded(shape)
  mask = np.zeros(shape, np.uint8)
  mask[2:28, 2:20] = 1  # A large class.
  mask[15, 25] = 2  # A one-pixel class.
  element['mask'] = mask
  rng = np.random.default_rng(0)
  picks = [P.random_foreground_voxel(mask, rng) for _ in range(1000)]
  on_small = np.mean([tuple(map(int, p)) == (15, 25) for p in picks])
  assert 0.45 < on_small < 0.55
  assert all(mask[p] > 0 for p in picks)
  assert P.random_foreground_voxel(np.zeros(shape, np.uint8), rng) is None


def test_foreground_voxel_near_the_border_is_inside_the_patch():
  shape = (20, 20)
  for voxel in [(0, 0), (19, 19), (0, 10), (18, 1)]:
    element = _one_foreground_voxel(shape, voxel)
    out = P.RandomPatch((8, 6), 1.0).random_map(element,
                                                np.random.default_rng(1))
    assert out['mask'].sum() == 1  # The patch holds the voxel.
    assert out['image'].min() >= 1  # No padding: it stays inside.


def test_eval_patches_are_deterministic_and_find_the_foreground():
  shape = (16, 40, 40)
  element = _coded(shape, channels=3)
  element['mask'] = np.zeros(shape, np.uint8)
  element['mask'][10:13, 30:35, 2:5] = 2
  out = P.ForegroundPatch((8, 16, 16)).map(element)
  np.testing.assert_array_equal(out['image'],
                                P.ForegroundPatch((8, 16, 16)).map(element)
                                ['image'])
  # Centre of mass (11, 32, 3): the patch starts at 11 - 4 = 7 and
  # 32 - 8 = 24, and along W is clipped at 0.
  assert _patch_origin(out, 3) == (7, 24, 0)
  assert out['mask'].sum() == element['mask'].sum()
  centre = P.CenterPatch((8, 16, 16)).map(element)
  assert _patch_origin(centre, 3) == (4, 12, 12)
  empty = dict(element, mask=np.zeros(shape, np.uint8))
  assert _patch_origin(P.ForegroundPatch((8, 16, 16)).map(empty), 3) == (
      4, 12, 12)


def test_label_key_is_cut_too_and_bad_shapes_raise():
  element = _coded((10, 12))
  element['label'] = element['mask'].astype(np.int32)
  out = P.RandomPatch((4, 4), 1.0).random_map(element,
                                              np.random.default_rng(0))
  np.testing.assert_array_equal(out['label'], out['mask'])
  with pytest.raises(ValueError, match='patch_size'):
    P.RandomPatch((4, 4, 4)).random_map(element, np.random.default_rng(0))
  with pytest.raises(ValueError, match='patch_size'):
    P.RandomPatch((4, 0))
  with pytest.raises(ValueError, match='foreground_oversample'):
    P.RandomPatch((4, 4), 1.5)


def test_same_generator_same_patch_and_picklable():
  element = _coded((10, 20, 20))
  op = P.RandomPatch((4, 8, 8), 0.5)
  clone = pickle.loads(pickle.dumps(op))
  origins = set()
  for seed in range(10):
    a = op.random_map(element, np.random.default_rng(seed))
    b = clone.random_map(element, np.random.default_rng(seed))
    np.testing.assert_array_equal(a['image'], b['image'])
    origins.add(_patch_origin(a, 3))
  assert len(origins) > 5


def test_build_patch_transforms_from_config():
  cfg = ml_collections.ConfigDict(dict(patch_size=(4, 8, 8),
                                       foreground_oversample=0.5))
  (train,) = P.build_patch_transforms(cfg, training=True)
  assert isinstance(train, P.RandomPatch)
  assert train.patch_size == (4, 8, 8) and train.foreground_oversample == 0.5
  (val,) = P.build_patch_transforms(cfg, training=False)
  assert isinstance(val, P.ForegroundPatch)
  assert P.build_patch_transforms(ml_collections.ConfigDict(
      dict(patch_size=())), training=True) == []


def test_the_3d_chain_runs_in_grain_on_synthetic_tumours():
  """synthetic3d -> RandomPatch -> flips/affine -> intensity -> Normalize."""
  source = synthetic3d.SyntheticTumours(3, (12, 24, 24), size_jitter=0.3)
  aug = ml_collections.ConfigDict(dict(
      gamma_prob=1.0, noise_prob=1.0, blur_prob=1.0, intensity_prob=1.0,
      elastic_prob=1.0, elastic_alpha=300.0, elastic_sigma=4.0))
  ops = [P.RandomPatch((8, 16, 16), 0.5),
         geometric.RandomFlipRot90(axes=(1, 2)),
         geometric.RandomAffine(prob=1.0, axes=(1, 2)),
         *geometric.build_elastic_transforms(aug),
         *intensity.build_intensity_transforms(aug),
         transforms.Normalize((0.0,), (1.0,))]
  assert len(ops) == 9
  dataset = grain.MapDataset.source(source).seed(0)
  for op in ops:
    dataset = (dataset.random_map(op)
               if isinstance(op, grain.transforms.RandomMap)
               else dataset.map(op))
  batch = next(iter(dataset.batch(3)))
  assert batch['image'].shape == (3, 8, 16, 16, 4)
  assert batch['image'].dtype == np.float32
  assert batch['label'].shape == (3, 8, 16, 16)
  assert set(np.unique(batch['label'])) <= {0, 1, 2, 3}
  assert np.isfinite(batch['image']).all()
