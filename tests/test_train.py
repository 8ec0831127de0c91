"""End-to-end training: tiny runs, 1 vs 4 devices, 1 vs 2 processes, resume, bad input."""

import hashlib
import os
import signal
import socket
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax import checkpoint
from medseg_jax import steps
from medseg_jax import train
from medseg_jax import workdir as workdir_lib
from tests import conftest


def _train_losses(workdir):
  return {e['step']: e['loss'] for e in workdir_lib.read_metrics(workdir)
          if e['split'] == 'train' and 'loss' in e}


def _tree_hash(path):
  digest = hashlib.sha256()
  for root, _, files in sorted(os.walk(path)):
    for name in sorted(files):
      full = os.path.join(root, name)
      digest.update(full.encode())
      with open(full, 'rb') as f:
        digest.update(f.read())
  return digest.hexdigest()


def test_train_and_evaluate_writes_metrics_config_and_checkpoints(tmp_path, tiny):
  workdir = str(tmp_path)
  # 24 images, 2 patients each -> 8 train patients, 16 images, 4 steps/epoch.
  config = tiny(train__eval_every_epochs=1.0)
  result = train.train_and_evaluate(config, workdir)
  assert 0.0 <= result['dice'] <= 1.0 and result['num_cases'] > 0
  events = workdir_lib.read_metrics(workdir)
  assert sorted(_train_losses(workdir)) == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(v) for v in _train_losses(workdir).values())
  assert [e['step'] for e in events if e['split'] == 'val'] == [4, 6]
  assert os.path.exists(os.path.join(workdir, 'config.json'))
  state, step = checkpoint.load_state_arrays(workdir)
  assert step == 6 and int(state['step']) == 6
  _, best_step = checkpoint.load_state_arrays(workdir, 'best')
  assert best_step in (4, 6)


@pytest.mark.slow
def test_four_devices_give_the_same_losses_as_one(tmp_path):
  conftest.run_main(tmp_path / 'one', num_devices=1)
  conftest.run_main(tmp_path / 'four', num_devices=4)
  one, four = _train_losses(tmp_path / 'one'), _train_losses(tmp_path / 'four')
  assert sorted(one) == sorted(four) == list(range(1, 7))
  np.testing.assert_allclose([four[s] for s in one], list(one.values()),
                             rtol=2e-5, atol=1e-6)
  p1, _ = checkpoint.load_state_arrays(tmp_path / 'one')
  p4, _ = checkpoint.load_state_arrays(tmp_path / 'four')
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5),
               p1['params'], p4['params'])


