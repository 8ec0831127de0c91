"""Statistics over cases (host side, NumPy/SciPy): intervals, the ISIC score."""

from collections.abc import Sequence

import numpy as np
from scipy import stats


def mean_confidence_interval(values: Sequence[float],
                             confidence: float = 0.95
                            ) -> tuple[float, float, float]:
  """Returns (mean, lower, upper): the t-distribution interval of the mean.

  mean +- t_{(1 + confidence) / 2, n - 1} * s / sqrt(n), with s the sample
  standard deviation (ddof=1). NaN values (e.g. metrics of ignored empty
  cases) are dropped first; inf values are kept and make the bounds inf/NaN.
  With one value the bounds are NaN; with none everything is NaN.
  """
  if not 0 < confidence < 1:
    raise ValueError(f'confidence must be in (0, 1), got {confidence}.')
  v = np.asarray(values, np.float64).ravel()
  v = v[~np.isnan(v)]
  if v.size == 0:
    return (float('nan'),) * 3
  mean = float(v.mean())
  if v.size == 1:
    return mean, float('nan'), float('nan')
  half = stats.t.ppf((1 + confidence) / 2, v.size - 1) * v.std(ddof=1)
  half /= np.sqrt(v.size)
  return mean, float(mean - half), float(mean + half)


def isic_thresholded_jaccard(per_image_jaccard, threshold: float = 0.65
                            ) -> float:
  """Returns the ISIC 2018 (Task 1) thresholded Jaccard score.

  Each image scores its Jaccard J if J >= threshold and 0 otherwise; the score
  is the mean over images. NaN if there are no images or any is NaN.
  """
  j = np.asarray(per_image_jaccard, np.float64).ravel()
  if j.size == 0 or np.isnan(j).any():
    return float('nan')  # A NaN image must not count as a plain 0.
  return float(np.where(j >= threshold, j, 0.0).mean())
