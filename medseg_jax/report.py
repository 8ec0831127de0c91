"""Evaluation reports on the host: per-case rows, statistics, files.

    rows = []
    for case in split:                                    # numpy arrays
      rows += case_metrics(pred, truth, num_classes, spacing, case_id)
      calibration.add(probabilities, truth)  # a CalibrationAccumulator
    summary = summarize(rows)
    summary['calibration'] = calibration.summary()
    write_case_csv(rows, 'cases.csv')
    write_summary(summary, 'summary.json', 'summary.md', title='...')

Rows are one (case, foreground class) each: class 1 for binary models
(num_classes == 1) and classes 1..K-1 for K >= 2. Metrics come from the
project's definitions (`metrics.*_from_counts`, `metrics.surface_distance_
metrics`), with their empty-mask rules (`EMPTY_MASK_RULES`): truth and
prediction both empty -> Dice, IoU, sensitivity, precision 1 and HD95, ASSD
0; empty truth, non-empty prediction -> Dice, IoU 0, sensitivity 1, HD95 and
ASSD inf; non-empty truth, empty prediction -> Dice, IoU, sensitivity 0,
precision 1, HD95 and ASSD inf. Statistics leave non-finite values (inf HD95)
out and count them (`excluded_nonfinite`), as they do NaN values (a case
whose counts are NaN), so no non-finite value is averaged away in silence.

Units: distances are in mm and volumes in mm^2/mm^3 when the case has a
spacing; with spacing=None (photographs, which have no physical spacing) they
are in pixels/voxels, and the reports say so. The summary names the
definition behind each distance (`DISTANCE_CONVENTIONS`).

The confusion counts of a case are computed here with NumPy (one bincount),
with the definition of `metrics.confusion_counts` (a test checks they are
equal): the jnp version compiles once per image shape, about a second per
case on data sets whose images differ in size, such as ISIC.
"""

import csv
import io
import json
import math

import numpy as np

from medseg_jax import decision_curve
from medseg_jax import fileio
# Calibration lives in `calibration`; re-exported for existing callers.
from medseg_jax.calibration import (  # pylint: disable=unused-import
    CalibrationAccumulator, calibration_summary)
from medseg_jax import metrics
from medseg_jax import statistics
from medseg_jax import subgroups

# Per-case metrics, in CSV and report order; the overlap metrics are the
# project's one list, metrics.CASE_METRICS.
OVERLAP_METRICS = metrics.CASE_METRICS
DISTANCE_METRICS = ('hd95', 'assd')
VOLUME_METRICS = ('truth_volume', 'pred_volume')
METRICS = OVERLAP_METRICS + DISTANCE_METRICS + VOLUME_METRICS
NSD_METRIC = 'nsd'  # Only in rows made with nsd_tolerance set.
ROW_KEYS = ('case_id', 'class_index', 'class_name', *METRICS, 'distance_unit',
            'volume_unit')
ISIC_THRESHOLD = 0.65

# The definition behind each distance, named in every summary.
DISTANCE_CONVENTIONS = {
    'hd95': ('max of the two directed 95th percentiles of the distances '
             'between surface voxels (MONAI compute_hausdorff_distance, '
             'percentile=95)'),
    'assd': ('mean of the surface-voxel distances of both directions pooled '
             '(MONAI compute_average_surface_distance, symmetric=True; '
             'MedPy >= 0.5.2 assd)'),
    'nsd': ('normalized surface Dice over area-weighted surface elements '
            '(DeepMind surface-distance, the NSD paper; MONAI '
            'use_subvoxels=True)'),
}

EMPTY_MASK_RULES = (
    'truth and prediction both empty: Dice = IoU = sensitivity = precision = '
    '1, HD95 = ASSD = 0; empty truth, non-empty prediction: Dice = IoU = 0, '
    'sensitivity = 1, HD95 = ASSD = inf; non-empty truth, empty prediction: '
    'Dice = IoU = sensitivity = 0, precision = 1, HD95 = ASSD = inf; no truth '
    'background: specificity = 1.')


# ------------------------------------------------------------ per-case rows


