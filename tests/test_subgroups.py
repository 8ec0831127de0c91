"""Subgroup analysis: planted effects, false positives, metadata, evaluate.

The statistics are tested on per-case Dice tables fed through
`subgroups.analyse`, the function `--mode=evaluate` calls; one evaluation of
a copy of the tiny 2D run (conftest's `run2d`) checks the wiring end to end.
"""

import csv
import shutil

import numpy as np
from PIL import Image
import pytest
from scipy import stats

from medseg_jax import case_metadata
from medseg_jax import config_checks
from medseg_jax import decision_curve
from medseg_jax import evaluate
from medseg_jax import report
from medseg_jax import statistics
from medseg_jax import subgroups
from medseg_jax import workdir as workdir_lib
from medseg_jax.data import folder_sources


def _table(seed, effect=0.0, sites='ABC', per_site=20, bad='C'):
  """Per-case Dice rows and a site column; site `bad` is `effect` worse."""
  rng = np.random.default_rng(seed)
  rows, metadata = [], {}
  for i in range(per_site * len(sites)):
    site = sites[i % len(sites)]
    dice = rng.normal(0.8 - (effect if site == bad else 0.0), 0.08)
    rows.append({'case_id': f'case{i:03d}', 'class_index': 1,
                 'dice': float(np.clip(dice, 0, 1))})
    metadata[f'case{i:03d}'] = {'site': site}
  return rows, metadata


@pytest.mark.parametrize('seed', range(5))
def test_a_site_with_lower_dice_is_flagged_and_no_other(seed):
  rows, metadata = _table(seed, effect=0.15)
  analysis = subgroups.analyse(rows, metadata, ['site'], num_resamples=500)
  assert subgroups.flagged_groups(analysis) == [('site', 'C')]
  (column,) = analysis['columns']
  assert column['kruskal_p'] < 0.05
  gap = next(g for g in column['groups'] if g['group'] == 'C')
  assert gap['gap_ci_high'] < 0 < gap['n']


def test_no_planted_effect_flags_at_most_alpha_over_many_seeds():
  # Holm keeps the family-wise error rate of a column at alpha = 0.05; only
  # worse groups are flagged, so the rate is about alpha / 2. 50 tables: a
  # binomial(50, 0.05) count exceeds 6 with probability < 0.02.
  false_positive = sum(
      bool(subgroups.flagged_groups(subgroups.analyse(
          *_table(1000 + s, sites='ABCD', per_site=12), ['site'],
          num_resamples=200)))
      for s in range(50))
  assert false_positive <= 6


def test_group_statistics_match_their_definitions():
  dice = {'a': 0.5, 'b': 0.7, 'c': 0.9, 'd': 0.8, 'e': 1.0}
  sex = {'a': 'F', 'b': 'F', 'c': 'M', 'd': 'M', 'e': 'M'}
  column = subgroups.analyse_column(dice, sex, 'sex', num_resamples=300)
  female, male = column['groups']
  assert (female['group'], female['n'], male['n']) == ('F', 2, 3)
  assert female['mean'] == pytest.approx(0.6)
  assert female['gap'] == pytest.approx(0.6 - 0.9)  # Rest: 0.9, 0.8, 1.0.
  assert (female['ci_low'], female['ci_high']) == pytest.approx(
      statistics.mean_confidence_interval([0.5, 0.7])[1:])
  p = stats.mannwhitneyu([0.5, 0.7], [0.9, 0.8, 1.0]).pvalue
  assert female['p_value'] == pytest.approx(p)
  assert female['p_holm'] == pytest.approx(min(1.0, 2 * p))  # Two groups.
  assert female['gap_ci_low'] <= female['gap'] <= female['gap_ci_high']
  assert column['kruskal_p'] == pytest.approx(
      stats.kruskal([0.5, 0.7], [0.9, 0.8, 1.0]).pvalue)


def test_continuous_columns_are_cut_at_quantiles_and_missing_values_counted():
  ages = [str(a) for a in range(20, 100)] + ['', 'NaN']
  labels, kind = subgroups.group_labels(ages, num_bins=4)
  assert kind == 'quantile'
  assert labels[-2:] == [None, None]
  counts = {g: labels.count(g) for g in set(labels) - {None}}
  assert sorted(counts.values()) == [20, 20, 20, 20]
  assert subgroups.group_labels(['1', '2', '2', '3'])[1] == 'categorical'
  dice = {str(i): 0.5 for i in range(len(ages))}
  column = subgroups.analyse_column(
      dice, dict(zip(dice, ages)), 'age', num_resamples=50)
  assert column['n_missing'] == 2
  assert [g['group'] for g in column['groups']][0].startswith('[20,')


def test_a_patient_row_applies_to_all_its_cases(tmp_path):
  path = tmp_path / 'meta.csv'
  path.write_text('Patient_ID,Site\np1,north\np2,south\n')
  rows = case_metadata.read_table(str(path))
  found = case_metadata.from_table(rows, ['p1-00', 'p1-01', 'p2-00', 'p3-00'],
                                   ['p1', 'p1', 'p2', 'p3'], str(path))
  assert {c: r['site'] for c, r in found.items()} == {
      'p1-00': 'north', 'p1-01': 'north', 'p2-00': 'south'}
  # ISIC metadata: image ids (with or without an extension) name the cases.
  isic = [{'isic_id': 'ISIC_001.jpg', 'sex': 'female'},
          {'isic_id': 'ISIC_002', 'sex': 'male'}]
  found = case_metadata.from_table(isic, ['ISIC_001', 'ISIC_002'],
                                   ['ISIC_001', 'ISIC_002'], 'metadata.csv')
  assert [found[c]['sex'] for c in ('ISIC_001', 'ISIC_002')] == [
      'female', 'male']


