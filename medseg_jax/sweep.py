"""`--mode=sweep`: train and evaluate every run of a sweep file, then aggregate.

    python -m medseg_jax.main --mode=sweep \
        --config=configs/sweeps/isic_fractions.py:cpu --workdir=runs/fractions

A sweep file has `get_config(arg)` (the base experiment) and `get_sweep(arg)`
(a list of {dotted key: value} overrides, one dict per run). `--config.KEY`
flags change the base of every run. Each run gets its own sub-workdir named
from its overrides (`model.name=unet, data.train_fraction=0.1` ->
`unet-train_fraction0.1`), with its full config written there as
config.json before it starts; it is then trained and evaluated on the test
split by `python -m medseg_jax.main --config=configs/run.py:<sub-workdir>`
in a subprocess, so a crash of one run does not stop the others and each
run's own lock and recipe check protect it. Then `sweep_report` writes
results.csv, results.md, plots and comparison.md into the sweep workdir,
and, when the sweep varies data.fold, `sweep_cv` evaluates the folds on
val and the fold ensembles on test and writes cv_summary.md/.json and
best.json.

Rerunning the same command skips finished runs (trained, and evaluated at
their best checkpoint), resumes interrupted ones and never retrains. Every
run is checked (keys, types, values, names, recipes of existing
sub-workdirs) before the first one starts. `--sweep_parallel=N` runs N at
once (each on its own GPU when there are GPUs); `--sweep_emit=slurm` writes
a SLURM array script whose task i runs `--sweep_index=i`.
"""

import concurrent.futures
import dataclasses
import importlib.util
import os
import re
import shlex
import subprocess
import sys

from medseg_jax import config_checks
from medseg_jax import config_lib
from medseg_jax import fileio
from medseg_jax import sweep_cv
from medseg_jax import sweep_report
from medseg_jax import workdir as workdir_lib

_NAME_CHARS = re.compile(r'[^A-Za-z0-9._=+-]+')


@dataclasses.dataclass
class Run:
  """One run of a sweep: its index, name, overrides, config and sub-workdir."""
  index: int
  name: str
  overrides: dict
  config: object
  workdir: str


def load_sweep(config_filename: str) -> list[dict]:
  """Returns `get_sweep(arg)` of a sweep file given as `path[:arg]`.

  Args:
    config_filename: the `--config` value, e.g. 'configs/sweeps/x.py:cpu'.

  Raises:
    ValueError: the file has no `get_sweep`, or it returns no list of dicts.
  """
  path, *arg = config_filename.split(':', 1)
  spec = importlib.util.spec_from_file_location('_medseg_jax_sweep_file', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_sweep'):
    raise ValueError(f'{path} has no get_sweep(arg): --mode=sweep needs a '
                     'sweep file (see configs/sweeps/), not a plain config '
                     'file.')
  sweep = module.get_sweep(*arg)
  if not isinstance(sweep, (list, tuple)) or not sweep or not all(
      isinstance(s, dict) for s in sweep):
    raise ValueError(f'{path}: get_sweep({", ".join(map(repr, arg))}) must '
                     'return a non-empty list of {dotted key: value} dicts.')
  return [dict(s) for s in sweep]


def _value_text(value) -> str:
  if isinstance(value, (tuple, list)):
    return 'x'.join(_value_text(v) for v in value)
  if isinstance(value, float):
    return f'{value:g}'
  return str(value)


def run_name(overrides: dict) -> str:
  """Returns a sub-workdir name from a run's overrides.

  `model.name` contributes its value; every other key its last part and its
  value: {'model.name': 'unet', 'data.train_fraction': 0.1} ->
  'unet-train_fraction0.1'. No overrides: 'base'.
  """
  parts = []
  for key, value in overrides.items():
    text = _value_text(value)
    parts.append(text if key == 'model.name' else key.split('.')[-1] + text)
  return _NAME_CHARS.sub('_', '-'.join(parts)) or 'base'


def _run_config(base, overrides: dict, index: int):
  """Returns the base config with one run's overrides, or raises naming them."""
  config = base
  for key, value in overrides.items():
    try:
      config = config_lib.with_overrides(config, {key: value})
    except ValueError as e:  # resolve_key: no such field.
      raise ValueError(f'Sweep run {index}, key {key!r}: {e}') from e
    except TypeError as e:  # ConfigDict: a value of another type.
      parent, leaf = config_lib.resolve_key(config, key)
      raise ValueError(
          f'Sweep run {index}, key {key!r}: {value!r} '
          f'({type(value).__name__}) does not fit the field, which holds '
          f'{parent[leaf]!r} ({type(parent[leaf]).__name__}).') from e
  problems = config_checks.config_problems(config)
  if problems:
    raise ValueError(f'Sweep run {index} ({overrides}): invalid config:\n' +
                     '\n'.join('  ' + p for p in problems))
  return config


def plan_runs(base, sweep: list[dict], workdir: str) -> list[Run]:
  """Builds and checks every run of a sweep, before any of them starts.

  Args:
    base: the base config (the sweep file's get_config, with --config.KEY).
    sweep: the list of overrides.
    workdir: the sweep workdir.

  Returns:
    The runs, in sweep order.

  Raises:
    ValueError: a key that names no config field, a value of the wrong type
      or an invalid value (naming the run index and key); two runs with the
      same sub-workdir name; a sub-workdir holding another recipe.
  """
  runs, seen = [], {}
  for index, overrides in enumerate(sweep):
    config = _run_config(base, overrides, index)
    name = run_name(overrides)
    if name in seen:
      raise ValueError(
          f'Sweep runs {seen[name]} and {index} would share the sub-workdir '
          f'{name!r} ({sweep[seen[name]]} vs {overrides}): make the runs '
          'differ in their overrides.')
    seen[name] = index
    runs.append(Run(index, name, overrides, config,
                    os.path.join(workdir, name)))
  for run in runs:
    try:
      workdir_lib.check_recipe(run.workdir, run.config)
    except ValueError as e:
      raise ValueError(f'Sweep run {run.index} ({run.name}): {e}') from e
  return runs


def _main_command(*args: str) -> list[str]:
  return [sys.executable, '-m', 'medseg_jax.main', *args]


def _run_logged(command: list[str], log_path: str, env: dict) -> int:
  """Runs a command, its output appended to `log_path`; returns its status."""
  with open(log_path, 'a') as log:
    log.write('$ ' + shlex.join(command) + '\n')
    log.flush()
    return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                          env=env, cwd=config_lib.REPO_ROOT,
                          check=False).returncode