def _class_name(index: int, num_classes: int, class_names) -> str:
  """Name of foreground class `index` (class_names lists classes 1..K-1).

  A list of all K names (background first) is accepted too.
  """
  if not class_names:
    return 'foreground' if num_classes <= 2 else f'class_{index}'
  names = tuple(class_names)
  foreground = max(num_classes - 1, 1)
  if len(names) == foreground:
    return str(names[index - 1])
  if num_classes >= 2 and len(names) == num_classes:
    return str(names[index])
  raise ValueError(
      f'class_names {names} must name the {foreground} foreground class(es) '
      f'1..{foreground} (config.data.class_names), or all {num_classes} '
      'classes with the background first.')


def _units(spacing, ndim: int):
  """Returns (spacing tuple or None, voxel size, distance unit, volume unit)."""
  if spacing is None:
    return None, 1.0, 'pixels', 'pixels' if ndim == 2 else 'voxels'
  values = np.asarray(spacing, np.float64).ravel()
  if values.size == 1:
    values = np.repeat(values, ndim)
  if values.size != ndim or not np.all(values > 0):
    raise ValueError(f'spacing {tuple(spacing)} must hold {ndim} positive '
                     f'voxel sizes (mm), one per spatial axis of the mask.')
  unit = 'mm^2' if ndim == 2 else f'mm^{ndim}'
  return tuple(values.tolist()), float(np.prod(values)), 'mm', unit


def foreground_counts(pred, truth, num_classes: int) -> np.ndarray:
  """Returns int64 [C, 4] (tp, fp, fn, tn) of one case for classes 1..C.

  The same counts as `metrics.confusion_counts` without the background
  class (C == 1 for binary, K - 1 for K >= 2), from one `np.bincount`.

  Args:
    pred, truth: integer class maps of one case, same shape (no batch axis).
    num_classes: K of the model (1 = binary).
  """
  k = max(num_classes, 2)
  joint = truth.astype(np.int64).ravel() * k + pred.astype(np.int64).ravel()
  matrix = np.bincount(joint, minlength=k * k).reshape(k, k)  # [truth, pred]
  tp = np.diag(matrix)
  fp = matrix.sum(axis=0) - tp
  fn = matrix.sum(axis=1) - tp
  tn = matrix.sum() - tp - fp - fn
  return np.stack([tp, fp, fn, tn], axis=-1)[1:]


def case_metrics(pred, truth, num_classes: int, spacing=None,
                 case_id: str = '', class_names=None, *,
                 nsd_tolerance: float | None = None) -> list[dict]:
  """Returns the metric rows of one case, one per foreground class.

  Args:
    pred: integer (or bool) predicted class map [*spatial], 2D or 3D.
    truth: integer (or bool) true class map, same shape.
    num_classes: K of the model: 1 = binary (foreground 1), >= 2 = classes
      0..K-1 with 0 the background.
    spacing: voxel size in mm per spatial axis (or one scalar); None (no
      physical spacing, as for photographs) measures distances in pixels and
      volumes in pixel/voxel counts.
    case_id: identifier written in every row.
    class_names: names of classes 1..K-1 (config.data.class_names); default
      'foreground' (one foreground class) or 'class_<i>'.
    nsd_tolerance: when set, rows get 'nsd': the normalized surface Dice at
      this tolerance (in the distance unit), DeepMind's convention.

  Returns:
    Dicts with the keys of ROW_KEYS: 'dice', 'iou', 'sensitivity',
    'specificity', 'precision', 'hd95', 'assd' (in `distance_unit`, 'mm' or
    'pixels'), 'truth_volume' and 'pred_volume' (in `volume_unit`: 'mm^3',
    'mm^2' in 2D, or 'pixels'/'voxels'), as Python floats; empty masks follow
    EMPTY_MASK_RULES.

  Raises:
    ValueError: shapes differ, non-integer maps, values outside the classes,
      or a spacing that does not fit.
  """
  where = f'case_metrics(case {case_id!r})'
  pred, truth = np.asarray(pred), np.asarray(truth)
  if pred.shape != truth.shape or pred.ndim < 1:
    raise ValueError(f'{where}: pred shape {pred.shape} must equal truth '
                     f'shape {truth.shape} ([*spatial], no batch or class '
                     'axis).')
  metrics.check_integer_map(pred, 'pred', where)
  metrics.check_integer_map(truth, 'truth', where)
  metrics.check_label_values(truth, num_classes, None, where, 'truth')
  metrics.check_label_values(pred, num_classes, None, where, 'pred')
  spacing, voxel, distance_unit, volume_unit = _units(spacing, truth.ndim)
  counts = foreground_counts(pred, truth, num_classes)
  overlap = {name: np.asarray(metrics.METRICS_FROM_COUNTS[name](counts))
             for name in OVERLAP_METRICS}
  rows = []
  for i, (tp, fp, fn, _) in enumerate(counts.tolist()):
    index = i + 1
    surface = metrics.surface_distance_metrics(pred == index, truth == index,
                                               spacing=spacing)
    row = {'case_id': str(case_id), 'class_index': index,
           'class_name': _class_name(index, num_classes, class_names)}
    # float32 ratios as their shortest decimal (0.86, not 0.8600000143).
    row.update({name: float(str(np.float32(overlap[name][i])))
                for name in OVERLAP_METRICS})
    row.update({name: float(surface[name]) for name in DISTANCE_METRICS})
    if nsd_tolerance is not None:
      row[NSD_METRIC] = metrics.normalized_surface_dice(
          pred == index, truth == index, tolerance_mm=nsd_tolerance,
          spacing=spacing, convention='deepmind')
      row['nsd_tolerance'] = float(nsd_tolerance)
    row.update(truth_volume=(tp + fn) * voxel, pred_volume=(tp + fp) * voxel,
               distance_unit=distance_unit, volume_unit=volume_unit)
    rows.append(row)
  return rows


