"""Tests of medseg_jax.surface_metrics and medseg_jax.surfels.

Expected values are worked out by hand in the comments, or computed by an
independent brute-force reference (explicit neighbour loops, all-pairs
distances) on arrays small enough for it. DeepMind-convention values are
worked by hand (marching-squares contour lengths, the area of a chamfered
box); one 3D case is checked against numbers printed by DeepMind's
surface-distance 0.1 (scripts/crosscheck_nsd_deepmind.py compares many).
"""

import itertools
import math

import numpy as np
import pytest

from medseg_jax import surface_metrics as sm
from medseg_jax import surfels


def _close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol)


# ------------------------------------------------------------ surface metrics


def _brute_surface(mask, connectivity):
  """Mask voxels with an outside-or-background neighbour (explicit loops)."""
  out = np.zeros_like(mask)
  offsets = [o for o in itertools.product((-1, 0, 1), repeat=mask.ndim)
             if 0 < sum(map(abs, o)) <= connectivity]
  for idx in zip(*np.nonzero(mask)):
    for o in offsets:
      n = tuple(i + d for i, d in zip(idx, o))
      if (any(c < 0 or c >= s for c, s in zip(n, mask.shape)) or
          not mask[n]):
        out[idx] = True
        break
  return out


def _brute_directed(a, b, spacing):
  """All-pairs distances from every point of a to the nearest of b."""
  pa, pb = np.argwhere(a) * spacing, np.argwhere(b) * spacing
  return np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1)).min(axis=1)


@pytest.mark.parametrize('shape,spacing,connectivity', [
    ((9, 11), (1.0, 1.0), 1), ((9, 11), (2.0, 0.5), 2),
    ((6, 7, 5), (1.0, 1.0, 2.5), 1), ((6, 7, 5), (0.7, 1.3, 2.0), 3)])
def test_surface_metrics_match_brute_force(shape, spacing, connectivity):
  rng = np.random.default_rng(len(shape) + connectivity)
  for trial in range(3):
    pred = rng.random(shape) < 0.35
    truth = rng.random(shape) < 0.35
    if trial == 2:  # objects away from the edges: the crop is smaller
      keep = np.zeros(shape, bool)
      keep[tuple(slice(2, -1) for _ in shape)] = True
      pred, truth = pred & keep, truth & keep
    sp, st = (_brute_surface(m, connectivity) for m in (pred, truth))
    np.testing.assert_array_equal(
        sm.surface_voxels(pred, connectivity), sp)
    d_pt, d_tp = _brute_directed(sp, st, spacing), _brute_directed(st, sp,
                                                                   spacing)
    got = sm.surface_distances(pred, truth, spacing=spacing,
                                      connectivity=connectivity)
    _close(got[0], d_pt, 1e-9)
    _close(got[1], d_tp, 1e-9)
    kw = dict(spacing=spacing, connectivity=connectivity)
    _close(sm.hausdorff_distance(pred, truth, percentile=100, **kw),
           max(d_pt.max(), d_tp.max()))
    _close(sm.hausdorff_distance(pred, truth, **kw),
           max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))
    pooled = np.concatenate([d_pt, d_tp])
    _close(sm.average_symmetric_surface_distance(pred, truth, **kw),
           pooled.mean())
    _close(sm.normalized_surface_dice(pred, truth, tolerance_mm=1.5, **kw),
           np.mean(pooled <= 1.5))


def test_shifted_squares_2d():
  # 3x3 squares, the prediction shifted right by one. With face
  # connectivity each surface is the 8-voxel ring; 4 of the 8 ring voxels of
  # each lie on the other ring, the other 4 are one voxel away.
  truth = np.zeros((7, 7), bool)
  truth[1:4, 1:4] = True
  pred = np.roll(truth, 1, axis=1)
  assert sm.surface_voxels(truth).sum() == 8
  _close(sm.hausdorff_distance(pred, truth, percentile=100), 1.0)
  _close(sm.hausdorff_distance(pred, truth), 1.0)
  _close(sm.average_symmetric_surface_distance(pred, truth), 0.5)
  _close(sm.normalized_surface_dice(pred, truth, tolerance_mm=0.5), 0.5)
  _close(sm.normalized_surface_dice(pred, truth, tolerance_mm=1.0), 1.0)
  # Anisotropic, spacing 3 along the shift: the 3 outer-column voxels of each
  # ring are 3 mm away; the middle voxel of the inner column is 1 mm from the
  # ring voxel above it (3 mm sideways). Per direction: 0, 0, 0, 0, 1, 3, 3, 3.
  _close(sm.hausdorff_distance(pred, truth, spacing=(1.0, 3.0),
                               percentile=100), 3.0)
  _close(sm.average_symmetric_surface_distance(
      pred, truth, spacing=(1.0, 3.0)),
         2 * 10 / 16)


