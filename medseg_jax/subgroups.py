"""Subgroup analysis of per-case metrics (host side, NumPy/SciPy).

A model that is good on average can fail one group of patients (a site, a
scanner, a skin tone). For each metadata column:

    analysis = analyse(rows, metadata, ('sex', 'site'))   # rows: cases.csv
    write_csv(analysis, 'subgroups.csv'); lines = markdown(analysis)

each group gets its n, the mean of the metric with a t-interval CI, and the
gap to the rest of the cases (group mean - rest mean) with a bootstrap CI
(group and rest resampled independently). Kruskal-Wallis tests whether the
groups differ at all; each group is tested against the rest with a
two-sided Mann-Whitney U test, and the p-values of a column's groups are
Holm-corrected (family-wise error rate `alpha` per column). A group is
flagged when its gap is negative and its Holm-adjusted p-value is below
`alpha`. Numeric columns with more than MAX_CATEGORIES distinct values (age)
are binned into `num_bins` quantile bins. A case's value is the mean of the
metric over its foreground classes; cases with no value in a column
('' or 'nan') are left out of that column and counted. Imports no JAX.
"""

import csv
import io
import math

import numpy as np
from scipy import stats

from medseg_jax import fileio
from medseg_jax import paired_stats
from medseg_jax import statistics

ALPHA = 0.05
MAX_CATEGORIES = 8  # Numeric columns with more distinct values are binned.
MISSING = ('', 'nan', 'na', 'n/a', 'none', 'unknown')
CSV_KEYS = ('column', 'group', 'n', 'mean', 'ci_low', 'ci_high', 'gap',
            'gap_ci_low', 'gap_ci_high', 'p_value', 'p_holm', 'flagged',
            'kruskal_p', 'metric')


def case_values(rows, metric: str = 'dice') -> dict[str, float]:
  """Returns {case_id: mean of `metric` over the case's finite class values}.

  Args:
    rows: `report.case_metrics` rows (one per case and foreground class).
    metric: the column averaged.

  Returns:
    One value per case; cases with no finite value are left out.
  """
  per_case = {}
  for row in rows:
    per_case.setdefault(str(row['case_id']), []).append(float(row[metric]))
  return {c: float(np.mean([v for v in vs if math.isfinite(v)]))
          for c, vs in per_case.items() if any(map(math.isfinite, vs))}


def _is_missing(value) -> bool:
  return value is None or str(value).strip().lower() in MISSING


def _as_float(value):
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def group_labels(values, num_bins: int = 4) -> tuple[list, str]:
  """Returns (a group label per value, None where missing; the column kind).

  Numeric columns with more than MAX_CATEGORIES distinct values are cut at
  their quantiles into `num_bins` bins ('quantile', labels like '[30, 45)',
  the last bin closed); any other column keeps its values ('categorical').

  Args:
    values: the column's raw values (strings), one per case.
    num_bins: number of quantile bins of a continuous column.
  """
  present = [str(v).strip() for v in values if not _is_missing(v)]
  numbers = [_as_float(v) for v in present]
  if (present and all(x is not None for x in numbers)
      and len(set(numbers)) > MAX_CATEGORIES):
    x = np.asarray(numbers, np.float64)
    edges = np.unique(np.quantile(x, np.linspace(0, 1, num_bins + 1)))
    names = [f'[{lo:g}, {hi:g})' for lo, hi in zip(edges[:-2], edges[1:-1])]
    names.append(f'[{edges[-2]:g}, {edges[-1]:g}]')
    labels = []
    for v in values:
      if _is_missing(v):
        labels.append(None)
      else:
        k = int(np.searchsorted(edges[1:-1], float(v), side='right'))
        labels.append(names[k])
    return labels, 'quantile'
  return [None if _is_missing(v) else str(v).strip() for v in values], (
      'categorical')


def bootstrap_gap_ci(group, rest, num_resamples: int = 2000,
                     confidence: float = 0.95, seed: int = 0
                    ) -> tuple[float, float, float]:
  """Returns (gap, low, high): mean(group) - mean(rest) and its bootstrap CI.

  The two samples are independent (different cases), so each is resampled
  with replacement on its own; the bounds are percentiles of the resampled
  gaps. NaN everywhere when either sample is empty.

  Args:
    group: values of one sample (e.g. a subgroup's, or the external cases').
    rest: values of the other sample.
    num_resamples: bootstrap resamples.
    confidence: level of the interval.
    seed: seed of the resampling (reports are reproducible).
  """
  a = np.asarray(group, np.float64).ravel()
  b = np.asarray(rest, np.float64).ravel()
  if a.size == 0 or b.size == 0:
    return (float('nan'),) * 3
  rng = np.random.default_rng(seed)
  mean_a = a[rng.integers(0, a.size, (num_resamples, a.size))].mean(axis=1)
  mean_b = b[rng.integers(0, b.size, (num_resamples, b.size))].mean(axis=1)
  tail = (1 - confidence) / 2
  low, high = np.quantile(mean_a - mean_b, [tail, 1 - tail])
  return float(a.mean() - b.mean()), float(low), float(high)


