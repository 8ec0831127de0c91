"""Geometric augmentation: image and class maps moved together, 2D or 3D.

`RandomFlipRot90` (mirror flips, 90-degree rotations), `RandomAffine` (small
rotation and zoom) and `ElasticDeform` (a smooth random displacement field,
nnU-Net style) resample the image (linearly) and the class maps (nearest
neighbour) on one grid, so they stay aligned. Elements are those of
`elements.py`. Every random number comes from the `np.random.Generator` that
Grain (or `pipeline._LoadAndTransform`) passes, so an element is transformed
identically for the same generator state; scalar parameters are drawn
whether or not the `prob` coin says to apply (the elastic field, a large
array, only when it does). uint8 images stay uint8 (rounded).

`build_geometric_transforms(config.data.augment)` returns the enabled flips
and affine; `build_elastic_transforms` the elastic deformation, which goes
after colour augmentation (nnU-Net's order; see `pipeline.train_transforms`).
"""

import dataclasses
import functools
import math

import grain
import numpy as np
from scipy import ndimage

from medseg_jax.data import elements

PADDING_MODES = ('reflect', 'nearest', 'constant')
_GEOMETRIC_KEYS = elements.CLASS_KEYS
_spatial_ndim = elements.spatial_ndim
_check_prob = elements.check_prob


@dataclasses.dataclass(frozen=True)
class RandomFlipRot90(grain.transforms.RandomMap):
  """Random mirror flips and 90-degree rotations of image and mask together.

  Attributes:
    flip_prob: probability of flipping along each spatial axis, independently.
    rot90: rotate by k * 90 degrees, k uniform in {0, 1, 2, 3}, in the plane
      of `axes`. Where that plane is not square only k in {0, 2} is used, so
      shapes never change.
    axes: the two spatial axes of the rotation plane.
  """
  flip_prob: float = 0.5
  rot90: bool = True
  axes: tuple[int, int] = (0, 1)

  def __post_init__(self):
    _check_prob('RandomFlipRot90 flip_prob (config.data.augment.flip)',
                self.flip_prob)

  def random_map(self, element, rng: np.random.Generator):
    """Returns a flipped/rotated copy of `element` (same keys)."""
    nd = _spatial_ndim(element)
    flips = tuple(np.flatnonzero(rng.random(nd) < self.flip_prob))
    k = int(rng.integers(4)) if self.rot90 else 0
    shape = np.shape(element['image'])
    if k % 2 and shape[self.axes[0]] != shape[self.axes[1]]:
      k -= 1
    if not flips and not k:
      return element

    def move(x):
      if flips:
        x = np.flip(x, flips)
      return np.ascontiguousarray(np.rot90(x, k, self.axes) if k else x)

    out = dict(element)
    for key in ('image', *_GEOMETRIC_KEYS):
      if key in out:
        out[key] = move(out[key])
    return out


def _rotation_scale_matrix(nd: int, axes, degrees: float,
                           scale: float) -> np.ndarray:
  """Returns M mapping output offsets from the centre to input offsets."""
  m = np.eye(nd)
  c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
  a, b = axes
  m[a, a], m[a, b], m[b, a], m[b, b] = c, -s, s, c
  return m / scale


# Our padding names -> scipy.ndimage modes. 'grid-constant' pads with zeros
# beyond the border without scipy's legacy 'constant' edge interpolation.
_SCIPY_MODES = {'reflect': 'reflect', 'nearest': 'nearest',
                'constant': 'grid-constant'}


def _warp(element, nd: int, matrix: np.ndarray, mode: str) -> dict:
  """Returns `element` with image (linear) and class maps (nearest) resampled.

  Output voxel `out` samples the input at `c + M (out - c)`, c the centre, on
  one grid for image and masks (scipy.ndimage.affine_transform, order 1 for
  the image channels, order 0 for class maps), so they stay aligned.
  """
  image = np.asarray(element['image'])
  shape = image.shape[:nd]
  centre = (np.asarray(shape, np.float64) - 1) / 2
  offset = centre - matrix @ centre
  warp = functools.partial(ndimage.affine_transform, matrix=matrix,
                           offset=offset, mode=_SCIPY_MODES[mode])
  channels = [warp(image[..., c].astype(np.float32), order=1)
              for c in range(image.shape[-1])]
  warped = np.stack(channels, axis=-1)
  if image.dtype == np.uint8:
    warped = np.clip(np.rint(warped), 0, 255)
  out = dict(element)
  out['image'] = warped.astype(image.dtype)
  for key in _GEOMETRIC_KEYS:
    if key in element:
      out[key] = warp(np.asarray(element[key]), order=0)
  return out


