"""Tests of medseg_jax.metrics: probabilities, counts, ratios, the reducer.

Expected values are worked out by hand in the comments. Host-side metrics
have their own files (test_surface_metrics, test_calibration,
test_statistics).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax import metrics
from medseg_jax import steps


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
  # Classes are averaged within a case first: (1/3 + 5/6) / 2.
  _close(out['dice'], (0 + 4 / 6 + 1 + 2 / 3) / 4)
  _close(out['dice_std'], abs(1 / 3 - 5 / 6) / 2)  # population std of 2
  # Summed: class 1 (0, 1, 1, 10) -> 0; class 2 (3, 2, 1, 6) -> 6/9.
  _close(out['dice_global'], (0 + 6 / 9) / 2)
  _close(out['sensitivity'], (0 + 2 / 3 + 1 + 1) / 4)
  # ignore_empty as MONAI: case 1 scores both classes (mean 1/3), case 2
  # only class 2 (2/3); then the mean over cases, (1/3 + 2/3) / 2 = 0.5.
  # (Pooling the three (case, class) pairs would give 4/9.)
  ignored = metrics.summarize_counts(counts, ignore_empty=True)
  _close(ignored['dice'], 0.5)
  assert ignored['num_scored'] == 2
  with_bg = metrics.summarize_counts(jnp.asarray(counts),
                                     include_background=True)
  _close(with_bg['dice'], (1 + 0 + 4 / 6 + 6 / 7 + 1 + 2 / 3) / 6)
  assert set(out) == {'num_cases', 'num_scored'} | {
      f'{m}{s}' for m in metrics.CASE_METRICS
      for s in ('', '_std', '_global')}
  # Binary counts (C == 1) keep their single class; nothing kept -> NaN.
  binary = metrics.summarize_counts(np.array([[[0, 0, 0, 4]]]),
                                    ignore_empty=True)
  assert np.isnan(binary['dice']) and np.isnan(binary['dice_global'])
  with pytest.raises(ValueError, match=r'\[N, C, 4\]'):
    metrics.summarize_counts(np.zeros((3, 4)))


def test_nan_counts_give_nan_everywhere():
  nan = [np.nan] * 4
  for name, fn in metrics.METRICS_FROM_COUNTS.items():
    assert np.isnan(fn(nan)), name  # `nan > 0` is False: not empty_value
  assert np.isnan(metrics.accuracy_from_counts(nan))
  counts = np.array([[[2, 1, 1, 4]], [nan]], np.float32)
  for ignore_empty in (False, True):
    out = metrics.summarize_counts(counts, ignore_empty=ignore_empty)
    for name in metrics.CASE_METRICS:
      for suffix in ('', '_std', '_global'):
        assert np.isnan(out[name + suffix]), (name + suffix, ignore_empty)
  # Padding cases (valid == 0) add nothing, NaN or not.
  sums = metrics.case_metric_sums(counts, np.array([1, 0]))
  _close(metrics.summarize_sums(sums)['dice'], 4 / 6)


def test_sums_add_up_over_batches():
  rng = np.random.default_rng(3)
  counts = rng.integers(0, 5, size=(7, 3, 4)).astype(np.float32)
  sums = jax.jit(lambda c: metrics.case_metric_sums(c, ignore_empty=True))
  whole = sums(counts)
  parts = [sums(counts[s]) for s in (slice(0, 3), slice(3, 7))]
  added = jax.tree.map(lambda a, b: a + b, *parts)
  for key, value in whole.items():
    _close(added[key], value)
  # The reduction equals a direct NumPy computation of MONAI's rule.
  fg = counts[:, 1:]
  dice = 2 * fg[..., 0] / np.maximum(2 * fg[..., 0] + fg[..., 1] + fg[..., 2],
                                     1e-30)
  has_truth = fg[..., 0] + fg[..., 2] > 0
  per_case = [d[h].mean() for d, h in zip(dice, has_truth) if h.any()]
  _close(metrics.summarize_sums(added, ignore_empty=True)['dice'],
         np.mean(per_case))


def test_eval_step_stray_label_gives_nan_not_a_perfect_score():
  # A binary batch under jit: case 0 is predicted exactly (Dice 1); case 1
  # holds a stray label 2, which cannot be checked under jit: its counts are
  # NaN and the summary is NaN, never the empty-mask 1.0.
  model = types.SimpleNamespace(
      apply=lambda variables, image, train: image * 20.0 - 10.0)
  state = types.SimpleNamespace(params={}, batch_stats={})  # not traced
  labels = np.zeros((2, 4, 4), np.int32)
  labels[:, 1:3, 1:3] = 1
  image = labels[..., None].astype(np.float32)  # logits +-10: exact
  step = steps.make_eval_step(model, num_classes=1)
  eval_step = jax.jit(lambda batch: step(state, batch))
  good = {'image': image, 'label': labels, 'valid': np.array([1, 1])}
  assert metrics.summarize_sums(
      jax.device_get(eval_step(good)))['dice'] == 1.0
  stray = labels.copy()
  stray[1, 0, 0] = 2
  bad = dict(good, label=stray)
  out = metrics.summarize_sums(jax.device_get(eval_step(bad)))
  assert np.isnan(out['dice']) and np.isnan(out['dice_global'])
  # The same stray label in a padding case is ignored.
  padded = dict(bad, valid=np.array([1, 0]))
  out = metrics.summarize_sums(jax.device_get(eval_step(padded)))
  assert out['dice'] == 1.0 and out['num_cases'] == 1


def test_probabilities_one_rule_numpy_and_jax():
  rng = np.random.default_rng(0)
  for k in (1, 3):
    logits = rng.normal(size=(2, 5, k)).astype(np.float32)
    host = metrics.probabilities(logits)
    device = metrics.probabilities(jnp.asarray(logits))
    assert isinstance(host, np.ndarray) and host.dtype == np.float32
    _close(host, device, 1e-6)
    if k == 1:
      _close(host, 1 / (1 + np.exp(-logits)), 1e-6)
    else:
      e = np.exp(logits - logits.max(-1, keepdims=True))
      _close(host, e / e.sum(-1, keepdims=True), 1e-6)
    labels = metrics.labels_from_probabilities(host)
    assert isinstance(labels, np.ndarray) and labels.dtype == np.int32
    np.testing.assert_array_equal(labels, metrics.predict_classes(logits))


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
