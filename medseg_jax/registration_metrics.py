"""Similarity metrics for registration: NCC and Mattes mutual information.

Both are jittable functions of the fixed intensities (constant for one level)
and of the moving intensities sampled at the same points, with a 0/1 weight per
point (0 where the mapped point falls outside the moving image, so the overlap
decides, as in ITK). Both are 'higher is better'; `register` minimises minus
the metric.

Mattes MI (Mattes et al., IEEE TMI 2003) uses a Parzen-window joint histogram:
each sample adds a cubic B-spline weight to the bins near its intensity, so the
histogram, and hence MI, is differentiable in the moving intensities (and thus
in the transform). Intensities are mapped linearly onto the bins from each
image's min/max, leaving two bins of margin on each side for the kernel.

`target_registration_error` (host side, NumPy) judges a result against a known
transform (`rigid_matrix` builds one): the mean distance between points mapped
by the two matrices.
"""

import math

import jax.numpy as jnp
import numpy as np

METRICS = ('mattes_mi', 'ncc')


def ncc(fixed, moving, weight):
  """Returns the weighted normalised cross-correlation (Pearson r).

  Args:
    fixed: [N] fixed intensities.
    moving: [N] moving intensities at the same points.
    weight: [N] non-negative weights (0 = outside the overlap).

  Returns:
    A scalar in [-1, 1]; 1 for a positive linear relation.
  """
  total = jnp.maximum(jnp.sum(weight), 1.)
  f = fixed - jnp.sum(weight * fixed) / total
  m = moving - jnp.sum(weight * moving) / total
  cov = jnp.sum(weight * f * m)
  var = jnp.sum(weight * f * f) * jnp.sum(weight * m * m)
  return cov / jnp.sqrt(var + 1e-12)


def cubic_bspline(x):
  """Returns the cubic B-spline kernel at `x` (support |x| < 2, sums to 1)."""
  a = jnp.abs(x)
  inner = (4. - 6. * a**2 + 3. * a**3) / 6.
  outer = (2. - a)**3 / 6.
  return jnp.where(a < 1., inner, jnp.where(a < 2., outer, 0.))


def _bin_weights(values, value_range, bins):
  """Returns [N, bins] Parzen weights of `values` mapped onto the bins."""
  lo, hi = value_range
  width = jnp.maximum(hi - lo, 1e-12)
  # Centres 2 .. bins-3: the kernel's support (+-2 bins) stays inside.
  position = 2. + jnp.clip((values - lo) / width, 0., 1.) * (bins - 5)
  return cubic_bspline(jnp.arange(bins, dtype=values.dtype) - position[:, None])


def joint_histogram(fixed, moving, weight, fixed_range, moving_range, bins):
  """Returns the [bins, bins] Parzen joint probability of (fixed, moving).

  Args:
    fixed, moving: [N] intensities.
    weight: [N] weights (0 = not counted).
    fixed_range, moving_range: (min, max) intensity of each image.
    bins: number of bins per image.

  Returns:
    A non-negative [bins, bins] array summing to 1 (rows: fixed bins).
  """
  wf = _bin_weights(fixed, fixed_range, bins)
  wm = _bin_weights(moving, moving_range, bins)
  joint = wf.T @ (wm * weight[:, None])
  return joint / jnp.maximum(jnp.sum(joint), 1e-12)


def _neg_entropy(p):
  """Returns sum(p log p), 0 log 0 = 0, with finite gradients at p == 0."""
  # The inner where keeps log's gradient finite where p == 0 (else 0 * inf).
  safe = jnp.where(p > 0, p, 1.)
  return jnp.sum(jnp.where(p > 0, p * jnp.log(safe), 0.))


def mutual_information(joint):
  """Returns the mutual information (nats) of a joint probability table.

  Args:
    joint: [bins_f, bins_m] non-negative, summing to 1.

  Returns:
    H(F) + H(M) - H(F, M), a scalar >= 0.
  """
  pf = jnp.sum(joint, axis=1)
  pm = jnp.sum(joint, axis=0)
  return _neg_entropy(joint) - _neg_entropy(pf) - _neg_entropy(pm)


def make_metric(name, fixed, fixed_range, moving_range, bins):
  """Returns `metric(moving, weight) -> scalar` for the fixed intensities.

  Args:
    name: 'ncc' or 'mattes_mi'.
    fixed: [N] fixed intensities at the sample points.
    fixed_range, moving_range: (min, max) of each whole image (Mattes MI).
    bins: histogram bins (Mattes MI).

  Returns:
    A jittable function of the moving samples and their weights.
  """
  if name == 'ncc':
    return lambda moving, weight: ncc(fixed, moving, weight)
  if name == 'mattes_mi':
    def mattes(moving, weight):
      return mutual_information(joint_histogram(
          fixed, moving, weight, fixed_range, moving_range, bins))
    return mattes
  raise ValueError(f'metric={name!r} is unknown: use one of {METRICS}')


def target_registration_error(matrix, true_matrix, points):
  """Returns the mean distance (mm) between `points` mapped by two matrices.

  Args:
    matrix: [D+1, D+1] estimated fixed->moving transform.
    true_matrix: [D+1, D+1] true fixed->moving transform.
    points: [N, D] fixed physical coordinates (mm), e.g. foreground voxels.

  Returns:
    The mean Euclidean distance in mm.
  """
  points = np.asarray(points, np.float64)
  homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1)
  diff = homogeneous @ (np.asarray(matrix) - np.asarray(true_matrix)).T
  return float(np.mean(np.linalg.norm(diff[:, :-1], axis=1)))


def rigid_matrix(axis, degrees, translation, centre):
  """Returns the 4x4 rigid transform rotating about `centre`, then translating.

  Args:
    axis: 3-vector, the rotation axis (any length; right-hand rule).
    degrees: rotation angle.
    translation: 3-vector in mm, added after the rotation.
    centre: 3-vector in mm, the fixed point of the rotation.

  Returns:
    M with M @ [x, 1] = R (x - centre) + centre + translation.
  """
  axis = np.asarray(axis, np.float64)
  axis = axis / np.linalg.norm(axis)
  angle = math.radians(degrees)
  k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]],
                [-axis[1], axis[0], 0]])
  rotation = np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)
  centre = np.asarray(centre, np.float64)
  matrix = np.eye(4)
  matrix[:3, :3] = rotation
  matrix[:3, 3] = centre + np.asarray(translation, np.float64) - rotation @ centre
  return matrix
