"""2D image and mask files (PNG, JPEG, TIFF, BMP) read and written with Pillow.

Images come back as uint8 `[H, W, C]`, C = 1 (grayscale) or 3 (colour):

* RGB, YCbCr, CMYK -> RGB; RGBA/LA: the alpha channel is dropped (not
  composited); palette images -> RGB colours; 1-bit -> 0/255 grayscale.
* 16-bit grayscale (and 32-bit integer or float TIFF) is stretched linearly
  from the image's own [min, max] to [0, 255], rounded; a constant image
  becomes 0. Such files rarely use their full range (10- or 12-bit sensors
  stored in 16 bits), so dividing by 257 would make most of them nearly
  black; the price is that absolute intensities are not comparable between
  images, which photographs do not promise anyway.
* Pixels are returned as stored: the EXIF orientation tag is ignored, because
  masks are drawn on the stored pixel grid and carry no such tag.
* Multi-page TIFF: the first page.

Masks come back as their raw integer values `[H, W]` (palette PNGs keep
their indices; RGB masks whose three channels are equal become one channel)
and are turned into class indices by `map_labels` (the shared data contract's
`config.data.label_values` rule).

Errors about a file are `errors.FileError(path, reason)`, the error every
data source uses, so a data-set check can list them with their file.
"""

import os

import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError

from medseg_jax import fileio
from medseg_jax.data.errors import FileError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp')
_LOSSY = ('.jpg', '.jpeg')
_READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError,
                Image.DecompressionBombError)


def is_image_file(name: str) -> bool:
  """Returns whether `name` has one of IMAGE_EXTENSIONS (any case)."""
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def as_hw(size) -> tuple[int, int]:
  """Returns (H, W) from an int (square) or a pair, e.g. config.data.image_size."""
  if isinstance(size, (int, np.integer)):
    h = w = int(size)
  else:
    h, w = (int(s) for s in size)
  if h < 1 or w < 1:
    raise ValueError(f'image size {size!r} must be positive '
                     '(config.data.image_size).')
  return h, w


def _open(path: str) -> Image.Image:
  try:
    return Image.open(path)
  except _READ_ERRORS as e:
    raise FileError(path, f'cannot be opened as an image ({e}).') from e


def read_size(path: str) -> tuple[int, int]:
  """Returns the (H, W) of an image file from its header, without decoding it.

  Raises:
    FileError: the file is missing or not an image.
  """
  with _open(path) as img:
    return img.height, img.width


