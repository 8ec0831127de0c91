"""One benchmark subject in its own process, driven over stdin/stdout.

`scripts/benchmark.py` starts one worker per subject (the JAX side with this
repository's Python, the PyTorch/MONAI side with `--torch_python`) and sends
it one JSON command per line; the worker answers one JSON line per command:

    {"op": "setup", "case": {...}, "subject": {...}}  -> {"info": {...}}
    {"op": "run", "units": n}                         -> {"units": [[wall, cpu], ...]}
    {"op": "finish"}                                  -> {"info": {...}}

A worker that waits for its next command uses no CPU, so timed blocks of
several subjects can alternate without competing for the machine. This file
imports only the standard library at the top, so it runs in either venv.

    python scripts/_bench_worker.py jax      # or: torch
"""

import json
import os
import resource
import sys
import time
import traceback

# Run from anywhere: the sibling scripts and the repository root.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]


def peak_rss_mib() -> float:
  """Returns this process's peak resident memory in MiB (Linux ru_maxrss)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_units(unit, count: int) -> list[list[float]]:
  """Runs `unit()` `count` times; returns [[wall s, process CPU s], ...]."""
  out = []
  for _ in range(count):
    wall, cpu = time.perf_counter(), time.process_time()
    unit()
    out.append([time.perf_counter() - wall, time.process_time() - cpu])
  return out


def _backend(framework: str):
  """Returns the module whose `setup(case, subject)` builds a subject."""
  if framework == 'jax':
    import _bench_jax  # pylint: disable=import-outside-toplevel
    return _bench_jax
  import _bench_torch  # pylint: disable=import-outside-toplevel
  return _bench_torch


def serve(framework: str, stdin=sys.stdin, stdout=sys.stdout) -> None:
  """Answers commands until 'finish' or the end of stdin.

  Args:
    framework: 'jax' or 'torch'.
    stdin, stdout: the command and answer streams (one JSON per line).
  """
  subject = None
  for line in stdin:
    command = json.loads(line)
    try:
      if command['op'] == 'setup':
        subject = _backend(framework).setup(command['case'], command['subject'])
        answer = {'info': subject.info}
      elif command['op'] == 'run':
        answer = {'units': time_units(subject.unit, int(command['units']))}
      else:
        info = dict(subject.finish() if subject else {})
        info['peak_rss_mib'] = round(peak_rss_mib())
        answer = {'info': info}
    except Exception as error:  # pylint: disable=broad-except
      traceback.print_exc(file=sys.stderr)
      answer = {'error': f'{type(error).__name__}: {error}'.splitlines()[0]}
    stdout.write(json.dumps(answer) + '\n')
    stdout.flush()
    if command['op'] == 'finish' or 'error' in answer:
      return


if __name__ == '__main__':
  serve(sys.argv[1])
