"""Cross-validation in a sweep: pooling and selection by hand; a tiny CV sweep
(2 configurations x 2 folds) end to end, rerun without re-evaluating."""

import json
import os

import numpy as np
import pytest

from medseg_jax import report
from medseg_jax import sweep
from medseg_jax import sweep_cv
from tests import conftest
from tests import test_sweep

CV_SWEEP_FILE = '''
from configs import unetpp

def get_config(arg=None):
  config = unetpp.get_config('cpu')
  config.data.num_folds = 2
  return config

def get_sweep(arg=None):
  return [{'optim.lr': lr, 'data.fold': f}
          for lr in (1e-3, 3e-3) for f in (0, 1)]
'''
CONFIGS = {'lr0.001': ['lr0.001-fold0', 'lr0.001-fold1'],
           'lr0.003': ['lr0.003-fold0', 'lr0.003-fold1']}
PAIR = 'lr0.001 + lr0.003'


def _row(case, dice, class_index=1):
  return {'case_id': case, 'class_index': class_index, 'dice': dice}


def test_pool_folds_by_hand_and_overlapping_folds_refused():
  fold0 = [_row('a', 0.9), _row('b', 0.5), _row('c', float('nan'))]
  fold1 = [_row('d', 0.6)]
  pooled = sweep_cv.pool_folds([fold0, fold1])
  assert pooled['fold_dice'] == pytest.approx([0.7, 0.6])
  assert pooled['mean'] == pytest.approx(0.65)
  assert pooled['std'] == pytest.approx(np.std([0.7, 0.6], ddof=1))
  # Pooled over cases, not the mean of the fold means: (0.9+0.5+0.6)/3.
  assert pooled['pooled_dice'] == pytest.approx(2.0 / 3)
  assert pooled['num_cases'] == 4
  with pytest.raises(ValueError, match=r"Case 'a'.*folds 0 and 1"):
    sweep_cv.pool_folds([fold0, [_row('a', 0.2)]])


def test_select_best_pair_must_beat_every_single_and_nan_never_wins():
  single_a = {'name': 'a', 'pooled_dice': 0.8}
  single_b = {'name': 'b', 'pooled_dice': float('nan')}
  tie_pair = {'name': 'a + c', 'pooled_dice': 0.8}
  assert sweep_cv.select_best([single_a, single_b, tie_pair]) is single_a
  better_pair = {'name': 'a + c', 'pooled_dice': 0.81}
  assert sweep_cv.select_best([single_a, better_pair]) is better_pair
  assert sweep_cv.select_best([single_b]) is None


def test_cv_groups_split_configurations_by_everything_but_the_fold(tmp_path):
  base = conftest.tiny_config(data__num_folds=2)
  runs = sweep.plan_runs(base, [{'model.name': m, 'data.fold': f}
                                for m in ('unet', 'unetpp') for f in (1, 0)],
                         str(tmp_path))
  groups = sweep_cv.cv_groups(runs)
  assert [[r.name for r in g] for g in groups] == [
      ['unet-fold0', 'unet-fold1'], ['unetpp-fold0', 'unetpp-fold1']]
  assert [sweep_cv.config_name(g) for g in groups] == ['unet', 'unetpp']
  # --ensemble averages one architecture: no unet + unetpp pair ensemble.
  assert not sweep_cv.pairable(*groups)
  assert sweep_cv.pairable(groups[0], groups[0])
  assert sweep_cv.is_cv_sweep(runs)
  assert not sweep_cv.is_cv_sweep(sweep.plan_runs(
      conftest.tiny_config(), [{'model.name': 'unet'}], str(tmp_path)))


def _val_rows(run_dir):
  return report.read_case_csv(str(run_dir / 'eval' / 'val' / 'cases.csv'))


def _mean_dice(rows):
  values = np.array([r['dice'] for r in rows], np.float64)
  return float(values[np.isfinite(values)].mean())


def test_tiny_cv_sweep_summary_ensembles_and_best(tmp_path):
  sweep_file = tmp_path / 'sweep_cv_tiny.py'
  sweep_file.write_text(CV_SWEEP_FILE)
  workdir = tmp_path / 'cv'
  command = conftest.main_command(workdir, config_arg=str(sweep_file),
                                  extra=('--mode=sweep',), train__num_steps=2)
  out = test_sweep._run(command).stdout
  assert 'CV: evaluating lr0.001 fold ensemble on test' in out

  summary = json.loads((workdir / 'cv_summary.json').read_text())
  assert (workdir / 'cv_summary.md').exists()
  pooled = {}
  for entry in summary['configurations']:
    names = CONFIGS[entry['name']]
    assert entry['status'] == 'complete' and entry['folds'] == [0, 1]
    assert entry['runs'] == names
    rows = [_val_rows(workdir / n) for n in names]
    ids = [{r['case_id'] for r in fold} for fold in rows]
    assert ids[0] and ids[1] and not ids[0] & ids[1]  # Held-out folds.
    assert entry['fold_dice'] == pytest.approx([_mean_dice(f) for f in rows])
    pooled[entry['name']] = _mean_dice(rows[0] + rows[1])
    assert entry['pooled_dice'] == pytest.approx(pooled[entry['name']])
    # The fold ensemble (2 members) evaluated on the test split.
    test = workdir / names[0] / 'eval'
    ensembles = [json.loads((p / 'test' / 'summary.json').read_text())
                 for p in test.iterdir() if p.name.startswith('ensemble-')
                 and (p / 'test' / 'summary.json').exists()]
    assert [e['ensemble_size'] for e in ensembles] == [2]
    assert entry['ensemble_test']['mean'] == pytest.approx(_mean_dice(
        report.read_case_csv(entry['ensemble_test']['dir'] + '/cases.csv')))

  # The pair ensemble on each fold's val cases, and the pick among all three.
  pair_rows = []
  for fold in (0, 1):
    a, b = (workdir / names[fold] for names in CONFIGS.values())
    found = [p for p in (a / 'eval').iterdir()
             if (p / 'val' / 'cases.csv').exists() and
             p.name.startswith('ensemble-')]
    assert len(found) == 1
    pair_rows += report.read_case_csv(str(found[0] / 'val' / 'cases.csv'))
  pooled[PAIR] = _mean_dice(pair_rows)
  assert [p['name'] for p in summary['pairs']] == [PAIR]
  assert summary['pairs'][0]['pooled_dice'] == pytest.approx(pooled[PAIR])
  best = json.loads((workdir / 'best.json').read_text())
  assert best['name'] == max(pooled, key=pooled.get)
  assert best['pooled_cv_dice'] == pytest.approx(max(pooled.values()))
  assert '--mode=evaluate' in best['command'] and len(best['train_commands'])
  assert len(best['runs']) == 2 * len(best['name'].split(' + '))
  assert best['ensemble_test']['num_rows'] > 0  # Its folds together on test.

  # Rerun: nothing retrained or re-evaluated.
  stamps = {p: os.path.getmtime(p) for p in workdir.rglob('summary.json')}
  out = test_sweep._run(command).stdout
  assert 'CV: evaluating' not in out
  assert stamps == {p: os.path.getmtime(p)
                    for p in workdir.rglob('summary.json')}
