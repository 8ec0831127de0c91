"""Segmentation losses: pure, jittable, vmappable, differentiable functions.

Every loss takes logits [B, *spatial, K] (channels-last, any float dtype,
computed in float32) and integer labels [B, *spatial], 2D or 3D alike, and
returns a float32 scalar. K == 1 is binary with a sigmoid (label 1 =
foreground); K >= 2 is a softmax over K classes with 0 = background. An
optional `mask` [B, *spatial] weights pixels (1 = counted, 0 = ignored;
fractional values act as weights); labels under mask == 0 may hold any value
(e.g. an ignore index of 255).

Input checks: shapes and dtypes are checked when traced (ValueError naming the
shapes). Label values are checked when the labels are concrete (ValueError);
inside jit they cannot raise, so a valid pixel with a label outside [0, K-1]
({0, 1} for K == 1) makes the loss NaN, which stops training loudly rather
than training on silently dropped pixels.

Soft overlap terms, per class c over the reduced axes, with p the predicted
probability, t the one-hot truth and m the mask:
  TP_c = sum p t m,   FP_c = sum p (1 - t) m,   FN_c = sum (1 - p) t m.
"""

from collections.abc import Callable, Mapping, Sequence
import functools
import inspect

import jax
import jax.numpy as jnp

from medseg_jax import metrics

_F32 = jnp.float32
# Floor for bases raised to a power < 1, whose gradient is infinite at 0.
_POW_FLOOR = 1e-7


# ------------------------------------------------------------------- helpers


def _prepare(logits, labels, mask, where: str):
  """Checks shapes/dtypes (and concrete label values).

  Returns:
    (K, logits, labels, mask) with the arrays as jax arrays (mask may be None).
  """
  if logits.ndim < 3:
    raise ValueError(f'{where}: logits must be [B, *spatial, K] with at least '
                     f'one spatial axis, got shape {tuple(logits.shape)}.')
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(f'{where}: logits must be floating point, got dtype '
                     f'{logits.dtype}.')
  if tuple(labels.shape) != tuple(logits.shape[:-1]):
    raise ValueError(
        f'{where}: labels shape {tuple(labels.shape)} must equal the logits '
        f'shape without its class axis, {tuple(logits.shape[:-1])} (logits '
        f'{tuple(logits.shape)}). Labels are integer maps [B, *spatial], not '
        'one-hot.')
  metrics.check_integer_map(labels, 'labels', where)
  metrics.check_mask(mask, labels.shape, where)
  num_classes = logits.shape[-1]
  metrics.check_label_values(labels, num_classes, mask, where)
  mask = None if mask is None else jnp.asarray(mask)
  return num_classes, jnp.asarray(logits), jnp.asarray(labels), mask


def _require_binary(num_classes: int, where: str) -> None:
  if num_classes != 1:
    raise ValueError(f'{where} is for binary logits with K == 1 (sigmoid); got '
                     f'K == {num_classes}. Use the categorical loss instead.')


def _nan_if_bad_labels(loss, labels, num_classes, mask):
  """Returns NaN instead of `loss` when a valid label is out of range."""
  bad = metrics.labels_out_of_range(labels, num_classes, mask)
  return jnp.where(bad, jnp.nan, loss)


def _weights(mask, shape):
  """Per-pixel float32 weights from an optional mask."""
  return jnp.ones(shape, _F32) if mask is None else jnp.asarray(mask, _F32)


def _masked_mean(values, weights):
  """sum(values * weights) / sum(weights); 0 when the weights sum to 0."""
  total = jnp.sum(weights)
  return jnp.sum(values * weights) / jnp.where(total > 0, total, 1.0)


def _probs_and_onehot(logits, labels, mask):
  """Returns masked probabilities and one-hot truth, both [B, *spatial, C].

  K == 1 -> C == 1 (foreground: sigmoid, label == 1); K >= 2 -> C == K.
  """
  x = jnp.asarray(logits).astype(_F32)
  if x.shape[-1] == 1:
    p, t = jax.nn.sigmoid(x), (labels == 1)[..., None].astype(_F32)
  else:
    p, t = jax.nn.softmax(x, axis=-1), jax.nn.one_hot(labels, x.shape[-1],
                                                       dtype=_F32)
  m = _weights(mask, labels.shape)[..., None]
  return p * m, t * m


