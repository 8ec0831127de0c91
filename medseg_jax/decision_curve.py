"""Case-level decisions from a segmentation: decision curves, ROC and PR.

Decision-curve analysis (Vickers & Elkin 2006) asks whether acting on the
model does more good than harm. Each case gets a decision ("positive":
treat, refer, biopsy) and a truth. At a threshold probability pt (the risk
at which one would act), a false positive costs pt / (1 - pt) true
positives, so

    net benefit(pt) = TP / n - FP / n * pt / (1 - pt)
    treat all       = prevalence - (1 - prevalence) * pt / (1 - pt)
    treat none      = 0

Decisions (`config.eval.decision.rule`):
  'volume'    positive when the predicted volume (all foreground classes)
              exceeds `volume` (in the reports' volume unit: mm^3, mm^2, or
              pixels for photographs); one fixed decision at every pt.
  'max_prob'  positive when the maximum foreground probability of the case
              is >= pt (the probability used as a risk, as in Vickers).
Truth (`truth`): 'volume': the true volume exceeds `volume`; 'column': the
case's metadata column `truth_column` equals `truth_positive`.

The maximum foreground probability (`max_foreground_probability`) also
scores a case-level ROC and precision-recall curve, with the AUC and its
bootstrap CI. Imports no JAX.
"""

import csv
import io
import math

import numpy as np
from scipy import stats

from medseg_jax import fileio

THRESHOLDS = np.round(np.arange(1, 100) / 100, 2)  # pt = 0.01 ... 0.99.
RULES = ('volume', 'max_prob')
TRUTHS = ('volume', 'column')
CASE_KEYS = ('case_id', 'pred_volume', 'truth_volume', 'max_prob', 'truth')


def max_foreground_probability(probabilities) -> float:
  """Returns the largest foreground probability of one case.

  Args:
    probabilities: [*spatial, K] of a Prediction: K == 1 is the foreground
      probability; K >= 2 softmax, whose foreground probability is
      1 - p(background) (any tumour class, as the volume counts them all).
  """
  p = np.asarray(probabilities, np.float64)
  foreground = p[..., 0] if p.shape[-1] == 1 else 1.0 - p[..., 0]
  return float(foreground.max()) if foreground.size else 0.0


def net_benefit(decisions, truth, threshold: float) -> float:
  """Returns TP/n - FP/n * pt/(1 - pt) of binary decisions at pt = threshold.

  Args:
    decisions: bool per case (act / do not act).
    truth: bool per case.
    threshold: the threshold probability pt in (0, 1).
  """
  d, t = np.asarray(decisions, bool), np.asarray(truth, bool)
  n = d.size
  if n == 0:
    return float('nan')
  tp, fp = np.sum(d & t), np.sum(d & ~t)
  return float(tp / n - fp / n * threshold / (1 - threshold))


def treat_all(prevalence: float, threshold: float) -> float:
  """Returns the net benefit of treating everyone: pi - (1 - pi) pt/(1 - pt).

  Args:
    prevalence: pi, the share of positive cases.
    threshold: the threshold probability pt in (0, 1).
  """
  return float(prevalence - (1 - prevalence) * threshold / (1 - threshold))


def case_table(rows, max_probs: dict, metadata: dict, decision) -> list[dict]:
  """Returns one row per case: volumes, max probability and the truth.

  Args:
    rows: per-case rows of a split (`report.case_metrics`); volumes are
      summed over the foreground classes of a case.
    max_probs: {case_id: `max_foreground_probability`} of the same
      predictions the rows were scored from.
    metadata: {case_id: {column: value}} (for truth='column').
    decision: config.eval.decision (rule, volume, truth, truth_column,
      truth_positive).

  Returns:
    Dicts with CASE_KEYS; 'truth' is a bool.
  """
  table = {}
  for row in rows:
    case = table.setdefault(str(row['case_id']), {
        'case_id': str(row['case_id']), 'pred_volume': 0.0,
        'truth_volume': 0.0})
    case['pred_volume'] += float(row['pred_volume'])
    case['truth_volume'] += float(row['truth_volume'])
  for case_id, case in table.items():
    case['max_prob'] = float(max_probs.get(case_id, float('nan')))
    if decision.truth == 'volume':
      case['truth'] = case['truth_volume'] > decision.volume
    else:
      value = metadata.get(case_id, {}).get(decision.truth_column)
      case['truth'] = str(value).strip().lower() == str(
          decision.truth_positive).strip().lower()
  return [table[c] for c in sorted(table)]