@dataclasses.dataclass(frozen=True)
class RandomAffine(grain.transforms.RandomMap):
  """Random small rotation and zoom about the centre, image and mask together.

  The image is resampled (multi)linearly, the mask by nearest neighbour, on the
  same sampling grid (scipy.ndimage.affine_transform), so they stay aligned.

  Attributes:
    prob: probability of transforming an element.
    max_rotate_degrees: angle uniform in [-max, max], in the plane of `axes`.
    scale_range: zoom factor, log-uniform in [min, max]; > 1 zooms in.
    mode: how samples outside the array are filled: 'reflect' (default; the
      mirror image across the border, with its mask mirrored too, so labels
      stay consistent; scipy's 'reflect'), 'nearest' (edge pixels repeated)
      or 'constant' (zeros: black image, background mask; scipy's
      'grid-constant').
    axes: the two spatial axes of the rotation plane.
  """
  prob: float = 0.5
  max_rotate_degrees: float = 15.0
  scale_range: tuple[float, float] = (0.9, 1.1)
  mode: str = 'reflect'
  axes: tuple[int, int] = (0, 1)

  def __post_init__(self):
    _check_prob('RandomAffine prob (config.data.augment.affine_prob)',
                self.prob)
    lo, hi = self.scale_range
    if not 0 < lo <= hi:
      raise ValueError(
          f'RandomAffine scale_range={self.scale_range} must satisfy '
          '0 < min <= max (config.data.augment.scale_min, scale_max).')
    if self.mode not in PADDING_MODES:
      raise ValueError(f'RandomAffine mode={self.mode!r}; expected one of '
                       f'{PADDING_MODES}.')

  def random_map(self, element, rng: np.random.Generator):
    """Returns a rotated/zoomed copy of `element` (same keys)."""
    apply = rng.random() < self.prob
    degrees = rng.uniform(-self.max_rotate_degrees, self.max_rotate_degrees)
    lo, hi = self.scale_range
    scale = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if not apply or (degrees == 0 and scale == 1):
      return element
    nd = _spatial_ndim(element)
    shape = np.shape(element['image'])[:nd]
    if min(shape) < 2:
      return element
    matrix = _rotation_scale_matrix(nd, self.axes, degrees, scale)
    return _warp(element, nd, matrix, self.mode)


def _gaussian_sq_sum(sigma: float) -> float:
  """Returns sum(w ** 2) of scipy's normalised 1D Gaussian kernel."""
  radius = int(4.0 * sigma + 0.5)
  w = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  w /= w.sum()
  return float((w * w).sum())


