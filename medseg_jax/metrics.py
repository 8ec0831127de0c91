"""Segmentation metrics: jittable confusion counts and the one reducer.

On device (pure, jittable, vmappable, float32):

  logits [B, *spatial, K] --probabilities--> probs [B, *spatial, K]
  logits or probs         --predict_classes / labels_from_probabilities-->
                             predictions [B, *spatial] (int32)
  (predictions, labels)   --confusion_counts--> counts [B, C, 4]: tp, fp, fn, tn
  counts [..., 4]         --dice_from_counts etc.--> metric [...]
  counts [N, C, 4]        --case_metric_sums--> additive sums (add over batches)
  sums                    --summarize_sums--> {'dice', 'dice_std',
                                               'dice_global', ...}

`probabilities` holds the project's one probability rule: K == 1 is binary
with a sigmoid, K >= 2 a softmax over the classes. `CASE_METRICS` is the one
list of per-case metric names; training logs and evaluation reports use it.

Counts are sums, so counts from several devices or batches add up exactly
(they are accumulated in int32, then cast to float32: exact below 2**24
voxels per case and class, relative error <= 6e-8 above). Turn them into ratios
only once, after summing. For K == 1 (binary, sigmoid) C == 1, the foreground;
for K >= 2, C == K and class 0 is the background, which the reducers drop
unless asked to keep it.

NaN in, NaN out: NaN counts (a label or prediction out of range under jit)
give NaN for every metric and every mean they enter; they never take an empty
mask's value.

Host side (NumPy/SciPy): surface distances live in `surface_metrics`,
calibration in `calibration`, confidence intervals and the ISIC score in
`statistics`; they are re-exported here for `from medseg_jax import metrics`.
"""

from collections.abc import Mapping
import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from medseg_jax.calibration import (  # pylint: disable=unused-import
    expected_calibration_error, reliability_bins)
from medseg_jax.statistics import (  # pylint: disable=unused-import
    isic_thresholded_jaccard, mean_confidence_interval)
from medseg_jax.surface_metrics import (  # pylint: disable=unused-import
    average_symmetric_surface_distance, hausdorff_distance,
    normalized_surface_dice, surface_distance_metrics, surface_distances,
    surface_voxels)

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


# ----------------------------------------------------- probabilities, labels


def probabilities(logits):
  """Returns class probabilities: the project's one probability rule.

  Args:
    logits: `[..., K]`, any float dtype; NumPy or JAX.

  Returns:
    float32 `[..., K]`: K == 1, the sigmoid (the single channel is the
    foreground probability); K >= 2, the softmax over the last axis. NumPy in,
    NumPy out (the host stays on the host); jittable.
  """
  if isinstance(logits, (np.ndarray, np.generic)):
    x = np.asarray(logits, np.float32)
    if x.shape[-1] == 1:
      return special.expit(x)
    return special.softmax(x, axis=-1).astype(np.float32)
  x = jnp.asarray(logits).astype(jnp.float32)
  return jax.nn.sigmoid(x) if x.shape[-1] == 1 else jax.nn.softmax(x, axis=-1)


def labels_from_probabilities(probs, threshold: float = 0.5):
  """Returns the int32 label map `[...]` of probabilities `[..., K]`.

  Args:
    probs: `probabilities` output, NumPy or JAX.
    threshold: K == 1: a pixel is foreground when p > threshold. Ignored for
      K >= 2 (argmax over classes).

  Returns:
    int32 `[...]`, NumPy for NumPy input; jittable.
  """
  xp = np if isinstance(probs, (np.ndarray, np.generic)) else jnp
  if probs.shape[-1] == 1:
    return (probs[..., 0] > threshold).astype(xp.int32)
  return xp.argmax(probs, axis=-1).astype(xp.int32)


