"""Patch sampling for patch-based training (nnU-Net style), 2D or 3D.

Elements are dicts with `image` (`[*spatial, C]`) and `mask` (and/or
`label`, `[*spatial]`); the number of spatial axes is `len(patch_size)`.
Every transform returns `image`, `mask` and `label` cut to exactly
`patch_size`, other keys untouched. Where the volume is smaller than the
patch along an axis, it is padded, centred, with zeros: 0 in the mask is
background, and 0 in the image is the mean intensity of a z-scored volume
(nnU-Net pads normalised images with 0 too; for uint8 photographs it is
black). Nothing else about the array changes (dtype, channels).

Training: `RandomPatch` centres a share `foreground_oversample` of patches on
a foreground voxel (a class drawn uniformly among the foreground classes
present, then a voxel of that class), the rest anywhere in the volume.
Validation during training: `ForegroundPatch` (deterministic, centred on the
foreground's centre of mass) or `CenterPatch`.
"""

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np

_CLASS_KEYS = ('mask', 'label')  # Class maps cut with the image.


def _as_patch_size(patch_size) -> tuple[int, ...]:
  """Returns the patch size as a tuple of positive ints, or raises."""
  size = tuple(int(s) for s in np.atleast_1d(patch_size))
  if not size or min(size) < 1:
    raise ValueError(f'patch_size={patch_size!r} must be positive sizes, one '
                     'per spatial axis (config.data.patch_size).')
  return size


def _spatial_shape(element, patch_size: tuple[int, ...]) -> tuple[int, ...]:
  """Returns the element's spatial shape; raises if it is not len(patch)-D."""
  nd = len(patch_size)
  for key in _CLASS_KEYS:
    if key in element and np.ndim(element[key]) != nd:
      raise ValueError(
          f'patch_size={patch_size} has {nd} axes but {key!r} has shape '
          f'{np.shape(element[key])}; give one patch size per spatial axis '
          '(config.data.patch_size).')
  shape = np.shape(element['image'])
  if len(shape) != nd + 1:
    raise ValueError(
        f'patch_size={patch_size} needs an image [*{nd} spatial axes, C], got '
        f'shape {shape} (config.data.patch_size).')
  return shape[:nd]


def _padding(shape: Sequence[int], patch_size: Sequence[int]) -> np.ndarray:
  """Returns the zeros added before the volume on each axis (centred pad)."""
  return np.maximum(np.asarray(patch_size) - np.asarray(shape), 0) // 2


def crop(array: np.ndarray, start: Sequence[int], size: Sequence[int],
         fill=0) -> np.ndarray:
  """Returns `array[start:start + size]` on the leading axes, `fill` outside.

  Args:
    array: [*spatial, ...] array; trailing axes (channels) are kept whole.
    start: first index per spatial axis; may be negative or run past the end,
      where the window leaves the array.
    size: window size per spatial axis.
    fill: value of the window outside the array.

  Returns:
    A new array of shape (*size, *array.shape[len(size):]), same dtype.
  """
  nd = len(size)
  out = np.full(tuple(size) + array.shape[nd:], fill, array.dtype)
  src, dst = [], []
  for s, n, length in zip(start, size, array.shape):
    lo, hi = max(s, 0), min(s + n, length)
    if hi <= lo:
      return out  # The window misses the array.
    src.append(slice(lo, hi))
    dst.append(slice(lo - s, hi - s))
  out[tuple(dst)] = array[tuple(src)]
  return out


def pad_to_shape(array: np.ndarray, shape: Sequence[int],
                 fill=0) -> np.ndarray:
  """Pads the leading axes of `array` to at least `shape`, centred.

  Args:
    array: [*spatial, ...] array.
    shape: minimum size per spatial axis; larger axes are left as they are.
    fill: padding value.

  Returns:
    The array (itself if no axis is short), with `(shape - size) // 2` fill
    values before and the rest after along each short axis.
  """
  nd = len(shape)
  target = np.maximum(np.asarray(shape), array.shape[:nd])
  if tuple(target) == array.shape[:nd]:
    return array
  return crop(array, -_padding(array.shape[:nd], target), tuple(target), fill)


def _cut(element, start_in_padded, patch_size) -> dict:
  """Returns `element` with image and class maps cut at `start_in_padded`.

  `start_in_padded` is in the coordinates of the volume centre-padded to at
  least `patch_size` (which is never materialised).
  """
  shape = _spatial_shape(element, patch_size)
  start = np.asarray(start_in_padded) - _padding(shape, patch_size)
  out = dict(element)
  out['image'] = crop(np.asarray(element['image']), start, patch_size, 0)
  for key in _CLASS_KEYS:
    if key in element:
      out[key] = crop(np.asarray(element[key]), start, patch_size, 0)
  return out


def _class_map(element):
  """Returns the element's mask (or label), or None without one."""
  for key in _CLASS_KEYS:
    if key in element:
      return np.asarray(element[key])
  return None


def _start_around(voxel, shape, patch_size) -> np.ndarray:
  """Returns the patch start (padded coordinates) centring `voxel`.

  The patch stays inside the padded volume; `voxel` is always inside it.
  """
  padded = np.maximum(shape, patch_size)
  centre = np.asarray(voxel) + _padding(shape, patch_size)
  start = centre - np.asarray(patch_size) // 2
  return np.clip(start, 0, padded - np.asarray(patch_size))