def _soft_counts(logits, labels, mask, batch_dice, include_background):
  """Soft (TP, FP, FN, sum p^2) per case [B, C'] or over the batch [C'].

  C' drops the background class for K >= 2 unless include_background.
  """
  p, t = _probs_and_onehot(logits, labels, mask)
  if p.shape[-1] > 1 and not include_background:
    p, t = p[..., 1:], t[..., 1:]
  axes = tuple(range(0 if batch_dice else 1, p.ndim - 1))
  tp = jnp.sum(p * t, axes)
  fp = jnp.sum(p, axes) - tp
  fn = jnp.sum(t, axes) - tp
  # Rounding can leave tiny negatives; the terms are non-negative sums.
  return (tp, jnp.maximum(fp, 0.0), jnp.maximum(fn, 0.0),
          jnp.sum(p * p, axes))


def _power(base, gamma):
  """base ** gamma with a finite gradient at base == 0."""
  return jnp.power(jnp.maximum(base, _POW_FLOOR), gamma)


# ----------------------------------------------------------- region losses


def soft_dice_loss(logits, labels, *, mask=None, smooth: float = 1e-5,
                   include_background: bool = False, batch_dice: bool = False,
                   squared_pred: bool = False, log_loss: bool = False):
  """Returns 1 - mean soft Dice.

  Dice_c = (2 TP_c + smooth) / (sum p + sum t + smooth), per case and class
  (or over the whole batch per class when batch_dice, as nnU-Net), then
  averaged over cases and classes. K == 1: the foreground only; K >= 2: the
  classes 1..K-1 (0 too if include_background). With smooth > 0 a class
  absent from both truth and prediction scores ~1 (loss ~0).

  Args:
    logits, labels, mask: see the module docstring.
    smooth: added to numerator and denominator (MONAI smooth_nr/smooth_dr).
    include_background: also score class 0 (K >= 2).
    batch_dice: pool the sums over the batch before the ratio.
    squared_pred: use sum p^2 + sum t in the denominator (Milletari V-Net,
      seed 001 / MONAI squared_pred).
    log_loss: return mean(-log(max(Dice, 1e-7))) instead (smp log_loss).

  Returns:
    float32 scalar.
  """
  k, logits, labels, mask = _prepare(logits, labels, mask,
                                      'soft_dice_loss')
  tp, fp, fn, p2 = _soft_counts(logits, labels, mask, batch_dice,
                                include_background)
  sum_p = p2 if squared_pred else tp + fp
  dice = (2 * tp + smooth) / (sum_p + tp + fn + smooth)
  loss = (jnp.mean(-jnp.log(jnp.maximum(dice, 1e-7))) if log_loss else
          1.0 - jnp.mean(dice))
  return _nan_if_bad_labels(loss, labels, k, mask)


def _tversky_index(logits, labels, mask, alpha, beta, smooth, batch_dice,
                   include_background):
  """1 - Tversky index per case/class, computed as a ratio of sums."""
  tp, fp, fn, _ = _soft_counts(logits, labels, mask, batch_dice,
                               include_background)
  miss = alpha * fp + beta * fn
  return miss / (tp + miss + smooth)


def tversky_loss(logits, labels, *, alpha: float = 0.3, beta: float = 0.7,
                 smooth: float = 1e-5, mask=None,
                 include_background: bool = False, batch_dice: bool = False):
  """Returns 1 - mean Tversky index (Salehi et al. 2017, MONAI TverskyLoss).

  TI_c = (TP_c + smooth) / (TP_c + alpha FP_c + beta FN_c + smooth): alpha
  weights false positives, beta false negatives (alpha = beta = 0.5 is Dice).
  Averaged over cases and classes as in `soft_dice_loss`.
  """
  k, logits, labels, mask = _prepare(logits, labels, mask,
                                      'tversky_loss')
  one_minus_ti = _tversky_index(logits, labels, mask, alpha, beta, smooth,
                                batch_dice, include_background)
  return _nan_if_bad_labels(jnp.mean(one_minus_ti), labels, k, mask)


def focal_tversky_loss(logits, labels, *, alpha: float = 0.3,
                       beta: float = 0.7, gamma: float = 0.75,
                       smooth: float = 1e-5, mask=None,
                       include_background: bool = False,
                       batch_dice: bool = False):
  """Returns mean_c (1 - TI_c) ** gamma (Abraham & Khan 2019).

  TI as in `tversky_loss`; gamma = 0.75 is the paper's 1/gamma with
  gamma = 4/3. The base is floored at 1e-7 so the gradient stays finite for
  a perfect prediction.
  """
  k, logits, labels, mask = _prepare(logits, labels, mask,
                                      'focal_tversky_loss')
  one_minus_ti = _tversky_index(logits, labels, mask, alpha, beta, smooth,
                                batch_dice, include_background)
  loss = jnp.mean(_power(one_minus_ti, gamma))
  return _nan_if_bad_labels(loss, labels, k, mask)