def curve(table, rule: str, volume: float = 0.0,
          thresholds=THRESHOLDS) -> dict:
  """Returns the decision curve of a case table.

  Args:
    table: `case_table` rows ('pred_volume', 'max_prob', 'truth').
    rule: 'volume' or 'max_prob' (module docstring).
    volume: the volume threshold of rule 'volume'.
    thresholds: the threshold probabilities pt.

  Returns:
    {'threshold', 'model', 'treat_all', 'treat_none', 'tp', 'fp'}: lists,
    one value per threshold.
  """
  truth = np.array([c['truth'] for c in table], bool)
  prevalence = float(truth.mean()) if truth.size else float('nan')
  out = {k: [] for k in ('threshold', 'model', 'treat_all', 'treat_none',
                         'tp', 'fp')}
  for pt in np.asarray(thresholds, np.float64):
    if rule == 'volume':
      act = np.array([c['pred_volume'] > volume for c in table], bool)
    else:
      act = np.array([c['max_prob'] >= pt for c in table], bool)
    out['threshold'].append(float(pt))
    out['model'].append(net_benefit(act, truth, pt))
    out['treat_all'].append(treat_all(prevalence, pt))
    out['treat_none'].append(0.0)
    out['tp'].append(int(np.sum(act & truth)))
    out['fp'].append(int(np.sum(act & ~truth)))
  return out


