"""Paired comparison of two runs on the same test cases (host side, SciPy).

Two models evaluated on the same cases are compared case by case: the
per-case differences carry the comparison, not the two means (case
difficulty varies far more than the models do). For each pair of runs:

    diffs = paired_differences(rows_a, rows_b)        # b - a, per case/class
    mean, low, high = bootstrap_mean_ci(diffs, seed=0)
    p = wilcoxon_p(diffs)

and over all pairs of a sweep, `holm` corrects the p-values for the number
of comparisons. This module imports no JAX.
"""

from collections.abc import Sequence

import numpy as np
from scipy import stats


def _case_values(rows, metric: str, name: str) -> dict[tuple[str, int], float]:
  """{(case_id, class_index): value} of `rows`; refuses duplicate keys."""
  values = {}
  for row in rows:
    key = (str(row['case_id']), int(row['class_index']))
    if key in values:
      raise ValueError(f'{name}: case {key[0]!r}, class {key[1]} appears twice '
                       'in its per-case rows (cases.csv).')
    values[key] = float(row[metric])
  return values


def paired_differences(rows_a, rows_b, metric: str = 'dice',
                       names: tuple[str, str] = ('a', 'b')) -> np.ndarray:
  """Returns the per-case differences b - a of `metric`, matched by case/class.

  Pairs where either value is not finite (a NaN case) are left out.

  Args:
    rows_a: per-case rows of run a (`report.read_case_csv`), with 'case_id',
      'class_index' and `metric`.
    rows_b: the same for run b.
    metric: the column to compare.
    names: the two runs' names, for error messages.

  Returns:
    float64 array of differences, sorted by (case_id, class_index).

  Raises:
    ValueError: the two runs were evaluated on different cases (names the
      cases found in only one of them): a paired comparison needs the same
      test cases.
  """
  a = _case_values(rows_a, metric, names[0])
  b = _case_values(rows_b, metric, names[1])
  if set(a) != set(b):
    only_a = sorted(set(a) - set(b))[:3]
    only_b = sorted(set(b) - set(a))[:3]
    raise ValueError(
        f'Runs {names[0]} and {names[1]} were evaluated on different test '
        f'cases ({len(set(a) ^ set(b))} differ; only in {names[0]}: {only_a}, '
        f'only in {names[1]}: {only_b}), so they cannot be compared case by '
        'case. Give both the same data split (data.split_seed, '
        'data.test_fraction, data.source).')
  diffs = np.array([b[k] - a[k] for k in sorted(a)], np.float64)
  return diffs[np.isfinite(diffs)]


def bootstrap_mean_ci(diffs: Sequence[float], num_resamples: int = 10000,
                      confidence: float = 0.95, seed: int = 0
                     ) -> tuple[float, float, float]:
  """Returns (mean, low, high): the mean and its percentile bootstrap interval.

  Cases are resampled with replacement `num_resamples` times (seeded, so a
  report is reproducible); the bounds are the (1 -+ confidence) / 2
  quantiles of the resampled means.

  Args:
    diffs: per-case differences.
    num_resamples: number of bootstrap resamples.
    confidence: level of the interval.
    seed: seed of the resampling.

  Returns:
    NaN everywhere for no values; the bounds equal the mean for one value.
  """
  d = np.asarray(diffs, np.float64).ravel()
  if d.size == 0:
    return (float('nan'),) * 3
  rng = np.random.default_rng(seed)
  means = d[rng.integers(0, d.size, (num_resamples, d.size))].mean(axis=1)
  alpha = (1 - confidence) / 2
  low, high = np.quantile(means, [alpha, 1 - alpha])
  return float(d.mean()), float(low), float(high)


def wilcoxon_p(diffs: Sequence[float]) -> float:
  """Returns the two-sided Wilcoxon signed-rank p-value of the differences.

  `scipy.stats.wilcoxon` with its defaults (zero differences dropped,
  exact distribution for small samples). When every difference is zero the
  runs agree on every case: p = 1. NaN for no values.
  """
  d = np.asarray(diffs, np.float64).ravel()
  if d.size == 0:
    return float('nan')
  if not np.any(d != 0):
    return 1.0
  return float(stats.wilcoxon(d).pvalue)


def holm(pvalues: Sequence[float], alpha: float = 0.05
        ) -> tuple[np.ndarray, np.ndarray]:
  """Holm's step-down correction for multiple comparisons.

  With the m p-values sorted ascending, p_(i) (1-based) is adjusted to
  max_{j <= i} min(1, (m - j + 1) p_(j)); a comparison is significant when
  its adjusted p-value is below `alpha`. This controls the family-wise error
  rate at `alpha`. NaN p-values stay NaN and are never significant (they do
  not count in m).

  Args:
    pvalues: one p-value per comparison.
    alpha: the family-wise error rate.

  Returns:
    (adjusted p-values, significant flags), in the input order.
  """
  p = np.asarray(pvalues, np.float64).ravel()
  adjusted = np.full(p.shape, np.nan)
  valid = np.flatnonzero(~np.isnan(p))
  order = valid[np.argsort(p[valid], kind='stable')]
  m, running = order.size, 0.0
  for rank, index in enumerate(order):
    running = max(running, min(1.0, (m - rank) * p[index]))
    adjusted[index] = running
  significant = np.where(np.isnan(adjusted), False, adjusted < alpha)
  return adjusted, significant


def compare(rows_a, rows_b, metric: str = 'dice', names=('a', 'b'),
            seed: int = 0) -> dict:
  """Returns the paired comparison of run b against run a on one metric.

  Args:
    rows_a: per-case rows of run a.
    rows_b: per-case rows of run b.
    metric: the column compared.
    names: the runs' names, for error messages.
    seed: seed of the bootstrap.

  Returns:
    {'n' (paired values used), 'mean_diff', 'ci_low', 'ci_high' (bootstrap
     95 %), 'wins' (cases where b > a), 'losses', 'p_value' (Wilcoxon)}.
  """
  diffs = paired_differences(rows_a, rows_b, metric, names)
  mean, low, high = bootstrap_mean_ci(diffs, seed=seed)
  return {'n': int(diffs.size), 'mean_diff': mean, 'ci_low': low,
          'ci_high': high, 'wins': int((diffs > 0).sum()),
          'losses': int((diffs < 0).sum()), 'p_value': wilcoxon_p(diffs)}
