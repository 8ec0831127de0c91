"""What every transform sees: an element dict, and helpers shared by them.

An element is a dict with `image` (`[*spatial, C]`, uint8 or float) and, for
training and evaluation, `mask` (and/or `label`) (`[*spatial]`, an integer
class map), 2D or 3D: the number of spatial dimensions is read from the
class map (or `image.ndim - 1` without one). Geometric transforms
(`geometric.py`) move the image and the class maps together; photometric and
intensity ones (`intensity.py`) touch only the image; `transforms.Normalize`
comes last.
"""

import numpy as np

CLASS_KEYS = ('mask', 'label')  # Class maps moved with the image.


def spatial_ndim(element) -> int:
  """Returns the number of spatial axes of an element (2 or 3)."""
  for key in CLASS_KEYS:
    if key in element:
      return np.ndim(element[key])
  return np.ndim(element['image']) - 1


def check_prob(name: str, value: float) -> None:
  """Raises ValueError naming `name` unless `value` is in [0, 1]."""
  if not 0.0 <= value <= 1.0:
    raise ValueError(f'{name}={value} must be a probability in [0, 1].')


def check_range(name: str, value, low: float = 0.0) -> None:
  """Raises ValueError naming `name` unless `value` is (min, max) >= low."""
  lo, hi = value
  if not low <= lo <= hi:
    raise ValueError(f'{name}={tuple(value)} must be (min, max) with '
                     f'{low} <= min <= max.')


def with_image(element, image) -> dict:
  """Returns a shallow copy of `element` with `image` replaced."""
  out = dict(element)
  out['image'] = image
  return out


def config_field(cfg, name: str, default):
  """Returns cfg.name (or cfg[name]), or `default` where cfg lacks it.

  Augmentation builders take `config.data.augment`, a plain dict or None
  (no augmentation): a transform whose fields are absent is off.
  """
  if cfg is None:
    return default
  try:
    value = getattr(cfg, name)
  except (AttributeError, KeyError):
    value = cfg.get(name, default) if hasattr(cfg, 'get') else default
  return default if value is None else value


def add_per_channel(x: np.ndarray, shift, scale=None) -> np.ndarray:
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
