"""Shared fixtures: a tiny config and a runner for `python -m medseg_jax.main`."""

import os
import subprocess
import sys

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One persistent XLA cache for the whole suite, in-process and in the
# subprocesses it starts: runs of the same program compile once.
COMPILATION_CACHE = os.environ.setdefault(
    'JAX_COMPILATION_CACHE_DIR',
    os.path.join(os.environ.get('TMPDIR', '/tmp'), 'medseg_jax_test_xla_cache'))
jax.config.update('jax_compilation_cache_dir', COMPILATION_CACHE)

# Overrides that shrink configs/unetpp.py:cpu to seconds per run on 2 cores.
TINY_OVERRIDES = {
    'data.image_size': 32,
    'data.synthetic.num_patients': 12,
    'data.synthetic.images_per_patient': 2,
    'model.features': (4, 8, 16),
    'train.batch_size': 4,
    'train.num_steps': 6,
    'train.log_every_steps': 1,
    'train.eval_every_epochs': 100.0,
    'train.progress_bar': False,
    # TensorBoard has its own tests (test_tensorboard.py); elsewhere its
    # overlay predict would only add a compile to every tiny run.
    'train.tensorboard': False,
    'eval.batch_size': 4,
}


def set_fields(config, overrides):
  """Sets `{'a__b': value}` (or 'a.b') fields of a ConfigDict in place."""
  for key, value in overrides.items():
    *parents, leaf = key.replace('__', '.').split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def tiny_config(**overrides):
  """Returns configs/unetpp.py:cpu shrunk by TINY_OVERRIDES, then `overrides`.

  Keys use '__' for '.', e.g. tiny_config(train__num_steps=3).
  """
  sys.path.insert(0, REPO)
  from configs import unetpp  # pylint: disable=import-outside-toplevel
  config = unetpp.get_config('cpu')
  values = dict(TINY_OVERRIDES)
  values.update({k.replace('__', '.'): v for k, v in overrides.items()})
  return set_fields(config, values)


def _flag(key, value):
  if isinstance(value, tuple):
    value = '(' + ','.join(map(str, value)) + (',)' if len(value) == 1 else ')')
  return f'--config.{key}={value}'


def main_command(workdir, config_arg='configs/unetpp.py:cpu', extra=(),
                 **overrides):
  """Returns the argv of `python -m medseg_jax.main` with tiny overrides."""
  values = dict(TINY_OVERRIDES)
  values.update({k.replace('__', '.'): v for k, v in overrides.items()})
  return [sys.executable, '-m', 'medseg_jax.main', f'--config={config_arg}',
          f'--workdir={workdir}', *[_flag(k, v) for k, v in values.items()],
          *extra]


def subprocess_env(num_devices=1):
  """Returns an environment forcing `num_devices` CPU devices for JAX."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={num_devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  return env


def run_main(workdir, num_devices=1, check=True, timeout=300, **kwargs):
  """Runs `python -m medseg_jax.main` in a subprocess; returns CompletedProcess."""
  proc = subprocess.run(main_command(workdir, **kwargs), cwd=REPO,
                        env=subprocess_env(num_devices), capture_output=True,
                        text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f'main failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
  return proc


def run_main_mode(workdir, mode, *flags, check=True, timeout=300):
  """Runs `--mode=MODE --workdir=W FLAGS` on a trained run (its config.json).

  Returns the CompletedProcess; with `check`, a non-zero exit fails the test
  and shows the ends of stdout and stderr.
  """
  proc = subprocess.run(
      [sys.executable, '-m', 'medseg_jax.main', f'--mode={mode}',
       f'--workdir={workdir}', *flags], cwd=REPO, env=subprocess_env(1),
      capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f'--mode={mode} failed ({proc.returncode}):\n'
                         f'{proc.stdout[-2000:]}{proc.stderr[-4000:]}')
  return proc


# Two tiny trained runs shared by the evaluate/predict/Predictor tests, both
# with dropout (for MC dropout). 2D: 24 images (12 patients x 2), 16/4/4
# train/val/test, 4 steps per epoch: validation and checkpoints at steps 4
# and 6.
RUN_2D = dict(model__dropout_rate=0.2, train__eval_every_epochs=1.0)
# 3D on patches (sliding windows): 6 patients, 4/1/1 train/val/test; one
# channel, so DICOM series fit.
RUN_3D = dict(
    config_arg='configs/unet3d.py:cpu', data__synthetic3d__num_patients=6,
    data__synthetic3d__volume_size=(16, 32, 32), data__patch_size=(8, 16, 16),
    model__features=(4, 8), model__dropout_rate=0.2, train__num_steps=3,
    train__batch_size=2, eval__batch_size=2, data__in_channels=1,
    data__synthetic3d__in_channels=1)


@pytest.fixture(scope='session')
def run2d(tmp_path_factory):
  """The workdir of the tiny 2D run (RUN_2D), trained once per session."""
  workdir = tmp_path_factory.mktemp('run2d')
  run_main(workdir, **RUN_2D)
  return workdir


@pytest.fixture(scope='session')
def run3d(tmp_path_factory):
  """The workdir of the tiny 3D patch run (RUN_3D), trained once per session."""
  workdir = tmp_path_factory.mktemp('run3d')
  run_main(workdir, **RUN_3D)
  return workdir


@pytest.fixture
def tiny():
  """The tiny config factory."""
  return tiny_config
