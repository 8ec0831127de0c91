"""Command-line arguments of the dashboard and the checks made before it starts.

`__main__` checks them and hands them to `streamlit run app.py -- ARGS`; the
app parses the same arguments again with `parse_args`, so both sides agree.
"""

import argparse
import os

from medseg_jax import checkpoint as checkpoint_lib
from medseg_jax import workdir as workdir_lib

CHECKPOINTS = ('best', 'latest')


def parse_args(argv) -> argparse.Namespace:
  """Returns the dashboard's arguments.

  Args:
    argv: the arguments without the program name, e.g.
      ['--workdir=runs/x', '--port', '8600'].

  Returns:
    Namespace(workdir=[...], ensemble, port, address, checkpoint);
    `--workdir` may be repeated or given as a comma-separated list.
  """
  parser = argparse.ArgumentParser(
      prog='python -m medseg_jax.dashboard',
      description='Web dashboard: upload images or volumes, see the '
      'segmentation of a trained run.')
  parser.add_argument('--workdir', action='append', default=[],
                      help='a trained run (repeat for a model picker)')
  parser.add_argument('--ensemble', action='store_true',
                      help='also offer the mean of all runs\' probabilities')
  parser.add_argument('--port', type=int, default=8501)
  parser.add_argument('--address', default='127.0.0.1',
                      help='interface to serve on (0.0.0.0: every network)')
  parser.add_argument('--checkpoint', choices=CHECKPOINTS, default='best')
  args = parser.parse_args(argv)
  args.workdir = [w for item in args.workdir for w in item.split(',') if w]
  return args


def _check_workdir(workdir: str, which: str) -> None:
  """Raises if `workdir` is not a trained run with a `which` checkpoint."""
  workdir_lib.saved_config_dict(workdir)  # FileNotFoundError naming it.
  directory = os.path.join(workdir, 'checkpoints', which)
  if not checkpoint_lib.step_numbers(directory):
    raise FileNotFoundError(
        f'--workdir={workdir!r} has no {which} checkpoint (nothing in '
        f'{directory}); train it first, or pass --checkpoint=latest.')


def check_args(args: argparse.Namespace) -> None:
  """Raises before the server starts if the arguments cannot work.

  Args:
    args: `parse_args` output.

  Raises:
    ValueError: no --workdir, a repeated one, a bad port, or --ensemble of
      fewer than two runs or of runs of different models.
    FileNotFoundError: a workdir without config.json or checkpoint.
  """
  if not args.workdir:
    raise ValueError('--workdir is required: the workdir of a trained run '
                     '(repeat it to offer several models).')
  if len(set(map(os.path.abspath, args.workdir))) != len(args.workdir):
    raise ValueError(f'--workdir lists a run twice: {args.workdir}.')
  if not 1 <= args.port <= 65535:
    raise ValueError(f'--port={args.port} is not a TCP port (1..65535).')
  for workdir in args.workdir:
    _check_workdir(workdir, args.checkpoint)
  if args.ensemble:
    if len(args.workdir) < 2:
      raise ValueError('--ensemble averages several runs: give two or more '
                       '--workdir of the same model.')
    config = workdir_lib.load_config(args.workdir[0])
    for other in args.workdir[1:]:
      workdir_lib.check_same_model(other, config)


def streamlit_argv(executable: str, app_path: str,
                   args: argparse.Namespace) -> list[str]:
  """Returns the argv that serves `app_path` with Streamlit for `args`.

  Args:
    executable: the Python interpreter.
    app_path: the Streamlit script.
    args: the checked arguments (passed on to the script after '--').

  Returns:
    `python -m streamlit run APP --server.* ... -- --workdir=... ...`.
  """
  script_args = [f'--workdir={w}' for w in args.workdir]
  script_args.append(f'--checkpoint={args.checkpoint}')
  if args.ensemble:
    script_args.append('--ensemble')
  return [
      executable, '-m', 'streamlit', 'run', app_path,
      f'--server.port={args.port}', f'--server.address={args.address}',
      '--server.headless=true', '--browser.gatherUsageStats=false',
      # The app's code does not change while it serves: no file watcher.
      '--server.fileWatcherType=none', '--server.runOnSave=false',
      '--client.toolbarMode=minimal', '--theme.base=light',
      '--theme.primaryColor=#0b6e99',
      '--', *script_args]
