r"""Entry point: `python -m medseg_jax.main --config=configs/unetpp.py --workdir=runs/x`.

Modes:
  train       (default) train, validate and checkpoint in --workdir; resumes.
  evaluate    metrics, report and plots of a trained run on --split, written
              to WORKDIR/eval/<split>/ (best checkpoint unless --checkpoint).
  predict     masks for the images/volumes at --input, written to --output.
  check_data  check the data set of --config and list every problem found.
  plan        fingerprint a NIfTI data set and plan it (nnU-Net's decisions,
              memory from XLA): WORKDIR/fingerprint.json, plan.json,
              config_3d.py (+ config_2d.py); see medseg_jax/plan_config.py.
  export      WORKDIR/export/: StableHLO, ONNX, manifest, parity (export.py).
  sweep       train and evaluate every run of a sweep file (get_config +
              get_sweep, e.g. configs/sweeps/isic_fractions.py:cpu) in
              sub-workdirs of --workdir, then write results.csv, results.md,
              comparison.md and plots there; resumable (medseg_jax/sweep.py).

Every config field can be overridden, e.g. `--config.optim.lr=3e-4`.
evaluate and predict use the run's config.json (merged over
configs/default.py) when --config is left out: main then passes
`--config=configs/run.py:<workdir>`, so `--config.KEY=VALUE` flags change it
as they change any config file, e.g.

  python -m medseg_jax.main --mode=predict --workdir=runs/x --input=in/ \
      --output=out/ --config.eval.mc_samples=20 --config.eval.tta=True

With --config (e.g. another data set for external validation) or overrides,
the model part must stay the run's. predict refuses to replace the files of
an earlier prediction unless --overwrite is given.

For several processes (one per host, or several on one machine for testing)
pass --coordinator_address, --num_processes and --process_id, or let
`jax.distributed.initialize` find them on a cluster (SLURM, TPU pods).
"""

import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from medseg_jax import config_lib
from medseg_jax import train
from medseg_jax.models import cpu_conv

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/unetpp.py:cpu; for '
    'evaluate/predict, configs/run.py:<workdir> (the default there).',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
flags.DEFINE_enum('mode', 'train',
                  ['train', 'evaluate', 'predict', 'check_data', 'sweep',
                   'export', 'plan'],
                  'What to run.')
flags.DEFINE_float('plan_memory_gb', None, 'plan: memory budget of one train '
                   "step (GiB); default: the present device's (CPU: "
                   'plan_memory.CPU_DEFAULT_GB).')
flags.DEFINE_bool('plan_compare_nnunet', False, "plan: also run nnU-Net v2's "
                  'planner (a venv with nnunetv2, $NNUNET_VENV or '
                  '/tmp/venv-nnunet) and print both plans side by side.')
flags.DEFINE_string('split', 'test', 'evaluate: train, val, test or all.')
flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest', 'best_ema'],
                  'evaluate/predict: which checkpoint to load (best_ema: '
                  "the EMA parameters' best, train.ema_decay > 0; its "
                  'reports go to eval/best_ema/).')
flags.DEFINE_integer('step', None, 'evaluate/predict: load this step.')
flags.DEFINE_string('input', None, 'predict: an image, a NIfTI file, a DICOM '
                    'series folder, or a folder of those.')
flags.DEFINE_string('output', None, 'predict: folder for the masks.')
flags.DEFINE_bool('overwrite', False, 'predict: replace the files of an '
                  'earlier prediction in --output (refused otherwise).')
flags.DEFINE_list('ensemble', [], 'evaluate/predict: workdirs of other runs '
                  'of the same model (e.g. the other cross-validation folds) '
                  "whose probabilities are averaged with --workdir's.")
flags.DEFINE_integer('sweep_parallel', 1, 'sweep: runs at once (each on its '
                     'own GPU, round-robin, when there are GPUs).')
flags.DEFINE_enum('sweep_emit', None, ['slurm'], 'sweep: write a SLURM array '
                  'script (WORKDIR/sweep.slurm, one run per task) and exit.')
flags.DEFINE_integer('sweep_index', None, 'sweep: run only run i (a SLURM '
                     'array task); no aggregation.')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0, for multi-process runs.')