def test_manifest_columns_are_the_metadata_of_a_folder_data_set(tmp_path,
                                                                 tiny):
  rows = ['image,mask,patient_id,Site']
  for i, site in enumerate(('north', 'south', '')):
    for kind in ('images', 'masks'):
      (tmp_path / kind).mkdir(exist_ok=True)
      Image.fromarray(np.full((4, 4), 255 * (kind == 'masks'), np.uint8)).save(
          tmp_path / kind / f'c{i}.png')
    rows.append(f'images/c{i}.png,masks/c{i}.png,p{i},{site}')
  (tmp_path / 'list.csv').write_text('\n'.join(rows) + '\n')
  config = tiny(data__source='folder', data__root=str(tmp_path),
                data__folder__manifest='list.csv', eval__subgroups=('Site',))
  source = folder_sources.build_folder_source(config.data)
  metadata = case_metadata.metadata_for_evaluation(config, source)
  assert {c: r['site'] for c, r in metadata.items()} == {
      'c0': 'north', 'c1': 'south', 'c2': ''}
  config.eval.subgroups = ('scanner',)
  with pytest.raises(ValueError, match='available columns: image, mask, '
                     'patient_id, site'):
    case_metadata.metadata_for_evaluation(config, source)


def test_bad_subgroup_settings_are_config_errors(tiny):
  problems = config_checks.config_problems(tiny(eval__subgroups=('site', '')))
  assert any('config.eval.subgroups' in p for p in problems)
  assert any('subgroup_bins' in p for p in config_checks.config_problems(
      tiny(eval__subgroup_bins=1)))


# ------------------------------------------------------------ end to end


@pytest.fixture(scope='module')
def run_copy(run2d, tmp_path_factory):
  """A copy of the tiny 2D run whose eval/ this module may write."""
  copy = tmp_path_factory.mktemp('subgroups') / 'run'
  shutil.copytree(run2d, copy, ignore=shutil.ignore_patterns('eval'))
  return copy


def _site_csv(workdir, path):
  """Writes case_id,site,age for every case; returns {case_id: site}."""
  source = evaluate.pipeline.build_splits(
      workdir_lib.load_config(str(workdir)).data).source
  sites = {c: 'AB'[i % 2] for i, c in enumerate(source.case_ids)}
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['case_id', 'Site', 'age'])
    writer.writerows((c, s, i) for i, (c, s) in enumerate(sites.items()))
  return sites


def test_evaluate_writes_subgroups_and_a_decision_curve_of_its_cases(
    run_copy, tmp_path):
  sites = _site_csv(run_copy, tmp_path / 'sites.csv')
  config = workdir_lib.load_config(str(run_copy))
  config.eval.subgroups = ('Site',)
  config.eval.subgroups_csv = str(tmp_path / 'sites.csv')
  config.eval.decision.rule = 'max_prob'
  config.eval.decision.volume = 20.0
  evaluate.evaluate_run(config, str(run_copy), split='val')
  out = run_copy / 'eval' / 'val'
  with open(out / 'subgroups.csv') as f:
    groups = list(csv.DictReader(f))
  dice = subgroups.case_values(report.read_case_csv(str(out / 'cases.csv')))
  assert sum(int(g['n']) for g in groups) == len(dice) == 4
  for g in groups:  # Each group's mean is that of its cases in cases.csv.
    mine = [d for c, d in dice.items() if sites[c] == g['group']]
    assert float(g['mean']) == pytest.approx(np.mean(mine))
    assert float(g['gap']) == pytest.approx(np.mean(mine) - np.mean(
        [d for c, d in dice.items() if sites[c] != g['group']]))
  # The decision curve, recomputed from its case table.
  with open(out / 'decision_cases.csv') as f:
    cases = list(csv.DictReader(f))
  with open(out / 'decision_curve.csv') as f:
    curve = list(csv.DictReader(f))
  truth = [float(c['truth_volume']) > 20.0 for c in cases]
  assert [c['truth'] == 'True' for c in cases] == truth
  probs = np.array([float(c['max_prob']) for c in cases])
  assert len(probs) == 4 and np.all((probs >= 0) & (probs <= 1))
  prevalence = np.mean(truth)
  for row in curve[::20]:
    pt = float(row['threshold'])
    assert float(row['treat_all']) == pytest.approx(
        prevalence - (1 - prevalence) * pt / (1 - pt))
    assert float(row['model']) == pytest.approx(
        decision_curve.net_benefit(probs >= pt, truth, pt))
  for name in ('subgroups.png', 'decision_curve.png', 'roc_pr.png'):
    assert (out / name).stat().st_size > 0
  text = (out / 'summary.md').read_text()
  assert '## Subgroups' in text and '## Decision curve' in text


def test_a_missing_column_is_one_line_before_anything_is_predicted(
    run_copy, tmp_path):
  _site_csv(run_copy, tmp_path / 'sites.csv')
  config = workdir_lib.load_config(str(run_copy))
  config.eval.subgroups = ('sex',)
  config.eval.subgroups_csv = str(tmp_path / 'sites.csv')
  with pytest.raises(ValueError) as error:
    evaluate.evaluate_run(config, str(run_copy), split='test')
  message = str(error.value)
  assert '\n' not in message and "'sex'" in message
  assert 'available columns: age, case_id, site' in message
  assert not (run_copy / 'eval' / 'test').exists()
  config.eval.subgroups_csv = ''  # Synthetic data has no metadata at all.
  with pytest.raises(ValueError, match='subgroups_csv=FILE'):
    evaluate.evaluate_run(config, str(run_copy), split='test')
