"""UNet++ (Zhou et al. 2018): U-Net with nested, dense skip pathways; 2D and 3D.

Node X^{i,j} sits at depth i (resolution 1/2**i) and column j. Column 0 is the
encoder; every other node sees all earlier nodes of its row and the upsampled
node below-left of it:

    X^{i,j} = ConvBlock(concat(X^{i,0}, ..., X^{i,j-1}, Up(X^{i+1,j-1})))

The output comes from X^{0,L-1}. With deep supervision every X^{0,j}, j >= 1,
has its own 1x1 head, all at full resolution.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from medseg_jax.models import layers


class UNetPlusPlus(nn.Module):
  """Nested U-Net; len(features) levels.

  Attributes:
    num_classes: output channels K (1 = binary/sigmoid, >= 2 = softmax).
    features: channels per depth, shallowest first. Inputs must be divisible
      by `input_divisor`
      (2**(len(features) - 1) with the default strides).
    deep_supervision: in training, return the logits of every X^{0,j},
      j = 1..L-1, the final output last; in eval, only the final output.
    norm: 'batch', 'group', 'instance' or 'none'.
    dtype: compute dtype (parameters stay `param_dtype`, logits float32).
    param_dtype: parameter dtype.
    upsample: 'transpose' (2x transposed conv to the target depth's channels)
      or 'linear' / 'nearest' (resize + 1x1 conv).
    downsample: 'maxpool' or 'strided'.
    residual: residual conv blocks.
    dropout_rate: dropout after the blocks named in `dropout_at` (0 = none).
    dropout_at: any of 'encoder' (X^{i,0}, i < L-1), 'bottleneck'
      (X^{L-1,0}), 'decoder' (X^{i,j}, j >= 1).
    strides: per-axis pooling stride of each downsampling level
      (len(features) - 1 tuples, e.g. ((1, 2, 2), (2, 2, 2)) to pool a
      coarse first axis only from the second level); the upsampling undoes
      the same strides. () = 2 along every axis.
  """
  num_classes: int
  features: Sequence[int] = (32, 64, 128, 256, 512)
  deep_supervision: bool = False
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
    """Returns float32 logits `[B, *spatial, K]`, or a list of them.

    Args:
      x: `[B, H, W, C]` or `[B, D, H, W, C]`, spatial sizes divisible by
        `input_divisor` (per axis).
      train: batch statistics + dropout on; BatchNorm running averages update
        (apply with mutable=['batch_stats']).
      mc_dropout: dropout on at inference too (Monte Carlo dropout); norms
        stay in eval mode. Needs a 'dropout' rng.

    Returns:
      One array; or, when deep_supervision and train, a list of L-1 arrays
      from X^{0,1}, ..., X^{0,L-1} (the final output last).
    """
    ndim = layers.check_input(x, len(self.features), type(self).__name__,
                              self.strides)
    strides = layers.level_strides(self.strides, len(self.features), ndim)
    deterministic = not (train or mc_dropout)
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    depth = len(self.features)

    def block(i, j, y):
      name = f'X_{i}_{j}'
      y = layers.ConvBlock(self.features[i], norm=self.norm,
                           residual=self.residual, name=name, **common)(
                               y, train)
      if j > 0:
        where = 'decoder'
      else:
        where = 'bottleneck' if i == depth - 1 else 'encoder'
      if where in self.dropout_at:
        y = layers.dropout(y, self.dropout_rate, deterministic,
                           name=f'{name}_dropout')
      return y

    # nodes[i][j] = X^{i,j}; filled column by column (j), top to bottom.
    nodes = [[] for _ in range(depth)]
    y = x
    for i in range(depth):
      if i > 0:
        y = layers.Down(self.downsample, norm=self.norm,
                        strides=strides[i - 1], name=f'down_{i}', **common)(
                            y, train)
      y = block(i, 0, y)
      nodes[i].append(y)
    for j in range(1, depth):
      for i in range(depth - j):
        up = layers.Up(self.features[i], self.upsample, strides=strides[i],
                       name=f'up_{i}_{j}', **common)(nodes[i + 1][j - 1])
        inputs = [n.astype(up.dtype) for n in nodes[i][:j]] + [up]
        nodes[i].append(block(i, j, jnp.concatenate(inputs, axis=-1)))

    final = layers.Head(self.num_classes, self.param_dtype, name='head')(
        nodes[0][depth - 1])
    if not self.deep_supervision:
      return final
    # The auxiliary heads exist whatever `train` is, so variables created by
    # an eval-mode init also serve training; unused ones are dead code in eval.
    aux = [layers.Head(self.num_classes, self.param_dtype,
                       name=f'ds_head_{j}')(nodes[0][j])
           for j in range(1, depth - 1)]
    return aux + [final] if train else final