def predict_classes(logits, threshold: float = 0.5):
  """Returns the predicted class map of logits.

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
  probs = probabilities(jnp.asarray(logits))
  return labels_from_probabilities(probs, threshold)


# ------------------------------------------------------------- on-device counts


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
  """numerator / denominator; `empty_value` where the denominator is 0.

  NaN counts give NaN: `nan > 0` is False, so without the last line a NaN
  case would take `empty_value` (a perfect 1.0 by default).
  """
  safe = jnp.where(denominator > 0, denominator, 1.0)
  value = jnp.where(denominator > 0, numerator / safe, empty_value)
  return jnp.where(jnp.isnan(numerator) | jnp.isnan(denominator), jnp.nan,
                   value)


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
  truth -> 0. NaN counts -> NaN (as for every `*_from_counts`).
  """
  tp, fp, fn, _ = _split(counts)
  return _ratio(2 * tp, 2 * tp + fp + fn, empty_value)


def iou_from_counts(counts, *, empty_value: float = 1.0):
  """IoU (Jaccard) = tp / (tp + fp + fn); same empty and NaN rules as Dice."""
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
  """Accuracy = (tp + tn) / (tp + fp + fn + tn); no pixel -> `empty_value`.

  Not in `CASE_METRICS`: on segmentation it mostly measures the background.
  """
  tp, fp, fn, tn = _split(counts)
  return _ratio(tp + tn, tp + fp + fn + tn, empty_value)


# The one list of per-case overlap metrics (training logs, reports, plots),
# in report order, each mapping counts -> value.
METRICS_FROM_COUNTS = {
    'dice': dice_from_counts,
    'iou': iou_from_counts,
    'sensitivity': sensitivity_from_counts,
    'specificity': specificity_from_counts,
    'precision': precision_from_counts,
}
CASE_METRICS = tuple(METRICS_FROM_COUNTS)


# ----------------------------------------------------------- the one reducer


def _scored_classes(counts, include_background: bool):
  """Drops the background class of multi-class counts unless asked not to."""
  if counts.shape[-2] > 1 and not include_background:
    return counts[..., 1:, :]
  return counts


def _has_truth(counts):
  """True where tp + fn > 0 or the counts are NaN (NaN must stay visible)."""
  truth = counts[..., 0] + counts[..., 2]
  return (truth > 0) | jnp.isnan(truth)


def _mean_where(values, keep, axis=None):
  """Mean of `values` where `keep` (NaN values kept propagate); NaN if none."""
  keep = jnp.broadcast_to(keep, values.shape)
  n = keep.sum(axis=axis)
  total = jnp.where(keep, values, 0.0).sum(axis=axis)
  return jnp.where(n > 0, total / jnp.where(n > 0, n, 1), jnp.nan)


def case_metric_sums(counts, valid=None, *, include_background: bool = False,
                     ignore_empty: bool = False) -> dict[str, jax.Array]:
  """Returns additive sums of per-case metrics: add them over batches/devices.

  A case's value of a metric is the mean over its scored classes (MONAI's
  reduction='mean': classes within a case first, then cases). Scored classes
  are the foreground (class 0 dropped for C >= 2 unless include_background);
  with ignore_empty, a class whose truth is empty in that case (tp + fn == 0)
  is not scored, and a case with no scored class is left out, like MONAI's
  `ignore_empty=True`. Otherwise empty masks follow the `*_from_counts` rules
  (e.g. truth and prediction both empty -> Dice 1). NaN counts are always
  scored, so they reach the means as NaN.

  Args:
    counts: [N, C, 4] per-case counts (`confusion_counts`).
    valid: optional [N]; cases with valid == 0 (batch padding) add nothing,
      whatever their counts.
    include_background: score class 0 when C >= 2.
    ignore_empty: see above.

  Returns:
    {'num_cases': valid cases, 'num_scored': valid cases with a scored class,
     'counts': [C', 4] counts of the scored classes summed over valid cases,
     'counts_scored': [C'] how many valid cases scored each class,
     name + '_sum', name + '_sq_sum': per-case values and their squares
     summed over scored cases, for name in CASE_METRICS}; float32.
  """
  counts = jnp.asarray(counts, jnp.float32)
  if counts.ndim != 3 or counts.shape[-1] != 4:
    raise ValueError('case_metric_sums: counts must be [N, C, 4], got shape '
                     f'{tuple(counts.shape)}.')
  counts = _scored_classes(counts, include_background)
  valid = (jnp.ones(counts.shape[0], bool) if valid is None else
           jnp.asarray(valid) != 0)
  scored = valid[:, None] & (_has_truth(counts) | (not ignore_empty))
  case_scored = scored.any(axis=1)
  sums = {'num_cases': valid.sum().astype(jnp.float32),
          'num_scored': case_scored.sum().astype(jnp.float32),
          'counts': jnp.where(valid[:, None, None], counts, 0.0).sum(axis=0),
          'counts_scored': scored.sum(axis=0).astype(jnp.float32)}
  for name, fn in METRICS_FROM_COUNTS.items():
    per_case = jnp.where(case_scored, _mean_where(fn(counts), scored, axis=1),
                         0.0)
    sums[f'{name}_sum'] = per_case.sum()
    sums[f'{name}_sq_sum'] = (per_case**2).sum()
  return sums


