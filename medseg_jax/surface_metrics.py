"""Host-side metrics (NumPy/SciPy): surface distances, calibration, intervals.

These run on one case at a time, on the host, after prediction; they are not
jittable. Re-exported by `medseg_jax.metrics`.

Surface convention (the same as MedPy and MONAI): the surface of a binary mask
is the set of mask voxels removed by one binary erosion with the
`connectivity`-structure (default 1: face neighbours, i.e. a voxel with a
background voxel among its 2n face neighbours), with outside the image taken as
background. `connectivity=ndim` (3^n full neighbourhood) gives a thicker
surface. Distances are Euclidean, in the units of `spacing` (mm), from each
surface voxel of one mask to the nearest surface voxel of the other, computed
with `scipy.ndimage.distance_transform_edt` on the bounding box of both masks.

Empty-mask rules (all distance metrics): both masks empty -> 0.0 (HD, HD95,
ASSD) and 1.0 (NSD), since the prediction is exactly right; exactly one empty
-> inf (HD, HD95, ASSD, as MONAI) and 0.0 (NSD). MONAI returns NaN where both
are empty; filter such cases before averaging if you need its convention.
"""

from collections.abc import Sequence
from concurrent import futures

import numpy as np
from scipy import ndimage
from scipy import stats

CONVENTIONS = ('monai', 'medpy')


# ---------------------------------------------------------- surfaces/distances


def _spacing(spacing, ndim: int) -> tuple[float, ...]:
  """Returns `spacing` as ndim positive floats (None -> all 1.0)."""
  if spacing is None:
    return (1.0,) * ndim
  values = tuple(float(s) for s in np.broadcast_to(spacing, (ndim,)))
  if not all(s > 0 for s in values):
    raise ValueError(f'spacing must be positive, got {spacing}.')
  return values


def _pair(pred, truth) -> tuple[np.ndarray, np.ndarray]:
  """Returns both masks as bool arrays (nonzero = foreground), same shape."""
  pred, truth = np.asarray(pred) != 0, np.asarray(truth) != 0
  if pred.shape != truth.shape:
    raise ValueError(f'pred shape {pred.shape} must equal truth shape '
                     f'{truth.shape}.')
  if pred.ndim < 1:
    raise ValueError('pred and truth must be arrays with at least one axis.')
  return pred, truth


def surface_voxels(mask, connectivity: int = 1) -> np.ndarray:
  """Returns the bool surface of a binary mask (see the module docstring).

  Args:
    mask: binary array, any number of dimensions (nonzero = foreground).
    connectivity: 1 (face neighbours, MedPy/MONAI) up to mask.ndim (full).
  """
  mask = np.asarray(mask) != 0
  structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
  return mask & ~ndimage.binary_erosion(mask, structure, border_value=0)


def _union_box(pred, truth) -> tuple[slice, ...]:
  """Bounding box of pred | truth, grown by one voxel (within the image).

  Cropping to it changes no surface voxel (the margin is background or the
  image edge) and no distance (every surface voxel lies inside it).
  """
  box = []
  union = pred | truth
  for axis in range(union.ndim):
    other = tuple(a for a in range(union.ndim) if a != axis)
    idx = np.flatnonzero(union.any(axis=other))
    box.append(slice(max(idx[0] - 1, 0), idx[-1] + 2))
  return tuple(box)


