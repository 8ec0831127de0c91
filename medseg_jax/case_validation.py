"""Whole-case validation during training (nnU-Net's final validation).

Validation in the loop (`train.evaluate`) scores what the evaluation
pipeline gives: whole images for photographs, but one foreground-centred
patch per case for runs trained on 3D patches, which flatters a model (a
run said Dice 0.918 on patches while the whole volumes scored 0.61). With
`config.train.case_val_every = k > 0`, every k-th evaluation (and the last
one) also predicts every validation case whole, exactly as `--mode=evaluate`
does (the run's `Predictor`: sliding windows of the training patch, slice by
slice for 2D-slice runs), without TTA or post-processing, and reduces the
per-case confusion counts as the loop's validation does. The loop logs the
result as split 'val_cases' and chooses the best checkpoint by its Dice.

    validator = CaseValidator(config, model, data, eval_every, total_steps)
    metrics = validator.maybe_run(state, step)  # None when not due
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from medseg_jax import config_lib
from medseg_jax import inference
from medseg_jax import metrics as metrics_lib
from medseg_jax import predictor as predictor_lib

SPLIT = 'val_cases'  # The split name of its records in metrics.jsonl.


def is_due(step: int, eval_every: int, total_steps: int, every: int) -> bool:
  """Whether the evaluation at `step` includes the whole-case validation.

  Args:
    step: the training step of an evaluation.
    eval_every: steps between evaluations.
    total_steps: the run's last step (always validated, so the last model
      is scored on whole cases too).
    every: `config.train.case_val_every` (0 = never).

  Returns:
    True for every `every`-th evaluation (counted from step 0, so resumes
    agree) and for the last step; False when `every` is 0.
  """
  if every <= 0:
    return False
  return step == total_steps or (step // eval_every) % every == 0


def _host_variables(state) -> dict:
  """The state's parameters and BatchNorm statistics as host NumPy arrays.

  Replicated global arrays hold a full copy on every device; one copy
  predicts on this process's first device, in every process alike.
  """
  fetch = lambda x: np.asarray(x.addressable_data(0))  # pylint: disable=unnecessary-lambda-assignment
  return {'params': jax.tree.map(fetch, state.params),
          'batch_stats': jax.tree.map(fetch, state.batch_stats)}


class _TrainingPredictor(predictor_lib.Predictor):
  """The run's Predictor, fed the variables of the state being trained.

  One jitted forward serves every validation (the variables are its
  argument), and labels are not post-processed: the checkpoint is chosen on
  the model's own output, so the post-processing settings, which only
  `--mode=evaluate`/`predict` read, cannot change which one is best.
  """

  def __init__(self, config, model):
    super().__init__(config, model, variables=None, step=0)
    self._jitted = self._predict_fn.jitted
    self._dummy_rng = jax.random.PRNGKey(0)

  def use(self, variables, step: int) -> None:
    """Predicts with `variables` (of training step `step`) from now on."""
    self.variables, self.members, self.step = variables, [variables], step
    jitted, rng = self._jitted, self._dummy_rng
    self._predict_fn = lambda x, rng_=None: jitted(
        variables, jnp.asarray(x, jnp.float32), rng)

  def labels(self, probabilities: np.ndarray) -> np.ndarray:
    """Returns the int32 label map `[*spatial]`, not post-processed."""
    return np.asarray(inference.labels_from_probabilities(
        probabilities, self.config.eval.threshold), np.int32)


def whole_case_data(config, data):
  """Returns the splits whose records are whole cases.

  A 2D-slice run's data set holds slices; its cases are the volumes, as
  `--mode=evaluate` scores them. Every other data set is returned as is.
  """
  if config_lib.slice_context(config) is None:
    return data
  # Deferred: evaluate imports matplotlib, which only slice runs need here.
  from medseg_jax import evaluate  # pylint: disable=import-outside-toplevel
  return evaluate.volume_cases(data)


def score_cases(predictor, data, split: str, num_classes: int) -> dict:
  """Predicts every case of `split` whole and returns the reduced metrics.

  Args:
    predictor: a Predictor (sliding windows / whole image / slices as the
      run's config says).
    data: DataSplits whose records are whole cases (`whole_case_data`).
    split: e.g. 'val'.
    num_classes: config.data.num_classes.

  Returns:
    The dict of `metrics.summarize_counts` over the split's cases ('dice',
    'iou', ..., 'num_cases'): the same reduction as the loop's validation.
  """
  counts = []
  for index in data.indices[split]:
    record = data.source[int(index)]
    prediction = predictor.predict_prepared(record['image'],
                                            uncertainty=False)
    counts.append(np.asarray(metrics_lib.confusion_counts(
        jnp.asarray(prediction.labels)[None],
        jnp.asarray(record['mask'])[None], num_classes)))
  return metrics_lib.summarize_counts(np.concatenate(counts))


class CaseValidator:
  """Whole-case validation of the state being trained, every k evaluations.

  Attributes:
    every: `config.train.case_val_every`.
  """

  def __init__(self, config, model, data, eval_every: int, total_steps: int):
    """Prepares the validation; nothing is predicted yet.

    Args:
      config: the run's config (`train.case_val_every` > 0).
      model: the run's Flax module.
      data: the run's DataSplits.
      eval_every: steps between evaluations.
      total_steps: the run's last step.

    Raises:
      ValueError: the validation split is empty.
    """
    self.every = int(config.train.case_val_every)
    if not data.size('val'):
      raise ValueError(
          f'config.train.case_val_every={self.every} needs validation cases, '
          'but the val split is empty: raise config.data.val_fraction (or '
          'use num_folds), or set config.train.case_val_every=0.')
    config = config_lib.with_overrides(
        config, {'eval.tta': False, 'eval.mc_samples': 0})
    self._num_classes = int(config.data.num_classes)
    self._eval_every, self._total_steps = eval_every, total_steps
    self._data = whole_case_data(config, data)
    self._predictor = _TrainingPredictor(config, model)

  def maybe_run(self, state, step: int) -> dict | None:
    """Returns the whole-case metrics at `step`, or None when not due.

    Args:
      state: the TrainState after `step` steps.
      step: the training step of this evaluation.

    Returns:
      The metrics of `score_cases`, plus 'seconds' (the time it took).
    """
    if not is_due(step, self._eval_every, self._total_steps, self.every):
      return None
    start = time.perf_counter()
    self._predictor.use(_host_variables(state), step)
    result = score_cases(self._predictor, self._data, 'val',
                         self._num_classes)
    result['seconds'] = time.perf_counter() - start  # What it costs.
    return result