def summarize_sums(sums, *, ignore_empty: bool = False) -> dict[str, float]:
  """Turns `case_metric_sums` (summed over batches) into the reported metrics.

  Args:
    sums: the dict of `case_metric_sums`, possibly added up over batches and
      devices; NumPy or JAX.
    ignore_empty: as given to `case_metric_sums`; for the global values, also
      leaves out classes with no truth in the whole set.

  Returns:
    {'num_cases', 'num_scored', and for name in CASE_METRICS: name (mean over
     scored cases of the per-case value), name + '_std' (population standard
     deviation over those cases), name + '_global' (the metric of the counts
     summed over cases, averaged over the scored classes)}, Python floats. A
     mean over nothing is NaN, and NaN counts anywhere make the means NaN.
  """
  n = float(sums['num_scored'])
  out = {'num_cases': float(sums['num_cases']), 'num_scored': n}
  global_values = jax.device_get(_global_values(
      sums['counts'], sums['counts_scored'], ignore_empty))
  for name in METRICS_FROM_COUNTS:
    mean = float(sums[f'{name}_sum']) / n if n else float('nan')
    var = float(sums[f'{name}_sq_sum']) / n - mean**2 if n else float('nan')
    out[name] = mean
    out[f'{name}_std'] = max(var, 0.0)**0.5 if not np.isnan(var) else var
    out[f'{name}_global'] = float(global_values[name])
  return out


@functools.partial(jax.jit, static_argnums=2)
def _global_values(counts, counts_scored, ignore_empty: bool):
  """{name: metric of the summed counts, mean over the kept classes}."""
  counts = jnp.asarray(counts, jnp.float32)
  keep = jnp.asarray(counts_scored) > 0
  if ignore_empty:
    keep = keep & _has_truth(counts)
  return {name: _mean_where(fn(counts), keep)
          for name, fn in METRICS_FROM_COUNTS.items()}


def summarize_counts(counts, *, include_background: bool = False,
                     ignore_empty: bool = False) -> Mapping[str, float]:
  """Reduces per-case counts [N, C, 4] to the reported metrics.

  The same reduction as evaluation during training: `summarize_sums` of
  `case_metric_sums` (see both for the rules: classes averaged within a case
  first, then cases, as MONAI's reduction='mean'; `ignore_empty` as MONAI's).

  Args:
    counts: [N, C, 4] per-case counts, NumPy or JAX.
    include_background: score class 0 when C >= 2.
    ignore_empty: leave out (case, class) pairs with empty truth.

  Returns:
    The dict of `summarize_sums`.
  """
  # Jitted: op by op, the reduction takes about a second on the host.
  sums = _case_metric_sums_jit(jnp.asarray(counts, jnp.float32),
                               include_background=include_background,
                               ignore_empty=ignore_empty)
  return summarize_sums(sums, ignore_empty=ignore_empty)


_case_metric_sums_jit = jax.jit(
    case_metric_sums, static_argnames=('include_background', 'ignore_empty'))
