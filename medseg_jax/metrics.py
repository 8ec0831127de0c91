"""Segmentation metrics: jittable confusion counts, host-side surface metrics.

On device (pure, jittable, vmappable, float32):

  logits [B, *spatial, K] --predict_classes--> predictions [B, *spatial] (int32)
  (predictions, labels)   --confusion_counts--> counts [B, C, 4]: tp, fp, fn, tn
  counts [..., 4]         --dice_from_counts etc.--> metric [...]
  counts [N, C, 4]        --summarize_counts--> {'dice': .., 'dice_global': ..}

Counts are sums, so counts from several devices or batches add up exactly
(they are accumulated in int32, then cast to float32: exact below 2**24
voxels per case and class, relative error <= 6e-8 above). Turn them into ratios
only once, after summing. For K == 1 (binary, sigmoid) C == 1, the foreground;
for K >= 2, C == K and class 0 is the background, which the reducers drop
unless asked to keep it.

Host side (NumPy/SciPy, spacing-aware): Hausdorff distance, HD95, ASSD,
normalized surface Dice, ISIC thresholded Jaccard, calibration and confidence
intervals. They live in `surface_metrics` and are re-exported here.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from medseg_jax.surface_metrics import (  # pylint: disable=unused-import
    average_symmetric_surface_distance, expected_calibration_error,
    hausdorff_distance, isic_thresholded_jaccard, mean_confidence_interval,
    normalized_surface_dice, reliability_bins, surface_distance_metrics,
    surface_distances, surface_voxels)

COUNT_NAMES = ('tp', 'fp', 'fn', 'tn')


# ----------------------------------------------------------------- validation


def _is_concrete(x) -> bool:
  """True when `x` holds values (not a tracer inside jit/vmap/grad)."""
  return not isinstance(x, jax.core.Tracer)


def check_integer_map(x, name: str, where: str) -> None:
  """Raises ValueError unless `x` has an integer (or bool) dtype."""
  dtype = x.dtype
  if not (jnp.issubdtype(dtype, jnp.integer) or dtype == jnp.bool_):
    raise ValueError(
        f'{where}: {name} must be an integer class map, got dtype {dtype} '
        f'(shape {tuple(x.shape)}); cast with .astype(jnp.int32) after '
        'thresholding/rounding.')


def check_mask(mask, shape, where: str) -> None:
  """Raises ValueError unless `mask` is None or has exactly `shape`."""
  if mask is not None and tuple(mask.shape) != tuple(shape):
    raise ValueError(f'{where}: mask shape {tuple(mask.shape)} must equal the '
                     f'label shape {tuple(shape)}.')


def check_label_values(labels, num_classes: int, mask, where: str,
                       name: str = 'labels') -> None:
  """Raises ValueError if concrete `labels` lie outside the valid range.

  Valid values are 0..num_classes-1 for num_classes >= 2 and {0, 1} for
  num_classes == 1 (binary). Only pixels with mask != 0 are checked, so an
  ignore value (e.g. 255) is allowed where the mask is 0. Traced values
  (inside jit) cannot be checked here; see `labels_out_of_range`.
  """
  if not (_is_concrete(labels) and (mask is None or _is_concrete(mask))):
    return
  values = np.asarray(labels)
  if mask is not None:
    values = values[np.asarray(mask) != 0]
  if values.size == 0:
    return
  high = max(num_classes, 2) - 1
  lo, hi = int(values.min()), int(values.max())
  if lo < 0 or hi > high:
    kind = ('binary (K == 1): foreground is 1' if num_classes == 1 else
            f'{num_classes} classes')
    raise ValueError(f'{where}: {name} must lie in [0, {high}] for {kind}; '
                     f'found values in [{lo}, {hi}].')


def labels_out_of_range(labels, num_classes: int, mask=None, axes=None):
  """Returns a bool array: any valid pixel (over `axes`) has an invalid label.

  Used under jit, where values cannot raise: callers turn the result into NaN
  so that bad labels are loud instead of silently ignored.
  """
  high = max(num_classes, 2) - 1
  bad = (labels < 0) | (labels > high)
  if mask is not None:
    bad = bad & (mask != 0)
  return jnp.any(bad, axis=axes)


# ------------------------------------------------------------- on-device counts


def predict_classes(logits, threshold: float = 0.5):
  """Returns the predicted class map.

  Args:
    logits: [B, *spatial, K], any float dtype (computed in float32).
    threshold: for K == 1, a pixel is foreground when sigmoid(logit) >
      threshold. Ignored for K >= 2.

  Returns:
    int32 [B, *spatial]: K == 1 -> {0, 1}; K >= 2 -> argmax over classes.
  """
  if logits.ndim < 2:
    raise ValueError(f'predict_classes: logits must be [B, *spatial, K], got '
                     f'shape {tuple(logits.shape)}.')
  x = jnp.asarray(logits).astype(jnp.float32)
  if x.shape[-1] == 1:
    return (jax.nn.sigmoid(x[..., 0]) > threshold).astype(jnp.int32)
  return jnp.argmax(x, axis=-1).astype(jnp.int32)


def confusion_counts(predictions, labels, num_classes: int, *, mask=None):
  """Returns per-case, per-class confusion counts.

  Args:
    predictions: integer class map [B, *spatial] (e.g. `predict_classes`).
    labels: integer class map [B, *spatial], same shape.
    num_classes: K of the model. 1 -> binary (1 = foreground); >= 2 -> classes
      0..K-1 with 0 = background.
    mask: optional [B, *spatial]; pixels where mask == 0 are not counted.

  Returns:
    float32 [B, C, 4] holding (tp, fp, fn, tn) per case and class, with C == 1
    (the foreground) when num_classes == 1 and C == num_classes otherwise.
    Under jit, a case with a valid pixel whose label or prediction is out of
    range gets NaN counts (eagerly, a ValueError is raised instead).

  Raises:
    ValueError: shape mismatch, non-integer maps, num_classes < 1, or
      (concrete inputs) out-of-range values.
  """
  where = 'confusion_counts'
  if int(num_classes) < 1:
    raise ValueError(f'{where}: num_classes must be >= 1, got {num_classes}.')
  if tuple(predictions.shape) != tuple(labels.shape) or labels.ndim < 2:
    raise ValueError(f'{where}: predictions {tuple(predictions.shape)} and '
                     f'labels {tuple(labels.shape)} must both be '
                     '[B, *spatial].')
  check_integer_map(predictions, 'predictions', where)
  check_integer_map(labels, 'labels', where)
  check_mask(mask, labels.shape, where)
  check_label_values(labels, num_classes, mask, where)
  check_label_values(predictions, num_classes, mask, where, 'predictions')
  predictions, labels = jnp.asarray(predictions), jnp.asarray(labels)
  classes = jnp.arange(1, 2) if num_classes == 1 else jnp.arange(num_classes)
  pred = predictions[..., None] == classes
  true = labels[..., None] == classes
  valid = (jnp.ones(labels.shape, bool) if mask is None else
           jnp.asarray(mask) != 0)[..., None]
  axes = tuple(range(1, labels.ndim))
  count = lambda x: jnp.sum(x & valid, axis=axes, dtype=jnp.int32)
  counts = jnp.stack([count(pred & true), count(pred & ~true),
                      count(~pred & true), count(~pred & ~true)], axis=-1)
  counts = counts.astype(jnp.float32)
  bad = (labels_out_of_range(labels, num_classes, mask, axes) |
         labels_out_of_range(predictions, num_classes, mask, axes))
  return jnp.where(bad[:, None, None], jnp.nan, counts)


# ------------------------------------------------------------ counts -> ratios


def _ratio(numerator, denominator, empty_value):
  """numerator / denominator, or `empty_value` where the denominator is 0."""
  safe = jnp.where(denominator > 0, denominator, 1.0)
  return jnp.where(denominator > 0, numerator / safe, empty_value)


def _split(counts):
  counts = jnp.asarray(counts, jnp.float32)
  if counts.shape[-1:] != (4,):
    raise ValueError('counts must end in an axis of 4 (tp, fp, fn, tn), got '
                     f'shape {tuple(counts.shape)}.')
  return counts[..., 0], counts[..., 1], counts[..., 2], counts[..., 3]


def dice_from_counts(counts, *, empty_value: float = 1.0):
  """Dice = 2 tp / (2 tp + fp + fn), elementwise over counts[..., 4].

  Rule: truth and prediction both empty (denominator 0) -> `empty_value`;
  empty truth with any false positive -> 0; empty prediction with non-empty
  truth -> 0.
  """
  tp, fp, fn, _ = _split(counts)
  return _ratio(2 * tp, 2 * tp + fp + fn, empty_value)


def iou_from_counts(counts, *, empty_value: float = 1.0):
  """IoU (Jaccard) = tp / (tp + fp + fn); same empty rule as Dice."""
  tp, fp, fn, _ = _split(counts)
  return _ratio(tp, tp + fp + fn, empty_value)


def sensitivity_from_counts(counts, *, empty_value: float = 1.0):
  """Sensitivity (recall) = tp / (tp + fn); empty truth -> `empty_value`."""
  tp, _, fn, _ = _split(counts)
  return _ratio(tp, tp + fn, empty_value)


def specificity_from_counts(counts, *, empty_value: float = 1.0):
  """Specificity = tn / (tn + fp); no truth background -> `empty_value`."""
  _, fp, _, tn = _split(counts)
  return _ratio(tn, tn + fp, empty_value)


def precision_from_counts(counts, *, empty_value: float = 1.0):
  """Precision (PPV) = tp / (tp + fp); empty prediction -> `empty_value`.

  Note that an empty prediction of a non-empty truth therefore scores
  `empty_value` (its sensitivity and Dice are 0); pass empty_value=nan to
  leave such cases out of a nanmean.
  """
  tp, fp, _, _ = _split(counts)
  return _ratio(tp, tp + fp, empty_value)


def accuracy_from_counts(counts, *, empty_value: float = 1.0):
  """Accuracy = (tp + tn) / (tp + fp + fn + tn); no pixel -> `empty_value`."""
  tp, fp, fn, tn = _split(counts)
  return _ratio(tp + tn, tp + fp + fn + tn, empty_value)


METRICS_FROM_COUNTS = {
    'dice': dice_from_counts,
    'iou': iou_from_counts,
    'sensitivity': sensitivity_from_counts,
    'specificity': specificity_from_counts,
    'precision': precision_from_counts,
    'accuracy': accuracy_from_counts,
}


def _masked_mean(values, keep):
  """Mean of `values` where `keep`; NaN when nothing is kept."""
  keep = keep.astype(jnp.float32)
  n = keep.sum()
  total = jnp.where(keep > 0, values, 0.0).sum()
  return jnp.where(n > 0, total / jnp.where(n > 0, n, 1.0), jnp.nan)


def summarize_counts(counts, *, include_background: bool = False,
                     ignore_empty: bool = False) -> Mapping[str, jax.Array]:
  """Reduces per-case counts to scalar metrics.

  Args:
    counts: [N, C, 4] (tp, fp, fn, tn) per case and class, numpy or jax, e.g.
      `confusion_counts` outputs concatenated over batches.
    include_background: keep class 0 when C >= 2 (C == 1 is binary and always
      kept).
    ignore_empty: leave out (case, class) pairs whose truth is empty (tp + fn
      == 0), like MONAI's `ignore_empty`; for the global values, leave out
      classes with no truth in the whole set. Otherwise empty cases use the
      `*_from_counts` empty rules (e.g. empty truth and prediction -> Dice 1).

  Returns:
    {name: float32 scalar} for name in dice, iou, sensitivity, specificity,
    precision, accuracy: the mean over cases and kept classes of the per-case
    values (MONAI-style "mean of per-case"); and `name + '_global'`: the metric
    of the counts summed over all cases, averaged over kept classes. A mean
    over nothing (everything ignored) is NaN.
  """
  counts = jnp.asarray(counts, jnp.float32)
  if counts.ndim != 3 or counts.shape[-1] != 4:
    raise ValueError('summarize_counts: counts must be [N, C, 4], got shape '
                     f'{tuple(counts.shape)}.')
  if counts.shape[1] > 1 and not include_background:
    counts = counts[:, 1:]
  summed = counts.sum(axis=0)
  keep_case = (counts[..., 0] + counts[..., 2] > 0) | (not ignore_empty)
  keep_class = (summed[..., 0] + summed[..., 2] > 0) | (not ignore_empty)
  out = {}
  for name, fn in METRICS_FROM_COUNTS.items():
    out[name] = _masked_mean(fn(counts), keep_case)
    out[f'{name}_global'] = _masked_mean(fn(summed), keep_class)
  return out
