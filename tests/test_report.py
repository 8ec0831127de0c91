"""Tests of medseg_jax.report: per-case rows, statistics, files.

Expected values are worked out by hand in the comments, or computed
independently with numpy/scipy in the test.
"""

import json
import math
import os
import re

import ml_collections
import numpy as np
import pytest
from scipy import stats

from medseg_jax import metrics
from medseg_jax import report


def _close(a, b, tol=1e-6):
  np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def _only(rows):
  assert len(rows) == 1
  return rows[0]


# ------------------------------------------------------------- case_metrics


# 4x5 image: truth rows 1-2, cols 1-3; prediction the same block one column
# to the right. tp = 4 (cols 2-3), fp = 2 (col 4), fn = 2 (col 1),
# tn = 20 - 8 = 12.
TRUTH_2D = np.zeros((4, 5), np.uint8)
TRUTH_2D[1:3, 1:4] = 1
PRED_2D = np.zeros((4, 5), np.int32)
PRED_2D[1:3, 2:5] = 1


def test_case_metrics_2d_by_hand():
  row = _only(report.case_metrics(PRED_2D, TRUTH_2D, 1, case_id='a'))
  assert (row['case_id'], row['class_index'], row['class_name']) == (
      'a', 1, 'foreground')
  _close(row['dice'], 8 / 12)
  _close(row['iou'], 4 / 8)
  _close(row['sensitivity'], 4 / 6)
  _close(row['specificity'], 12 / 14)
  _close(row['precision'], 4 / 6)
  # Every pixel of a 2-row block is surface. Pred pixels in cols 2-3 lie on
  # the truth (0), col 4 is 1 column from truth col 3; the same for truth col
  # 1: directed distances [0, 0, 0, 0, 1, 1] both ways; 95th percentile 1,
  # mean over all 12 surface pixels 4 / 12.
  _close(row['hd95'], 1.0)
  _close(row['assd'], 1 / 3)
  assert (row['truth_volume'], row['pred_volume']) == (6, 6)
  assert (row['distance_unit'], row['volume_unit']) == ('pixels', 'pixels')
  assert tuple(row) == report.ROW_KEYS


def test_case_metrics_2d_spacing():
  row = _only(report.case_metrics(PRED_2D, TRUTH_2D, 1, spacing=(2.0, 1.5)))
  # Distances are along columns (1.5 mm); a pixel is 2.0 * 1.5 = 3 mm^2.
  _close(row['hd95'], 1.5)
  _close(row['assd'], 0.5)
  _close(row['truth_volume'], 18.0)
  _close(row['pred_volume'], 18.0)
  assert (row['distance_unit'], row['volume_unit']) == ('mm', 'mm^2')
  _close(row['dice'], 8 / 12)  # Overlap ignores spacing.


def test_case_metrics_3d_by_hand():
  truth = np.zeros((3, 4, 4), np.int64)
  truth[0:2, 1:3, 1:3] = 1  # 8 voxels
  pred = np.zeros_like(truth)
  pred[0, 1:3, 1:3] = 1  # 4 voxels, all inside the truth
  row = _only(report.case_metrics(pred, truth, 1, spacing=(3.0, 1.0, 0.5)))
  # tp 4, fp 0, fn 4, tn 48 - 8 = 40.
  _close(row['dice'], 8 / 12)
  _close(row['iou'], 0.5)
  _close(row['sensitivity'], 0.5)
  _close(row['specificity'], 1.0)
  _close(row['precision'], 1.0)
  # Pred surface lies on the truth (0); truth slice z=1 is 3 mm (one slice)
  # from the prediction: d_truth = [0]*4 + [3]*4 -> HD95 3, ASSD 12 / 12.
  _close(row['hd95'], 3.0)
  _close(row['assd'], 1.0)
  _close(row['truth_volume'], 8 * 1.5)  # voxel 3 * 1 * 0.5 = 1.5 mm^3
  _close(row['pred_volume'], 4 * 1.5)
  assert (row['distance_unit'], row['volume_unit']) == ('mm', 'mm^3')


