"""Tests of medseg_jax.steps on a tiny model: one train step equals an optax
update written out by hand; the eval step's sums equal NumPy counts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from medseg_jax import losses
from medseg_jax import optim
from medseg_jax import state as state_lib
from medseg_jax import steps
from tests import conftest


class DropoutNet(nn.Module):
  """Conv -> BatchNorm -> Dropout -> Conv: uses batch stats and dropout."""
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool):
    # No conv bias before BatchNorm: its gradient is zero up to rounding,
    # and Adam would turn that rounding noise into a full-size step.
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(
        nn.Conv(4, (3, 3), use_bias=False)(x)))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Conv(self.num_classes, (1, 1))(x)


def _batch(num_classes, seed=0, batch=2, size=6):
  rng = np.random.default_rng(seed)
  return {'image': jnp.asarray(rng.normal(size=(batch, size, size, 2)),
                               jnp.float32),
          'label': jnp.asarray(rng.integers(0, max(num_classes, 2),
                                            size=(batch, size, size)),
                               jnp.int32)}


def _state(model, tx, shape, seed=1):
  init = state_lib.init_fn(model, tx, shape)
  return jax.jit(init)(jax.random.key(seed))


def test_train_step_equals_a_hand_rolled_optax_update():
  model = DropoutNet(num_classes=3)
  tx = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-2))
  batch = _batch(3)
  state = _state(model, tx, (1, 6, 6, 2))
  state = state.replace(step=jnp.asarray(7, jnp.int32))
  rng = jax.random.key(42)
  schedule = lambda count: 0.5 * count  # only logged

  def hand_loss(params):
    # Dropout draws from fold_in(rng, step): step 7 here.
    out, updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'],
        train=True, rngs={'dropout': jax.random.fold_in(rng, 7)},
        mutable=['batch_stats'])
    loss = (1.0 * losses.soft_dice_loss(out, batch['label']) +
            0.5 * losses.cross_entropy_loss(out, batch['label']))
    return loss, updates['batch_stats']

  @jax.jit
  def hand_step():
    (loss, stats), grads = jax.value_and_grad(hand_loss, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return loss, stats, grads, optax.apply_updates(state.params, updates)

  want_loss, want_stats, want_grads, want_params = hand_step()
  train_step = jax.jit(steps.make_train_step(model, tx, {'dice': 1.0,
                                                         'ce': 0.5}, schedule))
  new_state, metrics = train_step(state, batch, rng)

  assert int(new_state.step) == 8
  np.testing.assert_allclose(metrics['loss'], want_loss, rtol=1e-6)
  np.testing.assert_allclose(metrics['lr'], 3.5, rtol=1e-6)
  np.testing.assert_allclose(metrics['l2_grads'],
                             optax.global_norm(want_grads), rtol=1e-5)
  np.testing.assert_allclose(metrics['l2_params'],
                             optax.global_norm(want_params), rtol=1e-5)
  for tree, want in [(new_state.params, want_params),
                     (new_state.batch_stats, want_stats)]:
    assert jax.tree.structure(tree) == jax.tree.structure(want)
    for got, exp in zip(jax.tree.leaves(tree), jax.tree.leaves(want)):
      np.testing.assert_allclose(got, exp, rtol=1e-6, atol=1e-6)
  # The step really moved the parameters (a no-op would also be "equal"
  # to a hand update that does nothing).
  moved = [float(jnp.abs(a - b).max()) for a, b in
           zip(jax.tree.leaves(new_state.params),
               jax.tree.leaves(state.params))]
  assert min(moved) > 1e-4
  # A different dropout draw gives a different loss: the rng is used.
  other_state, other = train_step(state.replace(step=jnp.asarray(8)),
                                  batch, rng)
  del other_state
  assert abs(float(other['loss']) - float(want_loss)) > 1e-6


def _hand_counts(predictions, labels, num_classes):
  """[B, C, 4] (tp, fp, fn, tn) per case and class, in NumPy."""
  classes = [1] if num_classes == 1 else range(num_classes)
  out = np.zeros((len(predictions), len(classes), 4))
  for b, (p, t) in enumerate(zip(predictions, labels)):
    for i, c in enumerate(classes):
      out[b, i] = [np.sum((p == c) & (t == c)), np.sum((p == c) & (t != c)),
                   np.sum((p != c) & (t == c)), np.sum((p != c) & (t != c))]
  return out


def _hand_dice(counts):
  tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
  denominator = 2 * tp + fp + fn
  return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 1.0)


def _check_eval_step(num_classes, valid, thresholds=(0.5,)):
  """Checks the eval step's sums against NumPy; returns its counts.

  A threshold given as 'median' is the median foreground probability of the
  first case (36 pixels): exactly 18 of them lie above it.
  """
  model = DropoutNet(num_classes=num_classes)
  state = _state(model, optax.sgd(0.1), (1, 6, 6, 2))
  batch = _batch(num_classes, seed=3, batch=len(valid))
  batch['valid'] = jnp.asarray(valid, jnp.int32)
  logits = np.asarray(jax.jit(model.apply, static_argnames='train')(
      {'params': state.params, 'batch_stats': state.batch_stats},
      batch['image'], train=False), np.float64)
  labels = np.asarray(batch['label'])
  keep = np.asarray(valid, bool)
  all_counts = []
  for threshold in thresholds:
    if num_classes == 1:
      probs = 1 / (1 + np.exp(-logits[..., 0]))
      if threshold == 'median':
        threshold = float(np.median(probs[0]))
      predictions = (probs > threshold).astype(int)
    else:
      predictions = logits.argmax(-1)
    per_case = _hand_counts(predictions, labels, num_classes)
    sums = jax.jit(steps.make_eval_step(model, num_classes, threshold))(
        state, batch)
    assert float(sums['num_cases']) == keep.sum()
    # The counts of the scored classes (class 0 dropped for K >= 2).
    foreground = per_case if num_classes == 1 else per_case[:, 1:]
    np.testing.assert_array_equal(np.asarray(sums['counts']),
                                  foreground[keep].sum(0))
    dice = _hand_dice(foreground).mean(-1)
    np.testing.assert_allclose(sums['dice_sum'], dice[keep].sum(), rtol=1e-6)
    np.testing.assert_allclose(sums['dice_sq_sum'], (dice[keep]**2).sum(),
                               rtol=1e-6)
    # Each pixel of a valid case is counted once per class (6 x 6 pixels).
    np.testing.assert_array_equal(np.asarray(sums['counts']).sum(-1),
                                  keep.sum() * 36)
    all_counts.append(np.asarray(sums['counts']))
  return all_counts


def test_eval_step_counts_multiclass_with_padding_case():
  # The last case is padding (valid 0): it must add nothing.
  _check_eval_step(num_classes=3, valid=[1, 1, 0])


def test_eval_step_counts_binary_threshold():
  at_half, at_median = _check_eval_step(num_classes=1, valid=[1, 0],
                                        thresholds=(0.5, 'median'))
  # At the median, half the pixels of the valid case are predicted
  # foreground (tp + fp), and the counts differ from those at 0.5.
  assert at_median[0, 0] + at_median[0, 1] == 18
  assert not np.array_equal(at_half, at_median)


class PlainNet(nn.Module):
  """Conv -> ReLU -> Conv, no normalisation: a batch is a sum of its cases."""
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    return nn.Conv(self.num_classes, (1, 1))(nn.relu(nn.Conv(4, (3, 3))(x)))


def test_gradient_accumulation_over_two_half_batches_equals_the_full_batch():
  model = PlainNet(num_classes=3)
  tx = optax.sgd(1.0)
  batch = _batch(3, seed=5, batch=4)
  state = _state(model, tx, (1, 6, 6, 2))
  rng = jax.random.key(0)
  weights = {'dice': 1.0, 'ce': 0.5}
  full_state, full = jax.jit(steps.make_train_step(
      model, tx, weights, lambda c: 0.0))(state, batch, rng)
  accum_state, accum = jax.jit(steps.make_train_step(
      model, tx, weights, lambda c: 0.0, grad_accum_steps=2))(state, batch,
                                                              rng)
  np.testing.assert_allclose(accum['loss'], full['loss'], rtol=1e-6)
  np.testing.assert_allclose(accum['l2_grads'], full['l2_grads'], rtol=1e-5)
  for got, want in zip(jax.tree.leaves(accum_state.params),
                       jax.tree.leaves(full_state.params)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Not trivially equal: one half-batch alone gives another update.
  half = jax.tree.map(lambda x: x[::2], batch)
  half_state, _ = jax.jit(steps.make_train_step(
      model, tx, weights, lambda c: 0.0))(state, half, rng)
  gap = max(float(jnp.abs(a - b).max()) for a, b in
            zip(jax.tree.leaves(half_state.params),
                jax.tree.leaves(full_state.params)))
  assert gap > 1e-3


def test_gradient_accumulation_with_batch_norm_and_dropout_runs():
  # BatchNorm sees micro-batches (documented): the running statistics are
  # updated once per micro-batch, so they differ from the full batch's.
  model = DropoutNet(num_classes=1)
  tx = optax.adam(1e-2)
  batch = _batch(1, seed=6, batch=4)
  state = _state(model, tx, (1, 6, 6, 2))
  rng = jax.random.key(1)
  accum_state, metrics = jax.jit(steps.make_train_step(
      model, tx, {'ce': 1.0}, lambda c: 0.0, grad_accum_steps=2))(
          state, batch, rng)
  full_state, _ = jax.jit(steps.make_train_step(
      model, tx, {'ce': 1.0}, lambda c: 0.0))(state, batch, rng)
  assert np.isfinite(float(metrics['loss'])) and int(accum_state.step) == 1
  stats = jax.tree.leaves(accum_state.batch_stats)
  assert not all(np.allclose(a, b) for a, b in
                 zip(stats, jax.tree.leaves(full_state.batch_stats)))


def test_ema_of_the_parameters_follows_the_recursion():
  # ema_0 = initial params; ema_t = d * ema_(t-1) + (1 - d) * params_t, with
  # params_t the parameters after step t. The EMA leaves training unchanged.
  decay = 0.8
  model = PlainNet(num_classes=1)
  cfg = conftest.set_fields(conftest.tiny_config().optim, {
      'name': 'sgd', 'momentum': 0.9, 'nesterov': True, 'lr': 0.5})
  schedule = optax.constant_schedule(0.5)
  with_ema = optim.create_optimizer(cfg, schedule, ema_decay=decay)
  without = optim.create_optimizer(cfg, schedule)
  state = _state(model, with_ema, (1, 6, 6, 2))
  plain = _state(model, without, (1, 6, 6, 2))
  step_ema = jax.jit(steps.make_train_step(model, with_ema, {'ce': 1.0},
                                           schedule), donate_argnums=0)
  step_plain = jax.jit(steps.make_train_step(model, without, {'ce': 1.0},
                                             schedule))
  rng = jax.random.key(2)
  expected = jax.tree.map(np.asarray, state.params)
  for i in range(3):
    batch = _batch(1, seed=10 + i, batch=2)
    state, _ = step_ema(state, batch, rng)
    plain, _ = step_plain(plain, batch, rng)
    params = jax.tree.map(np.asarray, state.params)
    expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                            expected, params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(plain.params)):
      np.testing.assert_array_equal(a, b)
  ema = optim.ema_params(state.opt_state)
  for got, want, now in zip(jax.tree.leaves(ema), jax.tree.leaves(expected),
                            jax.tree.leaves(state.params)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert float(np.abs(np.asarray(now) - want).max()) > 1e-4  # not params
