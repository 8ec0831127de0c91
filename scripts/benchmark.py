r"""One benchmark for the whole stack: every row a ratio to PyTorch/MONAI.

    python scripts/benchmark.py --suite=cpu --torch_python=/tmp/venv-monai/bin/python
    python scripts/benchmark.py --suite=gpu          # on a GPU machine
    python scripts/benchmark.py --suite=gpu --dry_run --peak_tflops=1   # check on CPU

Runs on whatever device JAX finds and writes `<output_dir>/<device>.md` and
`<device>.json` (`cpu`, `nvidia-h100-80gb-hbm3`, ...). Rows: the train step
of the 2D U-Net and UNet++ at 256² and of the 3D U-Net at its recipe patch
(images or patches/s, compile time, memory, XLA FLOPs and, on an
accelerator, MFU against the device's peak bf16 FLOP/s); the input pipeline
with host vs device augmentation (host CPU seconds per training image); a
3D sliding-window inference; HD95 on 256×256×128 pairs.

Each subject (medseg_jax, MONAI eager, AMP bf16, torch.compile, ...) runs in
its own worker process (`_bench_worker.py`); the script alternates short
timed blocks of every subject of a row (in reversed order every other
round), so they see the same machine load, and reports medians. PyTorch +
MONAI come from another Python (`--torch_python`, or $MEDSEG_TORCH_PYTHON);
without one the table says so and has JAX rows only.

`--dry_run` runs the same rows with every shape, width and repeat count
shrunk, to check a suite end to end (e.g. the GPU suite on a CPU).
"""

import argparse
import datetime
import json
import os
import re
import subprocess
import sys

import _bench_suites as suites
import _bench_table as table

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path.insert(0, _ROOT)
from medseg_jax.models import cpu_conv  # pylint: disable=wrong-import-position


class Worker:
  """One subject's process: setup, timed blocks, finish (see _bench_worker)."""

  def __init__(self, python: str, framework: str, env: dict):
    self.proc = subprocess.Popen(
        [python, os.path.join(_HERE, '_bench_worker.py'), framework],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        cwd=_ROOT)

  def ask(self, command: dict) -> dict:
    """Sends one command; returns its answer (an 'error' key on failure)."""
    try:
      self.proc.stdin.write(json.dumps(command) + '\n')
      self.proc.stdin.flush()
      line = self.proc.stdout.readline()
    except BrokenPipeError:
      line = ''
    if not line:
      return {'error': f'worker exited (code {self.proc.poll()}); see stderr'}
    return json.loads(line)

  def close(self) -> None:
    """Waits for the process (it exits after 'finish' or an error)."""
    try:
      self.proc.stdin.close()
      self.proc.wait(timeout=60)
    except (subprocess.TimeoutExpired, BrokenPipeError):
      self.proc.kill()


def worker_env() -> dict:
  """Returns the environment of a worker process."""
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      p for p in (_ROOT, env.get('PYTHONPATH', '')) if p)
  # JAX would take 75% of the GPU at start, leaving PyTorch's worker short.
  env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  # Compile times are measured, not read from a persistent cache.
  env['JAX_ENABLE_COMPILATION_CACHE'] = 'false'
  return env


def run_case(case: dict, pythons: dict, log=print) -> dict:
  """Runs one row: sets up every subject, alternates timed blocks, finishes.

  Args:
    case: a case of `_bench_suites` (kind, settings, subjects, repeats).
    pythons: {'jax': python, 'torch': python or None}.
    log: progress printer.

  Returns:
    The case with, per subject, 'info', 'units' ([[wall, cpu], ...]) or
    'error'.
  """
  result = dict(case, subjects=[dict(s) for s in case['subjects']])
  live = []
  for subject in result['subjects']:
    python = pythons.get(subject['framework'])
    if not python:
      subject['error'] = 'PyTorch/MONAI venv not given (--torch_python)'
      continue
    env = worker_env()
    if subject['framework'] == 'jax' and 'features' in case:
      # The convolution kernel main.py would pick for this model on CPU
      # (config.model.conv_impl='auto': Eigen from width 32 on).
      if cpu_conv.wants_eigen({'features': case['features']}):
        cpu_conv.prefer_eigen_convolutions(env)
    worker = Worker(python, subject['framework'], env)
    answer = worker.ask({'op': 'setup', 'case': case, 'subject': subject})
    if 'error' in answer:
      subject['error'] = answer['error']
      worker.close()
      log(f'  {subject["label"]}: {answer["error"]}')
      continue
    subject['info'], subject['units'] = answer['info'], []
    live.append((subject, worker))
  for r in range(case['repeats']):
    for subject, worker in (live if r % 2 == 0 else live[::-1]):
      if 'error' in subject:
        continue
      answer = worker.ask({'op': 'run', 'units': case['units_per_block']})
      if 'error' in answer:
        subject['error'] = answer['error']
      else:
        subject['units'] += answer['units']
  for subject, worker in live:
    if 'error' not in subject:
      answer = worker.ask({'op': 'finish'})
      subject['info'].update(answer.get('info', {}))
    worker.close()
  return result


def device_of(python: str) -> dict:
  """Returns JAX's device {'platform', 'device_kind'} as the workers see it."""
  code = ('import jax, json; d = jax.devices()[0]; print(json.dumps('
          '{"platform": d.platform, "device_kind": d.device_kind, '
          '"count": jax.device_count()}))')
  out = subprocess.run([python, '-c', code], capture_output=True, text=True,
                       check=True, env=worker_env())
  return json.loads(out.stdout.strip().splitlines()[-1])


