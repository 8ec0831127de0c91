r"""Entry point: `python -m medseg_jax.main --config=configs/unetpp.py --workdir=runs/x`.

Modes:
  train       (default) train, validate and checkpoint in --workdir; resumes.
  evaluate    metrics, report and plots of a trained run on --split, written
              to WORKDIR/eval/<split>/ (best checkpoint unless --checkpoint).
  predict     masks for the images/volumes at --input, written to --output.
  check_data  check the data set of --config and list every problem found.

Every config field can be overridden, e.g. `--config.optim.lr=3e-4`.
evaluate and predict use the run's config.json when --config is left out, and
`--config.KEY=VALUE` flags then change it, e.g.

  python -m medseg_jax.main --mode=predict --workdir=runs/x --input=in/ \
      --output=out/ --config.eval.mc_samples=20 --config.eval.tta=True

With --config (e.g. another data set for external validation) or overrides,
the model part must stay the run's.

For several processes (one per host, or several on one machine for testing)
pass --coordinator_address, --num_processes and --process_id, or let
`jax.distributed.initialize` find them on a cluster (SLURM, TPU pods).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from medseg_jax import overrides as overrides_lib
from medseg_jax import train
from medseg_jax import workdir as workdir_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/unetpp.py:cpu.',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
flags.DEFINE_enum('mode', 'train', ['train', 'evaluate', 'predict', 'check_data'],
                  'What to run.')
flags.DEFINE_string('split', 'test', 'evaluate: train, val, test or all.')
flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'],
                  'evaluate/predict: which checkpoint to load.')
flags.DEFINE_integer('step', None, 'evaluate/predict: load this step.')
flags.DEFINE_string('input', None, 'predict: an image, a NIfTI file, a DICOM '
                    'series folder, or a folder of those.')
flags.DEFINE_string('output', None, 'predict: folder for the masks.')
flags.DEFINE_list('ensemble', [], 'evaluate/predict: workdirs of other runs '
                  'of the same model (e.g. the other cross-validation folds) '
                  "whose probabilities are averaged with --workdir's.")
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0, for multi-process runs.')
flags.DEFINE_integer('num_processes', None, 'Number of JAX processes.')
flags.DEFINE_integer('process_id', None, 'Index of this JAX process.')

# (key, text) of the `--config.KEY=VALUE` flags given without --config; they
# change the run's config.json (evaluate/predict). Set by _parse_flags.
_RUN_OVERRIDES: list[tuple[str, str | None]] = []


def _unknown_key_error(argv, error) -> str:
  """Explains an unknown `--config.KEY` (config_flags raises a KeyError)."""
  path = next((a.split('=', 1)[1] for a in argv
               if a.startswith(('--config=', '-config='))), None)
  try:
    parser = config_flags.config_flags.ConfigFileFlagParser('config')
    config = parser.parse(path)
    for key, _ in overrides_lib.split_overrides(argv)[1]:
      overrides_lib.resolve_key(config, key)
  except ValueError as e:
    return str(e)
  except Exception:  # pylint: disable=broad-except
    pass  # The config file itself does not load: say what absl said.
  return f'a --config.KEY flag names no config field ({error}).'


def _parse_flags(argv):
  """absl's flag parsing, plus --config.* flags on the run's config.json."""
  if not overrides_lib.has_config_flag(argv):
    argv, overrides = overrides_lib.split_overrides(argv)
    _RUN_OVERRIDES[:] = overrides
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:  # config_flags: no such field.
    print(f'error: {_unknown_key_error(argv, e)}', file=sys.stderr)
    sys.exit(1)
  except OSError as e:  # config_flags: the --config file does not load.
    print(f'error: --config: {e}', file=sys.stderr)
    sys.exit(1)


def _check_config_loads() -> None:
  """Raises a clear error if the --config file did not load (config_flags
  defers that error to the first use of the config)."""
  if FLAGS.config is None:
    return
  try:
    FLAGS.config.keys()
  except OSError as e:
    raise ValueError(f'--config={FLAGS["config"].config_filename}: {e}') from e


def _initialize_distributed() -> None:
  """Starts JAX multi-process mode when asked for on the command line."""
  if FLAGS.num_processes and FLAGS.num_processes > 1:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)


def _enable_compilation_cache() -> None:
  """Keeps compiled programs on disk, so a resumed or repeated run skips compiling.

  Uses $JAX_COMPILATION_CACHE_DIR when set, else ~/.cache/medseg_jax/xla.
  """
  if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    jax.config.update('jax_compilation_cache_dir', os.path.join(
        os.path.expanduser('~'), '.cache', 'medseg_jax', 'xla'))


def _require(*names: str) -> None:
  """Raises a usage error naming the flags this mode needs and lacks."""
  missing = [f'--{n}' for n in names if FLAGS[n].value is None]
  if missing:
    raise app.UsageError(f'--mode={FLAGS.mode} needs {", ".join(missing)}.')


def _config():
  """Returns --config, or the run's config.json with the --config.* flags.

  evaluate/predict only; either way the model must be the run's.
  """
  if FLAGS.config is not None:
    workdir_lib.check_same_model(FLAGS.workdir, FLAGS.config)
    return FLAGS.config
  config = workdir_lib.load_config(FLAGS.workdir)
  if _RUN_OVERRIDES:
    overrides_lib.apply_overrides(config, _RUN_OVERRIDES)
    workdir_lib.check_same_model(FLAGS.workdir, config)
  return config


def _train() -> None:
  result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if jax.process_index() == 0:
    workdir = os.path.abspath(FLAGS.workdir)
    print(f'Done. Validation Dice {result["dice"]:.4f} (best '
          f'{result["best_dice"]:.4f}), IoU {result["iou"]:.4f}, '
          f'sensitivity {result["sensitivity"]:.4f}, specificity '
          f'{result["specificity"]:.4f}.\nResults in {workdir}: '
          'config.json, metrics.jsonl, checkpoints/{latest,best}/.\n'
          f'Next: python -m medseg_jax.main --mode=evaluate --workdir={workdir}')


def _run_mode() -> None:
  """Dispatches on --mode (imports are per mode: each pulls in only its own)."""
  _check_config_loads()
  if _RUN_OVERRIDES and FLAGS.mode not in ('evaluate', 'predict'):
    raise app.UsageError(
        f'--config.{_RUN_OVERRIDES[0][0]} without --config: --mode='
        f'{FLAGS.mode} needs --config (only evaluate and predict change the '
        "run's config.json).")
  if FLAGS.mode == 'train':
    _require('config', 'workdir')
    _train()
  elif FLAGS.mode == 'check_data':
    _require('config')
    from medseg_jax.data import check  # pylint: disable=import-outside-toplevel
    problems = check.check_dataset(FLAGS.config.data)
    print(check.format_problems(problems, FLAGS.config.data.get('root', '')))
    if problems:
      sys.exit(1)
  elif FLAGS.mode == 'evaluate':
    _require('workdir')
    from medseg_jax import evaluate  # pylint: disable=import-outside-toplevel
    evaluate.evaluate_run(_config(), FLAGS.workdir, split=FLAGS.split,
                          which=FLAGS.checkpoint, step=FLAGS.step,
                          ensemble=FLAGS.ensemble)
  elif FLAGS.mode == 'predict':
    _require('workdir', 'input', 'output')
    from medseg_jax import predict  # pylint: disable=import-outside-toplevel
    failures = predict.predict_paths(_config(), FLAGS.workdir, FLAGS.input,
                                     FLAGS.output, which=FLAGS.checkpoint,
                                     step=FLAGS.step, ensemble=FLAGS.ensemble)
    if failures:
      sys.exit(1)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    # Orbax and Grain log every save at INFO; keep the console to the progress
    # bar and our summaries unless the user asks for more (-v 0).
    logging.set_verbosity(logging.WARNING)
  _enable_compilation_cache()
  _initialize_distributed()
  logging.info('JAX process %d/%d, devices: %s', jax.process_index(),
               jax.process_count(), jax.devices())
  try:
    _run_mode()
  except (ValueError, PermissionError, FileNotFoundError,
          train.NonFiniteLossError) as e:
    # Errors about the user's input: one clear message, no traceback wall.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
