"""Registration accuracy (TRE) and time: medseg_jax vs SimpleITK, one run.

  python scripts/bench_registration.py [--metric mattes_mi] [--kind rigid]
      [--sitk_python /tmp/venv-sitk/bin/python]

The pair is the one of tests/test_registration.py: nibabel's packaged T1 brain
(`anatomical.nii`, 2 mm voxels), fixed = its interior, moving = the volume
resampled through a known rigid transform (6 degrees about (1, 2, 3), then
(3, -4, 2) mm); for Mattes MI the moving image is contrast-inverted (a
multi-modal stand-in). Both methods use the same setup: 3 levels, shrink
factors 4/2/1 with smoothing sigmas 2/1/0 voxels, linear interpolation, every
voxel sampled, 32 histogram bins, centres aligned first (GEOMETRY), 100
iterations per level at most. TRE is the mean distance (mm) between the
foreground voxels mapped by the true and the recovered fixed->moving matrices.

SimpleITK is not a dependency: it is imported if it can be, else run in
another interpreter (`--sitk_python`) through a subprocess, e.g. after

    python3 -m venv /tmp/venv-sitk && /tmp/venv-sitk/bin/pip install SimpleITK numpy
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from medseg_jax import registration  # pylint: disable=wrong-import-position
from tests import test_registration as pair_lib  # pylint: disable=wrong-import-position

# Runs in SimpleITK's interpreter: argv = fixed.npy moving.npy spacing metric
# kind; prints {"matrix": 4x4 in array-axis order, "seconds": ...}.
SITK_CHILD = r'''
import json, sys, time
import numpy as np
import SimpleITK as sitk

fixed_path, moving_path, spacing, metric, kind = sys.argv[1:6]
spacing = [float(s) for s in spacing.split(',')]

def image(path):
  img = sitk.GetImageFromArray(np.load(path).astype(np.float32))
  img.SetSpacing(spacing[::-1])  # ITK index order is the reverse of NumPy's
  return img

fixed, moving = image(fixed_path), image(moving_path)
start = time.perf_counter()
transform = sitk.Euler3DTransform() if kind == 'rigid' else sitk.AffineTransform(3)
initial = sitk.CenteredTransformInitializer(
    fixed, moving, transform, sitk.CenteredTransformInitializerFilter.GEOMETRY)
method = sitk.ImageRegistrationMethod()
if metric == 'mattes_mi':
  method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
else:
  method.SetMetricAsCorrelation()
method.SetMetricSamplingStrategy(method.NONE)
method.SetInterpolator(sitk.sitkLinear)
method.SetOptimizerAsRegularStepGradientDescent(
    learningRate=1.0, minStep=1e-4, numberOfIterations=100,
    relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
method.SetOptimizerScalesFromPhysicalShift()
method.SetShrinkFactorsPerLevel([4, 2, 1])
method.SetSmoothingSigmasPerLevel([2, 1, 0])
method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
method.SetInitialTransform(initial, inPlace=False)
final = method.Execute(fixed, moving)
seconds = time.perf_counter() - start
# The affine map from 4 points, in ITK (x = last NumPy axis) order, then
# reversed into array-axis order.
basis = [np.zeros(3)] + [np.eye(3)[i] for i in range(3)]
images = [np.array(final.TransformPoint(tuple(map(float, p)))) for p in basis]
linear = np.stack([images[i + 1] - images[0] for i in range(3)], axis=1)
matrix = np.eye(4)
matrix[:3, :3] = linear[::-1, ::-1]
matrix[:3, 3] = images[0][::-1]
print(json.dumps({'matrix': matrix.tolist(), 'seconds': seconds, 'stop': method.GetOptimizerStopConditionDescription(),
                  'iterations': method.GetOptimizerIteration(),
                  'metric': method.GetMetricValue()}))
'''


def run_sitk(fixed, moving, metric, kind, python):
  """Returns SimpleITK's result dict, running SITK_CHILD in `python`."""
  with tempfile.TemporaryDirectory() as tmp:
    paths = [os.path.join(tmp, n) for n in ('fixed.npy', 'moving.npy')]
    np.save(paths[0], fixed)
    np.save(paths[1], moving)
    spacing = ','.join(map(str, pair_lib.SPACING))
    out = subprocess.run(
        [python, '-c', SITK_CHILD, *paths, spacing, metric, kind],
        check=False, capture_output=True, text=True)
  if out.returncode:
    raise SystemExit(f'SimpleITK failed in {python}:\n{out.stderr[-3000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def sitk_python(requested):
  """Returns the interpreter that can import SimpleITK, or None."""
  for python in ([requested] if requested else []) + [sys.executable]:
    if python and subprocess.run([python, '-c', 'import SimpleITK'],
                                 capture_output=True).returncode == 0:
      return python
  return None


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--metric', default='mattes_mi',
                      choices=registration.METRICS)
  parser.add_argument('--kind', default='rigid', choices=registration.KINDS)
  parser.add_argument('--sitk_python', default='/tmp/venv-sitk/bin/python')
  args = parser.parse_args()

  fixed, moving, true_matrix, foreground = pair_lib.misaligned_brain(
      pair_lib.true_rigid)
  if args.metric == 'mattes_mi':
    moving = moving.max() - moving
  print(f'pair: {fixed.shape} voxels of {pair_lib.SPACING[0]} mm, '
        f'{len(foreground)} foreground; metric={args.metric} kind={args.kind}')
  print(f'initial TRE {registration.target_registration_error(np.eye(4), true_matrix, foreground):.3f} mm')

  rows = []
  for label in ('medseg_jax (first call, compiles)', 'medseg_jax (compiled)'):
    start = time.perf_counter()
    result = registration.register(fixed, moving, spacing_fixed=pair_lib.SPACING,
                                   kind=args.kind, metric=args.metric)
    seconds = time.perf_counter() - start
    rows.append((label, registration.target_registration_error(
        result.matrix, true_matrix, foreground), seconds))

  python = sitk_python(args.sitk_python)
  if python is None:
    print('SimpleITK not importable: see the docstring for a separate venv')
  else:
    sitk = run_sitk(fixed, moving, args.metric, args.kind, python)
    rows.append(('SimpleITK ImageRegistrationMethod', registration.
                 target_registration_error(np.asarray(sitk['matrix']),
                                           true_matrix, foreground),
                 sitk['seconds']))
    print(f'SimpleITK stopped after {sitk["iterations"]} iterations of the '
          f'last level: {sitk["stop"]}')
  print(f'{"method":40s} {"TRE mm":>8s} {"seconds":>8s}')
  for label, tre, seconds in rows:
    print(f'{label:40s} {tre:8.3f} {seconds:8.2f}')


if __name__ == '__main__':
  main()
