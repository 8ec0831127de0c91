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


# ------------------------------------------------------------ hand values


def test_soft_dice_binary():
  _close(losses.soft_dice_loss(BIN_LOGITS, BIN_LABELS), 1 - (1 + S) / (3 + S))


def test_soft_dice_3d():
  # 2x2x2 volume, p = 0.5, two foreground voxels: TP 1, sum p 4, sum t 2.
  labels = jnp.zeros((1, 2, 2, 2), jnp.int32).at[0, 1, :, 0].set(1)
  _close(losses.soft_dice_loss(jnp.zeros((1, 2, 2, 2, 1)), labels),
         1 - (2 + S) / (6 + S))
  # The same volume as two classes with equal logits: p = 0.5 per class too.
  _close(losses.soft_dice_loss(jnp.zeros((1, 2, 2, 2, 2)), labels),
         1 - (2 + S) / (6 + S))


def test_soft_dice_multiclass_background_rule():
  _close(losses.soft_dice_loss(MC_LOGITS, MC_LABELS),
         1 - (DICE_1 + DICE_2) / 2)
  # Class 0 is absent from the truth but predicted (sum p = 7/12): Dice ~0.
  dice_0 = S / (7 / 12 + S)
  _close(losses.soft_dice_loss(MC_LOGITS, MC_LABELS, include_background=True),
         1 - (dice_0 + DICE_1 + DICE_2) / 3)


def test_soft_dice_batch_dice_and_per_case():
  logits = jnp.zeros((2, 2, 2, 1))
  labels = jnp.stack([BIN_LABELS[0], jnp.zeros((2, 2), jnp.int32)])
  # Per case: Dice 1/3 and ~0 (empty truth, sum p = 2); pooled: 1 / 5.
  _close(losses.soft_dice_loss(logits, labels), 1 - (1 / 3 + 0) / 2)
  _close(losses.soft_dice_loss(logits, labels, batch_dice=True), 1 - 1 / 5)


def test_soft_dice_variants_and_mask():
  # sum p^2 = 4 * 1/4 = 1 -> Dice = 1 / (1 + 1).
  _close(losses.soft_dice_loss(BIN_LOGITS, BIN_LABELS, squared_pred=True), 0.5)
  _close(losses.soft_dice_loss(BIN_LOGITS, BIN_LABELS, log_loss=True),
         math.log(3))
  # Mask keeps the first row: TP 0.5, sum p 1, sum t 1 -> Dice 0.5. The
  # masked pixels may hold an ignore value.
  mask = jnp.array([[[1, 1], [0, 0]]])
  labels = jnp.array([[[1, 0], [255, 255]]])
  _close(losses.soft_dice_loss(BIN_LOGITS, labels, mask=mask), 0.5)


def test_perfect_prediction_dice_is_zero():
  labels = jnp.array([[[1, 0], [0, 1]]])
  logits = jnp.where(labels[..., None] == 1, 50.0, -50.0)
  _close(losses.soft_dice_loss(logits, labels), 0.0)
  empty = jnp.zeros_like(labels)
  _close(losses.soft_dice_loss(jnp.full(logits.shape, -50.0), empty), 0.0)


def test_binary_cross_entropy():
  logits = jnp.array([[[0.0, 2.0], [-3.0, 100.0]]])[..., None]
  labels = jnp.array([[[1, 0], [1, 0]]])
  softplus = lambda x: math.log1p(math.exp(x))
  terms = [math.log(2), softplus(2.0), softplus(3.0), 100.0]
  _close(losses.binary_cross_entropy_loss(logits, labels), sum(terms) / 4)
  weighted = 2 * terms[0] + terms[1] + 2 * terms[2] + terms[3]
  _close(losses.binary_cross_entropy_loss(logits, labels, pos_weight=2.0),
         weighted / 4)
  _close(losses.cross_entropy_loss(logits, labels), sum(terms) / 4)