def generalized_dice_loss(logits, labels, *, mask=None, smooth: float = 1e-5,
                          include_background: bool = False,
                          batch_dice: bool = False,
                          weight_type: str = 'square'):
  """Returns the generalized Dice loss (Sudre et al. 2017, MONAI).

  GDL = 1 - (2 sum_c w_c TP_c + smooth) / (sum_c w_c (sum p + sum t)_c +
  smooth), per case (or pooled over the batch), averaged over cases, with
  w_c = 1 / (sum t_c)^2 ('square'), 1 / sum t_c ('simple') or 1 ('uniform').
  A class absent from the truth gets the largest weight of the present classes
  (MONAI's rule; all absent -> all weights 0 -> loss 0). Unlike MONAI, the
  weights are normalised to sum to 1, which leaves the ratio unchanged but keeps
  `smooth` negligible for large volumes.
  """
  k, logits, labels, mask = _prepare(logits, labels, mask,
                                      'generalized_dice_loss')
  if weight_type not in ('square', 'simple', 'uniform'):
    raise ValueError("generalized_dice_loss: weight_type must be 'square', "
                     f"'simple' or 'uniform', got {weight_type!r}.")
  tp, fp, fn, _ = _soft_counts(logits, labels, mask, batch_dice,
                               include_background)
  truth = jax.lax.stop_gradient(tp + fn)
  present = truth > 0
  safe = jnp.where(present, truth, 1.0)
  power = {'square': 2.0, 'simple': 1.0, 'uniform': 0.0}[weight_type]
  w = jnp.where(present, safe ** -power, 0.0)
  w = jnp.where(present, w, jnp.max(w, axis=-1, keepdims=True))
  total = jnp.sum(w, axis=-1, keepdims=True)
  w = w / jnp.where(total > 0, total, 1.0)
  numer = 2 * jnp.sum(w * tp, -1) + smooth
  denom = jnp.sum(w * (2 * tp + fp + fn), -1) + smooth
  return _nan_if_bad_labels(jnp.mean(1.0 - numer / denom), labels, k, mask)


def binary_weighted_focal_tversky_loss(logits, labels, *, alpha: float = 0.5,
                                       beta: float = 0.5, gamma: float = 1.0,
                                       epsilon: float = 1e-7, mask=None):
  """Returns seed 003's binary weighted focal Tversky loss (K == 1 only).

  Over all valid pixels of the batch (as the seed, which flattens the batch):
    N+ = sum t m, N- = sum (1 - t) m,
    w+ = N- / max(N+, eps), w- = N+ / max(N-, eps),
    TI = (TP + eps) / (TP + alpha FP w+ + beta FN w- + eps),
    loss = (1 - TI) ** gamma.
  The imbalance weights are computed from the labels (no gradient). Defaults
  are the seed's: alpha = beta = 0.5, gamma = 1, eps = 1e-7.
  """
  where = 'binary_weighted_focal_tversky_loss'
  k, logits, labels, mask = _prepare(logits, labels, mask, where)
  _require_binary(k, where)
  p, t = _probs_and_onehot(logits, labels, mask)
  m = _weights(mask, labels.shape)[..., None]
  n_pos = jnp.sum(t)
  n_neg = jnp.sum(m) - n_pos
  # max(n, eps) rather than n + eps: XLA may reassociate (36 - 36) + eps into
  # (36 + eps) - 36 == 0 in float32. Counts are 0 or >= 1, so the two agree.
  w_pos = n_neg / jnp.maximum(n_pos, epsilon)
  w_neg = n_pos / jnp.maximum(n_neg, epsilon)
  tp = jnp.sum(p * t)
  fp = jnp.maximum(jnp.sum(p) - tp, 0.0)
  fn = jnp.maximum(n_pos - tp, 0.0)
  miss = alpha * fp * w_pos + beta * fn * w_neg
  loss = _power(miss / (tp + miss + epsilon), gamma)
  return _nan_if_bad_labels(loss, labels, k, mask)


# ------------------------------------------------------------ pixel losses


def binary_cross_entropy_loss(logits, labels, *, mask=None, pos_weight=None):
  """Returns the mean binary cross-entropy from logits (K == 1 only).

  l = -(pos_weight * y * log sigmoid(x) + (1 - y) * log sigmoid(-x)), computed
  with log_sigmoid (stable for any logit); mean over valid pixels (weighted by
  the mask; 0 if none). pos_weight (scalar) up-weights the foreground like
  torch's BCEWithLogitsLoss.
  """
  where = 'binary_cross_entropy_loss'
  k, logits, labels, mask = _prepare(logits, labels, mask, where)
  _require_binary(k, where)
  x = logits.astype(_F32)[..., 0]
  y = (labels == 1).astype(_F32)
  pw = 1.0 if pos_weight is None else jnp.asarray(pos_weight, _F32)
  per_pixel = -(pw * y * jax.nn.log_sigmoid(x) +
                (1 - y) * jax.nn.log_sigmoid(-x))
  loss = _masked_mean(per_pixel, _weights(mask, labels.shape))
  return _nan_if_bad_labels(loss, labels, k, mask)


