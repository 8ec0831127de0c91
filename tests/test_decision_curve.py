"""Decision curves and case-level ROC/PR (evaluate: tests/test_subgroups.py)."""

import ml_collections
import numpy as np
import pytest

from medseg_jax import config_checks
from medseg_jax import decision_curve


def _decision(**values):
  base = dict(rule='volume', volume=100.0, truth='volume', truth_column='',
              truth_positive='')
  base.update(values)
  return ml_collections.ConfigDict(base)


# Ten cases by hand: predicted volume, true volume, max probability.
#   case:   0    1    2    3    4    5    6    7    8    9
#   pred: 150  300   20  120  500   10  200    0   90   60
#   truth:200  250  150    0    0   30    0  400   80  120
# Volume rule (v = 100): act on 0, 1, 3, 4, 6; truth positive: 0, 1, 2, 7, 9.
# TP = 2 (0, 1), FP = 3 (3, 4, 6), n = 10, prevalence 0.5.
PRED = (150, 300, 20, 120, 500, 10, 200, 0, 90, 60)
TRUTH = (200, 250, 150, 0, 0, 30, 0, 400, 80, 120)
PROB = (0.95, 0.9, 0.4, 0.7, 0.85, 0.1, 0.6, 0.3, 0.2, 0.55)


def _table():
  rows = [{'case_id': f'c{i}', 'class_index': 1, 'pred_volume': p,
           'truth_volume': t} for i, (p, t) in enumerate(zip(PRED, TRUTH))]
  probs = {f'c{i}': p for i, p in enumerate(PROB)}
  return decision_curve.case_table(rows, probs, {}, _decision())


def test_net_benefit_of_the_volume_rule_matches_hand_computed_values():
  c = decision_curve.curve(_table(), 'volume', 100.0, thresholds=(0.1, 0.2,
                                                                   0.5))
  # 2/10 - 3/10 * pt/(1 - pt): pt 0.1 -> 0.2 - 0.3/9; 0.2 -> 0.2 - 0.075;
  # 0.5 -> 0.2 - 0.3.
  assert c['model'] == pytest.approx([0.2 - 0.3 / 9, 0.125, -0.1])
  assert (c['tp'], c['fp']) == ([2, 2, 2], [3, 3, 3])
  # Treat all: 0.5 - 0.5 * pt / (1 - pt); treat none: 0.
  assert c['treat_all'] == pytest.approx([0.5 - 0.5 / 9, 0.375, 0.0])
  assert c['treat_none'] == [0.0, 0.0, 0.0]


def test_max_probability_rule_acts_when_the_probability_reaches_pt():
  c = decision_curve.curve(_table(), 'max_prob', thresholds=(0.5, 0.8))
  # pt 0.5: act on 0 1 3 4 6 9 (p >= 0.5): TP 0 1 9 = 3, FP 3 4 6 = 3
  #   -> 0.3 - 0.3 * 1 = 0.  pt 0.8: act on 0 1 4: TP 2, FP 1
  #   -> 0.2 - 0.1 * 4 = -0.2.
  assert (c['tp'], c['fp']) == ([3, 2], [3, 1])
  assert c['model'] == pytest.approx([0.0, -0.2])


def test_treat_all_follows_its_formula_for_any_prevalence():
  for prevalence in (0.0, 0.3, 1.0):
    for pt in (0.05, 0.25, 0.75):
      expected = prevalence - (1 - prevalence) * pt / (1 - pt)
      assert decision_curve.treat_all(prevalence, pt) == pytest.approx(
          expected)
  act = np.ones(10, bool)  # Acting on everyone is treat-all.
  truth = np.arange(10) < 3
  assert decision_curve.net_benefit(act, truth, 0.25) == pytest.approx(
      decision_curve.treat_all(0.3, 0.25))
  assert decision_curve.net_benefit(~act, truth, 0.25) == 0.0


def test_roc_auc_and_average_precision_by_hand():
  scores, truth = [0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]
  # Positive-negative pairs: (0.9 > 0.8), (0.9 > 0.6), (0.7 < 0.8),
  # (0.7 > 0.6): 3 of 4.
  assert decision_curve.roc_auc(scores, truth) == pytest.approx(0.75)
  assert decision_curve.roc_auc([0.5, 0.5], [1, 0]) == 0.5  # A tie is 1/2.
  # Cuts 0.9: P 1, R 1/2; 0.8: P 1/2, R 1/2; 0.7: P 2/3, R 1; 0.6: P 1/2.
  precision, recall, ap = decision_curve.precision_recall(scores, truth)
  assert precision == pytest.approx([1, 0.5, 2 / 3, 0.5])
  assert recall == pytest.approx([0.5, 0.5, 1, 1])
  assert ap == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
  fpr, tpr = decision_curve.roc_points(scores, truth)
  assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)
  low, high = decision_curve.bootstrap_auc_ci(PROB, [t > 100 for t in TRUTH],
                                              num_resamples=300)
  auc = decision_curve.roc_auc(PROB, [t > 100 for t in TRUTH])
  assert 0 <= low <= auc <= high <= 1


def test_case_table_sums_classes_and_reads_a_truth_column():
  rows = [{'case_id': 'a', 'class_index': k, 'pred_volume': 5.0,
           'truth_volume': 1.0} for k in (1, 2)]
  rows += [{'case_id': 'b', 'class_index': 1, 'pred_volume': 0.0,
            'truth_volume': 0.0}]
  metadata = {'a': {'diagnosis': 'Melanoma'}, 'b': {'diagnosis': 'nevus'}}
  table = decision_curve.case_table(
      rows, {'a': 0.9}, metadata,
      _decision(truth='column', truth_column='diagnosis',
                truth_positive='melanoma'))
  assert [(c['pred_volume'], c['truth']) for c in table] == [(10.0, True),
                                                            (0.0, False)]
  assert np.isnan(table[1]['max_prob'])  # No probability given for b.


def test_max_foreground_probability_of_sigmoid_and_softmax_outputs():
  sigmoid = np.zeros((4, 4, 1), np.float32)
  sigmoid[1, 2, 0] = 0.8
  assert decision_curve.max_foreground_probability(sigmoid) == pytest.approx(
      0.8)
  softmax = np.zeros((4, 4, 3), np.float32)
  softmax[..., 0] = 1.0
  softmax[2, 2] = (0.3, 0.4, 0.3)  # Foreground: 1 - p(background) = 0.7.
  assert decision_curve.max_foreground_probability(softmax) == pytest.approx(
      0.7)


def test_bad_decision_settings_are_config_errors(tiny):
  problems = config_checks.config_problems(tiny(
      eval__decision__rule='max_prob', eval__decision__truth='column'))
  assert any('truth_column' in p for p in problems)
  assert any('eval.decision.rule' in p for p in config_checks.config_problems(
      tiny(eval__decision__rule='size')))
