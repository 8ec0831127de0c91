"""The reports of a sweep: results.csv, results.md, plots and comparison.md.

Also what a run's sub-workdir says about it (`is_finished`), which
`medseg_jax.sweep` asks before it starts a run. Runs are `sweep.Run`s; this
module needs only their `name`, `overrides`, `config` and `workdir`.

Every number comes from the runs' workdirs: eval/test/summary.json and
cases.csv (written by --mode=evaluate) and metrics.jsonl (written by
training). Runs that did not finish get a row with status and NaN values,
and take no part in the plots and comparisons.
"""

import csv
import io
import itertools
import json
import math
import os

from matplotlib.figure import Figure
import numpy as np

from medseg_jax import fileio
from medseg_jax import metrics_log
from medseg_jax import paired_stats
from medseg_jax import plots
from medseg_jax import report

RESULT_COLUMNS = ('run', 'status', 'test_dice', 'test_dice_ci_low',
                  'test_dice_ci_high', 'test_iou', 'test_hd95',
                  'test_pixel_accuracy', 'val_dice_best', 'train_time_s',
                  'images_per_s', 'params')
FRACTION_KEY = 'data.train_fraction'
FRACTION_PLOT = 'dice_vs_train_fraction.png'  # Only when the sweep varies it.
CASES_PLOT = 'case_dice.png'
ALPHA = 0.05  # Family-wise error rate of the Holm-corrected comparisons.
# Written in a sub-workdir (by medseg_jax.sweep) once its training exited 0.
TRAINED_MARKER = 'sweep_trained'


def best_step(run_workdir: str) -> int | None:
  """Returns the step of the run's best checkpoint, or None."""
  path = os.path.join(run_workdir, 'checkpoints', 'best')
  steps = [int(s) for s in os.listdir(path) if s.isdigit()] if os.path.isdir(
      path) else []
  return max(steps) if steps else None


def read_test_summary(run_workdir: str) -> dict | None:
  """Returns the run's eval/test/summary.json, or None."""
  path = os.path.join(run_workdir, 'eval', 'test', 'summary.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def is_finished(run_workdir: str) -> bool:
  """Whether a run is trained and evaluated on test at its best checkpoint."""
  summary = read_test_summary(run_workdir)
  return (os.path.exists(os.path.join(run_workdir, TRAINED_MARKER)) and
          summary is not None and summary.get('step') == best_step(run_workdir))


def swept_keys(runs) -> list[str]:
  """Returns the dotted keys any run overrides, in first-seen order."""
  return list(dict.fromkeys(k for r in runs for k in r.overrides))


def pixel_accuracy(row: dict) -> float:
  """Returns (TP + TN) / all pixels of one case row, from what the row holds.

  cases.csv has sensitivity, specificity and the truth and predicted
  volumes, not the counts: TP = sensitivity * truth, FP = predicted - TP,
  TN = specificity / (1 - specificity) * FP. When the prediction has no
  false positive (specificity 1) TN is not recoverable: NaN, left out of the
  mean. Volumes in mm^3 give the same ratio as voxel counts.
  """
  sens, spec = float(row['sensitivity']), float(row['specificity'])
  truth, pred = float(row['truth_volume']), float(row['pred_volume'])
  tp = (sens if truth > 0 else 0.0) * truth
  fp = pred - tp
  if not all(map(math.isfinite, (tp, fp, spec))) or spec >= 1:
    return float('nan')
  tn = spec / (1 - spec) * fp
  total = truth + fp + tn
  return (tp + tn) / total if total > 0 else float('nan')


def _nanmean(values) -> float:
  v = np.asarray(list(values), np.float64)
  v = v[np.isfinite(v)]
  return float(v.mean()) if v.size else float('nan')


def training_figures(run_workdir: str) -> dict:
  """Returns val_dice_best, train_time_s and images_per_s from metrics.jsonl.

  train_time_s sums, over every start of the run, the wall time from its
  first to its last logged event (compilation of the first step and the
  time between an interruption and the resume are not counted).
  """
  records = metrics_log.read_metrics(run_workdir, keep_resumes=True)
  val = [r['dice'] for r in records if r.get('split') == 'val' and 'dice' in r]
  speed = [r['images_per_s'] for r in records
           if r.get('split') == 'train' and 'images_per_s' in r]
  total, start, last = 0.0, None, None
  for record in records:
    if record.get('split') == metrics_log.RESUME_SPLIT and start is not None:
      total += last - start
      start = None
    if start is None:
      start = record['time']
    last = record['time']
  if start is not None:
    total += last - start
  nan = float('nan')
  return {'val_dice_best': max(val) if val else nan,
          'train_time_s': total if records else nan,
          'images_per_s': float(np.median(speed)) if speed else nan}


def count_params(config) -> int:
  """Returns the number of model parameters (shapes only, nothing allocated)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from medseg_jax import config_lib  # pylint: disable=import-outside-toplevel
  from medseg_jax import models  # pylint: disable=import-outside-toplevel
  model = models.create_model(config.model, config.data.num_classes)
  shape = config_lib.model_input_shape(config)

  def init(rng):
    return model.init({'params': rng, 'dropout': rng},
                      jnp.zeros(shape, jnp.float32), train=False)['params']

  params = jax.eval_shape(init, jax.ShapeDtypeStruct((2,), jnp.uint32))
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


def case_rows(run) -> list[dict] | None:
  """Returns the run's eval/test/cases.csv rows, or None."""
  path = os.path.join(run.workdir, 'eval', 'test', 'cases.csv')
  return report.read_case_csv(path) if os.path.exists(path) else None


def result_row(run) -> dict:
  """Returns the results.csv row of one run (NaN where it has no result)."""
  row = {**run.overrides, 'run': run.name}
  row.update({k: float('nan') for k in RESULT_COLUMNS[2:]})
  finished = is_finished(run.workdir)
  row['status'] = 'finished' if finished else 'not finished'
  row['params'] = count_params(run.config)
  if os.path.exists(os.path.join(run.workdir, 'metrics.jsonl')):
    row.update(training_figures(run.workdir))
  rows = case_rows(run) if finished else None
  if rows is None:
    return row
  dice = report.metric_statistics([r['dice'] for r in rows])
  row.update(test_dice=dice['mean'], test_dice_ci_low=dice['ci_low'],
             test_dice_ci_high=dice['ci_high'],
             test_iou=_nanmean(r['iou'] for r in rows),
             test_hd95=_nanmean(r['hd95'] for r in rows),
             test_pixel_accuracy=_nanmean(pixel_accuracy(r) for r in rows))
  return row


def write_results_csv(rows: list[dict], keys: list[str], path: str) -> None:
  """Writes results.csv: one column per swept key, then RESULT_COLUMNS."""
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=[*keys, *RESULT_COLUMNS],
                          lineterminator='\n', restval='')
  writer.writeheader()
  writer.writerows(rows)
  fileio.write_text(path, buffer.getvalue())