def surface_distances(pred, truth, spacing=None, connectivity: int = 1):
  """Returns directed surface distances (pred -> truth, truth -> pred).

  Args:
    pred, truth: binary masks of one case, same shape, 2D or 3D (or nD).
    spacing: voxel size per axis (mm), a scalar or one value per axis.
    connectivity: surface definition, see `surface_voxels`.

  Returns:
    (d_pred, d_truth): float64 arrays; d_pred[i] is the distance from the i-th
    surface voxel of `pred` to the nearest surface voxel of `truth`, and the
    other way round. If the other mask is empty, the distances are inf; an
    empty mask has an empty distance array.
  """
  pred, truth = _pair(pred, truth)
  sampling = _spacing(spacing, pred.ndim)
  if not (pred.any() and truth.any()):
    inf = lambda m: np.full(int(surface_voxels(m, connectivity).sum()), np.inf)
    return inf(pred), inf(truth)
  box = _union_box(pred, truth)
  s_pred = surface_voxels(pred[box], connectivity)
  s_truth = surface_voxels(truth[box], connectivity)
  # The two transforms are independent and SciPy releases the GIL in them.
  with futures.ThreadPoolExecutor(2) as pool:
    d_pred = pool.submit(_distances_to, s_truth, s_pred, sampling)
    d_truth = pool.submit(_distances_to, s_pred, s_truth, sampling)
    return d_pred.result(), d_truth.result()


def _distances_to(targets, queries, sampling) -> np.ndarray:
  """Distance from each `queries` voxel to the nearest `targets` voxel.

  Uses the feature transform of distance_transform_edt (nearest target index
  per voxel) and measures distances at the query voxels only.
  """
  nearest = ndimage.distance_transform_edt(
      ~targets, sampling=sampling, return_distances=False, return_indices=True)
  where = np.nonzero(queries)
  offsets = [(nearest[axis][where] - where[axis]) * sampling[axis]
             for axis in range(queries.ndim)]
  return np.sqrt(sum(np.square(o, dtype=np.float64) for o in offsets))


def _check_convention(convention: str) -> None:
  if convention not in CONVENTIONS:
    raise ValueError(f'convention must be one of {CONVENTIONS}, got '
                     f'{convention!r}.')


def _hausdorff(d_pred, d_truth, percentile, convention) -> float:
  """Percentile Hausdorff from directed distances (both non-empty)."""
  if convention == 'medpy':
    return float(np.percentile(np.concatenate([d_pred, d_truth]), percentile))
  return float(max(np.percentile(d_pred, percentile),
                   np.percentile(d_truth, percentile)))


def _assd(d_pred, d_truth, convention) -> float:
  """Average symmetric surface distance from directed distances."""
  if convention == 'medpy':
    return float((d_pred.mean() + d_truth.mean()) / 2)
  return float(np.concatenate([d_pred, d_truth]).mean())


def _nsd(d_pred, d_truth, tolerance_mm) -> float:
  """Normalized surface Dice from directed distances."""
  close = np.sum(d_pred <= tolerance_mm) + np.sum(d_truth <= tolerance_mm)
  return float(close / (d_pred.size + d_truth.size))


def _empty_value(d_pred, d_truth, both, one):
  """`both`/`one` when both/one of the masks are empty, else None."""
  if d_pred.size == 0 and d_truth.size == 0:
    return both
  if d_pred.size == 0 or d_truth.size == 0:
    return one
  return None


def hausdorff_distance(pred, truth, spacing=None, percentile: float = 95,
                       *, convention: str = 'monai',
                       connectivity: int = 1) -> float:
  """Returns the (percentile) Hausdorff distance between two masks, in mm.

  HD_p = max(P_p(d(S_pred -> S_truth)), P_p(d(S_truth -> S_pred))), with P_p
  the p-th percentile (numpy linear interpolation) of the directed surface
  distances: MONAI's and DeepMind's definition. percentile=100 is the classic
  (maximum) Hausdorff distance. convention='medpy' instead takes the
  percentile of both directions pooled (MedPy's `hd95`); both agree at 100.

  Args:
    pred, truth: binary masks of one case (same shape).
    spacing: voxel size per axis; None -> 1.
    percentile: in [0, 100].
    convention: 'monai' (default) or 'medpy', see above.
    connectivity: surface definition, see `surface_voxels`.

  Returns:
    The distance; 0.0 if both masks are empty, inf if exactly one is.
  """
  _check_convention(convention)
  if not 0 <= percentile <= 100:
    raise ValueError(f'percentile must be in [0, 100], got {percentile}.')
  d_pred, d_truth = surface_distances(pred, truth, spacing, connectivity)
  empty = _empty_value(d_pred, d_truth, 0.0, float('inf'))
  return empty if empty is not None else _hausdorff(d_pred, d_truth,
                                                    percentile, convention)


