"""Smooth Gaussian noise in any number of dimensions (synthetic data's texture).

`smooth_noise(rng, shape, feature)` draws i.i.d. normals on a coarse grid (one
node every `feature` pixels or voxels, plus a border node on each side) and
interpolates them with Gaussian weights one axis at a time, as single-threaded
matmuls: smooth, unit-variance noise whose blobs are about `feature` wide, at a
few milliseconds for a 256x256 image. The 2D lesions (`synthetic`) and the 3D
tumours (`synthetic3d`) share it, so a record is the same pure function of its
seed in both.
"""

from collections.abc import Sequence
import functools
import math

import numpy as np

from medseg_jax.data import blas


@functools.lru_cache(maxsize=1024)
def interp_matrix(n: int, cells: int) -> np.ndarray:
  """Returns float32 [cells + 2, n] weights that smoothly upsample a grid.

  Args:
    n: output length (pixels along one axis).
    cells: grid cells along that axis (the grid has cells + 2 nodes).

  Returns:
    Read-only weights; column j holds output pixel j's Gaussian weights to
    the nodes, normalised so that i.i.d. unit-variance nodes give unit
    variance at every output pixel.
  """
  pos = (np.arange(n) + 0.5) * (cells / n)  # Pixel centres in node units.
  nodes = np.arange(cells + 2) - 0.5
  w = np.exp(-0.5 * ((pos[None, :] - nodes[:, None]) / 0.7) ** 2)
  w /= np.sqrt((w * w).sum(axis=0, keepdims=True))
  w = w.astype(np.float32)
  w.setflags(write=False)
  return w


def smooth_noise(rng: np.random.Generator, shape: Sequence[int],
                 feature, axis_order: Sequence[int] | None = None
                 ) -> np.ndarray:
  """Returns smooth Gaussian noise, float32 `shape`, unit standard deviation.

  Args:
    rng: source of randomness; one `standard_normal` draw of the grid.
    shape: spatial shape, any number of axes.
    feature: typical blob size in pixels/voxels, one value or one per axis;
      an axis has ceil(n / feature) cells (at least one).
    axis_order: the order in which axes are interpolated; default last to
      first. The result is the same up to float32 rounding in any order; the
      order is fixed per data set so that its records stay bit-identical
      (the 2D lesions interpolate last to first, the 3D tumours first to
      last).

  Returns:
    The noise field.
  """
  nd = len(shape)
  features = np.broadcast_to(np.asarray(feature, np.float64), (nd,))
  cells = [max(1, math.ceil(n / f)) for n, f in zip(shape, features)]
  field = rng.standard_normal([c + 2 for c in cells], dtype=np.float32)
  for axis in (reversed(range(nd)) if axis_order is None else axis_order):
    n, c = shape[axis], cells[axis]
    moved = np.moveaxis(field, axis, -1)
    flat = blas.single_thread_matmul(
        np.ascontiguousarray(moved).reshape(-1, c + 2), interp_matrix(n, c))
    field = np.moveaxis(flat.reshape(moved.shape[:-1] + (n,)), -1, axis)
  return np.ascontiguousarray(field)