def device_slug(device: dict) -> str:
  """Returns the file name of a device: 'cpu' or e.g. 'nvidia-h100-80gb-hbm3'."""
  if device['platform'] == 'cpu':
    return 'cpu'
  return re.sub(r'[^a-z0-9]+', '-', device['device_kind'].lower()).strip('-')


def torch_python(flag: str | None) -> tuple[str | None, str]:
  """Returns (the PyTorch/MONAI python or None, a sentence on where it came from)."""
  path = flag if flag is not None else os.environ.get('MEDSEG_TORCH_PYTHON', '')
  if not path or path == 'none':
    return None, ('No PyTorch/MONAI venv given (--torch_python or '
                  '$MEDSEG_TORCH_PYTHON): JAX rows only, no ratios.')
  try:
    check = subprocess.run([path, '-c', 'import torch, monai; print('
                            'torch.__version__, monai.__version__)'],
                           capture_output=True, text=True, check=False)
  except OSError:  # No such file, not executable.
    check = None
  if check is None or check.returncode != 0:
    return None, (f'{path} cannot import torch and monai: JAX rows only, '
                  'no ratios.')
  torch_v, monai_v = check.stdout.split()
  return path, f'PyTorch {torch_v} + MONAI {monai_v} from `{path}`.'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--suite', default=None, choices=suites.SUITES,
                      help='default: gpu on a GPU, else cpu')
  parser.add_argument('--torch_python', default=None,
                      help="Python with torch + MONAI; 'none' = JAX only")
  parser.add_argument('--output_dir', default=os.path.join(_ROOT, 'benchmarks'))
  parser.add_argument('--only', default='',
                      help='comma-separated row names (default: all)')
  parser.add_argument('--update', action='store_true',
                      help="keep the other rows of an existing <device>.json"
                      " (rerun some rows with --only)")
  parser.add_argument('--dry_run', action='store_true',
                      help='shrunk shapes and repeats: checks a suite runs')
  parser.add_argument('--peak_tflops', type=float, default=None,
                      help="the device's peak bf16 TFLOP/s (default: table)")
  args = parser.parse_args()

  device = device_of(sys.executable)
  suite = args.suite or ('cpu' if device['platform'] == 'cpu' else 'gpu')
  cases = suites.cases(suite)
  if args.only:
    names = set(args.only.split(','))
    unknown = names - {c['name'] for c in cases}
    if unknown:
      sys.exit(f'error: --only={args.only}: no row {sorted(unknown)} in suite '
               f'{suite}; rows: {", ".join(c["name"] for c in cases)}.')
    cases = [c for c in cases if c['name'] in names]
  if args.dry_run:
    cases = [suites.shrink(c) for c in cases]
  torch_path, torch_note = torch_python(args.torch_python)
  pythons = {'jax': sys.executable, 'torch': torch_path}
  peak = (args.peak_tflops if args.peak_tflops is not None else
          table.peak_bf16_tflops(device['device_kind']))
  print(f'{suite} suite on {device["device_kind"]}; {torch_note}')
  header = {
      'suite': suite, 'dry_run': args.dry_run,
      'date': _now(),
      'device': device, 'host_cores': os.cpu_count(),
      'peak_bf16_tflops': peak, 'torch': torch_note,
      'command': 'python ' + ' '.join([os.path.relpath(sys.argv[0], _ROOT),
                                       *sys.argv[1:]]),
  }
  os.makedirs(args.output_dir, exist_ok=True)
  stem = os.path.join(args.output_dir,
                      device_slug(device) + ('-dry_run' if args.dry_run else ''))
  kept = previous_rows(stem, cases) if args.update else []
  if kept:
    header['kept_rows'] = [r['name'] for r in kept]
  order = [c['name'] for c in suites.cases(suite)]
  results = []
  for case in cases:
    print(f'{case["name"]}: {case["setting"]}', flush=True)
    results.append(table.summarize(run_case(case, pythons), peak))
    results[-1]['date'] = _now()
    print(table.case_lines(results[-1]), flush=True)
    # After every row: a stopped run still leaves a well-formed page.
    header['rows_left'] = [c['name'] for c in cases[len(results):]]
    write(stem, header, sorted(
        kept + results, key=lambda r: order.index(r['name'])
        if r['name'] in order else len(order)))
  print(f'Written {stem}.md and {stem}.json.')


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime(
      '%Y-%m-%d %H:%M UTC')


def previous_rows(stem: str, cases: list[dict]) -> list[dict]:
  """Returns the rows of an earlier `stem`.json that `cases` does not rerun."""
  if not os.path.exists(stem + '.json'):
    return []
  with open(stem + '.json') as f:
    rows = json.load(f)['rows']
  rerun = {c['name'] for c in cases}
  return [r for r in rows if r['name'] not in rerun]


def write(stem: str, header: dict, results: list[dict]) -> None:
  """Writes `stem`.md and `stem`.json (each replaced whole, atomically)."""
  for path, text in ((stem + '.md', table.markdown(header, results)),
                     (stem + '.json', json.dumps(
                         {'header': header, 'rows': results}, indent=1))):
    with open(path + '.tmp', 'w') as f:
      f.write(text)
    os.replace(path + '.tmp', path)


if __name__ == '__main__':
  main()
