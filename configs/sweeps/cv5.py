r"""5-fold cross-validation of UNet++ by patient (nnU-Net style).

The test patients are held out once (data.test_fraction); the others are
split into 5 folds, and run k validates on fold k and trains on the rest.

    python -m medseg_jax.main --mode=sweep \
        --config=configs/sweeps/cv5.py:cpu --workdir=runs/cv5

Each fold is evaluated on the same test split and on its own val fold;
the sweep then evaluates the fold ensemble on test, the same as

    python -m medseg_jax.main --mode=evaluate --workdir=runs/cv5/fold0 \
        --ensemble=runs/cv5/fold1,runs/cv5/fold2,runs/cv5/fold3,runs/cv5/fold4

and writes runs/cv5/cv_summary.md/.json (val Dice per fold, mean +- std,
pooled over all folds' val cases, the ensemble's test Dice) and best.json
(medseg_jax/sweep_cv.py). Add another swept key (e.g. 'optim.lr') to
compare configurations: best.json then names the best one, or the best
ensemble of two when they share model and data settings.
"""

from configs import unetpp

NUM_FOLDS = 5


def get_config(arg=None):
  """Returns configs/unetpp.py (`arg='cpu'`: its CPU variant) with 5 folds."""
  config = unetpp.get_config(arg)
  config.data.num_folds = NUM_FOLDS
  return config


def get_sweep(arg=None):
  """Returns one run per fold: data.fold = 0 .. 4."""
  del arg  # Every variant has the same folds.
  return [{'data.fold': fold} for fold in range(NUM_FOLDS)]
