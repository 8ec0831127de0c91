"""The config of a trained run: its config.json merged over configs/default.py.

evaluate and predict use it when --config is left out (main.py passes
`--config=configs/run.py:<workdir>`), so `--config.KEY=VALUE` flags change a
trained run's config as they change any config file:

    python -m medseg_jax.main --mode=evaluate --workdir=runs/x \
        --config=configs/run.py:runs/x --config.eval.tta=True

is what `--mode=evaluate --workdir=runs/x --config.eval.tta=True` runs.
"""

from medseg_jax import workdir


def get_config(run_workdir):
  """Returns the config the run in `run_workdir` was trained with.

  Keys added to configs/default.py after the run was trained get their
  default (`medseg_jax.config_lib.from_saved`).
  """
  if not run_workdir:
    raise ValueError('configs/run.py needs the workdir of a trained run: '
                     '--config=configs/run.py:runs/x.')
  return workdir.load_config(run_workdir)