def test_case_metrics_empty_masks():
  empty, full = np.zeros((5, 5), np.int32), np.zeros((5, 5), np.int32)
  full[1:4, 1:4] = 1
  both = _only(report.case_metrics(empty, empty, 1))
  for key in ('dice', 'iou', 'sensitivity', 'specificity', 'precision'):
    assert both[key] == 1.0, key
  assert (both['hd95'], both['assd']) == (0.0, 0.0)
  assert (both['truth_volume'], both['pred_volume']) == (0.0, 0.0)
  false_positive = _only(report.case_metrics(full, empty, 1))
  assert (false_positive['dice'], false_positive['iou']) == (0.0, 0.0)
  assert false_positive['sensitivity'] == 1.0
  assert false_positive['precision'] == 0.0
  assert math.isinf(false_positive['hd95'])
  assert math.isinf(false_positive['assd'])
  missed = _only(report.case_metrics(empty, full, 1))
  assert (missed['dice'], missed['sensitivity']) == (0.0, 0.0)
  assert missed['precision'] == 1.0  # the existing empty-prediction rule
  assert math.isinf(missed['hd95'])
  assert missed['truth_volume'] == 9.0


# One 2x3 case with classes 0, 1, 2 (as in test_metrics).
LABELS = np.array([[0, 1, 2], [2, 2, 0]])
PREDS = np.array([[0, 2, 2], [1, 2, 0]])


def test_case_metrics_multiclass():
  rows = report.case_metrics(PREDS, LABELS, 3, case_id='m',
                             class_names=('edema', 'tumour'))
  assert [(r['class_index'], r['class_name']) for r in rows] == [
      (1, 'edema'), (2, 'tumour')]
  one, two = rows
  # Class 1 (tp, fp, fn, tn) = (0, 1, 1, 4).
  assert (one['dice'], one['iou'], one['sensitivity'], one['precision']) == (
      0.0, 0.0, 0.0, 0.0)
  _close(one['specificity'], 4 / 5)
  # Class 2 = (2, 1, 1, 2).
  _close(two['dice'], 4 / 6)
  _close(two['iou'], 0.5)
  _close(two['sensitivity'], 2 / 3)
  _close(two['specificity'], 2 / 3)
  _close(two['precision'], 2 / 3)
  assert (two['truth_volume'], two['pred_volume']) == (3, 3)
  # Names of all K classes (background first) are accepted too.
  names = [r['class_name'] for r in report.case_metrics(
      PREDS, LABELS, 3, class_names=('bg', 'a', 'b'))]
  assert names == ['a', 'b']
  assert [r['class_name'] for r in report.case_metrics(PREDS, LABELS, 3)] == [
      'class_1', 'class_2']
  with pytest.raises(ValueError, match='class_names'):
    report.case_metrics(PREDS, LABELS, 3, class_names=('a',))


def test_foreground_counts_equal_confusion_counts():
  rng = np.random.default_rng(0)
  for num_classes, shape in ((1, (6, 7)), (4, (3, 5, 6))):
    high = max(num_classes, 2)
    pred = rng.integers(0, high, shape)
    truth = rng.integers(0, high, shape).astype(np.uint8)
    expected = np.asarray(metrics.confusion_counts(
        pred[None], truth[None], num_classes))[0]
    if num_classes > 1:
      expected = expected[1:]
    np.testing.assert_array_equal(
        report.foreground_counts(pred, truth, num_classes), expected)


def test_case_metrics_bad_input():
  with pytest.raises(ValueError, match=r'case \'x\'.*shape'):
    report.case_metrics(PRED_2D, TRUTH_2D[:3], 1, case_id='x')
  with pytest.raises(ValueError, match='integer'):
    report.case_metrics(PRED_2D.astype(np.float32), TRUTH_2D, 1)
  with pytest.raises(ValueError, match='truth must lie in'):
    report.case_metrics(PRED_2D, TRUTH_2D * 2, 1)
  with pytest.raises(ValueError, match='spacing'):
    report.case_metrics(PRED_2D, TRUTH_2D, 1, spacing=(1.0, 1.0, 1.0))


# ---------------------------------------------------------------- summarize


def _rows(values_by_class):
  """Rows with the given per-case metric values (other metrics 0.5)."""
  rows = []
  for index, values in values_by_class.items():
    for i, (dice, iou, hd95) in enumerate(values):
      row = {m: 0.5 for m in report.METRICS}
      row.update(case_id=f'c{i}', class_index=index, class_name=f'k{index}',
                 dice=dice, iou=iou, hd95=hd95, distance_unit='mm',
                 volume_unit='mm^3')
      rows.append(row)
  return rows


