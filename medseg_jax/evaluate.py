"""`--mode=evaluate`: per-case metrics, statistics, report and plots of a run.

    python -m medseg_jax.main --mode=evaluate --workdir=runs/x [--split=test]

loads the best checkpoint (or `--checkpoint=latest`, `--step=N`) into the
run's `Predictor`, predicts every case of the split as the data source gives
it (whole image, or sliding window when the run trained on patches; slice by
slice for a run trained on 2D slices of volumes; flip TTA and
post-processing as `config.eval` says), and writes under
`WORKDIR/eval/<split>/` (locked while written):

  cases.csv          one row per case and foreground class
  summary.json       mean, std, median, 95% CI per metric and class; ECE
  summary.md         the same as a Markdown table
  cases.png          best / median / worst cases, truth and prediction overlaid
  distributions.png  metric distributions
  training.png       training loss and validation Dice from metrics.jsonl
  reliability.png    reliability diagram
  subgroups.csv/.png with eval.subgroups: per-group Dice, gaps, forest plot
  decision_curve.*   with eval.decision: net benefit, decision_cases.csv,
  roc_pr.png         case-level ROC/PR of the max foreground probability
  comparison.md/.png external data only: against the run's internal test
                     split (clinical.py, external_report.py)

Runs in one process on the first local device. Other data settings (e.g.
`--config.data.root=/other/site`, with or without `--config`) evaluate on an
external data set, as long as the model part of the config is the run's; its
files go to `WORKDIR/eval/external-<hash of the data settings>/<split>/`, so
they never replace the run's own reports. summary.json records the data and
eval settings used.
"""

import hashlib
import json
import os

import numpy as np

from medseg_jax import calibration as calibration_lib
from medseg_jax import clinical
from medseg_jax import config_lib
from medseg_jax import decision_curve
from medseg_jax import plots
from medseg_jax import predictor as predictor_lib
from medseg_jax import register_cases
from medseg_jax import report
from medseg_jax import workdir as workdir_lib
from medseg_jax.data import pipeline
from medseg_jax.data import sources
from medseg_jax.data import splits as splits_lib


def volume_cases(data: pipeline.DataSplits) -> pipeline.DataSplits:
  """Returns the volumes of a data set of 2D slices, split as their slices.

  A run trained on slices is evaluated per volume (the slices predicted and
  restacked), as nnU-Net's 2D configuration is.

  Args:
    data: the splits of a `SliceSource`.

  Returns:
    The same splits over its volume source.
  """
  slices = data.source
  indices = {split: np.array(sorted({slices.locate(int(i))[0] for i in idx}),
                             dtype=np.int64)
             for split, idx in data.indices.items()}
  return pipeline.DataSplits(source=slices.volumes, indices=indices)


def predict_split(predictor, data, split: str):
  """Yields (record, Prediction) for every case of `split`, in order.

  Args:
    predictor: the run's Predictor.
    data: the DataSplits (of volumes, for a 2D-slice run).
    split: 'train', 'val' or 'test'.
  """
  for index in data.indices[split]:
    record = dict(data.source[int(index)])
    yield record, predictor.predict_prepared(record['image'],
                                             uncertainty=False)


# Data settings that change how cases are loaded, not which cases they are.
_DATA_LOADING_KEYS = ('augment', 'augment_on', 'cache', 'cache_dir', 'check',
                      'worker_count', 'prefetch_buffer_size')


def _case_defining_data(data_dict: dict) -> dict:
  return {k: v for k, v in data_dict.items() if k not in _DATA_LOADING_KEYS}


def _short_hash(value) -> str:
  text = json.dumps(value, sort_keys=True)
  return hashlib.sha1(text.encode()).hexdigest()[:8]


def eval_root(config, workdir: str, ensemble=()) -> str:
  """Returns where a split's reports go: WORKDIR/eval[/external-<h>][/ensemble-<h>].

  The data set is the run's when `config.data` equals the data section of
  the run's config.json, up to loading settings (cache, workers, checks);
  other data go to `external-<hash>`. An ensemble with the runs `ensemble`
  goes to `ensemble-<hash of their paths>`, beside the run's own reports.
  """
  saved = workdir_lib.config_as_json_dict(
      workdir_lib.load_config(workdir))['data']
  current = workdir_lib.config_as_json_dict(config)['data']
  root = os.path.join(workdir, 'eval')
  if _case_defining_data(saved) != _case_defining_data(current):
    root = os.path.join(root,
                        'external-' + _short_hash(_case_defining_data(current)))
  if ensemble:
    paths = sorted(os.path.abspath(w) for w in ensemble)
    root = os.path.join(root, 'ensemble-' + _short_hash(paths))
  return root


def _panel_label(labels: np.ndarray, truth: np.ndarray):
  """Returns (slice index or None, the predicted labels to plot), compact.

  The grid of best, median and worst cases is chosen after every case is
  scored; keeping this (one slice of a volume) avoids predicting them again.
  """
  labels = labels.astype(np.uint8 if labels.max(initial=0) < 256 else
                         np.int32)
  if truth.ndim != 3:
    return None, labels
  z = plots.representative_slice_index(truth, labels)
  return z, labels[z]


def _case_panels(data, split: str, rows, kept: dict) -> list:
  """Returns the (image, truth, pred, title) panels of the plotted cases."""
  by_id = {data.source.case_ids[int(i)]: int(i) for i in data.indices[split]}
  panels = []
  for case_id in plots.pick_best_median_worst(rows, k=3):
    if case_id not in kept:
      continue
    record = data.source[by_id[case_id]]
    z, pred = kept[case_id]
    image, truth = record['image'], record['mask']
    if z is not None:
      image, truth = image[z], truth[z]
    dice = next(r['dice'] for r in rows if r['case_id'] == case_id)
    panels.append((image, truth, pred, f'{case_id}  Dice {dice:.3f}'))
  return panels