def roc_auc(scores, truth) -> float:
  """Returns the ROC AUC: P(score of a positive > a negative's), ties 1/2.

  Args:
    scores: a score per case (the max foreground probability).
    truth: bool per case.

  Returns:
    The Mann-Whitney form (mid-ranks); NaN when one class is absent.
  """
  s, t = np.asarray(scores, np.float64), np.asarray(truth, bool)
  n_pos, n_neg = int(t.sum()), int((~t).sum())
  if n_pos == 0 or n_neg == 0:
    return float('nan')
  ranks = stats.rankdata(s)
  return float((ranks[t].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_points(scores, truth) -> tuple[np.ndarray, np.ndarray]:
  """Returns (false positive rates, true positive rates), from (0, 0) to (1, 1).

  Args:
    scores: a score per case.
    truth: bool per case.

  Returns:
    One point per distinct score (acting when score >= it), highest first,
    after (0, 0).
  """
  s, t = np.asarray(scores, np.float64), np.asarray(truth, bool)
  cuts = np.unique(s)[::-1]
  tpr = [0.0] + [float(np.mean(s[t] >= c)) if t.any() else 0.0 for c in cuts]
  fpr = [0.0] + [float(np.mean(s[~t] >= c)) if (~t).any() else 0.0
                 for c in cuts]
  return np.array(fpr), np.array(tpr)


def precision_recall(scores, truth) -> tuple[np.ndarray, np.ndarray, float]:
  """Returns (precision, recall, average precision) of acting at score >= cut.

  Args:
    scores: a score per case.
    truth: bool per case.

  Returns:
    Precision and recall per distinct score, highest first; average
    precision = sum over cuts of (recall step) * precision, as
    scikit-learn's `average_precision_score`; NaN without positives.
  """
  s, t = np.asarray(scores, np.float64), np.asarray(truth, bool)
  precision, recall = [], []
  for c in np.unique(s)[::-1]:
    act = s >= c
    precision.append(float(np.sum(act & t) / np.sum(act)))
    recall.append(float(np.sum(act & t) / t.sum()) if t.any() else
                  float('nan'))
  precision, recall = np.array(precision), np.array(recall)
  if not t.any():
    return precision, recall, float('nan')
  steps = np.diff(np.concatenate([[0.0], recall]))
  return precision, recall, float(np.sum(steps * precision))


def bootstrap_auc_ci(scores, truth, num_resamples: int = 2000,
                     confidence: float = 0.95, seed: int = 0
                    ) -> tuple[float, float]:
  """Returns the percentile bootstrap interval of the ROC AUC over cases.

  Args:
    scores: a score per case.
    truth: bool per case.
    num_resamples: bootstrap resamples of the cases.
    confidence: level of the interval.
    seed: seed of the resampling.

  Returns:
    (low, high). Resamples that miss a class have no AUC and are skipped;
    NaN when the cases have one class only.
  """
  s, t = np.asarray(scores, np.float64), np.asarray(truth, bool)
  if not (t.any() and (~t).any()):
    return float('nan'), float('nan')
  rng = np.random.default_rng(seed)
  aucs = [roc_auc(s[i], t[i])
          for i in rng.integers(0, s.size, (num_resamples, s.size))]
  aucs = np.array([a for a in aucs if math.isfinite(a)])
  if not aucs.size:
    return float('nan'), float('nan')
  tail = (1 - confidence) / 2
  low, high = np.quantile(aucs, [tail, 1 - tail])
  return float(low), float(high)


def analyse(table, decision, seed: int = 0) -> dict:
  """Returns the decision curve, ROC and PR of a case table.

  Args:
    table: `case_table` rows.
    decision: config.eval.decision.
    seed: seed of the AUC bootstrap.

  Returns:
    {'rule', 'volume', 'truth', 'num_cases', 'num_positive', 'curve'
     (`curve`), 'auc', 'auc_ci_low', 'auc_ci_high', 'average_precision',
     'roc': {'fpr', 'tpr'}, 'pr': {'precision', 'recall'}, 'cases': table}.
  """
  scores = [c['max_prob'] for c in table]
  truth = [c['truth'] for c in table]
  low, high = bootstrap_auc_ci(scores, truth, seed=seed)
  fpr, tpr = roc_points(scores, truth)
  precision, recall, ap = precision_recall(scores, truth)
  truth_text = (f'truth volume > {decision.volume:g}' if decision.truth ==
                'volume' else f'{decision.truth_column} == '
                f'{decision.truth_positive}')
  return {'rule': decision.rule, 'volume': float(decision.volume),
          'truth': truth_text, 'num_cases': len(table),
          'num_positive': int(np.sum(truth)),
          'curve': curve(table, decision.rule, decision.volume),
          'auc': roc_auc(scores, truth), 'auc_ci_low': low,
          'auc_ci_high': high, 'average_precision': ap,
          'roc': {'fpr': fpr.tolist(), 'tpr': tpr.tolist()},
          'pr': {'precision': precision.tolist(), 'recall': recall.tolist()},
          'cases': list(table)}


def write_csv(analysis: dict, path: str) -> None:
  """Writes decision_curve.csv: threshold, model, treat_all, treat_none, tp, fp.

  Args:
    analysis: `analyse` output.
    path: the CSV file (written atomically).
  """
  c = analysis['curve']
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')
  writer.writerow(list(c))
  writer.writerows(zip(*c.values()))
  fileio.write_text(path, buffer.getvalue())


def write_case_csv(analysis: dict, path: str) -> None:
  """Writes decision_cases.csv, the case table (CASE_KEYS), atomically.

  Args:
    analysis: `analyse` output, with its 'cases'.
    path: the CSV file.
  """
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=CASE_KEYS, lineterminator='\n')
  writer.writeheader()
  writer.writerows(analysis['cases'])
  fileio.write_text(path, buffer.getvalue())


def _f(value) -> str:
  return 'n/a' if value is None or not math.isfinite(value) else (
      f'{value:.4f}')


def _rule_text(analysis: dict) -> str:
  if analysis['rule'] == 'volume':
    return f'predicted volume > {analysis["volume"]:g}'
  return 'max foreground probability >= pt'


def markdown(analysis: dict) -> list[str]:
  """Returns the summary.md section of a decision analysis.

  Args:
    analysis: `analyse` output (or its JSON read back).

  Returns:
    Markdown lines: the rule, the net benefit at a few thresholds, the AUC.
  """
  c = analysis['curve']
  lines = ['## Decision curve', '',
           f'Decision: {_rule_text(analysis)}; truth: {analysis["truth"]} '
           f'({analysis["num_positive"]} of {analysis["num_cases"]} cases '
           'positive). Net benefit = TP/n - FP/n * pt/(1 - pt) '
           '(decision_curve.csv, decision_curve.png).', '',
           '| pt | model | treat all | treat none |', '|---|---|---|---|']
  for pt in (0.05, 0.1, 0.2, 0.3, 0.5):
    i = int(np.argmin(np.abs(np.asarray(c['threshold']) - pt)))
    lines.append(f'| {c["threshold"][i]:.2f} | {_f(c["model"][i])} | '
                 f'{_f(c["treat_all"][i])} | 0 |')
  lines += ['', f'Case-level ROC AUC of the max foreground probability: '
            f'{_f(analysis["auc"])} [95% CI {_f(analysis["auc_ci_low"])}, '
            f'{_f(analysis["auc_ci_high"])}] (bootstrap over cases); average '
            f'precision {_f(analysis["average_precision"])} (roc_pr.png).', '']
  return lines


def summary_line(analysis: dict) -> str:
  """Returns one console line: net benefit at pt = 0.1 and 0.2, and the AUC.

  Args:
    analysis: `analyse` output.
  """
  c = analysis['curve']
  at = {round(t, 2): (m, a) for t, m, a in zip(c['threshold'], c['model'],
                                                 c['treat_all'])}
  parts = [f'pt {pt}: model {_f(at[pt][0])} vs treat-all {_f(at[pt][1])}'
           for pt in (0.1, 0.2)]
  return (f'Decision curve ({_rule_text(analysis)}; {analysis["truth"]}; '
          f'{analysis["num_positive"]}/{analysis["num_cases"]} positive): '
          + '; '.join(parts) + f'. ROC AUC {_f(analysis["auc"])} '
          f'[{_f(analysis["auc_ci_low"])}, {_f(analysis["auc_ci_high"])}]')
