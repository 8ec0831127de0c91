"""Joint image + mask augmentation and normalisation, as Grain transforms.

Elements are dicts with `image` (`[*spatial, C]`, uint8 or float in [0, 1])
and `mask` (`[*spatial]`, integer class map), 2D or 3D: the number of spatial
dimensions is read from the mask (or `image.ndim - 1` without one). Geometric
transforms move `image` and `mask` (and `label`, if present) together;
photometric ones touch only `image`. Random transforms draw everything from
the `np.random.Generator` that Grain (or `pipeline._LoadAndTransform`) passes,
so an element is augmented identically for the same generator state.
`Normalize` comes last and returns only what is batched: float32 `image` and
int32 `label`.

The usual training chain comes from `build_train_transforms(config.data.augment,
mean, std)`; its fields and suggested values (those of `configs/default.py`,
the ISIC recipe of seed 002) are in `DEFAULT_AUGMENT`. A zero probability or
amount, or `False`, turns a transform off.
"""

import dataclasses
import functools
import math

import grain
import numpy as np
from scipy import ndimage

from medseg_jax.data import blas

DEFAULT_AUGMENT = dict(
    flip=True,  # Mirror along each spatial axis with probability 1/2.
    rot90=True,  # Rotate by k * 90 degrees in the plane of `rotate_axes`.
    rotate_axes=(0, 1),  # Rotation plane; (1, 2) for (D, H, W) volumes.
    affine_prob=0.5,  # Probability of a small rotation + scaling.
    rotate_degrees=15.0,  # Rotation angle uniform in [-15, 15] degrees.
    scale_min=0.9,  # Zoom factor log-uniform in [scale_min, scale_max].
    scale_max=1.1,
    color_prob=0.8,  # Probability of colour jitter.
    brightness=0.2,  # Factor in [1 - 0.2, 1 + 0.2].
    contrast=0.2,
    saturation=0.1,
    hue=0.02,  # Hue shift in [-0.02, 0.02] of a full turn.
)

_LUMA = np.array([0.299, 0.587, 0.114])
_GEOMETRIC_KEYS = ('mask', 'label')  # Class maps moved with the image.
PADDING_MODES = ('reflect', 'nearest', 'constant')


def _spatial_ndim(element) -> int:
  for key in _GEOMETRIC_KEYS:
    if key in element:
      return np.ndim(element[key])
  return np.ndim(element['image']) - 1


def _check_prob(name: str, value: float):
  if not 0.0 <= value <= 1.0:
    raise ValueError(f'{name}={value} must be a probability in [0, 1].')


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


def _hue_matrix(turns: float) -> np.ndarray:
  """Returns the RGB matrix rotating hue by `turns` of a circle (in YIQ)."""
  to_yiq = np.array([[0.299, 0.587, 0.114],
                     [0.596, -0.274, -0.322],
                     [0.211, -0.523, 0.312]])
  c, s = math.cos(2 * math.pi * turns), math.sin(2 * math.pi * turns)
  rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
  return np.linalg.inv(to_yiq) @ rot @ to_yiq


@dataclasses.dataclass(frozen=True)
class ColorJitter(grain.transforms.RandomMap):
  """Random brightness, contrast, saturation and hue of the image only.

  Factors are drawn as in torchvision: brightness and contrast and saturation
  factors uniform in [1 - x, 1 + x], hue shift uniform in [-hue, hue] turns;
  applied in that fixed order. All four are linear in RGB, so they are folded
  into one 3x3 matrix and offset (hue is a rotation about the grey axis in
  YIQ, close to an HSV hue shift). Saturation and hue need 3 channels and are
  skipped otherwise (e.g. MRI modalities are not colours). uint8 images stay
  uint8 (rounded, clipped to [0, 255]); float images in [0, 1] are clipped
  there, other float images (z-scored volumes or slices, with negative
  values) are not clipped: clipping them to [0, 1] would erase most of them.

  Attributes:
    prob: probability of jittering an element.
    brightness, contrast, saturation: maximum relative change, in [0, 1].
    hue: maximum hue shift in turns, in [0, 0.5].
  """
  prob: float = 0.8
  brightness: float = 0.2
  contrast: float = 0.2
  saturation: float = 0.1
  hue: float = 0.02

  def __post_init__(self):
    _check_prob('ColorJitter prob (config.data.augment.color_prob)', self.prob)
    for name in ('brightness', 'contrast', 'saturation'):
      if not 0 <= getattr(self, name) <= 1:
        raise ValueError(f'ColorJitter {name}={getattr(self, name)} must be in '
                         f'[0, 1] (config.data.augment.{name}).')
    if not 0 <= self.hue <= 0.5:
      raise ValueError(f'ColorJitter hue={self.hue} must be in [0, 0.5] turns '
                       '(config.data.augment.hue).')

  def random_map(self, element, rng: np.random.Generator):
    """Returns `element` with a colour-jittered `image` (mask untouched)."""
    apply = rng.random() < self.prob
    b, c, s = (rng.uniform(1 - x, 1 + x)
               for x in (self.brightness, self.contrast, self.saturation))
    turns = rng.uniform(-self.hue, self.hue)
    if not apply:
      return element
    image = np.asarray(element['image'])
    channels = image.shape[-1]
    top = 255.0 if image.dtype == np.uint8 else 1.0
    flat = image.reshape(-1, channels).astype(np.float32)
    clip = image.dtype == np.uint8 or (flat.min() >= 0 and flat.max() <= 1)
    mean = _channel_means(flat)
    if channels == 3:
      grey = float(mean @ _LUMA) * b
      sat = s * np.eye(3) + (1 - s) * np.outer(np.ones(3), _LUMA)
      color = _hue_matrix(turns) @ sat
    else:
      grey = float(mean.mean()) * b
      color = np.eye(channels)
    # x -> color (c * b * x + (1 - c) * grey): brightness, contrast, colour.
    matrix = (c * b) * color
    offset = color @ np.full(channels, (1 - c) * grey)
    jittered = blas.single_thread_matmul(flat, matrix.T.astype(np.float32))
    jittered = _add_per_channel(jittered.reshape(image.shape), offset)
    if clip:
      np.clip(jittered, 0.0, top, out=jittered)
    if image.dtype == np.uint8:
      jittered = np.rint(jittered, out=jittered)
    out = dict(element)
    out['image'] = jittered.astype(image.dtype)
    return out


