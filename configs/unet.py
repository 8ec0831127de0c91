"""U-Net on 256x256 skin-lesion images (seed 002 recipe) and its CPU variant.

Full recipe (GPU/TPU; bf16, batch 16, 20 epochs, AdamW 1e-4, Dice+BCE 0.5/0.5):

    python -m medseg_jax.main --config=configs/unet.py --workdir=runs/unet

CPU variant, the same recipe shrunk to finish in minutes on a laptop:

    python -m medseg_jax.main --config=configs/unet.py:cpu --workdir=runs/unet_cpu
"""

from configs import default


def get_config(arg=None):
  """Returns the U-Net config; `arg='cpu'` gives the laptop-sized variant."""
  config = default.get_config()
  config.model.name = 'unet'
  config.model.features = (64, 128, 256, 512, 1024)
  if arg == 'cpu':
    default.shrink_for_cpu(config)
  elif arg not in (None, ''):
    raise ValueError(f"Unknown config variant {arg!r}; use ':cpu' or nothing.")
  return config
