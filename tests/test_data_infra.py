"""Data infrastructure: one noise generator, one registry, no absl flags."""

import ast
import math
import os

import numpy as np
import pytest

from medseg_jax.data import blas
from medseg_jax.data import check
from medseg_jax.data import noise
from medseg_jax.data import sources
from medseg_jax.data import synthetic
from medseg_jax.data import synthetic3d

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'medseg_jax', 'data')


def _gaussian_weights(n, cells):
  """The interpolation weights both generators used, [cells + 2, n]."""
  pos = (np.arange(n) + 0.5) * (cells / n)
  nodes = np.arange(cells + 2) - 0.5
  w = np.exp(-0.5 * ((pos[None, :] - nodes[:, None]) / 0.7) ** 2)
  w /= np.sqrt((w * w).sum(axis=0, keepdims=True))
  return w.astype(np.float32)


@pytest.mark.parametrize('shape,feature', [((17, 23), 3.3), ((8, 8), 0.8),
                                           ((96, 80), 2.5)])
def test_2d_noise_is_the_lesions_two_matmuls(shape, feature):
  """The former 2D generator: W_h^T (grid W_w), last axis first."""
  h, w = shape
  cy, cx = math.ceil(h / feature), math.ceil(w / feature)
  grid = np.random.default_rng(1).standard_normal((cy + 2, cx + 2),
                                                  dtype=np.float32)
  expected = blas.single_thread_matmul(
      np.ascontiguousarray(_gaussian_weights(h, cy).T),
      blas.single_thread_matmul(grid, _gaussian_weights(w, cx)))
  got = synthetic.smooth_noise(np.random.default_rng(1), shape, feature)
  np.testing.assert_array_equal(got, expected)


def test_3d_noise_is_the_tumours_axis_loop():
  """The former 3D generator: features of >= 1 voxel, first axis first."""
  shape, feature = (9, 17, 23), (0.5, 3.0, 3.0)
  cells = [max(1, math.ceil(n / max(f, 1.0))) for n, f in zip(shape, feature)]
  field = np.random.default_rng(2).standard_normal([c + 2 for c in cells],
                                                   dtype=np.float32)
  for axis, (n, c) in enumerate(zip(shape, cells)):
    moved = np.moveaxis(field, axis, -1)
    flat = blas.single_thread_matmul(
        np.ascontiguousarray(moved).reshape(-1, c + 2),
        _gaussian_weights(n, c))
    field = np.moveaxis(flat.reshape(moved.shape[:-1] + (n,)), -1, axis)
  got = synthetic3d.smooth_noise(np.random.default_rng(2), shape, feature)
  np.testing.assert_array_equal(got, field)
  # One generator: any axis order gives the same field up to rounding.
  other = noise.smooth_noise(np.random.default_rng(2), shape,
                             np.maximum(feature, 1.0))
  np.testing.assert_allclose(other, field, atol=1e-5)


def test_the_registry_is_the_one_list_of_sources():
  assert sources.KNOWN_SOURCES == ('synthetic', 'synthetic3d', 'isic2018',
                                   'folder', 'nifti')
  assert sources.PHOTO_SOURCES == ('synthetic', 'isic2018', 'folder')
  for name, entry in sources.REGISTRY.items():
    assert callable(entry.build) and callable(entry.check), name
  cfg = type('Cfg', (), {'source': 'dicomweb'})()
  with pytest.raises(ValueError, match='known sources: synthetic, '):
    sources.spec(cfg)
  problems = check.check_dataset(cfg)
  assert problems[0].path == 'config.data.source'


def _imports(path):
  """Module names a file imports (top level and inside functions)."""
  tree = ast.parse(open(path).read())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f'{node.module}.{a.name}' for a in node.names)
  return names


def test_data_code_reads_no_absl_flags():
  """Flags belong to main; data code takes its settings from config.data.

  (tests/test_imports.py walks the whole graph for cycles and JAX.)
  """
  offenders = {}
  for name in sorted(os.listdir(DATA_DIR)):
    if name.endswith('.py'):
      found = [i for i in _imports(os.path.join(DATA_DIR, name))
               if i.split('.')[0] == 'absl']
      if found:
        offenders[name] = found
  assert not offenders


def test_errors_stand_alone_and_image_io_needs_no_volume_io():
  errors_imports = _imports(os.path.join(DATA_DIR, 'errors.py'))
  assert not [i for i in errors_imports if i.startswith('medseg_jax')]
  image_io_imports = _imports(os.path.join(DATA_DIR, 'image_io.py'))
  assert not [i for i in image_io_imports if 'volume_io' in i]
  from medseg_jax.data import errors, image_io, volume_io  # pylint: disable=import-outside-toplevel
  assert image_io.FileError is volume_io.FileError is errors.FileError
  assert check.Problem is errors.Problem
