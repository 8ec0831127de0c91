"""Registration: recovery of known transforms on a real brain MRI, conventions.

The real volume is `anatomical.nii` shipped in nibabel's test data: a T1 brain
MRI (33 x 41 x 25 voxels of 2 mm, downsampled). The fixed image is its interior
(a 4-voxel margin cropped off); the moving image is the whole volume resampled
(cubic, SciPy, not the registration's own interpolator) through the inverse of
a known transform onto the same grid, so both images hold real anatomy up to
their borders, as two acquisitions of one head would.
"""

import os

import jax
import jax.numpy as jnp
import nibabel
import numpy as np
import pytest
from scipy import ndimage

from medseg_jax import registration
from medseg_jax import registration_metrics

SPACING = np.array([2., 2., 2.])
MARGIN = 4
TRUE_DEGREES = 6.0
TRUE_AXIS = (1., 2., 3.)  # oblique
TRUE_SHIFT_MM = (3., -4., 2.)


def brain_volume():
  """Returns nibabel's packaged T1 brain volume as float32 (2 mm voxels)."""
  path = os.path.join(os.path.dirname(nibabel.__file__), 'tests', 'data',
                      'anatomical.nii')
  return np.asarray(nibabel.load(path).dataobj).astype(np.float32)


def misaligned_brain(true_matrix_fn, margin=MARGIN):
  """Returns (fixed, moving, true fixed->moving matrix, foreground points).

  Args:
    true_matrix_fn: centre (mm) -> 4x4 fixed->moving transform.
    margin: voxels cropped from each side of the volume for the fixed image.

  Returns:
    The fixed crop, the moving image on the same grid with
    moving(y) = volume(T^-1 y), T, and the physical coordinates of the fixed
    foreground (brain) voxels for the target registration error.
  """
  volume = brain_volume()
  crop = (slice(margin, -margin),) * 3
  fixed = volume[crop]
  centre = (np.array(fixed.shape) - 1) * SPACING / 2
  matrix = true_matrix_fn(centre)
  inverse = np.linalg.inv(matrix)
  points = registration.grid_points(fixed.shape, SPACING)
  source = (points @ inverse[:3, :3].T + inverse[:3, 3]) / SPACING + margin
  moving = ndimage.map_coordinates(volume, source.T, order=3, mode='nearest')
  foreground = points[fixed.reshape(-1) > np.percentile(volume, 30)]
  return fixed, moving.reshape(fixed.shape).astype(np.float32), matrix, foreground


def true_rigid(centre):
  return registration.rigid_matrix(TRUE_AXIS, TRUE_DEGREES, TRUE_SHIFT_MM,
                                   centre)


@pytest.fixture(scope='module')
def rigid_pair():
  return misaligned_brain(true_rigid)


def test_pair_starts_misaligned(rigid_pair):
  _, _, matrix, foreground = rigid_pair
  assert registration.target_registration_error(
      np.eye(4), matrix, foreground) > 5.0


def test_ncc_recovers_rigid_transform(rigid_pair):
  fixed, moving, matrix, foreground = rigid_pair
  result = registration.register(fixed, moving, spacing_fixed=SPACING,
                                 kind='rigid', metric='ncc')
  tre = registration.target_registration_error(result.matrix, matrix,
                                               foreground)
  assert tre < 1.0, tre
  assert result.metric_history.shape == (300,)
  assert result.final_metric > 0.95
  # Inside (away from the zero-filled border) warped matches fixed, unlike
  # the moving image.
  inner = (slice(3, -3),) * 3
  def corr(a):
    return np.corrcoef(a[inner].ravel(), fixed[inner].ravel())[0, 1]
  assert corr(result.warped) > 0.95 > 0.75 > corr(moving)


