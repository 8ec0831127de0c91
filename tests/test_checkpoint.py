"""Checkpoints: damage falls back to an older one, another model is refused, weights load alone."""

import errno
import hashlib
import os
import shutil

import jax
import numpy as np
import pytest
import tensorstore as ts

from medseg_jax import checkpoint as checkpoint_lib
from medseg_jax import train
from medseg_jax import workdir as workdir_lib
from tests import conftest

# Orbax leaves un-awaited reads behind when a damaged file fails them; they
# only warn, at garbage collection, after the test that caused them.
pytestmark = pytest.mark.filterwarnings(
    'ignore::pytest.PytestUnraisableExceptionWarning')

# Checkpoints at steps 2, 4 and 6 (all kept); the best is step 6, the only
# evaluation.
RUN = dict(train__num_steps=6, train__checkpoint_every_steps=2,
           train__max_checkpoints=3)


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A finished tiny run (read-only: tests copy it)."""
  workdir = tmp_path_factory.mktemp('finished') / 'run'
  train.train_and_evaluate(conftest.tiny_config(**RUN), str(workdir))
  return workdir


def _copy(finished, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(finished, workdir)
  return workdir


def _tree_hash(path):
  digest = hashlib.sha256()
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for name in sorted(files):
      full = os.path.join(root, name)
      digest.update(os.path.relpath(full, path).encode())
      with open(full, 'rb') as f:
        digest.update(f.read())
  return digest.hexdigest()


def _array_files(state_dir):
  return sorted((os.path.join(root, name)
                 for root, _, names in os.walk(state_dir)
                 for name in names if os.sep + 'd' + os.sep in
                 os.path.join(root, name)), key=os.path.getsize)


def _damage(state_dir, kind):
  """Damages a saved state the ways a disk or a user can."""
  if kind == 'garbage_metadata':
    with open(os.path.join(state_dir, '_METADATA'), 'w') as f:
      f.write('garbage')
  elif kind == 'no_manifest':
    os.remove(os.path.join(state_dir, 'manifest.ocdbt'))
  elif kind == 'no_state':
    shutil.rmtree(state_dir)
  elif kind in ('truncated', 'byte_flipped'):
    path = _array_files(state_dir)[-1]  # The largest array file.
    with open(path, 'rb') as f:
      data = bytearray(f.read())
    if kind == 'truncated':
      data = data[:len(data) // 2]
    else:  # One bit in the middle of the array data: only a checksum sees it.
      data[len(data) // 4] ^= 0x10
    with open(path, 'wb') as f:
      f.write(bytes(data))
  elif kind == 'no_opt_state':
    store = ts.KvStore.open({'driver': 'ocdbt',
                             'base': f'file://{state_dir}/'}).result()
    for key in store.list().result():
      if key.startswith(b'opt_state.'):
        del store[key]
  else:
    raise ValueError(kind)


def _params(workdir, **kwargs):
  state, step = checkpoint_lib.load_state_arrays(str(workdir), **kwargs)
  return state['params'], step


def _assert_same(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)


@pytest.mark.parametrize('kind', ['garbage_metadata', 'no_manifest',
                                  'no_state', 'truncated', 'byte_flipped',
                                  'no_opt_state'])
def test_damaged_newest_checkpoint_falls_back_and_the_run_finishes(
    finished, tmp_path, capfd, kind):
  workdir = _copy(finished, tmp_path)
  damaged = workdir / 'checkpoints' / 'latest' / '6'
  _damage(str(damaged / 'state'), kind)
  damaged_hash = _tree_hash(damaged)
  train.train_and_evaluate(conftest.tiny_config(**RUN), str(workdir))
  out, err = capfd.readouterr()
  # One line, not Orbax's wall of 'Event loop is closed' tracebacks.
  assert 'Traceback' not in out + err
  [line] = [l for l in out.splitlines() if 'is damaged' in l]
  assert str(damaged) in line and 'does not match' not in line
  assert 'Resuming from step 4' in out
  # Never deleted or overwritten: moved aside, byte for byte, out of reach of
  # Orbax's max_to_keep and of the new save at step 6.
  kept = workdir / 'checkpoints' / 'damaged' / 'latest-6'
  assert _tree_hash(kept) == damaged_hash
  # Steps 5 and 6 trained again from step 4 give the original step 6.
  new, step = _params(workdir)
  old, _ = _params(finished)
  assert step == 6
  _assert_same(new, old)
  # Each (step, split) once in what reports read.
  records = workdir_lib.read_metrics(str(workdir))
  keys = [(r['step'], r['split']) for r in records]
  assert len(keys) == len(set(keys)) and (6, 'val') in keys


def test_no_intact_checkpoint_is_refused_in_one_line_and_left_alone(
    finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  for step in (2, 4, 6):
    _damage(str(workdir / 'checkpoints' / 'latest' / str(step) / 'state'),
            'truncated')
  before = _tree_hash(workdir / 'checkpoints')
  with pytest.raises(checkpoint_lib.CheckpointDamagedError,
                     match='No intact checkpoint') as info:
    train.train_and_evaluate(conftest.tiny_config(**RUN), str(workdir))
  assert '\n' not in str(info.value)
  assert _tree_hash(workdir / 'checkpoints') == before


def test_weights_load_without_a_readable_optimiser_state(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  _damage(str(workdir / 'checkpoints' / 'latest' / '6' / 'state'),
          'no_opt_state')
  params, step = _params(workdir, step=6)
  assert step == 6
  _assert_same(params, _params(finished, step=6)[0])


def test_load_state_arrays_falls_back_only_when_no_step_is_asked(
    finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  _damage(str(workdir / 'checkpoints' / 'latest' / '6' / 'state'),
          'garbage_metadata')
  params, step = _params(workdir)
  assert step == 4
  _assert_same(params, _params(finished, step=4)[0])
  with pytest.raises(checkpoint_lib.CheckpointDamagedError,
                     match='latest/6 is damaged'):
    _params(workdir, step=6)


def test_flipped_bit_in_the_weights_is_caught_by_the_checksum(
    finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  state_dir = workdir / 'checkpoints' / 'best' / '6' / 'state'
  # A valid, well-compressed array with one bit changed: TensorStore reads it
  # without complaint, only the checksum saved with the checkpoint sees it.
  name = next(k for k in checkpoint_lib.saved_shapes(str(state_dir))
              if k.startswith('params/') and k.endswith('kernel'))
  array = ts.open({'driver': 'zarr', 'kvstore': {
      'driver': 'ocdbt', 'base': f'file://{state_dir}/',
      'path': name.replace('/', '.') + '/'}}).result()
  values = array.read().result()
  flat = values.reshape(-1).view(np.uint32)
  flat[0] ^= 1  # The lowest mantissa bit of one weight.
  array.write(values).result()
  with pytest.raises(checkpoint_lib.CheckpointDamagedError,
                     match='fails? (its|their) checksum'):
    checkpoint_lib.load_state_arrays(str(workdir), 'best')


def test_a_model_without_batch_norm_loads_and_matches(run3d):
  # Its empty batch_stats is saved as a placeholder, not as an array.
  state, step = checkpoint_lib.load_state_arrays(str(run3d), 'best')
  assert state['batch_stats'] == {} and state['params']
  assert checkpoint_lib.saved_shapes(
      str(run3d / 'checkpoints' / 'best' / str(step) / 'state'), ('params',))


@pytest.mark.parametrize('kind', ['best', 'best_ema'])
def test_best_checkpoint_of_another_model_is_refused_before_training(
    finished, tmp_path, kind):
  # config.json says the new model (as if it had been rewritten), but best/
  # (or the EMA's best_ema/) holds the old one: the shapes tell, and nothing
  # is trained or written.
  workdir = _copy(finished, tmp_path)
  shutil.rmtree(workdir / 'checkpoints' / 'latest')
  if kind == 'best_ema':
    os.rename(workdir / 'checkpoints' / 'best',
              workdir / 'checkpoints' / 'best_ema')
  other = conftest.tiny_config(model__features=(4, 8, 32), **RUN)
  os.remove(workdir / 'config.json')
  workdir_lib.write_config(str(workdir), other)
  before = _tree_hash(workdir)
  with pytest.raises(checkpoint_lib.CheckpointMismatchError) as info:
    train.train_and_evaluate(other, str(workdir))
  message = str(info.value)
  assert os.path.join(kind, '6', 'state') in message
  assert 'another model' in message and 'damaged' not in message
  assert _tree_hash(workdir) == before


def test_copied_run_without_latest_and_another_model_is_refused(
    finished, tmp_path):
  # The reproduction: copy a finished run, delete checkpoints/latest,
  # train another model in it.
  workdir = _copy(finished, tmp_path)
  shutil.rmtree(workdir / 'checkpoints' / 'latest')
  before = _tree_hash(workdir)
  with pytest.raises(ValueError, match='config.model.features'):
    train.train_and_evaluate(
        conftest.tiny_config(model__features=(4, 8, 32), **RUN), str(workdir))
  assert _tree_hash(workdir) == before


def test_run_that_died_between_save_best_and_save_latest_resumes(
    finished, tmp_path, monkeypatch):
  # best/6 exists, latest/6 does not. Training 5 and 6 again must not fail
  # on the existing best/6, even if the new evaluation scores higher.
  workdir = _copy(finished, tmp_path)
  shutil.rmtree(workdir / 'checkpoints' / 'latest' / '6')
  best_before = _tree_hash(workdir / 'checkpoints' / 'best')
  original = train.evaluate

  def higher(*args, **kwargs):
    metrics = original(*args, **kwargs)
    metrics['dice'] = 0.99
    return metrics

  monkeypatch.setattr(train, 'evaluate', higher)
  train.train_and_evaluate(conftest.tiny_config(**RUN), str(workdir))
  assert _tree_hash(workdir / 'checkpoints' / 'best') == best_before
  _assert_same(_params(workdir)[0], _params(finished)[0])


def test_damaged_best_checkpoint_is_reported_and_set_aside(
    finished, tmp_path, capsys):
  workdir = _copy(finished, tmp_path)
  best = workdir / 'checkpoints' / 'best' / '6'
  _damage(str(best / 'state'), 'garbage_metadata')
  damaged_hash = _tree_hash(best)
  result = train.train_and_evaluate(conftest.tiny_config(**RUN), str(workdir))
  out = capsys.readouterr().out
  assert f'Best checkpoint {best} is damaged' in out
  assert result['best_dice'] == float('-inf')  # No best to compare with now.
  moved = workdir / 'checkpoints' / 'damaged' / 'best-6'
  assert _tree_hash(moved) == damaged_hash and not best.exists()


@pytest.mark.parametrize('where', ['free_space_check', 'inside_the_save'])
def test_full_disk_stops_in_one_line_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch, where):
  original = checkpoint_lib.Checkpointer.save_latest
  if where == 'free_space_check':  # Found before Orbax starts writing.
    calls = []

    def free_bytes(workdir):
      calls.append(workdir)
      return 10**12 if len(calls) < 2 else 1000

    monkeypatch.setattr(workdir_lib, 'free_bytes', free_bytes)
  else:  # Orbax fails writing (e.g. the disk filled up meanwhile).

    def fill_disk_at_step_4(self, step, state, data_iterator):
      if step >= 4:
        self.wait()
        raise OSError(errno.ENOSPC, 'No space left on device')
      original(self, step, state, data_iterator)

    monkeypatch.setattr(checkpoint_lib.Checkpointer, 'save_latest',
                        fill_disk_at_step_4)
  workdir = str(tmp_path / 'run')
  with pytest.raises(workdir_lib.DiskFullError) as info:
    train.train_and_evaluate(conftest.tiny_config(**RUN), workdir)
  message = str(info.value)
  assert '\n' not in message and workdir in message
  assert 'MiB free' in message and 'step 2 is intact' in message
  assert _params(workdir)[1] == 2
