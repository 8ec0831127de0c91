"""Tests of medseg_jax.calibration: reliability bins, ECE, the accumulator."""

import math

import numpy as np
import pytest

from medseg_jax import calibration


def _close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol)


def test_expected_calibration_error_binary():
  # Confidences 0.9, 0.9, 0.7, 0.7 (last: p = 0.3 -> predicts 0); correct
  # 1, 0, 1, 1. Bins of 0.2: (0.8, 1]: acc 1/2, conf 0.9; (0.6, 0.8]: acc 1,
  # conf 0.7. ECE = 2/4 * 0.4 + 2/4 * 0.3.
  probs = np.array([0.9, 0.9, 0.7, 0.3])
  labels = np.array([1, 0, 1, 0])
  _close(calibration.expected_calibration_error(probs, labels, num_bins=5),
         0.35)
  bins = calibration.reliability_bins(probs, labels, num_bins=5)
  np.testing.assert_array_equal(bins['count'], [0, 0, 0, 2, 2])
  _close(bins['accuracy'][3:], [1.0, 0.5])
  _close(bins['confidence'][3:], [0.7, 0.9])
  assert np.isnan(bins['accuracy'][:3]).all()
  # Masked pixels drop out; a trailing class axis of 1 is accepted.
  _close(calibration.expected_calibration_error(
      probs[:, None], labels, 5, mask=[1, 0, 1, 1]), (0.1 + 2 * 0.3) / 3)


def test_expected_calibration_error_multiclass():
  # Max probs 0.6 (argmax 0, label 0: correct) and 0.5 (argmax 2, label 1:
  # wrong); 10 bins: one pixel each in (0.5, 0.6] and (0.4, 0.5].
  probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5]])
  labels = np.array([0, 1])
  _close(calibration.expected_calibration_error(probs, labels, 10),
         (0.4 + 0.5) / 2)
  with pytest.raises(ValueError, match='probs shape'):
    calibration.expected_calibration_error(probs, labels[:1])


def test_calibration_equals_pooled_ece_and_bins():
  rng = np.random.default_rng(1)
  probs = [rng.dirichlet(np.ones(3), size=shape) for shape in
           ((4, 5, 6), (3, 5, 6), (2, 5, 6))]
  truths = [rng.integers(0, 3, p.shape[:-1]) for p in probs]
  pooled_p = np.concatenate([p.reshape(-1, 3) for p in probs])
  pooled_t = np.concatenate([t.ravel() for t in truths])
  expected = calibration.reliability_bins(pooled_p, pooled_t, 10)
  for chunk in (1 << 22, 7):  # whole cases, and chunks of single slices
    acc = calibration.CalibrationAccumulator(10, chunk_pixels=chunk)
    for p, t in zip(probs, truths):
      acc.add(p, t)
    out = acc.summary()
    _close(out['ece'], calibration.expected_calibration_error(
        pooled_p, pooled_t, 10), 1e-12)
    np.testing.assert_array_equal(out['count'], expected['count'])
    _close(out['confidence'], expected['confidence'], 1e-12)
    _close(out['accuracy'], expected['accuracy'], 1e-12)
    assert out['num_pixels'] == pooled_t.size


def test_calibration_summary_binary_by_hand():
  # Every pixel has foreground probability 0.9 (confidence 0.9); 3 of the 4
  # pixels are foreground, so accuracy 0.75 and ECE |0.75 - 0.9| = 0.15.
  probs = np.full((2, 2, 1), 0.9)
  truth = np.array([[1, 1], [1, 0]])
  out = calibration.calibration_summary([probs], [truth], num_bins=5)
  _close(out['ece'], 0.15)
  assert out['count'] == [0, 0, 0, 0, 4]
  assert math.isnan(out['accuracy'][0])
  assert calibration.calibration_summary([], [])['ece'] == 0.0
  with pytest.raises(ValueError, match='probabilities shape'):
    calibration.calibration_summary([probs[:1]], [truth])
