"""Cross-validation in a sweep: CV summary, fold ensembles, best configuration.

When a sweep varies `data.fold` (with data.num_folds > 1), the runs that
differ only in their fold form one *configuration*. After the runs finish,
`run_cv_evaluations` evaluates (each in a subprocess, skipped when done):

- every fold run on its `val` split (in CV, val is the held-out fold), into
  RUN/eval/val/;
- each configuration's fold ensemble on the test split
  (`--workdir=<fold 0> --ensemble=<fold 1>,...`), into
  FOLD0/eval/ensemble-<hash>/test/;
- for each pair of configurations with the same model and data settings
  (`pairable`: what `--ensemble` can average, e.g. two learning rates), the
  ensemble of their fold-k models on fold k's val cases, nnU-Net's
  `find_best_configuration` way (both fold-k models never saw those cases),
  into A_FOLDk/eval/ensemble-<hash>/val/. Pairs of different architectures
  are not ensembled: they are compared as single configurations.

`write_cv_reports` then writes cv_summary.md / cv_summary.json (mean +- std
over folds of the val Dice, the pooled per-case val Dice over all folds,
the fold ensemble's test Dice) and best.json: the single configuration or
pair ensemble with the highest pooled CV Dice, and the commands that
reproduce it. Everything is read back from the runs' cases.csv files.
"""

import itertools
import json
import math
import os
import shlex
import sys

import numpy as np

from medseg_jax import fileio
from medseg_jax import report
from medseg_jax import sweep_report

FOLD_KEY = 'data.fold'


def _config_key(overrides: dict) -> tuple:
  return tuple((k, repr(v)) for k, v in overrides.items() if k != FOLD_KEY)


def is_cv_sweep(runs) -> bool:
  """Whether the sweep varies data.fold over data.num_folds > 1 folds."""
  return any(FOLD_KEY in r.overrides and r.config.data.num_folds > 1
             for r in runs)


def cv_groups(runs) -> list[list]:
  """Returns the configurations of a CV sweep: lists of runs sorted by fold.

  A configuration is the runs whose overrides differ only in data.fold;
  groups are in first-seen sweep order. Runs without a fold are left out.
  """
  groups = {}
  for run in runs:
    if FOLD_KEY in run.overrides and run.config.data.num_folds > 1:
      groups.setdefault(_config_key(run.overrides), []).append(run)
  return [sorted(g, key=lambda r: r.config.data.fold) for g in groups.values()]


def config_overrides(group) -> dict:
  """Returns a configuration's overrides (its runs', without data.fold)."""
  return {k: v for k, v in group[0].overrides.items() if k != FOLD_KEY}


def config_name(group) -> str:
  """Returns a configuration's name: its fold-0 run's name without 'fold0'."""
  parts = [p for p in group[0].name.split('-')
           if not p.startswith('fold')]
  return '-'.join(parts) or 'base'