def cross_entropy_loss(logits, labels, *, mask=None, class_weights=None,
                       pos_weight=None):
  """Returns the mean cross-entropy; K == 1 dispatches to the binary BCE.

  K >= 2: l = -w[y] log softmax(x)[y]; reduced as torch's weighted mean,
  sum(w[y] m l) / sum(w[y] m) (0 if no valid pixel). class_weights: [K] or
  None (all 1). For K == 1 use pos_weight (class_weights must be None).
  """
  where = 'cross_entropy_loss'
  k, logits, labels, mask = _prepare(logits, labels, mask, where)
  if k == 1:
    if class_weights is not None:
      raise ValueError(f'{where}: class_weights is for K >= 2; for K == 1 '
                       'use pos_weight.')
    return binary_cross_entropy_loss(logits, labels, mask=mask,
                                     pos_weight=pos_weight)
  logp = jax.nn.log_softmax(logits.astype(_F32), axis=-1)
  safe = jnp.clip(labels, 0, k - 1).astype(jnp.int32)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  weights = _weights(mask, labels.shape)
  if class_weights is not None:
    cw = jnp.asarray(class_weights, _F32)
    if cw.shape != (k,):
      raise ValueError(f'{where}: class_weights must have shape ({k},) for '
                       f'K == {k}, got {tuple(cw.shape)}.')
    weights = weights * cw[safe]
  return _nan_if_bad_labels(_masked_mean(nll, weights), labels, k, mask)


def focal_loss(logits, labels, *, alpha=0.25, gamma: float = 2.0, mask=None):
  """Returns the mean focal loss (Lin et al. 2017; MONAI FocalLoss).

  l = -alpha_t (1 - p_t) ** gamma log p_t, p_t the probability of the true
  class, mean over valid pixels. K == 1 (sigmoid): alpha_t = alpha for
  foreground pixels and 1 - alpha for background. K >= 2 (softmax):
  alpha_t = 1 - alpha for class 0 and alpha otherwise (MONAI). A sequence
  gives alpha_t = alpha[y] directly (K weights; [background, foreground] for
  K == 1). alpha=None: alpha_t = 1.
  """
  k, logits, labels, mask = _prepare(logits, labels, mask,
                                      'focal_loss')
  x = logits.astype(_F32)
  if k == 1:
    y = labels == 1
    logp_t = jax.nn.log_sigmoid(jnp.where(y, x[..., 0], -x[..., 0]))
    class_of = y.astype(jnp.int32)
  else:
    class_of = jnp.clip(labels, 0, k - 1).astype(jnp.int32)
    logp = jax.nn.log_softmax(x, axis=-1)
    logp_t = jnp.take_along_axis(logp, class_of[..., None], axis=-1)[..., 0]
  table = _focal_alpha_table(alpha, max(k, 2))
  per_pixel = -_power(-jnp.expm1(logp_t), gamma) * logp_t
  if table is not None:
    per_pixel = per_pixel * table[class_of]
  loss = _masked_mean(per_pixel, _weights(mask, labels.shape))
  return _nan_if_bad_labels(loss, labels, k, mask)


def _focal_alpha_table(alpha, k):
  """alpha_t per class, [1 - alpha, alpha, ..., alpha] for a scalar."""
  if alpha is None:
    return None
  table = jnp.asarray(alpha, _F32)
  if table.ndim == 0:
    return jnp.concatenate([1.0 - table[None], jnp.full((k - 1,), table)])
  if table.shape != (k,):
    raise ValueError(f'focal_loss: alpha must be a scalar or have shape ({k},),'
                     f' got {tuple(table.shape)}.')
  return table


# ----------------------------------------------------------- combinations


LOSSES: Mapping[str, Callable] = {
    'dice': soft_dice_loss,
    'ce': cross_entropy_loss,
    'bce': binary_cross_entropy_loss,
    'focal': focal_loss,
    'tversky': tversky_loss,
    'focal_tversky': focal_tversky_loss,
    'generalized_dice': generalized_dice_loss,
    'bwft': binary_weighted_focal_tversky_loss,
    # Seed 003's name for the same loss.
    'bin_weighted_focal_tversky': binary_weighted_focal_tversky_loss,
}