def execute_run(run: Run, env: dict | None = None) -> str:
  """Trains (or resumes) and evaluates one run in subprocesses.

  Args:
    run: the run; its config.json is written first (kept if present).
    env: environment variables to set for the run (e.g. its GPU).

  Returns:
    'done' (was already finished), 'finished', or an error line naming the
    step that failed and its log file.
  """
  if sweep_report.is_finished(run.workdir):
    return 'done'
  os.makedirs(run.workdir, exist_ok=True)
  workdir_lib.write_config(run.workdir, run.config)
  env = {**os.environ, **(env or {})}
  work = os.path.abspath(run.workdir)
  steps = (('train', _main_command(
      '--mode=train', f'--config={config_lib.RUN_CONFIG}:{work}',
      f'--workdir={work}')),
           ('evaluate', _main_command('--mode=evaluate', f'--workdir={work}',
                                      '--split=test')))
  for step, command in steps:
    if step == 'evaluate':
      fileio.write_text(
          os.path.join(run.workdir, sweep_report.TRAINED_MARKER), '')
    log = os.path.join(run.workdir, f'sweep_{step}.log')
    status = _run_logged(command, log, env)
    if status != 0:
      return f'{step} failed (exit {status}); see {log}'
  return 'finished'


def accelerator_count() -> int:
  """Returns the number of local GPUs, asked of JAX in a subprocess.

  A subprocess, so this process never initialises a GPU backend (it would
  take the memory the runs need). 0 on a CPU-only machine.
  """
  code = ('import jax; print(jax.default_backend(), jax.local_device_count())')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, check=False).stdout.split()
  return int(out[1]) if len(out) == 2 and out[0] == 'gpu' else 0


