"""Entry point: `python -m medseg_jax.main --config=configs/unetpp.py --workdir=runs/x`.

Every config field can be overridden, e.g. `--config.optim.lr=3e-4`. For
several processes (one per host, or several on one machine for testing) pass
--coordinator_address, --num_processes and --process_id, or let
`jax.distributed.initialize` find them on a cluster (SLURM, TPU pods).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from medseg_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/unetpp.py:cpu.',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
flags.DEFINE_enum('mode', 'train', ['train'], 'What to run.')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0, for multi-process runs.')
flags.DEFINE_integer('num_processes', None, 'Number of JAX processes.')
flags.DEFINE_integer('process_id', None, 'Index of this JAX process.')
flags.mark_flags_as_required(['config', 'workdir'])


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
    result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ValueError, PermissionError, train.NonFiniteLossError) as e:
    # Errors about the user's input: one clear message, no traceback wall.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  if jax.process_index() == 0:
    workdir = os.path.abspath(FLAGS.workdir)
    print(f'Done. Validation Dice {result["dice"]:.4f} (best '
          f'{result["best_dice"]:.4f}), IoU {result["iou"]:.4f}, '
          f'sensitivity {result["sensitivity"]:.4f}, specificity '
          f'{result["specificity"]:.4f}.\nResults in {workdir}: '
          'config.json, metrics.jsonl, checkpoints/{latest,best}/.')


if __name__ == '__main__':
  app.run(main)
