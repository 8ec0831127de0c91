"""Rigid and affine image registration, optimised with optax under `jax.jit`.

`register(fixed, moving, spacing_fixed=...)` finds the transform that maps
fixed-image physical coordinates to moving-image physical coordinates, so that
`moving(matrix @ x) ~ fixed(x)`. Physical coordinates are the voxel index times
the spacing, in array-axis order, with the origin at voxel 0 (no NIfTI affine:
whoever calls `register` with NIfTI volumes applies their affines first).

The method is the classical one (SimpleITK's ImageRegistrationMethod):
- a multi-resolution pyramid (Gaussian smoothing, then shrinking by 2 per level;
  shrink factors 4, 2, 1 with sigmas 2, 1, 0 voxels for `levels=3`);
- the transform is centred on the fixed image centre, its translation started by
  aligning the geometric centres (CenteredTransformInitializer, GEOMETRY);
- the moving image is resampled at the fixed voxel centres (all of them, or a
  fixed random subset of `max_samples` on large volumes) with
  `jax.scipy.ndimage.map_coordinates(order=1)`, which is differentiable in the
  sample positions, so the metric has exact gradients w.r.t. the parameters;
- the metric is NCC or Mattes mutual information (registration_metrics.py);
- Adam with a cosine-decayed step, the whole loop of one level one `lax.scan`
  inside one `jax.jit`, so each level compiles once for its shape.

Parameters are scaled so that one unit of every parameter moves image points by
about the same distance: rotation in radians and scale/shear are unitless
(a point at radius r moves by ~r per unit), translation is in units of r mm,
where r is the RMS distance of the fixed voxels from the fixed centre.
"""

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import ndimage

from medseg_jax import registration_metrics

KINDS = ('rigid', 'affine')
# Re-exported: judging a result belongs beside producing it for most callers.
target_registration_error = registration_metrics.target_registration_error
rigid_matrix = registration_metrics.rigid_matrix
METRICS = tuple(registration_metrics.METRICS)


@dataclasses.dataclass(frozen=True)
class Registration:
  """The result of `register`.

  Attributes:
    matrix: [D+1, D+1] float64 homogeneous transform in mm, mapping fixed
      physical coordinates to moving physical coordinates (4x4 in 3D).
    warped: the moving image resampled onto the fixed grid (linear
      interpolation; 0 outside the moving image), float32, fixed.shape.
    metric_history: float32 [steps], the metric (NCC, or MI in nats; higher is
      better) at every optimiser step, all levels in order.
    level_steps: the number of steps of each level, coarse to fine, so that
      `metric_history` can be split per level.
    final_metric: the metric of the final transform at full resolution.
  """
  matrix: np.ndarray
  warped: np.ndarray
  metric_history: np.ndarray
  level_steps: tuple
  final_metric: float


# ---------------------------------------------------------------- checks

def _spacing(value, ndim, name):
  """Returns `value` as a float64 [ndim] array, or raises naming `name`."""
  try:
    spacing = np.asarray(value, np.float64).reshape(-1)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{name} must be {ndim} numbers (mm per voxel along each '
                     f'array axis), got {value!r}') from e
  if spacing.shape != (ndim,):
    raise ValueError(f'{name} has {spacing.size} values but the image has '
                     f'{ndim} axes: give one spacing (mm) per array axis, '
                     f'got {value!r}')
  if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
    raise ValueError(f'{name} must be positive and finite, got {value!r}')
  return spacing


def _image(value, name):
  """Returns `value` as a float32 array after checking it, naming `name`."""
  image = np.asarray(value)
  if image.ndim not in (2, 3):
    raise ValueError(f'{name} must be a 2D or 3D array (one channel, no batch '
                     f'axis), got shape {image.shape}')
  if min(image.shape) < 4:
    raise ValueError(f'{name} has shape {image.shape}: every axis needs at '
                     f'least 4 voxels to register')
  image = image.astype(np.float32)
  if not np.all(np.isfinite(image)):
    raise ValueError(f'{name} holds NaN or inf values: replace them first')
  return image


