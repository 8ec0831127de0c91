"""Inference engine: whole-image and sliding-window prediction, TTA, ensembles,
MC dropout.

Everything here predicts ONE case at a time: an image `[*spatial, C]`
(channels-last, 2D or 3D) goes in, probabilities `[*spatial, K]` (float32,
host NumPy) come out. The model runs through a *predict function*

    predict_fn(x [B, *patch, C], rng=None) -> probabilities [B, *patch, K]

built by `make_predict_fn` (one model, or a list of checkpoints whose
probabilities are averaged). The pieces compose:

    predict_fn = make_predict_fn(model, variables)
    case = lambda im: sliding_window(predict_fn, im, (96, 96, 96))
    probs = tta_flips(case, image)                  # mirror TTA on top
    labels = labels_from_probabilities(probs)
    maps = mc_dropout_predict(model, variables, image, 20, rng,
                              patch_size=(96, 96, 96))

Preparing a case as training did (resizing, intensity preprocessing,
normalisation) and choosing among these pieces from a run's config is the
`Predictor`'s business (`predictor.py`); post-processing of label maps is in
`postprocess`, Grad-CAM in `gradcam`.
"""

import functools
import itertools
from typing import Callable, Sequence
import warnings

import flax
import jax
import jax.numpy as jnp
import numpy as np

from medseg_jax import metrics

PredictFn = Callable[..., jax.Array]
BLENDS = ('gaussian', 'constant')


# The probability rule (sigmoid for K == 1, softmax otherwise) is defined once,
# in `metrics`; these names keep working for callers of `inference`.
probabilities = metrics.probabilities
labels_from_probabilities = metrics.labels_from_probabilities


def predictive_entropy(probs):
  """Returns the entropy (nats) `[...]` of probabilities `[..., K]`.

  K == 1 is the binary entropy of p (so p = 0.5 gives ln 2); K >= 2 the
  entropy of the categorical distribution. 0 log 0 is 0.
  """
  p = np.asarray(probs, np.float64)
  if p.shape[-1] == 1:
    p = np.concatenate([p, 1.0 - p], axis=-1)
  plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
  return (-plogp.sum(axis=-1)).astype(np.float32)


def input_divisor(model) -> int | tuple[int, ...]:
  """Returns the multiple every spatial input size of `model` must be.

  `model.input_divisor` when the model defines it (U-Net and UNet++: one int
  with the default strides, a per-axis tuple such as (4, 8, 8) with
  anisotropic `strides`; TransUNet), else 2**(len(features) - 1), else 1.
  """
  divisor = getattr(model, 'input_divisor', None)
  if divisor is not None:
    return (tuple(int(d) for d in divisor)
            if isinstance(divisor, (tuple, list)) else int(divisor))
  features = getattr(model, 'features', None)
  return 2**(len(features) - 1) if features else 1


def per_axis(divisor, ndim: int) -> tuple[int, ...]:
  """Returns `input_divisor`'s value as one multiple per spatial axis.

  Raises:
    ValueError: a per-axis divisor of another rank than the input's.
  """
  if isinstance(divisor, (tuple, list)):
    if len(divisor) != ndim:
      raise ValueError(f'The model downsamples {len(divisor)} axes (input '
                       f'multiples {tuple(divisor)}), the input has {ndim} '
                       'spatial axes; check config.model.strides.')
    return tuple(int(d) for d in divisor)
  return (int(divisor),) * ndim


# --------------------------------------------------------------------------
# Predict functions.


@functools.lru_cache(maxsize=32)
def _jitted_apply(model, mc_dropout: bool):
  """Returns jit((variables, x, rng) -> probabilities).

  Variables are an argument, not a closure constant: the program then does
  not embed the weights, and every checkpoint of an ensemble shares it.
  Cached per (model, mc_dropout) (Flax modules hash by their fields), so
  repeated MC-dropout or predict-function builds (the dashboard's) reuse
  one compilation instead of tracing and compiling again.
  """

  def apply(variables, x, rng):
    rngs = {'dropout': rng} if mc_dropout else None
    logits = model.apply(variables, x, train=False, mc_dropout=mc_dropout,
                         rngs=rngs)
    return probabilities(logits)

  return jax.jit(apply)


