"""Post-processing of label maps: known answers on hand-made 2D and 3D masks."""

import ml_collections
import numpy as np
import pytest

from medseg_jax import postprocess


def _grid(text: str) -> np.ndarray:
  """Returns the int label map drawn by rows of digits ('.' = 0)."""
  rows = [r.strip() for r in text.strip().splitlines()]
  return np.array([[0 if ch == '.' else int(ch) for ch in r] for r in rows],
                  np.uint8)


BLOBS = _grid("""
    11....
    11...1
    .....1
    1.....
    .1....
""")


def test_keep_largest_component_2d():
  out = postprocess.keep_largest_component(BLOBS)
  # The diagonal pair (3, 0)-(4, 1) is one component of 2 with corners
  # counted: the largest is the 2x2 block (4 voxels).
  np.testing.assert_array_equal(out, _grid("""
      11....
      11....
      ......
      ......
      ......
  """))
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(BLOBS, BLOBS.copy())  # Input untouched.


def test_connectivity_faces_only_2d():
  diagonal = _grid("""
      1...
      .1..
      ..11
  """)
  # Full connectivity: one component of 4; faces only: {1}, {1}, {2}.
  np.testing.assert_array_equal(
      postprocess.keep_largest_component(diagonal), diagonal)
  np.testing.assert_array_equal(
      postprocess.keep_largest_component(diagonal, connectivity=1), _grid("""
          ....
          ....
          ..11
      """))
  np.testing.assert_array_equal(
      postprocess.remove_small_components(diagonal, 2, connectivity=1),
      _grid("""
          ....
          ....
          ..11
      """))


def test_multiclass_per_class():
  labels = _grid("""
      11.22.
      1..2.1
      ..2...
      2...22
  """)
  np.testing.assert_array_equal(
      postprocess.keep_largest_component(labels), _grid("""
          11.22.
          1..2..
          ..2...
          ......
      """))
  np.testing.assert_array_equal(
      postprocess.keep_largest_component(labels, classes=[1]), _grid("""
          11.22.
          1..2..
          ..2...
          2...22
      """))
  np.testing.assert_array_equal(
      postprocess.remove_small_components(labels, 3), _grid("""
          11.22.
          1..2..
          ..2...
          ......
      """))


def test_remove_small_components_2d():
  np.testing.assert_array_equal(
      postprocess.remove_small_components(BLOBS, 3), _grid("""
          11....
          11....
          ......
          ......
          ......
      """))
  np.testing.assert_array_equal(
      postprocess.remove_small_components(BLOBS, 2), BLOBS)
  np.testing.assert_array_equal(
      postprocess.remove_small_components(BLOBS, 0), BLOBS)
  with pytest.raises(ValueError, match='min_size'):
    postprocess.remove_small_components(BLOBS, -1)


def test_fill_holes_2d():
  labels = _grid("""
      111.2222
      1.1.2..2
      111.2332
      .1..2222
      1.1.....
  """)
  # The hole of the 1-ring is filled; the open 'v' shape (rows 3-4) is not;
  # in the 2-ring, background becomes 2 but class 3 stays.
  np.testing.assert_array_equal(postprocess.fill_holes(labels), _grid("""
      111.2222
      111.2222
      111.2332
      .1..2222
      1.1.....
  """))
  np.testing.assert_array_equal(postprocess.fill_holes(labels, classes=[2]),
                                _grid("""
      111.2222
      1.1.2222
      111.2332
      .1..2222
      1.1.....
  """))


def test_3d_known_answers():
  labels = np.zeros((5, 5, 5), np.int16)
  labels[:3, :3, :3] = 1
  labels[1, 1, 1] = 0  # A closed cavity.
  labels[4, 4, 4] = 1  # Touches the cube by nothing.
  labels[3, 3, 3] = 2  # Corner-adjacent to the cube and to (4, 4, 4).
  filled = postprocess.fill_holes(labels)
  assert filled[1, 1, 1] == 1 and (filled != labels).sum() == 1
  largest = postprocess.keep_largest_component(labels)
  assert largest[4, 4, 4] == 0 and (largest != labels).sum() == 1
  assert largest[3, 3, 3] == 2
  small = postprocess.remove_small_components(labels, 2)
  assert small[4, 4, 4] == 0 and small[3, 3, 3] == 0
  assert (small == 1).sum() == 26
  # A 2-voxel diagonal (edge-adjacent) pair: one component unless faces only.
  pair = np.zeros((3, 3, 3), np.uint8)
  pair[0, 0, 0] = pair[1, 1, 0] = 1
  assert postprocess.remove_small_components(pair, 2).sum() == 2
  assert postprocess.remove_small_components(pair, 2, connectivity=1).sum() == 0


def test_bool_and_empty_and_bad_input():
  mask = BLOBS.astype(bool)
  out = postprocess.keep_largest_component(mask)
  assert out.dtype == bool and out.sum() == 4
  empty = np.zeros((4, 4), np.int32)
  for fn in (postprocess.keep_largest_component, postprocess.fill_holes):
    np.testing.assert_array_equal(fn(empty), empty)
  with pytest.raises(ValueError, match='integer label map'):
    postprocess.fill_holes(np.zeros((4, 4), np.float32))


def test_from_config_applies_the_steps_the_config_turns_on():
  ring = _grid("""
      111...
      1.1..1
      111...
  """)
  post = ml_collections.ConfigDict(dict(fill_holes=False, min_size=0,
                                        largest_component=False))
  assert postprocess.from_config(ring, post) is ring  # All off: untouched.
  post.fill_holes = True
  np.testing.assert_array_equal(postprocess.from_config(ring, post), _grid("""
      111...
      111..1
      111...
  """))
  # Holes filled first, then components under 2 voxels removed: the lone
  # voxel goes, the filled ring (9 voxels) stays.
  post.min_size = 2
  np.testing.assert_array_equal(postprocess.from_config(ring, post), _grid("""
      111...
      111...
      111...
  """))
  post.update(fill_holes=False, min_size=0, largest_component=True)
  np.testing.assert_array_equal(postprocess.from_config(ring, post),
                                postprocess.keep_largest_component(ring))