def test_summarize_against_numpy_and_scipy():
  dice = [0.9, 0.6, 0.7, 0.5, 0.85]
  iou = [0.9, 0.6, 0.7, 0.5, 0.66]
  hd95 = [1.0, float('inf'), 4.0, 2.5, 3.0]
  summary = report.summarize(_rows({1: list(zip(dice, iou, hd95))}))
  (cls,) = summary['classes']
  assert (cls['class_index'], cls['class_name'], cls['num_cases']) == (
      1, 'k1', 5)
  for name, values in (('dice', dice), ('hd95', hd95)):
    v = np.asarray(values)
    v = v[np.isfinite(v)]
    s = cls['metrics'][name]
    _close(s['mean'], np.mean(v))
    _close(s['std'], np.std(v, ddof=1))
    _close(s['median'], np.median(v))
    low, high = stats.t.interval(0.95, v.size - 1, loc=np.mean(v),
                                 scale=stats.sem(v))
    _close((s['ci_low'], s['ci_high']), (low, high))
    assert s['n'] == v.size
  assert cls['metrics']['dice']['excluded_nonfinite'] == 0
  assert cls['metrics']['hd95']['excluded_nonfinite'] == 1
  # ISIC: IoU >= 0.65 kept, else 0: (0.9 + 0 + 0.7 + 0 + 0.66) / 5.
  _close(summary['isic_thresholded_jaccard'], 2.26 / 5)
  assert 'mean_over_classes' not in summary
  assert summary['distance_unit'] == 'mm'


def test_summarize_multiclass_and_single_case():
  rows = _rows({1: [(0.8, 0.7, 1.0), (0.6, 0.5, 2.0)],
                2: [(0.4, 0.3, float('inf'))]})
  summary = report.summarize(rows)
  assert summary['isic_thresholded_jaccard'] is None
  first, second = summary['classes']
  _close(first['metrics']['dice']['mean'], 0.7)
  one = second['metrics']['dice']
  assert (one['mean'], one['median'], one['n']) == (0.4, 0.4, 1)
  assert all(math.isnan(one[k]) for k in ('std', 'ci_low', 'ci_high'))
  hd = second['metrics']['hd95']
  assert (hd['n'], hd['excluded_nonfinite']) == (0, 1)
  assert math.isnan(hd['mean'])
  _close(summary['mean_over_classes']['dice'], (0.7 + 0.4) / 2)
  with pytest.raises(ValueError, match='no rows'):
    report.summarize([])


# -------------------------------------------------------------------- files


def test_case_csv_round_trip(tmp_path):
  rows = (report.case_metrics(PRED_2D, TRUTH_2D, 1, (2.0, 1.5), 'a') +
          report.case_metrics(PRED_2D, np.zeros_like(TRUTH_2D), 1, None, 'b'))
  path = str(tmp_path / 'cases.csv')
  report.write_case_csv(rows, path)
  with open(path) as f:
    assert f.readline().strip() == ','.join(report.ROW_KEYS)
  back = report.read_case_csv(path)
  assert back == rows  # floats exactly, inf included
  assert math.isinf(back[1]['hd95'])
  assert os.listdir(tmp_path) == ['cases.csv']  # no temporary file left


def test_write_summary_json_and_markdown(tmp_path):
  dice = [0.9, 0.6, 0.7]
  rows = _rows({1: [(d, d, h) for d, h in zip(dice, (1.0, float('inf'),
                                                      2.0))]})
  summary = report.summarize(rows)
  summary['calibration'] = report.calibration_summary(
      [np.full((2, 2), 0.9)], [np.array([[1, 1], [1, 0]])], num_bins=5)
  summary.update(split='test', step=40)
  json_path, md_path = str(tmp_path / 's.json'), str(tmp_path / 's.md')
  report.write_summary(summary, json_path, md_path, title='Run x')

  def no_constants(name):
    raise AssertionError(f'non-standard JSON constant {name}')
  with open(json_path) as f:
    data = json.load(f, parse_constant=no_constants)
  assert data == report._json_ready(summary)  # pylint: disable=protected-access
  stats_dice = data['classes'][0]['metrics']['dice']
  _close(stats_dice['mean'], np.mean(dice))
  assert data['calibration']['accuracy'][0] is None  # empty bin: NaN -> null
  assert data['classes'][0]['metrics']['hd95']['excluded_nonfinite'] == 1

  with open(md_path) as f:
    md = f.read()
  assert md.startswith('# Run x\n')
  assert 'split: test; step: 40' in md
  assert '| metric | mean ± std | median | 95% CI | n |' in md
  s = stats_dice
  assert (f'| dice | {s["mean"]:.4f} ± {s["std"]:.4f} | {s["median"]:.4f} | '
          f'[{s["ci_low"]:.4f}, {s["ci_high"]:.4f}] | 3 |') in md
  assert '| hd95 (mm) | 1.50 ± 0.71 | 1.50 |' in md
  assert '| 2 (1 non-finite excluded) |' in md
  assert 'ISIC thresholded Jaccard' in md
  assert 'Expected calibration error: 0.1500' in md
  assert sorted(os.listdir(tmp_path)) == ['s.json', 's.md']
  text = report.summary_text(summary)
  assert 'Dice 0.7333' in text and '1 inf excluded' in text


