"""Augmentation chains and normalisation, as Grain transforms.

The transforms themselves live by kind: `geometric.py` (flips, rotations,
affine, elastic: image and class maps together) and `intensity.py` (colour
jitter and intensity: image only), on the elements of `elements.py`.
`Normalize` comes last and returns only what is batched: float32 `image` and
int32 `label`.

The usual photograph chain comes from `build_train_transforms(
config.data.augment, mean, std)`; its fields and suggested values (those of
`configs/default.py`, the ISIC recipe of seed 002) are in `DEFAULT_AUGMENT`.
A zero probability or amount, or `False`, turns a transform off. The full
training chain, with patches and intensity augmentation, is
`pipeline.train_transforms`.
"""

import dataclasses

import grain
import numpy as np

from medseg_jax.data import elements
from medseg_jax.data import geometric
from medseg_jax.data import intensity

DEFAULT_AUGMENT = dict(
    flip=True,  # Mirror along each spatial axis with probability 1/2.
    rot90=True,  # Rotate by k * 90 degrees in the plane of `rotate_axes`.
    rotate_axes=(0, 1),  # Rotation plane; (1, 2) for (D, H, W) volumes.
    affine_prob=0.5,  # Probability of a small rotation + scaling.
    rotate_degrees=15.0,  # Rotation angle uniform in [-15, 15] degrees.
    scale_min=0.9,  # Zoom factor log-uniform in [scale_min, scale_max].
    scale_max=1.1,
    color_prob=0.8,  # Probability of colour jitter.
    brightness=0.2,  # Factor in [1 - 0.2, 1 + 0.2].
    contrast=0.2,
    saturation=0.1,
    hue=0.02,  # Hue shift in [-0.02, 0.02] of a full turn.
)

@dataclasses.dataclass(frozen=True)
class Normalize(grain.transforms.Map):
  """Scales the image to float32 and standardises it; the mask becomes `label`.

  image: uint8 -> (image / 255 - mean) / std per channel; other dtypes (e.g.
  float images in [0, 1]) are not rescaled before standardising. Returns
  only the keys that are batched: `image` float32 [*spatial, C] and, if the
  element has a mask, `label` int32 [*spatial]; ids and other non-array keys
  are dropped.

  Attributes:
    mean: per-channel mean (or one value for all channels), in [0, 1] units.
    std: per-channel standard deviation (or one value).
  """
  mean: tuple[float, ...] = (0.485, 0.456, 0.406)
  std: tuple[float, ...] = (0.229, 0.224, 0.225)

  def __post_init__(self):
    mean = np.atleast_1d(np.asarray(self.mean, np.float64))
    std = np.atleast_1d(np.asarray(self.std, np.float64))
    if mean.ndim != 1 or std.ndim != 1 or (std <= 0).any():
      raise ValueError(f'Normalize needs 1D mean and positive std (config.data.'
                       f'mean, config.data.std), got {self.mean}, {self.std}.')
    object.__setattr__(self, 'mean', tuple(mean.tolist()))
    object.__setattr__(self, 'std', tuple(std.tolist()))

  def map(self, element):
    """Returns {'image': float32, 'label': int32} (label only with a mask)."""
    image = np.asarray(element['image'])
    channels = image.shape[-1]
    for name, values in (('mean', self.mean), ('std', self.std)):
      if len(values) not in (1, channels):
        raise ValueError(
            f'config.data.{name} has {len(values)} values but the image has '
            f'{channels} channels (shape {image.shape}); give {channels} '
            'values or one.')
    std = np.asarray(self.std, np.float32)
    unit = 255.0 if image.dtype == np.uint8 else 1.0
    scale = 1.0 / (unit * std)
    shift = -np.asarray(self.mean, np.float32) / std
    out = {'image': elements.add_per_channel(image, shift, scale)}
    for key in elements.CLASS_KEYS:
      if key in element:
        out['label'] = np.asarray(element[key]).astype(np.int32)
        break
    return out


def build_train_transforms(aug_cfg, mean, std) -> list:
  """Returns the photograph training transforms: augmentation then `Normalize`.

  Args:
    aug_cfg: `config.data.augment` (any object with attributes, or None for
      no augmentation) with the fields of `DEFAULT_AUGMENT`. A missing field,
      a zero probability/amount or False turns that part off.
    mean: per-channel mean for `Normalize`.
    std: per-channel standard deviation for `Normalize`.

  Returns:
    A list of Grain transforms: [RandomFlipRot90], [RandomAffine],
    [ColorJitter] (each only if enabled), Normalize.
  """
  return (geometric.build_geometric_transforms(aug_cfg) +
          intensity.build_color_transforms(aug_cfg) +
          build_eval_transforms(mean, std))


def build_eval_transforms(mean, std) -> list:
  """Returns the evaluation transforms: only `Normalize(mean, std)`."""
  return [Normalize(tuple(np.atleast_1d(mean)), tuple(np.atleast_1d(std)))]