def _check_options(kind, metric, levels, iterations, learning_rate, bins,
                   max_samples):
  """Returns iterations per level; raises ValueError naming a bad argument."""
  if kind not in KINDS:
    raise ValueError(f'kind={kind!r} is unknown: use one of {KINDS}')
  if metric not in METRICS:
    raise ValueError(f'metric={metric!r} is unknown: use one of {METRICS}')
  if not isinstance(levels, int) or levels < 1:
    raise ValueError(f'levels must be an integer >= 1, got {levels!r}')
  if not isinstance(bins, numbers.Integral) or bins < 8:
    raise ValueError(f'bins must be an integer >= 8, got {bins!r}')
  if max_samples is not None and (
      not isinstance(max_samples, numbers.Integral) or max_samples < 100):
    raise ValueError(f'max_samples must be None or an integer >= 100, got '
                     f'{max_samples!r}')
  if not learning_rate > 0:
    raise ValueError(f'learning_rate must be > 0, got {learning_rate!r}')
  if isinstance(iterations, numbers.Integral):
    iterations = (iterations,) * levels
  iterations = tuple(iterations)
  if len(iterations) != levels or any(
      not isinstance(n, numbers.Integral) or n < 1 for n in iterations):
    raise ValueError(f'iterations must be an int >= 1 or {levels} of them '
                     f'(one per level), got {iterations!r}')
  return tuple(int(n) for n in iterations)


# ------------------------------------------------------------ transforms

def num_params(ndim, kind):
  """Returns the number of parameters of a `kind` transform in `ndim` dims.

  Args:
    ndim: 2 or 3.
    kind: 'rigid' (rotations + translation) or 'affine' (rigid + log-scales
      + shears).

  Returns:
    The length of the parameter vector.
  """
  rotations = ndim * (ndim - 1) // 2
  rigid = rotations + ndim
  return rigid if kind == 'rigid' else rigid + ndim + rotations


def _rotation(w):
  """Returns the rotation matrix of angle(s) `w` (2D: [1]; 3D: axis-angle)."""
  if w.shape[0] == 1:
    c, s = jnp.cos(w[0]), jnp.sin(w[0])
    return jnp.array([[c, -s], [s, c]])
  k = jnp.array([[0., -w[2], w[1]], [w[2], 0., -w[0]], [-w[1], w[0], 0.]])
  # The tiny offset keeps sin(t)/t and its gradient finite at w == 0.
  theta = jnp.sqrt(jnp.sum(w * w) + 1e-12)
  return (jnp.eye(3) + jnp.sin(theta) / theta * k
          + (1 - jnp.cos(theta)) / theta**2 * (k @ k))


def linear_part(params, ndim):
  """Returns the [ndim, ndim] linear part of a transform from its parameters.

  Args:
    params: the parameter vector (see `num_params`), unscaled.
    ndim: 2 or 3.

  Returns:
    R for rigid; R @ (diag(exp(log_scale)) + strictly upper shear) for affine.
  """
  nrot = ndim * (ndim - 1) // 2
  rotation = _rotation(params[:nrot])
  if params.shape[0] == nrot + ndim:
    return rotation
  log_scale = params[nrot + ndim:nrot + 2 * ndim]
  shear = params[nrot + 2 * ndim:]
  rows, cols = np.triu_indices(ndim, k=1)
  upper = jnp.zeros((ndim, ndim)).at[rows, cols].set(shear)
  return rotation @ (jnp.diag(jnp.exp(log_scale)) + upper)


def params_to_matrix(params, ndim, centre):
  """Returns the homogeneous matrix of `x -> L (x - c) + c + t`.

  Args:
    params: unscaled parameter vector; translation t in mm after the rotations.
    ndim: 2 or 3.
    centre: [ndim] centre of rotation c in fixed physical coordinates (mm).

  Returns:
    [ndim+1, ndim+1] matrix mapping fixed to moving physical coordinates.
  """
  nrot = ndim * (ndim - 1) // 2
  lin = linear_part(params, ndim)
  offset = centre + params[nrot:nrot + ndim] - lin @ centre
  top = jnp.concatenate([lin, offset[:, None]], axis=1)
  bottom = jnp.zeros((1, ndim + 1)).at[0, ndim].set(1.)
  return jnp.concatenate([top, bottom], axis=0)


def resample(moving, matrix, points, spacing_moving):
  """Samples `moving` (linear) at fixed physical `points` mapped by `matrix`.

  Args:
    moving: [*shape] image.
    matrix: [D+1, D+1] fixed->moving physical transform.
    points: [N, D] fixed physical coordinates (mm).
    spacing_moving: [D] moving spacing (mm).

  Returns:
    (values [N], inside [N] float 0/1: 1 where the point falls in the image).
  """
  ndim = moving.ndim
  mapped = points @ matrix[:ndim, :ndim].T + matrix[:ndim, ndim]
  index = mapped / spacing_moving
  upper = jnp.asarray(moving.shape, index.dtype) - 1
  inside = jnp.all((index >= 0) & (index <= upper), axis=1)
  values = jax.scipy.ndimage.map_coordinates(
      moving, list(index.T), order=1, mode='nearest')
  return values, inside.astype(values.dtype)


