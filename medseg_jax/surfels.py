"""Area-weighted surface elements of a binary mask (DeepMind's definition).

The surface-distance package of DeepMind (Nikolov et al. 2018, the paper that
introduced the normalized surface Dice) does not count boundary voxels. It
places a point at every corner of the voxel grid (the centre of each 2x2 or
2x2x2 block of voxels, half a voxel off the voxel centres), codes the block's
inside/outside pattern as a number, and keeps the corners whose block is mixed
as surface points. Each point carries the length (2D, marching squares) or
area (3D, marching cubes) of the piece of surface that passes through its
block, scaled by the spacing. Outside the image counts as background.

`surface_elements` returns those points and weights; `surface_metrics` measures
distances between them. Only 2D and 3D masks have such elements.

The 3D areas come from the marching-cubes surface normals of DeepMind's
`lookup_tables.py` (surface-distance 0.1, Copyright 2018 Google Inc., Apache
License 2.0, the license of this project too), stored compactly: per block
code, the absolute normal components times 8, three digits per triangle. A
code and its complement (255 - code) have the same triangles, so codes 0..127
are listed. A triangle's area under spacing (s0, s1, s2) is
|(n0 s1 s2, n1 s0 s2, n2 s0 s1)|.
"""

import functools

import numpy as np

_NORMALS_X8 = (
    '000', '111', '111', '220 220',  # 0
    '111', '202 202', '111 111', '400 222 111',  # 4
    '111', '111 111', '202 202', '400 222 111',  # 8
    '220 220', '400 222 111', '400 222 111', '400 400',  # 12
    '111', '022 022', '111 111', '040 222 111',  # 16
    '111 111', '004 222 111', '111 111 111', '111 222 222 111',  # 20
    '111 111', '022 022 111', '202 202 111', '111 333 022 202',  # 24
    '111 220 220', '333 022 111 220', '400 111 222 111', '400 111 222',  # 28
    '111', '111 111', '022 022', '040 111 222',  # 32
    '111 111', '111 202 202', '022 022 111', '333 022 111 202',  # 36
    '111 111', '111 111 111', '004 222 111', '222 222 111 111',  # 40
    '111 220 220', '400 222 111 111', '022 333 111 220', '400 222 111',  # 44
    '220 220', '040 222 111', '040 111 222', '040 040',  # 48
    '220 220 111', '333 202 111 220', '111 040 222 111', '040 222 111',  # 52
    '111 220 220', '040 222 111 111', '333 220 111 202', '040 222 111',  # 56
    '220 220 220 220', '220 220 111', '111 220 220', '220 220',  # 60
    '111', '111 111', '111 111', '111 220 220',  # 64
    '022 022', '004 222 111', '022 022 111', '333 022 111 220',  # 68
    '111 111', '111 111 111', '111 202 202', '400 222 111 111',  # 72
    '040 222 111', '222 222 111 111', '202 333 022 111', '400 222 111',  # 76
    '202 202', '004 222 111', '111 202 202', '202 333 220 111',  # 80
    '004 222 111', '004 004', '111 111 222 004', '111 222 004',  # 84
    '202 202 111', '004 222 111 111', '202 202 202 202', '111 202 202',  # 88
    '202 333 220 111', '004 222 111', '111 202 202', '202 202',  # 92
    '111 111', '111 111 111', '111 022 022', '040 111 222 111',  # 96
    '022 022 111', '004 222 111 111', '022 022 022 022', '022 022 111',  # 100
    '111 111 111', '111 111 111 111', '004 222 111 111', '111 111 111',  # 104
    '040 222 111 111', '111 111 111', '022 022 111', '111 111',  # 108
    '400 222 111', '222 111 222 111', '333 022 111 202', '040 222 111',  # 112
    '333 220 022 111', '111 222 004', '111 022 022', '022 022',  # 116
    '400 222 111 111', '111 111 111', '202 202 111', '111 111',  # 120
    '220 220 111', '111 111', '111 111', '111',  # 124
)