def test_single_pixels_and_conventions():
  truth = np.zeros((3, 7), bool)
  truth[1, 1] = True
  pred = truth.copy()
  pred[1, 5] = True  # a spurious pixel 4 voxels away
  # d(pred -> truth) = [0, 4], d(truth -> pred) = [0].
  _close(sm.hausdorff_distance(pred, truth, percentile=100), 4.0)
  # MONAI: max(P95([0, 4]), P95([0])) = 0.95 * 4; MedPy: P95([0, 0, 4]):
  # rank 0.95 * 2 = 1.9 -> 0 + 0.9 * 4.
  _close(sm.hausdorff_distance(pred, truth), 3.8)
  _close(sm.hausdorff_distance(pred, truth, convention='medpy'), 3.6)
  # Classic/MONAI ASSD: (0 + 4 + 0) / 3; MedPy: (mean [0, 4] + 0) / 2.
  _close(sm.average_symmetric_surface_distance(pred, truth), 4 / 3)
  _close(sm.average_symmetric_surface_distance(pred, truth,
                                                    convention='medpy'), 1.0)
  _close(sm.normalized_surface_dice(pred, truth, tolerance_mm=1.0), 2 / 3)
  # Two single pixels 3 apart along an axis of spacing 2.0.
  a, b = np.zeros((8, 3), bool), np.zeros((8, 3), bool)
  a[1, 1], b[4, 1] = True, True
  _close(sm.hausdorff_distance(a, b, spacing=(2.0, 0.5), percentile=100), 6.0)
  _close(sm.average_symmetric_surface_distance(a, b, spacing=2.0), 6.0)
  with pytest.raises(ValueError, match='convention'):
    sm.hausdorff_distance(a, b, convention='itk')


def test_shifted_cubes_3d_anisotropic():
  # 3x3x3 cubes, the prediction shifted by one voxel along z (spacing 2).
  # Each surface has 26 voxels (only the centre is interior). Per direction:
  # the 9 voxels of the outer z face are 2 mm away, the face centre next to
  # the other cube's interior is 1 mm away (in-plane), the other 16 are 0.
  truth = np.zeros((5, 5, 7), bool)
  truth[1:4, 1:4, 1:4] = True
  pred = np.roll(truth, 1, axis=2)
  spacing = (1.0, 1.0, 2.0)
  d_pred, d_truth = sm.surface_distances(pred, truth, spacing=spacing)
  for d in (d_pred, d_truth):
    np.testing.assert_allclose(np.sort(d), [0] * 16 + [1] + [2] * 9)
  _close(sm.hausdorff_distance(pred, truth, spacing=spacing,
                               percentile=100), 2.0)
  _close(sm.hausdorff_distance(pred, truth, spacing=spacing), 2.0)
  _close(sm.average_symmetric_surface_distance(pred, truth, spacing=spacing),
         2 * (1 + 9 * 2) / 52)
  _close(sm.normalized_surface_dice(pred, truth, tolerance_mm=1.0,
                                    spacing=spacing), 34 / 52)
  all_at_once = sm.surface_distance_metrics(pred, truth, spacing=spacing,
                                            tolerance_mm=1.0)
  _close([all_at_once[k] for k in ('hd', 'hd95', 'assd', 'nsd')],
         [2.0, 2.0, 38 / 52, 34 / 52])


def test_objects_touching_the_border():
  # The image edge counts as background: a full row is all surface.
  truth = np.zeros((4, 5), bool)
  truth[:2] = True
  assert sm.surface_voxels(truth).sum() == 10
  pred = np.zeros((4, 5), bool)
  pred[:3] = True
  # Pred surface: rows 0 and 2 and the ends of row 1: 0 or 1 away. Truth row 1
  # middle voxels are 1 from pred rows 0/2 (pred row 1 middle is interior).
  _close(sm.hausdorff_distance(pred, truth, percentile=100), 1.0)


