"""Tests of medseg_jax.metrics (on-device counts) and the host-side metrics.

Expected values are worked out by hand in the comments, or computed by an
independent brute-force reference (explicit neighbour loops, all-pairs
distances) on arrays small enough for it.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from medseg_jax import metrics


def _close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol)


# ----------------------------------------------------------- predict/counts


def test_predict_classes():
  logits = jnp.array([[[[-1.0], [0.1]], [[2.0], [0.0]]]], jnp.bfloat16)
  np.testing.assert_array_equal(metrics.predict_classes(logits),
                                [[[0, 1], [1, 0]]])
  # sigmoid(0.1) = 0.525, sigmoid(2) = 0.881.
  np.testing.assert_array_equal(metrics.predict_classes(logits, 0.6),
                                [[[0, 0], [1, 0]]])
  multi = jnp.array([[[[0.0, 1.0, -1.0], [3.0, 1.0, 2.0]]]])
  out = metrics.predict_classes(multi)
  assert out.dtype == jnp.int32
  np.testing.assert_array_equal(out, [[[1, 0]]])


# labels / predictions of one 2x3 case with classes 0, 1, 2.
LABELS = np.array([[[0, 1, 2], [2, 2, 0]]])
PREDS = np.array([[[0, 2, 2], [1, 2, 0]]])
# Per class (tp, fp, fn, tn), counted by hand over the six pixels.
HAND = [[2, 0, 0, 4],   # class 0: (0,0), (1,2) agree
        [0, 1, 1, 4],   # class 1: predicted at (1,0), true at (0,1)
        [2, 1, 1, 2]]   # class 2: agree at (0,2), (1,1); fp (0,1); fn (1,0)


def test_confusion_counts_multiclass():
  counts = metrics.confusion_counts(PREDS, LABELS, 3)
  assert counts.shape == (1, 3, 4) and counts.dtype == jnp.float32
  np.testing.assert_array_equal(counts[0], HAND)


def test_confusion_counts_binary_mask_and_3d():
  labels = np.array([[[[1, 0], [0, 0]], [[1, 1], [0, 0]]]])  # [1, 2, 2, 2]
  preds = np.array([[[[1, 1], [0, 0]], [[0, 1], [0, 1]]]])
  counts = metrics.confusion_counts(preds, labels, 1)
  # tp: (0,0,0), (1,0,1); fp: (0,0,1), (1,1,1); fn: (1,0,0); tn: 3.
  np.testing.assert_array_equal(counts, [[[2, 2, 1, 3]]])
  mask = np.ones_like(labels)
  mask[0, 1] = 0  # drop the whole second slice
  np.testing.assert_array_equal(
      metrics.confusion_counts(preds, labels, 1, mask=mask), [[[1, 1, 0, 2]]])


def test_confusion_counts_jit_vmap_and_bad_values():
  fn = jax.jit(metrics.confusion_counts, static_argnums=2)
  np.testing.assert_array_equal(fn(PREDS, LABELS, 3)[0], HAND)
  stacked = jax.vmap(lambda p, l: metrics.confusion_counts(p, l, 3))(
      np.stack([PREDS, LABELS]), np.stack([LABELS, PREDS]))
  np.testing.assert_array_equal(stacked[0, 0], HAND)
  # Swapping prediction and truth swaps fp and fn.
  np.testing.assert_array_equal(stacked[1, 0],
                                np.array(HAND)[:, [0, 2, 1, 3]])
  with pytest.raises(ValueError, match=r'\[0, 2\] for 3 classes'):
    metrics.confusion_counts(PREDS, LABELS + 1, 3)
  with pytest.raises(ValueError, match='predictions must lie'):
    metrics.confusion_counts(PREDS + 1, LABELS, 3)
  with pytest.raises(ValueError, match='foreground is 1'):
    metrics.confusion_counts(PREDS, LABELS, 1)
  with pytest.raises(ValueError, match=r'predictions \(1, 2, 3\)'):
    metrics.confusion_counts(PREDS, LABELS[:, :1], 3)
  with pytest.raises(ValueError, match='integer class map'):
    metrics.confusion_counts(PREDS, LABELS.astype(np.float32), 3)
  # Traced: the case with a bad label gets NaN counts, the other is exact.
  bad = np.concatenate([LABELS, LABELS + 1])
  out = fn(np.concatenate([PREDS, PREDS]), bad, 3)
  np.testing.assert_array_equal(out[0], HAND)
  assert np.isnan(np.asarray(out[1])).all()


# ------------------------------------------------------------ ratios, summary


def test_ratios_from_counts():
  c = np.array([2.0, 1.0, 1.0, 2.0])  # tp, fp, fn, tn
  _close(metrics.dice_from_counts(c), 4 / 6)
  _close(metrics.iou_from_counts(c), 2 / 4)
  _close(metrics.sensitivity_from_counts(c), 2 / 3)
  _close(metrics.specificity_from_counts(c), 2 / 3)
  _close(metrics.precision_from_counts(c), 2 / 3)
  _close(metrics.accuracy_from_counts(c), 4 / 6)
  # Dice relates to IoU by D = 2 J / (1 + J) on any counts.
  rng = np.random.default_rng(0)
  many = rng.integers(0, 9, size=(5, 3, 4)).astype(np.float32)
  j = np.asarray(metrics.iou_from_counts(many))
  _close(metrics.dice_from_counts(many), 2 * j / (1 + j))


def test_empty_rules():
  both_empty = [0, 0, 0, 5]
  fp_only = [0, 2, 0, 3]
  fn_only = [0, 0, 2, 3]
  all_fg = [4, 0, 0, 0]
  for fn in (metrics.dice_from_counts, metrics.iou_from_counts):
    _close(fn(both_empty), 1.0)
    assert np.isnan(fn(both_empty, empty_value=np.nan))
    _close(fn(fp_only), 0.0)
    _close(fn(fn_only), 0.0)
  _close(metrics.sensitivity_from_counts(fp_only), 1.0)  # empty truth
  _close(metrics.precision_from_counts(fn_only), 1.0)    # empty prediction
  _close(metrics.precision_from_counts(fp_only), 0.0)
  _close(metrics.specificity_from_counts(all_fg), 1.0)   # no truth background
  _close(metrics.accuracy_from_counts([0, 0, 0, 0], empty_value=0.5), 0.5)


def test_summarize_counts():
  # Two cases, classes 0..2. Case 1 is HAND; case 2 has an empty class 1
  # (truth and prediction) and class 2 with tp 1, fp 1, fn 0.
  counts = np.array([HAND, [[3, 1, 0, 2], [0, 0, 0, 6], [1, 1, 0, 4]]],
                    np.float32)
  out = metrics.summarize_counts(counts)
  # Per-case foreground Dice: case 1: 0 and 4/6; case 2: 1 (empty) and 2/3.
  _close(out['dice'], (0 + 4 / 6 + 1 + 2 / 3) / 4)
  # Summed: class 1 (0, 1, 1, 10) -> 0; class 2 (3, 2, 1, 6) -> 6/9.
  _close(out['dice_global'], (0 + 6 / 9) / 2)
  _close(out['sensitivity'], (0 + 2 / 3 + 1 + 1) / 4)
  ignored = metrics.summarize_counts(counts, ignore_empty=True)
  _close(ignored['dice'], (0 + 4 / 6 + 2 / 3) / 3)
  with_bg = metrics.summarize_counts(jnp.asarray(counts),
                                     include_background=True)
  _close(with_bg['dice'], (1 + 0 + 4 / 6 + 6 / 7 + 1 + 2 / 3) / 6)
  assert set(out) == {f'{m}{s}' for m in metrics.METRICS_FROM_COUNTS
                      for s in ('', '_global')}
  # Binary counts (C == 1) keep their single class; nothing kept -> NaN.
  binary = metrics.summarize_counts(np.array([[[0, 0, 0, 4]]]),
                                    ignore_empty=True)
  assert np.isnan(binary['dice'])
  with pytest.raises(ValueError, match=r'\[N, C, 4\]'):
    metrics.summarize_counts(np.zeros((3, 4)))


def test_counts_sum_across_batches_exactly():
  """Counts of two half-batches add up to the counts of the whole batch."""
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 3, size=(4, 5, 6, 3))
  preds = rng.integers(0, 3, size=(4, 5, 6, 3))
  whole = metrics.confusion_counts(preds, labels, 3)
  halves = [metrics.confusion_counts(preds[s], labels[s], 3)
            for s in (slice(0, 2), slice(2, 4))]
  np.testing.assert_array_equal(np.concatenate(halves), whole)
  assert float(whole[..., :].sum()) == 4 * 5 * 6 * 3 * 3  # C cells per pixel


# ------------------------------------------------------------ surface metrics


def _brute_surface(mask, connectivity):
  """Mask voxels with an outside-or-background neighbour (explicit loops)."""
  out = np.zeros_like(mask)
  offsets = [o for o in itertools.product((-1, 0, 1), repeat=mask.ndim)
             if 0 < sum(map(abs, o)) <= connectivity]
  for idx in zip(*np.nonzero(mask)):
    for o in offsets:
      n = tuple(i + d for i, d in zip(idx, o))
      if (any(c < 0 or c >= s for c, s in zip(n, mask.shape)) or
          not mask[n]):
        out[idx] = True
        break
  return out


def _brute_directed(a, b, spacing):
  """All-pairs distances from every point of a to the nearest of b."""
  pa, pb = np.argwhere(a) * spacing, np.argwhere(b) * spacing
  return np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1)).min(axis=1)


@pytest.mark.parametrize('shape,spacing,connectivity', [
    ((9, 11), (1.0, 1.0), 1), ((9, 11), (2.0, 0.5), 2),
    ((6, 7, 5), (1.0, 1.0, 2.5), 1), ((6, 7, 5), (0.7, 1.3, 2.0), 3)])
def test_surface_metrics_match_brute_force(shape, spacing, connectivity):
  rng = np.random.default_rng(len(shape) + connectivity)
  for trial in range(3):
    pred = rng.random(shape) < 0.35
    truth = rng.random(shape) < 0.35
    if trial == 2:  # objects away from the edges: the crop is smaller
      keep = np.zeros(shape, bool)
      keep[tuple(slice(2, -1) for _ in shape)] = True
      pred, truth = pred & keep, truth & keep
    sp, st = (_brute_surface(m, connectivity) for m in (pred, truth))
    np.testing.assert_array_equal(
        metrics.surface_voxels(pred, connectivity), sp)
    d_pt, d_tp = _brute_directed(sp, st, spacing), _brute_directed(st, sp,
                                                                   spacing)
    got = metrics.surface_distances(pred, truth, spacing, connectivity)
    _close(got[0], d_pt, 1e-9)
    _close(got[1], d_tp, 1e-9)
    kw = dict(spacing=spacing, connectivity=connectivity)
    _close(metrics.hausdorff_distance(pred, truth, percentile=100, **kw),
           max(d_pt.max(), d_tp.max()))
    _close(metrics.hausdorff_distance(pred, truth, **kw),
           max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))
    pooled = np.concatenate([d_pt, d_tp])
    _close(metrics.average_symmetric_surface_distance(pred, truth, **kw),
           pooled.mean())
    _close(metrics.normalized_surface_dice(pred, truth, 1.5, **kw),
           np.mean(pooled <= 1.5))


def test_shifted_squares_2d():
  # 3x3 squares, the prediction shifted right by one. With face
  # connectivity each surface is the 8-voxel ring; 4 of the 8 ring voxels of
  # each lie on the other ring, the other 4 are one voxel away.
  truth = np.zeros((7, 7), bool)
  truth[1:4, 1:4] = True
  pred = np.roll(truth, 1, axis=1)
  assert metrics.surface_voxels(truth).sum() == 8
  _close(metrics.hausdorff_distance(pred, truth, percentile=100), 1.0)
  _close(metrics.hausdorff_distance(pred, truth), 1.0)
  _close(metrics.average_symmetric_surface_distance(pred, truth), 0.5)
  _close(metrics.normalized_surface_dice(pred, truth, 0.5), 0.5)
  _close(metrics.normalized_surface_dice(pred, truth, 1.0), 1.0)
  # Anisotropic, spacing 3 along the shift: the 3 outer-column voxels of each
  # ring are 3 mm away; the middle voxel of the inner column is 1 mm from the
  # ring voxel above it (3 mm sideways). Per direction: 0, 0, 0, 0, 1, 3, 3, 3.
  _close(metrics.hausdorff_distance(pred, truth, (1.0, 3.0), 100), 3.0)
  _close(metrics.average_symmetric_surface_distance(pred, truth, (1.0, 3.0)),
         2 * 10 / 16)


def test_single_pixels_and_conventions():
  truth = np.zeros((3, 7), bool)
  truth[1, 1] = True
  pred = truth.copy()
  pred[1, 5] = True  # a spurious pixel 4 voxels away
  # d(pred -> truth) = [0, 4], d(truth -> pred) = [0].
  _close(metrics.hausdorff_distance(pred, truth, percentile=100), 4.0)
  # MONAI: max(P95([0, 4]), P95([0])) = 0.95 * 4; MedPy: P95([0, 0, 4]):
  # rank 0.95 * 2 = 1.9 -> 0 + 0.9 * 4.
  _close(metrics.hausdorff_distance(pred, truth), 3.8)
  _close(metrics.hausdorff_distance(pred, truth, convention='medpy'), 3.6)
  # Classic/MONAI ASSD: (0 + 4 + 0) / 3; MedPy: (mean [0, 4] + 0) / 2.
  _close(metrics.average_symmetric_surface_distance(pred, truth), 4 / 3)
  _close(metrics.average_symmetric_surface_distance(pred, truth,
                                                    convention='medpy'), 1.0)
  _close(metrics.normalized_surface_dice(pred, truth, 1.0), 2 / 3)
  # Two single pixels 3 apart along an axis of spacing 2.0.
  a, b = np.zeros((8, 3), bool), np.zeros((8, 3), bool)
  a[1, 1], b[4, 1] = True, True
  _close(metrics.hausdorff_distance(a, b, (2.0, 0.5), 100), 6.0)
  _close(metrics.average_symmetric_surface_distance(a, b, 2.0), 6.0)
  with pytest.raises(ValueError, match='convention'):
    metrics.hausdorff_distance(a, b, convention='itk')


def test_shifted_cubes_3d_anisotropic():
  # 3x3x3 cubes, the prediction shifted by one voxel along z (spacing 2).
  # Each surface has 26 voxels (only the centre is interior). Per direction:
  # the 9 voxels of the outer z face are 2 mm away, the face centre next to
  # the other cube's interior is 1 mm away (in-plane), the other 16 are 0.
  truth = np.zeros((5, 5, 7), bool)
  truth[1:4, 1:4, 1:4] = True
  pred = np.roll(truth, 1, axis=2)
  spacing = (1.0, 1.0, 2.0)
  d_pred, d_truth = metrics.surface_distances(pred, truth, spacing)
  for d in (d_pred, d_truth):
    np.testing.assert_allclose(np.sort(d), [0] * 16 + [1] + [2] * 9)
  _close(metrics.hausdorff_distance(pred, truth, spacing, 100), 2.0)
  _close(metrics.hausdorff_distance(pred, truth, spacing), 2.0)
  _close(metrics.average_symmetric_surface_distance(pred, truth, spacing),
         2 * (1 + 9 * 2) / 52)
  _close(metrics.normalized_surface_dice(pred, truth, 1.0, spacing), 34 / 52)
  all_at_once = metrics.surface_distance_metrics(pred, truth, spacing,
                                                 tolerance_mm=1.0)
  _close([all_at_once[k] for k in ('hd', 'hd95', 'assd', 'nsd')],
         [2.0, 2.0, 38 / 52, 34 / 52])


def test_objects_touching_the_border():
  # The image edge counts as background: a full row is all surface.
  truth = np.zeros((4, 5), bool)
  truth[:2] = True
  assert metrics.surface_voxels(truth).sum() == 10
  pred = np.zeros((4, 5), bool)
  pred[:3] = True
  # Pred surface: rows 0 and 2 and the ends of row 1: 0 or 1 away. Truth row 1
  # middle voxels are 1 from pred rows 0/2 (pred row 1 middle is interior).
  _close(metrics.hausdorff_distance(pred, truth, percentile=100), 1.0)


def test_surface_empty_rules():
  empty = np.zeros((5, 5), bool)
  one = empty.copy()
  one[2, 2] = True
  assert metrics.hausdorff_distance(empty, empty) == 0.0
  assert metrics.average_symmetric_surface_distance(empty, empty) == 0.0
  assert metrics.normalized_surface_dice(empty, empty, 1.0) == 1.0
  for a, b in ((one, empty), (empty, one)):
    assert metrics.hausdorff_distance(a, b) == math.inf
    assert metrics.hausdorff_distance(a, b, percentile=100) == math.inf
    assert metrics.average_symmetric_surface_distance(a, b) == math.inf
    assert metrics.normalized_surface_dice(a, b, 1.0) == 0.0
    assert metrics.surface_distance_metrics(a, b)['nsd'] == 0.0
  with pytest.raises(ValueError, match='must equal truth shape'):
    metrics.hausdorff_distance(one, one[:3])
  with pytest.raises(ValueError, match='spacing must be positive'):
    metrics.hausdorff_distance(one, one, (1.0, 0.0))


# ---------------------------------------------------- ISIC, calibration, CI


def test_isic_thresholded_jaccard():
  _close(metrics.isic_thresholded_jaccard([0.5, 0.65, 0.8, 0.7]),
         (0 + 0.65 + 0.8 + 0.7) / 4)
  _close(metrics.isic_thresholded_jaccard([0.6], threshold=0.5), 0.6)
  assert np.isnan(metrics.isic_thresholded_jaccard([]))


def test_expected_calibration_error_binary():
  # Confidences 0.9, 0.9, 0.7, 0.7 (last: p = 0.3 -> predicts 0); correct
  # 1, 0, 1, 1. Bins of 0.2: (0.8, 1]: acc 1/2, conf 0.9; (0.6, 0.8]: acc 1,
  # conf 0.7. ECE = 2/4 * 0.4 + 2/4 * 0.3.
  probs = np.array([0.9, 0.9, 0.7, 0.3])
  labels = np.array([1, 0, 1, 0])
  _close(metrics.expected_calibration_error(probs, labels, num_bins=5), 0.35)
  bins = metrics.reliability_bins(probs, labels, num_bins=5)
  np.testing.assert_array_equal(bins['count'], [0, 0, 0, 2, 2])
  _close(bins['accuracy'][3:], [1.0, 0.5])
  _close(bins['confidence'][3:], [0.7, 0.9])
  assert np.isnan(bins['accuracy'][:3]).all()
  # Masked pixels drop out; a trailing class axis of 1 is accepted.
  _close(metrics.expected_calibration_error(
      probs[:, None], labels, 5, mask=[1, 0, 1, 1]), (0.1 + 2 * 0.3) / 3)


def test_expected_calibration_error_multiclass():
  # Max probs 0.6 (argmax 0, label 0: correct) and 0.5 (argmax 2, label 1:
  # wrong); 10 bins: one pixel each in (0.5, 0.6] and (0.4, 0.5].
  probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5]])
  labels = np.array([0, 1])
  _close(metrics.expected_calibration_error(probs, labels, 10),
         (0.4 + 0.5) / 2)
  with pytest.raises(ValueError, match='probs shape'):
    metrics.expected_calibration_error(probs, labels[:1])


def test_mean_confidence_interval():
  # n = 5, mean 3, s = sqrt(2.5); t_{0.975, 4} = 2.776445105 (t table).
  half = 2.776445105 * math.sqrt(2.5) / math.sqrt(5)
  mean, lo, hi = metrics.mean_confidence_interval([1, 2, 3, 4, 5])
  _close([mean, lo, hi], [3.0, 3 - half, 3 + half], 1e-8)
  # Same through SciPy's own interval helper, and a 90% level.
  values = np.array([0.81, 0.74, 0.9, 0.66, 0.88, 0.79])
  want = stats.t.interval(0.9, len(values) - 1, loc=values.mean(),
                          scale=stats.sem(values))
  _close(metrics.mean_confidence_interval(values, 0.9)[1:], want, 1e-10)
  # NaN values are dropped; one value has no interval.
  _close(metrics.mean_confidence_interval([1, np.nan, 2, 3, 4, 5]),
         [3.0, 3 - half, 3 + half], 1e-8)
  mean, lo, hi = metrics.mean_confidence_interval([0.7])
  assert mean == 0.7 and np.isnan(lo) and np.isnan(hi)
  assert all(np.isnan(metrics.mean_confidence_interval([])))