def _stretch_to_uint8(array: np.ndarray) -> np.ndarray:
  """Returns array linearly mapped from its [min, max] to uint8 [0, 255]."""
  array = array.astype(np.float64)
  lo, hi = float(array.min()), float(array.max())
  if hi <= lo:
    return np.zeros(array.shape, np.uint8)
  return np.round((array - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _to_uint8_array(img: Image.Image, path: str) -> np.ndarray:
  """Returns a decoded Pillow image as uint8 [H, W, 1 or 3]."""
  mode = img.mode
  if mode in ('L', 'RGB'):
    array = np.asarray(img)
  elif mode in ('1', 'LA', 'La'):
    array = np.asarray(img.convert('L'))
  elif mode == 'P':
    array = np.asarray(img.convert('RGBA').convert('RGB'))
  elif mode in ('RGBA', 'RGBa', 'RGBX', 'CMYK', 'YCbCr', 'LAB', 'HSV'):
    array = np.asarray(img.convert('RGB'))
  elif mode.startswith('I') or mode == 'F':
    array = np.asarray(img)
    if array.ndim != 2:
      raise FileError(path, f'image mode {mode!r} is not supported.')
    if not np.isfinite(array).all():
      raise FileError(path, 'image has NaN or inf values.')
    array = _stretch_to_uint8(array)
  else:
    raise FileError(path, f'image mode {mode!r} is not supported; save it as '
                          '8-bit grayscale or RGB.')
  return array[..., None] if array.ndim == 2 else array


def read_image(path: str, min_size=None) -> np.ndarray:
  """Returns an image file as uint8 `[H, W, C]`, C = 1 or 3 (module docstring).

  Args:
    path: PNG, JPEG, TIFF or BMP file.
    min_size: optional (H, W) the caller resizes to next. JPEGs are then
      decoded by libjpeg at a reduced scale (1/2 .. 1/8) that is still at
      least this size, several times faster for large photographs; the
      returned image is smaller than the file then.

  Returns:
    uint8 `[H, W, 1]` or `[H, W, 3]`.

  Raises:
    FileError: missing, truncated, corrupt or unsupported file.
  """
  with _open(path) as img:
    try:
      if min_size is not None and img.format == 'JPEG':
        h, w = as_hw(min_size)
        img.draft(img.mode, (w, h))
      img.load()
      return _to_uint8_array(img, path)
    except _READ_ERRORS as e:
      raise FileError(path, f'cannot be decoded ({e}).') from e


def read_mask(path: str) -> np.ndarray:
  """Returns a mask file's raw integer values `[H, W]`.

  Palette images keep their indices; 1-bit images give 0/1; grayscale gives
  its values (uint8, or uint16/int32 for 16/32-bit files); RGB(A) masks must
  have three equal channels (a gray level per class), alpha is ignored.

  Raises:
    FileError: missing or corrupt file, a mask with colours, non-integer
      float values, or more than one channel otherwise.
  """
  with _open(path) as img:
    try:
      img.load()
      mode = img.mode
      if mode == '1':
        return np.asarray(img, dtype=np.uint8)
      if mode in ('LA', 'La'):
        img = img.getchannel('L')
      array = np.asarray(img)
    except _READ_ERRORS as e:
      raise FileError(path, f'cannot be decoded ({e}).') from e
  if array.ndim == 3:
    if array.shape[-1] < 3:
      raise FileError(path, f'mask has {array.shape[-1]} channels; expected a '
                            'single-channel (grayscale or palette) image.')
    rgb = array[..., :3]
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and
            np.array_equal(rgb[..., 0], rgb[..., 2])):
      raise FileError(path, 'mask is a colour (RGB) image with differing '
                            'channels; save masks as single-channel images of '
                            'class values (grayscale or palette PNG).')
    array = np.ascontiguousarray(rgb[..., 0])
  if array.dtype.kind == 'f':
    if not np.isfinite(array).all() or not np.array_equal(array,
                                                          np.round(array)):
      raise FileError(path, 'mask has non-integer values; masks must hold '
                            'integer class values.')
    array = array.astype(np.int64)
  return array


def _distinct(raw: np.ndarray) -> list[int]:
  """Returns the sorted distinct values of an integer array."""
  if raw.dtype in (np.uint8, np.uint16) and raw.size:
    return np.flatnonzero(np.bincount(raw.ravel())).tolist()
  return [int(v) for v in np.unique(raw)]


def _unexpected(raw: np.ndarray, allowed) -> list[int]:
  """Returns the values of `raw` not in `allowed` (distinct ints).

  Counting the allowed values (one pass each) is ~10x faster than listing
  the distinct values of a large mask; that is only done when some are bad.
  """
  if sum(np.count_nonzero(raw == v) for v in allowed) == raw.size:
    return []
  return [v for v in _distinct(raw) if v not in set(allowed)]


def _lossy_hint(path: str) -> str:
  if os.path.splitext(str(path))[1].lower() in _LOSSY:
    return (' JPEG compression changes mask values near edges: save masks as '
            'PNG (lossless).')
  return ''


def _apply(raw: np.ndarray, values) -> np.ndarray:
  """Returns class k where raw == values[k], for raw holding only `values`."""
  if list(values) == list(range(len(values))):
    return raw.astype(np.uint8)
  out = (raw == values[1]).view(np.uint8)
  for cls, value in enumerate(values[2:], start=2):
    out[raw == value] = cls
  return out


def map_labels(raw: np.ndarray, label_values, num_classes: int,
               path: str = 'mask') -> np.ndarray:
  """Returns raw mask values as uint8 class indices 0..K-1 (K = max(2, num_classes)).

  The rule of the shared data contract:
  * `label_values` given (config.data.label_values): raw value
    `label_values[k]` is class k; it must list exactly K values, and any
    other raw value is an error.
  * `()` and binary (`num_classes` = 1): values within {0, 255} or {0, 1}
    map to 0/1; anything else is an error.
  * `()` and K >= 2 classes: values must already be 0..K-1.

  Args:
    raw: integer mask `[H, W]` as read by `read_mask`.
    label_values: raw values in class order, or ().
    num_classes: config.data.num_classes.
    path: the mask file, named in errors.

  Returns:
    uint8 `[H, W]` class indices.

  Raises:
    ValueError: `label_values` of the wrong length or with repeats.
    FileError (a ValueError): raw values outside the label set; the message
      names the file and the unexpected values.
  """
  k = max(2, int(num_classes))
  raw = np.asarray(raw)
  lo, hi = (int(raw.min()), int(raw.max())) if raw.size else (0, 0)
  if label_values:
    values = [int(v) for v in label_values]
    if len(values) != k or len(set(values)) != k:
      raise ValueError(
          f'config.data.label_values={tuple(label_values)} must list {k} '
          f'distinct raw values, one per class (num_classes={num_classes}).')
    unknown = _unexpected(raw, values)
    if unknown:
      raise FileError(path, f'mask values {unknown[:8]} are not in '
                            f'config.data.label_values={tuple(values)}.'
                            + _lossy_hint(path))
    return _apply(raw, values)
  if k == 2:
    values = [0, 1] if lo >= 0 and hi <= 1 else [0, 255]
    if _unexpected(raw, values):
      present = _distinct(raw)
      raise FileError(
          path, f'binary mask has values {present[:8]}'
          f'{"..." if len(present) > 8 else ""}; expected 0/255 or 0/1. Set '
          'config.data.label_values=(background, foreground), or '
          'num_classes=K with values 0..K-1.' + _lossy_hint(path))
    return _apply(raw, values)
  if lo < 0 or hi >= k:
    unknown = [v for v in _distinct(raw) if not 0 <= v < k]
    raise FileError(path, f'mask values {unknown[:8]} are outside the {k} '
                          f'classes 0..{k - 1} (config.data.num_classes='
                          f'{num_classes}); set config.data.label_values to '
                          'map raw values to classes.' + _lossy_hint(path))
  return raw.astype(np.uint8)


def match_channels(image: np.ndarray, in_channels: int,
                   path: str = 'image') -> np.ndarray:
  """Returns `[H, W, C]` with `in_channels` channels, or raises.

  A grayscale image (C = 1) is repeated to 3 channels when
  `in_channels` = 3, so gray and colour photographs can share a model;
  nothing else is converted.

  Raises:
    FileError: any other channel count mismatch (names the config key).
  """
  have, want = image.shape[-1], int(in_channels)
  if have == want:
    return image
  if have == 1 and want == 3:
    return np.repeat(image, 3, axis=-1)
  raise FileError(path, f'image has {have} channel(s) but config.data.'
                        f'in_channels={want}; set in_channels={have} or '
                        'convert the image.')


def resize_image(image: np.ndarray, size) -> np.ndarray:
  """Returns uint8 `[H, W, C]` resized to `size` = (H, W) (or an int).

  Bilinear with a support widened by the scale factor when shrinking (Pillow's
  resize), i.e. area-like antialiasing, so large photographs do not alias.
  """
  h, w = as_hw(size)
  if image.shape[:2] == (h, w):
    return image
  if image.dtype != np.uint8 or image.ndim != 3:
    raise ValueError(f'resize_image expects uint8 [H, W, C], got '
                     f'{image.dtype} {image.shape}.')
  if image.shape[-1] == 3:
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
  return np.stack([np.asarray(Image.fromarray(image[..., c]).resize(
      (w, h), Image.BILINEAR)) for c in range(image.shape[-1])], axis=-1)


def resize_mask(mask: np.ndarray, size) -> np.ndarray:
  """Returns `[H, W]` (any dtype) resized to `size` by nearest neighbour.

  Output pixel centres sample the input at the same relative position as
  Pillow's image resize, so mask and image stay aligned.
  """
  h, w = as_hw(size)
  if mask.shape[:2] == (h, w):
    return mask
  rows = ((np.arange(h) + 0.5) * (mask.shape[0] / h)).astype(np.int64)
  cols = ((np.arange(w) + 0.5) * (mask.shape[1] / w)).astype(np.int64)
  return mask[np.minimum(rows, mask.shape[0] - 1)[:, None],
              np.minimum(cols, mask.shape[1] - 1)[None, :]]


def write_mask_png(path: str, mask: np.ndarray, num_classes: int = 1,
                   label_values=()) -> None:
  """Writes class indices `[H, W]` as a PNG, atomically (`fileio.atomic_write`).

  Args:
    path: the .png file to write.
    mask: class indices 0..K-1.
    num_classes: 1 = binary, written as 0/255 like the ISIC ground truth;
      K >= 2 written as 0..K-1 (8-bit, or 16-bit beyond 256 classes).
    label_values: optional raw values in class order; class k is then
      written as `label_values[k]` (the data set's own convention).

  Raises:
    ValueError: a value outside 0..K-1.
  """
  k = max(2, int(num_classes))
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f'{path}: mask must be [H, W], got shape {mask.shape}.')
  if mask.size and (mask.min() < 0 or mask.max() >= k):
    raise ValueError(f'{path}: mask values must be classes 0..{k - 1}, got '
                     f'{int(mask.min())}..{int(mask.max())}.')
  if label_values:
    out = np.asarray([int(v) for v in label_values])[mask.astype(np.int64)]
  elif int(num_classes) <= 1:
    out = mask.astype(np.int64) * 255
  else:
    out = mask.astype(np.int64)
  out = out.astype(np.uint8 if out.max(initial=0) < 256 else np.uint16)
  with fileio.atomic_write(path, 'wb', make_dirs=False) as f:
    Image.fromarray(out).save(f, format='PNG')