def mann_whitney_p(a, b) -> float:
  """Returns the two-sided Mann-Whitney U p-value of two independent samples.

  Args:
    a, b: the two samples' values.

  Returns:
    SciPy's p-value; 1.0 when all values are equal; NaN when either sample
    is empty.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.size == 0 or b.size == 0:
    return float('nan')
  if np.ptp(np.concatenate([a, b])) == 0:
    return 1.0  # SciPy would return NaN: no evidence of any difference.
  return float(stats.mannwhitneyu(a, b, alternative='two-sided').pvalue)


def kruskal_p(samples) -> float:
  """Returns the Kruskal-Wallis p-value over the non-empty samples.

  Args:
    samples: one sequence of values per group.

  Returns:
    SciPy's p-value; 1.0 when all values are equal; NaN with fewer than two
    non-empty samples.
  """
  samples = [np.asarray(s, np.float64) for s in samples if len(s)]
  if len(samples) < 2:
    return float('nan')
  if np.ptp(np.concatenate(samples)) == 0:
    return 1.0
  return float(stats.kruskal(*samples).pvalue)


def analyse_column(values: dict, column_values: dict, column: str, *,
                   alpha: float = ALPHA, num_bins: int = 4,
                   num_resamples: int = 2000, seed: int = 0) -> dict:
  """Returns the subgroup analysis of one column.

  Args:
    values: {case_id: metric value} (`case_values`).
    column_values: {case_id: raw value of the column}; cases absent or with
      a missing value (MISSING) are left out.
    column: the column's name, for the report.
    alpha: family-wise error rate of the Holm correction over the groups.
    num_bins: quantile bins of a continuous column.
    num_resamples: bootstrap resamples of each gap.
    seed: seed of the bootstraps.

  Returns:
    {'column', 'kind' ('categorical'/'quantile'), 'n_missing',
     'kruskal_p', 'groups': [{'group', 'n', 'mean', 'ci_low', 'ci_high',
     'gap', 'gap_ci_low', 'gap_ci_high', 'p_value' (Mann-Whitney vs the
     rest), 'p_holm', 'flagged'}]} with groups in label (or bin) order.
  """
  cases = sorted(values)
  labels, kind = group_labels([column_values.get(c) for c in cases], num_bins)
  known = [(c, g) for c, g in zip(cases, labels) if g is not None]
  if kind == 'quantile':  # Bin order, not the order of the label strings.
    order = {g: _as_float(g[1:].split(',')[0]) for _, g in known}
  else:
    order = {g: g for _, g in known}
  names = sorted(set(order), key=order.get)
  samples = {g: np.array([values[c] for c, h in known if h == g])
             for g in names}
  groups = []
  for i, g in enumerate(names):
    rest = np.concatenate([samples[h] for h in names if h != g] or [[]])
    mean, low, high = statistics.mean_confidence_interval(samples[g])
    gap, gap_low, gap_high = bootstrap_gap_ci(
        samples[g], rest, num_resamples, seed=seed + i)
    groups.append({'group': g, 'n': int(samples[g].size), 'mean': mean,
                   'ci_low': low, 'ci_high': high, 'gap': gap,
                   'gap_ci_low': gap_low, 'gap_ci_high': gap_high,
                   'p_value': mann_whitney_p(samples[g], rest)})
  adjusted, significant = paired_stats.holm([g['p_value'] for g in groups],
                                            alpha)
  for g, p, sig in zip(groups, adjusted, significant):
    g['p_holm'] = float(p)
    g['flagged'] = bool(sig and g['gap'] < 0)
  return {'column': column, 'kind': kind,
          'n_missing': len(cases) - len(known),
          'kruskal_p': kruskal_p(list(samples.values())), 'groups': groups}


def analyse(rows, metadata: dict, columns, *, metric: str = 'dice',
            alpha: float = ALPHA, num_bins: int = 4,
            num_resamples: int = 2000, seed: int = 0) -> dict:
  """Returns the subgroup analysis of `metric` for every column.

  Args:
    rows: per-case rows of a split (`report.case_metrics` or cases.csv).
    metadata: {case_id: {column: value}} (`case_metadata`).
    columns: the columns to analyse (config.eval.subgroups).
    metric: the per-case metric compared.
    alpha: family-wise error rate per column.
    num_bins: quantile bins of continuous columns.
    num_resamples: bootstrap resamples.
    seed: seed of the bootstraps.

  Returns:
    {'metric', 'alpha', 'num_cases', 'overall_mean' (over all cases),
     'columns': [analyse_column(...)]}.
  """
  values = case_values(rows, metric)
  result = []
  for column in columns:
    column_values = {c: metadata.get(c, {}).get(column) for c in values}
    result.append(analyse_column(values, column_values, column, alpha=alpha,
                                 num_bins=num_bins,
                                 num_resamples=num_resamples, seed=seed))
  overall = float(np.mean(list(values.values()))) if values else float('nan')
  return {'metric': metric, 'alpha': alpha, 'num_cases': len(values),
          'overall_mean': overall, 'columns': result}


def flagged_groups(analysis: dict) -> list[tuple[str, str]]:
  """Returns the (column, group) pairs flagged as significantly worse.

  Args:
    analysis: `analyse` output.
  """
  return [(c['column'], g['group']) for c in analysis['columns']
          for g in c['groups'] if g['flagged']]


def write_csv(analysis: dict, path: str) -> None:
  """Writes subgroups.csv: one row per (column, group) with CSV_KEYS, atomically.

  Args:
    analysis: `analyse` output.
    path: the CSV file.
  """
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=CSV_KEYS, lineterminator='\n')
  writer.writeheader()
  for c in analysis['columns']:
    for g in c['groups']:
      writer.writerow(dict(g, column=c['column'], kruskal_p=c['kruskal_p'],
                           metric=analysis['metric']))
  fileio.write_text(path, buffer.getvalue())


def _f(value, digits: int = 4) -> str:
  return 'n/a' if value is None or not math.isfinite(value) else (
      f'{value:.{digits}f}')


def format_p(value) -> str:
  """A p-value for a report: 4 decimals, '< 0.0001' below, 'n/a' if undefined."""
  if value is None or not math.isfinite(value):
    return 'n/a'
  return '< 0.0001' if value < 1e-4 else f'{value:.4f}'


def markdown(analysis: dict, plot_name: str = 'subgroups.png') -> list[str]:
  """Returns the summary.md section of a subgroup analysis.

  Args:
    analysis: `analyse` output (or its JSON read back: NaN as None).
    plot_name: the forest plot's file name, named in the text.

  Returns:
    Markdown lines: a table per column, worse groups in bold.
  """
  metric, alpha = analysis['metric'], analysis['alpha']
  lines = ['## Subgroups', '',
           f'{metric} per group ({analysis["num_cases"]} cases): mean with '
           f'its t-interval, gap = group - rest with a bootstrap CI, '
           f'Mann-Whitney p against the rest, Holm-corrected per column; '
           f'**worse** = gap < 0 and Holm p < {alpha}. Forest plot: '
           f'{plot_name}.', '']
  for c in analysis['columns']:
    lines += [f'### {c["column"]} ({c["kind"]}; Kruskal-Wallis p = '
              f'{format_p(c["kruskal_p"])}; {c["n_missing"]} cases without a '
              'value)', '',
              f'| group | n | {metric} [95% CI] | gap [95% CI] | p | '
              'Holm p | |', '|---|---|---|---|---|---|---|']
    for g in c['groups']:
      lines.append(
          f'| {g["group"]} | {g["n"]} | {_f(g["mean"])} [{_f(g["ci_low"])}, '
          f'{_f(g["ci_high"])}] | {_f(g["gap"])} [{_f(g["gap_ci_low"])}, '
          f'{_f(g["gap_ci_high"])}] | {format_p(g["p_value"])} | '
          f'{format_p(g["p_holm"])} | {"**worse**" if g["flagged"] else ""} |')
    lines.append('')
  return lines


def summary_line(analysis: dict) -> str:
  """Returns one console line: the flagged groups, or that there are none.

  Args:
    analysis: `analyse` output.
  """
  flagged = flagged_groups(analysis)
  if not flagged:
    return (f'Subgroups ({", ".join(c["column"] for c in analysis["columns"])}'
            f'): no group significantly worse (Holm, alpha '
            f'{analysis["alpha"]}).')
  return 'Subgroups significantly worse: ' + ', '.join(
      f'{c}={g}' for c, g in flagged)
