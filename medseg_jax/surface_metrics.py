"""Surface distances between two binary masks of one case (host side, NumPy).

These run on one case at a time, on the host, after prediction; they are not
jittable. Re-exported by `medseg_jax.metrics`. Inputs are bool masks, or
integer masks holding only 0 and 1: a probability map or a multi-label map is
refused (threshold it, or compare one class at a time: `labels == k`).

Surface voxels (HD, HD95, ASSD, and NSD with convention='voxels'; the same as
MedPy and MONAI's defaults): the mask voxels removed by one binary erosion with
the `connectivity`-structure (default 1: face neighbours, i.e. a voxel with a
background voxel among its 2n face neighbours), outside the image counting as
background. `connectivity=ndim` (3^n full neighbourhood) gives a thicker
surface. Each surface voxel counts once, whatever its area. Distances are
Euclidean, in the units of `spacing` (mm), from each surface voxel of one mask
to the nearest surface voxel of the other (a KD-tree over the surface voxels,
so the cost follows the surfaces, not the volume between stray voxels).

NSD with convention='deepmind' uses area-weighted surface elements instead
(`surfels`): DeepMind's surface-distance package and the NSD paper.

Empty-mask rules (all distance metrics): both masks empty -> 0.0 (HD, HD95,
ASSD) and 1.0 (NSD), since the prediction is exactly right; exactly one empty
-> inf (HD, HD95, ASSD) and 0.0 (NSD). MONAI 1.6.1 returns NaN where both are
empty and NaN, not inf, for HD95 where exactly one is;
DeepMind's package returns NaN NSD where both are empty. Filter such cases
before averaging if you need their conventions.
"""

import numpy as np
from scipy import ndimage
from scipy import spatial

from medseg_jax import surfels

CONVENTIONS = ('monai', 'medpy')
NSD_CONVENTIONS = ('voxels', 'deepmind')


# ------------------------------------------------------------------- inputs


def _binary(mask, name: str) -> np.ndarray:
  """Returns `mask` as bool; refuses float and multi-label maps."""
  mask = np.asarray(mask)
  if mask.dtype == bool:
    return mask
  if not np.issubdtype(mask.dtype, np.integer):
    raise ValueError(
        f'{name} must be a binary mask (bool, or integers 0/1), got dtype '
        f'{mask.dtype}: threshold probabilities first (e.g. {name} > 0.5).')
  if mask.size and (mask.min() < 0 or mask.max() > 1):
    raise ValueError(
        f'{name} must be a binary mask (0/1), found values in '
        f'[{mask.min()}, {mask.max()}]: for a label map, compare one class '
        f'at a time ({name} == k).')
  return mask != 0


def _spacing(spacing, ndim: int) -> tuple[float, ...]:
  """Returns `spacing` as ndim positive floats (None -> all 1.0)."""
  if spacing is None:
    return (1.0,) * ndim
  values = np.asarray(spacing, np.float64).ravel()
  if values.size == 1:
    values = np.repeat(values, ndim)
  if values.size != ndim:
    raise ValueError(f'spacing has {values.size} values but the masks have '
                     f'{ndim} axes: give one voxel size per axis (or one '
                     f'scalar); got spacing={spacing}.')
  if not np.all(values > 0):
    raise ValueError(f'spacing must be positive, got {spacing}.')
  return tuple(values.tolist())


def _pair(pred, truth) -> tuple[np.ndarray, np.ndarray]:
  """Returns both masks as bool arrays (checked binary), same shape."""
  pred, truth = _binary(pred, 'pred'), _binary(truth, 'truth')
  if pred.shape != truth.shape:
    raise ValueError(f'pred shape {pred.shape} must equal truth shape '
                     f'{truth.shape}.')
  if pred.ndim < 1:
    raise ValueError('pred and truth must be arrays with at least one axis.')
  return pred, truth


# ---------------------------------------------------------- surfaces/distances


