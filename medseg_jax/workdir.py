"""The run's working directory: one writer, one recipe, `config.json`, `metrics.jsonl`.

A workdir is a contract:
  one writer   training holds an OS lock on it (`acquire_lock`); a second
               writer is refused at once, and a killed run leaves no stale lock.
  one recipe   `config.json` is written once, by the first start; a resume
               whose config changes anything but `RESULT_NEUTRAL_KEYS` is
               refused, naming every differing key (`check_recipe`).
  one history  `metrics.jsonl` is appended to; a resume marks the step it
               restarts from, and `read_metrics` drops the records of steps
               that were trained again, and a partial last line.

Nothing here touches an existing checkpoint: incompatibilities are found by
comparing configs before the run starts writing.
"""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from typing import Any, Iterator

from medseg_jax import config_lib
from medseg_jax import fileio
# Re-exported: the run's metrics log is part of the workdir's API.
from medseg_jax.metrics_log import MetricsLog, RESUME_SPLIT, read_metrics  # pylint: disable=unused-import

LOCK_NAME = '.lock'


class WorkdirInUseError(ValueError):
  """Another live process holds the lock on a directory."""


def _holder(path: str) -> str:
  """Returns 'PID N on host H (purpose)' from a lock file, as far as known."""
  try:
    with open(path) as f:
      info = json.loads(f.read() or '{}')
  except (OSError, ValueError):
    info = {}
  return (f"PID {info.get('pid', '?')} on host {info.get('host', '?')} "
          f"({info.get('purpose', 'unknown purpose')})")


def _open_locked(path: str) -> int | None:
  """Opens and flocks `path`; returns the fd, or None if another holds it.

  The file is removed when its holder releases it, so a waiter may lock an
  inode that is no longer at `path`; checking the inode after locking (and
  trying again) makes sure the lock taken is the one on the path.
  """
  for _ in range(10):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        return None
      raise
    try:
      same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same = False
    if same:
      return fd
    os.close(fd)
  return None


@contextlib.contextmanager
def acquire_lock(directory: str, purpose: str) -> Iterator[str]:
  """Holds an exclusive OS lock on `directory` for the duration of the block.

  The lock is `fcntl.flock` on `directory/.lock`, which records the holder's
  PID, host and `purpose`. The kernel drops the lock when the process dies,
  so a killed run never leaves a stale lock; a clean exit also removes the
  file, so a refused run leaves nothing behind. (flock works on local file
  systems; on NFS it depends on the server.)

  Args:
    directory: the folder to lock (created if missing).
    purpose: what the holder does, e.g. 'training'; shown to a second comer.

  Yields:
    The path of the lock file.

  Raises:
    WorkdirInUseError: another process (or another holder in this process)
      holds the lock.
  """
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, LOCK_NAME)
  fd = _open_locked(path)
  if fd is None:
    raise WorkdirInUseError(
        f'{directory} is in use by {_holder(path)}; wait for that process '
        'to finish (or stop it), or use another directory.')
  try:
    record = json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                         'purpose': purpose, 'since': time.time()})
    os.ftruncate(fd, 0)
    os.write(fd, record.encode())
    yield path
  finally:
    # Unlink while still holding the lock, so no one can lock this inode and
    # believe it holds the path (see _open_locked).
    with contextlib.suppress(OSError):
      os.remove(path)
    os.close(fd)

def check_writable(workdir: str) -> None:
  """Creates `workdir` if needed and raises a clear error if it is not writable."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix='.write_test'):
      pass
  except OSError as e:
    raise PermissionError(
        f'Cannot write to workdir {workdir!r} ({e.strerror}); pass a '
        'writable --workdir.') from e


class DiskFullError(ValueError):
  """The workdir's disk is full (raised with the space needed, in one line)."""


_DISK_FULL_TEXT = ('No space left on device', 'RESOURCE_EXHAUSTED',
                   'Disk quota exceeded')


def is_disk_full(error: BaseException) -> bool:
  """Whether `error` (or an error it was raised from) is a full disk.

  Orbax and TensorStore report it in their own exception types, with ENOSPC
  only in the message.
  """
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC,
                                                      errno.EDQUOT):
      return True
    if any(text in str(error) for text in _DISK_FULL_TEXT):
      return True
    error = error.__cause__ or error.__context__
  return False


