"""Photometric and intensity augmentation: only the image changes, 2D or 3D.

`ColorJitter` (brightness, contrast, saturation, hue of photographs, as in
torchvision) and nnU-Net's intensity transforms: `GaussianNoise`,
`GaussianBlur`, `BrightnessContrast` and `RandomGamma`, per channel. Elements
are those of `elements.py`; class maps pass through untouched. Every random
number comes from the `np.random.Generator` Grain (or
`pipeline._LoadAndTransform`) passes; scalar parameters are drawn whether or
not the `prob` coin says to apply.

Image dtypes: `ColorJitter` keeps uint8 as uint8. The intensity transforms
are meant for float images (z-scored volumes, no fixed range, so nothing is
clipped); a uint8 image (a photograph) is converted to float32 in [0, 1]
(x / 255) and returned as float32: `Normalize` does not rescale float images,
so the normalised result is on the same scale as for the uint8 path.

`build_color_transforms(config.data.augment)` returns [ColorJitter] when
enabled (photographs only; see `pipeline.train_transforms`), and
`build_intensity_transforms` the enabled intensity transforms in nnU-Net's
order: noise, blur, brightness/contrast, gamma. They go after the geometric
transforms and before `Normalize`.
"""

import dataclasses
import math

import grain
import numpy as np
from scipy import ndimage

from medseg_jax.data import blas
from medseg_jax.data import elements

_LUMA = np.array([0.299, 0.587, 0.114])
_check_prob = elements.check_prob
_check_range = elements.check_range
_with_image = elements.with_image


def _float_image(image) -> np.ndarray:
  """Returns the image as float32: uint8 / 255, other dtypes as they are."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image.astype(np.float32) / np.float32(255)
  return image.astype(np.float32, copy=False)


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
    jittered = elements.add_per_channel(jittered.reshape(image.shape), offset)
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


def build_color_transforms(aug_cfg) -> list:
  """Returns [ColorJitter] if `config.data.augment` enables it, else [].

  Args:
    aug_cfg: `config.data.augment` (ConfigDict, dict or None) with
      color_prob, brightness, contrast, saturation, hue; a missing or zero
      color_prob, or all amounts zero, is off.
  """
  def get(name, default=0.0):
    return elements.config_field(aug_cfg, name, default)

  color_prob = float(get('color_prob'))
  amounts = {k: float(get(k)) for k in ('brightness', 'contrast', 'saturation',
                                        'hue')}
  if color_prob > 0 and any(amounts.values()):
    return [ColorJitter(prob=color_prob, **amounts)]
  return []


def build_intensity_transforms(aug_cfg) -> list:
  """Returns the enabled intensity transforms of `config.data.augment`.

  Args:
    aug_cfg: `config.data.augment` (ConfigDict, dict or None) with gamma_prob,
      gamma_range, [gamma_invert_prob], noise_prob, noise_std, blur_prob,
      blur_sigma, intensity_prob, intensity_scale. A missing or zero
      probability turns that transform off; other missing amounts take the
      defaults of the data contract (noise_std 0.1, blur_sigma (0.5, 1),
      intensity_scale 0.25, gamma_range (0.7, 1.5)); a zero amount is off.

  Returns:
    A list, in this order, of those enabled: GaussianNoise, GaussianBlur,
    BrightnessContrast, RandomGamma.
  """
  def get(name, default=0.0):
    return elements.config_field(aug_cfg, name, default)

  ops = []
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