def _pct(value) -> str:
  return '-' if not np.isfinite(value) else f'{100 * value:.2f}%'


def _num(value, fmt: str) -> str:
  return '-' if not np.isfinite(value) else format(value, fmt)


def _key_text(key: str, value) -> str:
  """A swept value as the table shows it: train fractions in percent."""
  if key == FRACTION_KEY and isinstance(value, (int, float)):
    return f'{100 * value:g}%'
  return str(value)


def results_markdown(rows: list[dict], keys: list[str]) -> str:
  """Returns seed 002's table, one row per run in sweep order."""
  head = [*keys, 'Dice (95% CI)', 'IoU', 'Pixel accuracy', 'HD95',
          'Val Dice (best)', 'Training time', 'Images/s', 'Params']
  lines = ['# Sweep results (test split)', '',
           '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    dice = (f'{_pct(r["test_dice"])} [{_pct(r["test_dice_ci_low"])}, '
            f'{_pct(r["test_dice_ci_high"])}]'
            if np.isfinite(r['test_dice']) else r['status'])
    minutes = r['train_time_s'] / 60
    cells = [*(_key_text(k, r.get(k, '')) for k in keys), dice,
             _pct(r['test_iou']),
             _pct(r['test_pixel_accuracy']), _num(r['test_hd95'], '.2f'),
             _pct(r['val_dice_best']),
             '-' if not np.isfinite(minutes) else (
                 f'{minutes:.1f} min' if minutes >= 1 else
                 f'{r["train_time_s"]:.0f} s'),
             _num(r['images_per_s'], '.1f'), f'{r["params"]:,}']
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += ['', 'Dice, IoU and HD95: mean over test cases (and classes); '
            'the 95% CI is the t-interval of the mean Dice. Pixel accuracy: '
            '(TP + TN) / pixels per case, recovered from sensitivity, '
            'specificity and volumes (cases with no false positive are left '
            'out, their TN being unknown). Training time: wall time of '
            'training and validation, without compilation.', '']
  return '\n'.join(lines)


def _factor(differ: list[str]) -> str | None:
  """The one thing two runs differ in: one key, or one model (model.name
  with its own model.* settings, e.g. each architecture at its widths)."""
  if len(differ) == 1:
    return differ[0]
  if 'model.name' in differ and all(k.startswith('model.') for k in differ):
    return 'model.name'
  return None


def comparable_pairs(runs) -> list[tuple[object, object, str]]:
  """Returns (a, b, key) for each pair of runs that differ in exactly one thing.

  One thing is one swept key, or the model (model.name together with other
  model.* keys). b comes after a in the sweep and is compared against a.
  """
  keys = swept_keys(runs)
  pairs = []
  for a, b in itertools.combinations(runs, 2):
    key = _factor([k for k in keys if a.overrides.get(k) != b.overrides.get(k)])
    if key is not None:
      pairs.append((a, b, key))
  return pairs


def _label(a, b, key: str) -> str:
  """'unetpp vs unet at data.train_fraction=1.0' (b vs a, the shared keys)."""
  va, vb = a.overrides.get(key), b.overrides.get(key)
  what = (f'{vb} vs {va}' if key == 'model.name' else
          f'{key}={vb} vs {key}={va}')
  shared = [f'{k}={v}' for k, v in a.overrides.items()
            if b.overrides.get(k) == v and k != key]
  return what + (f' at {", ".join(shared)}' if shared else '')


def comparisons(runs) -> tuple[list[dict], list[str]]:
  """Returns the paired Dice comparisons of comparable pairs, Holm-corrected.

  Only finished runs are compared; a pair evaluated on different test cases
  (e.g. a sweep over data.split_seed) is refused, not compared.

  Returns:
    (results, refused): each result is paired_stats.compare's dict plus
    'label', 'a', 'b', 'key', 'p_holm', 'significant'; refused holds one
    line per refused pair, saying why.
  """
  done = [r for r in runs if is_finished(r.workdir)]
  rows = {r.name: case_rows(r) for r in done}
  results, refused = [], []
  for a, b, key in comparable_pairs(done):
    try:
      stats = paired_stats.compare(rows[a.name], rows[b.name], 'dice',
                                   names=(a.name, b.name))
    except ValueError as e:  # Not the same test cases.
      refused.append(f'{_label(a, b, key)}: not compared. {e}')
      continue
    results.append({**stats, 'label': _label(a, b, key), 'a': a.name,
                    'b': b.name, 'key': key})
  adjusted, significant = paired_stats.holm([r['p_value'] for r in results],
                                            ALPHA)
  for result, p, sig in zip(results, adjusted, significant):
    result.update(p_holm=float(p), significant=bool(sig))
  return results, refused


def _points(value: float) -> str:
  return f'{100 * value:+.1f}'


def verdict(result: dict) -> str:
  """'unetpp vs unet at ...: +0.4 Dice points [-0.3, +1.1], not significant'.

  The Wilcoxon test is about ranks (a shift of the typical case), the CI
  about the mean: when the test is significant but the mean's CI holds 0
  (many small wins, a few large losses), the verdict says so.
  """
  word = 'significant' if result['significant'] else 'not significant'
  if result['significant'] and result['ci_low'] <= 0 <= result['ci_high']:
    word += (' by rank (Wilcoxon), though the CI of the mean difference '
             'holds 0')
  return (f'{result["label"]}: {_points(result["mean_diff"])} Dice points '
          f'[{_points(result["ci_low"])}, {_points(result["ci_high"])}], '
          f'{word} (Holm-adjusted p={result["p_holm"]:.3g}, n={result["n"]}, '
          f'{result["wins"]} cases up / {result["losses"]} down)')


def comparison_markdown(results: list[dict], refused=()) -> str:
  """Returns comparison.md: the table of comparisons, then the verdicts.

  Args:
    results: `comparisons`' results.
    refused: its lines about pairs that were not compared.
  """
  lines = [
      '# Paired comparisons (test Dice, case by case)', '',
      'For each pair of runs that differ in exactly one swept key (or in the '
      'model, with its own model.* settings): the mean '
      'of the per-case differences in Dice (the first named run minus the '
      'second, in Dice '
      'points), its bootstrap 95% CI (10,000 resamples of the cases, seed '
      '0), the Wilcoxon signed-rank p-value (two-sided, scipy.stats.wilcoxon) '
      f'and Holm\'s correction over all {len(results)} comparisons '
      f'(family-wise alpha {ALPHA}). Cases are matched by case_id and class.',
      '']
  notes = ['', '## Not compared', ''] + [f'- {line}' for line in refused] if (
      refused) else []
  if not results:
    return '\n'.join(lines + ['No pair of finished runs to compare.', *notes,
                              ''])
  lines += ['| Comparison | n | Mean diff (points) | 95% CI | Wins/losses | '
            'p (Wilcoxon) | p (Holm) | Significant |',
            '|---|---|---|---|---|---|---|---|']
  for r in results:
    lines.append(
        f'| {r["label"]} | {r["n"]} | {_points(r["mean_diff"])} | '
        f'[{_points(r["ci_low"])}, {_points(r["ci_high"])}] | '
        f'{r["wins"]}/{r["losses"]} | {r["p_value"]:.3g} | {r["p_holm"]:.3g} | '
        f'{"yes" if r["significant"] else "no"} |')
  lines += ['', '## Verdicts', ''] + [f'- {verdict(r)}' for r in results]
  return '\n'.join(lines + notes) + '\n'


def plot_dice_vs_fraction(rows: list[dict], keys: list[str],
                          path: str) -> bool:
  """Plots test Dice (95 % CI bars) against the train fraction, one line per
  combination of the other swept keys (e.g. per model).

  Returns:
    Whether it was written: only when the sweep varies data.train_fraction.
  """
  if FRACTION_KEY not in keys:
    return False
  others = [k for k in keys if k != FRACTION_KEY]
  lines = {}
  for r in rows:
    if np.isfinite(r['test_dice']):
      label = ', '.join(str(r.get(k)) for k in others) or 'test Dice'
      lines.setdefault(label, []).append(r)
  fig = Figure(figsize=(6, 4.5))
  ax = fig.subplots()
  for label, line in lines.items():
    line = sorted(line, key=lambda r: float(r[FRACTION_KEY]))
    x = [100 * float(r[FRACTION_KEY]) for r in line]
    y = np.array([r['test_dice'] for r in line])
    low = np.nan_to_num(y - [r['test_dice_ci_low'] for r in line])
    high = np.nan_to_num([r['test_dice_ci_high'] for r in line] - y)
    ax.errorbar(x, y, yerr=[low, high], marker='o', capsize=4, label=label)
  ax.set_xlabel('training data (%)')
  ax.set_ylabel('test Dice (mean, 95% CI)')
  ax.set_title('Test Dice against training data')
  ax.grid(alpha=0.3)
  if lines:
    ax.legend(fontsize=8)
  fig.tight_layout()
  plots.save_png(fig, path)
  return True


def plot_case_dice(runs, path: str) -> None:
  """Box plots of the per-case test Dice of the finished runs (sweep order)."""
  data = []
  for run in runs:
    rows = case_rows(run) if is_finished(run.workdir) else None
    values = np.array([r['dice'] for r in rows or []], np.float64)
    data.append((run.name, values[np.isfinite(values)]))
  fig = Figure(figsize=(max(6, 0.9 * len(data) + 2), 4.5))
  ax = fig.subplots()
  positions = np.arange(1, len(data) + 1)
  keep = [i for i, (_, v) in enumerate(data) if v.size]
  if keep:
    ax.boxplot([data[i][1] for i in keep], positions=positions[keep],
               widths=0.5, showfliers=False)
    jitter = np.random.default_rng(0)
    for i in keep:
      v = data[i][1]
      ax.plot(positions[i] + jitter.uniform(-0.12, 0.12, v.size), v, '.',
              alpha=0.6, markersize=4)
  ax.set_xticks(positions, [name for name, _ in data], rotation=30,
                ha='right', fontsize=8)
  ax.set_ylabel('test Dice per case')
  ax.set_title('Per-case test Dice')
  fig.tight_layout()
  plots.save_png(fig, path)


def write_reports(runs, workdir: str) -> list[dict]:
  """Writes results.csv, results.md, comparison.md and the plots of a sweep.

  Args:
    runs: the sweep's runs (`sweep.plan_runs`).
    workdir: the sweep workdir.

  Returns:
    The results.csv rows.
  """
  keys = swept_keys(runs)
  rows = [result_row(r) for r in runs]
  write_results_csv(rows, keys, os.path.join(workdir, 'results.csv'))
  fileio.write_text(os.path.join(workdir, 'results.md'),
                    results_markdown(rows, keys))
  fileio.write_text(os.path.join(workdir, 'comparison.md'),
                    comparison_markdown(*comparisons(runs)))
  plot_dice_vs_fraction(rows, keys, os.path.join(workdir, FRACTION_PLOT))
  plot_case_dice(runs, os.path.join(workdir, CASES_PLOT))
  return rows