@functools.lru_cache(maxsize=64)
def _area_table_3d(spacing: tuple[float, float, float]) -> np.ndarray:
  """Surface area (mm^2) of each of the 256 codes of a 2x2x2 block."""
  s0, s1, s2 = spacing
  scale = np.array([s1 * s2, s0 * s2, s0 * s1]) / 8.0
  half = []
  for entry in _NORMALS_X8:
    normals = np.array([[int(d) for d in t] for t in entry.split()], float)
    half.append(np.linalg.norm(normals * scale, axis=1).sum())
  half = np.array(half)
  return np.concatenate([half, half[::-1]])  # code c >= 128 is 255 - c.


@functools.lru_cache(maxsize=64)
def _length_table_2d(spacing: tuple[float, float]) -> np.ndarray:
  """Contour length (mm) of each of the 16 codes of a 2x2 block.

  Bits: 8 top-left, 4 top-right, 2 bottom-left, 1 bottom-right (axis 0 runs
  down). One corner in or out: a cut across it, half the block diagonal. Two
  corners in a row (same axis-0 index): a line along axis 1 (length s1); in a
  column: s0. Two diagonal corners: two cuts.
  """
  s0, s1 = spacing
  cut = 0.5 * np.hypot(s0, s1)
  table = np.zeros(16)
  for code in range(1, 15):
    ones = bin(code).count('1')
    if ones in (1, 3):
      table[code] = cut
    elif code in (0b1100, 0b0011):
      table[code] = s1
    elif code in (0b1010, 0b0101):
      table[code] = s0
    else:  # 0b1001, 0b0110
      table[code] = 2 * cut
  return table


def _block_codes(mask: np.ndarray) -> np.ndarray:
  """Code of every 2^n block of the zero-padded mask (shape + 1 per axis).

  Block j covers padded voxels j..j+1 per axis; the voxel at offset k in
  {0, 1}^n sets bit (2^n - 1 - sum_i k_i 2^(n-1-i)), DeepMind's bit order.
  """
  padded = np.pad(mask, 1).astype(np.uint8)
  ndim = mask.ndim
  codes = np.zeros(tuple(s + 1 for s in mask.shape), np.uint8)
  for bit, offset in enumerate(np.ndindex(*(2,) * ndim)):
    part = padded[tuple(slice(k, k + s + 1)
                        for k, s in zip(offset, mask.shape))]
    codes |= part << np.uint8((1 << ndim) - 1 - bit)
  return codes


def bounds(mask: np.ndarray) -> tuple[list[int], list[int]]:
  """Returns (lo, hi): the bounding box mask[lo:hi] of a non-empty mask."""
  lo, hi = [], []
  for axis in range(mask.ndim):
    other = tuple(a for a in range(mask.ndim) if a != axis)
    idx = np.flatnonzero(mask.any(axis=other))
    lo.append(int(idx[0]))
    hi.append(int(idx[-1]) + 1)
  return lo, hi


def surface_elements(mask, spacing) -> tuple[np.ndarray, np.ndarray]:
  """Returns the surface points of a 2D or 3D mask and their weights.

  Args:
    mask: bool array, 2D or 3D.
    spacing: voxel size per axis (mm), a tuple of mask.ndim positive floats.

  Returns:
    (corners, weights): int64 [n, ndim] grid corners, where corner c lies at
    voxel coordinate c - 0.5 (between voxels c - 1 and c); float64 [n]
    contour lengths (2D) or surface areas (3D) in mm / mm^2. Both empty for
    an empty mask.
  """
  mask = np.asarray(mask, bool)
  if mask.ndim not in (2, 3):
    raise ValueError(f'surface elements exist for 2D and 3D masks only, got '
                     f'shape {mask.shape}.')
  spacing = tuple(float(s) for s in spacing)
  if not mask.any():
    return np.zeros((0, mask.ndim), np.int64), np.zeros(0)
  lo, hi = bounds(mask)
  codes = _block_codes(mask[tuple(slice(a, b) for a, b in zip(lo, hi))])
  full = (1 << (1 << mask.ndim)) - 1
  border = (codes != 0) & (codes != full)
  table = (_length_table_2d(spacing) if mask.ndim == 2 else
           _area_table_3d(spacing))
  corners = np.argwhere(border) + np.asarray(lo)
  return corners, table[codes[border]]