flags.DEFINE_integer('num_processes', None, 'Number of JAX processes.')
flags.DEFINE_integer('process_id', None, 'Index of this JAX process.')

# Modes that default to the run's config.
_RUN_MODES = ('evaluate', 'predict', 'export')
_OVERRIDE = re.compile(r'^--?(?:no)?config\.([A-Za-z0-9_.]+)')


def _flag_value(argv, name: str) -> str | None:
  """Returns the value of `--name=V` or `--name V` in argv (the last one)."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith((f'--{name}=', f'-{name}=')):
      value = arg.split('=', 1)[1]
    elif arg in (f'--{name}', f'-{name}') and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _with_run_config(argv) -> list[str]:
  """Adds `--config=configs/run.py:<workdir>` for evaluate/predict without one.

  It goes first: config_flags wants `--config` before its `--config.KEY`s.
  """
  if (_flag_value(argv, 'config') is not None or
      _flag_value(argv, 'mode') not in _RUN_MODES):
    return list(argv)
  workdir = _flag_value(argv, 'workdir')
  if workdir is None:
    return list(argv)  # _require names the missing --workdir.
  return [argv[0], f'--config={config_lib.RUN_CONFIG}:{workdir}', *argv[1:]]


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(1)


def _unknown_key_error(argv, error) -> str:
  """Explains an unknown `--config.KEY` (config_flags raises a KeyError)."""
  try:
    config = config_flags.config_flags.ConfigFileFlagParser('config').parse(
        _flag_value(argv, 'config'))
    for arg in argv[1:]:
      match = _OVERRIDE.match(arg)
      if match:
        config_lib.resolve_key(config, match.group(1))
  except ValueError as e:
    return str(e)
  except Exception:  # pylint: disable=broad-except
    pass  # The config file itself does not load: say what absl said.
  return f'a --config.KEY flag names no config field ({error}).'


def _parse_flags(argv):
  """absl's flag parsing, with the run's config for evaluate/predict."""
  argv = _with_run_config(argv)
  sys.argv[:] = argv  # config_flags reads its --config.KEY flags from here.
  if _flag_value(argv, 'config') is None:
    keys = [m.group(1) for m in map(_OVERRIDE.match, argv[1:]) if m]
    if keys:
      _fail(f'--config.{keys[0]} needs --config (a config file), or '
            f'--mode={"|".join(_RUN_MODES)} with --workdir (the run\'s '
            'config.json).')
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:  # config_flags: no such field.
    _fail(_unknown_key_error(argv, e))
  except OSError as e:  # config_flags: the --config file does not load.
    _fail(_load_error(e))


def _load_error(error: OSError) -> str:
  """The message of a config file that did not load (config_flags wraps it)."""
  if isinstance(error.__cause__, FileNotFoundError):
    return str(error.__cause__)  # configs/run.py: a run without config.json.
  return '--config: ' + ' '.join(str(error).split())  # One line.


def _check_config_loads() -> None:
  """Raises a clear error if the --config file did not load (config_flags
  defers that error to the first use of the config)."""
  if FLAGS.config is None:
    return
  try:
    FLAGS.config.keys()
  except OSError as e:
    raise ValueError(_load_error(e)) from e


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


def _train() -> None:
  result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                                    explicit=_explicit_keys())
  if jax.process_index() == 0:
    workdir = os.path.abspath(FLAGS.workdir)
    outputs = 'config.json, metrics.jsonl, checkpoints/' + (
        ', tensorboard/' if FLAGS.config.train.tensorboard else '')
    best = 'best whole-case' if FLAGS.config.train.case_val_every else 'best'
    print(f'Done. Validation Dice {result["dice"]:.4f} ({best} '
          f'{result["best_dice"]:.4f}), IoU {result["iou"]:.4f}, '
          f'sensitivity {result["sensitivity"]:.4f}, specificity '
          f'{result["specificity"]:.4f}.\nResults in {workdir}: {outputs}.\n'
          f'Next: python -m medseg_jax.main --mode=evaluate --workdir={workdir}')


def _explicit_keys():
  """The `explicit` argument of config_lib.fill_from_data for this command.

  When --config.data.source is switched on the command line, the file's
  data values were written for its own source: only the keys given on the
  command line bind then (None: every value that differs from the defaults).
  """
  given = {m.group(1) for m in map(_OVERRIDE.match, sys.argv[1:]) if m}
  return given if 'data.source' in given else None


def _filled_config():
  """--config with the values its data set states (config_lib.fill_from_data)."""
  return config_lib.fill_from_data(FLAGS.config, explicit=_explicit_keys())


def _plan() -> None:
  from medseg_jax import plan_config  # pylint: disable=import-outside-toplevel
  plan = plan_config.run_plan(FLAGS.config, FLAGS.workdir,
                              FLAGS['config'].config_filename,
                              memory_gb=FLAGS.plan_memory_gb,
                              explicit=_explicit_keys())
  print(plan_config.format_plan(plan))
  if FLAGS.plan_compare_nnunet:
    from medseg_jax import plan_nnunet  # pylint: disable=import-outside-toplevel
    print(plan_nnunet.compare(FLAGS.config, plan,
                              FLAGS.plan_memory_gb or 8.0))
  print(f'Wrote fingerprint.json, plan.json and '
        f'{", ".join(f"config_{k}.py" for k in plan["chosen"])} in '
        f'{os.path.abspath(FLAGS.workdir)}.\nNext: python -m medseg_jax.main '
        f'--config={os.path.join(FLAGS.workdir, "config_" + plan["chosen"][0] + ".py")} '
        f'--workdir=runs/<name>')


def _run_mode() -> None:
  """Dispatches on --mode (imports are per mode: each pulls in only its own)."""
  _check_config_loads()
  if FLAGS.mode == 'train':
    _require('config', 'workdir')
    _train()
  elif FLAGS.mode == 'check_data':
    _require('config')
    from medseg_jax.data import check  # pylint: disable=import-outside-toplevel
    data_cfg = _filled_config().data
    problems = check.check_dataset(data_cfg)
    print(check.format_problems(problems, data_cfg.root))
    if problems:
      sys.exit(1)
  elif FLAGS.mode == 'evaluate':
    _require('workdir')
    from medseg_jax import evaluate  # pylint: disable=import-outside-toplevel
    evaluate.evaluate_run(FLAGS.config, FLAGS.workdir, split=FLAGS.split,
                          which=FLAGS.checkpoint, step=FLAGS.step,
                          ensemble=FLAGS.ensemble)
  elif FLAGS.mode == 'predict':
    _require('workdir', 'input', 'output')
    from medseg_jax import predict  # pylint: disable=import-outside-toplevel
    failures = predict.predict_paths(
        FLAGS.config, FLAGS.workdir, FLAGS.input, FLAGS.output,
        which=FLAGS.checkpoint, step=FLAGS.step, ensemble=FLAGS.ensemble,
        overwrite=FLAGS.overwrite)
    if failures:
      sys.exit(1)
  elif FLAGS.mode == 'sweep':
    _require('config', 'workdir')
    from medseg_jax import sweep  # pylint: disable=import-outside-toplevel
    sweep.run_sweep(FLAGS.config, FLAGS['config'].config_filename,
                    FLAGS.workdir, parallel=FLAGS.sweep_parallel,
                    emit=FLAGS.sweep_emit, index=FLAGS.sweep_index,
                    argv=sys.argv)
  elif FLAGS.mode == 'plan':  # Fingerprint -> plan -> config files.
    _require('config', 'workdir')
    _plan()
  elif FLAGS.mode == 'export':  # StableHLO + ONNX + manifest + parity.
    _require('workdir')
    from medseg_jax import export  # pylint: disable=import-outside-toplevel
    export.export_run(FLAGS.config, FLAGS.workdir, which=FLAGS.checkpoint,
                      step=FLAGS.step)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    # Orbax and Grain log every save at INFO; keep the console to the progress
    # bar and our summaries unless the user asks for more (-v 0).
    logging.set_verbosity(logging.WARNING)
  # Before the first JAX computation (XLA reads its flags once): Eigen or
  # YNNPACK convolutions on CPU, config.model.conv_impl (models/cpu_conv.py).
  cpu_conv.configure_cpu_convolutions(lambda: FLAGS.config.model)
  if FLAGS.mode != 'sweep':  # A sweep's runs are subprocesses; this process
    # must not take the accelerators' memory they need.
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
