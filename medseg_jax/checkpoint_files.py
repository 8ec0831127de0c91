"""What a checkpoint folder holds on disk: steps, array shapes, checksums, damage.

Read directly (the `_METADATA` tree, the zarr headers in the OCDBT store,
the `meta` JSON), not through Orbax's metadata API, so that a damaged
checkpoint gives one clear error instead of a wall of asyncio tracebacks.

Two kinds of failure are kept apart, because they call for different actions:
  CheckpointMismatchError  the checkpoint holds another model (names or shapes
                           differ from this config's): use the right config.
  CheckpointDamagedError   it cannot be read, or its arrays fail their
                           checksum: the files were damaged.

Checksums: each array's bits summed modulo 2**32, saved in the step's `meta`
and verified on restore. Orbax's atomic rename protects against a crash
during a save, not against a flipped bit or a truncated file afterwards:
TensorStore reads many such files back without complaint.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts


class CheckpointMismatchError(ValueError):
  """A checkpoint holds arrays of other names or shapes than this config's."""


class CheckpointDamagedError(ValueError):
  """A checkpoint's files cannot be read back intact."""


# --- Checksums --------------------------------------------------------------


def _path_key(path) -> str:
  """Returns 'params/conv/kernel' for a pytree key path (any key kind)."""
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '/'.join(parts)


_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _leaf_checksum(x):
  # The sum of the bit patterns modulo 2**32: exact and independent of the
  # order of summation (so of the device layout); any flipped bit changes it.
  bits = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize])
  return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)


_checksum_tree = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def state_checksums(state) -> dict[str, int]:
  """Returns {leaf path: checksum of its bits} for a pytree of arrays.

  Runs on device (one small reduction per array); works on global arrays of
  a multi-process run and on host NumPy arrays, with the same results.

  Args:
    state: a pytree of jax or NumPy arrays (float32/bfloat16/int32...).

  Returns:
    {'params/conv/kernel': int, ...}.
  """
  sums = _checksum_tree(state)
  flat, _ = jax.tree_util.tree_flatten_with_path(sums)
  return {_path_key(path): int(np.asarray(
      x.addressable_data(0) if isinstance(x, jax.Array) else x))
          for path, x in flat}


def checksum_mismatches(saved: dict, actual: dict) -> list[str]:
  """Returns the leaves whose saved checksum differs from the actual one."""
  return [k for k in sorted(actual) if k in saved and saved[k] != actual[k]]


# --- Reading a checkpoint folder without Orbax's metadata machinery ----------


def step_numbers(directory: str) -> list[int]:
  """Returns the committed steps in a manager folder, newest first.

  Orbax's temporary folders ('5.orbax-checkpoint-tmp-...') are not steps.
  """
  if not os.path.isdir(directory):
    return []
  return sorted((int(n) for n in os.listdir(directory) if n.isdigit()),
                reverse=True)


