"""medseg_jax: JAX/Flax training stack for medical image segmentation.

Public, framework-free building blocks: `from medseg_jax import losses, metrics`.
Training: `python -m medseg_jax.main --config=configs/unetpp.py --workdir=runs/x`.
"""

__version__ = '0.1.0'
