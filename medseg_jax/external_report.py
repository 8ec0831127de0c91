"""External validation: the internal test split and another data set side by side.

`--mode=evaluate` on other data writes `WORKDIR/eval/external-<hash>/
<split>/`; beside its reports, `write_comparison` writes

  comparison.md    per class and metric: internal test mean (n), external
                   mean (n), the difference external - internal with a
                   bootstrap CI (the two case sets resampled independently),
                   the two-sided Mann-Whitney p-value; ECE of both
  comparison.png   Dice per case side by side, and the two reliability
                   diagrams

from the two folders' cases.csv and summary.json. The cases differ between
the two data sets, so the comparison is unpaired (not `paired_stats`).
When the internal test evaluation does not exist yet, comparison.md says
which command writes it. Imports no JAX.
"""

import json
import math
import os

import numpy as np

from medseg_jax import clinical_plots
from medseg_jax import fileio
from medseg_jax import report
from medseg_jax import subgroups

COMPARED = report.OVERLAP_METRICS + report.DISTANCE_METRICS


def _finite(rows, metric: str) -> np.ndarray:
  v = np.array([float(r[metric]) for r in rows], np.float64)
  return v[np.isfinite(v)]


def compare_rows(internal_rows, external_rows, metrics=COMPARED,
                 seed: int = 0) -> list[dict]:
  """Returns one comparison per (foreground class, metric) found in both.

  Args:
    internal_rows: per-case rows of the internal test split (cases.csv).
    external_rows: per-case rows of the external data.
    metrics: the metrics compared (those present in both).
    seed: seed of the bootstraps.

  Returns:
    Dicts {'class_index', 'class_name', 'metric', 'internal_mean',
    'internal_n', 'external_mean', 'external_n', 'difference' (external -
    internal), 'ci_low', 'ci_high', 'p_value'}; non-finite values (inf
    HD95) are left out of both sides, as in the summaries.
  """
  out = []
  classes = sorted({(int(r['class_index']), str(r['class_name']))
                    for r in internal_rows} &
                   {(int(r['class_index']), str(r['class_name']))
                    for r in external_rows})
  for index, name in classes:
    a = [r for r in internal_rows if int(r['class_index']) == index]
    b = [r for r in external_rows if int(r['class_index']) == index]
    for metric in metrics:
      if metric not in a[0] or metric not in b[0]:
        continue
      va, vb = _finite(a, metric), _finite(b, metric)
      diff, low, high = subgroups.bootstrap_gap_ci(vb, va, seed=seed)
      out.append({'class_index': index, 'class_name': name, 'metric': metric,
                  'internal_mean': float(va.mean()) if va.size else math.nan,
                  'internal_n': int(va.size),
                  'external_mean': float(vb.mean()) if vb.size else math.nan,
                  'external_n': int(vb.size), 'difference': diff,
                  'ci_low': low, 'ci_high': high,
                  'p_value': subgroups.mann_whitney_p(va, vb)})
  return out


def _f(value, digits: int = 4) -> str:
  if value is None or not math.isfinite(value):
    return 'n/a'
  return f'{value:.{digits}f}'


def _ece(summary: dict):
  calibration = summary.get('calibration') or {}
  return calibration.get('ece')


def comparison_markdown(comparisons, internal_summary: dict,
                        external_summary: dict, internal_dir: str,
                        external_dir: str) -> str:
  """Returns comparison.md (see the module docstring).

  Args:
    comparisons: `compare_rows` output.
    internal_summary: summary.json of the internal test split.
    external_summary: summary.json of the external data.
    internal_dir: the internal test folder, named in the report.
    external_dir: the external folder.
  """
  lines = ['# External validation: internal test vs external', '',
           f'Internal: {internal_dir} ({internal_summary.get("num_cases")} '
           f'cases, step {internal_summary.get("step")}); external: '
           f'{external_dir} ({external_summary.get("num_cases")} cases, step '
           f'{external_summary.get("step")}).', '',
           'Difference = external - internal mean, with a 95% bootstrap CI '
           '(the two case sets resampled independently) and a two-sided '
           'Mann-Whitney U p-value. Distances in '
           f'{external_summary.get("distance_unit", "")}.', '']
  for index in sorted({c['class_index'] for c in comparisons}):
    mine = [c for c in comparisons if c['class_index'] == index]
    lines += [f'## Class {index}: {mine[0]["class_name"]}', '',
              '| metric | internal (n) | external (n) | difference [95% CI] | '
              'Mann-Whitney p |', '|---|---|---|---|---|']
    for c in mine:
      digits = 4 if c['metric'] in report.OVERLAP_METRICS else 2
      lines.append(
          f'| {c["metric"]} | {_f(c["internal_mean"], digits)} '
          f'({c["internal_n"]}) | {_f(c["external_mean"], digits)} '
          f'({c["external_n"]}) | {_f(c["difference"], digits)} '
          f'[{_f(c["ci_low"], digits)}, {_f(c["ci_high"], digits)}] | '
          f'{subgroups.format_p(c["p_value"])} |')
    lines.append('')
  lines += ['## Calibration', '',
            f'Expected calibration error: internal {_f(_ece(internal_summary))}'
            f', external {_f(_ece(external_summary))}.', '',
            'comparison.png: Dice per case side by side, and the two '
            'reliability diagrams.', '']
  return '\n'.join(lines)


def _read_summary(folder: str) -> dict:
  with open(os.path.join(folder, 'summary.json')) as f:
    return json.load(f)


def write_comparison(internal_dir: str, external_dir: str,
                     command: str) -> str:
  """Writes comparison.md (and .png) into `external_dir`; returns a console line.

  Args:
    internal_dir: WORKDIR/eval[/...]/test of the run's own data.
    external_dir: the external split's report folder (cases.csv,
      summary.json written).
    command: the command that writes the internal test evaluation, named
      when it is missing.
  """
  md_path = os.path.join(external_dir, 'comparison.md')
  needed = [os.path.join(internal_dir, n) for n in ('cases.csv',
                                                    'summary.json')]
  if not all(os.path.isfile(p) for p in needed):
    fileio.write_text(md_path, (
        '# External validation: internal test vs external\n\nThe internal '
        f'test evaluation ({internal_dir}) does not exist yet. Run\n\n    '
        f'{command}\n\nthen this evaluation again to write the comparison.\n'))
    return (f'No internal test evaluation in {internal_dir} to compare with: '
            f'run `{command}` first, then this evaluation again.')
  internal_rows = report.read_case_csv(needed[0])
  external_rows = report.read_case_csv(os.path.join(external_dir,
                                                    'cases.csv'))
  internal_summary = _read_summary(internal_dir)
  external_summary = _read_summary(external_dir)
  comparisons = compare_rows(internal_rows, external_rows)
  fileio.write_text(md_path, comparison_markdown(
      comparisons, internal_summary, external_summary, internal_dir,
      external_dir))
  clinical_plots.plot_comparison(
      {'values': list(subgroups.case_values(internal_rows).values()),
       'calibration': internal_summary.get('calibration')},
      {'values': list(subgroups.case_values(external_rows).values()),
       'calibration': external_summary.get('calibration')},
      os.path.join(external_dir, 'comparison.png'))
  dice = next((c for c in comparisons if c['metric'] == 'dice'), None)
  line = f'Comparison with the internal test split: {md_path}'
  if dice is not None:
    line += (f' (Dice external - internal {_f(dice["difference"])} '
             f'[{_f(dice["ci_low"])}, {_f(dice["ci_high"])}], Mann-Whitney p '
             f'{subgroups.format_p(dice["p_value"])})')
  return line
