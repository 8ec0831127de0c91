"""Post-processing of predicted label maps (NumPy/SciPy, 2D and 3D).

Every function takes an integer label map `[*spatial]` (0 = background,
binary {0, 1} or multi-class 0..K-1) and returns a new one of the same shape
and dtype. Multi-class maps are processed one foreground class at a time;
voxels a step removes become background (0). Components are connected
through faces, edges and corners (8-connectivity in 2D, 26 in 3D, MONAI's
default) unless `connectivity` says otherwise (1 = faces only: 4 / 6).
"""

from typing import Sequence

import numpy as np
from scipy import ndimage


def _check_labels(labels, what: str) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.dtype != bool and not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'{what}: expects an integer label map [*spatial], got '
                     f'dtype {labels.dtype}; threshold/argmax probabilities '
                     'first (inference.labels_from_probabilities).')
  if labels.ndim < 1:
    raise ValueError(f'{what}: expects a label map [*spatial], got a scalar.')
  return labels


def _classes(labels: np.ndarray, classes: Sequence[int] | None) -> list[int]:
  present = [int(c) for c in np.unique(labels) if c != 0]
  return present if classes is None else [c for c in classes if c in present]


def _structure(ndim: int, connectivity: int | None) -> np.ndarray:
  return ndimage.generate_binary_structure(
      ndim, ndim if connectivity is None else connectivity)


def _components(mask: np.ndarray, connectivity: int | None):
  """Returns (component map, sizes) with sizes[i] the voxels of component i."""
  components, _ = ndimage.label(mask, _structure(mask.ndim, connectivity))
  return components, np.bincount(components.ravel())


def keep_largest_component(labels, classes: Sequence[int] | None = None,
                           connectivity: int | None = None) -> np.ndarray:
  """Returns the label map with only the largest component of each class.

  Args:
    labels: integer label map `[*spatial]`.
    classes: foreground classes to process; every class present if None.
    connectivity: None = full (8 / 26), 1 = faces (4 / 6).

  Returns:
    The map with every other component of those classes set to 0. Of
    components of equal size the first in C order is kept.
  """
  labels = _check_labels(labels, 'keep_largest_component')
  out = labels.copy()
  for c in _classes(labels, classes):
    components, sizes = _components(labels == c, connectivity)
    if len(sizes) <= 2:  # Background + at most one component.
      continue
    largest = int(np.argmax(sizes[1:])) + 1
    out[(components > 0) & (components != largest)] = 0
  return out


def remove_small_components(labels, min_size: int,
                            classes: Sequence[int] | None = None,
                            connectivity: int | None = None) -> np.ndarray:
  """Returns the label map without components smaller than `min_size`.

  Args:
    labels: integer label map `[*spatial]`.
    min_size: components with fewer voxels than this become 0.
    classes: foreground classes to process; every class present if None.
    connectivity: None = full (8 / 26), 1 = faces (4 / 6).
  """
  labels = _check_labels(labels, 'remove_small_components')
  if min_size < 0:
    raise ValueError(f'min_size must be >= 0, got {min_size} '
                     '(config.eval.postprocess.min_size).')
  out = labels.copy()
  for c in _classes(labels, classes):
    components, sizes = _components(labels == c, connectivity)
    small = sizes < min_size
    small[0] = False
    out[small[components]] = 0
  return out


def fill_holes(labels, classes: Sequence[int] | None = None) -> np.ndarray:
  """Returns the label map with the holes of each class filled.

  A hole is background (0) that the class encloses completely (in 3D, a
  closed cavity; `scipy.ndimage.binary_fill_holes`). Only background is
  filled: a region of another class inside (a nested tumour sub-region) is
  left as it is.

  Args:
    labels: integer label map `[*spatial]`.
    classes: foreground classes to process; every class present if None.
  """
  labels = _check_labels(labels, 'fill_holes')
  out = labels.copy()
  for c in _classes(labels, classes):
    filled = ndimage.binary_fill_holes(labels == c)
    out[filled & (out == 0)] = c
  return out


def from_config(labels, post_cfg) -> np.ndarray:
  """Applies the steps `config.eval.postprocess` turns on, in a fixed order.

  Holes are filled first, then components smaller than `min_size` removed,
  then the largest component of each class kept.

  Args:
    labels: integer label map `[*spatial]`.
    post_cfg: `config.eval.postprocess` (fill_holes, min_size,
      largest_component).

  Returns:
    The post-processed label map (the input itself when every step is off).
  """
  if post_cfg.fill_holes:
    labels = fill_holes(labels)
  if post_cfg.min_size:
    labels = remove_small_components(labels, post_cfg.min_size)
  if post_cfg.largest_component:
    labels = keep_largest_component(labels)
  return labels
