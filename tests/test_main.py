"""medseg_jax.main: flags -> mode -> call; mistakes on the command line are
one `error:` line, never a traceback."""

import subprocess
import sys

from tests import conftest


def _main(*flags):
  return subprocess.run([sys.executable, '-m', 'medseg_jax.main', *flags],
                        cwd=conftest.REPO, env=conftest.subprocess_env(1),
                        capture_output=True, text=True, timeout=120)


def _error(proc):
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  (line,) = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  return line


def test_config_flags_without_a_config_file_name_the_flag(tmp_path):
  line = _error(_main('--mode=train', f'--workdir={tmp_path / "w"}',
                      '--config.optim.lr=3e-4'))
  assert '--config.optim.lr needs --config' in line
  assert not (tmp_path / 'w').exists()


def test_evaluate_of_a_folder_that_is_no_run_says_so(tmp_path):
  line = _error(_main('--mode=evaluate', f'--workdir={tmp_path}',
                      '--config.eval.tta=True'))
  assert 'config.json does not exist' in line and str(tmp_path) in line
  line = _error(_main('--mode=evaluate', f'--workdir={tmp_path}'))
  assert 'config.json does not exist' in line
