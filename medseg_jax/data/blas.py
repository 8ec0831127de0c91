"""A matmul that keeps OpenBLAS on the calling thread.

OpenBLAS's threaded path is very slow (measured ~7x) for thin products when
the other cores are busy, as they are while the train step runs; data loading
does many such products (colour matrices, smooth-noise interpolation).
"""

import numpy as np

# Products up to this many output-times-inner elements per block stay on
# OpenBLAS's single-threaded path.
_SINGLE_THREAD_ELEMENTS = 4 * 65536


def single_thread_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Returns a @ b for 2-D arrays, in row blocks small enough for one thread."""
  rows = max(1, _SINGLE_THREAD_ELEMENTS // (a.shape[1] * b.shape[1]))
  if rows >= a.shape[0]:
    return a @ b
  out = np.empty((a.shape[0], b.shape[1]), np.result_type(a, b))
  for i in range(0, a.shape[0], rows):
    np.matmul(a[i:i + rows], b, out=out[i:i + rows])
  return out