def test_surface_empty_rules():
  empty = np.zeros((5, 5), bool)
  one = empty.copy()
  one[2, 2] = True
  assert sm.hausdorff_distance(empty, empty) == 0.0
  assert sm.average_symmetric_surface_distance(empty, empty) == 0.0
  assert sm.normalized_surface_dice(empty, empty, tolerance_mm=1.0) == 1.0
  for a, b in ((one, empty), (empty, one)):
    assert sm.hausdorff_distance(a, b) == math.inf
    assert sm.hausdorff_distance(a, b, percentile=100) == math.inf
    assert sm.average_symmetric_surface_distance(a, b) == math.inf
    assert sm.normalized_surface_dice(a, b, tolerance_mm=1.0) == 0.0
    assert sm.surface_distance_metrics(a, b)['nsd'] == 0.0
  with pytest.raises(ValueError, match='must equal truth shape'):
    sm.hausdorff_distance(one, one[:3])
  with pytest.raises(ValueError, match='spacing must be positive'):
    sm.hausdorff_distance(one, one, spacing=(1.0, 0.0))


def test_stray_voxels_across_the_volume_match_brute_force():
  # A small object and stray false positives in opposite corners: the union
  # box is the whole volume, the case that used to be slow.
  truth = np.zeros((12, 14, 9), bool)
  truth[5:8, 6:9, 3:6] = True
  pred = np.roll(truth, 1, axis=0)
  pred[0, 0, 0] = pred[-1, -1, -1] = pred[0, -1, 4] = True
  spacing = (0.8, 0.8, 2.5)
  sp, st = _brute_surface(pred, 1), _brute_surface(truth, 1)
  d_pt = _brute_directed(sp, st, spacing)
  d_tp = _brute_directed(st, sp, spacing)
  got = sm.surface_distances(pred, truth, spacing=spacing)
  _close(got[0], d_pt, 1e-12)
  _close(got[1], d_tp, 1e-12)
  _close(sm.hausdorff_distance(pred, truth, spacing=spacing),
         max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))


def test_inputs_refused_with_the_reason():
  a = np.zeros((6, 7), np.int32)
  a[2:4, 2:5] = 1
  with pytest.raises(ValueError, match=r'spacing has 3 values but the masks '
                     r'have 2 axes'):
    sm.hausdorff_distance(a, a, spacing=(1.0, 1.0, 2.0))
  with pytest.raises(ValueError, match='spacing has 3 values'):
    sm.normalized_surface_dice(a, a, tolerance_mm=1.0, spacing=(1, 1, 2),
                               convention='deepmind')
  with pytest.raises(ValueError, match=r'pred must be a binary mask .*float'):
    sm.hausdorff_distance(a * 0.7, a)  # a probability map
  with pytest.raises(ValueError, match=r'truth must be a binary mask .*\[0, 2\]'
                     r'.*truth == k'):
    sm.average_symmetric_surface_distance(a, a * 2)  # a label map
  # Integer 0/1 masks are fine and equal their bool version.
  assert sm.hausdorff_distance(a, np.roll(a, 1, 0)) == sm.hausdorff_distance(
      a.astype(bool), np.roll(a, 1, 0).astype(bool))
  # Spacing, percentile and tolerance are keyword-only: swapping the old
  # positional (tolerance, spacing) can no longer pass silently.
  with pytest.raises(TypeError):
    sm.normalized_surface_dice(a, a, (1.0, 2.0), 1.0)  # pylint: disable=too-many-function-args
  with pytest.raises(TypeError):
    sm.hausdorff_distance(a, a, (1.0, 2.0), 95)  # pylint: disable=too-many-function-args
  with pytest.raises(ValueError, match='convention must be one of'):
    sm.normalized_surface_dice(a, a, tolerance_mm=1.0, convention='monai')


