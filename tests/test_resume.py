"""`python -m medseg_jax.main` on an existing workdir: one recipe, one writer, valid values."""

import hashlib
import os
import subprocess
import time

from medseg_jax import workdir as workdir_lib
from tests import conftest

RUN = dict(train__num_steps=4, train__checkpoint_every_steps=2)


def _hashes(workdir):
  """sha256 of every file under `workdir`, by relative path."""
  result = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        result[os.path.relpath(path, workdir)] = hashlib.sha256(
            f.read()).hexdigest()
  return result


def test_resume_with_another_split_or_data_is_refused_and_changes_nothing(
    tmp_path):
  conftest.run_main(tmp_path, **RUN)
  before = _hashes(tmp_path)
  config_json = (tmp_path / 'config.json').read_bytes()
  proc = conftest.run_main(tmp_path, check=False, data__split_seed=1,
                           data__synthetic__num_patients=14,
                           optim__lr=0.01, **RUN)
  assert proc.returncode == 1
  for line in ('config.data.split_seed: 0 -> 1',
               'config.data.synthetic.num_patients: 12 -> 14',
               'config.optim.lr: 0.002 -> 0.01'):
    assert line in proc.stderr, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert _hashes(tmp_path) == before  # config.json, checkpoints, metrics.
  # Result-neutral keys may change: the finished run reports and exits 0.
  conftest.run_main(tmp_path, data__prefetch_buffer_size=1,
                    train__progress_bar=True,
                    **RUN)
  assert (tmp_path / 'config.json').read_bytes() == config_json


def test_second_writer_is_refused_at_once_while_the_first_finishes(tmp_path):
  long_run = dict(train__num_steps=200, train__checkpoint_every_steps=50,
                  train__log_every_steps=50)
  first = subprocess.Popen(
      conftest.main_command(tmp_path, **long_run), cwd=conftest.REPO,
      env=conftest.subprocess_env(), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 120
    lock = tmp_path / workdir_lib.LOCK_NAME
    while not lock.exists() and time.time() < deadline:
      assert first.poll() is None, first.communicate()[1][-2000:]
      time.sleep(0.05)
    second = conftest.run_main(tmp_path, check=False, **long_run)
    assert first.poll() is None, 'the first run ended too soon; lengthen it'
    out, err = first.communicate(timeout=300)
  finally:
    first.kill()
  assert second.returncode == 1
  [line] = [l for l in second.stderr.splitlines() if l.startswith('error:')]
  assert f'in use by PID {first.pid} on host' in line and '(training)' in line
  assert first.returncode == 0, err[-2000:]
  # One history: the refused run wrote nothing into metrics.jsonl.
  records = workdir_lib.read_metrics(str(tmp_path), keep_resumes=True)
  keys = [(r['step'], r['split']) for r in records]
  assert len(keys) == len(set(keys)) and (200, 'val') in keys
  assert not os.path.exists(tmp_path / workdir_lib.LOCK_NAME)


def test_invalid_values_are_named_before_anything_is_written(tmp_path):
  workdir = tmp_path / 'run'
  proc = conftest.run_main(workdir, check=False, train__batch_size=0,
                           train__num_steps=0, train__num_epochs=0,
                           extra=['--config.optim.lr=inf'])
  assert proc.returncode == 1
  for text in ('config.train.batch_size=0', 'config.optim.lr=inf',
               'config.train.num_steps=0 and config.train.num_epochs=0'):
    assert text in proc.stderr, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert not workdir.exists()
