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
from medseg_jax.data import volume_sources
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


def _saved_steps(workdir: str, which: str) -> list[int]:
  directory = os.path.join(workdir, 'checkpoints', which)
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(n) for n in names if n.isdigit())


def checkpoint_kind(workdir: str, which: str, step) -> str:
  """Returns 'best' or 'latest': `which`, or the kind that holds `step`.

  `--step=N` loads step N from the best checkpoints when it is there, else
  from the latest ones (the best directory keeps only one step).

  Raises:
    FileNotFoundError: no checkpoint of that step; lists the saved steps.
  """
  if step is None:
    return which
  kinds = (which, 'latest' if which == 'best' else 'best')
  for kind in kinds:
    if int(step) in _saved_steps(workdir, kind):
      return kind
  saved = '; '.join(f'{k}: {_saved_steps(workdir, k) or "none"}'
                    for k in kinds)
  raise FileNotFoundError(
      f'No checkpoint of step {step} in '
      f'{os.path.join(workdir, "checkpoints")} (saved steps, {saved}). Pass '
      'one of those to --step, or leave --step out.')


def load_model(config, workdir: str, which: str = 'best', step=None):
  """Returns (model, variables, step) of a trained run, on one device.

  Args:
    config: the run's config (model and data sections are used).
    workdir: the run's workdir.
    which: 'best' or 'latest'.
    step: a step to load (from `which`, else from the other kind); the
      newest of `which` when None.
  """
  model = models.create_model(config.model, config.data.num_classes)
  which = checkpoint_kind(workdir, which, step)
  state, step = checkpoint_lib.load_state_arrays(workdir, which, step)
  variables = {'params': state['params']}
  if state.get('batch_stats'):
    variables['batch_stats'] = state['batch_stats']
  abstract = registry.abstract_variables(model, model_input_shape(config))
  abstract = {k: v for k, v in abstract.items() if k in variables}
  _check_variables_match(variables, abstract, workdir)
  return model, variables, step


def slice_context(config) -> int | None:
  """Returns `slice_context` of a run trained on 2D slices of volumes, else None."""
  data = config.data
  if data.source == 'nifti' and data.get('volume_mode', '3d') == '2d':
    return int(data.get('slice_context', 0))
  return None


def volume_channels(config) -> int:
  """Returns the channels of the volumes the run takes (before slice context)."""
  context = slice_context(config)
  return config.data.in_channels // (2 * context + 1) if context is not None \
      else config.data.in_channels


def as_model_input(config, image: np.ndarray) -> np.ndarray:
  """Returns the image a case predictor takes: for a run trained on slices,
  every slice of the volume `[D, H, W, C]` with its context as channels."""
  context = slice_context(config)
  if context is None:
    return image
  return volume_sources.stack_slice_context(image, context)


def volume_cases(data: pipeline.DataSplits) -> pipeline.DataSplits:
  """Returns the volumes of a data set of 2D slices, split as their slices.

  A run trained on slices is evaluated per volume (the slices predicted and
  restacked), as nnU-Net's 2D configuration is.
  """
  slices = data.source
  indices = {split: np.array(sorted({slices.locate(int(i))[0] for i in idx}),
                             dtype=np.int64)
             for split, idx in data.indices.items()}
  return pipeline.DataSplits(source=slices.volumes, indices=indices)


def load_ensemble_members(config, workdirs, which: str = 'best') -> list:
  """Returns the variables of each run in `workdirs` (an ensemble's others).

  Each run must have trained the model `config` describes (same
  `config.model`, classes and channels), e.g. the folds of a
  cross-validation; its `which` checkpoint is loaded.

  Raises:
    ValueError: a run with another model, naming it and the differing keys.
    FileNotFoundError: a run without checkpoints.
  """
  members = []
  for other in workdirs:
    if not os.path.exists(os.path.join(other, 'config.json')):
      raise FileNotFoundError(f'--ensemble: {other!r} has no config.json; '
                              'give the workdirs of trained runs.')
    workdir_lib.check_same_model(other, config)
    members.append(load_model(config, other, which)[1])
  return members