def test_nsd_deepmind_2d_by_hand():
  # 3x3 squares, the prediction shifted by one column; spacing (1, 3).
  # Marching squares: points at the 12 grid corners around each square; the
  # 4 outer corners carry a cut of half the block diagonal, d = sqrt(10) / 2,
  # the 4 corners on the row sides a segment along axis 1 (3 mm), the 4 on
  # the column sides one along axis 0 (1 mm): perimeter 16 + 4 d. Per
  # direction, the 4 row-side points and 2 outer corners lie on the other
  # contour (12 + 2 d), two column-side points are 1 mm away, and two
  # column-side points and two outer corners 3 mm away.
  truth = np.zeros((7, 7), bool)
  truth[1:4, 1:4] = True
  pred = np.roll(truth, 1, axis=1)
  d = math.sqrt(10) / 2
  nsd = lambda tol, conv: sm.normalized_surface_dice(
      pred, truth, tolerance_mm=tol, spacing=(1.0, 3.0), convention=conv)
  _close(nsd(0.5, 'deepmind'), (12 + 2 * d) / (16 + 4 * d), 1e-12)
  _close(nsd(1.0, 'deepmind'), (14 + 2 * d) / (16 + 4 * d), 1e-12)
  _close(nsd(3.0, 'deepmind'), 1.0, 1e-12)
  # Counting boundary voxels instead (see test_shifted_squares_2d): 5 of 8.
  _close(nsd(1.0, 'voxels'), 5 / 8, 1e-12)
  corners, lengths = surfels.surface_elements(truth, (1.0, 3.0))
  assert len(corners) == 12
  _close(lengths.sum(), 16 + 4 * d, 1e-12)


def test_surface_elements_of_a_box_3d_by_hand():
  # A box of n = (3, 4, 5) voxels, spacing s. Marching cubes cuts its edges
  # and corners: faces (n_b - 1)(n_c - 1) s_b s_c each side, edge strips
  # (n_a - 1) s_a * sqrt(s_b^2 + s_c^2) / 2 on each of the 4 edges along a,
  # and 8 corner triangles of |(s1 s2, s0 s2, s0 s1)| / 8 each.
  box = np.zeros((6, 7, 8), bool)
  box[1:4, 1:5, 2:7] = True
  s, n = (2.5, 0.8, 1.2), (3, 4, 5)
  faces = edges = 0.0
  for a, b, c in ((0, 1, 2), (1, 0, 2), (2, 0, 1)):
    faces += 2 * (n[b] - 1) * (n[c] - 1) * s[b] * s[c]
    edges += 4 * (n[a] - 1) * s[a] * math.hypot(s[b], s[c]) / 2
  corners = math.sqrt((s[1] * s[2])**2 + (s[0] * s[2])**2 +
                      (s[0] * s[1])**2)
  _, areas = surfels.surface_elements(box, s)
  _close(areas.sum(), faces + edges + corners, 1e-12)
  # A mask touching the image edge is closed by the outside background.
  _close(surfels.surface_elements(box[1:4, 1:5, 2:7], s)[1].sum(),
         faces + edges + corners, 1e-12)


def test_nsd_deepmind_3d_matches_reference_values():
  # Printed by DeepMind's surface-distance 0.1 for this case:
  # compute_surface_dice_at_tolerance(compute_surface_distances(truth, pred,
  # (2.0, 1.0, 0.5)), tol) for tol = 0.5, 1.0, 2.0.
  truth = np.zeros((6, 7, 8), bool)
  truth[1:5, 2:6, 2:6] = True
  truth[3, 1, 3] = True
  pred = np.zeros_like(truth)
  pred[1:5, 1:5, 3:7] = True
  nsd = lambda tol, conv: sm.normalized_surface_dice(
      pred, truth, tolerance_mm=tol, spacing=(2.0, 1.0, 0.5), convention=conv)
  _close(nsd(0.5, 'deepmind'), 0.7972282534428837, 1e-12)
  _close(nsd(1.0, 'deepmind'), 0.9603647307389691, 1e-12)
  _close(nsd(2.0, 'deepmind'), 1.0, 1e-12)
  _close(nsd(0.5, 'voxels'), 0.7321428571428571, 1e-12)
  # Empty rules are the project's (DeepMind gives NaN for two empty masks).
  empty = np.zeros_like(truth)
  assert sm.normalized_surface_dice(empty, empty, tolerance_mm=1.0,
                                    convention='deepmind') == 1.0
  assert sm.normalized_surface_dice(pred, empty, tolerance_mm=1.0,
                                    convention='deepmind') == 0.0
  with pytest.raises(ValueError, match='2D and 3D masks only'):
    sm.normalized_surface_dice(pred[0, 0], truth[0, 0], tolerance_mm=1.0,
                               convention='deepmind')
