"""On-device augmentation: equal to the host transforms, aligned, keyed by position."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from scipy import stats

from medseg_jax import config_checks
from medseg_jax import device_augment as da
from medseg_jax import device_intensity as di
from medseg_jax import workdir as workdir_lib
from medseg_jax.data import geometric
from medseg_jax.data import intensity
from medseg_jax.data import pipeline
from tests import conftest


class ScriptedRng:
  """Stands in for np.random.Generator: returns the given draws, in order."""

  def __init__(self, *values):
    self._values = list(values)

  def _next(self, *args, **kwargs):
    del args, kwargs
    return self._values.pop(0)

  random = integers = uniform = standard_normal = _next


def _mask_and_image(shape, seed=0, channels=3, dtype=np.uint8):
  """A random blob mask and an image with the mask drawn into channel 0."""
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing='ij'))
  centre = (np.asarray(shape) * rng.uniform(0.3, 0.7, len(shape)))
  centre = centre.reshape((-1,) + (1,) * len(shape))
  mask = (((grid - centre) / (np.asarray(shape).reshape(centre.shape) / 4))
          ** 2).sum(0) < 1
  image = rng.uniform(0, 80, (*shape, channels))
  image[..., 0] = np.where(mask, 230, 20)
  return image.astype(dtype), mask.astype(np.int32)


def _element(image, mask):
  return {'image': image, 'mask': mask}


@pytest.mark.parametrize('shape,axes', [((6, 6), (0, 1)), ((6, 8), (0, 1)),
                                        ((3, 5, 5), (1, 2))])
def test_flips_and_rot90_equal_the_host_for_the_same_decisions(shape, axes):
  image, mask = _mask_and_image(shape)
  op = geometric.RandomFlipRot90(flip_prob=0.5, rot90=True, axes=axes)
  nd = len(shape)
  square = shape[axes[0]] == shape[axes[1]]
  apply = jax.jit(functools.partial(da.apply_flip_rot90, op),
                  static_argnums=3)
  for code in range(2 ** nd * 4):
    flips, k = np.array([(code >> a) & 1 for a in range(nd)], bool), code // 2 ** nd
    if not square and k % 2:
      continue  # The host turns k=1, 3 into 0, 2 there: the sampler's job.
    host = op.random_map(_element(image, mask),
                         ScriptedRng(np.where(flips, 0.1, 0.9), k))
    params = {'flips': jnp.asarray(flips), 'k': jnp.asarray(k)}
    dev_image, dev_mask, _ = apply(
        params, jnp.asarray(image, jnp.float32), jnp.asarray(mask), True)
    np.testing.assert_array_equal(np.asarray(dev_image), host['image'])
    np.testing.assert_array_equal(np.asarray(dev_mask), host['mask'])


def test_non_square_plane_only_samples_half_turns():
  op = geometric.RandomFlipRot90(flip_prob=0.5, rot90=True, axes=(0, 1))
  image = jnp.zeros((6, 8, 1))
  ks = jax.jit(jax.vmap(lambda key: da.sample_flip_rot90(op, key, image)['k']))(
      jax.random.split(jax.random.PRNGKey(0), 64))
  assert set(np.unique(np.asarray(ks)).tolist()) == {0, 2}


@pytest.mark.parametrize('shape,axes,mode', [
    ((20, 24), (0, 1), 'reflect'), ((20, 24), (0, 1), 'constant'),
    ((8, 12, 12), (1, 2), 'nearest')])
def test_affine_matches_the_host_for_the_same_angle_and_zoom(shape, axes, mode):
  op = geometric.RandomAffine(prob=1.0, max_rotate_degrees=30.0,
                              scale_range=(0.8, 1.25), mode=mode, axes=axes)
  degrees, scale = 23.0, 1.17
  for dtype in (np.uint8, np.float32):
    image, mask = _mask_and_image(shape, dtype=dtype)
    host = op.random_map(_element(image, mask),
                         ScriptedRng(0.0, degrees, math.log(scale)))
    params = {'apply': jnp.asarray(True), 'degrees': jnp.asarray(degrees),
              'scale': jnp.asarray(scale)}
    dev_image, dev_mask, _ = da.apply_affine(
        op, params, jnp.asarray(image, jnp.float32), jnp.asarray(mask),
        dtype == np.uint8)
    diff = np.abs(np.asarray(dev_image) - host['image'].astype(np.float32))
    if dtype == np.uint8:  # Rounded on both sides: off by one at most.
      assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    else:
      assert diff.max() < 1e-3
    assert (np.asarray(dev_mask) != host['mask']).mean() < 0.005
    assert (host['mask'] != mask).mean() > 0.02  # It did move.


@pytest.mark.parametrize('shape,sigma', [((24, 20), 6.0), ((8, 12, 10), 3.0)])
def test_elastic_field_and_warp_match_the_host_for_the_same_noise(shape, sigma):
  op = geometric.ElasticDeform(prob=1.0, alpha=80.0 * len(shape) ** 3,
                               sigma=sigma)
  image, mask = _mask_and_image(shape, dtype=np.float32)
  _, coarse = da._elastic_grid(shape, sigma)  # pylint: disable=protected-access
  noise = np.random.default_rng(1).uniform(-1, 1, (len(shape), *coarse))
  host_field = geometric.elastic_displacement(ScriptedRng(*noise), shape,
                                              op.alpha, sigma)
  dev_field = jax.jit(da.elastic_displacement, static_argnums=(1, 2, 3))(
      jnp.asarray(noise, jnp.float32), shape, op.alpha, sigma)
  np.testing.assert_allclose(np.asarray(dev_field), host_field, atol=1e-4)
  assert np.abs(host_field).max() > 0.5  # A real displacement.
  host = op.random_map(_element(image, mask), ScriptedRng(0.0, *noise))
  params = {'apply': jnp.asarray(True),
            'noise': jnp.asarray(noise, jnp.float32)}
  dev_image, dev_mask, _ = jax.jit(functools.partial(
      da.apply_elastic, op), static_argnums=3)(
          params, jnp.asarray(image), jnp.asarray(mask), False)
  # float32 coordinates vs scipy's float64, on values up to 230.
  assert np.abs(np.asarray(dev_image) - host['image']).max() < 5e-3
  assert (np.asarray(dev_mask) != host['mask']).mean() < 0.005


def test_colour_jitter_matches_the_host_for_the_same_factors():
  op = intensity.ColorJitter(prob=1.0, brightness=0.3, contrast=0.3,
                             saturation=0.3, hue=0.1)
  image, _ = _mask_and_image((12, 10))
  b, c, s, turns = 1.2, 0.8, 1.25, 0.07
  host = op.random_map({'image': image}, ScriptedRng(0.0, b, c, s, turns))
  params = {'apply': jnp.asarray(True), 'b': b, 'c': c, 's': s,
            'turns': turns}
  out, units255 = di.apply_color(op, params, jnp.asarray(image, jnp.float32),
                                 True)
  diff = np.abs(np.asarray(out) - host['image'].astype(np.float32))
  assert units255 and diff.max() <= 1 and (diff > 0).mean() < 0.02
  assert np.abs(host['image'].astype(float) - image).mean() > 5  # It changed.


def test_intensity_ops_match_the_host_for_the_same_parameters():
  rng = np.random.default_rng(2)
  image = rng.normal(0, 1, (6, 8, 8, 2)).astype(np.float32)
  noise = rng.standard_normal(image.shape).astype(np.float32)
  cases = [
      (intensity.GaussianNoise(prob=1.0, noise_std=0.3), ScriptedRng(
          0.0, 0.2, noise.copy()), {'std': 0.2, 'noise': noise}),
      (intensity.GaussianBlur(prob=1.0, sigma_range=(0.5, 1.5)),
       ScriptedRng(0.0, np.array([0.6, 1.4])),
       {'sigmas': jnp.array([0.6, 1.4])}),
      (intensity.BrightnessContrast(prob=1.0, scale=0.3),
       ScriptedRng(0.0, np.array([1.1, 0.8]), np.array([0.75, 1.2])),
       {'brightness': jnp.array([1.1, 0.8]), 'contrast': jnp.array([0.75, 1.2])}),
      (intensity.RandomGamma(prob=1.0, gamma_range=(0.7, 1.5), invert_prob=1.0),
       ScriptedRng(0.0, 0.0, 0.9, 0.5, 0.1, 0.25),  # gammas 1.25, 0.775
       {'invert': jnp.asarray(True), 'gammas': jnp.array([1.25, 0.775])}),
  ]
  for op, scripted, params in cases:
    host = op.random_map({'image': image}, scripted)
    _, apply = di.OPS[type(op)]
    out, _ = jax.jit(functools.partial(apply, op), static_argnums=2)(
        {'apply': jnp.asarray(True), **params}, jnp.asarray(image), False)
    np.testing.assert_allclose(np.asarray(out), host['image'], atol=2e-4,
                               err_msg=type(op).__name__)
    assert np.abs(host['image'] - image).mean() > 1e-2, type(op).__name__


def test_parameters_are_drawn_from_the_host_distributions():
  n = 3000
  keys = jax.random.split(jax.random.PRNGKey(0), n)
  image = jnp.zeros((4, 4, 3))
  host_rng = np.random.default_rng(0)

  def device(sample, op):
    return jax.jit(jax.vmap(lambda k: sample(op, k, image)))(keys)

  affine = geometric.RandomAffine(prob=0.3, max_rotate_degrees=15.0,
                                  scale_range=(0.85, 1.25))
  dev = device(da.sample_affine, affine)
  host_deg = host_rng.uniform(-15, 15, n)  # RandomAffine's own draws.
  host_scale = np.exp(host_rng.uniform(math.log(0.85), math.log(1.25), n))
  gamma = intensity.RandomGamma(prob=1.0, gamma_range=(0.7, 1.5))
  dev_gamma = np.asarray(device(di.sample_gamma, gamma)['gammas']).ravel()
  host_gamma = [intensity.draw_gamma(host_rng, (0.7, 1.5)) for _ in range(n)]
  colour = intensity.ColorJitter(prob=0.8, hue=0.02)
  dev_colour = device(di.sample_color, colour)
  pairs = [(dev['degrees'], host_deg), (dev['scale'], host_scale),
           (dev_gamma, host_gamma),
           (dev_colour['turns'], host_rng.uniform(-0.02, 0.02, n))]
  for got, want in pairs:
    assert stats.ks_2samp(np.asarray(got), want).pvalue > 1e-3
  # The KS test would notice a plain uniform gamma draw over (0.7, 1.5).
  assert stats.ks_2samp(host_gamma, host_rng.uniform(0.7, 1.5, n)).pvalue < 1e-3
  for rate, prob in ((dev['apply'], 0.3), (dev_colour['apply'], 0.8)):
    assert abs(float(np.mean(rate)) - prob) < 4 * math.sqrt(prob / n)


def _geometric_chain(nd):
  axes = (0, 1) if nd == 2 else (1, 2)
  return [geometric.RandomFlipRot90(0.5, True, axes),
          geometric.RandomAffine(1.0, 30.0, (0.8, 1.2), 'reflect', axes),
          # About 2 voxels of displacement (see ElasticDeform).
          geometric.ElasticDeform(1.0, 50.0 if nd == 2 else 200.0, 4.0)]


@pytest.mark.parametrize('shape', [(32, 32), (12, 16, 16)])
def test_a_mask_drawn_from_the_image_stays_aligned(shape):
  image, mask = _mask_and_image(shape)
  ops = _geometric_chain(len(shape))
  augment = jax.jit(jax.vmap(lambda key: da.augment_example(
      ops, key, jnp.asarray(image), jnp.asarray(mask), (0.0,), (1.0,))))
  images, masks = augment(jax.random.split(jax.random.PRNGKey(3), 4))
  drawn = np.asarray(images[..., 0]) > 0.5  # 230 / 255 vs 20 / 255.
  masks = np.asarray(masks)
  for one, m in zip(drawn, masks):
    # As the host tests: linear vs nearest sampling may differ only on the
    # mask's border.
    border = ndimage.maximum_filter(m, 3) != ndimage.minimum_filter(m, 3)
    mismatch = one != (m == 1)
    assert not (mismatch & ~border).any()
    assert mismatch.sum() < 0.5 * border.sum()
  moved = [(m != mask).mean() for m in masks]
  assert max(moved) > 0.02 and masks.sum() > 0


def test_batches_depend_only_on_the_examples_positions():
  config = conftest.tiny_config(data__augment_on='device')
  config.data.augment.noise_prob = 0.5
  augment = jax.jit(da.make_batch_augment(config.data, seed=7))
  image, mask = _mask_and_image((16, 16))
  batch = {'image': jnp.stack([jnp.asarray(image)] * 4),
           'label': jnp.stack([jnp.asarray(mask)] * 4),
           'position': jnp.array([12, 13, 14, 15], jnp.int32)}
  whole = augment(batch)
  # Slots swapped (as another device layout would place them): each example
  # is augmented by its position alone. One shape: one compilation.
  order = np.array([2, 3, 0, 1])
  swapped = augment(jax.tree.map(lambda x: x[order], batch))
  for key in ('image', 'label'):
    np.testing.assert_array_equal(np.asarray(swapped[key]),
                                  np.asarray(whole[key])[order])
  # Same image, different positions: different augmentations.
  assert len({np.asarray(x).tobytes() for x in whole['image']}) == 4


def test_host_pipeline_only_loads_and_adds_positions_on_device():
  config = conftest.tiny_config(data__augment_on='device')
  data = pipeline.build_splits(config.data)
  assert [type(op).__name__ for op in pipeline.train_transforms(
      config.data)] == ['DeviceInput']
  batches = iter(pipeline.train_dataset(data, config.data, global_batch=4,
                                        num_steps=2, seed=0,
                                        process_index=1, process_count=2))
  next(batches)
  second = next(batches)
  np.testing.assert_array_equal(second['position'], [6, 7])
  assert second['image'].dtype == np.uint8 and second['label'].dtype == np.int32
  assert pipeline.host_seconds_per_example(
      data, config.data, batch_size=4, num_batches=2) > 0


def test_bad_augment_on_is_refused_naming_the_key():
  problems = config_checks.config_problems(
      conftest.tiny_config(data__augment_on='gpu'))
  assert any(p.startswith("config.data.augment_on='gpu'") for p in problems)


def _train_losses(workdir):
  return {e['step']: e['loss'] for e in workdir_lib.read_metrics(workdir)
          if e['split'] == 'train' and 'loss' in e}


@pytest.mark.slow
def test_device_augmentation_gives_the_same_losses_on_four_devices(tmp_path):
  run = dict(data__augment_on='device', train__num_steps=3)
  conftest.run_main(tmp_path / 'one', num_devices=1, **run)
  conftest.run_main(tmp_path / 'four', num_devices=4, **run)
  one, four = _train_losses(tmp_path / 'one'), _train_losses(tmp_path / 'four')
  assert sorted(one) == sorted(four) == [1, 2, 3]
  np.testing.assert_allclose([four[s] for s in one], list(one.values()),
                             rtol=2e-5, atol=1e-6)


def test_3d_patches_train_with_device_augmentation(tmp_path):
  run = dict(conftest.RUN_3D, data__augment_on='device', train__num_steps=2)
  run['data__augment__elastic_prob'] = 0.5
  run['data__augment__elastic_alpha'] = 200.0
  run['data__augment__elastic_sigma'] = 4.0
  conftest.run_main(tmp_path, **run)
  losses = _train_losses(tmp_path)
  assert sorted(losses) == [1, 2] and all(np.isfinite(list(losses.values())))