# ---------------------------------------------------------------- statistics


def _classes(rows) -> list[tuple[int, str]]:
  """(class_index, class_name) pairs present in `rows`, by index."""
  return sorted({(int(r['class_index']), str(r['class_name'])) for r in rows})


def metric_statistics(values, confidence: float = 0.95) -> dict:
  """Returns the statistics of one metric over cases.

  Non-finite values (inf HD95 of a case with one empty mask, NaN of a case
  with NaN counts) are left out of every statistic and counted in
  'excluded_nonfinite'.

  Args:
    values: per-case values.
    confidence: level of the t-distribution interval of the mean.

  Returns:
    {'mean', 'std' (sample, ddof=1), 'median', 'ci_low', 'ci_high'
     (`statistics.mean_confidence_interval`), 'n' (finite values used),
     'excluded_nonfinite'}; NaN where undefined (std and CI need n >= 2).
  """
  v = np.asarray(values, np.float64).ravel()
  finite = v[np.isfinite(v)]
  nan = float('nan')
  mean, low, high = statistics.mean_confidence_interval(finite, confidence)
  return {'mean': mean,
          'std': float(finite.std(ddof=1)) if finite.size > 1 else nan,
          'median': float(np.median(finite)) if finite.size else nan,
          'ci_low': low, 'ci_high': high, 'n': int(finite.size),
          'excluded_nonfinite': int(v.size - finite.size)}


def summarize(rows, confidence: float = 0.95) -> dict:
  """Returns per-class statistics of every metric of `rows`.

  Args:
    rows: `case_metrics` rows of a split (or read back by `read_case_csv`).
    confidence: level of the confidence intervals.

  Returns:
    {'classes': [{'class_index', 'class_name', 'num_cases', 'metrics':
       {metric: metric_statistics(...)}}],
     'mean_over_classes': {metric: mean of the class means} (K >= 3 only,
       else absent),
     'isic_thresholded_jaccard': mean over cases of IoU, counted as 0 below
       0.65 (ISIC 2018 Task 1), when there is one foreground class, else None,
     'confidence', 'distance_unit', 'volume_unit', 'distance_conventions'
     ({metric: definition}), 'nsd_tolerance' (when rows have 'nsd'),
     'empty_mask_rules', 'nonfinite_rule'}.
  """
  if not rows:
    raise ValueError('summarize: no rows (the split has no cases?).')
  names = _row_metrics(rows)
  classes = []
  for index, name in _classes(rows):
    mine = [r for r in rows if int(r['class_index']) == index]
    stats = {m: metric_statistics([float(r[m]) for r in mine], confidence)
             for m in names}
    classes.append({'class_index': index, 'class_name': name,
                    'num_cases': len(mine), 'metrics': stats})
  summary = {'classes': classes, 'confidence': confidence,
             'distance_unit': _unit(rows, 'distance_unit'),
             'volume_unit': _unit(rows, 'volume_unit'),
             'distance_conventions': {m: DISTANCE_CONVENTIONS[m]
                                      for m in names
                                      if m in DISTANCE_CONVENTIONS},
             'empty_mask_rules': EMPTY_MASK_RULES,
             'nonfinite_rule': (
                 'Non-finite values (inf HD95/ASSD: exactly one of truth and '
                 'prediction empty; NaN: a case whose labels were out of '
                 'range) are excluded from mean, std, median and CI and '
                 'counted in excluded_nonfinite.')}
  if NSD_METRIC in names:
    tolerances = sorted({float(r['nsd_tolerance']) for r in rows})
    summary['nsd_tolerance'] = (tolerances[0] if len(tolerances) == 1
                                else tolerances)
  if len(classes) > 1:
    summary['mean_over_classes'] = {
        m: float(np.mean([c['metrics'][m]['mean'] for c in classes]))
        for m in names}
  summary['isic_thresholded_jaccard'] = (statistics.isic_thresholded_jaccard(
      [float(r['iou']) for r in rows], ISIC_THRESHOLD) if len(classes) == 1
                                         else None)
  return summary