def make_case_predictor(config, model, variables):
  """Returns `predict(image [*spatial, C] float32) -> probabilities [*spatial, K]`.

  Whole-image prediction (padded to the model's divisor) for runs trained on
  whole images; sliding windows of the training patch otherwise. Flip TTA
  when `config.eval.tta`. For a run trained on slices of volumes, `image` is
  `as_model_input` of a volume, `[D, H, W, C']`: each slice is predicted
  and the probabilities restacked to `[D, H, W, K]`.

  `variables` may be a list (an ensemble): the members' probabilities are
  averaged at every window / flip.
  """
  eval_cfg = config.eval
  if isinstance(variables, (list, tuple)):
    predict_fn = inference.make_ensemble_predict_fn(model, variables)
  else:
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
    predict_2d_or_3d = predict
    predict = lambda image: inference.tta_flips(predict_2d_or_3d, image)
  if slice_context(config) is not None:
    per_slice = predict
    return lambda volume: np.stack(
        [np.asarray(per_slice(s), np.float32) for s in volume])
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


def normalizer(config):
  """Returns `record -> record` applying the eval transforms of training."""
  ops = transforms_lib.build_eval_transforms(config.data.mean, config.data.std)
  return lambda record: _apply(ops, record)


def _apply(ops, record: dict) -> dict:
  for op in ops:
    record = op.map(record)
  return record


def predict_split(config, model, variables, data, split: str):
  """Yields (record, probabilities, labels) for every case of `split`."""
  predict = make_case_predictor(config, model, variables)
  normalize = normalizer(config)
  threshold = config.eval.threshold
  for index in data.indices[split]:
    record = dict(data.source[int(index)])
    image = normalize({'image': as_model_input(config,
                                               record['image'])})['image']
    probs = np.asarray(predict(image), np.float32)
    labels = inference.labels_from_probabilities(probs, threshold)
    yield record, probs, postprocess_labels(np.asarray(labels), config.eval)


def _class_names(config, num_classes: int):
  names = config.data.get('class_names', None)
  return tuple(names) if names else None


# Data settings that change how cases are loaded, not which cases they are.
_DATA_LOADING_KEYS = ('augment', 'cache', 'cache_dir', 'check', 'worker_count',
                      'prefetch_buffer_size')


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
  saved = workdir_lib.saved_config_dict(workdir).get('data', {})
  current = workdir_lib.config_as_json_dict(config)['data']
  root = os.path.join(workdir, 'eval')
  if _case_defining_data(saved) != _case_defining_data(current):
    root = os.path.join(root,
                        'external-' + _short_hash(_case_defining_data(current)))
  if ensemble:
    paths = sorted(os.path.abspath(w) for w in ensemble)
    root = os.path.join(root, 'ensemble-' + _short_hash(paths))
  return root


def evaluate_split(config, workdir: str, model, variables, data, split: str,
                   step: int, out_dir: str) -> dict:
  """Writes a split's reports and plots into `out_dir`; returns its summary."""
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
  settings = workdir_lib.config_as_json_dict(config)
  members = len(variables) if isinstance(variables, (list, tuple)) else 1
  summary.update(split=split, step=int(step), workdir=os.path.abspath(workdir),
                 num_cases=len(data.indices[split]), ensemble_size=members,
                 config={'data': settings['data'], 'eval': settings['eval']})
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
                 which: str = 'best', step=None,
                 ensemble=()) -> dict[str, dict]:
  """Evaluates a trained run on one split (or 'all'); prints and writes reports.

  Args:
    config: the run's config (or another data set's, same model).
    workdir: the run's workdir.
    split: 'train', 'val', 'test' or 'all'.
    which: 'best' or 'latest' checkpoint.
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
  model, variables, step = load_model(config, workdir, which, step)
  if ensemble:
    variables = [variables, *load_ensemble_members(config, ensemble, which)]
  data = pipeline.build_splits(config.data)
  if slice_context(config) is not None:
    data = volume_cases(data)
  root = eval_root(config, workdir, ensemble)
  results = {}
  for name in wanted:
    if not data.size(name):
      print(f'The {name} split is empty; skipped.')
      continue
    out_dir = os.path.join(root, name)
    results[name] = evaluate_split(config, workdir, model, variables, data,
                                   name, step, out_dir)
    print(report.summary_text(results[name]))
    print(f'Written to {os.path.abspath(out_dir)}')
  return results
