"""The workdir contract without training: lock, recipe check, metrics log, config values."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from medseg_jax import config_checks
from medseg_jax import workdir as workdir_lib
from tests import conftest


# --- One writer -------------------------------------------------------------


def test_second_lock_holder_is_refused_with_pid_host_and_purpose(tmp_path):
  with workdir_lib.acquire_lock(str(tmp_path), 'training') as path:
    record = json.loads(open(path).read())
    assert record['pid'] == os.getpid()
    with pytest.raises(workdir_lib.WorkdirInUseError) as info:
      with workdir_lib.acquire_lock(str(tmp_path), 'evaluation'):
        pass
  message = str(info.value)
  assert '\n' not in message
  assert f'PID {os.getpid()} on host {socket.gethostname()}' in message
  assert '(training)' in message and str(tmp_path) in message
  # Released: the file is gone (a refused run leaves its workdir empty) and
  # the lock can be taken again.
  assert os.listdir(tmp_path) == []
  with workdir_lib.acquire_lock(str(tmp_path), 'again'):
    pass


def test_lock_of_a_killed_process_is_not_stale(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, '-c',
       'import sys, time\n'
       'from medseg_jax import workdir\n'
       'with workdir.acquire_lock(sys.argv[1], "training"):\n'
       '  print("locked", flush=True)\n'
       '  time.sleep(60)\n', str(tmp_path)],
      cwd=conftest.REPO, env=conftest.subprocess_env(), stdout=subprocess.PIPE,
      text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(workdir_lib.WorkdirInUseError,
                       match=f'PID {holder.pid} '):
      with workdir_lib.acquire_lock(str(tmp_path), 'training'):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # The lock file is still there (SIGKILL ran no clean-up), the lock is not.
  assert os.path.exists(tmp_path / workdir_lib.LOCK_NAME)
  with workdir_lib.acquire_lock(str(tmp_path), 'training'):
    pass


# --- One recipe ---------------------------------------------------------------


def _dict(config):
  return workdir_lib.config_as_json_dict(config)


def test_result_neutral_keys_exist_and_only_they_may_differ(tiny):
  base = tiny()
  flat = workdir_lib._flatten(_dict(base), '')
  for key in workdir_lib.RESULT_NEUTRAL_KEYS:
    assert any(k[1:] == key or k[1:].startswith(key + '.') for k in flat), key
  neutral = tiny(train__progress_bar=True, train__log_every_steps=7,
                 data__prefetch_buffer_size=1, data__cache='none', eval__tta=True,
                 eval__postprocess__min_size=5, eval__batch_size=8,
                 eval__nsd_tolerance_mm=1.0, export__quantize='int8')
  assert workdir_lib.recipe_differences(_dict(base), _dict(neutral)) == []
  changed = tiny(data__split_seed=1, optim__lr=0.5, train__num_steps=9,
                 eval__threshold=0.3, model__features=(4, 8, 32),
                 data__worker_count=1)
  assert [key for key, _, _ in workdir_lib.recipe_differences(
      _dict(base), _dict(changed))] == [
          'data.split_seed', 'data.worker_count', 'eval.threshold',
          'model.features', 'optim.lr', 'train.num_steps']


def test_changed_recipe_is_refused_naming_every_key_and_nothing_changes(
    tmp_path, tiny):
  workdir = str(tmp_path)
  assert workdir_lib.write_config(workdir, tiny())
  before = (tmp_path / 'config.json').read_bytes()
  workdir_lib.check_recipe(workdir, tiny(data__prefetch_buffer_size=1))
  with pytest.raises(ValueError) as info:
    workdir_lib.check_recipe(workdir, tiny(data__split_seed=1,
                                           data__synthetic__num_patients=20))
  message = str(info.value)
  assert 'config.data.split_seed: 0 -> 1' in message
  assert 'config.data.synthetic.num_patients: 12 -> 20' in message
  # config.json is the first start's, never rewritten.
  assert not workdir_lib.write_config(workdir, tiny(data__split_seed=1))
  assert (tmp_path / 'config.json').read_bytes() == before


def test_checkpoints_without_config_json_are_refused(tmp_path, tiny):
  (tmp_path / 'checkpoints' / 'best' / '4').mkdir(parents=True)
  with pytest.raises(ValueError, match='no config.json'):
    workdir_lib.check_recipe(str(tmp_path), tiny())


# --- metrics.jsonl ------------------------------------------------------------


def test_read_metrics_skips_a_partial_last_line_and_retrained_steps(tmp_path):
  log = workdir_lib.MetricsLog(str(tmp_path))
  for step in range(1, 6):
    log.write(step, 'train', {'loss': step})
  log.write(4, 'val', {'dice': 0.1})
  with open(log.path, 'a') as f:
    f.write('{"step": 6, "split": "tr')  # Cut off by a crash.
  # The run resumes from its checkpoint at step 3 and trains 4 and 5 again.
  log.start(3)
  with open(log.path) as f:
    assert f.read().count('"tr\n') == 0  # The partial line was removed.
  for step in (4, 5):
    log.write(step, 'train', {'loss': 10 * step})
  records = workdir_lib.read_metrics(str(tmp_path))
  assert [(r['step'], r['split']) for r in records] == [
      (1, 'train'), (2, 'train'), (3, 'train'), (4, 'train'), (5, 'train')]
  assert [r['loss'] for r in records] == [1, 2, 3, 40, 50]
  markers = [r for r in workdir_lib.read_metrics(str(tmp_path), True)
             if r['split'] == workdir_lib.RESUME_SPLIT]
  assert [m['step'] for m in markers] == [3]
  # A partial last line written after that is skipped by readers too.
  with open(log.path, 'a') as f:
    f.write('{"step": 6, "spl')
  assert len(workdir_lib.read_metrics(str(tmp_path))) == 5


def test_read_metrics_names_a_bad_line_in_the_middle(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text(
      '{"step": 1, "split": "train"}\nnot json\n{"step": 2, "split": "train"}\n')
  with pytest.raises(ValueError, match='metrics.jsonl, line 2'):
    workdir_lib.read_metrics(str(tmp_path))


# --- Full disk -----------------------------------------------------------------


def test_disk_full_is_recognised_in_every_form_and_said_in_one_line(tmp_path):
  assert workdir_lib.is_disk_full(OSError(errno.ENOSPC, 'No space'))
  try:
    try:
      raise ValueError('RESOURCE_EXHAUSTED: Error writing local file')
    except ValueError as inner:
      raise RuntimeError('save failed') from inner
  except RuntimeError as outer:
    assert workdir_lib.is_disk_full(outer)
  assert not workdir_lib.is_disk_full(OSError(errno.EACCES, 'denied'))
  error = workdir_lib.disk_full_error(str(tmp_path), 50 * 2**20, 40)
  assert isinstance(error, ValueError)  # main prints it as `error: ...`.
  message = str(error)
  assert '\n' not in message and str(tmp_path) in message
  assert 'about 50.0 MiB' in message and 'step 40 is intact' in message


# --- Config values ----------------------------------------------------------------


def test_every_shipped_config_is_valid():
  sys.path.insert(0, conftest.REPO)
  import importlib  # pylint: disable=import-outside-toplevel
  for name in ('default', 'unet', 'unetpp', 'unet3d', 'transunet'):
    module = importlib.import_module(f'configs.{name}')
    for arg in (None, 'cpu'):
      assert config_checks.config_problems(module.get_config(arg)) == [], name


def test_bad_values_are_all_named_with_their_values(tiny):
  config = tiny(train__batch_size=0, train__num_steps=0, train__num_epochs=0,
                optim__lr=float('inf'), data__val_fraction=-0.1,
                eval__batch_size=-4)
  with pytest.raises(ValueError) as info:
    config_checks.validate_config(config)
  message = str(info.value)
  for text in ('config.train.batch_size=0', 'config.optim.lr=inf',
               'config.data.val_fraction=-0.1', 'config.eval.batch_size=-4',
               'config.train.num_steps=0 and config.train.num_epochs=0'):
    assert text in message, text
  assert config_checks.config_problems(tiny()) == []