@functools.cache
def _keyword_names(fn: Callable) -> frozenset[str]:
  return frozenset(name for name, p in inspect.signature(fn).parameters.items()
                   if p.kind == inspect.Parameter.KEYWORD_ONLY)


def combined_loss(logits, labels, weights: Mapping[str, float], *, mask=None,
                  loss_kwargs: Mapping[str, Mapping] | None = None, **kwargs):
  """Returns sum_name weights[name] * LOSSES[name](logits, labels, ...).

  The weighted sum is not normalised (seed 003 uses {'bce': 0.6, 'bwft': 0.4,
  'dice': 0.6}). Weights must be Python numbers (static); terms with weight 0
  are not computed.

  Args:
    logits, labels, mask: see the module docstring; mask goes to every term.
    weights: {loss name: weight}, names from `LOSSES`.
    loss_kwargs: optional per-loss keyword arguments, e.g.
      {'tversky': {'alpha': 0.7, 'beta': 0.3}}.
    **kwargs: keyword arguments passed to every selected loss that accepts
      them (e.g. include_background=True); one accepted by none is an error.

  Returns:
    float32 scalar.

  Raises:
    ValueError: an unknown loss name or keyword, or no nonzero weight.
  """
  unknown = sorted(set(weights) - set(LOSSES))
  if unknown:
    raise ValueError(f'combined_loss: unknown loss name(s) {unknown}; valid '
                     f'names are {sorted(LOSSES)} (config.loss.weights).')
  loss_kwargs = dict(loss_kwargs or {})
  stray = sorted(set(loss_kwargs) - set(weights))
  if stray:
    raise ValueError(f'combined_loss: loss_kwargs for {stray}, which are not '
                     f'in weights {sorted(weights)}.')
  accepted = set().union(*(_keyword_names(LOSSES[n]) for n in weights))
  unused = sorted(set(kwargs) - accepted)
  if unused:
    raise ValueError(f'combined_loss: keyword(s) {unused} are accepted by none '
                     f'of the losses {sorted(weights)}.')
  total, used = jnp.zeros((), _F32), 0
  for name, weight in weights.items():
    if float(weight) == 0.0:
      continue
    fn = LOSSES[name]
    kw = {k: v for k, v in kwargs.items() if k in _keyword_names(fn)}
    kw.update(loss_kwargs.get(name, {}))
    total = total + float(weight) * fn(logits, labels, mask=mask, **kw)
    used += 1
  if not used:
    raise ValueError(f'combined_loss: every weight is 0 in {dict(weights)}.')
  return total


def deep_supervision_weights(num_outputs: int) -> list[float]:
  """Default deep-supervision weights, final output last.

  w_i proportional to 2 ** -(n - 1 - i): the final output counts most and each
  earlier output half as much as the next; normalised to sum to 1 (nnU-Net's
  halving, without nnU-Net's zero weight for the coarsest output).
  """
  raw = [2.0 ** -(num_outputs - 1 - i) for i in range(num_outputs)]
  return [w / sum(raw) for w in raw]


def deep_supervision_loss(loss_fn: Callable, logits_list: Sequence,
                          labels, weights: Sequence[float] | None = None,
                          **kwargs):
  """Returns sum_i weights[i] * loss_fn(logits_list[i], labels, **kwargs).

  Args:
    loss_fn: loss(logits, labels, **kwargs) -> scalar.
    logits_list: model outputs, all at the labels' resolution (upsample the
      coarse heads first), the FINAL output LAST.
    labels: [B, *spatial] integer labels.
    weights: one weight per output, used as given; default
      `deep_supervision_weights(len(logits_list))`, e.g. [1/7, 2/7, 4/7].
    **kwargs: passed to loss_fn (e.g. mask=...).

  Returns:
    float32 scalar.
  """
  n = len(logits_list)
  if n == 0:
    raise ValueError('deep_supervision_loss: logits_list is empty.')
  weights = deep_supervision_weights(n) if weights is None else list(weights)
  if len(weights) != n:
    raise ValueError(f'deep_supervision_loss: {len(weights)} weights for {n} '
                     'outputs.')
  for i, logits in enumerate(logits_list):
    if tuple(logits.shape[:-1]) != tuple(labels.shape):
      raise ValueError(
          f'deep_supervision_loss: output {i} has shape {tuple(logits.shape)}, '
          f'labels {tuple(labels.shape)}; upsample every output to the label '
          'resolution (final output last).')
  return sum(float(w) * loss_fn(x, labels, **kwargs)
             for w, x in zip(weights, logits_list))