def test_categorical_cross_entropy():
  logits = jnp.array([[[[0.0, math.log(3)], [0.0, math.log(3)]]]])
  labels = jnp.array([[[0, 1]]])  # -log p: log 4 and log 4/3
  _close(losses.cross_entropy_loss(logits, labels),
         (math.log(4) + math.log(4 / 3)) / 2)
  _close(losses.cross_entropy_loss(logits, labels, class_weights=[1.0, 3.0]),
         (math.log(4) + 3 * math.log(4 / 3)) / 4)
  _close(losses.cross_entropy_loss(logits, labels, mask=jnp.array([[[0, 1]]])),
         math.log(4 / 3))
  _close(losses.cross_entropy_loss(logits, labels, mask=jnp.zeros((1, 1, 2))),
         0.0)


def test_focal_loss():
  # p_t = 0.5 everywhere: (1 - p_t)^2 = 1/4; alpha_t = 0.25 (fg), 0.75 (bg).
  expected = math.log(2) / 4 * (0.25 + 3 * 0.75) / 4
  _close(losses.focal_loss(BIN_LOGITS, BIN_LABELS), expected)
  logits = jnp.array([[[[0.0, math.log(3)]]]])  # p_t = 3/4 for class 1
  _close(losses.focal_loss(logits, jnp.array([[[1]]])),
         0.25 * (1 / 4)**2 * math.log(4 / 3))
  _close(losses.focal_loss(logits, jnp.array([[[0]]])),   # alpha_t = 0.75
         0.75 * (3 / 4)**2 * math.log(4))
  # A sequence gives alpha_t per class directly: [bg, fg] for K == 1.
  _close(losses.focal_loss(BIN_LOGITS, BIN_LABELS, alpha=[0.75, 0.25]),
         expected)
  _close(losses.focal_loss(logits, jnp.array([[[1]]]), alpha=[0.1, 0.9]),
         0.9 * (1 / 4)**2 * math.log(4 / 3))


@pytest.mark.parametrize('logits,labels', [(BIN_LOGITS, BIN_LABELS),
                                           (MC_LOGITS, MC_LABELS)])
def test_focal_gamma0_is_cross_entropy(logits, labels):
  _close(losses.focal_loss(logits, labels, alpha=None, gamma=0.0),
         losses.cross_entropy_loss(logits, labels))


def test_tversky_family():
  ti = 0.5 / (0.5 + 0.3 * 1.5 + 0.7 * 0.5)  # TP .5, FP 1.5, FN .5
  _close(losses.tversky_loss(BIN_LOGITS, BIN_LABELS), 1 - ti)
  _close(losses.focal_tversky_loss(BIN_LOGITS, BIN_LABELS), (1 - ti)**0.75)
  _close(losses.tversky_loss(BIN_LOGITS, BIN_LABELS, alpha=0.5, beta=0.5),
         losses.soft_dice_loss(BIN_LOGITS, BIN_LABELS))
  _close(losses.tversky_loss(MC_LOGITS, MC_LABELS, alpha=0.5, beta=0.5),
         losses.soft_dice_loss(MC_LOGITS, MC_LABELS))


def test_generalized_dice():
  # One foreground class: the weights cancel, GDL == soft Dice.
  _close(losses.generalized_dice_loss(BIN_LOGITS, BIN_LABELS),
         losses.soft_dice_loss(BIN_LOGITS, BIN_LABELS))
  # Labels [0, 0, 1], p = 1/2: class 0 has sum t 2, TP 1; class 1 sum t 1,
  # TP 1/2; sum p 3/2 each. w = (1/4, 1) -> (1/5, 4/5).
  logits, labels = jnp.zeros((1, 3, 2)), jnp.array([[0, 0, 1]])
  numer = 2 * (1 / 5 * 1 + 4 / 5 * 0.5)
  denom = 1 / 5 * (1.5 + 2) + 4 / 5 * (1.5 + 1)
  _close(losses.generalized_dice_loss(logits, labels, include_background=True),
         1 - numer / denom)
  # Class 0 absent -> takes the largest weight: all three weigh 1/3.
  _close(losses.generalized_dice_loss(MC_LOGITS, MC_LABELS,
                                      include_background=True),
         1 - (2 / 3 * (1 / 3 + 1 / 2)) / (1 / 3 * 4))