def surface_voxels(mask, connectivity: int = 1) -> np.ndarray:
  """Returns the bool surface of a binary mask (see the module docstring).

  Args:
    mask: binary array, any number of dimensions.
    connectivity: 1 (face neighbours, MedPy/MONAI) up to mask.ndim (full).

  Returns:
    bool array of mask's shape, True on surface voxels.
  """
  mask = _binary(mask, 'mask')
  structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
  return mask & ~ndimage.binary_erosion(mask, structure, border_value=0)


def _surface_points(mask: np.ndarray, connectivity: int) -> np.ndarray:
  """Indices [n, ndim] of the surface voxels of a bool mask.

  Eroded within the mask's bounding box grown by one voxel: the margin is
  background or the image edge, so no surface voxel changes.
  """
  if not mask.any():
    return np.zeros((0, mask.ndim), np.int64)
  lo, hi = surfels.bounds(mask)
  lo = [max(a - 1, 0) for a in lo]
  box = tuple(slice(a, b + 1) for a, b in zip(lo, hi))
  return np.argwhere(surface_voxels(mask[box], connectivity)) + np.asarray(lo)


def _nearest_distances(queries, targets, sampling) -> np.ndarray:
  """Distance from each `queries` point [n, ndim] to the nearest `targets`.

  The KD-tree finds the nearest target; the distance is then computed from the
  integer offset, sqrt(sum((offset * spacing)^2)), as from a distance
  transform's nearest-feature indices.
  """
  if len(queries) == 0:
    return np.zeros(0)
  if len(targets) == 0:
    return np.full(len(queries), np.inf)
  scale = np.asarray(sampling)
  # Unbalanced, uncompacted trees build and query faster on grid points.
  tree = spatial.cKDTree(targets * scale, balanced_tree=False,
                         compact_nodes=False)
  _, nearest = tree.query(queries * scale)
  offsets = (targets[nearest] - queries) * scale
  return np.sqrt(np.square(offsets).sum(axis=1))


def surface_distances(pred, truth, *, spacing=None, connectivity: int = 1):
  """Returns directed surface distances (pred -> truth, truth -> pred).

  Args:
    pred, truth: binary masks of one case, same shape, 2D or 3D (or nD).
    spacing: voxel size per axis (mm), a scalar or one value per axis.
    connectivity: surface definition, see `surface_voxels`.

  Returns:
    (d_pred, d_truth): float64 arrays; d_pred[i] is the distance from the i-th
    surface voxel of `pred` (C order) to the nearest surface voxel of
    `truth`, and the other way round. If the other mask is empty, the
    distances are inf; an empty mask has an empty distance array.
  """
  pred, truth = _pair(pred, truth)
  sampling = _spacing(spacing, pred.ndim)
  s_pred = _surface_points(pred, connectivity)
  s_truth = _surface_points(truth, connectivity)
  return (_nearest_distances(s_pred, s_truth, sampling),
          _nearest_distances(s_truth, s_pred, sampling))


def _check_convention(convention: str, allowed=CONVENTIONS) -> None:
  if convention not in allowed:
    raise ValueError(f'convention must be one of {allowed}, got '
                     f'{convention!r}.')


def _hausdorff(d_pred, d_truth, percentile, convention) -> float:
  """Percentile Hausdorff from directed distances (both non-empty)."""
  if convention == 'medpy':
    return float(np.percentile(np.concatenate([d_pred, d_truth]), percentile))
  return float(max(np.percentile(d_pred, percentile),
                   np.percentile(d_truth, percentile)))


def _assd(d_pred, d_truth, convention) -> float:
  """Average symmetric surface distance from directed distances."""
  if convention == 'medpy':
    return float((d_pred.mean() + d_truth.mean()) / 2)
  return float(np.concatenate([d_pred, d_truth]).mean())