def free_bytes(workdir: str) -> int:
  """Returns the free space (bytes) on the file system of `workdir`."""
  try:
    return shutil.disk_usage(workdir).free
  except OSError:
    return 0


def disk_full_error(workdir: str, needed_bytes: int,
                    last_checkpoint) -> DiskFullError:
  """Returns the one-line error for a full disk under `workdir`."""
  kept = (f'the checkpoint of step {last_checkpoint} is intact'
          if last_checkpoint else 'no checkpoint had been saved yet')
  return DiskFullError(
      f'No space left on device for workdir {workdir}: a checkpoint needs '
      f'about {needed_bytes / 2**20:.1f} MiB free, '
      f'{free_bytes(workdir) / 2**20:.1f} MiB are; {kept}. Free some space '
      'and run the same command again to resume.')


# Config sections that fix the shapes of the saved state: a checkpoint made
# with other values cannot be loaded for evaluation with this model.
STATE_DEFINING_KEYS = ('model', 'data.num_classes', 'data.in_channels',
                       'optim.name')

# The only keys a resume may change: they cannot change what is trained, on
# which data, or which checkpoint is the best. A key listed here covers every
# key below it. Everything else (data, split, model, loss, optimiser, seed,
# schedule, batch size, num_steps/num_epochs, the validation threshold and
# interval that pick the best checkpoint) is the recipe.
RESULT_NEUTRAL_KEYS = (
    'train.log_every_steps',
    'train.progress_bar',
    'train.tensorboard',  # A view of metrics.jsonl.
    'train.checkpoint_every_steps',  # Resumes are bit-identical anyway.
    'train.max_checkpoints',
    # Not data.worker_count: Grain's saved iterator position has one entry
    # per worker process, so it cannot be restored with another count.
    'data.prefetch_buffer_size',
    'data.cache',
    'data.cache_dir',
    'data.check',  # Whether files are checked first, not what is read.
    'eval.batch_size',  # Metrics are sums of counts: exact in any batch.
    'model.conv_impl',  # Which CPU conv kernel: same values up to rounding.
    # Used only by --mode=evaluate / predict, not during training:
    'eval.overlap', 'eval.blend', 'eval.sw_batch_size', 'eval.tta',
    'eval.postprocess', 'eval.mc_samples', 'eval.save_probabilities',
    'eval.gradcam_layer', 'eval.nsd_tolerance_mm',
    'eval.subgroups', 'eval.subgroups_csv', 'eval.subgroup_bins',
    'eval.decision',
    'export',  # --mode=export only.
)


def _is_neutral(key: str) -> bool:
  return any(key == k or key.startswith(k + '.') for k in RESULT_NEUTRAL_KEYS)


def recipe_differences(saved: dict,
                       current: dict) -> list[tuple[str, Any, Any]]:
  """Lists the keys outside RESULT_NEUTRAL_KEYS whose values differ.

  Args:
    saved: the run's config.json, as a dict.
    current: this run's config, as JSON-like dicts.

  Returns:
    (dotted key, saved value, current value) sorted by key; a key missing on
    one side has the value `_ABSENT`.
  """
  old, new = _flatten(saved, ''), _flatten(current, '')
  return [(key[1:], old.get(key, _ABSENT), new.get(key, _ABSENT))
          for key in sorted(set(old) | set(new))
          if old.get(key, _ABSENT) != new.get(key, _ABSENT)
          and not _is_neutral(key[1:])]


class _Absent:

  def __repr__(self):
    return '(absent)'


_ABSENT = _Absent()