def _summary(out_dir: str) -> dict | None:
  path = os.path.join(out_dir, 'summary.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _is_current(out_dir: str, run_workdir: str) -> bool:
  """Whether out_dir holds an evaluation at the run's best checkpoint."""
  summary = _summary(out_dir)
  return (summary is not None and
          summary.get('step') == sweep_report.best_step(run_workdir))


def ensemble_dir(run, others, split: str) -> str:
  """Where `--workdir=run --ensemble=others --split=split` writes its reports.

  Args:
    run: the run whose workdir hosts the ensemble (its first member).
    others: the other members (runs).
    split: 'val' or 'test'.
  """
  from medseg_jax import evaluate  # pylint: disable=import-outside-toplevel
  return os.path.join(evaluate.eval_root(
      run.config, run.workdir, [o.workdir for o in others]), split)


def evaluate_command(run, split: str, others=()) -> list[str]:
  """Returns the `--mode=evaluate` argv of a run (with an ensemble)."""
  command = [sys.executable, '-m', 'medseg_jax.main', '--mode=evaluate',
             f'--workdir={os.path.abspath(run.workdir)}', f'--split={split}']
  if others:
    command.append('--ensemble=' + ','.join(
        os.path.abspath(o.workdir) for o in others))
  return command


def planned_evaluations(runs) -> list[tuple[str, object, list, str, str]]:
  """Returns the CV evaluations that are due and not yet done.

  Only configurations whose every fold is finished take part.

  Returns:
    (label, run, others, split, out_dir) per evaluation, in order: fold
    runs on val, fold ensembles on test, pair ensembles on val.
  """
  groups = [g for g in cv_groups(runs)
            if all(sweep_report.is_finished(r.workdir) for r in g)]
  due = []
  for group in groups:
    for run in group:
      due.append((f'{run.name} on val', run, [], 'val',
                  os.path.join(run.workdir, 'eval', 'val')))
  for group in groups:
    if len(group) > 1:
      due.append((f'{config_name(group)} fold ensemble on test', group[0],
                  group[1:], 'test', ensemble_dir(group[0], group[1:], 'test')))
  for a, b in itertools.combinations(groups, 2):
    if pairable(a, b):
      for ra, rb in zip(a, b):
        due.append((f'{ra.name} + {rb.name} on val', ra, [rb], 'val',
                    ensemble_dir(ra, [rb], 'val')))
  return [d for d in due if not _is_current(d[4], d[1].workdir)]


def pairable(a, b) -> bool:
  """Whether two configurations can be ensembled fold by fold.

  `--ensemble` averages models of one architecture on one data pipeline:
  the fold-k runs of both must have the same model and data settings (so
  the same held-out patients). Configurations that differ in the model or
  the data (e.g. unet vs unetpp) are compared as single configurations only.
  """
  if len(a) != len(b):
    return False
  return all(ra.config.model.to_dict() == rb.config.model.to_dict() and
             ra.config.data.to_dict() == rb.config.data.to_dict()
             for ra, rb in zip(a, b))


def run_cv_evaluations(runs, run_logged, env=None) -> dict[str, str]:
  """Runs the due CV evaluations (`planned_evaluations`), one at a time.

  Args:
    runs: the sweep's runs.
    run_logged: `sweep._run_logged(command, log_path, env) -> exit status`.
    env: the environment of the subprocesses.

  Returns:
    {label: 'finished' or an error line naming the log}.
  """
  outcomes = {}
  env = {**os.environ, **(env or {})}
  for label, run, others, split, out_dir in planned_evaluations(runs):
    print(f'  CV: evaluating {label}', flush=True)
    log = os.path.join(run.workdir, 'sweep_cv_evaluate.log')
    status = run_logged(evaluate_command(run, split, others), log, env)
    outcomes[label] = ('finished' if status == 0 else
                       f'CV evaluation failed (exit {status}); see {log}')
  # A pair ensemble picked as best: all its fold models together on test
  # (a single configuration's fold ensemble is evaluated above already).
  best = cv_summary(runs)['best']
  if best and best['kind'] == 'ensemble':
    by_name = {r.name: r for r in runs}
    members = [by_name[n] for n in best['runs']]
    out_dir = ensemble_dir(members[0], members[1:], 'test')
    if not _is_current(out_dir, members[0].workdir):
      label = f'best ensemble {best["name"]} on test'
      print(f'  CV: evaluating {label}', flush=True)
      log = os.path.join(members[0].workdir, 'sweep_cv_evaluate.log')
      status = run_logged(evaluate_command(members[0], 'test', members[1:]),
                          log, env)
      outcomes[label] = ('finished' if status == 0 else
                         f'CV evaluation failed (exit {status}); see {log}')
  return outcomes


def _rows(out_dir: str) -> list[dict] | None:
  path = os.path.join(out_dir, 'cases.csv')
  return report.read_case_csv(path) if os.path.exists(path) else None


def _dice_mean(rows) -> float:
  values = np.array([r['dice'] for r in rows], np.float64)
  values = values[np.isfinite(values)]
  return float(values.mean()) if values.size else float('nan')


def pool_folds(fold_rows: list[list[dict]]) -> dict:
  """Pools the per-case val rows of all folds of one configuration.

  Args:
    fold_rows: per fold, its val cases.csv rows (`report.read_case_csv`).

  Returns:
    {'fold_dice': mean Dice per fold, 'mean', 'std' (over folds, ddof=1;
    0 with one fold), 'pooled_dice' (mean over every fold's rows together),
    'num_cases'}. NaN Dice rows are left out of every mean.

  Raises:
    ValueError: a case appears in the val rows of two folds (the folds
      overlap, so pooling would count it twice).
  """
  seen = {}
  for fold, rows in enumerate(fold_rows):
    for row in rows:
      key = (str(row['case_id']), int(row['class_index']))
      if key in seen:
        raise ValueError(f'Case {key[0]!r} (class {key[1]}) is in the val '
                         f'split of folds {seen[key]} and {fold}: CV folds '
                         'must hold out disjoint patients.')
      seen[key] = fold
  per_fold = [_dice_mean(rows) for rows in fold_rows]
  pooled = _dice_mean([r for rows in fold_rows for r in rows])
  std = float(np.std(per_fold, ddof=1)) if len(per_fold) > 1 else 0.0
  return {'fold_dice': per_fold, 'mean': float(np.mean(per_fold)),
          'std': std, 'pooled_dice': pooled,
          'num_cases': len({k[0] for k in seen})}


def select_best(candidates: list[dict]) -> dict | None:
  """Returns the candidate with the highest pooled CV Dice (NaN ones never).

  Ties go to the first listed: singles are listed before pair ensembles, so
  a pair must be strictly better than every single configuration, as in
  nnU-Net's find_best_configuration.

  Args:
    candidates: dicts with at least 'pooled_dice'.
  """
  finite = [c for c in candidates if math.isfinite(c['pooled_dice'])]
  return max(finite, key=lambda c: c['pooled_dice']) if finite else None


def _test_dice(out_dir: str) -> dict | None:
  rows = _rows(out_dir)
  if rows is None:
    return None
  stats = report.metric_statistics([r['dice'] for r in rows])
  return {'mean': stats['mean'], 'ci_low': stats['ci_low'],
          'ci_high': stats['ci_high'], 'num_rows': len(rows),
          'dir': out_dir}


def _train_commands(group) -> list[str]:
  from medseg_jax import config_lib  # pylint: disable=import-outside-toplevel
  return [shlex.join([
      'python', '-m', 'medseg_jax.main', '--mode=train',
      f'--config={config_lib.RUN_CONFIG}:{os.path.abspath(r.workdir)}',
      f'--workdir={os.path.abspath(r.workdir)}']) for r in group]


def cv_summary(runs) -> dict:
  """Returns the CV summary and the best-configuration candidates.

  Returns:
    {'configurations': [per configuration: name, overrides, folds, runs,
    val Dice per fold, mean, std, pooled_dice, num_cases, ensemble_test
    (or None)], 'pairs': [per evaluated pair: names, pooled_dice],
    'best': `select_best` over both (or None)}. Configurations whose folds
    are not all evaluated on val are listed with status 'incomplete'.
  """
  configurations, complete = [], []
  for group in cv_groups(runs):
    entry = {'name': config_name(group), 'overrides': config_overrides(group),
             'folds': [r.config.data.fold for r in group],
             'runs': [r.name for r in group]}
    rows = [_rows(os.path.join(r.workdir, 'eval', 'val')) for r in group]
    if any(r is None for r in rows):
      configurations.append({**entry, 'status': 'incomplete'})
      continue
    entry.update(status='complete', **pool_folds(rows))
    entry['ensemble_test'] = (_test_dice(ensemble_dir(
        group[0], group[1:], 'test')) if len(group) > 1 else None)
    entry['kind'] = 'single'
    configurations.append(entry)
    complete.append((group, entry))
  pairs = []
  for (ga, ea), (gb, eb) in itertools.combinations(complete, 2):
    if not pairable(ga, gb):
      continue
    rows = [_rows(ensemble_dir(ra, [rb], 'val')) for ra, rb in zip(ga, gb)]
    if any(r is None for r in rows):
      continue
    pairs.append({'kind': 'ensemble', 'name': f'{ea["name"]} + {eb["name"]}',
                  'configurations': [ea['name'], eb['name']],
                  'overrides': [ea['overrides'], eb['overrides']],
                  **pool_folds(rows)})
  best = select_best([e for _, e in complete] + pairs)
  return {'configurations': configurations, 'pairs': pairs,
          'best': best and _best_record(best, complete)}


def _best_record(best: dict, complete) -> dict:
  """best.json: what was picked, its pooled CV Dice, commands to reproduce."""
  names = best.get('configurations', [best['name']])
  groups = [g for g, e in complete if e['name'] in names]
  members = [r for g in groups for r in g]
  return {
      'kind': best['kind'], 'name': best['name'],
      'overrides': best['overrides'], 'pooled_cv_dice': best['pooled_dice'],
      'cv_dice_mean': best['mean'], 'cv_dice_std': best['std'],
      'num_cases': best['num_cases'], 'runs': [r.name for r in members],
      # The test Dice of all its fold models together (None until evaluated).
      'ensemble_test': _test_dice(ensemble_dir(members[0], members[1:],
                                               'test')) if len(members) > 1
                       else None,
      'train_commands': [c for g in groups for c in _train_commands(g)],
      'command': shlex.join(['python', *evaluate_command(
          members[0], 'test', members[1:])[1:]]),
  }


def _pct(value) -> str:
  return '-' if value is None or not math.isfinite(value) else (
      f'{100 * value:.2f}%')


def cv_markdown(summary: dict) -> str:
  """Returns cv_summary.md: one row per configuration, then pairs and best."""
  lines = ['# Cross-validation summary', '',
           '| Configuration | Folds | Val Dice per fold | Mean ± std '
           '(folds) | Pooled val Dice | Cases | Fold ensemble test Dice '
           '(95% CI) |', '|---|---|---|---|---|---|---|']
  for c in summary['configurations']:
    if c['status'] != 'complete':
      lines.append(f'| {c["name"]} | {c["folds"]} | incomplete | - | - | - '
                   '| - |')
      continue
    test = c['ensemble_test']
    test_text = (f'{_pct(test["mean"])} [{_pct(test["ci_low"])}, '
                 f'{_pct(test["ci_high"])}]' if test else '-')
    lines.append(
        f'| {c["name"]} | {c["folds"]} | '
        f'{", ".join(_pct(d) for d in c["fold_dice"])} | '
        f'{_pct(c["mean"])} ± {_pct(c["std"])} | {_pct(c["pooled_dice"])} | '
        f'{c["num_cases"]} | {test_text} |')
  if summary['pairs']:
    lines += ['', '## Ensembles of two configurations (pooled val Dice)', '',
              '| Ensemble | Pooled val Dice |', '|---|---|']
    lines += [f'| {p["name"]} | {_pct(p["pooled_dice"])} |'
              for p in summary['pairs']]
  best = summary['best']
  lines += ['', '## Best configuration', '']
  lines.append(f'{best["name"]} ({best["kind"]}): pooled CV Dice '
               f'{_pct(best["pooled_cv_dice"])}. Reproduce: `{best["command"]}`'
               if best else 'None: no configuration has every fold evaluated.')
  lines += ['', 'Val Dice: mean over the held-out fold\'s cases (and '
            'classes); std over folds with ddof=1. Pooled: mean over every '
            'fold\'s val cases together (each non-test patient is in exactly '
            'one fold). Pair ensembles average the probabilities of both '
            'configurations\' fold-k models on fold k\'s val cases; only pairs with '
            'the same model and data settings are ensembled (--ensemble '
            'averages one architecture), others compete as single '
            'configurations.', '']
  return '\n'.join(lines)


def write_cv_reports(runs, workdir: str) -> dict | None:
  """Writes cv_summary.md/.json and best.json when the sweep is a CV sweep.

  Args:
    runs: the sweep's runs.
    workdir: the sweep workdir.

  Returns:
    The summary (`cv_summary`), or None when the sweep varies no fold.
  """
  if not is_cv_sweep(runs):
    return None
  summary = cv_summary(runs)
  ready = report._json_ready  # pylint: disable=protected-access
  fileio.write_text(os.path.join(workdir, 'cv_summary.json'),
                    json.dumps(ready(summary), indent=2) + '\n')
  fileio.write_text(os.path.join(workdir, 'cv_summary.md'),
                    cv_markdown(summary))
  if summary['best']:
    fileio.write_text(os.path.join(workdir, 'best.json'),
                      json.dumps(ready(summary['best']), indent=2) + '\n')
  return summary
