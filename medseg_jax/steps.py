"""Pure train and eval steps: (state, batch, rng) -> (state, metrics).

Built by `make_train_step` / `make_eval_step` from the model, optimiser and
config, then jitted once by the training loop. Metrics that must be exact over
devices and batches are returned as sums and reduced on the host at the end.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from medseg_jax import losses
from medseg_jax import metrics
from medseg_jax.state import TrainState

# Per-case overlap metrics reported at evaluation; each maps counts -> value.
CASE_METRICS = {
    'dice': metrics.dice_from_counts,
    'iou': metrics.iou_from_counts,
    'sensitivity': metrics.sensitivity_from_counts,
    'specificity': metrics.specificity_from_counts,
    'precision': metrics.precision_from_counts,
}


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
    `eval_step(state, batch) -> sums`: for every metric in `CASE_METRICS`, the
    sum over valid cases of the per-case value (mean over foreground classes)
    and of its square; `num_cases`; and `counts`, the confusion counts summed
    over valid cases, `[C, 4]` (tp, fp, fn, tn). Padding cases (`valid == 0`)
    contribute nothing.
  """

  def eval_step(state: TrainState, batch):
    logits = model.apply({'params': state.params,
                          'batch_stats': state.batch_stats},
                         batch['image'], train=False)
    predictions = metrics.predict_classes(logits, threshold=threshold)
    counts = metrics.confusion_counts(predictions, batch['label'], num_classes)
    valid = batch['valid'].astype(jnp.float32)
    foreground = counts if num_classes == 1 else counts[:, 1:]
    sums = {'num_cases': valid.sum(),
            'counts': (counts * valid[:, None, None]).sum(axis=0)}
    for name, fn in CASE_METRICS.items():
      per_case = fn(foreground).mean(axis=-1)
      sums[f'{name}_sum'] = (per_case * valid).sum()
      sums[f'{name}_sq_sum'] = (per_case**2 * valid).sum()
    return sums

  return eval_step


def summarize_eval_sums(sums) -> dict[str, float]:
  """Turns summed eval outputs (host NumPy) into mean/std per metric.

  Returns:
    {'dice': mean per-case Dice, 'dice_std': ..., ..., 'dice_global': Dice of
    the counts summed over the split (mean over foreground classes),
    'num_cases': n}.
  """
  n = float(sums['num_cases'])
  out = {'num_cases': n}
  for name in CASE_METRICS:
    mean = float(sums[f'{name}_sum']) / n
    var = max(0.0, float(sums[f'{name}_sq_sum']) / n - mean**2)
    out[name] = mean
    out[f'{name}_std'] = var**0.5
  counts = jnp.asarray(sums['counts'])
  foreground = counts if counts.shape[0] == 1 else counts[1:]
  out['dice_global'] = float(metrics.dice_from_counts(foreground).mean())
  return out