def test_mattes_mi_recovers_rigid_transform_of_inverted_contrast(rigid_pair):
  fixed, moving, matrix, foreground = rigid_pair
  inverted = moving.max() - moving  # a multi-modal stand-in
  result = registration.register(fixed, inverted, spacing_fixed=SPACING,
                                 kind='rigid', metric='mattes_mi')
  tre = registration.target_registration_error(result.matrix, matrix,
                                               foreground)
  assert tre < 1.0, tre
  # MI rises over the run (steps 0 -> last of the finest level).
  assert result.metric_history[-1] > result.metric_history[0]
  # Inverted contrast correlates negatively (inside, away from the border).
  inner = (slice(3, -3),) * 3
  assert registration_metrics.ncc(
      jnp.asarray(fixed[inner].ravel()), jnp.asarray(result.warped[inner].ravel()),
      jnp.ones(fixed[inner].size)) < -0.9


def test_identity_pair_gives_identity_matrix(rigid_pair):
  fixed = rigid_pair[0]
  result = registration.register(fixed, fixed, spacing_fixed=SPACING,
                                 kind='rigid', metric='ncc')
  np.testing.assert_allclose(result.matrix[:3, :3], np.eye(3), atol=2e-3)
  np.testing.assert_allclose(result.matrix[:3, 3], 0., atol=0.1)
  np.testing.assert_allclose(result.matrix[3], [0, 0, 0, 1])


def test_affine_recovers_known_scaling():
  scales = np.array([1.06, 0.95, 1.03])

  def true_affine(centre):
    matrix = np.eye(4)
    matrix[:3, :3] = np.diag(scales)
    matrix[:3, 3] = centre - scales * centre + [1., -1., 0.5]
    return matrix

  fixed, moving, matrix, foreground = misaligned_brain(true_affine)
  result = registration.register(fixed, moving, spacing_fixed=SPACING,
                                 kind='affine', metric='ncc')
  tre = registration.target_registration_error(result.matrix, matrix,
                                               foreground)
  assert tre < 0.5, tre
  np.testing.assert_allclose(np.diag(result.matrix[:3, :3]), scales, atol=0.01)


def test_matrix_maps_fixed_to_moving_physical_points():
  # By hand: moving = a linear ramp in physical units, so the value resampled
  # at fixed point x must be ramp(M x) with M applied to x in mm.
  spacing_moving = np.array([1.5, 0.5, 2.0])
  shape = (12, 20, 8)
  idx = np.stack(np.meshgrid(*map(np.arange, shape), indexing='ij'), -1)
  weights = np.array([0.3, -0.2, 0.7])
  moving = (idx * spacing_moving) @ weights
  matrix = registration.rigid_matrix((0., 0., 1.), 10., (2., 3., 1.),
                                     (4., 4., 4.))
  x = np.array([[5., 3., 4.], [2.5, 1., 6.]])
  values, inside = registration.resample(
      jnp.asarray(moving, jnp.float32), jnp.asarray(matrix, jnp.float32),
      jnp.asarray(x, jnp.float32), jnp.asarray(spacing_moving, jnp.float32))
  mapped = x @ matrix[:3, :3].T + matrix[:3, 3]
  np.testing.assert_allclose(values, mapped @ weights, rtol=1e-5)
  np.testing.assert_array_equal(inside, 1.)


def test_2d_translation_with_different_grids_is_fixed_to_moving():
  # Two anisotropic blobs drawn in physical space; the moving image's content
  # sits +shift mm from the fixed one's, on a grid with another spacing.
  shift = np.array([3.0, -2.0])

  def blobs(shape, spacing, offset):
    p = registration.grid_points(shape, spacing) - offset
    a = np.exp(-((p[:, 0] - 18)**2 / 30 + (p[:, 1] - 22)**2 / 12))
    b = np.exp(-((p[:, 0] - 30)**2 / 8 + (p[:, 1] - 12)**2 / 20))
    return (a + 0.6 * b).reshape(shape).astype(np.float32)

  fixed = blobs((48, 40), (1.0, 1.0), 0.)
  moving = blobs((32, 48), (1.5, 1.0), shift)
  # max_samples below the 1920 fixed pixels: a random subset of samples.
  result = registration.register(
      fixed, moving, spacing_fixed=(1.0, 1.0), spacing_moving=(1.5, 1.0),
      metric='ncc', levels=2, iterations=60, max_samples=1000)
  assert result.matrix.shape == (3, 3)
  np.testing.assert_allclose(result.matrix[:2, 2], shift, atol=0.1)
  np.testing.assert_allclose(result.matrix[:2, :2], np.eye(2), atol=5e-3)
  assert result.warped.shape == fixed.shape
  # Up to linear interpolation of the 1.5 mm moving grid (peaks lose ~3%).
  np.testing.assert_allclose(result.warped[5:-5, 5:-5], fixed[5:-5, 5:-5],
                             atol=0.05)


