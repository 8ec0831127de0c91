"""--mode=plan: a data set's fingerprint -> nnU-Net's decisions, explained.

    fp = fingerprint.compute_fingerprint(config.data)
    plan = make_plan(fp, config, measure, budget_bytes)

Every decision comes with the reason it was taken, in words that the
generated config files repeat in their docstrings:

* target spacing: the median spacing; when the coarsest axis is more than
  `ANISOTROPY` times coarser than the others and has fewer than a third of
  their voxels (nnU-Net's two conditions), its 10th percentile instead, so
  the low-resolution axis is not upsampled to a made-up resolution;
* normalisation: `ct` with the foreground's 0.5/99.5 percentiles as window
  when every channel is CT, else the per-case z-score;
* per-axis pooling: an axis is pooled at a level only while its current
  spacing is less than twice the finest one (nnU-Net), so an anisotropic
  axis is pooled later, once the others have caught up;
* patch and depth: from the median resampled shape, shrinking the axis whose
  patch is largest relative to the median shape until one train step at
  batch 2 fits the memory budget. Memory is XLA's own figure for the
  compiled step (`measure`, from `plan_memory`), not a reference network's
  estimate; then the largest batch that fits, capped so that a batch holds
  at most 5% of the data set's voxels (nnU-Net);
* configurations: 3D full resolution; 2D too when the data is anisotropic
  or the 3D patch sees less than a quarter of the median case.

Pure Python and NumPy: `measure(spatial, batch, features, strides) ->
bytes` is passed in, so the search is tested without compiling.
"""

import math
from collections.abc import Callable, Sequence

import numpy as np

ANISOTROPY = 3.0  # nnU-Net's threshold for the low-resolution-axis rule.
MIN_FEATURE_MAP = 4  # Smallest edge the bottleneck may have (nnU-Net).
MAX_BATCH_SHARE = 0.05  # A batch holds at most 5% of the data set's voxels.
MAX_BATCH = {2: 64, 3: 8}
STEPS_PER_EPOCH = 250  # nnU-Net's epoch: a fixed number of iterations.
SMALL_3D_PATCH = 0.25  # Below this share of the median case, plan 2D too.

Measure = Callable[[tuple, int, tuple, tuple], int]


def _fmt(values, digits: int = 3) -> str:
  return '(' + ', '.join(f'{float(v):.{digits}g}' for v in values) + ')'


def target_spacing(fp: dict) -> tuple[list[float], str]:
  """Returns (target spacing (D, H, W) mm, the reason) (nnU-Net's rule).

  Args:
    fp: a fingerprint (`cases` with shape and spacing).
  """
  spacings = np.array([c['spacing'] for c in fp['cases']], np.float64)
  shapes = np.array([c['shape'] for c in fp['cases']], np.float64)
  target = np.median(spacings, axis=0)
  sizes = np.median(shapes, axis=0)
  worst = int(np.argmax(target))
  others = [a for a in range(3) if a != worst]
  ratio = target[worst] / max(target[a] for a in others)
  few_voxels = sizes[worst] * ANISOTROPY < min(sizes[a] for a in others)
  median = _fmt(target)
  if ratio > ANISOTROPY and few_voxels:
    p10 = float(np.percentile(spacings[:, worst], 10))
    p10 = max(p10, max(target[a] for a in others) + 1e-5)
    target[worst] = p10
    return [float(t) for t in target], (
        f'median {median} mm, with axis {worst} at its 10th percentile '
        f'{p10:.3g} mm: that axis is {ratio:.2f}x coarser than the others '
        f'(> {ANISOTROPY:g}) with {sizes[worst]:g} voxels (< 1/{ANISOTROPY:g} '
        'of theirs)')
  why = (f'anisotropy {ratio:.2f} <= {ANISOTROPY:g}' if ratio <= ANISOTROPY
         else f'axis {worst} has {sizes[worst]:g} voxels, not < 1/'
         f'{ANISOTROPY:g} of the others')
  return [float(t) for t in target], f'median spacing {median} mm ({why})'


