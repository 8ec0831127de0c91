"""Per-case preprocessing of volumes: intensity normalisation and resampling.

NumPy/SciPy only, shared by the NIfTI sources (training) and prediction.
Volumes are `[D, H, W, C]` (channels last) with spacing (D, H, W) in mm.

Order (nnU-Net's): intensities are normalised on the native grid (so
statistics and the "nonzero = body" foreground come from the original voxels),
then the case is resampled to `target_spacing`.

Intensity modes (`config.data.preprocess.intensity`), all per channel:
  'zscore'      (x - mean) / std over the volume, or with `zscore_foreground`
                over the foreground (voxels nonzero in any channel, e.g. the
                brain of skull-stripped MRI); voxels outside it are set to 0.
  'percentile'  clip to the `clip_percentiles` (of the foreground with
                `zscore_foreground`), then z-score as above: robust to
                outliers (hot spots, metal).
  'ct'          clip to `ct_window` (HU), then map the window linearly to
                [-1, 1]: (x - centre) / half_width. One fixed scale for every
                case, as CT intensities are calibrated.
  'suv'         PET in standardised uptake values (body weight): the
                reader multiplied each DICOM PET series by its
                `dicom_series.suv_factor` (from the tags); values are kept
                as they are, a calibrated scale like HU.
  'none'        unchanged (as float32).

Registration (`register_to` = a channel index, -1 off): every other channel
is registered to that one (`register_kind`, `register_metric`) by
`medseg_jax.register_cases`, which computes the transforms with JAX; data
code only applies them (`apply_channel_transforms`, SciPy), before the
intensities are normalised.

Resampling (`target_spacing`, (D, H, W) mm; () keeps the native spacing; an
entry <= 0 keeps that axis): the new shape is `resampled_shape`, i.e.
round(n * spacing / target) voxels per axis (ties to even, at least 1); the
field of view is kept, so the returned spacing is n * spacing / new_n, equal
to the target up to that rounding. Images use spline order
`resample_order` (1 linear by default, 3 cubic), labels nearest neighbour.
"""

from collections.abc import Sequence
import numpy as np
from scipy import ndimage

INTENSITY_MODES = ('zscore', 'percentile', 'ct', 'suv', 'none')
# `registration.KINDS` / `METRICS`, repeated: data code imports no JAX.
REGISTER_KINDS = ('rigid', 'affine')
REGISTER_METRICS = ('mattes_mi', 'ncc')
DEFAULTS = dict(intensity='zscore', zscore_foreground=False,
                ct_window=(-1000.0, 1000.0), clip_percentiles=(0.5, 99.5),
                target_spacing=(), resample_order=1, register_to=-1,
                register_kind='rigid', register_metric='mattes_mi')
_MIN_STD = 1e-8


def options(preprocess_cfg) -> dict:
  """Returns the preprocessing options with defaults for missing keys.

  Args:
    preprocess_cfg: `config.data.preprocess` (ConfigDict or dict) or None.

  Returns:
    A plain dict with every key of `DEFAULTS`, tuples as tuples of floats.

  Raises:
    ValueError: unknown intensity mode or malformed values (names the key).
  """
  cfg = dict(DEFAULTS)
  if preprocess_cfg is not None:
    cfg.update({k: preprocess_cfg[k] for k in preprocess_cfg.keys()})
  key = 'config.data.preprocess'
  if cfg['intensity'] not in INTENSITY_MODES:
    raise ValueError(f'{key}.intensity={cfg["intensity"]!r} is not one of '
                     f'{INTENSITY_MODES}.')
  cfg['ct_window'] = tuple(float(v) for v in cfg['ct_window'])
  if len(cfg['ct_window']) != 2 or cfg['ct_window'][0] >= cfg['ct_window'][1]:
    raise ValueError(f'{key}.ct_window={cfg["ct_window"]} must be (low, high) '
                     'HU with low < high.')
  cfg['clip_percentiles'] = tuple(float(v) for v in cfg['clip_percentiles'])
  lo, hi = (cfg['clip_percentiles'] + (0.0, 0.0))[:2]
  if len(cfg['clip_percentiles']) != 2 or not 0 <= lo < hi <= 100:
    raise ValueError(f'{key}.clip_percentiles={cfg["clip_percentiles"]} must '
                     'be (low, high) with 0 <= low < high <= 100.')
  cfg['target_spacing'] = tuple(float(v) for v in cfg['target_spacing'])
  if cfg['target_spacing'] and len(cfg['target_spacing']) != 3:
    raise ValueError(f'{key}.target_spacing={cfg["target_spacing"]} must be () '
                     'or three sizes in mm, (D, H, W) order.')
  if int(cfg['resample_order']) not in range(6):
    raise ValueError(f'{key}.resample_order={cfg["resample_order"]} must be a '
                     'spline order 0..5 (1 linear, 3 cubic).')
  cfg['resample_order'] = int(cfg['resample_order'])
  cfg['zscore_foreground'] = bool(cfg['zscore_foreground'])
  if int(cfg['register_to']) < -1:
    raise ValueError(f'{key}.register_to={cfg["register_to"]} must be a '
                     'channel index (0, 1, ...) or -1 (no registration).')
  cfg['register_to'] = int(cfg['register_to'])
  for name, allowed in (('register_kind', REGISTER_KINDS),
                        ('register_metric', REGISTER_METRICS)):
    if cfg[name] not in allowed:
      raise ValueError(f'{key}.{name}={cfg[name]!r} is not one of {allowed}.')
  return cfg


