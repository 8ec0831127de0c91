"""Per-case time of config.data.preprocess.register_to (register_cases).

Measures what `register_to=0` costs per case: one call of
`register_cases.register_channels` (channel 1 registered rigidly to channel 0,
Mattes MI by default) and one of `preprocess.apply_channel_transforms`
(resampling with the found matrices). The case is nibabel's packaged T1 brain
(`anatomical.nii`, 2 mm voxels), optionally resampled by `--zoom`, stacked
with a contrast-inverted copy moved through a known rigid transform (6 degrees
about (1, 2, 3), then (3, -4, 2) mm). Runs three calls (the first includes
compilation) and prints, per call: the volume shape and spacing, the
registration and apply times, the target registration error (mean mm over
foreground voxels), whether it converged and the final MI.

  python scripts/bench_register_case.py [--zoom 1]
"""

import argparse
import os
import time

import nibabel
import numpy as np
from scipy import ndimage

from medseg_jax import register_cases
from medseg_jax import registration
from medseg_jax.data import preprocess

REPEATS = 3
# Known fixed->moving transform: rotation axis, angle (degrees), translation.
AXIS = (1., 2., 3.)
ANGLE = 6.0
SHIFT = (3., -4., 2.)


def parse_args(argv=None) -> argparse.Namespace:
  """Parses the command line.

  Args:
    argv: arguments without the program name; None reads sys.argv.

  Returns:
    The parsed flags.
  """
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--zoom', type=float, default=1.0,
                      help='resampling factor of the 2 mm brain volume '
                      '(0.5 = 4 mm voxels, 8x fewer)')
  return parser.parse_args(argv)


def load_volume(zoom: float) -> tuple[np.ndarray, float]:
  """Loads nibabel's test T1 brain, resampled by `zoom`.

  Args:
    zoom: resampling factor.

  Returns:
    (volume, isotropic spacing in mm).
  """
  path = os.path.join(os.path.dirname(nibabel.__file__), 'tests', 'data',
                      'anatomical.nii')
  volume = np.asarray(nibabel.load(path).dataobj).astype(np.float32)
  volume = ndimage.zoom(volume, zoom, order=1)
  return volume, 2.0 / zoom


def make_moving(volume: np.ndarray, spacing: float,
                matrix: np.ndarray) -> np.ndarray:
  """Resamples a volume through a fixed->moving matrix and inverts contrast.

  Args:
    volume: fixed volume.
    spacing: isotropic spacing in mm.
    matrix: 4x4 fixed->moving matrix in mm.

  Returns:
    The moving volume, same shape.
  """
  inverse = np.linalg.inv(matrix)
  points = registration.grid_points(volume.shape, (spacing,) * 3)
  source = (points @ inverse[:3, :3].T + inverse[:3, 3]) / spacing
  moving = ndimage.map_coordinates(volume, source.T, order=1, mode='nearest')
  moving = moving.reshape(volume.shape)
  # Contrast-inverted: a multi-modal stand-in, so MI is really needed.
  return moving.max() - moving


def time_one_call(image: np.ndarray, spacing: tuple, cfg: dict,
                  true_matrix: np.ndarray, foreground: np.ndarray) -> dict:
  """Registers and resamples one case and scores the result.

  Args:
    image: `[D, H, W, 2]` fixed and moving channels.
    spacing: (D, H, W) mm.
    cfg: the preprocess config (register_to, ...).
    true_matrix: the known fixed->moving matrix.
    foreground: `[N, 3]` mm points where TRE is measured.

  Returns:
    register and apply seconds, mean TRE (mm) and the register row.
  """
  start = time.perf_counter()
  matrices, rows = register_cases.register_channels(image, spacing, cfg)
  t_register = time.perf_counter() - start
  start = time.perf_counter()
  preprocess.apply_channel_transforms(image, spacing, matrices)
  t_apply = time.perf_counter() - start
  tre = registration.target_registration_error(matrices[1], true_matrix,
                                                foreground)
  return dict(register=t_register, apply=t_apply, tre=float(np.mean(tre)),
              row=rows[0])


def main(argv=None) -> None:
  """Times register_to=0 on one two-channel case, REPEATS times.

  Args:
    argv: arguments without the program name; None reads sys.argv.
  """
  args = parse_args(argv)
  volume, sp = load_volume(args.zoom)
  spacing = (sp, sp, sp)
  centre = (np.array(volume.shape) - 1) * sp / 2
  true_matrix = registration.rigid_matrix(AXIS, ANGLE, SHIFT, centre)
  image = np.stack([volume, make_moving(volume, sp, true_matrix)], -1)
  cfg = dict(register_to=0)
  points = registration.grid_points(volume.shape, spacing)
  # TRE over the brain, not the empty background around it.
  foreground = points[volume.reshape(-1) > np.percentile(volume, 30)]
  for rep in range(REPEATS):
    result = time_one_call(image, spacing, cfg, true_matrix, foreground)
    row = result['row']
    print(f'shape {volume.shape} spacing {sp} mm: call {rep}: '
          f'register {result["register"]:.2f} s '
          f'(apply {result["apply"]:.3f} s), TRE {result["tre"]:.3f} mm, '
          f'converged {row["converged"]}, final MI {row["final_metric"]:.3f}')


if __name__ == '__main__':
  main()
