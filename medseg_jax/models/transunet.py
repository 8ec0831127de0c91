"""TransUNet (Chen et al. 2021): a ViT-hybrid encoder and a cascaded upsampler.

    x -> ResNet stages (skips at 1/2 .. 1/2**(L-1)) -> bottleneck map (1/2**L)
      -> patches of `vit_patch_size` -> ViT (learned position embeddings)
      -> tokens back to a map -> conv 3x3 -> L x (upsample x2, concat skip,
         2 x conv 3x3) -> 1x1 head at full resolution

The defaults are the paper's R50-ViT-B/16: ResNet-50 root and its first three
stages (3, 4, 9 bottleneck units; 64, 256, 512, 1024 channels), 12 layers of
ViT-B (hidden 768, 12 heads, MLP 3072) on 1x1 patches of the 1/16 map, and
decoder channels (16, 64, 128, 256); ~105M parameters. Differences from the
paper's code: plain convolutions (not weight-standardised: that only matters
for BiT-pretrained weights), one `norm` for encoder and decoder (the paper has
GroupNorm in the ResNet, BatchNorm in the decoder), half-pixel-centred
bilinear upsampling, and a 1x1 (not 3x3) head.

Every layer takes its number of spatial dims from the input, so the same
module runs on `[B, H, W, C]` and on `[B, D, H, W, C]` (3D convolutions, one
token per bottleneck voxel patch, trilinear position-embedding resizing).

Position embeddings are a parameter of shape `(*grid, hidden_size)`: the token
grid they were made for is their shape. It is `pos_embed_grid` when given,
else the grid of the input the model is initialised with. An input whose grid
differs (another image size at inference, a padded whole image) gets them
resized by (bi/tri)linear interpolation, as when fine-tuning ViTs at a new
resolution; the parameter itself never changes shape.
"""

import functools
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medseg_jax.models import layers
from medseg_jax.models import registry

BLOCKS = ('bottleneck', 'basic')
# ViT initialisation (as in the reference ViT / TransUNet code).
_vit_kernel_init = nn.initializers.xavier_uniform()
_vit_bias_init = nn.initializers.normal(1e-6)


