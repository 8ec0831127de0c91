"""Cross-checks NSD (convention='deepmind') against DeepMind's surface-distance.

DeepMind's package is not a project dependency, and its 0.1 wheel needs
NumPy < 2 (it uses np.Inf); run this script in a separate environment:

    python -m venv /tmp/venv-dm
    /tmp/venv-dm/bin/pip install 'numpy<2' 'scipy<1.14' absl-py surface-distance
    PYTHONPATH=. /tmp/venv-dm/bin/python scripts/crosscheck_nsd_deepmind.py

(`medseg_jax.surface_metrics` needs only NumPy and SciPy.) Prints the largest
absolute difference of NSD over random 2D and 3D cases with anisotropic
spacing at several tolerances, and, for scale, the largest difference
between the 'voxels' and 'deepmind' conventions on the same cases.
"""

import argparse

import numpy as np
from scipy import ndimage

from medseg_jax import surface_metrics

TOLERANCES_MM = (0.5, 1.0, 1.5, 2.0, 3.0)


def random_case(rng, ndim: int):
  """Returns (pred, truth, spacing): blobs, the prediction shifted and noisy."""
  shape = (40, 48) if ndim == 2 else (20, 24, 28)
  spacing = (1.0, 0.7) if ndim == 2 else (2.5, 0.8, 0.8)
  truth = ndimage.binary_dilation(rng.random(shape) > 0.995, iterations=3)
  pred = ndimage.binary_dilation(
      np.roll(truth, 1, axis=int(rng.integers(ndim))) ^
      (rng.random(shape) > 0.99), iterations=1)
  return pred, truth, spacing


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cases', type=int, default=40)
  args = parser.parse_args()
  try:
    import surface_distance  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise SystemExit('surface_distance (DeepMind) is not importable here; see '
                     'this script\'s docstring for the separate venv.')
  rng = np.random.default_rng(0)
  worst = {2: 0.0, 3: 0.0}
  conventions_apart = 0.0
  compared = 0
  for trial in range(args.cases):
    ndim = 2 + trial % 2
    pred, truth, spacing = random_case(rng, ndim)
    if not (pred.any() and truth.any()):
      continue
    dists = surface_distance.compute_surface_distances(truth, pred, spacing)
    for tol in TOLERANCES_MM:
      theirs = surface_distance.compute_surface_dice_at_tolerance(dists, tol)
      ours = surface_metrics.normalized_surface_dice(
          pred, truth, tolerance_mm=tol, spacing=spacing,
          convention='deepmind')
      voxels = surface_metrics.normalized_surface_dice(
          pred, truth, tolerance_mm=tol, spacing=spacing)
      worst[ndim] = max(worst[ndim], abs(ours - theirs))
      conventions_apart = max(conventions_apart, abs(ours - voxels))
      compared += 1
  print(f'{compared} NSD values ({args.cases} cases x {len(TOLERANCES_MM)} '
        f'tolerances {TOLERANCES_MM} mm, anisotropic spacing)')
  print(f'max |ours(deepmind) - DeepMind|: 2D {worst[2]:.2e}, '
        f'3D {worst[3]:.2e}')
  print(f'max |deepmind - voxels convention|: {conventions_apart:.4f}')


if __name__ == '__main__':
  main()
