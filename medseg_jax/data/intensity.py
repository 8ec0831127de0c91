"""Intensity and elastic augmentation (nnU-Net style), 2D or 3D, for Grain.

Elements are those of `transforms.py`: `image` `[*spatial, C]` and `mask`
(and/or `label`) `[*spatial]`; the number of spatial axes is read from the
mask (or `image.ndim - 1`). `RandomGamma`, `GaussianNoise`, `GaussianBlur`
and `BrightnessContrast` change only `image`, per channel; `ElasticDeform`
moves image and class maps together. Every random number comes from the
`np.random.Generator` Grain (or `pipeline._LoadAndTransform`) passes; as in
`transforms.py`, scalar parameters are drawn whether or not the `prob` coin
says to apply (the elastic field, a large array, only when it does).

Image dtypes: these transforms are meant for float images (z-scored volumes,
no fixed range, so nothing is clipped). A uint8 image (a photograph) is
converted to float32 in [0, 1] (x / 255) by the intensity transforms and
returned as float32: `Normalize` does not rescale float images, so the
normalised result is on the same scale as for the uint8 path.
`ElasticDeform`, a geometric transform, keeps uint8 as uint8 (rounded), like
`transforms.RandomAffine`.

`build_intensity_transforms(config.data.augment)` returns the enabled ones, in
nnU-Net's order: elastic, noise, blur, brightness/contrast, gamma. They go
after the geometric transforms and before `Normalize`.
"""

import dataclasses
import math

import grain
import numpy as np
from scipy import ndimage

_CLASS_KEYS = ('mask', 'label')
# Padding names (those of transforms.RandomAffine) -> scipy.ndimage modes.
# Defined here so that transforms.py can import this module.
_SCIPY_MODES = {'reflect': 'reflect', 'nearest': 'nearest',
                'constant': 'grid-constant'}


def _spatial_ndim(element) -> int:
  for key in _CLASS_KEYS:
    if key in element:
      return np.ndim(element[key])
  return np.ndim(element['image']) - 1


def _check_prob(name: str, value: float):
  if not 0.0 <= value <= 1.0:
    raise ValueError(f'{name}={value} must be a probability in [0, 1].')


def _check_range(name: str, value, low: float = 0.0):
  lo, hi = value
  if not low <= lo <= hi:
    raise ValueError(f'{name}={tuple(value)} must be (min, max) with '
                     f'{low} <= min <= max.')