def _nsd(d_pred, d_truth, tolerance_mm, w_pred=None, w_truth=None) -> float:
  """Normalized surface Dice from directed distances (and weights)."""
  w_pred = np.ones_like(d_pred) if w_pred is None else w_pred
  w_truth = np.ones_like(d_truth) if w_truth is None else w_truth
  close = (w_pred[d_pred <= tolerance_mm].sum() +
           w_truth[d_truth <= tolerance_mm].sum())
  return float(close / (w_pred.sum() + w_truth.sum()))


def _empty_value(d_pred, d_truth, both, one):
  """`both`/`one` when both/one of the masks are empty, else None."""
  if d_pred.size == 0 and d_truth.size == 0:
    return both
  if d_pred.size == 0 or d_truth.size == 0:
    return one
  return None


def hausdorff_distance(pred, truth, *, spacing=None, percentile: float = 95,
                       convention: str = 'monai',
                       connectivity: int = 1) -> float:
  """Returns the (percentile) Hausdorff distance between two masks, in mm.

  HD_p = max(P_p(d(S_pred -> S_truth)), P_p(d(S_truth -> S_pred))), with P_p
  the p-th percentile (numpy linear interpolation) of the directed surface
  voxel distances: MONAI's definition (DeepMind's takes the same maximum of
  directed percentiles, but over area-weighted surface elements).
  percentile=100 is the classic (maximum) Hausdorff distance.
  convention='medpy' instead takes the percentile of both directions pooled
  (MedPy's `hd95`); both agree at 100.

  Args:
    pred, truth: binary masks of one case (same shape).
    spacing: voxel size per axis (keyword only); None -> 1.
    percentile: in [0, 100] (keyword only).
    convention: 'monai' (default) or 'medpy', see above.
    connectivity: surface definition, see `surface_voxels`.

  Returns:
    The distance; 0.0 if both masks are empty, inf if exactly one is (MONAI
    1.6.1 gives NaN there).
  """
  _check_convention(convention)
  if not 0 <= percentile <= 100:
    raise ValueError(f'percentile must be in [0, 100], got {percentile}.')
  d_pred, d_truth = surface_distances(pred, truth, spacing=spacing,
                                      connectivity=connectivity)
  empty = _empty_value(d_pred, d_truth, 0.0, float('inf'))
  return empty if empty is not None else _hausdorff(d_pred, d_truth,
                                                    percentile, convention)


def average_symmetric_surface_distance(pred, truth, *, spacing=None,
                                       convention: str = 'monai',
                                       connectivity: int = 1) -> float:
  """Returns the average symmetric surface distance (ASSD), in mm.

  ASSD = (sum_{a in S_pred} d(a, S_truth) + sum_{b in S_truth} d(b, S_pred))
         / (|S_pred| + |S_truth|), over surface voxels: the classic
  definition, MONAI's `average_surface_distance(symmetric=True)` and MedPy
  >= 0.5.2's `assd` (which pools the distances too). convention='medpy'
  instead averages the two directed means, as MedPy 0.4 did.

  Args:
    pred, truth: binary masks of one case (same shape).
    spacing: voxel size per axis (keyword only); None -> 1.
    convention: 'monai' (default, pooled) or 'medpy' (MedPy 0.4).
    connectivity: surface definition, see `surface_voxels`.

  Returns:
    The distance; 0.0 if both masks are empty, inf if exactly one is.
  """
  _check_convention(convention)
  d_pred, d_truth = surface_distances(pred, truth, spacing=spacing,
                                      connectivity=connectivity)
  empty = _empty_value(d_pred, d_truth, 0.0, float('inf'))
  return empty if empty is not None else _assd(d_pred, d_truth, convention)


def _deepmind_nsd(pred, truth, tolerance_mm, spacing) -> float:
  """NSD over DeepMind's area-weighted surface elements (see `surfels`)."""
  sampling = _spacing(spacing, pred.ndim)
  c_pred, w_pred = surfels.surface_elements(pred, sampling)
  c_truth, w_truth = surfels.surface_elements(truth, sampling)
  d_pred = _nearest_distances(c_pred, c_truth, sampling)
  d_truth = _nearest_distances(c_truth, c_pred, sampling)
  empty = _empty_value(d_pred, d_truth, 1.0, 0.0)
  return empty if empty is not None else _nsd(d_pred, d_truth, tolerance_mm,
                                              w_pred, w_truth)