def test_mutual_information_known_values_and_finite_gradient():
  rng = np.random.default_rng(0)
  f = jnp.asarray(rng.uniform(size=4000), jnp.float32)
  independent = jnp.asarray(rng.uniform(size=4000), jnp.float32)
  w = jnp.ones(4000)

  @jax.jit
  def mi(m):
    return registration_metrics.mutual_information(
        registration_metrics.joint_histogram(f, m, w, (0., 1.), (0., 1.), 16))

  # Inverting a variable keeps its MI with the fixed one (a bijection).
  np.testing.assert_allclose(mi(1. - f), mi(f), rtol=1e-4)
  assert mi(f) > 1.0 > 0.05 > mi(independent) >= 0.
  # Known tables: two equiprobable matched states carry log 2 nats; a
  # product table carries none.
  np.testing.assert_allclose(registration_metrics.mutual_information(
      jnp.array([[0.5, 0.], [0., 0.5]])), np.log(2.), rtol=1e-6)
  np.testing.assert_allclose(registration_metrics.mutual_information(
      jnp.outer(jnp.array([0.2, 0.8]), jnp.array([0.3, 0.3, 0.4]))), 0.,
      atol=1e-6)
  # Empty bins (an image using half the range) must not give NaN gradients.
  grad = jax.grad(mi)(0.5 * f)
  assert np.all(np.isfinite(grad))


def test_ncc_is_one_for_a_linear_relation():
  f = jnp.linspace(0., 1., 50)
  assert float(registration_metrics.ncc(f, 3. * f + 2., jnp.ones(50))) == (
      pytest.approx(1.0, abs=1e-5))


@pytest.mark.parametrize('kwargs, message', [
    (dict(moving=np.zeros((8, 8))), 'moving has 2'),
    (dict(spacing_fixed=(1., 1.)), 'spacing_fixed has 2 values'),
    (dict(spacing_moving=(1., 1., 1., 1.)), 'spacing_moving has 4 values'),
    (dict(spacing_fixed=(1., -1., 1.)), 'spacing_fixed must be positive'),
    (dict(kind='bspline'), "kind='bspline' is unknown"),
    (dict(metric='mse'), "metric='mse' is unknown"),
    (dict(levels=0), 'levels must be'),
    (dict(iterations=(10, 10)), 'iterations must be'),
    (dict(bins=4), 'bins must be'),
    (dict(max_samples=10), 'max_samples must be'),
    (dict(learning_rate=0.), 'learning_rate must be'),
    (dict(fixed=np.zeros((8, 8, 8, 2))), 'fixed must be a 2D or 3D array'),
    (dict(fixed=np.zeros((8, 2, 8))), 'every axis needs at least 4'),
    (dict(fixed=np.full((8, 8, 8), np.nan)), 'fixed holds NaN'),
])
def test_bad_input_names_the_argument(kwargs, message):
  args = dict(fixed=np.zeros((8, 8, 8)), moving=np.zeros((8, 8, 8)),
              spacing_fixed=(1., 1., 1.))
  args.update(kwargs)
  fixed, moving = args.pop('fixed'), args.pop('moving')
  with pytest.raises(ValueError, match=message):
    registration.register(fixed, moving, **args)
