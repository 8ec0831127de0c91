"""Segmentation architectures and the registry that builds them from config.

    model = models.create_model(config.model, num_classes)
    variables = model.init(rngs, x, train=False)
    logits = model.apply(variables, x, train=False)   # [B, *spatial, K] f32

Every model is channels-last and works for 2D and 3D inputs alike
(`transunet` registers itself with `@register` in its own file).
"""

from medseg_jax.models import layers
from medseg_jax.models.registry import abstract_variables
from medseg_jax.models.registry import count_params
from medseg_jax.models.registry import create_model
from medseg_jax.models.registry import known_models
from medseg_jax.models.registry import model_summary
from medseg_jax.models.registry import register
from medseg_jax.models.transunet import TransUNet
from medseg_jax.models.unet import UNet
from medseg_jax.models.unetpp import UNetPlusPlus

register('unet')(UNet)
register('unetpp')(UNetPlusPlus)

__all__ = [
    'TransUNet', 'UNet', 'UNetPlusPlus', 'abstract_variables', 'count_params',
    'create_model', 'known_models', 'layers', 'model_summary', 'register',
]
