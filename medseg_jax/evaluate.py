"""`--mode=evaluate`: per-case metrics, statistics, report and plots of a run.

    python -m medseg_jax.main --mode=evaluate --workdir=runs/x [--split=test]

loads the best checkpoint (or `--checkpoint=latest`, `--step=N`), predicts
every case of the split with the inference engine (whole image, or sliding
window when the run trained on patches; flip TTA and post-processing as
`config.eval` says), and writes under `WORKDIR/eval/<split>/`:

  cases.csv          one row per case and foreground class
  summary.json       mean, std, median, 95% CI per metric and class; ECE
  summary.md         the same as a Markdown table
  cases.png          best / median / worst cases, truth and prediction overlaid
  distributions.png  metric distributions
  training.png       training loss and validation Dice from metrics.jsonl
  reliability.png    reliability diagram

Runs in one process on the first local device. Passing `--config` with other
data settings (e.g. `--config.data.root=/other/site`) evaluates on an external
data set, as long as the model part of the config is the run's.
"""

import os

import jax
import numpy as np

from medseg_jax import checkpoint as checkpoint_lib
from medseg_jax import inference
from medseg_jax import models
from medseg_jax import plots
from medseg_jax import postprocess
from medseg_jax import report
from medseg_jax import train
from medseg_jax import workdir as workdir_lib
from medseg_jax.data import pipeline
from medseg_jax.data import splits as splits_lib
from medseg_jax.data import transforms as transforms_lib
from medseg_jax.models import registry


def model_input_shape(config) -> tuple[int, ...]:
  """Returns the `[1, *spatial, C]` shape the model was initialised with."""
  return (1, *train.spatial_shape(config.data), config.data.in_channels)


def _check_variables_match(variables, abstract, workdir: str) -> None:
  """Raises a clear error if the checkpoint's arrays are not the model's."""
  def shapes(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): tuple(np.shape(leaf))
            for path, leaf in flat}

  saved, wanted = shapes(variables), shapes(abstract)
  if saved != wanted:
    diff = sorted(set(saved.items()) ^ set(wanted.items()))[:5]
    raise ValueError(
        f'The checkpoint in {workdir!r} does not fit the model of this config '
        f'(first differences: {diff}). Evaluate with the config the run was '
        'trained with (leave --config out to use its config.json).')


def load_model(config, workdir: str, which: str = 'best', step=None):
  """Returns (model, variables, step) of a trained run, on one device.

  Args:
    config: the run's config (model and data sections are used).
    workdir: the run's workdir.
    which: 'best' or 'latest'.
    step: a step to load; the newest of `which` when None.
  """
  model = models.create_model(config.model, config.data.num_classes)
  state, step = checkpoint_lib.load_state_arrays(workdir, which, step)
  variables = {'params': state['params']}
  if state.get('batch_stats'):
    variables['batch_stats'] = state['batch_stats']
  abstract = registry.abstract_variables(model, model_input_shape(config))
  abstract = {k: v for k, v in abstract.items() if k in variables}
  _check_variables_match(variables, abstract, workdir)
  return model, variables, step


def make_case_predictor(config, model, variables):
  """Returns `predict(image [*spatial, C] float32) -> probabilities [*spatial, K]`.

  Whole-image prediction (padded to the model's divisor) for runs trained on
  whole images; sliding windows of the training patch otherwise. Flip TTA
  when `config.eval.tta`.
  """
  eval_cfg = config.eval
  predict_fn = inference.make_predict_fn(model, variables)
  patch = tuple(config.data.get('patch_size', ()) or ())
  divisor = inference.input_divisor(model)

  def predict(image):
    if patch:
      return inference.sliding_window(
          predict_fn, image, patch,
          overlap=eval_cfg.get('overlap', 0.5),
          blend=eval_cfg.get('blend', 'gaussian'),
          batch_size=eval_cfg.get('sw_batch_size', 4))
    return inference.predict_whole(predict_fn, image, divisor)

  if eval_cfg.get('tta', False):
    return lambda image: inference.tta_flips(predict, image)
  return predict


def postprocess_labels(labels: np.ndarray, eval_cfg) -> np.ndarray:
  """Applies the post-processing `config.eval.postprocess` asks for."""
  post = eval_cfg.get('postprocess', None)
  if not post:
    return labels
  if post.get('fill_holes', False):
    labels = postprocess.fill_holes(labels)
  if post.get('min_size', 0):
    labels = postprocess.remove_small_components(labels, post.min_size)
  if post.get('largest_component', False):
    labels = postprocess.keep_largest_component(labels)
  return labels