class ResidualUnit(nn.Module):
  """ResNet unit: bottleneck (1x1, 3x3, 1x1 at width features/4) or basic.

  A basic unit is two 3x3 convs. `strides` (1, or 2 to halve every spatial
  size) sits on the 3x3 conv (ResNet v1.5 / TransUNet); the shortcut is a
  strided 1x1 conv + norm when the stride or channel count changes.
  """
  features: int
  block: str = 'bottleneck'
  strides: int = 1
  norm: str = 'group'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    """Args: x `[B, *spatial, C]`; train. Returns `[B, *spatial/s, F]`."""
    ndim = x.ndim - 2
    conv = functools.partial(
        nn.Conv, padding='SAME', use_bias=self.norm == 'none',
        kernel_init=layers.default_kernel_init, dtype=self.dtype,
        param_dtype=self.param_dtype)
    norm = functools.partial(layers.Norm, self.norm, train=train,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    strides = (self.strides,) * ndim
    if self.block == 'bottleneck':
      mid = max(1, self.features // 4)
      y = conv(mid, (1,) * ndim, name='conv1')(x)
      y = nn.relu(norm(mid, name='norm1')(y))
      y = conv(mid, (3,) * ndim, strides=strides, name='conv2')(y)
      y = nn.relu(norm(mid, name='norm2')(y))
      y = conv(self.features, (1,) * ndim, name='conv3')(y)
      y = norm(self.features, name='norm3')(y)
    else:
      y = conv(self.features, (3,) * ndim, strides=strides, name='conv1')(x)
      y = nn.relu(norm(self.features, name='norm1')(y))
      y = conv(self.features, (3,) * ndim, name='conv2')(y)
      y = norm(self.features, name='norm2')(y)
    skip = x
    if self.strides != 1 or x.shape[-1] != self.features:
      skip = conv(self.features, (1,) * ndim, strides=strides,
                  name='skip_conv')(x)
      skip = norm(self.features, name='skip_norm')(skip)
    return nn.relu(y + skip.astype(y.dtype))


class ResNetEncoder(nn.Module):
  """Root (7x7 conv, stride 2) and ResNet stages; returns every stage's output.

  Output i is at resolution 1/2**(i+1) with features[i] channels: the root at
  1/2, then a 3x3 max-pool and stage 1 at 1/4, and stages 2.. each starting
  with a strided unit.

  Attributes are those of `TransUNet`; `dropout_rate` applies after every
  output.
  """
  features: Sequence[int]
  stage_blocks: Sequence[int]
  block: str = 'bottleneck'
  norm: str = 'group'
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool, deterministic: bool = True):
    """Returns the list of len(features) feature maps, shallowest first."""
    ndim = x.ndim - 2
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = nn.Conv(self.features[0], (7,) * ndim, strides=(2,) * ndim,
                padding='SAME', use_bias=self.norm == 'none',
                kernel_init=layers.default_kernel_init, name='root_conv',
                **common)(x)
    y = nn.relu(layers.Norm(self.norm, self.features[0], train,
                            name='root_norm', **common)(y))
    outputs = [layers.dropout(y, self.dropout_rate, deterministic)]
    for i, units in enumerate(self.stage_blocks, start=1):
      if i == 1:
        y = nn.max_pool(y, window_shape=(3,) * ndim, strides=(2,) * ndim,
                        padding='SAME')
      for j in range(units):
        y = ResidualUnit(self.features[i], self.block,
                         strides=2 if i > 1 and j == 0 else 1, norm=self.norm,
                         name=f'stage{i}_unit{j}', **common)(y, train)
      outputs.append(layers.dropout(y, self.dropout_rate, deterministic))
    return outputs


class TransformerBlock(nn.Module):
  """Pre-LayerNorm ViT block: x + MHSA(LN(x)), then x + MLP(LN(x))."""
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    """Args: x `[B, N, hidden]`; deterministic. Returns `[B, N, hidden]`."""
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dense = functools.partial(nn.Dense, kernel_init=_vit_kernel_init,
                              bias_init=_vit_bias_init, **common)
    y = nn.LayerNorm(epsilon=1e-6, name='attention_norm', **common)(x)
    y = nn.MultiHeadDotProductAttention(
        self.num_heads, dropout_rate=self.attention_dropout_rate,
        kernel_init=_vit_kernel_init, name='attention', **common)(
            y, y, deterministic=deterministic)
    x = x + layers.dropout(y, self.dropout_rate, deterministic)
    y = nn.LayerNorm(epsilon=1e-6, name='mlp_norm', **common)(x)
    y = nn.gelu(dense(self.mlp_dim, name='mlp_in')(y), approximate=False)
    y = layers.dropout(y, self.dropout_rate, deterministic)
    y = dense(x.shape[-1], name='mlp_out')(y)
    return x + layers.dropout(y, self.dropout_rate, deterministic)


def resize_position_embedding(pos, grid: Sequence[int]):
  """Returns position embeddings `(*grid0, hidden)` resized to `(*grid, C)`.

  Unchanged when the grids match; else (bi/tri)linear interpolation with
  half-pixel centres and no antialiasing, computed in float32.
  """
  grid = tuple(grid)
  if tuple(pos.shape[:-1]) == grid:
    return pos
  return jax.image.resize(pos.astype(jnp.float32), (*grid, pos.shape[-1]),
                          method='linear', antialias=False)


class ViTEncoder(nn.Module):
  """Patch embedding + learned position embeddings + transformer layers.

  Attributes are `TransUNet`'s `hidden_size`, ..., `pos_embed_grid`;
  `patch_size` is `vit_patch_size`, `dropout_rate` `vit_dropout_rate`.
  """
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  patch_size: int = 1
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.0
  pos_embed_grid: Sequence[int] = ()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _position_embedding(self, grid):
    # The stored parameter's shape is the grid it was made for; reading it
    # back (instead of `self.param` with a shape) lets apply take any grid.
    if self.has_variable('params', 'pos_embed'):
      pos = self.get_variable('params', 'pos_embed')
    else:
      made_for = tuple(self.pos_embed_grid) or tuple(grid)
      if len(made_for) != len(grid):
        raise ValueError(
            f'pos_embed_grid={tuple(self.pos_embed_grid)} has {len(made_for)} '
            f'axes but the token grid {tuple(grid)} has {len(grid)}.')
      pos = self.param('pos_embed', nn.initializers.normal(0.02),
                       (*made_for, self.hidden_size), self.param_dtype)
    return resize_position_embedding(pos, grid)

  @nn.compact
  def __call__(self, x, deterministic: bool):
    """Args: x `[B, *spatial, C]`. Returns `[B, *spatial/patch, hidden]`."""
    ndim = x.ndim - 2
    patch = (self.patch_size,) * ndim
    y = nn.Conv(self.hidden_size, patch, strides=patch, padding='VALID',
                dtype=self.dtype, param_dtype=self.param_dtype,
                name='patch_embed')(x)
    batch, *grid, _ = y.shape
    pos = self._position_embedding(grid).astype(y.dtype)
    tokens = (y + pos[None]).reshape(batch, -1, self.hidden_size)
    tokens = layers.dropout(tokens, self.dropout_rate, deterministic)
    for i in range(self.num_layers):
      tokens = TransformerBlock(
          self.num_heads, self.mlp_dim, self.dropout_rate,
          self.attention_dropout_rate, dtype=self.dtype,
          param_dtype=self.param_dtype, name=f'layer_{i}')(
              tokens, deterministic)
    tokens = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype,
                          param_dtype=self.param_dtype,
                          name='encoder_norm')(tokens)
    return tokens.reshape(batch, *grid, self.hidden_size)