def resampled_median_shape(fp: dict, spacing: Sequence[float]) -> list[int]:
  """Returns the median over cases of each case's shape at `spacing`."""
  shapes = [[max(1, int(round(n * s / t))) for n, s, t in
             zip(c['shape'], c['spacing'], spacing)] for c in fp['cases']]
  return [int(v) for v in np.median(np.array(shapes), axis=0)]


def pooling(patch: Sequence[int], spacing: Sequence[float],
            max_levels: int) -> list[tuple[int, ...]]:
  """Returns the per-axis strides of each downsampling (nnU-Net's rule).

  At each level an axis is pooled (stride 2) if its feature map stays at
  least MIN_FEATURE_MAP after pooling and its current spacing is less than
  twice the finest current spacing of the axes that can still be pooled;
  then the spacing of pooled axes doubles.

  Args:
    patch: spatial patch size.
    spacing: its voxel size in mm (same order).
    max_levels: the most levels (downsamplings + 1).

  Returns:
    One stride tuple per downsampling (len = levels - 1).
  """
  size = [float(p) for p in patch]
  sp = [float(s) for s in spacing]
  strides = []
  for _ in range(max_levels - 1):
    can = [s >= 2 * MIN_FEATURE_MAP for s in size]
    if not any(can):
      break
    finest = min(sp[a] for a in range(len(sp)) if can[a])
    row = tuple(2 if can[a] and sp[a] / finest < 2 else 1
                for a in range(len(sp)))
    strides.append(row)
    size = [s / r for s, r in zip(size, row)]
    sp = [s * r for s, r in zip(sp, row)]
  return strides


def divisor(strides: Sequence[Sequence[int]], ndim: int) -> list[int]:
  """Returns what each axis of the input must be divisible by."""
  return [int(np.prod([row[a] for row in strides])) if strides else 1
          for a in range(ndim)]


def round_up(patch: Sequence[int], unit: Sequence[int]) -> list[int]:
  """Returns each size rounded up to a multiple of its unit."""
  return [int(math.ceil(p / u) * u) for p, u in zip(patch, unit)]


def first_level_pooled(strides, axis: int) -> int | None:
  """Returns the first level (1-based) at which `axis` is pooled, or None."""
  for level, row in enumerate(strides, start=1):
    if row[axis] > 1:
      return level
  return None


