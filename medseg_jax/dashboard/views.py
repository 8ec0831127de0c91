"""What the dashboard draws: thresholded labels, overlays, slices, heat maps.

Pure NumPy on cached predictions: moving a slider re-runs these, never the
model. Images are uint8 RGB `[H, W, 3]`.
"""

import matplotlib
import numpy as np
from PIL import Image
from scipy import ndimage

from medseg_jax import gradcam
from medseg_jax import inference
from medseg_jax import postprocess
from medseg_jax.data import preprocess

# Class colours (class 1 first): distinct on skin, grey MRI and CT, and
# still apart for the common colour-vision deficiencies (Okabe-Ito).
PALETTE = ((230, 57, 70), (0, 158, 115), (240, 228, 66), (0, 114, 178),
           (230, 159, 0), (86, 180, 233), (204, 121, 167), (120, 94, 240))
# Views of a volume [D, H, W]: the axis a slice is taken along.
AXES = {'axial': 0, 'coronal': 1, 'sagittal': 2}


def class_colour(k: int) -> tuple[int, int, int]:
  """Returns the RGB colour of foreground class k >= 1 (cycling)."""
  return PALETTE[(k - 1) % len(PALETTE)]


def default_threshold(config) -> float:
  """Returns the slider's start (K = 1: the run's threshold; else 0)."""
  return float(config.eval.threshold) if config.data.num_classes <= 1 else 0.0


def labels_at(probabilities: np.ndarray, threshold: float,
              post_cfg=None) -> np.ndarray:
  """Returns the label map of cached probabilities at a confidence threshold.

  K = 1: foreground where p > threshold (the Predictor's rule). K >= 2: the
  argmax class, kept only where its probability is >= threshold (0 keeps
  every argmax, the Predictor's labels); other pixels become background.

  Args:
    probabilities: `[*spatial, K]` from `Prediction.probabilities`.
    threshold: in [0, 1].
    post_cfg: config.eval.postprocess, applied after thresholding (so the
      run's threshold gives exactly `Prediction.labels`), or None.

  Returns:
    int32 `[*spatial]`.
  """
  probabilities = np.asarray(probabilities, np.float32)
  labels = np.asarray(inference.labels_from_probabilities(probabilities,
                                                          threshold))
  if probabilities.shape[-1] >= 2:
    winner = np.take_along_axis(probabilities, labels[..., None], -1)[..., 0]
    labels = np.where(winner >= threshold, labels, 0).astype(np.int32)
  if post_cfg is not None:
    labels = postprocess.from_config(labels, post_cfg)
  return labels


def to_rgb(image: np.ndarray, window=None) -> np.ndarray:
  """Returns a 2D image `[H, W]` or `[H, W, C]` as uint8 RGB for display.

  Args:
    image: uint8 photographs are shown as they are; other values are
      windowed to [low, high] (default: the 0.5 and 99.5 percentiles, so a
      few bright voxels do not darken a CT or MRI slice).
    window: (low, high) to use instead, e.g. of the whole volume so every
      slice has the same grey levels.
  """
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] not in (1, 3):
    image = image[..., 0]  # Several modalities: show the first.
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.dtype != np.uint8:
    low, high = window if window is not None else intensity_window(image)
    scaled = (image.astype(np.float32) - low) / max(high - low, 1e-6)
    image = np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  return image


def intensity_window(array: np.ndarray) -> tuple[float, float]:
  """Returns the (0.5, 99.5) percentiles of an array's first channel."""
  values = np.asarray(array, np.float32)
  if values.ndim >= 3 and values.shape[-1] <= 4:
    values = values[..., 0]
  low, high = np.percentile(values, (0.5, 99.5))
  return float(low), float(high)


def overlay(rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.4,
            outline: bool = True) -> np.ndarray:
  """Returns `rgb` with each class tinted in its colour (and outlined).

  Args:
    rgb: uint8 `[H, W, 3]`.
    labels: integer `[H, W]`, 0 = background (left as is).
    alpha: weight of the class colour inside a region.
    outline: draw each region's border in its full colour.

  Returns:
    uint8 `[H, W, 3]`.
  """
  labels = np.asarray(labels)
  if labels.shape != rgb.shape[:2]:
    raise ValueError(f'overlay: labels {labels.shape} and image '
                     f'{rgb.shape[:2]} must have the same size.')
  out = rgb.astype(np.float32)
  for k in np.unique(labels[labels > 0]):
    region = labels == k
    colour = np.asarray(class_colour(int(k)), np.float32)
    out[region] = (1 - alpha) * out[region] + alpha * colour
    if outline:
      out[region & ~ndimage.binary_erosion(region)] = colour
  return np.round(out).astype(np.uint8)


