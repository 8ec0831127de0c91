"""On-device augmentation (`config.data.augment_on='device'`), inside the train step.

With augmentation on the device, the host workers only decode, cache, cut
patches and batch (`pipeline.train_transforms`); each example arrives with
its global position, and `make_batch_augment` runs the same augmentation as
the host chain, per example (`vmap`), inside the jitted step: flips and
rot90, affine (rotation + zoom), colour jitter (photographs), elastic
deformation, noise, blur, brightness/contrast, gamma, then the host's
normalisation (`config.data.mean/std`), in the host's order.

The chain is the host's own list of transforms (`pipeline.
augmentation_transforms`), so ranges and probabilities come from the same
config keys; each host transform type maps to a `sample_*` (its parameters,
from a JAX key, with the host's distributions) and an `apply_*` (the same
arithmetic: image (multi)linearly and class map by nearest neighbour on one
grid, by `jax.scipy.ndimage.map_coordinates`' rules written as whole-voxel
gathers, with the host's padding modes; uint8 photographs rounded where the
host rounds). Randomness is
`fold_in(fold_in(example_root(seed), position), op_index)`: a function of the
example's global position only, so 1 device or 4, and a resumed run, see
the same augmented batches. The draws differ from the host's NumPy draws:
host and device runs are two samples of one distribution, not equal runs.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.scipy import ndimage as jnd
import numpy as np

from medseg_jax import device_intensity
from medseg_jax.data import geometric
from medseg_jax.data import pipeline

_STREAM = 0x41554731  # Separates augmentation keys from other uses of the seed.
# Our padding names -> jax.scipy.ndimage modes; JAX's 'constant' is scipy's
# 'grid-constant', which the host uses.
_JAX_MODES = {'reflect': 'reflect', 'nearest': 'nearest',
              'constant': 'constant'}


def _grid(shape) -> jax.Array:
  """Returns float32 [ndim, *shape]: each voxel's coordinates."""
  axes = [jnp.arange(n, dtype=jnp.float32) for n in shape]
  return jnp.stack(jnp.meshgrid(*axes, indexing='ij'))


def _fix_index(index, size: int, mode: str):
  """Returns (index inside [0, size), valid) for an integer index and mode.

  The index rules of `jax.scipy.ndimage.map_coordinates` (and scipy's
  'reflect', 'nearest', 'grid-constant'): 'constant' marks outside samples
  invalid (they read 0).
  """
  if mode == 'nearest':
    return jnp.clip(index, 0, size - 1), True
  if mode == 'reflect':  # d c b a | a b c d | d c b a, with period 2 size.
    index = jnp.mod(index, 2 * size)
    return jnp.where(index >= size, 2 * size - 1 - index, index), True
  valid = (index >= 0) & (index < size)
  return jnp.clip(index, 0, size - 1), valid


def warp(image, label, coords, mode: str, units255: bool):
  """Resamples image (linear) and class map (nearest) at the same coordinates.

  `jax.scipy.ndimage.map_coordinates` (order 1 and 0), written as gathers of
  whole voxels (all channels at once) from the flattened arrays: one index
  computation for every channel.

  Args:
    image: float32 [*spatial, C].
    label: int32 [*spatial].
    coords: float32 [ndim, *spatial]: where each output voxel samples.
    mode: 'reflect', 'nearest' or 'constant' (zeros beyond the border).
    units255: round and clip to [0, 255], as the host keeps uint8 images.

  Returns:
    (image, label) resampled.
  """
  shape, channels = label.shape, image.shape[-1]
  strides = np.cumprod((1,) + shape[:0:-1])[::-1]
  flat_image = image.reshape(-1, channels)
  out = jnp.zeros(coords.shape[1:] + (channels,), image.dtype)
  lower = jnp.floor(coords)
  upper_weight = coords - lower
  lower = lower.astype(jnp.int32)
  for corner in np.ndindex(*(2,) * len(shape)):
    flat, weight = 0, 1.0
    for axis, up in enumerate(corner):
      index, valid = _fix_index(lower[axis] + up, shape[axis], mode)
      w = upper_weight[axis] if up else 1 - upper_weight[axis]
      flat = flat + index * int(strides[axis])
      weight = weight * jnp.where(valid, w, 0.0)
    out = out + weight[..., None] * jnp.take(flat_image, flat, axis=0)
  if units255:
    out = jnp.clip(jnp.round(out), 0, 255)
  flat, valid_all = 0, True
  nearest = jax.lax.round(coords).astype(jnp.int32)  # Half away from zero.
  for axis, n in enumerate(shape):
    index, valid = _fix_index(nearest[axis], n, mode)
    flat, valid_all = flat + index * int(strides[axis]), valid_all & valid
  moved = jnp.where(valid_all, jnp.take(label.reshape(-1), flat), 0)
  return out, moved.astype(label.dtype)


# Flips and 90-degree rotations.