def _resize(y, factor: int, method: str):
  shape = (y.shape[0], *(factor * s for s in y.shape[1:-1]), y.shape[-1])
  return jax.image.resize(y, shape, method=method, antialias=False)


class CascadedUpsampler(nn.Module):
  """TransUNet decoder: conv 3x3, then per level upsample, concat skip, convs.

  Attributes are those of `TransUNet` (`decoder_features` resolved, L
  entries); with `patch_size` > 1 the token map is first resized by that
  factor back to the bottleneck resolution. 'transpose' upsampling keeps the
  channel count; 'linear' / 'nearest' resize without a conv (as the paper).
  `dropout_rate` applies after every decoder block.
  """
  decoder_features: Sequence[int]
  head_channels: int
  patch_size: int = 1
  upsample: str = 'linear'
  norm: str = 'group'
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, y, skips, train: bool, deterministic: bool = True):
    """Returns `[B, *spatial, decoder_features[0]]` at full resolution.

    Args:
      y: token map `[B, *spatial/(2**L * patch_size), hidden]`.
      skips: encoder maps at 1/2, ..., 1/2**(L-1), shallowest first.
      train: norms in training mode.
      deterministic: dropout off.
    """
    ndim = y.ndim - 2
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mode = layers.canonical_upsample(self.upsample)
    y = nn.Conv(self.head_channels, (3,) * ndim, padding='SAME',
                use_bias=self.norm == 'none',
                kernel_init=layers.default_kernel_init, name='conv_more',
                **common)(y)
    y = nn.relu(layers.Norm(self.norm, self.head_channels, train,
                            name='conv_more_norm', **common)(y))
    if self.patch_size > 1:
      y = _resize(y, self.patch_size, 'nearest' if mode == 'nearest'
                  else 'linear')
    for i in reversed(range(len(self.decoder_features))):
      if mode == 'transpose':
        y = layers.Up(y.shape[-1], 'transpose', name=f'up_{i}', **common)(y)
      else:
        y = _resize(y, 2, mode)
      if i > 0:  # The full-resolution block has no skip (as in the paper).
        y = jnp.concatenate([y, skips[i - 1].astype(y.dtype)], axis=-1)
      y = layers.ConvBlock(self.decoder_features[i], norm=self.norm,
                           name=f'block_{i}', **common)(y, train)
      y = layers.dropout(y, self.dropout_rate, deterministic)
    return y


def _check_positive(name: str, values, length=None) -> None:
  values = tuple(values)
  if (length is not None and len(values) != length) or any(
      int(v) < 1 for v in values):
    need = f'{length} ' if length is not None else ''
    raise ValueError(f'TransUNet {name} must be {need}positive integers; got '
                     f'{values}.')


