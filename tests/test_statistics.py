"""Tests of medseg_jax.statistics: t intervals and the ISIC score."""

import math

import numpy as np
from scipy import stats

from medseg_jax import statistics


def _close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol)


def test_isic_thresholded_jaccard():
  _close(statistics.isic_thresholded_jaccard([0.5, 0.65, 0.8, 0.7]),
         (0 + 0.65 + 0.8 + 0.7) / 4)
  _close(statistics.isic_thresholded_jaccard([0.6], threshold=0.5), 0.6)
  assert np.isnan(statistics.isic_thresholded_jaccard([]))
  # A NaN image (a case whose counts were NaN) makes the score NaN, not 0.
  assert np.isnan(statistics.isic_thresholded_jaccard([0.8, np.nan]))


def test_mean_confidence_interval():
  # n = 5, mean 3, s = sqrt(2.5); t_{0.975, 4} = 2.776445105 (t table).
  half = 2.776445105 * math.sqrt(2.5) / math.sqrt(5)
  mean, lo, hi = statistics.mean_confidence_interval([1, 2, 3, 4, 5])
  _close([mean, lo, hi], [3.0, 3 - half, 3 + half], 1e-8)
  # Same through SciPy's own interval helper, and a 90% level.
  values = np.array([0.81, 0.74, 0.9, 0.66, 0.88, 0.79])
  want = stats.t.interval(0.9, len(values) - 1, loc=values.mean(),
                          scale=stats.sem(values))
  _close(statistics.mean_confidence_interval(values, 0.9)[1:], want, 1e-10)
  # NaN values are dropped; one value has no interval.
  _close(statistics.mean_confidence_interval([1, np.nan, 2, 3, 4, 5]),
         [3.0, 3 - half, 3 + half], 1e-8)
  mean, lo, hi = statistics.mean_confidence_interval([0.7])
  assert mean == 0.7 and np.isnan(lo) and np.isnan(hi)
  assert all(np.isnan(statistics.mean_confidence_interval([])))