def _float_image(image) -> np.ndarray:
  """Returns the image as float32: uint8 / 255, other dtypes as they are."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image.astype(np.float32) / np.float32(255)
  return image.astype(np.float32, copy=False)


def _with_image(element, image) -> dict:
  out = dict(element)
  out['image'] = image
  return out


def draw_gamma(rng: np.random.Generator, gamma_range) -> float:
  """Returns a gamma in `gamma_range`; below and above 1 equally often.

  As in nnU-Net: when the range straddles 1, half the draws are uniform in
  [min, 1] and half in [1, max] (a plain uniform draw over (0.7, 1.5) would
  pick gamma > 1, which darkens, 5 times in 8). Always draws two numbers.
  """
  lo, hi = gamma_range
  below, t = rng.random() < 0.5, rng.random()
  if lo < 1 < hi:
    lo, hi = (lo, 1.0) if below else (1.0, hi)
  return lo + t * (hi - lo)


@dataclasses.dataclass(frozen=True)
class RandomGamma(grain.transforms.RandomMap):
  """Gamma correction of each channel rescaled to [0, 1], then scaled back.

  Per channel: x -> ((x - min) / (max - min)) ** gamma * (max - min) + min,
  then (with `retain_stats`) shifted and scaled back to the channel's
  original mean and standard deviation (nnU-Net). Constant channels are
  left as they are.

  Attributes:
    prob: probability of transforming an element.
    gamma_range: gamma range (`draw_gamma`); (1, 1) is the identity.
    invert_prob: probability of applying the gamma to the negated image
      (nnU-Net's inverted gamma: it bends the bright end instead).
    retain_stats: keep each channel's mean and standard deviation.
    per_channel: one gamma per channel (else one for all).
  """
  prob: float = 0.3
  gamma_range: tuple[float, float] = (0.7, 1.5)
  invert_prob: float = 0.0
  retain_stats: bool = True
  per_channel: bool = True

  def __post_init__(self):
    _check_prob('RandomGamma prob (config.data.augment.gamma_prob)', self.prob)
    _check_prob('RandomGamma invert_prob', self.invert_prob)
    _check_range('RandomGamma gamma_range (config.data.augment.gamma_range)',
                 self.gamma_range, low=1e-3)

  def random_map(self, element, rng: np.random.Generator):
    """Returns `element` with a gamma-corrected float32 `image`."""
    apply = rng.random() < self.prob
    invert = rng.random() < self.invert_prob
    channels = np.shape(element['image'])[-1]
    gammas = [draw_gamma(rng, self.gamma_range)
              for _ in range(channels if self.per_channel else 1)]
    if not apply:
      return element
    image = _float_image(element['image'])
    out = np.empty_like(image)
    for c in range(channels):
      x = -image[..., c] if invert else image[..., c]
      y = self._gamma(x, gammas[c if self.per_channel else 0])
      out[..., c] = -y if invert else y
    return _with_image(element, out)

  def _gamma(self, x: np.ndarray, gamma: float) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
      return x
    mean, std = x.mean(dtype=np.float64), x.std(dtype=np.float64)
    span = np.float32(hi - lo)
    y = (x - np.float32(lo)) / span
    np.power(y, np.float32(gamma), out=y)
    y *= span
    y += np.float32(lo)
    if self.retain_stats:
      y -= np.float32(y.mean(dtype=np.float64))
      y *= np.float32(std / (y.std(dtype=np.float64) + 1e-8))
      y += np.float32(mean)
    return y


@dataclasses.dataclass(frozen=True)
class GaussianNoise(grain.transforms.RandomMap):
  """Adds zero-mean Gaussian noise to the image (all channels).

  Attributes:
    prob: probability of transforming an element.
    noise_std: the noise's standard deviation is uniform in [0, noise_std],
      in image units (z-score units for volumes).
  """
  prob: float = 0.1
  noise_std: float = 0.1

  def __post_init__(self):
    _check_prob('GaussianNoise prob (config.data.augment.noise_prob)',
                self.prob)
    if self.noise_std < 0:
      raise ValueError(f'GaussianNoise noise_std={self.noise_std} must be >= 0 '
                       '(config.data.augment.noise_std).')

  def random_map(self, element, rng: np.random.Generator):
    """Returns `element` with a noisy float32 `image`."""
    apply = rng.random() < self.prob
    std = rng.uniform(0.0, self.noise_std)
    if not apply:
      return element
    image = _float_image(element['image'])
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    noise *= np.float32(std)
    noise += image
    return _with_image(element, noise)


@dataclasses.dataclass(frozen=True)
class GaussianBlur(grain.transforms.RandomMap):
  """Blurs each channel with a Gaussian over the spatial axes only.

  Attributes:
    prob: probability of transforming an element.
    sigma_range: per-channel sigma uniform in [min, max], in voxels (the same
      along every spatial axis); scipy.ndimage.gaussian_filter, 'reflect'
      borders, which keep the channel's mean.
  """
  prob: float = 0.2
  sigma_range: tuple[float, float] = (0.5, 1.0)

  def __post_init__(self):
    _check_prob('GaussianBlur prob (config.data.augment.blur_prob)', self.prob)
    _check_range('GaussianBlur sigma_range (config.data.augment.blur_sigma)',
                 self.sigma_range)

  def random_map(self, element, rng: np.random.Generator):
    """Returns `element` with a blurred float32 `image`."""
    apply = rng.random() < self.prob
    channels = np.shape(element['image'])[-1]
    sigmas = rng.uniform(*self.sigma_range, size=channels)
    if not apply:
      return element
    image = _float_image(element['image'])
    out = np.empty_like(image)
    for c in range(channels):
      ndimage.gaussian_filter(image[..., c], float(sigmas[c]), mode='reflect',
                              output=out[..., c])
    return _with_image(element, out)


@dataclasses.dataclass(frozen=True)
class BrightnessContrast(grain.transforms.RandomMap):
  """Multiplicative brightness and contrast of a float image, per channel.

  x -> ((x - m) * contrast + m) * brightness, m the channel's mean, with
  both factors uniform in [1 - scale, 1 + scale] per channel (nnU-Net's
  multiplicative brightness and contrast augmentation, without clipping).

  Attributes:
    prob: probability of transforming an element.
    scale: maximum relative change, in [0, 1).
  """
  prob: float = 0.15
  scale: float = 0.25

  def __post_init__(self):
    _check_prob('BrightnessContrast prob (config.data.augment.intensity_prob)',
                self.prob)
    if not 0 <= self.scale < 1:
      raise ValueError(f'BrightnessContrast scale={self.scale} must be in '
                       '[0, 1) (config.data.augment.intensity_scale).')

  def random_map(self, element, rng: np.random.Generator):
    """Returns `element` with a rescaled float32 `image`."""
    apply = rng.random() < self.prob
    channels = np.shape(element['image'])[-1]
    brightness = rng.uniform(1 - self.scale, 1 + self.scale, channels)
    contrast = rng.uniform(1 - self.scale, 1 + self.scale, channels)
    if not apply:
      return element
    image = _float_image(element['image'])
    mean = image.reshape(-1, channels).mean(axis=0, dtype=np.float64)
    scale = (contrast * brightness).astype(np.float32)
    shift = ((1 - contrast) * mean * brightness).astype(np.float32)
    out = image * scale
    out += shift
    return _with_image(element, out)


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
    if self.mode not in _SCIPY_MODES:
      raise ValueError(f'ElasticDeform mode={self.mode!r}; expected one of '
                       f'{tuple(_SCIPY_MODES)}.')

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
    out = _with_image(element, warped.astype(image.dtype))
    for key in _CLASS_KEYS:
      if key in element:
        out[key] = ndimage.map_coordinates(np.asarray(element[key]), coords,
                                           order=0, mode=mode)
    return out


def _get(cfg, name: str, default):
  """Returns cfg.name (or cfg[name]), or `default` where cfg lacks it."""
  if cfg is None:
    return default
  try:
    value = getattr(cfg, name)
  except (AttributeError, KeyError):
    value = cfg.get(name, default) if hasattr(cfg, 'get') else default
  return default if value is None else value


def build_intensity_transforms(aug_cfg) -> list:
  """Returns the enabled intensity/elastic transforms of `config.data.augment`.

  Args:
    aug_cfg: `config.data.augment` (ConfigDict, dict or None) with gamma_prob,
      gamma_range, [gamma_invert_prob], noise_prob, noise_std, blur_prob,
      blur_sigma, intensity_prob, intensity_scale, elastic_prob,
      elastic_alpha, elastic_sigma. A missing or zero probability (or
      elastic_alpha) turns that transform off; other missing amounts take
      the defaults of the data contract (noise_std 0.1, blur_sigma (0.5, 1),
      intensity_scale 0.25, gamma_range (0.7, 1.5)); a zero amount is off.

  Returns:
    A list, in this order, of those enabled: ElasticDeform, GaussianNoise,
    GaussianBlur, BrightnessContrast, RandomGamma.
  """
  def get(name, default=0.0):
    return _get(aug_cfg, name, default)

  ops = []
  elastic_prob, alpha = float(get('elastic_prob')), float(get('elastic_alpha'))
  if elastic_prob > 0 and alpha > 0:
    ops.append(ElasticDeform(prob=elastic_prob, alpha=alpha,
                             sigma=float(get('elastic_sigma')),
                             mode=str(get('elastic_mode', 'reflect'))))
  noise_prob, noise_std = float(get('noise_prob')), float(get('noise_std', 0.1))
  if noise_prob > 0 and noise_std > 0:
    ops.append(GaussianNoise(prob=noise_prob, noise_std=noise_std))
  blur_prob = float(get('blur_prob'))
  blur_sigma = tuple(float(s) for s in get('blur_sigma', (0.5, 1.0)))
  if blur_prob > 0 and max(blur_sigma) > 0:
    ops.append(GaussianBlur(prob=blur_prob, sigma_range=blur_sigma))
  intensity_prob = float(get('intensity_prob'))
  intensity_scale = float(get('intensity_scale', 0.25))
  if intensity_prob > 0 and intensity_scale > 0:
    ops.append(BrightnessContrast(prob=intensity_prob, scale=intensity_scale))
  gamma_prob = float(get('gamma_prob'))
  gamma_range = tuple(float(g) for g in get('gamma_range', (0.7, 1.5)))
  if gamma_prob > 0 and gamma_range != (1.0, 1.0):
    ops.append(RandomGamma(prob=gamma_prob, gamma_range=gamma_range,
                           invert_prob=float(get('gamma_invert_prob'))))
  return ops