def _row_metrics(rows) -> tuple[str, ...]:
  """METRICS, plus 'nsd' when every row has it."""
  extra = (NSD_METRIC,) if all(NSD_METRIC in r for r in rows) else ()
  return METRICS + extra


def _unit(rows, key: str) -> str:
  """The unit shared by all rows ('mixed: ...' if cases disagree)."""
  units = sorted({str(r.get(key, '')) for r in rows})
  return units[0] if len(units) == 1 else 'mixed: ' + ', '.join(units)


# ---------------------------------------------------------------- the files


def write_case_csv(rows, path: str) -> None:
  """Writes the rows as CSV (columns ROW_KEYS, then any extra keys), atomically.

  Floats are written with full precision; inf as 'inf'.
  """
  keys = list(ROW_KEYS) + sorted({k for r in rows for k in r} - set(ROW_KEYS))
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  fileio.write_text(path, buffer.getvalue())


def read_case_csv(path: str) -> list[dict]:
  """Reads `write_case_csv` output back: metrics as floats, class_index int."""
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  for row in rows:
    row['class_index'] = int(row['class_index'])
    for key in METRICS + (NSD_METRIC, 'nsd_tolerance'):
      if key in row:
        row[key] = float(row[key])
  return rows


def _json_ready(value):
  """Converts to strict-JSON types: NaN -> None, +-inf -> 'inf'/'-inf'."""
  if isinstance(value, dict):
    return {str(k): _json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple, np.ndarray)):
    return [_json_ready(v) for v in value]
  if isinstance(value, (np.integer, np.bool_)):
    return value.item()
  if isinstance(value, (float, np.floating)):
    value = float(value)
    if math.isnan(value):
      return None
    return value if math.isfinite(value) else ('inf' if value > 0 else '-inf')
  return value


def write_summary(summary: dict, json_path: str, md_path: str,
                  title: str = 'Evaluation') -> None:
  """Writes the summary as strict JSON and as a Markdown report, atomically.

  JSON: `summary` with NaN as null and inf as "inf". Markdown: per class a
  table metric | mean ± std | median | 95% CI | n, then the ISIC score, the
  calibration error (if summary['calibration'] is set) and the rules.
  """
  text = json.dumps(_json_ready(summary), indent=2, allow_nan=False)
  fileio.write_text(json_path, text + '\n')
  fileio.write_text(md_path, summary_markdown(summary, title))


def _fmt(value, metric: str) -> str:
  if value is None or not math.isfinite(value):
    return 'n/a' if value is None or math.isnan(value) else str(value)
  if metric in OVERLAP_METRICS or metric == NSD_METRIC:
    return f'{value:.4f}'
  return f'{value:.2f}' if metric in DISTANCE_METRICS else f'{value:.1f}'


def _metric_label(metric: str, summary: dict) -> str:
  if metric in DISTANCE_METRICS:
    return f'{metric} ({summary.get("distance_unit", "")})'
  if metric in VOLUME_METRICS:
    return f'{metric} ({summary.get("volume_unit", "")})'
  if metric == NSD_METRIC:
    return (f'nsd@{summary.get("nsd_tolerance", "?")} '
            f'{summary.get("distance_unit", "")}')
  return metric