def make_predict_fn(model, variables, *, mc_dropout: bool = False
                    ) -> PredictFn:
  """Returns the jitted predict function of one trained model or an ensemble.

  Args:
    model: a Flax module with `apply(variables, x, train, mc_dropout, rngs)`
      returning logits `[B, *spatial, K]`.
    variables: {'params': ..., 'batch_stats': ...} (batch_stats optional)
      of one model, or a list of such dicts of the same structure (an
      ensemble, e.g. the best checkpoint of each cross-validation fold).
    mc_dropout: keep dropout on (Monte Carlo dropout; norms stay in eval
      mode); the function then needs an `rng`.

  Returns:
    `predict_fn(x [B, *spatial, C], rng=None) -> probabilities [B, *spatial,
    K]` float32 (a device array; dispatch is asynchronous); for an ensemble
    the mean of the members' probabilities. It is compiled once per input
    shape (and key type), shared by every member; inputs are cast to float32
    first so a float64 input does not compile a second program. Without
    mc_dropout `rng` is ignored. `predict_fn.jitted` is the underlying
    `jit((variables, x, rng) -> probabilities)`.

  Raises:
    ValueError: an empty list of variables.
  """
  members = (list(variables) if isinstance(variables, (list, tuple))
             else [variables])
  if not members:
    raise ValueError('make_predict_fn needs at least one set of variables '
                     '(one per checkpoint of an ensemble).')
  jitted = _jitted_apply(model, mc_dropout)
  dummy_rng = jax.random.PRNGKey(0)

  def predict(x, rng=None):
    if mc_dropout and rng is None:
      raise ValueError('This predict function has mc_dropout=True: pass a '
                       'PRNG key as rng, a different one per sample.')
    x = jnp.asarray(x, jnp.float32)
    rng = rng if mc_dropout else dummy_rng  # One signature: one compilation.
    total = None
    for member in members:
      probs = jitted(member, x, rng)
      total = probs if total is None else total + probs
    return total / len(members) if len(members) > 1 else total

  predict.jitted = jitted
  return predict


def _call(predict_fn: PredictFn, x, rng):
  return predict_fn(x) if rng is None else predict_fn(x, rng)


def _check_case(image, num_spatial: int | None, what: str) -> np.ndarray:
  image = np.asarray(image, np.float32)
  if image.ndim < 3 or (num_spatial is not None and
                        image.ndim != num_spatial + 1):
    want = (f'{num_spatial} spatial axes + channels' if num_spatial else
            '[H, W, C] or [D, H, W, C]')
    raise ValueError(f'{what}: the image must be one channels-last case '
                     f'({want}); got shape {image.shape}. Drop the batch axis '
                     'and add a trailing channel axis (image[..., None]).')
  return image