def _normalizer(config):
  """Returns the eval transforms of training (image scaling, mask -> label)."""
  ops = transforms_lib.build_eval_transforms(config.data.mean, config.data.std)
  return lambda record: _apply(ops, record)


def _apply(ops, record: dict) -> dict:
  for op in ops:
    record = op.map(record)
  return record


def predict_split(config, model, variables, data, split: str):
  """Yields (record, probabilities, labels) for every case of `split`."""
  predict = make_case_predictor(config, model, variables)
  normalize = _normalizer(config)
  threshold = config.eval.threshold
  for index in data.indices[split]:
    record = dict(data.source[int(index)])
    image = normalize({'image': record['image']})['image']
    probs = np.asarray(predict(image), np.float32)
    labels = inference.labels_from_probabilities(probs, threshold)
    yield record, probs, postprocess_labels(np.asarray(labels), config.eval)


def _class_names(config, num_classes: int):
  names = config.data.get('class_names', None)
  return tuple(names) if names else None


def evaluate_split(config, workdir: str, model, variables, data, split: str,
                   step: int) -> dict:
  """Evaluates one split and writes its files; returns the summary."""
  out_dir = os.path.join(workdir, 'eval', split)
  os.makedirs(out_dir, exist_ok=True)
  num_classes = config.data.num_classes
  rows, calibration = [], report.CalibrationAccumulator()
  for record, probs, labels in predict_split(config, model, variables, data,
                                             split):
    rows.extend(report.case_metrics(
        labels, record['mask'], num_classes,
        spacing=record.get('spacing'), case_id=record['case_id'],
        class_names=_class_names(config, num_classes)))
    calibration.add(probs, record['mask'])
  summary = report.summarize(rows)
  summary['calibration'] = calibration.summary()
  summary.update(split=split, step=int(step), workdir=os.path.abspath(workdir),
                 num_cases=len(data.indices[split]))
  report.write_case_csv(rows, os.path.join(out_dir, 'cases.csv'))
  report.write_summary(summary, os.path.join(out_dir, 'summary.json'),
                       os.path.join(out_dir, 'summary.md'),
                       title=f'{config.model.name}, {split} split, step {step}')
  _write_plots(config, workdir, model, variables, data, split, rows, summary,
               out_dir)
  return summary


def _write_plots(config, workdir, model, variables, data, split, rows,
                 summary, out_dir) -> None:
  """Writes the case grid, distributions, training curves and reliability."""
  case_ids = plots.pick_best_median_worst(rows, k=3)
  by_id = {data.source.case_ids[int(i)]: int(i) for i in data.indices[split]}
  chosen = pipeline.DataSplits(
      source=data.source, indices={split: np.array([by_id[c] for c in case_ids
                                                    if c in by_id])})
  panels = []
  for record, _, labels in predict_split(config, model, variables, chosen,
                                         split):
    image, truth, pred = record['image'], record['mask'], labels
    if truth.ndim == 3:
      image, truth, pred = plots.representative_slice(image, truth, pred)
    dice = next(r['dice'] for r in rows if r['case_id'] == record['case_id'])
    panels.append((image, truth, pred, f'{record["case_id"]}  Dice {dice:.3f}'))
  plots.plot_case_grid(panels, os.path.join(out_dir, 'cases.png'))
  plots.plot_metric_distributions(rows, os.path.join(out_dir,
                                                     'distributions.png'))
  history = workdir_lib.read_metrics(workdir)
  if history:
    plots.plot_training_curves(history, os.path.join(out_dir, 'training.png'))
  plots.plot_reliability(summary['calibration'],
                         os.path.join(out_dir, 'reliability.png'))


def evaluate_run(config, workdir: str, split: str = 'test',
                 which: str = 'best', step=None) -> dict[str, dict]:
  """Evaluates a trained run on one split (or 'all'); prints and writes reports.

  Returns:
    {split: summary dict}.
  """
  wanted = splits_lib.SPLITS if split == 'all' else (split,)
  for name in wanted:
    if name not in splits_lib.SPLITS:
      raise ValueError(f'--split={split!r}: use one of '
                       f'{", ".join(splits_lib.SPLITS)} or all.')
  model, variables, step = load_model(config, workdir, which, step)
  data = pipeline.build_splits(config.data)
  results = {}
  for name in wanted:
    if not data.size(name):
      print(f'The {name} split is empty; skipped.')
      continue
    results[name] = evaluate_split(config, workdir, model, variables, data,
                                   name, step)
    print(report.summary_text(results[name]))
    print(f'Written to {os.path.join(os.path.abspath(workdir), "eval", name)}')
  return results