def apply_channel_transforms(image: np.ndarray, spacing: Sequence[float],
                             matrices) -> np.ndarray:
  """Resamples channels of `[*spatial, C]` by their registration transforms.

  Args:
    image: `[*spatial, C]`.
    spacing: its voxel size per spatial axis (mm).
    matrices: one entry per channel: None (kept, e.g. the reference) or a
      homogeneous matrix mapping reference physical coordinates (index x
      spacing, array-axis order) to that channel's (`registration.register`'s
      `.matrix`).

  Returns:
    float32 `[*spatial, C]`: channel c sampled (linear) at matrix_c @ x for
    every voxel x; points outside the volume take the channel's minimum (its
    background: 0 in skull-stripped MRI, air in CT).
  """
  image = np.asarray(image, np.float32)
  ndim = image.ndim - 1
  if len(matrices) != image.shape[-1]:
    raise ValueError(f'{len(matrices)} registration transform(s) for an image '
                     f'of {image.shape[-1]} channel(s).')
  s = np.asarray(spacing, np.float64)
  out = image.copy()
  for c, matrix in enumerate(matrices):
    if matrix is None:
      continue
    matrix = np.asarray(matrix, np.float64)
    # Index space: i_moving = S^-1 (A (S i_fixed) + t).
    linear = matrix[:ndim, :ndim] * s[None, :] / s[:, None]
    channel = image[..., c]
    out[..., c] = ndimage.affine_transform(
        channel, linear, offset=matrix[:ndim, ndim] / s, order=1,
        mode='constant', cval=float(channel.min()), output=np.float32)
  return out


def foreground_mask(image: np.ndarray) -> np.ndarray:
  """Returns bool `[*spatial]`: voxels nonzero in any channel of the image."""
  return np.any(image != 0, axis=-1)


def zscore(image: np.ndarray, foreground: np.ndarray | None = None
           ) -> np.ndarray:
  """Z-scores each channel of `[..., C]`.

  Args:
    image: float array `[*spatial, C]`.
    foreground: optional bool `[*spatial]`; statistics come from these voxels
      only and voxels outside are set to 0 (nnU-Net's nonzero-mask scheme).
      An empty foreground falls back to the whole volume.

  Returns:
    float32 `[*spatial, C]`; a constant channel becomes 0 (mean removed only).
  """
  image = np.asarray(image, np.float32)
  use = foreground if foreground is not None and foreground.any() else None
  out = np.empty_like(image)
  for c in range(image.shape[-1]):
    channel = image[..., c]
    values = channel[use] if use is not None else channel
    mean = float(values.mean(dtype=np.float64))
    std = float(values.std(dtype=np.float64))
    out[..., c] = (channel - np.float32(mean)) / np.float32(max(std, _MIN_STD))
  if use is not None:
    out[~use] = 0.0
  return out


def percentile_clip(image: np.ndarray, percentiles: Sequence[float],
                    foreground: np.ndarray | None = None) -> np.ndarray:
  """Clips each channel of `[..., C]` to its (low, high) percentiles.

  Args:
    image: float array `[*spatial, C]`.
    percentiles: (low, high) in [0, 100].
    foreground: optional bool `[*spatial]`: percentiles of these voxels only.

  Returns:
    float32 `[*spatial, C]`.
  """
  image = np.asarray(image, np.float32)
  use = foreground if foreground is not None and foreground.any() else None
  out = np.empty_like(image)
  for c in range(image.shape[-1]):
    channel = image[..., c]
    values = channel[use] if use is not None else channel
    lo, hi = np.percentile(values, percentiles)
    out[..., c] = np.clip(channel, lo, hi)
  return out


def ct_window(image: np.ndarray, window: Sequence[float]) -> np.ndarray:
  """Clips to the HU window (low, high) and maps it linearly onto [-1, 1].

  Returns:
    float32, (clip(x, low, high) - (low + high) / 2) / ((high - low) / 2).
  """
  lo, hi = float(window[0]), float(window[1])
  out = np.clip(np.asarray(image, np.float32), lo, hi)
  out -= np.float32((lo + hi) / 2)
  out *= np.float32(2 / (hi - lo))
  return out


def normalize_intensity(image: np.ndarray, cfg: dict) -> np.ndarray:
  """Applies the intensity mode of `cfg` (see `options`) to `[D, H, W, C]`."""
  mode = cfg['intensity']
  if mode in ('none', 'suv'):  # SUV: converted when read (module docstring).
    return np.asarray(image, np.float32)
  if mode == 'ct':
    return ct_window(image, cfg['ct_window'])
  fg = foreground_mask(image) if cfg['zscore_foreground'] else None
  if mode == 'percentile':
    image = percentile_clip(image, cfg['clip_percentiles'], fg)
  return zscore(image, fg)