def slot_env(slot: int, parallel: int, gpus: int) -> dict[str, str]:
  """Returns the environment of run slot `slot` of `parallel`, given #GPUs.

  Slot k gets GPU k mod #GPUs (of those in $CUDA_VISIBLE_DEVICES, if set).
  When several slots share a GPU, each may take only its share of the GPU
  memory (JAX would otherwise preallocate 75 % of it per process), unless
  $XLA_PYTHON_CLIENT_MEM_FRACTION is set already. No GPUs: nothing set.
  """
  if not gpus:
    return {}
  visible = os.environ.get('CUDA_VISIBLE_DEVICES')
  ids = visible.split(',') if visible else [str(i) for i in range(gpus)]
  env = {'CUDA_VISIBLE_DEVICES': ids[slot % len(ids)]}
  per_gpu = -(-parallel // len(ids))
  if per_gpu > 1 and 'XLA_PYTHON_CLIENT_MEM_FRACTION' not in os.environ:
    env['XLA_PYTHON_CLIENT_MEM_FRACTION'] = f'{0.9 / per_gpu:.2f}'
  return env


def execute_all(runs: list[Run], parallel: int = 1) -> dict[str, str]:
  """Executes the runs, `parallel` at a time; returns {name: outcome}.

  With GPUs and parallel > 1, each run slot is pinned to a GPU (`slot_env`).
  """
  if parallel <= 1:
    outcomes = {}
    for run in runs:
      print(f'[{run.index + 1}/{len(runs)}] {run.name}', flush=True)
      outcomes[run.name] = execute_run(run)
      print(f'  {run.name}: {outcomes[run.name]}', flush=True)
    return outcomes
  gpus = accelerator_count()
  slots = list(range(parallel))
  outcomes = {}

  def task(run):
    slot = slots.pop(0)  # list.pop is atomic under the GIL.
    try:
      return execute_run(run, slot_env(slot, parallel, gpus))
    finally:
      slots.append(slot)

  with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
    futures = {pool.submit(task, run): run for run in runs}
    for future in concurrent.futures.as_completed(futures):
      run = futures[future]
      outcomes[run.name] = future.result()
      print(f'  {run.name}: {outcomes[run.name]}', flush=True)
  return {run.name: outcomes[run.name] for run in runs}


def slurm_script(runs: list[Run], argv: list[str], workdir: str) -> str:
  """Returns a SLURM array script; task i runs this command, --sweep_index=i.

  Args:
    runs: the planned runs.
    argv: this process's command line (its --sweep_* flags are replaced).
    workdir: the sweep workdir (logs go to WORKDIR/slurm/).
  """
  keep = [a for a in argv[1:] if not re.match(
      r'^--?sweep_(emit|index|parallel)(=|$)', a)]
  command = shlex.join([sys.executable, '-m', 'medseg_jax.main', *keep])
  logs = os.path.join(os.path.abspath(workdir), 'slurm')
  lines = [
      '#!/bin/bash',
      f'#SBATCH --job-name=sweep-{os.path.basename(os.path.abspath(workdir))}',
      f'#SBATCH --array=0-{len(runs) - 1}',
      '#SBATCH --gres=gpu:1',
      f'#SBATCH --output={logs}/%A_%a.out',
      '# One run per array task:',
      *[f'#   {r.index}: {r.name}' for r in runs],
      '# After the array finishes, the same command without --sweep_index '
      'aggregates (finished runs are skipped):',
      f'#   {command}',
      f'cd {shlex.quote(os.getcwd())}',  # Relative paths in the command.
      f'{command} --sweep_index=$SLURM_ARRAY_TASK_ID',
  ]
  return '\n'.join(lines) + '\n'


def run_sweep(base, config_filename: str, workdir: str, parallel: int = 1,
              emit: str | None = None, index: int | None = None,
              argv=()) -> dict[str, str]:
  """The whole of `--mode=sweep`.

  Args:
    base: the base config (`--config` with its --config.KEY overrides).
    config_filename: the `--config` value ('path:arg'), for get_sweep.
    workdir: the sweep workdir.
    parallel: runs at once.
    emit: 'slurm' to write WORKDIR/sweep.slurm and return.
    index: run only this run (a SLURM array task); no aggregation.
    argv: the command line, for the SLURM script.

  Returns:
    {run name: outcome} of the runs executed ({} when emitting).

  Raises:
    ValueError: a bad sweep (nothing started), a bad --sweep_index, or runs
      that failed (after the others ran and the results were aggregated).
  """
  runs = plan_runs(base, load_sweep(config_filename), workdir)
  os.makedirs(workdir, exist_ok=True)
  if emit == 'slurm':
    path = os.path.join(workdir, 'sweep.slurm')
    os.makedirs(os.path.join(workdir, 'slurm'), exist_ok=True)
    fileio.write_text(path, slurm_script(runs, list(argv), workdir))
    print(f'Wrote {path} ({len(runs)} array tasks). Submit: sbatch {path}')
    return {}
  if index is not None:
    if not 0 <= index < len(runs):
      raise ValueError(f'--sweep_index={index}: the sweep has {len(runs)} runs '
                       f'(0..{len(runs) - 1}).')
    outcome = execute_run(runs[index])
    print(f'{runs[index].name}: {outcome}')
    if outcome not in ('done', 'finished'):
      raise ValueError(f'Sweep run {index} ({runs[index].name}): {outcome}')
    return {runs[index].name: outcome}
  with workdir_lib.acquire_lock(workdir, '--mode=sweep'):
    outcomes = execute_all(runs, parallel)
    # CV: fold runs on val, fold and pair ensembles (finished ones skipped).
    outcomes.update(sweep_cv.run_cv_evaluations(runs, _run_logged))
    sweep_report.write_reports(runs, workdir)
    cv = sweep_cv.write_cv_reports(runs, workdir)
  failed = {n: o for n, o in outcomes.items() if o not in ('done', 'finished')}
  print(f'Results in {os.path.abspath(workdir)}: results.csv, results.md, '
        'comparison.md, plots' +
        (', cv_summary.md/.json, best.json.' if cv else '.'))
  if failed:
    raise ValueError(f'{len(failed)} of {len(runs)} sweep runs failed:\n' +
                     '\n'.join(f'  {n}: {o}' for n, o in failed.items()) +
                     '\nFix them and rerun the same command: finished runs '
                     'are skipped.')
  return outcomes
