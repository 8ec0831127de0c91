"""Paired statistics of two runs: hand-computed values and scipy directly."""

import numpy as np
import pytest
from scipy import stats

from medseg_jax import paired_stats


def _rows(values, order=None):
  ids = [f'c{i}' for i in range(len(values))]
  rows = [{'case_id': c, 'class_index': 1, 'dice': v}
          for c, v in zip(ids, values)]
  return [rows[i] for i in order] if order else rows


def test_differences_are_matched_by_case_not_by_row_order():
  a = _rows([0.5, 0.6, 0.7])
  b = _rows([0.55, 0.5, 0.9], order=[2, 0, 1])  # Same cases, shuffled rows.
  np.testing.assert_allclose(paired_stats.paired_differences(a, b),
                             [0.05, -0.1, 0.2])


def test_different_test_cases_are_refused_naming_the_runs():
  a, b = _rows([0.5, 0.6]), _rows([0.5, 0.6])
  b[1]['case_id'] = 'other'
  with pytest.raises(ValueError, match=r'unet and unetpp .*different test'):
    paired_stats.paired_differences(a, b, names=('unet', 'unetpp'))


def test_non_finite_pairs_are_left_out():
  a, b = _rows([0.5, float('nan'), 0.7]), _rows([0.6, 0.6, 0.6])
  np.testing.assert_allclose(paired_stats.paired_differences(a, b), [0.1, -0.1])


def test_wilcoxon_hand_computed_and_as_scipy():
  # |d| ranks 2, 1, 4, 3, 5; W- = 1 (the -0.05). Exact null: 2 of the 32 sign
  # patterns have W- <= 1, so p = 2 * 2/32 = 0.125.
  d = [0.1, -0.05, 0.2, 0.15, 0.3]
  assert paired_stats.wilcoxon_p(d) == pytest.approx(0.125)
  rng = np.random.default_rng(3)
  d = rng.normal(0.02, 0.05, 40)
  assert paired_stats.wilcoxon_p(d) == pytest.approx(stats.wilcoxon(d).pvalue)
  assert paired_stats.wilcoxon_p([0.0, 0.0, 0.0]) == 1.0  # Identical runs.


def test_bootstrap_interval_hand_computed():
  # Two cases 0 and 1: resampled means are 0, 0.5, 1 with probabilities
  # 1/4, 1/2, 1/4, so the 2.5 % and 97.5 % quantiles are 0 and 1.
  mean, low, high = paired_stats.bootstrap_mean_ci([0.0, 1.0], seed=0)
  assert (mean, low, high) == (0.5, 0.0, 1.0)
  assert paired_stats.bootstrap_mean_ci([0.2] * 7) == pytest.approx((0.2,) * 3)
  d = [0.1, -0.05, 0.2, 0.15, 0.3]
  first = paired_stats.bootstrap_mean_ci(d, seed=1)
  assert first == paired_stats.bootstrap_mean_ci(d, seed=1)  # Seeded.
  assert first[0] == pytest.approx(0.14) and first[1] < 0.14 < first[2]


def test_holm_hand_computed():
  # Sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06,
  # 0.04 -> running max 0.02, 0.03, 0.06, 0.06.
  adjusted, significant = paired_stats.holm([0.01, 0.04, 0.03, 0.005])
  np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])
  assert significant.tolist() == [True, False, False, True]
  adjusted, significant = paired_stats.holm([0.5, float('nan'), 0.01])
  np.testing.assert_allclose(adjusted, [0.5, np.nan, 0.02])
  assert significant.tolist() == [False, False, True]


def test_compare_summarises_b_minus_a():
  a = _rows([0.5, 0.6, 0.7, 0.8])
  b = _rows([0.6, 0.6, 0.9, 0.7])
  result = paired_stats.compare(a, b)
  assert result['n'] == 4 and result['wins'] == 2 and result['losses'] == 1
  assert result['mean_diff'] == pytest.approx(0.05)
  assert result['p_value'] == pytest.approx(
      stats.wilcoxon([0.1, 0.0, 0.2, -0.1]).pvalue)