def grid_points(shape, spacing):
  """Returns the [prod(shape), D] physical coordinates of every voxel (mm)."""
  axes = [np.arange(n, dtype=np.float32) * s for n, s in zip(shape, spacing)]
  return np.stack(np.meshgrid(*axes, indexing='ij'), -1).reshape(-1, len(shape))


# --------------------------------------------------------------- pyramid

def pyramid(image, spacing, levels):
  """Returns [(image, spacing)] coarse to fine: shrink 2^(levels-1-l).

  Each level is Gaussian-smoothed with sigma = factor / 2 voxels (of the full
  image; SimpleITK's usual [4,2,1] / [2,1,0] schedule) before taking every
  factor-th voxel, so the origin (voxel 0) stays where it is.

  Args:
    image: float32 array.
    spacing: [D] mm.
    levels: number of levels.

  Returns:
    A list of `levels` (image, spacing) pairs, the last one the input.
  """
  out = []
  for level in range(levels):
    factor = 2 ** (levels - 1 - level)
    # Never shrink an axis below 4 voxels: a coarser level would be useless.
    factors = [max(1, min(factor, n // 4)) for n in image.shape]
    if factor == 1:
      out.append((image, np.asarray(spacing, np.float64)))
      continue
    smooth = ndimage.gaussian_filter(image, [f / 2 for f in factors])
    shrunk = smooth[tuple(slice(None, None, f) for f in factors)]
    out.append((np.ascontiguousarray(shrunk, np.float32),
                np.asarray(spacing, np.float64) * factors))
  return out


# ------------------------------------------------------------ optimising

@functools.partial(jax.jit, static_argnames=(
    'ndim', 'metric', 'steps', 'learning_rate', 'bins'))
def _optimise_level(scaled, fixed_values, points, moving, spacing_moving,
                    centre, scale, moving_range, fixed_range, *, ndim, metric,
                    steps, learning_rate, bins):
  """Runs `steps` Adam steps on one level; returns (scaled params, history)."""
  metric_fn = registration_metrics.make_metric(
      metric, fixed_values, fixed_range, moving_range, bins)

  def loss(p):
    matrix = params_to_matrix(p * scale, ndim, centre)
    values, inside = resample(moving, matrix, points, spacing_moving)
    return -metric_fn(values, inside)

  schedule = optax.cosine_decay_schedule(learning_rate, steps, alpha=0.05)
  optimiser = optax.adam(schedule)

  def step(carry, _):
    p, opt_state = carry
    value, grad = jax.value_and_grad(loss)(p)
    updates, opt_state = optimiser.update(grad, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), -value

  (scaled, _), history = jax.lax.scan(
      step, (scaled, optimiser.init(scaled)), None, length=steps)
  return scaled, history


def _parameter_scale(ndim, kind, radius):
  """Returns per-parameter factors: translation in units of `radius` mm."""
  nrot = ndim * (ndim - 1) // 2
  scale = np.ones(num_params(ndim, kind))
  scale[nrot:nrot + ndim] = radius
  return scale


def register(fixed, moving, *, spacing_fixed, spacing_moving=None,
             kind='rigid', metric='mattes_mi', levels=3, iterations=100,
             learning_rate=0.05, bins=32, max_samples=200_000):
  """Registers `moving` to `fixed` with a rigid or affine transform.

  Args:
    fixed: 2D or 3D array, the reference image.
    moving: array with the same number of axes (any shape), to be aligned.
    spacing_fixed: mm per voxel along each array axis of `fixed`.
    spacing_moving: the same for `moving`; defaults to `spacing_fixed`.
    kind: 'rigid' (rotation + translation) or 'affine' (+ scales, shears).
    metric: 'ncc' (same modality) or 'mattes_mi' (multi-modal).
    levels: pyramid levels (shrink factors 2^(levels-1) ... 1).
    iterations: Adam steps per level, an int or one per level.
    learning_rate: Adam's first step size (in scaled-parameter units) per level.
    bins: histogram bins of Mattes MI.
    max_samples: the metric uses at most this many fixed voxels per level (a
      fixed random subset beyond; None: all), bounding memory on large scans.

  Returns:
    A `Registration` (matrix fixed->moving in mm, warped, metric_history).

  Raises:
    ValueError: naming the argument that is wrong (ndim, spacing, kind, ...).
  """
  fixed = _image(fixed, 'fixed')
  moving = _image(moving, 'moving')
  if moving.ndim != fixed.ndim:
    raise ValueError(f'fixed has {fixed.ndim} axes (shape {fixed.shape}) but '
                     f'moving has {moving.ndim} (shape {moving.shape}): '
                     f'register images of the same dimension')
  ndim = fixed.ndim
  spacing_fixed = _spacing(spacing_fixed, ndim, 'spacing_fixed')
  spacing_moving = (spacing_fixed if spacing_moving is None
                    else _spacing(spacing_moving, ndim, 'spacing_moving'))
  iterations = _check_options(kind, metric, levels, iterations, learning_rate,
                              bins, max_samples)

  extent_fixed = (np.asarray(fixed.shape) - 1) * spacing_fixed
  extent_moving = (np.asarray(moving.shape) - 1) * spacing_moving
  centre = extent_fixed / 2
  # RMS distance of the voxels from the centre: sum over axes of the variance
  # of a uniform grid, s^2 (n^2 - 1) / 12.
  radius = float(np.sqrt(np.sum(
      spacing_fixed**2 * (np.asarray(fixed.shape, np.float64)**2 - 1) / 12)))
  scale = _parameter_scale(ndim, kind, radius)
  params = np.zeros(num_params(ndim, kind))
  nrot = ndim * (ndim - 1) // 2
  params[nrot:nrot + ndim] = extent_moving / 2 - centre  # centres aligned
  moving_range = (float(moving.min()), float(moving.max()))
  fixed_range = (float(fixed.min()), float(fixed.max()))

  histories = []
  scaled = jnp.asarray(params / scale, jnp.float32)
  for (fix, sp_f), (mov, sp_m), steps in zip(
      pyramid(fixed, spacing_fixed, levels),
      pyramid(moving, spacing_moving, levels), iterations):
    values, points = sample_points(fix, sp_f, max_samples)
    scaled, history = _optimise_level(
        scaled, jnp.asarray(values), jnp.asarray(points), jnp.asarray(mov),
        jnp.asarray(sp_m, jnp.float32), jnp.asarray(centre, jnp.float32),
        jnp.asarray(scale, jnp.float32), moving_range, fixed_range,
        ndim=ndim, metric=metric, steps=steps,
        learning_rate=learning_rate, bins=bins)
    histories.append(np.asarray(history))

  final = np.asarray(scaled, np.float64) * scale
  matrix = np.asarray(params_to_matrix(
      jnp.asarray(final, jnp.float32), ndim,
      jnp.asarray(centre, jnp.float32)), np.float64)
  warped, final_metric = _warp_and_score(
      fixed, moving, matrix, spacing_fixed, spacing_moving, metric,
      fixed_range, moving_range, bins, max_samples)
  return Registration(matrix=matrix, warped=warped,
                      metric_history=np.concatenate(histories),
                      level_steps=iterations, final_metric=final_metric)


def _warp_and_score(fixed, moving, matrix, spacing_fixed, spacing_moving,
                    metric, fixed_range, moving_range, bins, max_samples):
  """Returns (moving on the fixed grid, metric at full resolution)."""
  moving = jnp.asarray(moving)
  matrix = jnp.asarray(matrix, jnp.float32)
  spacing_moving = jnp.asarray(spacing_moving, jnp.float32)
  values, inside = resample(moving, matrix,
                            jnp.asarray(grid_points(fixed.shape, spacing_fixed)),
                            spacing_moving)
  warped = np.asarray(values * inside).reshape(fixed.shape)
  fixed_values, points = sample_points(fixed, spacing_fixed, max_samples)
  values, inside = resample(moving, matrix, jnp.asarray(points), spacing_moving)
  metric_fn = registration_metrics.make_metric(
      metric, jnp.asarray(fixed_values), fixed_range, moving_range, bins)
  return warped.astype(np.float32), float(metric_fn(values, inside))


def sample_points(image, spacing, max_samples):
  """Returns (intensities [N], physical points [N, D]) of the metric samples.

  Every voxel when there are at most `max_samples`, else a fixed random subset
  (seed 0, so a case registers the same way every time; ITK's RANDOM sampling
  with a fixed seed), which bounds memory and time on large volumes.

  Args:
    image: the (pyramid level of the) fixed image.
    spacing: its spacing (mm).
    max_samples: the most points to use, or None for all.

  Returns:
    float32 intensities and float32 physical coordinates (mm).
  """
  points = grid_points(image.shape, spacing)
  values = image.reshape(-1)
  if max_samples is not None and values.size > max_samples:
    keep = np.sort(np.random.default_rng(0).choice(
        values.size, max_samples, replace=False))
    points, values = points[keep], values[keep]
  return values.astype(np.float32), points
