"""UNet++ on 256x256 skin-lesion images (seed 002 recipe) and its CPU variant.

Full recipe (GPU/TPU; bf16, batch 16, 20 epochs, AdamW 1e-4, Dice+BCE 0.5/0.5):

    python -m medseg_jax.main --config=configs/unetpp.py --workdir=runs/unetpp

CPU variant, the same recipe shrunk to finish in minutes on a laptop:

    python -m medseg_jax.main --config=configs/unetpp.py:cpu --workdir=runs/unetpp_cpu
"""

from configs import default


def get_config(arg=None):
  """Returns the UNet++ config; `arg='cpu'` gives the laptop-sized variant."""
  config = default.get_config()
  config.model.name = 'unetpp'
  config.model.features = (32, 64, 128, 256, 512)
  if arg == 'cpu':
    default.shrink_for_cpu(config)
  elif arg not in (None, ''):
    raise ValueError(f"Unknown config variant {arg!r}; use ':cpu' or nothing.")
  return config
