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
from medseg_jax import optim
from medseg_jax.state import TrainState

def _loss_from_outputs(outputs, labels, loss_weights):
  """Returns the training loss of one model output or a deep-supervision list."""
  loss_fn = functools.partial(losses.combined_loss, weights=loss_weights)
  if isinstance(outputs, (list, tuple)):
    return losses.deep_supervision_loss(loss_fn, list(outputs), labels)
  return loss_fn(outputs, labels)


def make_train_step(model, tx: optax.GradientTransformation, loss_weights,
                    schedule: optax.Schedule, grad_accum_steps: int = 1,
                    augment=None):
  """Returns the pure training step.

  Args:
    model: the Flax module.
    tx: the optimiser that created `state.opt_state`.
    loss_weights: {loss name: weight}, see `losses.combined_loss`.
    schedule: the learning-rate schedule, for logging only.
    grad_accum_steps: k > 1 splits the global batch into k micro-batches,
      run one after another (`lax.scan`), and applies one update with the
      mean of their gradients: the memory of a batch of B / k. The loss is
      the mean of the micro-batch losses (equal to the full batch's for
      losses that are means over cases). BatchNorm then normalises with
      micro-batch statistics, and its running statistics are updated k
      times per step, as k forward passes in PyTorch would. Micro-batch i
      holds cases i, i + k, i + 2k, ... so every device contributes the same
      number of cases to each.
    augment: None, or `device_augment.make_batch_augment(...)`: a function
      of the batch (with `position`) returning the augmented, normalised
      `image` and `label`, run first inside the step (on-device
      augmentation, `config.data.augment_on='device'`).

  Returns:
    `train_step(state, batch, rng) -> (state, metrics)`; `batch` has `image`
    `[B, *spatial, C]` and `label` `[B, *spatial]`; randomness is
    `fold_in(rng, state.step)`, so a step is reproducible from its number.
  """
  loss_weights = dict(loss_weights)

  def grads_of(params, batch_stats, batch, dropout_rng):
    """(loss, new batch_stats), grads of one (micro-)batch."""

    def loss_fn(params):
      outputs, updates = model.apply(
          {'params': params, 'batch_stats': batch_stats},
          batch['image'], train=True, rngs={'dropout': dropout_rng},
          mutable=['batch_stats'])
      loss = _loss_from_outputs(outputs, batch['label'], loss_weights)
      return loss, updates.get('batch_stats', batch_stats)

    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  def accumulated_grads(state, batch, dropout_rng):
    """(loss, batch_stats), grads: means over k micro-batches in a scan."""
    k = grad_accum_steps
    micro = jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]),
                               0, 1), batch)

    def body(carry, i_batch):
      batch_stats, loss_sum, grad_sum = carry
      i, one = i_batch
      (loss, batch_stats), grads = grads_of(
          state.params, batch_stats, one,
          jax.random.fold_in(dropout_rng, i))
      grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
      return (batch_stats, loss_sum + loss, grad_sum), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (batch_stats, loss_sum, grad_sum), _ = jax.lax.scan(
        body, (state.batch_stats, jnp.zeros((), jnp.float32), zeros),
        (jnp.arange(k), micro))
    grads = jax.tree.map(lambda g: g / k, grad_sum)
    return (loss_sum / k, batch_stats), grads

  def train_step(state: TrainState, batch, rng):
    if augment is not None:
      batch = augment(batch)
    dropout_rng = jax.random.fold_in(rng, state.step)
    if grad_accum_steps == 1:
      (loss, batch_stats), grads = grads_of(state.params,
                                            state.batch_stats, batch,
                                            dropout_rng)
    else:
      (loss, batch_stats), grads = accumulated_grads(state, batch,
                                                     dropout_rng)
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
    scale = optim.plateau_scale(state.opt_state)
    if scale is not None:  # Reduce-on-plateau's cut, on top of the schedule.
      step_metrics['lr'] = step_metrics['lr'] * scale
    return new_state, step_metrics

  return train_step


def make_eval_step(model, num_classes: int, threshold: float = 0.5):
  """Returns the pure evaluation step.

  Returns:
    `eval_step(state, batch) -> sums`: `metrics.case_metric_sums` of the
    batch's confusion counts, padding cases (`valid == 0`) left out. The sums
    add up over batches and devices; `metrics.summarize_sums` turns their total
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