def elastic_displacement(rng: np.random.Generator, shape, alpha: float,
                         sigma: float) -> np.ndarray:
  """Returns a random smooth displacement field, float32 [ndim, *shape].

  The classic elastic field (Simard et al. 2003; batchgenerators, MONAI):
  per axis, alpha * gaussian_filter(uniform(-1, 1), sigma), in voxels. It is
  computed on a grid coarser by f = max(1, sigma // 2) with sigma / f, scaled
  by the exact ratio of the two kernels' norms (same standard deviation) and
  interpolated linearly: the same field statistics for a fraction of the
  cost of a full-resolution filter.

  Args:
    rng: source of randomness.
    shape: spatial shape.
    alpha: magnitude (scales the displacement).
    sigma: smoothness in voxels (the field's correlation length).
  """
  nd = len(shape)
  factor = max(1, int(sigma // 2))
  coarse = tuple(max(1, math.ceil(n / factor)) for n in shape)
  coarse_sigma = sigma / factor
  gain = alpha * math.sqrt(_gaussian_sq_sum(sigma) /
                           _gaussian_sq_sum(coarse_sigma)) ** nd
  zoom = [n / c for n, c in zip(shape, coarse)]
  fields = []
  for _ in range(nd):
    field = ndimage.gaussian_filter(rng.uniform(-1.0, 1.0, coarse),
                                    coarse_sigma, mode='constant')
    field *= gain
    if factor > 1:
      field = ndimage.zoom(field, zoom, order=1, mode='nearest',
                           grid_mode=True)
    fields.append(field.astype(np.float32))
  return np.stack(fields)


@dataclasses.dataclass(frozen=True)
class ElasticDeform(grain.transforms.RandomMap):
  """Random elastic deformation of image and class maps together.

  Every voxel samples the input at its position plus
  `elastic_displacement(alpha, sigma)`, image channels (multi)linearly and
  class maps by nearest neighbour (scipy.ndimage.map_coordinates, order 1 and
  0), on the same coordinates, so they stay aligned. alpha = 0 is the
  identity. The displacement's standard deviation per axis is about
  alpha * 0.58 * (2 sqrt(pi) sigma) ** (-ndim / 2) voxels: e.g. 2.5 voxels
  for 3D alpha=900, sigma=10 (nnU-Net v1's largest), 15 pixels for 2D.

  Attributes:
    prob: probability of transforming an element.
    alpha: magnitude of the displacement.
    sigma: smoothness of the displacement, in voxels.
    mode: how samples outside the array are filled, as in
      `transforms.RandomAffine`: 'reflect', 'nearest' or 'constant'.
  """
  prob: float = 0.2
  alpha: float = 0.0
  sigma: float = 10.0
  mode: str = 'reflect'

  def __post_init__(self):
    _check_prob('ElasticDeform prob (config.data.augment.elastic_prob)',
                self.prob)
    if self.alpha < 0 or self.sigma <= 0:
      raise ValueError(
          f'ElasticDeform needs alpha >= 0 and sigma > 0 (config.data.augment.'
          f'elastic_alpha, elastic_sigma), got {self.alpha}, {self.sigma}.')
    if self.mode not in PADDING_MODES:
      raise ValueError(f'ElasticDeform mode={self.mode!r}; expected one of '
                       f'{PADDING_MODES}.')

  def random_map(self, element, rng: np.random.Generator):
    """Returns a deformed copy of `element` (same keys, shapes and dtypes)."""
    if rng.random() >= self.prob:
      return element
    nd = _spatial_ndim(element)
    image = np.asarray(element['image'])
    shape = image.shape[:nd]
    coords = elastic_displacement(rng, shape, self.alpha, self.sigma)
    for axis, n in enumerate(shape):
      coords[axis] += np.arange(n, dtype=np.float32).reshape(
          (-1,) + (1,) * (nd - axis - 1))
    mode = _SCIPY_MODES[self.mode]
    channels = [ndimage.map_coordinates(image[..., c].astype(np.float32),
                                        coords, order=1, mode=mode)
                for c in range(image.shape[-1])]
    warped = np.stack(channels, axis=-1)
    if image.dtype == np.uint8:
      warped = np.clip(np.rint(warped), 0, 255)
    out = elements.with_image(element, warped.astype(image.dtype))
    for key in _GEOMETRIC_KEYS:
      if key in element:
        out[key] = ndimage.map_coordinates(np.asarray(element[key]), coords,
                                           order=0, mode=mode)
    return out


def build_geometric_transforms(aug_cfg) -> list:
  """Returns the enabled flips/rotations and affine of `config.data.augment`.

  Args:
    aug_cfg: `config.data.augment` (ConfigDict, dict or None) with flip,
      rot90, rotate_axes, affine_prob, rotate_degrees, scale_min, scale_max;
      a missing field, a zero probability/amount or False turns a part off.

  Returns:
    [RandomFlipRot90], [RandomAffine], each only if enabled, in that order.
  """
  def get(name, default=0.0):
    return elements.config_field(aug_cfg, name, default)

  ops = []
  axes = tuple(get('rotate_axes', (0, 1)))
  flip, rot90 = bool(get('flip', False)), bool(get('rot90', False))
  if flip or rot90:
    ops.append(RandomFlipRot90(flip_prob=0.5 if flip else 0.0, rot90=rot90,
                               axes=axes))
  affine_prob = float(get('affine_prob'))
  degrees = float(get('rotate_degrees'))
  scales = (float(get('scale_min', 1.0)), float(get('scale_max', 1.0)))
  if affine_prob > 0 and (degrees > 0 or scales != (1.0, 1.0)):
    ops.append(RandomAffine(prob=affine_prob, max_rotate_degrees=degrees,
                            scale_range=scales, axes=axes))
  return ops


def build_elastic_transforms(aug_cfg) -> list:
  """Returns [ElasticDeform] if `config.data.augment` enables it, else [].

  Args:
    aug_cfg: `config.data.augment` (ConfigDict, dict or None) with
      elastic_prob, elastic_alpha, elastic_sigma and optionally elastic_mode;
      a missing or zero elastic_prob or elastic_alpha is off.
  """
  def get(name, default=0.0):
    return elements.config_field(aug_cfg, name, default)

  elastic_prob, alpha = float(get('elastic_prob')), float(get('elastic_alpha'))
  if elastic_prob > 0 and alpha > 0:
    return [ElasticDeform(prob=elastic_prob, alpha=alpha,
                          sigma=float(get('elastic_sigma')),
                          mode=str(get('elastic_mode', 'reflect')))]
  return []