def _nearest_multiples(size: int, factor: int) -> str:
  lower = (size // factor) * factor
  return ', '.join(str(s) for s in (lower, lower + factor) if s > 0)


@registry.register('transunet')
class TransUNet(nn.Module):
  """ResNet + ViT hybrid encoder, cascaded upsampler decoder; 2D and 3D.

  Inputs must be divisible by `input_divisor` = 2**len(features) *
  vit_patch_size along every spatial axis (224 and 256 both work at the
  defaults, 16).

  Attributes:
    num_classes: output channels K (1 = binary/sigmoid, >= 2 = softmax).
    features: channels of the root conv (1/2) and of the ResNet stages (1/4,
      1/8, ...); L = len(features) >= 2 downsamplings before the ViT.
    stage_blocks: residual units per stage, len(features) - 1 entries.
    block: 'bottleneck' (R50) or 'basic' residual units.
    decoder_features: decoder channels at 1/1, ..., 1/2**(L-1); () = features
      // 4 for bottleneck units (the paper's 16, 64, 128, 256), features for
      basic ones.
    head_channels: channels of the conv on the token map; 0 = twice the
      deepest decoder channels (the paper's 512).
    hidden_size, num_layers, num_heads, mlp_dim: ViT size.
    vit_patch_size: ViT patch edge on the 1/2**L bottleneck map (1 = one
      token per bottleneck pixel, as in R50-ViT-B/16).
    vit_dropout_rate: ViT embedding, attention-output and MLP dropout.
    attention_dropout_rate: dropout on the attention weights.
    pos_embed_grid: token grid of the position embeddings; () = the grid of
      the init input. Other inputs get them interpolated (module docstring).
    norm: CNN encoder and decoder norm: 'group' (R50 in TransUNet), 'batch',
      'instance' or 'none'.
    dtype: compute dtype (parameters stay `param_dtype`, logits float32).
    param_dtype: parameter dtype.
    upsample: decoder upsampling: 'linear' (paper), 'nearest', 'transpose'.
    dropout_rate: dropout after the parts named in `dropout_at` (0 = none).
    dropout_at: any of 'encoder' (every CNN stage output), 'bottleneck' (the
      ViT output), 'decoder' (every decoder block).
  """
  # config.model keys beyond registry._CONFIG_KEYS that this model reads.
  CONFIG_KEYS: ClassVar[tuple[str, ...]] = (
      'stage_blocks', 'block', 'decoder_features', 'head_channels',
      'hidden_size', 'num_layers', 'num_heads', 'mlp_dim', 'vit_patch_size',
      'vit_dropout_rate', 'attention_dropout_rate', 'pos_embed_grid')

  num_classes: int
  features: Sequence[int] = (64, 256, 512, 1024)
  stage_blocks: Sequence[int] = (3, 4, 9)
  block: str = 'bottleneck'
  decoder_features: Sequence[int] = ()
  head_channels: int = 0
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  vit_patch_size: int = 1
  vit_dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.0
  pos_embed_grid: Sequence[int] = ()
  norm: str = 'group'
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32
  upsample: str = 'linear'
  dropout_rate: float = 0.0
  dropout_at: Sequence[str] = ('bottleneck',)

  def __post_init__(self):
    layers.check_options(self.norm, self.upsample, 'maxpool',
                         self.dropout_rate, self.dropout_at)
    depth = len(self.features)
    if depth < 2:
      raise ValueError(
          'TransUNet features must list >= 2 channel counts (root and '
          f'stages, e.g. (64, 256, 512, 1024)); got {tuple(self.features)}.')
    if self.block not in BLOCKS:
      raise ValueError(f'Unknown block {self.block!r}; use one of {BLOCKS}.')
    _check_positive('features', self.features)
    _check_positive('stage_blocks', self.stage_blocks, depth - 1)
    _check_positive('decoder_features', self.decoder_features,
                    depth if self.decoder_features else 0)
    _check_positive('pos_embed_grid', self.pos_embed_grid)
    _check_positive('hidden_size, num_layers, num_heads, mlp_dim, '
                    'vit_patch_size', (self.hidden_size, self.num_layers,
                                       self.num_heads, self.mlp_dim,
                                       self.vit_patch_size))
    if self.hidden_size % self.num_heads:
      raise ValueError(f'hidden_size={self.hidden_size} must be divisible by '
                       f'num_heads={self.num_heads}.')
    for name in ('vit_dropout_rate', 'attention_dropout_rate'):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f'{name} must be in [0, 1), got '
                         f'{getattr(self, name)}.')
    super().__post_init__()

  @property
  def input_divisor(self) -> int:
    """Every spatial size of the input must be a multiple of this."""
    return 2**len(self.features) * self.vit_patch_size

  def decoder_channels(self) -> tuple[int, ...]:
    """Returns the decoder channels at 1/1, ..., 1/2**(L-1)."""
    if self.decoder_features:
      return tuple(self.decoder_features)
    if self.block == 'bottleneck':
      return tuple(max(1, f // 4) for f in self.features)
    return tuple(self.features)

  def check_input(self, x) -> int:
    """Returns the number of spatial dims; raises ValueError on a bad size.

    The message names the size and the nearest valid sizes.
    """
    ndim = layers.check_input(x, 1, type(self).__name__)  # Rank only.
    spatial, factor = tuple(x.shape[1:-1]), self.input_divisor
    bad = list(dict.fromkeys(s for s in spatial if s % factor))
    if not bad:
      return ndim
    near = '; '.join(_nearest_multiples(s, factor)
                     + (f' (for {s})' if len(bad) > 1 else '') for s in bad)
    cnn = 2**len(self.features)
    small = [s // cnn for s in bad if s // cnn < self.vit_patch_size]
    why = (f' (bottleneck sizes {small} after the {cnn}x CNN downsampling '
           f'are smaller than the ViT patch {self.vit_patch_size})'
           if small else '')
    hint = ''
    if x.shape[1] <= 4 < x.shape[-1]:
      hint = (f' The input looks channels-first ({tuple(x.shape)}); this '
              'library is channels-last, move the channel axis to the end.')
    raise ValueError(
        f'TransUNet: input spatial size {spatial} must be divisible by '
        f'{factor} ({cnn} from features of length {len(self.features)} x '
        f'vit_patch_size {self.vit_patch_size}){why}; nearest valid sizes: '
        f'{near}. Resize/crop/pad the input, or use fewer stages or a '
        f'smaller vit_patch_size.{hint}')

  @nn.compact
  def __call__(self, x, train: bool, mc_dropout: bool = False):
    """Returns float32 logits `[B, *spatial, num_classes]`.

    Args:
      x: `[B, H, W, C]` or `[B, D, H, W, C]`, spatial sizes divisible by
        `input_divisor`.
      train: batch statistics + dropout on; BatchNorm running averages update
        (apply with mutable=['batch_stats']).
      mc_dropout: every dropout on at inference too (ViT dropout included;
        Monte Carlo dropout); norms stay in eval mode. Needs a 'dropout' rng
        when any dropout rate is > 0.
    """
    self.check_input(x)
    deterministic = not (train or mc_dropout)
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def rate(where):
      return self.dropout_rate if where in self.dropout_at else 0.0

    maps = ResNetEncoder(self.features, self.stage_blocks, self.block,
                         self.norm, rate('encoder'), name='encoder', **common)(
                             x, train, deterministic)
    y = ViTEncoder(self.hidden_size, self.num_layers, self.num_heads,
                   self.mlp_dim, self.vit_patch_size, self.vit_dropout_rate,
                   self.attention_dropout_rate, tuple(self.pos_embed_grid),
                   name='transformer', **common)(maps[-1], deterministic)
    y = layers.dropout(y, rate('bottleneck'), deterministic)
    decoder = self.decoder_channels()
    y = CascadedUpsampler(
        decoder, self.head_channels or 2 * decoder[-1], self.vit_patch_size,
        self.upsample, self.norm, rate('decoder'), name='decoder', **common)(
            y, maps[:-1], train, deterministic)
    return layers.Head(self.num_classes, self.param_dtype, name='head')(y)