def resampled_shape(shape: Sequence[int], spacing: Sequence[float],
                    target_spacing: Sequence[float]) -> tuple[int, ...]:
  """Returns the shape after resampling `shape` from `spacing` to the target.

  Args:
    shape: spatial shape (D, H, W).
    spacing: its voxel size in mm.
    target_spacing: () (keep) or one size per axis; entries <= 0 keep that
      axis.

  Returns:
    round(n * spacing / target) per axis (ties to even), at least 1.
  """
  if not target_spacing:
    return tuple(int(n) for n in shape)
  return tuple(
      int(n) if t <= 0 else max(1, int(round(n * float(s) / float(t))))
      for n, s, t in zip(shape, spacing, target_spacing))


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
  """Source index of each output voxel centre (same field of view)."""
  centres = (np.arange(n_out) + 0.5) * (n_in / n_out)
  return np.minimum(np.floor(centres).astype(np.intp), n_in - 1)


def resample_to_shape(array: np.ndarray, shape: Sequence[int],
                      order: int = 1) -> np.ndarray:
  """Resamples the spatial axes of an image, mask or probability map.

  The field of view is kept: voxel centres of the output are spread over the
  same extent as the input's (scipy `grid_mode=True`), which is what
  `resampled_shape` assumes and what undoes a resampling exactly in extent.

  Args:
    array: `[*spatial]` or `[*spatial, C]` (channels last when
      `array.ndim == len(shape) + 1`).
    shape: the output spatial shape.
    order: 0 nearest neighbour (labels; dtype kept), >= 1 spline order
      (images, probabilities; float32 out).

  Returns:
    The resampled array `[*shape]` or `[*shape, C]`.
  """
  shape = tuple(int(s) for s in shape)
  channels = array.ndim == len(shape) + 1
  if array.ndim not in (len(shape), len(shape) + 1):
    raise ValueError(f'Cannot resample an array of shape {array.shape} to the '
                     f'spatial shape {shape}.')
  spatial = array.shape[:len(shape)]
  if spatial == shape:
    return array if order == 0 else np.asarray(array, np.float32)
  if order == 0:
    index = np.ix_(*[_nearest_indices(a, b) for a, b in zip(spatial, shape)])
    return array[index]
  factors = [b / a for a, b in zip(spatial, shape)]
  src = np.asarray(array, np.float32)
  if not channels:
    src = src[..., None]
  out = np.empty(shape + (src.shape[-1],), np.float32)
  for c in range(src.shape[-1]):
    out[..., c] = ndimage.zoom(src[..., c], factors, order=order,
                               mode='nearest', grid_mode=True,
                               output=np.float32)
  return out if channels else out[..., 0]


def preprocess_case(image: np.ndarray, mask: np.ndarray | None,
                    spacing: Sequence[float], preprocess_cfg
                    ) -> tuple[np.ndarray, np.ndarray | None, tuple]:
  """Normalises and resamples one case as `config.data.preprocess` says.

  Args:
    image: `[D, H, W, C]` (or `[D, H, W]`, one channel), any real dtype.
    mask: class indices `[D, H, W]` or None (prediction).
    spacing: (D, H, W) voxel size in mm.
    preprocess_cfg: `config.data.preprocess` (dict/ConfigDict/None; see
      `options`).

  Returns:
    (image float32 `[D', H', W', C]`, mask uint8 `[D', H', W']` or None,
    spacing (D', H', W') in mm after resampling, as floats).

  Raises:
    ValueError: bad options, or mask and image of different spatial shapes.
  """
  cfg = options(preprocess_cfg)
  image = np.asarray(image)
  if image.ndim == 3:
    image = image[..., None]
  if image.ndim != 4:
    raise ValueError(f'preprocess_case expects an image [D, H, W, C]; got '
                     f'shape {image.shape}.')
  if mask is not None and tuple(mask.shape) != image.shape[:3]:
    raise ValueError(f'Mask shape {mask.shape} differs from the image\'s '
                     f'spatial shape {image.shape[:3]}.')
  if not np.isfinite(image).all():
    raise ValueError('The image has non-finite values (NaN or inf); fix or '
                     'exclude this case.')
  spacing = tuple(float(s) for s in spacing)
  image = normalize_intensity(image, cfg)
  shape = resampled_shape(image.shape[:3], spacing, cfg['target_spacing'])
  if shape != image.shape[:3]:
    new_spacing = tuple(s if m == n else n * s / m for n, s, m in
                        zip(image.shape[:3], spacing, shape))
    image = resample_to_shape(image, shape, cfg['resample_order'])
    if mask is not None:
      mask = resample_to_shape(mask, shape, order=0)
    spacing = new_spacing
  if mask is not None:
    mask = np.asarray(mask).astype(np.uint8, copy=False)
  return np.ascontiguousarray(image, np.float32), mask, spacing