def test_binary_weighted_focal_tversky_seed003():
  # N+ = 1, N- = 3: w+ = 3, w- = 1/3; TI = .5 / (.5 + .5*1.5*3 + .5*.5/3).
  ti = 0.5 / (0.5 + 2.25 + 1 / 12)
  _close(losses.binary_weighted_focal_tversky_loss(BIN_LOGITS, BIN_LABELS),
         1 - ti)
  _close(losses.binary_weighted_focal_tversky_loss(
      BIN_LOGITS, BIN_LABELS, gamma=2.0), (1 - ti)**2)
  with pytest.raises(ValueError, match='K == 1'):
    losses.binary_weighted_focal_tversky_loss(MC_LOGITS, MC_LABELS)


# -------------------------------------------------------------- combinations


def test_combined_loss_seed003_weights():
  got = losses.combined_loss(BIN_LOGITS, BIN_LABELS,
                             {'bce': 0.6, 'bwft': 0.4, 'dice': 0.6})
  want = (0.6 * losses.binary_cross_entropy_loss(BIN_LOGITS, BIN_LABELS) +
          0.4 * losses.binary_weighted_focal_tversky_loss(BIN_LOGITS,
                                                          BIN_LABELS) +
          0.6 * losses.soft_dice_loss(BIN_LOGITS, BIN_LABELS))
  _close(got, want)


def test_combined_loss_routing_and_errors():
  # A zero weight is skipped: 'bce' would reject K == 3.
  got = losses.combined_loss(MC_LOGITS, MC_LABELS, {'dice': 1.0, 'bce': 0.0},
                             include_background=True)
  _close(got, losses.soft_dice_loss(MC_LOGITS, MC_LABELS,
                                    include_background=True))
  got = losses.combined_loss(BIN_LOGITS, BIN_LABELS, {'focal': 1, 'tversky': 2},
                             loss_kwargs={'tversky': {'alpha': 0.5,
                                                      'beta': 0.5}})
  _close(got, losses.focal_loss(BIN_LOGITS, BIN_LABELS) +
         2 * losses.soft_dice_loss(BIN_LOGITS, BIN_LABELS))
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
  _close(losses.deep_supervision_loss(mean_fn, outs, BIN_LABELS),
         (1 * 1 + 2 * 2 + 4 * 3) / 7)
  _close(losses.deep_supervision_loss(mean_fn, outs, BIN_LABELS, [0, 0, 1]),
         3.0)
  mask = jnp.array([[[1, 1], [0, 0]]])
  got = losses.deep_supervision_loss(losses.soft_dice_loss, [BIN_LOGITS] * 2,
                                     BIN_LABELS, mask=mask)
  _close(got, 0.5)
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
  # One compiled program covers jit, vmap (over two batches) and grad.
  both = jax.jit(jax.vmap(jax.value_and_grad(fn)))
  values, grads = both(jnp.stack([logits, logits[::-1]]),
                       jnp.stack([labels, labels[::-1]]))
  assert values.dtype == jnp.float32 and values.shape == (2,)
  assert grads.dtype == dtype and grads.shape == (2, *logits.shape)
  assert np.isfinite(np.asarray(grads, np.float32)).all()
  assert float(jnp.abs(grads.astype(jnp.float32)).sum()) > 0
  # Each vmapped value is the eager loss of its batch; bf16 logits are
  # computed in float32, so the upcast input gives the same value.
  upcast = logits.astype(jnp.float32)
  _close(values, [fn(upcast, labels), fn(upcast[::-1], labels[::-1])], 1e-5)


@pytest.mark.parametrize('name', ALL + BINARY_ONLY)
def test_finite_gradients_on_uniform_batches(name):
  """All-background / all-foreground truth, confident and unsure logits."""
  value_and_grad = jax.jit(jax.value_and_grad(losses.LOSSES[name]))
  for k in ([1] if name in BINARY_ONLY else [1, 3]):
    for fill in (0, 1):
      labels = jnp.full((2, 3, 3, 2), fill, jnp.int32)
      for logit in (0.0, 30.0, -30.0, 200.0, -200.0):
        logits = jnp.zeros((2, 3, 3, 2, k)).at[..., -1].set(logit)
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