def _pad_to(image: np.ndarray, target: Sequence[int], mode: str, cval: float):
  """Pads the spatial axes up to `target`, centred; returns (padded, crop)."""
  pads = [((t - s) // 2, t - s - (t - s) // 2) if t > s else (0, 0)
          for s, t in zip(image.shape[:-1], target)]
  if not any(a or b for a, b in pads):
    return image, (slice(None),) * (image.ndim - 1)
  kwargs = {'constant_values': cval} if mode == 'constant' else {}
  padded = np.pad(image, pads + [(0, 0)], mode=mode, **kwargs)
  crop = tuple(slice(a, a + s) for (a, _), s in zip(pads, image.shape[:-1]))
  return padded, crop


def predict_whole(predict_fn: PredictFn, image, divisor=1, *,
                  pad_mode: str = 'constant', cval: float = 0.0,
                  rng=None) -> np.ndarray:
  """Returns the probabilities `[*spatial, K]` of one whole image.

  The image is padded (centred) to the next multiple of `divisor` along
  every spatial axis, predicted in one pass, and the output cropped back.

  Args:
    predict_fn: see `make_predict_fn`.
    image: `[*spatial, C]`, one case.
    divisor: the model's total downsampling, `input_divisor(model)`: one
      int, or one per spatial axis.
    pad_mode: np.pad mode: 'constant' (cval; 0 is the mean of a z-scored
      image) or 'reflect' / 'edge' / 'symmetric'.
    cval: the constant for pad_mode='constant'.
    rng: passed to predict_fn when given (MC dropout).
  """
  image = _check_case(image, None, 'predict_whole')
  spatial = image.shape[:-1]
  target = [-(-s // d) * d
            for s, d in zip(spatial, per_axis(divisor, len(spatial)))]
  padded, crop = _pad_to(image, target, pad_mode, cval)
  probs = np.asarray(_call(predict_fn, padded[None], rng), np.float32)[0]
  return probs[crop]


# --------------------------------------------------------------------------
# Sliding windows.


def window_starts(image_size: Sequence[int], patch_size: Sequence[int],
                  overlap: float) -> list[list[int]]:
  """Returns, per spatial axis, the start of every window along it.

  nnU-Net's grid: the fewest windows whose step is at most
  `patch * (1 - overlap)`, spread evenly from 0 to `size - patch` (so the
  first window starts at 0 and the last one is flush with the far edge).
  Axes no longer than the patch get one window at 0.
  """
  if not 0.0 <= overlap < 1.0:
    raise ValueError(f'overlap must be in [0, 1), got {overlap}.')
  starts = []
  for size, patch in zip(image_size, patch_size):
    if size <= patch:
      starts.append([0])
      continue
    max_step = patch * (1.0 - overlap)
    num = int(np.ceil((size - patch) / max_step)) + 1
    step = (size - patch) / (num - 1)
    starts.append([int(round(step * i)) for i in range(num)])
  return starts


def gaussian_importance_map(patch_size: Sequence[int],
                            sigma_scale: float = 0.125) -> np.ndarray:
  """Returns nnU-Net's Gaussian window weights `[*patch_size]`, float32.

  A separable Gaussian with sigma = patch * sigma_scale per axis, centred on
  the patch centre ((p - 1) / 2: symmetric, so mirroring commutes with it;
  nnU-Net uses p // 2), scaled to a maximum of 1, and clipped from below at
  its smallest nonzero value so that no voxel gets zero weight.
  """
  weights = np.ones((), np.float64)
  for p in patch_size:
    sigma = max(p * sigma_scale, 1e-6)
    x = np.arange(p, dtype=np.float64) - (p - 1) / 2.0
    weights = np.multiply.outer(weights, np.exp(-0.5 * (x / sigma)**2))
  weights = (weights / weights.max()).astype(np.float32)
  # After the cast: float32 underflows sooner than float64.
  return np.maximum(weights, weights[weights > 0].min())


def sliding_window(predict_fn: PredictFn, image, patch_size: Sequence[int],
                   overlap: float = 0.5, blend: str = 'gaussian',
                   batch_size: int = 4, sigma_scale: float = 0.125, *,
                   pad_mode: str = 'constant', cval: float = 0.0,
                   rng=None) -> np.ndarray:
  """Returns the probabilities `[*spatial, K]` of one case by sliding windows.

  Windows of `patch_size` on the grid of `window_starts` (nnU-Net) are
  predicted `batch_size` at a time; each window's probabilities are
  weighted by the importance map and accumulated, then divided by the summed
  weights. The last batch is padded with empty windows, so `predict_fn` sees
  one input shape and compiles once per patch shape. An image smaller than
  the patch along some axis is padded to it (centred) and cropped back.
  While the host accumulates one batch the device already runs the next.

  The counterpart of MONAI's `sliding_window_inference(inputs, roi_size,
  sw_batch_size, predictor, overlap, mode, sigma_scale, padding_mode, cval)`:
  roi_size -> patch_size, sw_batch_size -> batch_size, mode -> blend,
  padding_mode -> pad_mode (np.pad names); here one channels-last case, not
  a channels-first batch, and `predictor` returns probabilities. The window
  grid and defaults (overlap 0.5, Gaussian sigma 1/8) are nnU-Net's.

  Args:
    predict_fn: `(x [B, *patch, C]) -> [B, *patch, K]` (or `(x, rng)` when
      rng is given), e.g. `make_predict_fn(model, variables)`.
    image: `[*spatial, C]`, one case.
    patch_size: window size per spatial axis (each a multiple of the model's
      `input_divisor`).
    overlap: fraction of a window shared with its neighbour, in [0, 1).
    blend: 'gaussian' (weights falling off towards window borders, where
      predictions lack context) or 'constant' (plain average).
    batch_size: windows per predict_fn call.
    sigma_scale: Gaussian sigma as a fraction of the patch size.
    pad_mode: np.pad mode for images smaller than the patch.
    cval: constant for pad_mode='constant'.
    rng: when given, predict_fn(x, fold_in(rng, batch index)) (MC dropout).

  Returns:
    float32 NumPy probabilities `[*spatial, K]`.
  """
  patch_size = tuple(int(p) for p in patch_size)
  image = _check_case(image, len(patch_size), 'sliding_window')
  if blend not in BLENDS:
    raise ValueError(f'Unknown blend {blend!r}; use one of {BLENDS}.')
  if batch_size < 1 or min(patch_size) < 1:
    raise ValueError(f'batch_size ({batch_size}) and patch_size '
                     f'({patch_size}) must be positive.')
  padded, crop = _pad_to(image, patch_size, pad_mode, cval)
  spatial = padded.shape[:-1]
  weights = (gaussian_importance_map(patch_size, sigma_scale)
             if blend == 'gaussian' else np.ones(patch_size, np.float32))
  windows = [tuple(slice(s, s + p) for s, p in zip(starts, patch_size))
             for starts in itertools.product(
                 *window_starts(spatial, patch_size, overlap))]
  out, norm = None, np.zeros(spatial, np.float32)

  def accumulate(chunk, probs):
    nonlocal out
    probs = np.asarray(probs, np.float32)  # Waits for the device.
    if out is None:
      out = np.zeros((*spatial, probs.shape[-1]), np.float32)
    for j, window in enumerate(chunk):
      out[window] += probs[j] * weights[..., None]
      norm[window] += weights

  pending = None
  for first in range(0, len(windows), batch_size):
    chunk = windows[first:first + batch_size]
    batch = np.zeros((batch_size, *patch_size, padded.shape[-1]), np.float32)
    for j, window in enumerate(chunk):
      batch[j] = padded[window]
    batch_rng = (None if rng is None else
                 jax.random.fold_in(rng, first // batch_size))
    probs = _call(predict_fn, batch, batch_rng)
    if pending is not None:
      accumulate(*pending)
    pending = (chunk, probs)
  accumulate(*pending)
  return (out / norm[..., None])[crop]


# --------------------------------------------------------------------------
# Test-time augmentation and MC dropout.


def flip_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
  """Returns every subset of `axes` (2**len(axes), the identity first)."""
  axes = tuple(axes)
  return [c for r in range(len(axes) + 1)
          for c in itertools.combinations(axes, r)]


def tta_flips(predict_case: Callable, image, axes: Sequence[int] | None = None,
              flips: Sequence[Sequence[int]] | None = None) -> np.ndarray:
  """Returns mirror test-time augmentation: the mean probability over flips.

  Each flipped image is predicted and its prediction flipped back before
  averaging (nnU-Net's mirroring).

  Args:
    predict_case: `image [*spatial, C] -> probabilities [*spatial, K]`, e.g.
      `lambda im: sliding_window(predict_fn, im, patch)`.
    image: `[*spatial, C]`, one case.
    axes: spatial axes (0-based, channel excluded) to mirror; all by default.
    flips: the flip combinations to use (tuples of axes, () = no flip);
      every subset of `axes` (2**len(axes) passes) by default.

  Returns:
    float32 NumPy probabilities `[*spatial, K]`.
  """
  image = _check_case(image, None, 'tta_flips')
  ndim = image.ndim - 1
  axes = tuple(range(ndim)) if axes is None else tuple(axes)
  flips = flip_combinations(axes) if flips is None else [tuple(f)
                                                         for f in flips]
  bad = [a for f in flips for a in f if not 0 <= a < ndim]
  if bad or not flips:
    raise ValueError(f'tta_flips: flip axes must be spatial axes in [0, '
                     f'{ndim}) of an image of shape {image.shape} and at '
                     f'least one flip is needed; got {flips}.')
  total = None
  for f in flips:
    flipped = np.flip(image, f) if f else image
    probs = np.asarray(predict_case(np.ascontiguousarray(flipped)),
                       np.float32)
    probs = np.flip(probs, f) if f else probs
    total = probs.copy() if total is None else total + probs
  return total / len(flips)


def _uses_dropout_rng(model, variables, shape) -> bool:
  """Whether apply(mc_dropout=True) asks for a 'dropout' rng (traced only)."""
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  try:
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False,
                                            mc_dropout=True), variables, x)
  except flax.errors.InvalidRngError:
    return True
  return False


def mc_dropout_predict(model, variables, image, num_samples: int = 20,
                       rng=None, *, patch_size: Sequence[int] | None = None,
                       overlap: float = 0.5, blend: str = 'gaussian',
                       batch_size: int = 4, divisor=None
                       ) -> dict[str, np.ndarray]:
  """Returns Monte Carlo dropout maps of one case.

  Runs `num_samples` stochastic passes (dropout on, norms in eval mode), a
  different dropout key per sample (`fold_in(rng, sample)`), whole-image or
  by sliding windows; statistics are accumulated on the fly (Welford), so
  memory does not grow with the number of samples.

  A model that applies no dropout under mc_dropout=True
  (config.model.dropout_rate = 0, or no dropout location) is an error, not a
  warning: its samples would all be equal and the std/entropy maps would
  silently say "certain".

  Args:
    model: the Flax module (`apply(..., mc_dropout=True)` must use dropout).
    variables: its variables.
    image: `[*spatial, C]`, one (normalised) case.
    num_samples: stochastic passes (>= 2; 20 is common).
    rng: a PRNG key; jax.random.PRNGKey(0) when None.
    patch_size: predict by `sliding_window` with these windows (and overlap,
      blend, batch_size); whole-image (`predict_whole`) when None.
    overlap: see `sliding_window`.
    blend: see `sliding_window`.
    batch_size: see `sliding_window`.
    divisor: whole-image padding multiple; `input_divisor(model)` if None.

  Returns:
    {'mean': mean probabilities [*spatial, K], 'std': their standard
    deviation over samples (population, ddof=0) [*spatial, K], 'entropy':
    predictive entropy of the mean (nats; binary for K == 1) [*spatial],
    'mutual_information': entropy minus the mean per-sample entropy (the
    model-uncertainty part, BALD) [*spatial]}, float32 NumPy.
  """
  image = _check_case(image, None, 'mc_dropout_predict')
  if num_samples < 2:
    raise ValueError(f'mc_dropout_predict needs num_samples >= 2 to measure '
                     f'spread, got {num_samples} (config.eval.mc_samples).')
  divisor = input_divisor(model) if divisor is None else divisor
  spatial = image.shape[:-1]
  probe = (tuple(patch_size) if patch_size else
           tuple(-(-s // d) * d
                 for s, d in zip(spatial, per_axis(divisor, len(spatial)))))
  if not _uses_dropout_rng(model, variables, (1, *probe, image.shape[-1])):
    raise ValueError(
        f'mc_dropout_predict: {type(model).__name__} applies no dropout with '
        'mc_dropout=True (dropout_rate is 0 or dropout_at is empty), so all '
        f'{num_samples} samples would be equal. Train with '
        'config.model.dropout_rate > 0, or set config.eval.mc_samples=0.')
  rng = jax.random.PRNGKey(0) if rng is None else rng
  predict_fn = make_predict_fn(model, variables, mc_dropout=True)
  mean = m2 = sample_entropy = None
  for s in range(num_samples):
    key = jax.random.fold_in(rng, s)
    if patch_size:
      probs = sliding_window(predict_fn, image, patch_size, overlap, blend,
                             batch_size, rng=key)
    else:
      probs = predict_whole(predict_fn, image, divisor, rng=key)
    probs = probs.astype(np.float64)
    if mean is None:
      mean, m2 = np.zeros_like(probs), np.zeros_like(probs)
      sample_entropy = np.zeros(probs.shape[:-1], np.float64)
    delta = probs - mean
    mean += delta / (s + 1)
    m2 += delta * (probs - mean)
    sample_entropy += predictive_entropy(probs)
  std = np.sqrt(np.maximum(m2 / num_samples, 0.0))
  if not std.any():
    warnings.warn('mc_dropout_predict: all samples are identical; the '
                  'uncertainty maps are zero.', stacklevel=2)
  entropy = predictive_entropy(mean)
  mutual = np.maximum(entropy - sample_entropy / num_samples, 0.0)
  return {'mean': mean.astype(np.float32), 'std': std.astype(np.float32),
          'entropy': entropy,
          'mutual_information': mutual.astype(np.float32)}