def _shrink(patch: list[int], median: Sequence[int], spacing,
            unit: Sequence[int]) -> list[int] | None:
  """Returns a smaller candidate: the axis largest relative to the median
  shape (ties: longest in mm) loses about 15%; None if none can shrink."""
  order = sorted(range(len(patch)), key=lambda a: (
      -patch[a] / max(1, median[a]), -patch[a] * spacing[a], a))
  for a in order:
    # Axes that can be pooled keep room for one pooling (a U-Net has >= 2
    # levels); the others keep their size.
    floor = (max(unit[a], 2 * MIN_FEATURE_MAP)
             if median[a] >= 2 * MIN_FEATURE_MAP else patch[a])
    if patch[a] > floor:
      step = max(unit[a], int(patch[a] * 0.15) // unit[a] * unit[a])
      new = list(patch)
      new[a] = max(floor, patch[a] - step)
      return new
  return None


def _widths(base: Sequence[int], levels: int) -> tuple[int, ...]:
  """The base config's widths, cut or extended (doubling, capped) to levels."""
  base = [int(f) for f in base]
  while len(base) < levels:
    base.append(min(base[-1] * 2, max(base[-1], 320)))
  return tuple(base[:levels])


def plan_patch_and_batch(median: Sequence[int], spacing: Sequence[float],
                         measure: Measure, budget: int,
                         base_features: Sequence[int], dataset_voxels: float
                         ) -> dict:
  """Searches the largest patch at batch 2, then the largest batch, that fit.

  Args:
    median: the median resampled shape (2 or 3 axes).
    spacing: the target spacing of those axes.
    measure: (spatial, batch, features, strides) -> peak bytes of one
      compiled train step.
    budget: bytes one step may use.
    base_features: the base config's widths (their count caps the depth).
    dataset_voxels: voxels of all planning cases (for the 5% batch cap).

  Returns:
    {'patch_size', 'batch_size', 'strides', 'features', 'memory_bytes',
    'candidates': [[patch, batch, bytes], ...]} (every compile, in order).

  Raises:
    ValueError: not even the smallest patch fits at batch 2.
  """
  ndim, max_levels = len(median), len(base_features)
  patch = [max(1, int(m)) for m in median]
  candidates = []
  while True:
    strides = pooling(patch, spacing, max_levels)
    features = _widths(base_features, len(strides) + 1)
    shape = round_up(patch, divisor(strides, ndim))
    used = measure(tuple(shape), 2, features, tuple(strides))
    candidates.append([shape, 2, int(used)])
    if used <= budget:
      break
    smaller = _shrink(patch, median, spacing, divisor(strides, ndim))
    if smaller is None:
      raise ValueError(
          f'--plan_memory_gb: even the smallest patch {tuple(shape)} at batch '
          f'2 needs {used / 2**30:.3g} GiB, over the budget of '
          f'{budget / 2**30:.3g} GiB; give a larger budget or smaller '
          'config.model.features.')
    patch = smaller
  cap_data = int(MAX_BATCH_SHARE * dataset_voxels / np.prod(shape))
  cap = max(2, min(MAX_BATCH[ndim], cap_data))
  batch, best = 2, used
  if cap > 2:  # Memory is affine in the batch: two compiles give the line.
    one = measure(tuple(shape), 1, features, tuple(strides))
    candidates.append([shape, 1, int(one)])
    per_case = max(1, used - one)
    batch = max(2, min(cap, int((budget - (one - per_case)) // per_case)))
  while batch > 2:
    got = measure(tuple(shape), batch, features, tuple(strides))
    candidates.append([shape, batch, int(got)])
    if got <= budget:
      best = got
      break
    batch -= 1
  return {'patch_size': [int(s) for s in shape], 'batch_size': int(batch),
          'strides': [list(r) for r in strides], 'features': list(features),
          'memory_bytes': int(best), 'batch_cap': int(cap),
          'candidates': candidates}


def normalization(fp: dict) -> dict:
  """Returns the intensity scheme of the plan and why.

  Returns:
    {'intensity': 'ct' | 'zscore', 'ct_window': [low, high] (ct only),
    'reason': str}.
  """
  schemes = [c['normalization'] for c in fp['channels']]
  names = [c['name'] for c in fp['channels']]
  if set(schemes) == {'ct'}:
    low = min(c['p00_5'] for c in fp['channels'])
    high = max(c['p99_5'] for c in fp['channels'])
    if high <= low:
      high = low + 1.0
    return {'intensity': 'ct', 'ct_window': [round(low, 3), round(high, 3)],
            'reason': (f'channels {names} are CT: clip to the foreground\'s '
                       f'0.5/99.5 percentiles ({low:.1f}, {high:.1f}) HU of '
                       'the fingerprint, mapped to [-1, 1], the same for '
                       'every case')}
  mixed = ' (not every channel is CT, and one scheme applies to all)' if (
      'ct' in schemes) else ''
  return {'intensity': 'zscore',
          'reason': f'channels {names} are not calibrated: per-case z-score'
                    f'{mixed}'}


def _pooling_reason(strides, spacing, axes: str) -> str:
  parts = []
  for a, name in enumerate(axes):
    level = first_level_pooled(strides, a)
    times = sum(1 for row in strides if row[a] > 1)
    parts.append(f'{name} pooled {times}x from level {level}' if level else
                 f'{name} never pooled')
  return (f'{", ".join(parts)} (spacing {_fmt(spacing, 4)} mm; an axis is '
          'pooled while its spacing is < 2x the finest)')


def plan_configuration(ndim: int, median: Sequence[int], spacing,
                       measure: Measure, budget: int, base_features,
                       dataset_voxels: float) -> dict:
  """Returns one configuration ('3d' on volumes, '2d' on axial slices).

  Args:
    ndim: 3 (patches of the volume) or 2 (in-plane slices).
    median: the median resampled (D, H, W) shape.
    spacing: the target spacing (D, H, W).
    measure, budget, base_features, dataset_voxels: see
      `plan_patch_and_batch`.

  Returns:
    The search result plus 'reasons' (a list of sentences).
  """
  median_n, spacing_n = list(median)[-ndim:], list(spacing)[-ndim:]
  found = plan_patch_and_batch(median_n, spacing_n, measure, budget,
                               base_features, dataset_voxels)
  axes = 'DHW'[-ndim:]
  cover = float(np.prod([min(1.0, p / m) for p, m in
                         zip(found['patch_size'], median_n)]))
  found['coverage'] = round(cover, 4)
  fit = ('the whole median shape fits' if cover >= 1 else
         'the largest whose train step fits')
  found['reasons'] = [
      f'patch {tuple(found["patch_size"])} covers {100 * cover:.0f}% of the '
      f'median shape {tuple(median_n)}: {fit} '
      f'{budget / 2**30:.3g} GiB at batch 2 ({found["memory_bytes"] / 2**20:.1f} '
      f'MiB at batch {found["batch_size"]}, XLA memory_analysis; '
      f'{len(found["candidates"])} compile'
      f'{"s" if len(found["candidates"]) != 1 else ""})',
      f'{len(found["features"])} levels, widths {tuple(found["features"])}: '
      f'as deep as the patch allows (bottleneck edge >= {MIN_FEATURE_MAP})',
      _pooling_reason(found['strides'], spacing_n, axes),
      f'batch {found["batch_size"]}: the largest that fits, capped at '
      f'{found["batch_cap"]} (5% of the data set\'s voxels, at most '
      f'{MAX_BATCH[ndim]})']
  return found


def choose_configurations(fp: dict, median: Sequence[int],
                          plan3d: dict | None) -> tuple[list[str], str]:
  """Returns (['3d'] and/or '2d', why) from the anisotropy and 3D coverage."""
  chosen, why = [], []
  if median[0] >= 2 * MIN_FEATURE_MAP:
    chosen.append('3d')
  else:
    why.append(f'no 3D: {median[0]} slices are too few for a 3D U-Net')
  aniso = fp['anisotropy']
  cover = plan3d['coverage'] if plan3d else 0.0
  if aniso > ANISOTROPY or cover < SMALL_3D_PATCH or not chosen:
    chosen.append('2d')
    why.append(f'2D: anisotropy {aniso:.2f} > {ANISOTROPY:g}' if
               aniso > ANISOTROPY else
               f'2D: the 3D patch sees {100 * cover:.0f}% (< '
               f'{100 * SMALL_3D_PATCH:.0f}%) of the median case' if chosen[0]
               == '3d' else '2D: slices only')
  else:
    why.append(f'no 2D: anisotropy {aniso:.2f} <= {ANISOTROPY:g} and the 3D '
               f'patch sees {100 * cover:.0f}% of the median case')
  return chosen, '; '.join(why)


def make_plan(fp: dict, base_features, measure: Measure, budget: int
              ) -> dict:
  """Returns the plan of a fingerprint: spacing, normalisation, configurations.

  Args:
    fp: `fingerprint.compute_fingerprint`'s result.
    base_features: widths of the base config (their count caps the depth).
    measure: (spatial, batch, features, strides) -> peak bytes of a step.
    budget: bytes one train step may use.

  Returns:
    A JSON-ready dict; deterministic for the same fingerprint and measure.
  """
  spacing, spacing_reason = target_spacing(fp)
  median = resampled_median_shape(fp, spacing)
  voxels = float(sum(np.prod(resampled_median_shape(
      {'cases': [c]}, spacing)) for c in fp['cases']))
  configs = {}
  if median[0] >= 2 * MIN_FEATURE_MAP:
    configs['3d'] = plan_configuration(3, median, spacing, measure, budget,
                                       base_features, voxels)
  chosen, why = choose_configurations(fp, median, configs.get('3d'))
  if '2d' in chosen:
    configs['2d'] = plan_configuration(2, median, spacing, measure, budget,
                                       base_features, voxels)
  return {'target_spacing': [round(s, 6) for s in spacing],
          'target_spacing_reason': spacing_reason,
          'median_shape': median,
          'anisotropy': fp['anisotropy'],
          'normalization': normalization(fp),
          'configurations': configs,
          'chosen': chosen, 'chosen_reason': why,
          'memory_budget_bytes': int(budget),
          'steps_per_epoch': STEPS_PER_EPOCH}