def normalized_surface_dice(pred, truth, *, tolerance_mm: float,
                            spacing=None, convention: str = 'voxels',
                            connectivity: int = 1) -> float:
  """Returns the normalized surface Dice (NSD) at a tolerance, in [0, 1].

  NSD = (|{a in S_pred: d(a, S_truth) <= tau}| + |{b in S_truth:
        d(b, S_pred) <= tau}|) / (|S_pred| + |S_truth|), where |.| is:
  - convention='voxels' (default): the number of surface voxels, as MONAI's
    `compute_surface_dice` with its default use_subvoxels=False;
  - convention='deepmind': the total length (2D) or area (3D) of DeepMind's
    surface elements (`surfels`), with distances between their grid-corner
    points: DeepMind's `compute_surface_dice_at_tolerance`, the definition of
    the NSD paper (Nikolov et al.) and MONAI's use_subvoxels=True. 2D and 3D.
  The two can differ by 0.2 or more at a tolerance of about one voxel, where
  a voxel shift moves many boundary voxels across the tolerance.

  Args:
    pred, truth: binary masks of one case (same shape).
    tolerance_mm: tau, in the units of spacing (keyword only).
    spacing: voxel size per axis (keyword only); None -> 1.
    convention: 'voxels' or 'deepmind', see above.
    connectivity: surface definition of the 'voxels' convention.

  Returns:
    NSD; 1.0 if both masks are empty (DeepMind: NaN), 0.0 if exactly one is.
  """
  _check_convention(convention, NSD_CONVENTIONS)
  if not tolerance_mm >= 0:
    raise ValueError(f'tolerance_mm must be >= 0, got {tolerance_mm}.')
  if convention == 'deepmind':
    return _deepmind_nsd(*_pair(pred, truth), tolerance_mm, spacing)
  d_pred, d_truth = surface_distances(pred, truth, spacing=spacing,
                                      connectivity=connectivity)
  empty = _empty_value(d_pred, d_truth, 1.0, 0.0)
  return empty if empty is not None else _nsd(d_pred, d_truth, tolerance_mm)


def surface_distance_metrics(pred, truth, *, spacing=None,
                             tolerance_mm: float = 1.0, percentile: float = 95,
                             convention: str = 'monai',
                             connectivity: int = 1) -> dict[str, float]:
  """Returns {'hd', 'hd95', 'assd', 'nsd'} from one distance computation.

  Same definitions and empty rules as the single-metric functions ('hd95'
  uses `percentile`, 'nsd' uses `tolerance_mm` and the 'voxels' convention);
  about three times faster than calling them one by one.

  Args:
    pred, truth: binary masks of one case (same shape).
    spacing, tolerance_mm, percentile, convention, connectivity: as for the
      single-metric functions (all keyword only).

  Returns:
    {'hd': HD (max), 'hd95': HD at `percentile`, 'assd', 'nsd'}, floats.
  """
  _check_convention(convention)
  d_pred, d_truth = surface_distances(pred, truth, spacing=spacing,
                                      connectivity=connectivity)
  dist = _empty_value(d_pred, d_truth, 0.0, float('inf'))
  if dist is not None:
    nsd = 1.0 if dist == 0.0 else 0.0
    return {'hd': dist, 'hd95': dist, 'assd': dist, 'nsd': nsd}
  return {'hd': _hausdorff(d_pred, d_truth, 100, convention),
          'hd95': _hausdorff(d_pred, d_truth, percentile, convention),
          'assd': _assd(d_pred, d_truth, convention),
          'nsd': _nsd(d_pred, d_truth, tolerance_mm)}
