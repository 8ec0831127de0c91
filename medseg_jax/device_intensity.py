"""On-device photometric and intensity augmentation (the image only), in JAX.

The jittable counterparts of `data/intensity.py`: `ColorJitter`,
`GaussianNoise`, `GaussianBlur`, `BrightnessContrast` and `RandomGamma`, one
example at a time (`device_augment` vmaps them over the batch). Each has a
`sample_*(op, key, image)` that draws its parameters from a JAX key with the
host transform's distributions (`op` is the host transform itself, so the
ranges and probabilities come from the same config keys), and an
`apply_*(op, params, image, units255)` that applies them exactly as the host
does. The `apply` coin is drawn every time and used in a `jnp.where`: under
`vmap` both branches run anyway.

`image` is float32 `[*spatial, C]`; `units255` (a Python bool, known while
tracing) says it still holds uint8 values in [0, 255], as the host keeps
photographs uint8 until an intensity transform turns them into [0, 1]
floats. `gaussian_filter` (scipy.ndimage's, reflect or zero borders) is
shared with the elastic deformation.
"""

import jax
import jax.numpy as jnp
import numpy as np

from medseg_jax.data import intensity as host

_LUMA = np.array([0.299, 0.587, 0.114])


def gaussian_filter(x: jax.Array, sigma, radius: int, mode: str) -> jax.Array:
  """Returns scipy.ndimage.gaussian_filter(x, sigma, mode) (truncate 4).

  Args:
    x: float array; every axis is filtered.
    sigma: standard deviation in samples (a traced scalar is fine).
    radius: static kernel half-width, at least int(4 * sigma + 0.5); taps
      beyond scipy's radius for this sigma get weight 0, so a random sigma
      needs only the largest radius.
    mode: 'reflect' (scipy's: the edge sample repeated, d c b a | a b c d)
      or 'constant' (zeros).

  Returns:
    The filtered array, same shape and dtype.
  """
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  cutoff = jnp.floor(4.0 * sigma + 0.5)
  w = jnp.exp(-0.5 * (offsets / sigma) ** 2) * (jnp.abs(offsets) <= cutoff)
  w = w / w.sum()
  pad_mode = 'symmetric' if mode == 'reflect' else 'constant'
  for axis in range(x.ndim):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (radius, radius)
    padded = jnp.pad(x, widths, mode=pad_mode)
    n = x.shape[axis]
    x = sum(w[i] * jax.lax.slice_in_dim(padded, i, i + n, axis=axis)
            for i in range(2 * radius + 1))
  return x


def _to_unit_float(image, units255: bool):
  """Returns the image in [0, 1] units (uint8 values / 255), as the host."""
  return image / jnp.float32(255) if units255 else image


# ColorJitter (photographs).


def sample_color(op: host.ColorJitter, key, image) -> dict:
  """Returns {'apply', 'b', 'c', 's', 'turns'} drawn as `ColorJitter` does."""
  del image
  k_apply, k_b, k_c, k_s, k_h = jax.random.split(key, 5)

  def factor(k, x):
    return jax.random.uniform(k, (), minval=1 - x, maxval=1 + x)

  return {'apply': jax.random.uniform(k_apply) < op.prob,
          'b': factor(k_b, op.brightness), 'c': factor(k_c, op.contrast),
          's': factor(k_s, op.saturation),
          'turns': jax.random.uniform(k_h, (), minval=-op.hue, maxval=op.hue)}


_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                    [0.211, -0.523, 0.312]])
_FROM_YIQ = np.linalg.inv(_TO_YIQ)  # Constant: no matrix inverse on device.


def _hue_matrix(turns):
  """Returns the RGB matrix rotating hue by `turns` (as `intensity._hue_matrix`)."""
  c, s = jnp.cos(2 * jnp.pi * turns), jnp.sin(2 * jnp.pi * turns)
  rot = jnp.array([[1, 0, 0], [0, c, -s], [0, s, c]], jnp.float32)
  return (jnp.asarray(_FROM_YIQ, jnp.float32) @ rot
          @ jnp.asarray(_TO_YIQ, jnp.float32))


def apply_color(op, params, image, units255: bool):
  """Returns (image, units255) after `ColorJitter` with `params`."""
  del op
  channels = image.shape[-1]
  flat = image.reshape(-1, channels)
  mean = flat.mean(axis=0)
  b, c, s = params['b'], params['c'], params['s']
  if channels == 3:
    luma = jnp.asarray(_LUMA, jnp.float32)
    grey = (mean @ luma) * b
    sat = s * jnp.eye(3) + (1 - s) * jnp.outer(jnp.ones(3), luma)
    color = _hue_matrix(params['turns']) @ sat
  else:
    grey = mean.mean() * b
    color = jnp.eye(channels)
  matrix = (c * b) * color
  offset = color @ jnp.full((channels,), (1 - c) * grey)
  out = flat @ matrix.T + offset
  if units255:
    out = jnp.round(jnp.clip(out, 0.0, 255.0))
  else:  # Floats in [0, 1] stay there; z-scored values are not clipped.
    in_unit = (flat.min() >= 0) & (flat.max() <= 1)
    out = jnp.where(in_unit, jnp.clip(out, 0.0, 1.0), out)
  out = out.reshape(image.shape)
  return jnp.where(params['apply'], out, image), units255