def sample_flip_rot90(op: geometric.RandomFlipRot90, key, image) -> dict:
  """Returns {'flips' bool [ndim], 'k' int}, drawn as `RandomFlipRot90` does."""
  nd = image.ndim - 1
  k_flip, k_rot = jax.random.split(key)
  k = (jax.random.randint(k_rot, (), 0, 4) if op.rot90
       else jnp.zeros((), jnp.int32))
  a, b = op.axes
  if image.shape[a] != image.shape[b]:  # Only k in {0, 2} keeps the shape.
    k = k - k % 2
  return {'flips': jax.random.uniform(k_flip, (nd,)) < op.flip_prob, 'k': k}


def apply_flip_rot90(op, params, image, label, units255: bool):
  """Returns (image, label, units255) flipped, then rotated by k * 90 degrees."""
  nd = label.ndim

  def move(x):
    for axis in range(nd):
      x = jnp.where(params['flips'][axis], jnp.flip(x, axis), x)
    if x.shape[op.axes[0]] == x.shape[op.axes[1]]:
      turns = [functools.partial(jnp.rot90, k=k, axes=op.axes)
               for k in range(4)]
      return jax.lax.switch(params['k'], turns, x)
    return jnp.where(params['k'] == 2, jnp.rot90(x, 2, op.axes), x)

  return move(image), move(label), units255


# Affine: small rotation and zoom about the centre.


def sample_affine(op: geometric.RandomAffine, key, image) -> dict:
  """Returns {'apply', 'degrees', 'scale'}, drawn as `RandomAffine` does."""
  del image
  k_apply, k_deg, k_scale = jax.random.split(key, 3)
  lo, hi = op.scale_range
  top = op.max_rotate_degrees
  return {'apply': jax.random.uniform(k_apply) < op.prob,
          'degrees': jax.random.uniform(k_deg, (), minval=-top, maxval=top),
          'scale': jnp.exp(jax.random.uniform(
              k_scale, (), minval=math.log(lo), maxval=math.log(hi)))}


def rotation_scale_matrix(nd: int, axes, degrees, scale) -> jax.Array:
  """Returns M mapping output offsets from the centre to input offsets."""
  a, b = axes
  c, s = jnp.cos(jnp.deg2rad(degrees)), jnp.sin(jnp.deg2rad(degrees))
  m = jnp.eye(nd, dtype=jnp.float32)
  m = m.at[a, a].set(c).at[a, b].set(-s).at[b, a].set(s).at[b, b].set(c)
  return m / scale


def apply_affine(op, params, image, label, units255: bool):
  """Returns (image, label, units255) sampled at c + M (x - c), if applied."""
  shape = label.shape
  if min(shape) < 2:
    return image, label, units255
  matrix = rotation_scale_matrix(len(shape), op.axes, params['degrees'],
                                 params['scale'])
  centre = ((jnp.asarray(shape, jnp.float32) - 1) / 2).reshape(
      (-1,) + (1,) * len(shape))
  coords = jnp.tensordot(matrix, _grid(shape) - centre, axes=1) + centre
  warped, moved = warp(image, label, coords, op.mode, units255)
  return (jnp.where(params['apply'], warped, image),
          jnp.where(params['apply'], moved, label), units255)


# Elastic deformation.


