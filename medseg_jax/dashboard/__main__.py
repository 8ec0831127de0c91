"""`python -m medseg_jax.dashboard --workdir=W [--workdir=W2 --ensemble]`.

Other flags: --port (8501), --address (127.0.0.1), --checkpoint (best).

Checks the arguments (one `error: ...` line and exit code 2 when they cannot
work), then replaces this process by the Streamlit server of `app.py`, so
stopping this process stops the server.
"""

import os
import sys

from medseg_jax.dashboard import cli

APP = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'app.py')


def main(argv=None) -> int:
  """Checks the arguments and starts the server (does not return then).

  Args:
    argv: arguments without the program name; sys.argv[1:] when None.

  Returns:
    2 when the arguments are refused (the server is not started).
  """
  args = cli.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    cli.check_args(args)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  command = cli.streamlit_argv(sys.executable, APP, args)
  print(f'Serving the dashboard on http://{args.address}:{args.port}',
        flush=True)
  os.execv(command[0], command)
  return 0  # Not reached.


if __name__ == '__main__':
  sys.exit(main())