def test_3d_patches_on_two_devices_give_the_same_losses_as_one(tmp_path):
  # Random 3D patches with foreground oversampling, intensity augmentation and
  # instance norm: the global batch and its losses do not depend on how many
  # devices share it.
  tiny_3d = dict(config_arg='configs/unet3d.py:cpu',
                 data__synthetic3d__num_patients=8,
                 data__synthetic3d__volume_size=(16, 32, 32),
                 data__patch_size=(8, 16, 16), model__features=(4, 8),
                 train__batch_size=4, eval__batch_size=2, train__num_steps=4)
  conftest.run_main(tmp_path / 'one', num_devices=1, **tiny_3d)
  conftest.run_main(tmp_path / 'two', num_devices=2, **tiny_3d)
  one, two = _train_losses(tmp_path / 'one'), _train_losses(tmp_path / 'two')
  assert sorted(one) == sorted(two) == list(range(1, 5))
  np.testing.assert_allclose([two[s] for s in one], list(one.values()),
                             rtol=2e-5, atol=1e-6)


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_same_losses_as_one(tmp_path):
  conftest.run_main(tmp_path / 'single', num_devices=4)
  port = _free_port()
  procs = []
  for process_id in range(2):
    command = conftest.main_command(
        tmp_path / 'multi', extra=[f'--coordinator_address=localhost:{port}',
                                   '--num_processes=2',
                                   f'--process_id={process_id}'])
    procs.append(subprocess.Popen(
        command, cwd=conftest.REPO, env=conftest.subprocess_env(2),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  try:
    outputs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  single, multi = _train_losses(tmp_path / 'single'), _train_losses(
      tmp_path / 'multi')
  assert sorted(multi) == sorted(single)
  np.testing.assert_allclose([multi[s] for s in single], list(single.values()),
                             rtol=2e-5, atol=1e-6)


@pytest.mark.slow
def test_killed_and_resumed_run_ends_with_the_same_parameters(tmp_path):
  overrides = dict(train__num_steps=60, train__checkpoint_every_steps=5,
                   train__log_every_steps=5)
  conftest.run_main(tmp_path / 'straight', **overrides)
  killed = tmp_path / 'killed'
  proc = subprocess.Popen(conftest.main_command(killed, **overrides),
                          cwd=conftest.REPO, env=conftest.subprocess_env(1),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  # Kill as soon as a first checkpoint is complete (Orbax renames it when done).
  first = killed / 'checkpoints' / 'latest' / '5'
  deadline = time.time() + 240
  while not first.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  interrupted_at = checkpoint.Checkpointer(str(killed)).latest_step()
  assert interrupted_at is not None and interrupted_at < 60, (
      'the run finished before it could be killed; make it longer')
  conftest.run_main(killed, **overrides)
  # Steps logged after the checkpoint and before the kill were trained again:
  # reports see each (step, split) once.
  keys = [(e['step'], e['split']) for e in workdir_lib.read_metrics(killed)]
  assert len(keys) == len(set(keys))
  a, step_a = checkpoint.load_state_arrays(tmp_path / 'straight')
  b, step_b = checkpoint.load_state_arrays(killed)
  assert step_a == step_b == 60
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6,
                                                       atol=1e-7), a, b)


def test_unknown_config_key_fails_and_writes_nothing(tmp_path):
  workdir = tmp_path / 'run'
  proc = conftest.run_main(workdir, check=False,
                           extra=['--config.model.no_such_key=3'])
  assert proc.returncode != 0
  assert 'no_such_key' in proc.stderr
  assert not workdir.exists()


def test_incompatible_checkpoint_is_refused_and_left_untouched(tmp_path):
  conftest.run_main(tmp_path, train__num_steps=2)
  before = _tree_hash(tmp_path / 'checkpoints')
  proc = conftest.run_main(tmp_path, check=False, train__num_steps=2,
                           model__features=(8, 16, 32))
  assert proc.returncode == 1
  assert 'incompatible' in proc.stderr and 'config.model.features' in proc.stderr
  assert _tree_hash(tmp_path / 'checkpoints') == before


def test_unwritable_workdir_gives_a_clear_error(tmp_path, tiny):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(PermissionError, match='Cannot write to workdir'):
    train.train_and_evaluate(tiny(), str(blocker / 'run'))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(
    tmp_path, tiny, monkeypatch):
  original = steps.make_train_step

  def poisoned_make_train_step(*args, **kwargs):
    step_fn = original(*args, **kwargs)

    def poisoned(state, batch, rng):
      new_state, metrics = step_fn(state, batch, rng)
      # From the 4th update on, parameters become NaN (as after a blow-up).
      params = jax.tree.map(lambda p: jnp.where(state.step >= 3, jnp.nan, p),
                            new_state.params)
      metrics['l2_params'] = jnp.sqrt(sum(
          jnp.sum(p**2) for p in jax.tree.leaves(params)))
      return new_state.replace(params=params), metrics

    return poisoned

  monkeypatch.setattr(steps, 'make_train_step', poisoned_make_train_step)
  config = tiny(train__checkpoint_every_steps=2, train__num_steps=8)
  with pytest.raises(train.NonFiniteLossError, match='step 4'):
    train.train_and_evaluate(config, str(tmp_path))
  state, step = checkpoint.load_state_arrays(str(tmp_path))
  assert step == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state['params']))
