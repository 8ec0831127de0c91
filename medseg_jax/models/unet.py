"""U-Net (Ronneberger et al. 2015) for 2D and 3D, channels-last.

With features=(64, 128, 256, 512, 1024) and transposed-conv upsampling this is
the classic 31M-parameter U-Net; the default (32, ..., 512) is a quarter of it.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from medseg_jax.models import layers


class UNet(nn.Module):
  """Encoder-decoder with skip connections; len(features) levels.

  Attributes:
    num_classes: output channels K (1 = binary/sigmoid, >= 2 = softmax).
    features: channels per level, shallowest first; the last level is the
      bottleneck. Inputs must be divisible by `input_divisor`
      (2**(len(features) - 1) with the default strides).
    norm: 'batch', 'group', 'instance' or 'none'.
    dtype: compute dtype (parameters stay `param_dtype`, logits float32).
    param_dtype: parameter dtype.
    upsample: 'transpose' (2x transposed conv) or 'linear' / 'nearest'
      (resize + 1x1 conv).
    downsample: 'maxpool' or 'strided'.
    residual: residual conv blocks.
    dropout_rate: dropout after the blocks named in `dropout_at` (0 = none).
    dropout_at: any of 'encoder', 'bottleneck', 'decoder'.
    strides: per-axis pooling stride of each downsampling level
      (len(features) - 1 tuples, e.g. ((1, 2, 2), (2, 2, 2)) to pool a
      coarse first axis only from the second level); the upsampling undoes
      the same strides. () = 2 along every axis.
  """
  num_classes: int
  features: Sequence[int] = (32, 64, 128, 256, 512)
  norm: str = 'batch'
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32
  upsample: str = 'transpose'
  downsample: str = 'maxpool'
  residual: bool = False
  dropout_rate: float = 0.0
  dropout_at: Sequence[str] = ('bottleneck',)
  strides: Sequence[Sequence[int]] = ()

  def __post_init__(self):
    layers.check_features(self.features)
    layers.check_strides(self.strides, len(self.features))
    layers.check_options(self.norm, self.upsample, self.downsample,
                         self.dropout_rate, self.dropout_at)
    super().__post_init__()

  @property
  def input_divisor(self) -> int | tuple[int, ...]:
    """Every spatial input size must be a multiple of this (per axis).

    2**(len(features) - 1) with the default strides; with `strides`, the
    product of the strides along each axis, e.g. (4, 8, 8).
    """
    return layers.input_divisor(self.features, self.strides)

  @nn.compact
  def __call__(self, x, train: bool, mc_dropout: bool = False):
    """Returns float32 logits `[B, *spatial, num_classes]`.

    Args:
      x: `[B, H, W, C]` or `[B, D, H, W, C]`, spatial sizes divisible by
        `input_divisor` (per axis).
      train: batch statistics + dropout on; BatchNorm running averages update
        (apply with mutable=['batch_stats']).
      mc_dropout: dropout on at inference too (Monte Carlo dropout); norms
        stay in eval mode. Needs a 'dropout' rng.
    """
    ndim = layers.check_input(x, len(self.features), type(self).__name__,
                              self.strides)
    strides = layers.level_strides(self.strides, len(self.features), ndim)
    deterministic = not (train or mc_dropout)
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def block(i, y, name, where):
      y = layers.ConvBlock(self.features[i], norm=self.norm,
                           residual=self.residual, name=name, **common)(
                               y, train)
      if where in self.dropout_at:
        y = layers.dropout(y, self.dropout_rate, deterministic,
                           name=f'{name}_dropout')
      return y

    depth = len(self.features)
    skips = []
    y = x
    for i in range(depth):
      if i > 0:
        y = layers.Down(self.downsample, norm=self.norm,
                        strides=strides[i - 1], name=f'down_{i}', **common)(
                            y, train)
      where = 'bottleneck' if i == depth - 1 else 'encoder'
      y = block(i, y, f'enc_{i}', where)
      skips.append(y)
    for i in reversed(range(depth - 1)):
      y = layers.Up(self.features[i], self.upsample, strides=strides[i],
                    name=f'up_{i}', **common)(y)
      y = jnp.concatenate([skips[i].astype(y.dtype), y], axis=-1)
      y = block(i, y, f'dec_{i}', 'decoder')
    return layers.Head(self.num_classes, self.param_dtype, name='head')(y)