def random_foreground_voxel(mask: np.ndarray,
                            rng: np.random.Generator):
  """Returns a random foreground voxel index, or None if there is none.

  As in nnU-Net: a class is drawn uniformly among the foreground classes
  (values > 0) present, then a voxel uniformly among that class's voxels, so
  small classes are sampled as often as large ones.

  Args:
    mask: integer class map [*spatial].
    rng: source of randomness.
  """
  flat = mask.ravel()
  counts = np.bincount(flat, minlength=2)
  present = np.flatnonzero(counts[1:]) + 1
  if not len(present):
    return None
  cls = present[rng.integers(len(present))]
  k = int(rng.integers(counts[cls]))
  index = np.flatnonzero(flat == cls)[k]
  return np.unravel_index(index, mask.shape)


@dataclasses.dataclass(frozen=True)
class RandomPatch(grain.transforms.RandomMap):
  """A random patch of `patch_size`, foreground-centred with some probability.

  Attributes:
    patch_size: size per spatial axis, e.g. (D, H, W) or (H, W). Axes where
      the volume is smaller are padded (module docstring).
    foreground_oversample: probability that the patch is centred on a random
      foreground voxel (`random_foreground_voxel`; clipped to stay inside the
      volume, so the voxel is inside the patch but maybe not at its centre).
      Otherwise, and for elements without foreground, the patch start is
      uniform over all positions inside the (padded) volume.
  """
  patch_size: tuple[int, ...]
  foreground_oversample: float = 0.33

  def __post_init__(self):
    object.__setattr__(self, 'patch_size', _as_patch_size(self.patch_size))
    if not 0.0 <= self.foreground_oversample <= 1.0:
      raise ValueError(
          f'foreground_oversample={self.foreground_oversample} must be a '
          'probability in [0, 1] (config.data.foreground_oversample).')

  def random_map(self, element, rng: np.random.Generator):
    """Returns `element` with image, mask and label cut to `patch_size`."""
    shape = np.asarray(_spatial_shape(element, self.patch_size))
    size = np.asarray(self.patch_size)
    on_foreground = rng.random() < self.foreground_oversample
    voxel = None
    mask = _class_map(element)
    if on_foreground and mask is not None:
      voxel = random_foreground_voxel(mask, rng)
    if voxel is not None:
      start = _start_around(voxel, shape, size)
    else:
      positions = np.maximum(shape - size, 0) + 1
      start = rng.integers(positions)
    return _cut(element, start, self.patch_size)


@dataclasses.dataclass(frozen=True)
class CenterPatch(grain.transforms.Map):
  """The patch of `patch_size` at the centre of the (padded) volume.

  Attributes:
    patch_size: size per spatial axis.
  """
  patch_size: tuple[int, ...]

  def __post_init__(self):
    object.__setattr__(self, 'patch_size', _as_patch_size(self.patch_size))

  def map(self, element):
    """Returns `element` with image, mask and label cut to `patch_size`."""
    shape = np.asarray(_spatial_shape(element, self.patch_size))
    return _cut(element, _start_around(shape // 2, shape, self.patch_size),
                self.patch_size)


@dataclasses.dataclass(frozen=True)
class ForegroundPatch(grain.transforms.Map):
  """The patch centred on the foreground's centre of mass (deterministic).

  For validation during training on patches: the same patch every time, and
  one that shows the lesion. Elements without foreground (or without a mask)
  get the centre patch.

  Attributes:
    patch_size: size per spatial axis.
  """
  patch_size: tuple[int, ...]

  def __post_init__(self):
    object.__setattr__(self, 'patch_size', _as_patch_size(self.patch_size))

  def map(self, element):
    """Returns `element` with image, mask and label cut to `patch_size`."""
    shape = np.asarray(_spatial_shape(element, self.patch_size))
    mask = _class_map(element)
    centre = shape // 2
    if mask is not None:
      coords = np.nonzero(mask)
      if len(coords[0]):
        centre = np.array([int(round(c.mean())) for c in coords])
    return _cut(element, _start_around(centre, shape, self.patch_size),
                self.patch_size)


def patch_size(data_cfg) -> tuple[int, ...]:
  """Returns `config.data.patch_size` as a tuple of ints; () = whole images.

  Args:
    data_cfg: `config.data`.

  Returns:
    (D, H, W) or (H, W) patch, or () when training on whole images/slices.
  """
  return tuple(int(s) for s in (data_cfg.patch_size or ()))


def build_patch_transforms(data_cfg, training: bool) -> list:
  """Returns the patch transform for `config.data`, or [] for whole images.

  Args:
    data_cfg: `config.data`; reads `patch_size` (() = whole images) and
      `foreground_oversample`.
    training: [RandomPatch] if True, else [ForegroundPatch].
  """
  size = patch_size(data_cfg)
  if not size:
    return []
  if training:
    return [RandomPatch(size, float(data_cfg.foreground_oversample))]
  return [ForegroundPatch(size)]