# GaussianNoise.


def sample_noise(op: host.GaussianNoise, key, image) -> dict:
  """Returns {'apply', 'std', 'noise'} drawn as `GaussianNoise` does."""
  k_apply, k_std, k_noise = jax.random.split(key, 3)
  return {'apply': jax.random.uniform(k_apply) < op.prob,
          'std': jax.random.uniform(k_std, (), maxval=op.noise_std),
          'noise': jax.random.normal(k_noise, image.shape, jnp.float32)}


def apply_noise(op, params, image, units255: bool):
  """Returns (image, False): the image plus std * noise, in [0, 1] units."""
  del op
  x = _to_unit_float(image, units255)
  return jnp.where(params['apply'], x + params['std'] * params['noise'],
                   x), False


# GaussianBlur.


def sample_blur(op: host.GaussianBlur, key, image) -> dict:
  """Returns {'apply', 'sigmas' [C]} drawn as `GaussianBlur` does."""
  k_apply, k_sigma = jax.random.split(key)
  lo, hi = op.sigma_range
  return {'apply': jax.random.uniform(k_apply) < op.prob,
          'sigmas': jax.random.uniform(k_sigma, (image.shape[-1],),
                                       minval=lo, maxval=hi)}


def apply_blur(op, params, image, units255: bool):
  """Returns (image, False): each channel blurred with its sigma (reflect)."""
  x = _to_unit_float(image, units255)
  radius = int(4.0 * max(op.sigma_range) + 0.5)
  blurred = jax.vmap(lambda ch, s: gaussian_filter(ch, s, radius, 'reflect'),
                     in_axes=(-1, 0), out_axes=-1)(x, params['sigmas'])
  return jnp.where(params['apply'], blurred, x), False


# BrightnessContrast.


def sample_brightness_contrast(op: host.BrightnessContrast, key, image) -> dict:
  """Returns {'apply', 'brightness' [C], 'contrast' [C]} as the host draws."""
  k_apply, k_b, k_c = jax.random.split(key, 3)
  shape = (image.shape[-1],)
  lo, hi = 1 - op.scale, 1 + op.scale
  return {'apply': jax.random.uniform(k_apply) < op.prob,
          'brightness': jax.random.uniform(k_b, shape, minval=lo, maxval=hi),
          'contrast': jax.random.uniform(k_c, shape, minval=lo, maxval=hi)}


def apply_brightness_contrast(op, params, image, units255: bool):
  """Returns (image, False): ((x - m) * contrast + m) * brightness per channel."""
  del op
  x = _to_unit_float(image, units255)
  spatial = tuple(range(x.ndim - 1))
  mean = x.mean(axis=spatial)
  b, c = params['brightness'], params['contrast']
  out = x * (c * b) + (1 - c) * mean * b
  return jnp.where(params['apply'], out, x), False


# RandomGamma.


def sample_gamma(op: host.RandomGamma, key, image) -> dict:
  """Returns {'apply', 'invert', 'gammas' [C or 1]} as `RandomGamma` draws.

  Gamma as `intensity.draw_gamma`: when the range straddles 1, half the
  draws are uniform in [min, 1], half in [1, max].
  """
  k_apply, k_invert, k_below, k_t = jax.random.split(key, 4)
  n = image.shape[-1] if op.per_channel else 1
  lo, hi = op.gamma_range
  below = jax.random.uniform(k_below, (n,)) < 0.5
  t = jax.random.uniform(k_t, (n,))
  if lo < 1 < hi:
    lo_, hi_ = jnp.where(below, lo, 1.0), jnp.where(below, 1.0, hi)
  else:
    lo_, hi_ = jnp.full((n,), lo), jnp.full((n,), hi)
  return {'apply': jax.random.uniform(k_apply) < op.prob,
          'invert': jax.random.uniform(k_invert) < op.invert_prob,
          'gammas': lo_ + t * (hi_ - lo_)}


def _gamma_channel(x, gamma, retain_stats: bool):
  """One channel of `RandomGamma._gamma`; constant channels unchanged."""
  lo, hi = x.min(), x.max()
  span = jnp.maximum(hi - lo, 1e-30)
  y = ((x - lo) / span) ** gamma * span + lo
  if retain_stats:
    y = (y - y.mean()) * (x.std() / (y.std() + 1e-8)) + x.mean()
  return jnp.where(hi > lo, y, x)


def apply_gamma(op, params, image, units255: bool):
  """Returns (image, False): per-channel gamma on [min, max], stats kept."""
  x = _to_unit_float(image, units255)
  sign = jnp.where(params['invert'], -1.0, 1.0)
  gammas = jnp.broadcast_to(params['gammas'], (x.shape[-1],))
  out = jax.vmap(lambda ch, g: _gamma_channel(sign * ch, g, op.retain_stats),
                 in_axes=(-1, 0), out_axes=-1)(x, gammas) * sign
  return jnp.where(params['apply'], out, x), False


OPS = {
    host.ColorJitter: (sample_color, apply_color),
    host.GaussianNoise: (sample_noise, apply_noise),
    host.GaussianBlur: (sample_blur, apply_blur),
    host.BrightnessContrast: (sample_brightness_contrast,
                              apply_brightness_contrast),
    host.RandomGamma: (sample_gamma, apply_gamma),
}
