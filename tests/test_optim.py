"""Tests of medseg_jax.optim: schedule values worked out by hand (cosine, poly),
the weight-decay mask, gradient clipping, SGD with Nesterov momentum and
reduce-on-plateau seen through the optimiser's updates."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medseg_jax import optim
from tests import conftest

LR = 0.1


def _optim_cfg(**overrides):
  """configs/default.py's `optim` block with `overrides`."""
  cfg = conftest.tiny_config().optim
  cfg.lr = LR
  return conftest.set_fields(cfg, overrides)


def _values(schedule, steps):
  return [float(schedule(jnp.asarray(s))) for s in steps]


def test_cosine_schedule_with_warmup_at_known_steps():
  # Warmup 10 steps from 0 to LR, then cosine over the 100 steps left down
  # to LR * min_lr_ratio: LR * (a + (1 - a) * (1 + cos(pi * t / 100)) / 2).
  schedule = optim.learning_rate_schedule(
      _optim_cfg(schedule='cosine', min_lr_ratio=0.01), total_steps=110,
      warmup_steps=10)
  quarter = LR * (0.01 + 0.99 * (1 + math.cos(math.pi / 4)) / 2)
  np.testing.assert_allclose(
      _values(schedule, [0, 5, 10, 35, 60, 110, 500]),
      [0.0, LR / 2, LR, quarter, LR * 0.505, LR * 0.01, LR * 0.01],
      rtol=1e-5, atol=1e-9)


def test_constant_schedule_and_no_warmup():
  constant = optim.learning_rate_schedule(
      _optim_cfg(schedule='constant'), total_steps=100, warmup_steps=4)
  np.testing.assert_allclose(_values(constant, [0, 1, 4, 50, 99]),
                             [0.0, LR / 4, LR, LR, LR], rtol=1e-6)
  cosine = optim.learning_rate_schedule(
      _optim_cfg(schedule='cosine', min_lr_ratio=0.0), total_steps=100,
      warmup_steps=0)
  np.testing.assert_allclose(_values(cosine, [0, 50, 100]), [LR, LR / 2, 0.0],
                             rtol=1e-6, atol=1e-9)


def test_warmup_longer_than_training_is_clipped():
  # warmup 10 > total 5: the ramp reaches LR at step 5, not at step 10.
  schedule = optim.learning_rate_schedule(
      _optim_cfg(schedule='constant'), total_steps=5, warmup_steps=10)
  np.testing.assert_allclose(_values(schedule, [1, 5]), [LR / 5, LR],
                             rtol=1e-6)


def test_unknown_schedule_and_optimizer_are_named():
  with pytest.raises(ValueError, match=r"config.optim.schedule='linear'"):
    optim.learning_rate_schedule(_optim_cfg(schedule='linear'),
                                 total_steps=10, warmup_steps=0)
  with pytest.raises(ValueError, match=r"config.optim.name='lion'"):
    optim.create_optimizer(_optim_cfg(name='lion'),
                           optax.constant_schedule(LR))


def _params():
  """A conv kernel, a dense kernel, a bias and a norm scale (all 2.0)."""
  return {'conv': {'kernel': jnp.full((3, 3, 2, 4), 2.0),
                   'bias': jnp.full((4,), 2.0)},
          'dense': {'kernel': jnp.full((4, 2), 2.0)},
          'norm': {'scale': jnp.full((4,), 2.0)}}


def _one_update(cfg, grads_fn=jnp.zeros_like):
  params = _params()
  tx = optim.create_optimizer(cfg, optax.constant_schedule(LR))
  state = tx.init(params)
  grads = {k: {n: grads_fn(v) for n, v in d.items()} for k, d in params.items()}
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def test_weight_decay_only_on_kernels():
  # Zero gradients: Adam's step is 0, so only decoupled decay moves a
  # parameter: p - LR * wd * p = 2 - 0.1 * 0.5 * 2 = 1.9 where rank > 1.
  new, _ = _one_update(_optim_cfg(name='adamw', weight_decay=0.5))
  np.testing.assert_allclose(new['conv']['kernel'], 1.9, rtol=1e-6)
  np.testing.assert_allclose(new['dense']['kernel'], 1.9, rtol=1e-6)
  np.testing.assert_array_equal(new['conv']['bias'], 2.0)
  np.testing.assert_array_equal(new['norm']['scale'], 2.0)
  # Plain Adam ignores config.optim.weight_decay.
  new, _ = _one_update(_optim_cfg(name='adam', weight_decay=0.5))
  for leaf in (new['conv']['kernel'], new['dense']['kernel']):
    np.testing.assert_array_equal(leaf, 2.0)


def _global_norm_of_ones(params):
  return math.sqrt(sum(v.size for d in params.values() for v in d.values()))


