r"""Seed 002's table: U-Net and UNet++ trained on 10/25/50/100 % of the training data.

Every run has the same patient split (data.split_seed); the fractions are
nested (the 10 % patients are inside the 25 %). On the CPU, on the synthetic
lesions (8 runs of configs/unetpp.py:cpu, both models at the CPU widths):

    python -m medseg_jax.main --mode=sweep \
        --config=configs/sweeps/isic_fractions.py:cpu --workdir=runs/fractions

Full size on ISIC 2018 Task 1 (each model at its own widths, as in
configs/unet.py and configs/unetpp.py; the folder layout the `isic2018`
source reads), one GPU per run:

    python -m medseg_jax.main --mode=sweep \
        --config=configs/sweeps/isic_fractions.py --workdir=runs/isic_fractions \
        --config.data.source=isic2018 --config.data.root=/data/ISIC2018 \
        --sweep_parallel=8

or on a SLURM cluster: add `--sweep_emit=slurm`, then `sbatch
runs/isic_fractions/sweep.slurm`, then the command without --sweep_emit to
aggregate. Results: runs/.../results.csv, results.md, comparison.md.
"""

from configs import unetpp

MODELS = ('unet', 'unetpp')
FRACTIONS = (0.1, 0.25, 0.5, 1.0)
# Seed 002's widths: U-Net 64..1024 (31 M parameters), UNet++ 32..512.
FULL_FEATURES = {'unet': (64, 128, 256, 512, 1024),
                 'unetpp': (32, 64, 128, 256, 512)}


def get_config(arg=None):
  """Returns the base experiment: configs/unetpp.py (`arg='cpu'`: its CPU variant)."""
  return unetpp.get_config(arg)


def get_sweep(arg=None):
  """Returns the 8 runs: each model at each train fraction.

  The CPU variant trains both models at the CPU widths (shrink_for_cpu);
  the full size gives each model its own widths (model.features).
  """
  runs = []
  for model in MODELS:
    for fraction in FRACTIONS:
      run = {'model.name': model, 'data.train_fraction': fraction}
      if arg != 'cpu':
        run = {'model.name': model, 'model.features': FULL_FEATURES[model],
               'data.train_fraction': fraction}
      runs.append(run)
  return runs