# --------------------------------------------- units, conventions, NSD, NaN


def test_reports_name_units_and_distance_conventions(tmp_path):
  # No spacing (a photograph): pixels, never mm; the summary and the report
  # name the definition of each distance.
  rows = report.case_metrics(PRED_2D, TRUTH_2D, 1, None, 'a')
  summary = report.summarize(rows)
  assert summary['distance_unit'] == 'pixels'
  assert set(summary['distance_conventions']) == {'hd95', 'assd'}
  assert 'MONAI compute_hausdorff_distance' in (
      summary['distance_conventions']['hd95'])
  report.write_summary(summary, str(tmp_path / 's.json'),
                       str(tmp_path / 's.md'))
  md = (tmp_path / 's.md').read_text()
  assert '| hd95 (pixels) |' in md and not re.search(r'\bmm\b', md)
  assert 'Distances (pixels): hd95: max of the two directed' in md
  assert 'HD95 1.00 pixels' in report.summary_text(summary)


def test_case_metrics_nsd_deepmind_column(tmp_path):
  # The 2-row blocks of PRED_2D/TRUTH_2D, shifted by one column of 1.5 mm.
  # Marching squares around each 2x3 block: 10 corner points, the 4 outer
  # ones with cuts of d = hypot(2, 1.5) / 2 = 1.25 mm, 4 on the long sides
  # with 1.5 mm segments and 2 on the short sides with 2 mm: perimeter 15.
  # On the other contour (distance 0): the 4 long-side points and the 2
  # outer corners on the shifted side, 6 + 2.5 = 8.5 mm; every other point is
  # 1.5 mm (one column) or more away. NSD at 1 mm: 8.5 / 15 both ways.
  rows = report.case_metrics(PRED_2D, TRUTH_2D, 1, (2.0, 1.5), 'a',
                             nsd_tolerance=1.0)
  _close(rows[0]['nsd'], 8.5 / 15)
  assert rows[0]['nsd_tolerance'] == 1.0
  summary = report.summarize(rows)
  assert summary['nsd_tolerance'] == 1.0
  assert 'DeepMind' in summary['distance_conventions']['nsd']
  _close(summary['classes'][0]['metrics']['nsd']['mean'], 8.5 / 15)
  path = str(tmp_path / 'cases.csv')
  report.write_case_csv(rows, path)
  assert report.read_case_csv(path) == rows
  md = report.summary_markdown(summary)
  assert '| nsd@1.0 mm | 0.5667' in md


def test_nan_values_are_counted_not_averaged():
  stats = report.metric_statistics([0.8, float('nan'), 0.6])
  _close(stats['mean'], 0.7)
  assert stats['n'] == 2 and stats['excluded_nonfinite'] == 1


def test_photographs_are_reported_in_pixels():
  # ISIC/folder records carry a nominal (1.0, 1.0) spacing; evaluation must
  # not turn it into millimetres. Volumes (and their slices) keep theirs.
  from medseg_jax import evaluate  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict({'data': {'source': 'isic2018'}})
  record = {'spacing': (1.0, 1.0)}
  assert evaluate._physical_spacing(config, record) is None  # pylint: disable=protected-access
  config.data.source = 'nifti'
  assert evaluate._physical_spacing(config, record) == (1.0, 1.0)  # pylint: disable=protected-access