def test_gradient_clipping_by_global_norm():
  # Every gradient entry is 1, so the global norm is sqrt(#params) (~10.7):
  # clipped to norm 1, each entry becomes 1 / that norm. Adam's first moment
  # after one step is (1 - b1) * gradient, so it shows the clipped gradient.
  norm = _global_norm_of_ones(_params())
  assert norm > 1
  for clip, expected in [(1.0, 1 / norm), (0.0, 1.0), (2 * norm, 1.0)]:
    cfg = _optim_cfg(name='adam', grad_clip_norm=clip, b1=0.9)
    _, state = _one_update(cfg, jnp.ones_like)
    mu = optax.tree_utils.tree_get(state, 'mu')
    for leaf in (mu['conv']['kernel'], mu['norm']['scale']):
      np.testing.assert_allclose(leaf, 0.1 * expected, rtol=1e-5,
                                 err_msg=f'grad_clip_norm={clip}')


def test_poly_schedule_at_known_steps():
  # nnU-Net's poly after a 10-step warmup over the 100 steps left:
  # LR * (1 - t / 100) ** 0.9, t counted from the end of the warmup.
  schedule = optim.learning_rate_schedule(
      _optim_cfg(schedule='poly'), total_steps=110, warmup_steps=10)
  np.testing.assert_allclose(
      _values(schedule, [0, 5, 10, 35, 60, 100, 110, 200]),
      [0.0, LR / 2, LR, LR * 0.75 ** 0.9, LR * 0.5 ** 0.9, LR * 0.1 ** 0.9,
       0.0, 0.0], rtol=1e-5, atol=1e-9)
  no_warmup = optim.learning_rate_schedule(
      _optim_cfg(schedule='poly'), total_steps=4, warmup_steps=0)
  np.testing.assert_allclose(_values(no_warmup, [0, 1, 2, 3, 4]),
                             [LR * (1 - t / 4) ** 0.9 for t in range(5)],
                             rtol=1e-5, atol=1e-9)


def test_sgd_nesterov_two_updates_by_hand():
  # PyTorch's SGD(momentum=m, nesterov=True, weight_decay=wd), which nnU-Net
  # uses: d = g + wd * p (kernels only); buf = m * buf + d;
  # p -= LR * (d + m * buf). Gradients are all 1, no clipping.
  m, wd = 0.99, 0.5
  cfg = _optim_cfg(name='sgd', momentum=m, nesterov=True, weight_decay=wd,
                   grad_clip_norm=0.0)
  params = _params()
  tx = optim.create_optimizer(cfg, optax.constant_schedule(LR))
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)

  def by_hand(p, decay):
    buf = 0.0
    for _ in range(2):
      d = 1.0 + (wd * p if decay else 0.0)
      buf = m * buf + d
      p = p - LR * (d + m * buf)
    return p

  # Kernel: d1 = 2, buf1 = 2, p1 = 2 - 0.1 * 3.98 = 1.602; then
  # d2 = 1.801, buf2 = 3.781, p2 = 1.602 - 0.1 * 5.54419 = 1.047581.
  assert by_hand(2.0, True) == pytest.approx(1.047581)
  np.testing.assert_allclose(params['conv']['kernel'], by_hand(2.0, True),
                             rtol=1e-6)
  np.testing.assert_allclose(params['dense']['kernel'], by_hand(2.0, True),
                             rtol=1e-6)
  np.testing.assert_allclose(params['conv']['bias'], by_hand(2.0, False),
                             rtol=1e-6)
  np.testing.assert_allclose(params['norm']['scale'], by_hand(2.0, False),
                             rtol=1e-6)


def test_plateau_scale_drops_after_patience_evaluations():
  # Plain SGD, gradient 1: the update is -LR * scale. Patience 2, factor
  # 0.5: Dice 0.5 (best), 0.6 (better), then 0.6, 0.6 (no better: the 2nd
  # one cuts the scale), 0.6, 0.6 (cut again), 0.7 (better: kept).
  cfg = _optim_cfg(name='sgd', momentum=0.0, nesterov=False,
                   weight_decay=0.0, grad_clip_norm=0.0, plateau_patience=2,
                   plateau_factor=0.5)
  tx = optim.create_optimizer(cfg, optax.constant_schedule(LR))
  params = {'w': jnp.zeros((3,))}
  state = tx.init(params)
  observe = jax.jit(lambda s, d: optim.observe_plateau(s, d, cfg))
  scales, steps = [], []
  for dice in (0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.7):
    state = observe(state, dice)
    scales.append(float(optim.plateau_scale(state)))
    updates, state = tx.update({'w': jnp.ones((3,))}, state, params)
    steps.append(float(updates['w'][0]))
  assert scales == [1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
  np.testing.assert_allclose(steps, [-LR * s for s in scales], rtol=1e-6)
  # The train step does not count: many updates without an evaluation
  # leave the plateau state as it was.
  before = state.plateau
  for _ in range(5):
    _, state = tx.update({'w': jnp.ones((3,))}, state, params)
  assert jax.tree.map(float, state.plateau) == jax.tree.map(float, before)