def _channel_means(flat: np.ndarray) -> np.ndarray:
  """Returns the column means of float32 [N, C] (float64 [C]).

  Sums blocks of 64 rows as one long row first: NumPy reduces a long inner
  axis many times faster than the outer axis of an [N, 3] array.
  """
  n, channels = flat.shape
  head = n // 64 * 64
  total = flat[:head].reshape(-1, 64 * channels).sum(axis=0, dtype=np.float64)
  total = total.reshape(64, channels).sum(axis=0)
  total += flat[head:].sum(axis=0, dtype=np.float64)
  return total / max(n, 1)


def _add_per_channel(x: np.ndarray, shift, scale=None) -> np.ndarray:
  """Returns float32 x * scale + shift per channel, for x [..., C].

  Broadcasts over [..., W * C] rows with tiled vectors: NumPy is several
  times slower broadcasting a length-3 trailing axis.
  """
  channels = x.shape[-1]
  width = x.shape[-2] if x.ndim > 1 else 1
  rows = x.reshape(-1, width * channels)
  out = rows.astype(np.float32)  # A copy, also for float32 input.

  def per_channel(values):
    values = np.broadcast_to(np.asarray(values, np.float32), (channels,))
    return np.tile(values, width)

  if scale is not None:
    out *= per_channel(scale)
  out += per_channel(shift)
  return out.reshape(x.shape)


@dataclasses.dataclass(frozen=True)
class Normalize(grain.transforms.Map):
  """Scales the image to float32 and standardises it; the mask becomes `label`.

  image: uint8 -> (image / 255 - mean) / std per channel; other dtypes (e.g.
  float images in [0, 1]) are not rescaled before standardising. Returns only the keys that are batched:
  `image` float32 [*spatial, C] and, if the element has a mask, `label` int32
  [*spatial]; ids and other non-array keys are dropped.

  Attributes:
    mean: per-channel mean (or one value for all channels), in [0, 1] units.
    std: per-channel standard deviation (or one value).
  """
  mean: tuple[float, ...] = (0.485, 0.456, 0.406)
  std: tuple[float, ...] = (0.229, 0.224, 0.225)

  def __post_init__(self):
    mean = np.atleast_1d(np.asarray(self.mean, np.float64))
    std = np.atleast_1d(np.asarray(self.std, np.float64))
    if mean.ndim != 1 or std.ndim != 1 or (std <= 0).any():
      raise ValueError(f'Normalize needs 1D mean and positive std (config.data.'
                       f'mean, config.data.std), got {self.mean}, {self.std}.')
    object.__setattr__(self, 'mean', tuple(mean.tolist()))
    object.__setattr__(self, 'std', tuple(std.tolist()))

  def map(self, element):
    """Returns {'image': float32, 'label': int32} (label only with a mask)."""
    image = np.asarray(element['image'])
    channels = image.shape[-1]
    for name, values in (('mean', self.mean), ('std', self.std)):
      if len(values) not in (1, channels):
        raise ValueError(
            f'config.data.{name} has {len(values)} values but the image has '
            f'{channels} channels (shape {image.shape}); give {channels} '
            'values or one.')
    std = np.asarray(self.std, np.float32)
    unit = 255.0 if image.dtype == np.uint8 else 1.0
    scale = 1.0 / (unit * std)
    shift = -np.asarray(self.mean, np.float32) / std
    out = {'image': _add_per_channel(image, shift, scale)}
    for key in _GEOMETRIC_KEYS:
      if key in element:
        out['label'] = np.asarray(element[key]).astype(np.int32)
        break
    return out


def _field(cfg, name: str, default):
  """Returns cfg.name, or `default` where cfg lacks it (or is None)."""
  if cfg is None:
    return default
  try:
    return getattr(cfg, name)
  except (AttributeError, KeyError):
    return default


def build_train_transforms(aug_cfg, mean, std) -> list:
  """Returns the training transforms: augmentation then `Normalize`.

  Args:
    aug_cfg: `config.data.augment` (any object with attributes, or None for
      no augmentation) with the fields of `DEFAULT_AUGMENT`. A missing field,
      a zero probability/amount or False turns that part off.
    mean: per-channel mean for `Normalize`.
    std: per-channel standard deviation for `Normalize`.

  Returns:
    A list of Grain transforms: [RandomFlipRot90], [RandomAffine],
    [ColorJitter] (each only if enabled), Normalize.
  """
  def get(name, default=0.0):
    return _field(aug_cfg, name, default)

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
  color_prob = float(get('color_prob'))
  amounts = {k: float(get(k)) for k in ('brightness', 'contrast', 'saturation',
                                        'hue')}
  if color_prob > 0 and any(amounts.values()):
    ops.append(ColorJitter(prob=color_prob, **amounts))
  ops.append(Normalize(tuple(np.atleast_1d(mean)), tuple(np.atleast_1d(std))))
  return ops


def build_eval_transforms(mean, std) -> list:
  """Returns the evaluation transforms: only `Normalize(mean, std)`."""
  return [Normalize(tuple(np.atleast_1d(mean)), tuple(np.atleast_1d(std)))]