def slice_of(array: np.ndarray, axis: str, index: int) -> np.ndarray:
  """Returns slice `index` of a volume `[D, H, W, ...]` along a view axis.

  Coronal and sagittal slices are flipped upside down, so that slice 0 of
  the volume (usually the lowest) is at the bottom.
  """
  if axis not in AXES:
    raise ValueError(f'axis {axis!r}: choose one of {", ".join(AXES)}.')
  out = np.take(array, index, axis=AXES[axis])
  return out if axis == 'axial' else out[::-1]


def slice_spacing(spacing, axis: str):
  """Returns the (rows, columns) mm of a view's slices (None if unknown)."""
  if spacing is None:
    return None
  keep = [a for a in range(3) if a != AXES[axis]]
  return tuple(float(spacing[a]) for a in keep)


def physical_aspect(rgb: np.ndarray, spacing2d, max_size: int = 512
                    ) -> np.ndarray:
  """Returns `rgb` resized so that pixels are square in millimetres.

  Thick slices (coronal and sagittal views of a 5 mm series) would look
  squashed otherwise. Small images are enlarged to `max_size` (nearest), so
  voxels stay visible.
  """
  h, w = rgb.shape[:2]
  rows, cols = spacing2d if spacing2d is not None else (1.0, 1.0)
  height, width = h * rows / min(rows, cols), w * cols / min(rows, cols)
  scale = max_size / max(height, width)
  if scale < 1 and spacing2d is None:
    return rgb  # A large photograph: the browser scales it.
  size = (max(1, round(width * scale)), max(1, round(height * scale)))
  return np.asarray(Image.fromarray(rgb).resize(size, Image.NEAREST))


def heat_rgb(values: np.ndarray, high: float | None = None,
             cmap: str = 'magma') -> np.ndarray:
  """Returns a map `[H, W]` as uint8 RGB colours of `cmap` over [0, high].

  Args:
    values: non-negative values (std, entropy, probability).
    high: the value shown brightest; the map's maximum when None.
    cmap: a matplotlib colormap name.
  """
  values = np.asarray(values, np.float32)
  high = float(values.max()) if high is None else float(high)
  scaled = np.clip(values / high, 0, 1) if high > 0 else np.zeros_like(values)
  return np.round(matplotlib.colormaps[cmap](scaled)[..., :3] * 255).astype(
      np.uint8)


def uncertainty_maps(uncertainty: dict) -> dict[str, np.ndarray]:
  """Returns MC-dropout maps for display, each `[*spatial]`.

  Args:
    uncertainty: `Prediction.uncertainty` ({'mean', 'std' `[*spatial, K]`,
      'entropy' `[*spatial]`, ...}).

  Returns:
    {'mean': the foreground probability (K = 1: p; K >= 2: 1 - p of the
    background), 'std': its spread over samples (the largest over classes
    for K >= 2), 'entropy': predictive entropy in nats}.
  """
  mean, std = uncertainty['mean'], uncertainty['std']
  if mean.shape[-1] == 1:
    foreground, spread = mean[..., 0], std[..., 0]
  else:
    foreground, spread = 1.0 - mean[..., 0], std.max(axis=-1)
  return {'mean': foreground, 'std': spread,
          'entropy': uncertainty['entropy']}


def gradcam_layers(names) -> list[str]:
  """Returns the block-level layers of `gradcam.feature_layer_names`.

  Sub-layers ('X_0_0/conv1') and the output head are left out: a block's
  output is what Grad-CAM is usually read on.
  """
  return [n for n in names if '/' not in n and not n.startswith('head')]


def gradcam_heatmap(predictor, image: np.ndarray, layer: str) -> np.ndarray:
  """Returns the Grad-CAM map `[H, W]` in [0, 1] of a 2D case at its size.

  Args:
    predictor: a 2D image run's Predictor.
    image: the case as uploaded, uint8 `[H, W, C]`.
    layer: a name from `gradcam.feature_layer_names`.
  """
  heatmap = gradcam.grad_cam(
      predictor.model, predictor.variables,
      predictor.model_input(predictor.prepare(image)), layer,
      threshold=predictor.config.eval.threshold)
  heatmap = preprocess.resample_to_shape(np.asarray(heatmap, np.float32),
                                         image.shape[:2], order=1)
  return np.clip(heatmap, 0.0, 1.0)