def _table(stats: dict, summary: dict) -> list[str]:
  level = round(100 * summary.get('confidence', 0.95))
  lines = [f'| metric | mean ± std | median | {level}% CI | n |',
           '|---|---|---|---|---|']
  for metric, s in stats.items():
    f = lambda v, m=metric: _fmt(v, m)
    n = str(s['n'])
    if s['excluded_nonfinite']:
      n += f' ({s["excluded_nonfinite"]} non-finite excluded)'
    lines.append(f'| {_metric_label(metric, summary)} | {f(s["mean"])} ± '
                 f'{f(s["std"])} | {f(s["median"])} | [{f(s["ci_low"])}, '
                 f'{f(s["ci_high"])}] | {n} |')
  return lines


def summary_markdown(summary: dict, title: str = 'Evaluation') -> str:
  """Returns the Markdown report of a `summarize` result (see write_summary)."""
  lines = [f'# {title}', '']
  context = [f'{k}: {summary[k]}' for k in ('split', 'step', 'num_cases',
                                            'workdir') if k in summary]
  if context:
    lines += ['; '.join(context), '']
  for c in summary['classes']:
    lines += [f'## Class {c["class_index"]}: {c["class_name"]} '
              f'({c["num_cases"]} cases)', '']
    lines += _table(c['metrics'], summary) + ['']
  if summary.get('mean_over_classes'):
    means = summary['mean_over_classes']
    lines += ['## Mean over classes', '',
              ', '.join(f'{m} {_fmt(means[m], m)}' for m in
                        OVERLAP_METRICS + DISTANCE_METRICS), '']
  isic = summary.get('isic_thresholded_jaccard')
  if isic is not None:
    lines += [f'ISIC thresholded Jaccard (IoU < {ISIC_THRESHOLD} counts as 0): '
              f'{_fmt(isic, "iou")}', '']
  calibration = summary.get('calibration')
  if calibration:
    lines += [f'Expected calibration error: {calibration["ece"]:.4f} '
              f'({calibration["num_bins"]} bins, '
              f'{calibration["num_pixels"]} pixels)', '']
  if summary.get('subgroups'):  # eval.subgroups (subgroups.py).
    lines += subgroups.markdown(summary['subgroups'])
  if summary.get('decision'):  # eval.decision (decision_curve.py).
    lines += decision_curve.markdown(summary['decision'])
  conventions = summary.get('distance_conventions') or {}
  if conventions:
    lines += ['Distances (' + summary.get('distance_unit', '') + '): ' +
              '; '.join(f'{m}: {d}' for m, d in conventions.items()), '']
  lines += [f'Empty masks: {summary["empty_mask_rules"]}', '',
            summary['nonfinite_rule'], '']
  return '\n'.join(lines)


def summary_text(summary: dict) -> str:
  """Returns a few lines for the console: mean Dice/IoU/HD95 per class."""
  lines = []
  for c in summary['classes']:
    s = c['metrics']
    lines.append(
        f'class {c["class_index"]} ({c["class_name"]}, {c["num_cases"]} '
        f'cases): Dice {_fmt(s["dice"]["mean"], "dice")} '
        f'[{_fmt(s["dice"]["ci_low"], "dice")}, '
        f'{_fmt(s["dice"]["ci_high"], "dice")}], IoU '
        f'{_fmt(s["iou"]["mean"], "iou")}, HD95 '
        f'{_fmt(s["hd95"]["mean"], "hd95")} {summary["distance_unit"]}'
        + (f' ({s["hd95"]["excluded_nonfinite"]} inf excluded)'
           if s['hd95']['excluded_nonfinite'] else '')
        + (f'; {s["dice"]["excluded_nonfinite"]} NaN Dice excluded'
           if s['dice']['excluded_nonfinite'] else ''))
  if summary.get('isic_thresholded_jaccard') is not None:
    lines.append('ISIC thresholded Jaccard '
                 f'{_fmt(summary["isic_thresholded_jaccard"], "iou")}')
  if summary.get('calibration'):
    lines.append(f'ECE {summary["calibration"]["ece"]:.4f}')
  if summary.get('subgroups'):
    lines.append(subgroups.summary_line(summary['subgroups']))
  if summary.get('decision'):
    lines.append(decision_curve.summary_line(summary['decision']))
  return '\n'.join(lines)
