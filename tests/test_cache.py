"""The one case cache of the file sources: memory cap, disk reuse, faults."""

import os
import pickle
import threading

import numpy as np
import pytest

from medseg_jax.data import cache as cache_lib
from medseg_jax.data import folder_sources
from medseg_jax.data import volume_sources
from tests.test_folder_sources import data_cfg
from tests.test_folder_sources import make_folder
from tests.test_volume_sources import data_cfg as nifti_cfg
from tests.test_volume_sources import make_msd


def _case(i, n=100):
  return np.full(n, i, np.uint8), np.zeros(3, np.float64)


def _fill(cache, indices, calls):
  def compute(i):
    calls.append(i)
    return _case(i)
  return [cache.get_or_compute(i, f'c{i}', lambda: f'{i:040d}',
                               lambda i=i: compute(i)) for i in indices]


def test_memory_lru_is_byte_capped_and_keeps_the_newest(tmp_path):
  case_bytes = 100 + 24
  cache = cache_lib.CaseCache('memory', '', str(tmp_path), 2.5 * case_bytes
                              / 2**20, kind='photos')
  calls = []
  _fill(cache, [0, 1, 2, 0, 2], calls)
  assert calls == [0, 1, 2, 0]  # 0 was evicted by 2; then 1 by 0.
  assert list(cache._memory) == [0, 2]  # pylint: disable=protected-access
  assert cache._used == 2 * case_bytes  # pylint: disable=protected-access
  tiny = cache_lib.CaseCache('memory', '', str(tmp_path), 1e-6, kind='photos')
  value = _fill(tiny, [0], calls)[0]
  assert len(tiny._memory) == 1  # pylint: disable=protected-access
  assert not value[0].flags.writeable  # Shared: protected from edits.
  none = cache_lib.CaseCache('none', '', str(tmp_path), 100, kind='photos')
  calls.clear()
  _fill(none, [0, 0], calls)
  assert calls == [0, 0]


def test_disk_cache_survives_damage_and_write_failures(tmp_path):
  folder = tmp_path / 'cache'
  cache = cache_lib.CaseCache('disk', str(folder), str(tmp_path / 'data'), 10,
                              kind='nifti')
  calls = []
  _fill(cache, [1], calls)
  (entry,) = [os.path.join(d, n) for d, _, names in os.walk(folder)
              for n in names]
  assert os.path.basename(os.path.dirname(entry)).startswith('nifti-')
  with open(entry, 'wb') as f:
    f.write(b'PK half')
  fresh = pickle.loads(pickle.dumps(cache))  # A worker: empty memory.
  again = _fill(fresh, [1], calls)[0]
  assert calls == [1, 1] and (again[0] == 1).all()
  assert os.path.getsize(entry) > 100  # Rewritten whole.
  reread = pickle.loads(pickle.dumps(cache))
  np.testing.assert_array_equal(_fill(reread, [1], calls)[0][0], _case(1)[0])
  assert calls == [1, 1]  # Read from disk, not decoded.
  blocked = tmp_path / 'file'
  blocked.write_text('not a folder')
  broken = cache_lib.CaseCache('disk', str(blocked), str(tmp_path / 'data'),
                               10, kind='photos')
  with pytest.warns(UserWarning, match='Could not cache'):
    value = _fill(broken, [4], calls)[0]
  assert (value[0] == 4).all()


def test_one_default_cache_dir_for_both_source_families(tmp_path,
                                                        monkeypatch):
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert cache_lib.default_cache_dir() == str(
      tmp_path / 'home' / '.cache' / 'medseg_jax' / 'cases')
  photos = folder_sources.build_folder_source(
      data_cfg(make_folder(tmp_path / 'data'), cache='disk'))
  photos[0]  # pylint: disable=pointless-statement
  volumes = volume_sources.build_nifti_source(
      nifti_cfg(make_msd(str(tmp_path / 'Task'), n=1), cache='disk'))
  volumes[0]  # pylint: disable=pointless-statement
  kinds = sorted(n.split('-')[0] for n in os.listdir(
      cache_lib.default_cache_dir()))
  assert kinds == ['nifti', 'photos']
  with pytest.raises(ValueError, match="config.data.cache='ram'"):
    cache_lib.CaseCache('ram', '', str(tmp_path), 1, kind='photos')


def test_threads_share_one_entry(tmp_path):
  cache = cache_lib.CaseCache('memory', '', str(tmp_path), 10, kind='photos')
  calls, barrier = [], threading.Barrier(4)

  def read():
    barrier.wait()
    _fill(cache, [7] * 20, calls)

  threads = [threading.Thread(target=read) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert 1 <= len(calls) <= 4
  assert len(cache._memory) == 1  # pylint: disable=protected-access
  assert cache._used == 124  # pylint: disable=protected-access
