"""Times HD95, ASSD and NSD on 256x256x128 pairs, against MONAI when present.

  python scripts/bench_surface_metrics.py [--repeats 3] [--size 256 256 128]

Two pairs:
  compact  a large ellipsoid "organ" (truth) and a shifted, rescaled copy with
           a spurious blob (prediction): large surfaces.
  stray    a small tumour and its prediction plus a few stray false-positive
           voxels spread over the volume (two in opposite corners), so the
           bounding box of the pair is the whole volume.
Prints the median wall time of each metric, in seconds, and its value. When
MONAI (and PyTorch) can be imported beside `medseg_jax.surface_metrics`
(which needs only NumPy and SciPy), MONAI's HD95 is timed in the same run and
the ratio printed, e.g. in a separate environment:

    python -m venv /tmp/venv-monai && /tmp/venv-monai/bin/pip install monai torch scipy
    PYTHONPATH=. /tmp/venv-monai/bin/python scripts/bench_surface_metrics.py
"""

import argparse
import statistics
import time

import numpy as np

from medseg_jax import surface_metrics

SPACING = (0.8, 0.8, 2.5)


def compact_pair(shape, seed: int = 0):
  """Returns (pred, truth) bool volumes of `shape`: two large ellipsoids."""
  rng = np.random.default_rng(seed)
  grid = np.ogrid[tuple(slice(0, s) for s in shape)]
  centre = [s / 2 for s in shape]
  radii = [0.35 * s for s in shape]

  def ellipsoid(shift, scale):
    r2 = sum(((g - c - d) / (r * scale))**2
             for g, c, d, r in zip(grid, centre, shift, radii))
    return r2 <= 1.0

  truth = ellipsoid((0, 0, 0), 1.0)
  pred = ellipsoid(tuple(rng.uniform(-4, 4, size=3)), 0.95)
  blob = [int(0.85 * s) for s in shape]
  pred[tuple(slice(b - 3, b + 3) for b in blob)] = True
  return pred, truth


def stray_pair(shape, seed: int = 0):
  """Returns (pred, truth): a small tumour; stray voxels in the prediction."""
  rng = np.random.default_rng(seed)
  grid = np.ogrid[tuple(slice(0, s) for s in shape)]
  centre = [s / 2 for s in shape]

  def ball(shift, radius):
    return sum(((g - c - d) * w)**2 for g, c, d, w in
               zip(grid, centre, shift, (1.0, 1.0, 3.0))) <= radius**2

  truth = ball((0, 0, 0), 0.12 * shape[0])
  pred = ball((3, -2, 1), 0.115 * shape[0])
  for _ in range(5):
    pred[tuple(rng.integers(0, s) for s in shape)] = True
  pred[(0,) * len(shape)] = True
  pred[tuple(s - 1 for s in shape)] = True
  return pred, truth


def time_call(fn, repeats):
  """Returns (median seconds, last value) of `repeats` calls of fn()."""
  times, value = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    value = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), value


def monai_hd95():
  """Returns MONAI's HD95 as fn(pred, truth, spacing), or None if absent."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from monai.metrics import compute_hausdorff_distance  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None

  def hd95(pred, truth, spacing):
    as_tensor = lambda m: torch.from_numpy(m[None, None].astype(np.float32))
    return float(compute_hausdorff_distance(
        as_tensor(pred), as_tensor(truth), include_background=True,
        percentile=95, spacing=spacing))

  return hd95


def bench_pair(name, pred, truth, repeats, monai):
  """Prints the timings of one pair."""
  sm = surface_metrics
  calls = {
      'hd95': lambda: sm.hausdorff_distance(pred, truth, spacing=SPACING),
      'assd': lambda: sm.average_symmetric_surface_distance(
          pred, truth, spacing=SPACING),
      'nsd@2mm (voxels)': lambda: sm.normalized_surface_dice(
          pred, truth, tolerance_mm=2.0, spacing=SPACING),
      'nsd@2mm (deepmind)': lambda: sm.normalized_surface_dice(
          pred, truth, tolerance_mm=2.0, spacing=SPACING,
          convention='deepmind'),
      'all (surface_distance_metrics)': lambda: sm.surface_distance_metrics(
          pred, truth, spacing=SPACING, tolerance_mm=2.0),
  }
  print(f'\n{name}: volume {pred.shape}, spacing {SPACING}, '
        f'{pred.sum()} / {truth.sum()} foreground voxels (pred / truth)')
  ours = None
  for label, fn in calls.items():
    seconds, value = time_call(fn, repeats)
    ours = seconds if label == 'hd95' else ours
    if isinstance(value, dict):
      value = ', '.join(f'{k}={v:.4f}' for k, v in value.items())
    else:
      value = f'{value:.4f}'
    print(f'  {label:32s} {seconds:7.3f} s   {value}')
  if monai is None:
    print('  MONAI not importable here: no ratio measured (see docstring).')
    return
  seconds, value = time_call(lambda: monai(pred, truth, SPACING), repeats)
  print(f'  {"MONAI hd95":32s} {seconds:7.3f} s   {value:.4f}')
  print(f'  hd95 speed, ours / MONAI: {seconds / ours:.1f}x '
        f'({ours:.3f} s vs {seconds:.3f} s)')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', type=int, nargs=3, default=(256, 256, 128))
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  shape = tuple(args.size)
  monai = monai_hd95()
  for name, make in (('compact', compact_pair), ('stray', stray_pair)):
    bench_pair(name, *make(shape), args.repeats, monai)


if __name__ == '__main__':
  main()
