"""Tests of medseg_jax.losses: hand-computed values, transforms, bad inputs.

Expected values are worked out on paper from the formulas in the docstrings,
using logits whose sigmoid/softmax is exact: logit 0 -> p = 0.5, softmax of
[0, log 3] -> [1/4, 3/4], softmax of [0, 0, log 2] -> [1/4, 1/4, 1/2].
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax import losses

S = 1e-5  # the default smooth term

# One binary case: 2x2 image, logits 0 (p = 0.5), one foreground pixel.
# TP = 0.5, FP = 1.5, FN = 0.5, sum p = 2, sum t = 1.
BIN_LOGITS = jnp.zeros((1, 2, 2, 1))
BIN_LABELS = jnp.array([[[1, 0], [0, 0]]])

# One 3-class case: 1x2 image. Pixel a: logits [0, 0, 0] -> p = 1/3 each,
# label 1. Pixel b: logits [0, 0, log 2] -> p = [1/4, 1/4, 1/2], label 2.
MC_LOGITS = jnp.array([[[[0.0, 0.0, 0.0], [0.0, 0.0, math.log(2)]]]])
MC_LABELS = jnp.array([[[1, 2]]])
DICE_1 = (2 / 3) / (1 / 3 + 1 / 4 + 1)   # class 1: 8/19
DICE_2 = 1.0 / (1 / 3 + 1 / 2 + 1)       # class 2: 6/11


def _close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol)


def _jit(fn, *args):
  """Returns fn(*args) computed under one `jax.jit`.

  The arrays are traced, so the losses take the path they take in a train
  step; one compiled program per test keeps the file fast (op-by-op eager
  dispatch compiles every primitive separately).
  """
  return jax.jit(fn)(*args)


# ------------------------------------------------------------ hand values


def test_soft_dice_binary():
  _close(_jit(losses.soft_dice_loss, BIN_LOGITS, BIN_LABELS),
         1 - (1 + S) / (3 + S))


def test_soft_dice_3d():
  # 2x2x2 volume, p = 0.5, two foreground voxels: TP 1, sum p 4, sum t 2.
  labels = jnp.zeros((1, 2, 2, 2), jnp.int32).at[0, 1, :, 0].set(1)
  # The same volume as two classes with equal logits: p = 0.5 per class too.
  got = _jit(lambda y: (losses.soft_dice_loss(jnp.zeros((1, 2, 2, 2, 1)), y),
                        losses.soft_dice_loss(jnp.zeros((1, 2, 2, 2, 2)), y)),
             labels)
  _close(got, [1 - (2 + S) / (6 + S)] * 2)


def test_soft_dice_multiclass_background_rule():
  got = _jit(lambda x, y: (
      losses.soft_dice_loss(x, y),
      losses.soft_dice_loss(x, y, include_background=True)),
             MC_LOGITS, MC_LABELS)
  # Class 0 is absent from the truth but predicted (sum p = 7/12): Dice ~0.
  dice_0 = S / (7 / 12 + S)
  _close(got, [1 - (DICE_1 + DICE_2) / 2,
               1 - (dice_0 + DICE_1 + DICE_2) / 3])


def test_soft_dice_batch_dice_and_per_case():
  logits = jnp.zeros((2, 2, 2, 1))
  labels = jnp.stack([BIN_LABELS[0], jnp.zeros((2, 2), jnp.int32)])
  got = _jit(lambda x, y: (losses.soft_dice_loss(x, y),
                           losses.soft_dice_loss(x, y, batch_dice=True)),
             logits, labels)
  # Per case: Dice 1/3 and ~0 (empty truth, sum p = 2); pooled: 1 / 5.
  _close(got, [1 - (1 / 3 + 0) / 2, 1 - 1 / 5])


def test_soft_dice_variants_and_mask():
  # Mask keeps the first row: TP 0.5, sum p 1, sum t 1 -> Dice 0.5. The
  # masked pixels may hold an ignore value.
  mask = jnp.array([[[1, 1], [0, 0]]])
  ignored = jnp.array([[[1, 0], [255, 255]]])
  got = _jit(lambda x, y, m, y_ignored: (
      losses.soft_dice_loss(x, y, squared_pred=True),
      losses.soft_dice_loss(x, y, log_loss=True),
      losses.soft_dice_loss(x, y_ignored, mask=m)),
             BIN_LOGITS, BIN_LABELS, mask, ignored)
  # sum p^2 = 4 * 1/4 = 1 -> Dice = 1 / (1 + 1).
  _close(got, [0.5, math.log(3), 0.5])


def test_perfect_prediction_dice_is_zero():
  labels = jnp.array([[[1, 0], [0, 1]]])
  logits = jnp.where(labels[..., None] == 1, 50.0, -50.0)
  empty = jnp.zeros_like(labels)
  got = _jit(lambda x, y, y_empty: (
      losses.soft_dice_loss(x, y),
      losses.soft_dice_loss(jnp.full(x.shape, -50.0), y_empty)),
             logits, labels, empty)
  _close(got, [0.0, 0.0])


def test_binary_cross_entropy():
  logits = jnp.array([[[0.0, 2.0], [-3.0, 100.0]]])[..., None]
  labels = jnp.array([[[1, 0], [1, 0]]])
  softplus = lambda x: math.log1p(math.exp(x))
  terms = [math.log(2), softplus(2.0), softplus(3.0), 100.0]
  weighted = 2 * terms[0] + terms[1] + 2 * terms[2] + terms[3]
  got = _jit(lambda x, y: (
      losses.binary_cross_entropy_loss(x, y),
      losses.binary_cross_entropy_loss(x, y, pos_weight=2.0),
      losses.cross_entropy_loss(x, y)), logits, labels)
  _close(got, [sum(terms) / 4, weighted / 4, sum(terms) / 4])


def test_categorical_cross_entropy():
  logits = jnp.array([[[[0.0, math.log(3)], [0.0, math.log(3)]]]])
  labels = jnp.array([[[0, 1]]])  # -log p: log 4 and log 4/3
  got = _jit(lambda x, y, m, m0: (
      losses.cross_entropy_loss(x, y),
      losses.cross_entropy_loss(x, y, class_weights=[1.0, 3.0]),
      losses.cross_entropy_loss(x, y, mask=m),
      losses.cross_entropy_loss(x, y, mask=m0)),
             logits, labels, jnp.array([[[0, 1]]]), jnp.zeros((1, 1, 2)))
  _close(got, [(math.log(4) + math.log(4 / 3)) / 2,
               (math.log(4) + 3 * math.log(4 / 3)) / 4,
               math.log(4 / 3), 0.0])


def test_focal_loss():
  # p_t = 0.5 everywhere: (1 - p_t)^2 = 1/4; alpha_t = 0.25 (fg), 0.75 (bg).
  expected = math.log(2) / 4 * (0.25 + 3 * 0.75) / 4
  logits = jnp.array([[[[0.0, math.log(3)]]]])  # p_t = 3/4 for class 1
  got = _jit(lambda x, y, x2, one, zero: (
      losses.focal_loss(x, y),
      losses.focal_loss(x2, one),
      losses.focal_loss(x2, zero),   # alpha_t = 0.75
      # A sequence gives alpha_t per class directly: [bg, fg] for K == 1.
      losses.focal_loss(x, y, alpha=[0.75, 0.25]),
      losses.focal_loss(x2, one, alpha=[0.1, 0.9])),
             BIN_LOGITS, BIN_LABELS, logits, jnp.array([[[1]]]),
             jnp.array([[[0]]]))
  _close(got, [expected,
               0.25 * (1 / 4)**2 * math.log(4 / 3),
               0.75 * (3 / 4)**2 * math.log(4),
               expected,
               0.9 * (1 / 4)**2 * math.log(4 / 3)])


@pytest.mark.parametrize('logits,labels', [(BIN_LOGITS, BIN_LABELS),
                                           (MC_LOGITS, MC_LABELS)])
def test_focal_gamma0_is_cross_entropy(logits, labels):
  focal, ce = _jit(lambda x, y: (
      losses.focal_loss(x, y, alpha=None, gamma=0.0),
      losses.cross_entropy_loss(x, y)), logits, labels)
  _close(focal, ce)


def test_tversky_family():
  ti = 0.5 / (0.5 + 0.3 * 1.5 + 0.7 * 0.5)  # TP .5, FP 1.5, FN .5
  (tversky, focal_tversky, bin_half, bin_dice, mc_half, mc_dice) = _jit(
      lambda x, y, xm, ym: (
          losses.tversky_loss(x, y),
          losses.focal_tversky_loss(x, y),
          losses.tversky_loss(x, y, alpha=0.5, beta=0.5),
          losses.soft_dice_loss(x, y),
          losses.tversky_loss(xm, ym, alpha=0.5, beta=0.5),
          losses.soft_dice_loss(xm, ym)),
      BIN_LOGITS, BIN_LABELS, MC_LOGITS, MC_LABELS)
  _close(tversky, 1 - ti)
  _close(focal_tversky, (1 - ti)**0.75)
  _close(bin_half, bin_dice)
  _close(mc_half, mc_dice)


def test_generalized_dice():
  # Labels [0, 0, 1], p = 1/2: class 0 has sum t 2, TP 1; class 1 sum t 1,
  # TP 1/2; sum p 3/2 each. w = (1/4, 1) -> (1/5, 4/5).
  logits, labels = jnp.zeros((1, 3, 2)), jnp.array([[0, 0, 1]])
  gdl, dice, two_class, absent = _jit(lambda x, y, x3, y3, xm, ym: (
      losses.generalized_dice_loss(x, y),
      losses.soft_dice_loss(x, y),
      losses.generalized_dice_loss(x3, y3, include_background=True),
      losses.generalized_dice_loss(xm, ym, include_background=True)),
      BIN_LOGITS, BIN_LABELS, logits, labels, MC_LOGITS, MC_LABELS)
  # One foreground class: the weights cancel, GDL == soft Dice.
  _close(gdl, dice)
  numer = 2 * (1 / 5 * 1 + 4 / 5 * 0.5)
  denom = 1 / 5 * (1.5 + 2) + 4 / 5 * (1.5 + 1)
  _close(two_class, 1 - numer / denom)
  # Class 0 absent -> takes the largest weight: all three weigh 1/3.
  _close(absent, 1 - (2 / 3 * (1 / 3 + 1 / 2)) / (1 / 3 * 4))


def test_binary_weighted_focal_tversky_seed003():
  # N+ = 1, N- = 3: w+ = 3, w- = 1/3; TI = .5 / (.5 + .5*1.5*3 + .5*.5/3).
  ti = 0.5 / (0.5 + 2.25 + 1 / 12)
  got = _jit(lambda x, y: (
      losses.binary_weighted_focal_tversky_loss(x, y),
      losses.binary_weighted_focal_tversky_loss(x, y, gamma=2.0)),
             BIN_LOGITS, BIN_LABELS)
  _close(got, [1 - ti, (1 - ti)**2])
  with pytest.raises(ValueError, match='K == 1'):
    losses.binary_weighted_focal_tversky_loss(MC_LOGITS, MC_LABELS)


# -------------------------------------------------------------- combinations


def test_combined_loss_seed003_weights():
  got, want = _jit(lambda x, y: (
      losses.combined_loss(x, y, {'bce': 0.6, 'bwft': 0.4, 'dice': 0.6}),
      0.6 * losses.binary_cross_entropy_loss(x, y) +
      0.4 * losses.binary_weighted_focal_tversky_loss(x, y) +
      0.6 * losses.soft_dice_loss(x, y)), BIN_LOGITS, BIN_LABELS)
  _close(got, want)


def test_combined_loss_routing_and_errors():
  # A zero weight is skipped: 'bce' would reject K == 3.
  got = _jit(lambda xm, ym, x, y: (
      losses.combined_loss(xm, ym, {'dice': 1.0, 'bce': 0.0},
                           include_background=True),
      losses.soft_dice_loss(xm, ym, include_background=True),
      losses.combined_loss(x, y, {'focal': 1, 'tversky': 2},
                           loss_kwargs={'tversky': {'alpha': 0.5,
                                                    'beta': 0.5}}),
      losses.focal_loss(x, y) + 2 * losses.soft_dice_loss(x, y)),
             MC_LOGITS, MC_LABELS, BIN_LOGITS, BIN_LABELS)
  _close(got[0], got[1])
  _close(got[2], got[3])
  with pytest.raises(ValueError, match=r"valid names are \[.*'dice'"):
    losses.combined_loss(BIN_LOGITS, BIN_LABELS, {'dcie': 1.0})
  with pytest.raises(ValueError, match='accepted by none'):
    losses.combined_loss(BIN_LOGITS, BIN_LABELS, {'dice': 1.0}, pos_weight=2.)
  with pytest.raises(ValueError, match='every weight is 0'):
    losses.combined_loss(BIN_LOGITS, BIN_LABELS, {'dice': 0.0})
  assert set(losses.LOSSES) >= {'dice', 'ce', 'bce', 'focal', 'tversky',
                                'focal_tversky', 'generalized_dice', 'bwft'}


def test_deep_supervision():
  assert losses.deep_supervision_weights(3) == pytest.approx([1 / 7, 2 / 7,
                                                              4 / 7])
  outs = [jnp.full((1, 2, 2, 1), v) for v in (1.0, 2.0, 3.0)]
  mean_fn = lambda x, y, **kw: jnp.mean(x)
  mask = jnp.array([[[1, 1], [0, 0]]])
  got = _jit(lambda o, y, m, x: (
      losses.deep_supervision_loss(mean_fn, o, y),
      losses.deep_supervision_loss(mean_fn, o, y, [0, 0, 1]),
      losses.deep_supervision_loss(losses.soft_dice_loss, [x] * 2, y,
                                   mask=m)),
             outs, BIN_LABELS, mask, BIN_LOGITS)
  _close(got, [(1 * 1 + 2 * 2 + 4 * 3) / 7, 3.0, 0.5])
  with pytest.raises(ValueError, match='2 weights for 3'):
    losses.deep_supervision_loss(mean_fn, outs, BIN_LABELS, [0.5, 0.5])
  with pytest.raises(ValueError, match='output 0 has shape'):
    losses.deep_supervision_loss(mean_fn, [jnp.zeros((1, 1, 1, 1))] + outs,
                                 BIN_LABELS)


# --------------------------------------------------- transforms and dtypes

ALL = ['dice', 'ce', 'focal', 'tversky', 'focal_tversky', 'generalized_dice']
BINARY_ONLY = ['bce', 'bwft']


def _batch(spatial, k, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.normal(size=(2, *spatial, k)) * 2, dtype)
  labels = jnp.asarray(rng.integers(0, max(k, 2), size=(2, *spatial)))
  return logits, labels


@pytest.mark.parametrize('spatial,dtype,k', [((4, 5), jnp.float32, 3),
                                             ((3, 4, 2), jnp.bfloat16, 1)])
@pytest.mark.parametrize('name', ALL + BINARY_ONLY)
def test_jit_grad_vmap(name, spatial, dtype, k):
  """2D float32 (K = 3, or 1 for binary losses) and 3D bfloat16 (K = 1)."""
  fn = losses.LOSSES[name]
  k = 1 if name in BINARY_ONLY else k
  logits, labels = _batch(spatial, k, dtype=dtype)
  upcast = logits.astype(jnp.float32)

  def both(x, y, x32):
    # One compiled program covers jit, vmap (over two batches) and grad, and
    # the unbatched loss of each batch for reference.
    values, grads = jax.vmap(jax.value_and_grad(fn))(
        jnp.stack([x, x[::-1]]), jnp.stack([y, y[::-1]]))
    return values, grads, jnp.stack([fn(x32, y), fn(x32[::-1], y[::-1])])

  values, grads, singles = jax.jit(both)(logits, labels, upcast)
  assert values.dtype == jnp.float32 and values.shape == (2,)
  assert grads.dtype == dtype and grads.shape == (2, *logits.shape)
  assert np.isfinite(np.asarray(grads, np.float32)).all()
  assert float(jnp.abs(grads.astype(jnp.float32)).sum()) > 0
  # Each vmapped value is the loss of its batch alone; bf16 logits are
  # computed in float32, so the upcast input gives the same value.
  _close(values, singles, 1e-5)


@pytest.mark.parametrize('name', ALL + BINARY_ONLY)
def test_finite_gradients_on_uniform_batches(name):
  """All-background / all-foreground truth, confident and unsure logits."""
  value_and_grad = jax.jit(jax.value_and_grad(losses.LOSSES[name]))
  for k in ([1] if name in BINARY_ONLY else [1, 3]):
    for fill in (0, 1):
      labels = np.full((2, 3, 3, 2), fill, np.int32)
      for logit in (0.0, 30.0, -30.0, 200.0, -200.0):
        logits = np.zeros((2, 3, 3, 2, k), np.float32)
        logits[..., -1] = logit
        value, grad = value_and_grad(logits, labels)
        assert np.isfinite(float(value)), (k, fill, logit)
        assert np.isfinite(np.asarray(grad)).all(), (k, fill, logit)


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize('name', ALL)
def test_bad_inputs_raise(name):
  fn = losses.LOSSES[name]
  with pytest.raises(ValueError, match=r'labels shape \(1, 2, 3\)'):
    fn(BIN_LOGITS, jnp.zeros((1, 2, 3), jnp.int32))
  with pytest.raises(ValueError, match='integer class map'):
    fn(BIN_LOGITS, BIN_LABELS.astype(jnp.float32))
  with pytest.raises(ValueError, match='mask shape'):
    fn(BIN_LOGITS, BIN_LABELS, mask=jnp.ones((1, 4)))
  with pytest.raises(ValueError, match=r'\[0, 1\].*found values in \[0, 2\]'):
    fn(BIN_LOGITS, BIN_LABELS * 2)
  with pytest.raises(ValueError, match=r'\[0, 2\] for 3 classes'):
    fn(MC_LOGITS, MC_LABELS + 1)
  with pytest.raises(ValueError, match='at least one spatial axis'):
    fn(jnp.zeros((2, 1)), jnp.zeros((2,), jnp.int32))
  # Traced labels cannot raise: an out-of-range valid label gives NaN.
  assert np.isnan(float(jax.jit(fn)(MC_LOGITS, MC_LABELS + 1)))
  assert np.isfinite(float(jax.jit(fn)(MC_LOGITS, MC_LABELS)))


def test_binary_losses_reject_multiclass_and_class_weights():
  with pytest.raises(ValueError, match='K == 3'):
    losses.binary_cross_entropy_loss(MC_LOGITS, MC_LABELS)
  with pytest.raises(ValueError, match='pos_weight'):
    losses.cross_entropy_loss(BIN_LOGITS, BIN_LABELS, class_weights=[1., 2.])
  with pytest.raises(ValueError, match=r'shape \(3,\)'):
    losses.cross_entropy_loss(MC_LOGITS, MC_LABELS, class_weights=[1., 2.])