def check_recipe(workdir: str, config) -> None:
  """Refuses a start whose config differs from the run's config.json in the recipe.

  The first start of a workdir writes config.json; every later start (a
  resume, or a rerun of a finished run) must have the same recipe.
  Extending a finished run (a larger train.num_steps or num_epochs) is
  refused too: the learning-rate schedule and the data order depend on the
  total number of steps, so the extended run would be neither the old recipe
  nor the new one. Train the longer recipe in a new workdir.

  Args:
    workdir: the run's workdir.
    config: this start's ConfigDict.

  Raises:
    ValueError: the recipe differs (every differing key, old -> new), or the
      workdir holds checkpoints but no config.json to compare with.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    checkpoints = os.path.join(workdir, 'checkpoints')
    if any(os.listdir(os.path.join(checkpoints, kind))
           for kind in ('latest', 'best')
           if os.path.isdir(os.path.join(checkpoints, kind))):
      raise ValueError(
          f'{workdir} holds checkpoints but no config.json, so the recipe '
          'they were trained with cannot be checked. Use a new --workdir, '
          'or put back the config.json of that run.')
    return
  try:
    # Merged over today's defaults: a key added to configs/default.py since
    # the run started is not a difference.
    saved = config_as_json_dict(load_config(workdir))
  except ValueError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); the recipe of this '
                     'workdir cannot be checked. Use a new --workdir.') from e
  diffs = recipe_differences(saved, config_as_json_dict(config))
  if diffs:
    lines = [f'  config.{key}: {old!r} -> {new!r}' for key, old, new in diffs]
    raise ValueError(
        f'Workdir {workdir} holds a run of another recipe; this config is '
        'incompatible with its config.json in:\n' + '\n'.join(lines) +
        '\nResume with the same config (only logging, checkpoint frequency, '
        'prefetch, cache and evaluate-only eval.* settings may change: '
        'workdir.RESULT_NEUTRAL_KEYS), or use a new --workdir. Nothing was '
        'modified.')


def _lookup(config_dict: dict, dotted: str):
  """Returns the value at a dotted key of a nested dict, or None."""
  value = config_dict
  for part in dotted.split('.'):
    if not isinstance(value, dict) or part not in value:
      return None
    value = value[part]
  return value


def _flatten(value, prefix: str) -> dict[str, object]:
  """Flattens nested dicts to {dotted key: leaf}."""
  if not isinstance(value, dict):
    return {prefix: value}
  flat = {}
  for key, sub in value.items():
    flat.update(_flatten(sub, f'{prefix}.{key}'))
  return flat


def incompatible_keys(saved: dict, current: dict) -> list[str]:
  """Lists state-defining config keys whose values differ, with both values.

  Args:
    saved: the config of the existing run (from its config.json).
    current: the config of this run, as JSON-like dicts.

  Returns:
    Human-readable lines 'config.KEY: saved X, now Y'; empty if compatible.
  """
  lines = []
  for key in STATE_DEFINING_KEYS:
    old = _flatten(_lookup(saved, key), key)
    new = _flatten(_lookup(current, key), key)
    for flat_key in sorted(set(old) | set(new)):
      if old.get(flat_key) != new.get(flat_key):
        lines.append(f'config.{flat_key}: checkpoint has {old.get(flat_key)!r}, '
                     f'this run has {new.get(flat_key)!r}')
  return lines


def config_as_json_dict(config) -> dict:
  """Returns the config as plain JSON types (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def saved_config_dict(workdir: str) -> dict:
  """Returns the run's `config.json` as a dict; raises if there is none."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{path} does not exist: {workdir!r} is not a training workdir (train '
        'first with --mode=train, or pass the --workdir of a trained run).')
  with open(path) as f:
    return json.load(f)


def load_config(workdir: str):
  """Returns the ConfigDict a run was trained with (from its config.json).

  Merged over configs/default.py (`config_lib.from_saved`): keys added since
  the run was trained get their default; lists come back as tuples.
  """
  return config_lib.from_saved(saved_config_dict(workdir))


def check_same_model(workdir: str, config) -> None:
  """Raises if `config` describes another model than the one `workdir` trained.

  Used before loading a checkpoint for evaluation or prediction, so a
  mismatch is reported by config key instead of as a shape error.
  """
  lines = incompatible_keys(config_as_json_dict(load_config(workdir)),
                            config_as_json_dict(config))
  lines = [line for line in lines if not line.startswith('config.optim.')]
  if lines:
    raise ValueError(
        f'The checkpoints in {workdir!r} were trained with another model '
        'config than the one given:\n' + '\n'.join('  ' + l for l in lines) +
        '\nPass the config the run was trained with, or leave --config out '
        'to use its config.json.')


def write_config(workdir: str, config) -> bool:
  """Writes `config.json` if it does not exist yet (atomically).

  It is the run's recipe: written by the first start only, so it stays
  byte-identical across resumes.

  Returns:
    Whether it was written.
  """
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    return False
  fileio.write_text(path, config.to_json_best_effort(indent=2, sort_keys=True))
  return True
