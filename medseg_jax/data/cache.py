"""One cache of decoded cases for every file source (photographs, NIfTI).

`config.data.cache` chooses:

* 'memory': decoded (and preprocessed) cases stay in a per-process LRU of at
  most `config.data.cache_memory_mb` MB (4096 by default). Each Grain worker
  holds its own; pickling a source sends an empty cache to the workers.
* 'disk': the same memory LRU, plus one `.npz` file per case in
  `config.data.cache_dir` (default `default_cache_dir()`, i.e.
  ~/.cache/medseg_jax/cases), reused by later runs and by other workers. A
  file's name holds a hash of what made it (the source's files' paths,
  mtimes and sizes, and the decoding options), so a changed file or option
  is decoded again. Files are written atomically (`fileio.atomic_write`); a
  damaged or unreadable file is decoded again and rewritten, and a disk that
  is full or read-only only slows loading (a warning), it never stops it.
* 'none': every access decodes.

Nothing is ever written under the data folder: a `cache_dir` inside it is
refused.
"""

import collections
from collections.abc import Callable, Sequence
import hashlib
import json
import os
import re
import threading
import warnings
import zipfile

import numpy as np

from medseg_jax import fileio

CACHE_MODES = ('memory', 'disk', 'none')
_DISK_FORMAT = 2  # Part of every key: bump when the stored arrays change.


def cache_home() -> str:
  """Returns ~/.cache/medseg_jax, under which every default cache lives."""
  return os.path.join(os.path.expanduser('~'), '.cache', 'medseg_jax')


def default_cache_dir() -> str:
  """Returns ~/.cache/medseg_jax/cases (the default `config.data.cache_dir`)."""
  return os.path.join(cache_home(), 'cases')


def files_key(paths: Sequence[str], options) -> str:
  """Returns a hash of files (path, mtime, size) and JSON-able options.

  Args:
    paths: the files a case is decoded from.
    options: everything else that shapes the decoded arrays.

  Returns:
    A 40-character hex digest; raises OSError if a file is missing.
  """
  stats = []
  for path in paths:
    st = os.stat(path)
    stats.append((path, st.st_mtime_ns, st.st_size))
  blob = json.dumps([_DISK_FORMAT, stats, options], sort_keys=True,
                    default=str)
  return hashlib.sha1(blob.encode()).hexdigest()


class CaseCache:
  """Decoded cases (tuples of arrays) in a memory LRU and optionally on disk.

  Thread-safe (Grain reads with several threads). The memory LRU holds at
  most `memory_bytes` of arrays, except that the newest case always stays,
  even when it alone is larger: a volume read slice by slice would otherwise
  be decoded once per slice.
  """

  def __init__(self, mode: str, cache_dir: str, root: str, memory_mb: float,
               kind: str):
    """Args:
      mode: 'memory', 'disk' or 'none' (config.data.cache).
      cache_dir: the disk cache folder ('' = `default_cache_dir()`).
      root: the data folder (never written to).
      memory_mb: the memory cap (config.data.cache_memory_mb).
      kind: the source family ('photos', 'nifti'); names the subfolder.

    Raises:
      ValueError: unknown mode, or a cache_dir inside the data folder.
    """
    if mode not in CACHE_MODES:
      raise ValueError(f"config.data.cache={mode!r} must be 'memory', 'disk' "
                       "or 'none'.")
    self.mode = mode
    self.memory_bytes = int(float(memory_mb) * 2**20) if mode != 'none' else 0
    self.folder = ''
    if mode == 'disk':
      base = os.path.realpath(cache_dir or default_cache_dir())
      real_root = os.path.realpath(root)
      if os.path.commonpath([base, real_root]) == real_root:
        raise ValueError(f'config.data.cache_dir={base} is inside the data '
                         f'folder {real_root}, which is never written to; '
                         'choose another folder.')
      tag = hashlib.sha1(real_root.encode()).hexdigest()[:12]
      self.folder = os.path.join(base, f'{kind}-{tag}')
    self._memory = collections.OrderedDict()
    self._used = 0
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)  # Workers start with an empty memory cache.
    del state['_lock']
    state['_memory'], state['_used'] = collections.OrderedDict(), 0
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def get_or_compute(self, index: int, name: str, key: Callable[[], str],
                     compute: Callable[[], tuple]) -> tuple:
    """Returns case `index` from memory, else disk, else `compute()`.

    Args:
      index: the case's record index (the memory key: no file is touched on
        a memory hit).
      name: the case id; starts its disk file name.
      key: returns the case's disk key (`files_key`); called on a memory miss
        in 'disk' mode only.
      compute: decodes the case; returns a tuple of arrays.

    Returns:
      The arrays, read-only (they are shared by later accesses).
    """
    value = self._get_memory(index)
    if value is not None:
      return value
    path = self._disk_path(name, key()) if self.mode == 'disk' else ''
    value = self._read_disk(path) if path else None
    if value is None:
      value = tuple(np.asarray(a) for a in compute())
      if path:
        self._write_disk(path, value)
    for array in value:
      array.setflags(write=False)
    self._put_memory(index, value)
    return value

  def _get_memory(self, index: int):
    with self._lock:
      if index in self._memory:
        self._memory.move_to_end(index)
        return self._memory[index]
    return None

  def _put_memory(self, index: int, value: tuple) -> None:
    if self.mode == 'none':
      return
    with self._lock:
      if index not in self._memory:  # Another thread may have stored it.
        self._memory[index] = value
        self._used += sum(a.nbytes for a in value)
      while self._used > self.memory_bytes and len(self._memory) > 1:
        _, old = self._memory.popitem(last=False)
        self._used -= sum(a.nbytes for a in old)

  def _disk_path(self, name: str, key: str) -> str:
    safe = re.sub(r'[^A-Za-z0-9_.-]', '_', name)[-80:]
    return os.path.join(self.folder, f'{safe}-{key[:20]}.npz')

  @staticmethod
  def _read_disk(path: str):
    try:
      with np.load(path) as npz:
        return tuple(npz[f'a{i}'] for i in range(len(npz.files)))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
      return None  # Absent or damaged: decoded again and rewritten.

  def _write_disk(self, path: str, value: tuple) -> None:
    try:
      with fileio.atomic_write(path, 'wb') as f:
        np.savez(f, **{f'a{i}': a for i, a in enumerate(value)})
    except OSError as e:  # A full or read-only disk slows, never stops, us.
      warnings.warn(f'Could not cache {os.path.basename(path)} in '
                    f'{self.folder}: {e}')
