"""medseg_jax: JAX/Flax training stack for medical image segmentation.

Public, framework-free building blocks: `from medseg_jax import losses, metrics`.
Training: `python -m medseg_jax.main --config=configs/unetpp.py --workdir=runs/x`.
A trained run: `from medseg_jax import Predictor`;
`Predictor.from_workdir('runs/x').predict(image)` (see `predictor`).
"""

__version__ = '0.1.0'

# Imported on first use: `import medseg_jax` stays light (no JAX, no models).
_LAZY = {'Predictor': 'medseg_jax.predictor',
         'Prediction': 'medseg_jax.predictor'}


def __getattr__(name):
  """Returns `Predictor` / `Prediction`, importing their module on first use."""
  if name in _LAZY:
    import importlib  # pylint: disable=import-outside-toplevel
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted([*globals(), *_LAZY])