def average_symmetric_surface_distance(pred, truth, spacing=None, *,
                                       convention: str = 'monai',
                                       connectivity: int = 1) -> float:
  """Returns the average symmetric surface distance (ASSD), in mm.

  ASSD = (sum_{a in S_pred} d(a, S_truth) + sum_{b in S_truth} d(b, S_pred))
         / (|S_pred| + |S_truth|)
  (the classic definition; MONAI `average_surface_distance(symmetric=True)`).
  convention='medpy' instead averages the two directed means (MedPy `assd`).

  Returns:
    The distance; 0.0 if both masks are empty, inf if exactly one is.
  """
  _check_convention(convention)
  d_pred, d_truth = surface_distances(pred, truth, spacing, connectivity)
  empty = _empty_value(d_pred, d_truth, 0.0, float('inf'))
  return empty if empty is not None else _assd(d_pred, d_truth, convention)


def normalized_surface_dice(pred, truth, tolerance_mm: float, spacing=None, *,
                            connectivity: int = 1) -> float:
  """Returns the normalized surface Dice (NSD) at a tolerance, in [0, 1].

  NSD = (|{a in S_pred: d(a, S_truth) <= tau}| + |{b in S_truth: d(b, S_pred)
        <= tau}|) / (|S_pred| + |S_truth|), counting surface voxels like
  MONAI's `compute_surface_dice` (DeepMind's version weights surface elements
  by area; the two agree closely on smooth surfaces).

  Returns:
    NSD; 1.0 if both masks are empty, 0.0 if exactly one is.
  """
  if tolerance_mm < 0:
    raise ValueError(f'tolerance_mm must be >= 0, got {tolerance_mm}.')
  d_pred, d_truth = surface_distances(pred, truth, spacing, connectivity)
  empty = _empty_value(d_pred, d_truth, 1.0, 0.0)
  return empty if empty is not None else _nsd(d_pred, d_truth, tolerance_mm)


def surface_distance_metrics(pred, truth, spacing=None, *,
                             tolerance_mm: float = 1.0, percentile: float = 95,
                             convention: str = 'monai',
                             connectivity: int = 1) -> dict[str, float]:
  """Returns {'hd', 'hd95', 'assd', 'nsd'} from one distance computation.

  Same definitions and empty rules as the single-metric functions ('hd95'
  uses `percentile`, 'nsd' uses `tolerance_mm`); about three times faster
  than calling them one by one.
  """
  _check_convention(convention)
  d_pred, d_truth = surface_distances(pred, truth, spacing, connectivity)
  dist = _empty_value(d_pred, d_truth, 0.0, float('inf'))
  if dist is not None:
    nsd = 1.0 if dist == 0.0 else 0.0
    return {'hd': dist, 'hd95': dist, 'assd': dist, 'nsd': nsd}
  return {'hd': _hausdorff(d_pred, d_truth, 100, convention),
          'hd95': _hausdorff(d_pred, d_truth, percentile, convention),
          'assd': _assd(d_pred, d_truth, convention),
          'nsd': _nsd(d_pred, d_truth, tolerance_mm)}


# ------------------------------------------------------------------- ISIC


def isic_thresholded_jaccard(per_image_jaccard, threshold: float = 0.65
                            ) -> float:
  """Returns the ISIC 2018 (Task 1) thresholded Jaccard score.

  Each image scores its Jaccard J if J >= threshold and 0 otherwise; the score
  is the mean over images. NaN if there are no images.
  """
  j = np.asarray(per_image_jaccard, np.float64).ravel()
  if j.size == 0:
    return float('nan')
  return float(np.where(j >= threshold, j, 0.0).mean())


# ------------------------------------------------------------ calibration


