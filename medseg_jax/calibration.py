"""Calibration of pixel-wise probabilities (host side, NumPy).

    bins = reliability_bins(probs, labels, num_bins=15)     # one array
    ece = expected_calibration_error(probs, labels)
    acc = CalibrationAccumulator(); acc.add(probs, truth)   # case by case
    acc.summary()                                           # pooled bins, ECE

Binary probabilities are the foreground probability (shape of the labels, or
a trailing axis of 1); multi-class ones end in a class axis of K >= 2. The
bins are Guo et al. 2017's equal-width confidence bins over [0, 1].
"""

import numpy as np


def _confidence_and_correct(probs, labels, mask):
  """Flattens (probs, labels) to per-pixel (confidence, correct) vectors.

  Binary: probs has the shape of labels (foreground probability) or an extra
  last axis of 1; confidence = max(p, 1 - p), prediction = p > 0.5.
  Multi-class: probs [..., K] with K >= 2; confidence = max_k p, prediction =
  argmax.
  """
  probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
  if probs.shape == labels.shape + (1,):
    probs = probs[..., 0]
  if probs.shape == labels.shape:
    conf, pred = np.maximum(probs, 1 - probs), (probs > 0.5).astype(np.int64)
  elif probs.shape[:-1] == labels.shape:
    conf, pred = probs.max(axis=-1), probs.argmax(axis=-1)
  else:
    raise ValueError(f'probs shape {probs.shape} must be the labels shape '
                     f'{labels.shape}, optionally with a trailing class axis.')
  keep = np.ones(labels.shape, bool) if mask is None else np.asarray(mask) != 0
  return conf[keep], (pred == labels)[keep]


def reliability_bins(probs, labels, num_bins: int = 15, *, mask=None):
  """Returns the reliability diagram of pixel-wise predictions.

  Confidences are binned into `num_bins` equal bins (lo, hi] over [0, 1] (a
  confidence of exactly 0 goes to the first bin), as in Guo et al. 2017.

  Args:
    probs: probabilities, see `_confidence_and_correct` for the shapes.
    labels: integer labels (binary: 0/1).
    num_bins: number of bins.
    mask: optional; pixels where mask == 0 are left out.

  Returns:
    {'edges': [num_bins + 1], 'confidence': mean confidence per bin,
     'accuracy': fraction correct per bin (both NaN for empty bins),
     'count': pixels per bin}.
  """
  if num_bins < 1:
    raise ValueError(f'num_bins must be >= 1, got {num_bins}.')
  conf, correct = _confidence_and_correct(probs, labels, mask)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  idx = np.searchsorted(edges[1:-1], conf, side='left')
  count = np.bincount(idx, minlength=num_bins).astype(np.float64)
  mean = lambda v: np.bincount(idx, v, minlength=num_bins) / np.where(
      count > 0, count, np.nan)
  return {'edges': edges, 'confidence': mean(conf),
          'accuracy': mean(correct.astype(np.float64)), 'count': count}


def expected_calibration_error(probs, labels, num_bins: int = 15, *,
                               mask=None) -> float:
  """Returns ECE = sum_b (n_b / N) |accuracy_b - confidence_b|.

  Over the bins of `reliability_bins` (same arguments); 0.0 when no pixel.
  """
  bins = reliability_bins(probs, labels, num_bins, mask=mask)
  n = bins['count'].sum()
  if n == 0:
    return 0.0
  gap = np.abs(bins['accuracy'] - bins['confidence'])
  return float(np.nansum(bins['count'] * gap) / n)


class CalibrationAccumulator:
  """Reliability bins summed over cases, so memory stays one case (chunk).

  Each case is binned with `reliability_bins` in chunks along its
  first axis; per-bin counts and sums of confidence and correctness add up,
  giving exactly the bins of all pixels pooled.
  """

  def __init__(self, num_bins: int = 15, chunk_pixels: int = 1 << 22):
    if num_bins < 1:
      raise ValueError(f'num_bins must be >= 1, got {num_bins}.')
    self.num_bins = num_bins
    self.chunk_pixels = chunk_pixels
    self.count = np.zeros(num_bins)
    self.confidence_sum = np.zeros(num_bins)
    self.correct_sum = np.zeros(num_bins)

  def add(self, probabilities, truth, mask=None) -> None:
    """Adds one case.

    Args:
      probabilities: [*spatial, K] (K == 1: foreground probability, or
        [*spatial]) or [*spatial, K] softmax probabilities.
      truth: integer labels [*spatial].
      mask: optional [*spatial]; pixels where mask == 0 are left out.
    """
    probabilities, truth = np.asarray(probabilities), np.asarray(truth)
    if truth.ndim == 0 or probabilities.shape[:truth.ndim] != truth.shape:
      raise ValueError(f'CalibrationAccumulator.add: probabilities shape '
                       f'{probabilities.shape} must be the truth shape '
                       f'{truth.shape} plus an optional class axis.')
    per_slice = max(int(np.prod(truth.shape[1:])), 1)
    step = max(self.chunk_pixels // per_slice, 1)
    for start in range(0, truth.shape[0], step):
      part = slice(start, start + step)
      bins = reliability_bins(
          probabilities[part], truth[part], self.num_bins,
          mask=None if mask is None else np.asarray(mask)[part])
      self.count += bins['count']
      self.confidence_sum += np.nan_to_num(bins['confidence']) * bins['count']
      self.correct_sum += np.nan_to_num(bins['accuracy']) * bins['count']

  def summary(self) -> dict:
    """Returns {'ece', 'num_bins', 'num_pixels', 'edges', 'confidence',
    'accuracy', 'count'} (NaN confidence/accuracy in empty bins).

    ECE = sum_b (n_b / N) |accuracy_b - confidence_b| as in
    `expected_calibration_error`; 0.0 when no pixel was added.
    """
    safe = np.where(self.count > 0, self.count, np.nan)
    confidence, accuracy = self.confidence_sum / safe, self.correct_sum / safe
    n = self.count.sum()
    gap = np.nansum(self.count * np.abs(accuracy - confidence))
    return {'ece': float(gap / n) if n else 0.0, 'num_bins': self.num_bins,
            'num_pixels': int(n),
            'edges': np.linspace(0.0, 1.0, self.num_bins + 1).tolist(),
            'confidence': confidence.tolist(), 'accuracy': accuracy.tolist(),
            'count': self.count.tolist()}


def calibration_summary(probabilities_list, truths_list, num_bins: int = 15
                       ) -> dict:
  """Returns `CalibrationAccumulator.summary()` over paired cases.

  Args:
    probabilities_list: per case, probabilities (see
      `CalibrationAccumulator.add`); any iterable, consumed one at a time.
    truths_list: per case, integer labels; same length.
    num_bins: number of equal confidence bins over [0, 1].
  """
  acc = CalibrationAccumulator(num_bins)
  probabilities_list, truths_list = list(probabilities_list), list(truths_list)
  if len(probabilities_list) != len(truths_list):
    raise ValueError(f'calibration_summary: {len(probabilities_list)} '
                     f'probability maps but {len(truths_list)} truths.')
  for probabilities, truth in zip(probabilities_list, truths_list):
    acc.add(probabilities, truth)
  return acc.summary()