def _elastic_grid(shape, sigma: float):
  """Returns (factor, coarse shape) as `geometric.elastic_displacement`."""
  factor = max(1, int(sigma // 2))
  return factor, tuple(max(1, math.ceil(n / factor)) for n in shape)


def elastic_displacement(noise, shape, alpha: float, sigma: float):
  """Returns the smooth displacement field float32 [ndim, *shape] from `noise`.

  The device twin of `geometric.elastic_displacement`: `noise` holds its
  uniform(-1, 1) coarse grids, [ndim, *coarse]; each is Gaussian-filtered
  (zero borders), scaled, and zoomed linearly to `shape` (pixel centres
  aligned, edges repeated: scipy's zoom with grid_mode=True, 'nearest').
  """
  nd = len(shape)
  factor, coarse = _elastic_grid(shape, sigma)
  coarse_sigma = sigma / factor
  gain = alpha * math.sqrt(geometric._gaussian_sq_sum(sigma) /  # pylint: disable=protected-access
                           geometric._gaussian_sq_sum(coarse_sigma)) ** nd  # pylint: disable=protected-access
  radius = int(4.0 * coarse_sigma + 0.5)
  points = [(jnp.arange(n, dtype=jnp.float32) + 0.5) * (c / n) - 0.5
            for n, c in zip(shape, coarse)]
  points = list(jnp.meshgrid(*points, indexing='ij'))
  fields = []
  for axis in range(nd):
    field = device_intensity.gaussian_filter(noise[axis], coarse_sigma,
                                             radius, 'constant') * gain
    if factor > 1:
      field = jnd.map_coordinates(field, points, 1, mode='nearest')
    fields.append(field)
  return jnp.stack(fields)


def sample_elastic(op: geometric.ElasticDeform, key, image) -> dict:
  """Returns {'apply', 'noise' [ndim, *coarse]}: `ElasticDeform`'s draws."""
  shape = image.shape[:-1]
  _, coarse = _elastic_grid(shape, op.sigma)
  k_apply, k_noise = jax.random.split(key)
  return {'apply': jax.random.uniform(k_apply) < op.prob,
          'noise': jax.random.uniform(k_noise, (len(shape), *coarse),
                                      minval=-1.0, maxval=1.0)}


def apply_elastic(op, params, image, label, units255: bool):
  """Returns (image, label, units255) deformed by the field, if applied."""
  shape = label.shape
  coords = _grid(shape) + elastic_displacement(params['noise'], shape,
                                               op.alpha, op.sigma)
  warped, moved = warp(image, label, coords, op.mode, units255)
  return (jnp.where(params['apply'], warped, image),
          jnp.where(params['apply'], moved, label), units255)


def _image_only(apply):
  """Lifts an image-only `apply` (device_intensity) to (image, label) form."""

  def lifted(op, params, image, label, units255):
    image, units255 = apply(op, params, image, units255)
    return image, label, units255

  return lifted


OPS = {
    geometric.RandomFlipRot90: (sample_flip_rot90, apply_flip_rot90),
    geometric.RandomAffine: (sample_affine, apply_affine),
    geometric.ElasticDeform: (sample_elastic, apply_elastic),
    **{kind: (sample, _image_only(apply))
       for kind, (sample, apply) in device_intensity.OPS.items()},
}


def op_functions(op):
  """Returns (sample, apply) of a host transform, or raises naming it."""
  try:
    return OPS[type(op)]
  except KeyError:
    raise ValueError(
        f'{type(op).__name__} has no on-device version; use '
        "config.data.augment_on='host'.") from None


def normalize(image, units255: bool, mean, std) -> jax.Array:
  """Returns `transforms.Normalize`'s float32 image: (x / unit - mean) / std."""
  channels = image.shape[-1]
  for name, values in (('mean', mean), ('std', std)):
    if len(values) not in (1, channels):
      raise ValueError(
          f'config.data.{name} has {len(values)} values but the image has '
          f'{channels} channels (shape {image.shape}); give {channels} '
          'values or one.')
  std = np.asarray(std, np.float32)
  scale = 1.0 / ((255.0 if units255 else 1.0) * std)
  shift = -np.asarray(mean, np.float32) / std
  return image * jnp.asarray(scale) + jnp.asarray(shift)


def example_key(seed: int, position) -> jax.Array:
  """Returns the augmentation key of the example at a global position."""
  root = jax.random.fold_in(jax.random.PRNGKey(seed), _STREAM)
  return jax.random.fold_in(root, position)


def augment_example(ops, key, image, label, mean, std):
  """Augments and normalises one example, as the host chain does.

  Args:
    ops: host transforms (`pipeline.augmentation_transforms`), in order.
    key: the example's key (`example_key`); op i uses fold_in(key, i).
    image: [*spatial, C], uint8 (photographs) or float.
    label: int [*spatial].
    mean: per-channel mean of the normalisation (config.data.mean).
    std: per-channel standard deviation (config.data.std).

  Returns:
    (image float32 [*spatial, C], normalised; label int32 [*spatial]).
  """
  units255 = image.dtype == jnp.uint8
  x, label = image.astype(jnp.float32), label.astype(jnp.int32)
  for i, op in enumerate(ops):
    sample, apply = op_functions(op)
    params = sample(op, jax.random.fold_in(key, i), x)
    x, label, units255 = apply(op, params, x, label, units255)
  return normalize(x, units255, mean, std), label


def make_batch_augment(data_cfg, seed: int):
  """Returns `augment(batch) -> {'image', 'label'}` for the train step.

  Args:
    data_cfg: `config.data` (its `augment`, `mean`, `std` and source).
    seed: `config.seed`.

  Returns:
    A jittable function of a batch with `image` `[B, *spatial, C]`,
    `label` `[B, *spatial]` and `position` int `[B]` (the examples' global
    positions, from `pipeline.train_dataset`), returning the augmented,
    normalised `image` (float32) and `label` (int32).
  """
  ops = pipeline.augmentation_transforms(data_cfg)
  for op in ops:
    op_functions(op)  # Fails now, not while tracing, for an unknown op.
  mean = tuple(np.atleast_1d(data_cfg.mean).tolist())
  std = tuple(np.atleast_1d(data_cfg.std).tolist())
  one = functools.partial(augment_example, ops, mean=mean, std=std)

  def augment(batch):
    keys = jax.vmap(functools.partial(example_key, seed))(batch['position'])
    image, label = jax.vmap(one)(keys, batch['image'], batch['label'])
    return {'image': image, 'label': label}

  return augment


def for_config(config):
  """Returns `make_batch_augment(config.data, config.seed)`, or None on host."""
  if pipeline.augment_on(config.data) != 'device':
    return None
  return make_batch_augment(config.data, config.seed)