def saved_shapes(state_dir: str,
                 only: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
  """Returns {leaf path: global shape} of a saved state.

  The tree comes from the `_METADATA` file, the shapes from each array's
  zarr header in the OCDBT store (`_METADATA` holds only the shape written
  per process). Reading them directly, not through Orbax's metadata API,
  keeps a damaged checkpoint to one clear error.

  Args:
    state_dir: a checkpoint's `state` folder.
    only: top-level keys to read (e.g. ('params',)); () reads every array.

  Raises:
    CheckpointDamagedError: the metadata, the store or a header is missing
      or unreadable.
  """
  try:
    with open(os.path.join(state_dir, '_METADATA')) as f:
      metadata = json.load(f)
    # Empty subtrees (optax's EmptyState, the batch_stats of a model without
    # batch norm) are stored as placeholders that hold no array.
    paths = [tuple(str(k['key']) for k in entry['key_metadata'])
             for entry in metadata['tree_metadata'].values()
             if not entry['value_metadata'].get('skip_deserialize')]
    paths = [p for p in paths if not only or p[0] in only]
    header = 'zarr.json' if metadata.get('use_zarr3') else '.zarray'
    store = ts.KvStore.open({'driver': 'ocdbt', 'base': 'file://' +
                             os.path.abspath(state_dir) + '/'}).result()
    reads = [store.read('.'.join(p) + '/' + header) for p in paths]
    shapes = {}
    for path, read in zip(paths, reads):
      result = read.result()
      if result.state != 'value':
        raise KeyError(f'no array {".".join(path)}')
      shapes['/'.join(path)] = tuple(json.loads(result.value)['shape'])
    return shapes
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise CheckpointDamagedError(
        f'state metadata unreadable, {one_line(e)[:120]}') from e


def _host_checksum(x: np.ndarray) -> int:
  """`_leaf_checksum` of a host array: its bit patterns summed modulo 2**32."""
  bits = np.ascontiguousarray(x).view(f'uint{8 * x.dtype.itemsize}')
  return int(bits.astype(np.uint64).sum() % 2**32)


def verify_state_files(state_dir: str, meta: dict | None,
                       only: tuple[str, ...] = ()) -> None:
  """Reads every saved array of a state and checks it against its checksum.

  Done before Orbax restores the state: Orbax reads the arrays concurrently,
  and when one read fails its other reads report into a closed event loop,
  printing thousands of lines of tracebacks. Reading them here one at a time
  with TensorStore fails quietly, so a damaged checkpoint costs one line.

  Args:
    state_dir: a checkpoint's `state` folder.
    meta: the step's `meta` item (`read_meta`); its 'checksums', when present
      (runs saved before checksums existed have none), are compared.
    only: top-level keys to read (e.g. ('step', 'params', 'batch_stats')).

  Raises:
    CheckpointDamagedError: an array cannot be read, or fails its checksum.
  """
  checksums = (meta or {}).get('checksums', {})
  try:
    with open(os.path.join(state_dir, '_METADATA')) as f:
      metadata = json.load(f)
    driver = 'zarr3' if metadata.get('use_zarr3') else 'zarr'
    base = {'driver': 'ocdbt', 'base': 'file://' + os.path.abspath(state_dir)
            + '/'}
    for entry in metadata['tree_metadata'].values():
      if entry['value_metadata'].get('skip_deserialize'):
        continue
      path = [str(k['key']) for k in entry['key_metadata']]
      if only and path[0] not in only:
        continue
      key = '/'.join(path)
      try:
        array = ts.open({'driver': driver,
                         'kvstore': {**base, 'path': '.'.join(path)}},
                        open=True).result().read().result()
      except ValueError as e:
        # TensorStore's message goes on with the store's path and its spec.
        reason = one_line(e).split(' in OCDBT database')[0]
        raise CheckpointDamagedError(
            f'array {key} unreadable: {reason[:200]}') from e
      if key in checksums and checksums[key] != _host_checksum(array):
        raise CheckpointDamagedError(f'array {key} fails its checksum')
  except CheckpointDamagedError:
    raise
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise CheckpointDamagedError(
        f'state files unreadable, {one_line(e)[:160]}') from e


def _expected_shapes(abstract_state) -> dict[str, tuple[int, ...]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(abstract_state)
  return {_path_key(path): tuple(x.shape) for path, x in flat}


def check_matches(state_dir: str, abstract_state) -> None:
  """Raises if a saved state holds other arrays than `abstract_state`.

  Args:
    state_dir: a checkpoint's `state` folder.
    abstract_state: the TrainState of this config (ShapeDtypeStructs).

  Raises:
    CheckpointMismatchError: names, shapes differ (another model or optimiser).
    CheckpointDamagedError: the metadata cannot be read.
  """
  saved = saved_shapes(state_dir)
  expected = _expected_shapes(abstract_state)
  diffs = [f'{k}: saved {saved.get(k, "absent")}, this config '
           f'{expected.get(k, "absent")}'
           for k in sorted(set(saved) | set(expected))
           if saved.get(k) != expected.get(k)]
  if diffs:
    more = f' (and {len(diffs) - 3} more)' if len(diffs) > 3 else ''
    raise CheckpointMismatchError(
        f'{state_dir} holds another model or optimiser than this config: '
        + '; '.join(diffs[:3]) + more + '. Use the config it was trained '
        'with, or a new --workdir. The checkpoint was not modified.')


def check_all_match(workdir: str, abstract_state) -> dict[str, str]:
  """Checks every latest and best checkpoint against this config's state.

  Done before anything is trained or written, so a best checkpoint of another
  model is refused as firmly as a latest one.

  Returns:
    {step folder: why it is damaged} for those whose metadata cannot be read
    (`Checkpointer.restore_latest` falls back past them).

  Raises:
    CheckpointMismatchError: a readable checkpoint holds another model.
  """
  damaged = {}
  for kind in ('latest', 'best', 'best_ema'):
    directory = os.path.join(workdir, 'checkpoints', kind)
    for step in step_numbers(directory):
      step_dir = os.path.join(directory, str(step))
      try:
        check_matches(os.path.join(step_dir, 'state'), abstract_state)
      except CheckpointDamagedError as e:
        damaged[os.path.abspath(step_dir)] = one_line(e)
  return damaged


def read_meta(step_dir: str) -> dict | None:
  """Returns a step's `meta` JSON item, or None if it has none (old runs)."""
  path = os.path.join(step_dir, 'meta', 'metadata')
  if not os.path.isdir(os.path.join(step_dir, 'meta')):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointDamagedError(
        f'meta/metadata unreadable, {one_line(e)[:120]}') from e


def one_line(error: BaseException) -> str:
  """The gist of an error on one line, ~300 characters at most (why, not where)."""
  text = ' '.join(str(error).split())
  # TensorStore appends a dump of its whole spec; the cause says more.
  text = text.split(' See full TensorStore details')[0][:160]
  cause = error.__cause__
  if cause is not None and not isinstance(error, CheckpointDamagedError):
    text += ' <- ' + ' '.join(str(cause).split())[:120]
  if isinstance(error, CheckpointDamagedError):
    return text
  return f'{type(error).__name__}: {text}'


def set_aside(step_dir: str, kind: str) -> str:
  """Moves a damaged step folder to checkpoints/damaged/, never deleting it.

  Out of the manager's folder it can neither be garbage-collected by Orbax's
  max_to_keep nor collide with the next save at the same step.

  Returns:
    The new path.
  """
  root = os.path.dirname(os.path.dirname(step_dir))
  target = os.path.join(root, 'damaged',
                        f'{kind}-{os.path.basename(step_dir)}')
  suffix, candidate = 1, target
  while os.path.exists(candidate):
    suffix += 1
    candidate = f'{target}.{suffix}'
  os.makedirs(os.path.dirname(candidate), exist_ok=True)
  os.replace(step_dir, candidate)
  return candidate
