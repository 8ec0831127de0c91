"""Pure train and eval steps: (state, batch, rng) -> (state, metrics).

Built by `make_train_step` / `make_eval_step` from the model, optimiser and
config, then jitted once by the training loop. Metrics that must be exact over
devices and batches are returned as sums and reduced on the host at the end.
"""

import functools

import jax
import optax

from medseg_jax import losses
from medseg_jax import metrics
from medseg_jax.state import TrainState

def _loss_from_outputs(outputs, labels, loss_weights):
  """Returns the training loss of one model output or a deep-supervision list."""
  loss_fn = functools.partial(losses.combined_loss, weights=loss_weights)
  if isinstance(outputs, (list, tuple)):
    return losses.deep_supervision_loss(loss_fn, list(outputs), labels)
  return loss_fn(outputs, labels)


def make_train_step(model, tx: optax.GradientTransformation, loss_weights,
                    schedule: optax.Schedule):
  """Returns the pure training step.

  Args:
    model: the Flax module.
    tx: the optimiser that created `state.opt_state`.
    loss_weights: {loss name: weight}, see `losses.combined_loss`.
    schedule: the learning-rate schedule, for logging only.

  Returns:
    `train_step(state, batch, rng) -> (state, metrics)`; `batch` has `image`
    `[B, *spatial, C]` and `label` `[B, *spatial]`; randomness is
    `fold_in(rng, state.step)`, so a step is reproducible from its number.
  """
  loss_weights = dict(loss_weights)

  def train_step(state: TrainState, batch, rng):
    dropout_rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
      outputs, updates = model.apply(
          {'params': params, 'batch_stats': state.batch_stats},
          batch['image'], train=True, rngs={'dropout': dropout_rng},
          mutable=['batch_stats'])
      loss = _loss_from_outputs(outputs, batch['label'], loss_weights)
      return loss, updates.get('batch_stats', state.batch_stats)

    (loss, batch_stats), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=batch_stats, opt_state=opt_state)
    step_metrics = {
        'loss': loss,
        'l2_grads': optax.global_norm(grads),
        'l2_params': optax.global_norm(params),
        'lr': schedule(state.step),
    }
    return new_state, step_metrics

  return train_step


def make_eval_step(model, num_classes: int, threshold: float = 0.5):
  """Returns the pure evaluation step.

  Returns:
    `eval_step(state, batch) -> sums`: `metrics.case_metric_sums` of the
    batch's confusion counts, padding cases (`valid == 0`) left out. The sums
    add up over batches and devices; `summarize_eval_sums` turns their total
    into the reported metrics. A case with a label out of range gets NaN
    counts, which make the reported means NaN, never a perfect score.
  """

  def eval_step(state: TrainState, batch):
    logits = model.apply({'params': state.params,
                          'batch_stats': state.batch_stats},
                         batch['image'], train=False)
    predictions = metrics.predict_classes(logits, threshold=threshold)
    counts = metrics.confusion_counts(predictions, batch['label'], num_classes)
    return metrics.case_metric_sums(counts, batch['valid'])

  return eval_step


def summarize_eval_sums(sums) -> dict[str, float]:
  """Turns summed `eval_step` outputs (host NumPy) into the reported metrics.

  The project's one reducer, `metrics.summarize_sums` (see there): per
  metric in `metrics.CASE_METRICS` the mean over cases, `_std` and
  `_global`, plus 'num_cases'.
  """
  return metrics.summarize_sums(sums)