def _confidence_and_correct(probs, labels, mask):
  """Flattens (probs, labels) to per-pixel (confidence, correct) vectors.

  Binary: probs has the shape of labels (foreground probability) or an extra
  last axis of 1; confidence = max(p, 1 - p), prediction = p > 0.5.
  Multi-class: probs [..., K] with K >= 2; confidence = max_k p, prediction =
  argmax.
  """
  probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
  if probs.shape == labels.shape + (1,):
    probs = probs[..., 0]
  if probs.shape == labels.shape:
    conf, pred = np.maximum(probs, 1 - probs), (probs > 0.5).astype(np.int64)
  elif probs.shape[:-1] == labels.shape:
    conf, pred = probs.max(axis=-1), probs.argmax(axis=-1)
  else:
    raise ValueError(f'probs shape {probs.shape} must be the labels shape '
                     f'{labels.shape}, optionally with a trailing class axis.')
  keep = np.ones(labels.shape, bool) if mask is None else np.asarray(mask) != 0
  return conf[keep], (pred == labels)[keep]


def reliability_bins(probs, labels, num_bins: int = 15, *, mask=None):
  """Returns the reliability diagram of pixel-wise predictions.

  Confidences are binned into `num_bins` equal bins (lo, hi] over [0, 1] (a
  confidence of exactly 0 goes to the first bin), as in Guo et al. 2017.

  Args:
    probs: probabilities, see `_confidence_and_correct` for the shapes.
    labels: integer labels (binary: 0/1).
    num_bins: number of bins.
    mask: optional; pixels where mask == 0 are left out.

  Returns:
    {'edges': [num_bins + 1], 'confidence': mean confidence per bin,
     'accuracy': fraction correct per bin (both NaN for empty bins),
     'count': pixels per bin}.
  """
  if num_bins < 1:
    raise ValueError(f'num_bins must be >= 1, got {num_bins}.')
  conf, correct = _confidence_and_correct(probs, labels, mask)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  idx = np.searchsorted(edges[1:-1], conf, side='left')
  count = np.bincount(idx, minlength=num_bins).astype(np.float64)
  mean = lambda v: np.bincount(idx, v, minlength=num_bins) / np.where(
      count > 0, count, np.nan)
  return {'edges': edges, 'confidence': mean(conf),
          'accuracy': mean(correct.astype(np.float64)), 'count': count}


def expected_calibration_error(probs, labels, num_bins: int = 15, *,
                               mask=None) -> float:
  """Returns ECE = sum_b (n_b / N) |accuracy_b - confidence_b|.

  Over the bins of `reliability_bins` (same arguments); 0.0 when no pixel.
  """
  bins = reliability_bins(probs, labels, num_bins, mask=mask)
  n = bins['count'].sum()
  if n == 0:
    return 0.0
  gap = np.abs(bins['accuracy'] - bins['confidence'])
  return float(np.nansum(bins['count'] * gap) / n)


# ------------------------------------------------------- confidence intervals


def mean_confidence_interval(values: Sequence[float],
                             confidence: float = 0.95
                            ) -> tuple[float, float, float]:
  """Returns (mean, lower, upper): the t-distribution interval of the mean.

  mean +- t_{(1 + confidence) / 2, n - 1} * s / sqrt(n), with s the sample
  standard deviation (ddof=1). NaN values (e.g. metrics of ignored empty
  cases) are dropped first; inf values are kept and make the bounds inf/NaN.
  With one value the bounds are NaN; with none everything is NaN.
  """
  if not 0 < confidence < 1:
    raise ValueError(f'confidence must be in (0, 1), got {confidence}.')
  v = np.asarray(values, np.float64).ravel()
  v = v[~np.isnan(v)]
  if v.size == 0:
    return (float('nan'),) * 3
  mean = float(v.mean())
  if v.size == 1:
    return mean, float('nan'), float('nan')
  half = stats.t.ppf((1 + confidence) / 2, v.size - 1) * v.std(ddof=1)
  half /= np.sqrt(v.size)
  return mean, float(mean - half), float(mean + half)
