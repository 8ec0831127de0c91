"""Times HD95, ASSD and NSD on a 256x256x128 volume pair (target < 2 s each).

  python scripts/bench_surface_metrics.py [--repeats 3] [--size 256 256 128]

The pair is a large ellipsoid "organ" (truth) and a shifted, rescaled copy
with a spurious blob (prediction), so the bounding-box crop of the metrics
covers most of the volume: close to the worst case for these functions.
Prints the median wall time of each metric, in seconds, and the values.
"""

import argparse
import statistics
import time

import numpy as np

from medseg_jax import metrics


def make_pair(shape, seed: int = 0):
  """Returns (pred, truth) bool volumes of `shape`."""
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


def time_call(fn, repeats):
  """Returns (median seconds, last value) of `repeats` calls of fn()."""
  times, value = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    value = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), value


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', type=int, nargs=3, default=(256, 256, 128))
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  pred, truth = make_pair(tuple(args.size))
  spacing = (0.8, 0.8, 2.5)
  calls = {
      'hd95': lambda: metrics.hausdorff_distance(pred, truth, spacing, 95),
      'assd': lambda: metrics.average_symmetric_surface_distance(
          pred, truth, spacing),
      'nsd@2mm': lambda: metrics.normalized_surface_dice(pred, truth, 2.0,
                                                         spacing),
      'all (surface_distance_metrics)':
          lambda: metrics.surface_distance_metrics(pred, truth, spacing,
                                                   tolerance_mm=2.0),
  }
  print(f'volume {tuple(args.size)}, spacing {spacing}, '
        f'{pred.sum()} / {truth.sum()} foreground voxels (pred / truth)')
  for name, fn in calls.items():
    seconds, value = time_call(fn, args.repeats)
    if isinstance(value, dict):
      value = ', '.join(f'{k}={v:.4f}' for k, v in value.items())
    else:
      value = f'{value:.4f}'
    print(f'{name:32s} {seconds:7.3f} s   {value}')


if __name__ == '__main__':
  main()