def _physical_spacing(config, record):
  """The case's spacing in mm, or None for photographs (reports say pixels)."""
  return None if sources.is_photo(config.data) else record.get('spacing')


def evaluate_split(predictor, workdir: str, data, split: str,
                   out_dir: str, metadata=None) -> dict:
  """Predicts a split and writes its reports and plots into `out_dir`.

  Args:
    predictor: the run's Predictor.
    workdir: the run's workdir (its metrics.jsonl is plotted).
    data: the DataSplits (of volumes, for a 2D-slice run).
    split: the split to evaluate.
    out_dir: the folder of the reports (created).
    metadata: {case_id: {column: value}} for eval.subgroups / eval.decision
      (`clinical.check_metadata`).

  Returns:
    The summary written to summary.json.
  """
  config = predictor.config
  num_classes = config.data.num_classes
  rows, calibration, kept = [], calibration_lib.CalibrationAccumulator(), {}
  max_probs = {}  # Case-level scores from the very predictions scored.
  for record, prediction in predict_split(predictor, data, split):
    case_id = record['case_id']
    rows.extend(report.case_metrics(
        prediction.labels, record['mask'], num_classes,
        spacing=_physical_spacing(config, record), case_id=case_id,
        class_names=sources.class_names(config.data),
        nsd_tolerance=config.eval.nsd_tolerance_mm or None))
    calibration.add(prediction.probabilities, record['mask'])
    max_probs[case_id] = decision_curve.max_foreground_probability(
        prediction.probabilities)
    kept[case_id] = _panel_label(prediction.labels, record['mask'])
  summary = report.summarize(rows)
  summary['calibration'] = calibration.summary()
  summary.update(clinical.analyses(config, rows, max_probs, metadata or {}))
  settings = workdir_lib.config_as_json_dict(config)
  summary.update(split=split, step=int(predictor.step),
                 workdir=os.path.abspath(workdir),
                 num_cases=len(data.indices[split]),
                 ensemble_size=len(predictor.members),
                 config={'data': settings['data'], 'eval': settings['eval']})
  os.makedirs(out_dir, exist_ok=True)
  clinical.write_reports(summary, out_dir)
  report.write_case_csv(rows, os.path.join(out_dir, 'cases.csv'))
  report.write_summary(
      summary, os.path.join(out_dir, 'summary.json'),
      os.path.join(out_dir, 'summary.md'),
      title=f'{config.model.name}, {split} split, step {predictor.step}')
  plots.plot_case_grid(_case_panels(data, split, rows, kept),
                       os.path.join(out_dir, 'cases.png'))
  plots.plot_metric_distributions(rows, os.path.join(out_dir,
                                                     'distributions.png'))
  history = workdir_lib.read_metrics(workdir)
  if history:
    plots.plot_training_curves(history, os.path.join(out_dir, 'training.png'))
  plots.plot_reliability(summary['calibration'],
                         os.path.join(out_dir, 'reliability.png'))
  return summary


def _checkpoint_flags(which: str, step, ensemble) -> str:
  """The command-line flags that pick this evaluation's model."""
  flags = '' if which == 'best' else f' --checkpoint={which}'
  flags += '' if step is None else f' --step={step}'
  return flags + (f' --ensemble={",".join(ensemble)}' if ensemble else '')


def evaluate_run(config, workdir: str, split: str = 'test',
                 which: str = 'best', step=None,
                 ensemble=()) -> dict[str, dict]:
  """Evaluates a trained run on one split (or 'all'); prints and writes reports.

  Each split's folder is locked while it is written, so two evaluations of
  the same run and split never mix their files (the second is refused).

  Args:
    config: the run's config (or another data set's, same model).
    workdir: the run's workdir.
    split: 'train', 'val', 'test' or 'all'.
    which: 'best', 'latest' or 'best_ema' checkpoint (best_ema's reports go
      to <eval root>/best_ema/<split>/).
    step: a step to load instead of the newest.
    ensemble: other runs' workdirs whose models are averaged with this one's
      (their `which` checkpoints), e.g. the other folds.

  Returns:
    {split: summary dict}.
  """
  wanted = splits_lib.SPLITS if split == 'all' else (split,)
  for name in wanted:
    if name not in splits_lib.SPLITS:
      raise ValueError(f'--split={split!r}: use one of '
                       f'{", ".join(splits_lib.SPLITS)} or all.')
  predictor = predictor_lib.Predictor.from_workdir(
      workdir, which, step, ensemble, config=config)
  data = pipeline.build_splits(config.data)
  register_cases.attach(data.source, config.data)  # As in training.
  if config_lib.slice_context(config) is not None:
    data = volume_cases(data)
  metadata = clinical.check_metadata(config, data.source)  # Before predicting.
  root = eval_root(config, workdir, ensemble)
  if which == 'best_ema':  # Beside, never over, the raw parameters' reports.
    root = os.path.join(root, 'best_ema')
  results = {}
  for name in wanted:
    if not data.size(name):
      print(f'The {name} split is empty; skipped.')
      continue
    out_dir = os.path.join(root, name)
    with workdir_lib.acquire_lock(out_dir, f'--mode=evaluate --split={name}'):
      results[name] = evaluate_split(predictor, workdir, data, name, out_dir,
                                     metadata)
      comparison = clinical.compare_external(
          workdir, root, out_dir, _checkpoint_flags(which, step, ensemble))
    print(report.summary_text(results[name]))
    if comparison:
      print(comparison)
    print(f'Written to {os.path.abspath(out_dir)}')
  return results
