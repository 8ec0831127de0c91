"""Tests for medseg_jax.models: shapes, dtypes, deep supervision, dropout,
input validation, the registry, and a few training steps per architecture.

Shapes are tiny (32x32, widths 4-16): XLA CPU convolutions are slow on 2 cores.
Pure shape checks use jax.eval_shape, which traces without compiling.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from medseg_jax import models
from medseg_jax.models import layers

TINY = (4, 8, 16)
ARCHS = {'unet': models.UNet, 'unetpp': models.UNetPlusPlus}


def rbg_key(seed):
  """Returns an 'rbg' PRNG key (also used by test_transunet).

  With jax_threefry_partitionable (the default) every threefry random op
  takes seconds to compile on CPU; these tests need no threefry.
  """
  return jax.random.key(seed, impl='rbg')


def init_rngs(seed=0):
  """Returns the {'params', 'dropout'} rngs of `model.init`."""
  return {'params': rbg_key(seed), 'dropout': rbg_key(seed + 1)}


def host_init(model, x):
  """Returns variables for `x` filled on the host: no RNG program to compile.

  Shared with test_transunet. Kernels ~ N(0, 2 / fan_in) (He), position
  embeddings ~ N(0, 1), scales and variances 1, the rest 0.
  """
  abstract = jax.eval_shape(
      lambda x: model.init(init_rngs(), x, train=False),
      jax.ShapeDtypeStruct(x.shape, jnp.float32))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if 'kernel' in name:
      fan_in = int(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.normal(0, np.sqrt(2 / fan_in), leaf.shape),
                         leaf.dtype)
    if 'pos_embed' in name:
      return jnp.asarray(rng.normal(0, 1, leaf.shape), leaf.dtype)
    if 'scale' in name or 'var' in name:
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.zeros(leaf.shape, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def _abstract_apply(model, shape, train=False, **kwargs):
  """Returns (variables, output) shapes without compiling anything."""
  x = jax.ShapeDtypeStruct(shape, jnp.float32)

  def run(x):
    variables = model.init(init_rngs(), x, train=False)
    out = model.apply(variables, x, train=train, rngs=init_rngs(5),
                      mutable=['batch_stats'] if train else False, **kwargs)
    return variables, out[0] if train else out

  return jax.eval_shape(run, x)


def _model_cfg(**overrides):
  cfg = ml_collections.ConfigDict(dict(
      name='unetpp', features=TINY, norm='batch', dtype='float32',
      upsample='transpose', residual=False, deep_supervision=False,
      dropout_rate=0.0))
  cfg.update(overrides)
  return cfg


# ---------------------------------------------------------------- shapes ---


@pytest.mark.parametrize('arch', sorted(ARCHS))
@pytest.mark.parametrize('size', [(32, 32), (48, 64), (16, 80)])
@pytest.mark.parametrize('num_classes', [1, 3])
def test_2d_output_shape(arch, size, num_classes):
  model = ARCHS[arch](num_classes, features=TINY, dtype=jnp.float32)
  _, out = _abstract_apply(model, (2, *size, 3))
  assert out.shape == (2, *size, num_classes)
  assert out.dtype == jnp.float32


@pytest.mark.parametrize('arch', sorted(ARCHS))
def test_3d_forward_runs(arch):
  model = ARCHS[arch](2, features=(4, 8), norm='instance',
                      dtype=jnp.float32)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, 16, 12, 1)),
                  jnp.float32)
  variables = host_init(model, x)
  out = model.apply(variables, x, train=False)
  assert out.shape == (1, 8, 16, 12, 2)
  assert out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))
  kernel = variables['params']['head']['conv']['kernel']
  assert kernel.shape == (1, 1, 1, 4, 2)  # 3D 1x1x1 conv: ndim from input.


@pytest.mark.parametrize('arch', sorted(ARCHS))
@pytest.mark.parametrize('option', [
    dict(norm='group'), dict(norm='instance'), dict(norm='none'),
    dict(upsample='linear'), dict(upsample='nearest'),
    dict(residual=True), dict(downsample='strided'),
])
def test_architecture_options(arch, option):
  model = ARCHS[arch](1, features=(4, 8, 12), dtype=jnp.float32, **option)
  variables, out = _abstract_apply(model, (1, 16, 16, 2), train=True)
  assert out.shape == (1, 16, 16, 1)
  has_stats = bool(variables.get('batch_stats'))
  uses_batch_norm = option.get('norm', 'batch') == 'batch'
  assert has_stats == uses_batch_norm


def test_group_count_divides_channels():
  assert layers.group_count(32) == 8
  assert layers.group_count(12) == 6
  assert layers.group_count(4) == 4
  assert layers.group_count(10) == 5
  assert layers.group_count(7) == 7


@pytest.mark.parametrize('arch', sorted(ARCHS))
def test_bfloat16_compute_float32_params_and_logits(arch):
  model = ARCHS[arch](1, features=TINY, dtype=jnp.bfloat16)
  x = jnp.zeros((1, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init(init_rngs(), x, train=False), x)
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32
  real = host_init(model, x)
  jaxpr = jax.make_jaxpr(
      lambda v, x: model.apply(v, x, train=False))(real, x)
  convs = [line for line in str(jaxpr).splitlines()
           if 'conv_general_dilated' in line]
  assert convs
  # Every convolution but the float32 logit head runs in bfloat16...
  assert sum('bf16[' in line for line in convs) == len(convs) - 1
  out = model.apply(real, x, train=False)
  assert out.dtype == jnp.float32  # ...and the logits come back in float32.


def test_real_init_float32_he_scaled():
  model = models.UNet(1, features=(4, 8), dtype=jnp.bfloat16)
  variables = model.init(init_rngs(), jnp.zeros((1, 16, 16, 3)), train=False)
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32
  kernel = variables['params']['enc_1']['conv2']['kernel']  # 3x3x8 -> 8.
  assert kernel.shape == (3, 3, 8, 8)
  np.testing.assert_allclose(jnp.std(kernel), np.sqrt(2 / 72), rtol=0.3)
  assert set(variables['batch_stats']['enc_0']) == {'norm1', 'norm2'}


# ------------------------------------------------------ deep supervision ---


def test_deep_supervision_outputs_final_last():
  model = models.UNetPlusPlus(2, features=(4, 8, 8, 16), norm='group',
                              deep_supervision=True, dtype=jnp.float32)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 1)),
                  jnp.float32)
  variables = host_init(model, x)
  outs = model.apply(variables, x, train=True)
  assert isinstance(outs, list) and len(outs) == 3  # X^{0,1}, X^{0,2}, X^{0,3}
  for out in outs:
    assert out.shape == (2, 32, 32, 2) and out.dtype == jnp.float32
  final = model.apply(variables, x, train=False)
  assert isinstance(final, jax.Array)
  # No dropout and no batch statistics: train and eval outputs coincide, so
  # the last list entry must be the eval output (the final head).
  np.testing.assert_allclose(outs[-1], final, rtol=1e-5, atol=1e-5)
  assert not np.allclose(outs[0], final, atol=1e-3)


def test_without_deep_supervision_always_one_array():
  model = models.UNetPlusPlus(1, features=TINY, norm='group',
                              dtype=jnp.float32)
  _, out = _abstract_apply(model, (1, 32, 32, 1), train=True)
  assert out.shape == (1, 32, 32, 1)


# --------------------------------------------------------------- dropout ---


def test_dropout_deterministic_unless_train_or_mc():
  model = models.UNet(1, features=TINY, dropout_rate=0.5,
                      dropout_at=('bottleneck', 'decoder'), dtype=jnp.float32)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 1)),
                  jnp.float32)
  variables = host_init(model, x)
  apply = jax.jit(lambda v, x, rng, mc: model.apply(
      v, x, train=False, mc_dropout=mc, rngs={'dropout': rng}),
                  static_argnums=3)
  a = apply(variables, x, rbg_key(1), False)
  b = apply(variables, x, rbg_key(2), False)
  np.testing.assert_array_equal(a, b)
  c = apply(variables, x, rbg_key(1), True)
  d = apply(variables, x, rbg_key(2), True)
  e = apply(variables, x, rbg_key(1), True)
  assert not np.allclose(c, d)
  np.testing.assert_array_equal(c, e)  # Same rng, same mask.
  assert not np.allclose(a, c)


def test_no_dropout_layers_when_rate_is_zero():
  model = models.UNet(1, features=TINY, dtype=jnp.float32)
  x = jnp.ones((1, 32, 32, 1))
  variables = jax.eval_shape(
      lambda x: model.init(init_rngs(), x, train=False), x)

  def program(m, mc):
    return str(jax.make_jaxpr(lambda v, x: m.apply(
        v, x, train=False, mc_dropout=mc))(variables, x))

  # Traces in mc_dropout mode without a 'dropout' rng: nothing to drop, so
  # the program is the deterministic one.
  assert program(model, True) == program(model, False)
  # The same call with a dropout rate needs the rng: the check has teeth.
  dropping = models.UNet(1, features=TINY, dtype=jnp.float32,
                         dropout_rate=0.5)
  with pytest.raises(flax.errors.InvalidRngError):
    program(dropping, True)


# -------------------------------------------------------- bad input ---


def test_bad_spatial_size_message():
  model = models.UNet(1)  # 5 levels -> divisible by 16.
  with pytest.raises(ValueError) as info:
    _abstract_apply(model, (1, 100, 100, 3))
  message = str(info.value)
  assert '(100, 100)' in message
  assert 'divisible by 16' in message
  assert 'features of length 5' in message
  assert '96, 112' in message


def test_bad_spatial_size_3d_unetpp():
  model = models.UNetPlusPlus(1, features=TINY)  # divisible by 4.
  with pytest.raises(ValueError, match=r'\(8, 10, 8\).*divisible by 4.*8, 12'):
    _abstract_apply(model, (1, 8, 10, 8, 1))


@pytest.mark.parametrize('shape', [(32, 32), (1, 32, 32), (1, 1, 8, 8, 8, 1)])
def test_bad_ndim_message(shape):
  model = models.UNet(1, features=TINY)
  with pytest.raises(ValueError, match=r'channels-last.*\[B, H, W, C\]'):
    _abstract_apply(model, shape)


def test_bad_options_fail_at_construction():
  with pytest.raises(ValueError, match='Unknown norm'):
    models.UNet(1, norm='layer')
  with pytest.raises(ValueError, match='Unknown upsample'):
    models.UNetPlusPlus(1, upsample='pixelshuffle')
  with pytest.raises(ValueError, match='dropout_at'):
    models.UNet(1, dropout_rate=0.1, dropout_at=('middle',))
  with pytest.raises(ValueError, match='features'):
    models.UNet(1, features=(16,))


# -------------------------------------------------------------- registry ---


def test_create_model_from_config():
  model = models.create_model(_model_cfg(name='unet', dtype='bfloat16'), 3)
  assert isinstance(model, models.UNet)
  assert model.num_classes == 3 and model.dtype == jnp.bfloat16
  assert tuple(model.features) == TINY
  model = models.create_model(
      _model_cfg(deep_supervision=True, dropout_rate=0.2, upsample='bilinear'),
      1)
  assert isinstance(model, models.UNetPlusPlus)
  assert model.deep_supervision and model.dropout_rate == 0.2
  assert model.dtype == jnp.float32


def test_create_model_errors():
  with pytest.raises(ValueError, match='unet, unetpp'):
    models.create_model(_model_cfg(name='transformer'), 1)
  with pytest.raises(ValueError, match='config.model.dtype'):
    models.create_model(_model_cfg(dtype='fp8'), 1)
  with pytest.raises(ValueError, match='deep_supervision'):
    models.create_model(_model_cfg(name='unet', deep_supervision=True), 1)
  with pytest.raises(ValueError, match='Unknown norm'):
    models.create_model(_model_cfg(norm='batchnorm'), 1)
  with pytest.raises(ValueError, match='num_classes'):
    models.create_model(_model_cfg(), 0)
  assert set(models.known_models()) >= {'unet', 'unetpp'}


def test_count_params_and_summary():
  model = models.create_model(_model_cfg(name='unet'), 1)
  summary = models.model_summary(model, (2, 32, 32, 3))
  variables = models.abstract_variables(model, (1, 32, 32, 3))
  assert summary['params'] == models.count_params(variables['params']) > 0
  # At least the MACs of the first 3x3 conv: 32*32 pixels * 27 * 4 * 2 FLOPs.
  assert summary['flops_per_example'] > 32 * 32 * 27 * 4 * 2


def test_classic_parameter_counts():
  unet = models.UNet(1, features=(64, 128, 256, 512, 1024))
  unetpp = models.UNetPlusPlus(1)
  n_unet = models.count_params(
      models.abstract_variables(unet, (1, 256, 256, 3))['params'])
  n_unetpp = models.count_params(
      models.abstract_variables(unetpp, (1, 256, 256, 3))['params'])
  assert 30.5e6 < n_unet < 31.5e6
  assert 8.5e6 < n_unetpp < 9.5e6


# -------------------------------------------------------------- training ---


def _disk_batch(size=32, batch=2):
  yy, xx = np.mgrid[:size, :size]
  masks = []
  for cy, cx, r in [(12, 14, 7), (20, 18, 9)][:batch]:
    masks.append((yy - cy)**2 + (xx - cx)**2 <= r**2)
  labels = np.stack(masks).astype(np.float32)
  noise = np.random.default_rng(0).normal(0, 0.3, labels.shape)
  images = (labels + noise)[..., None].astype(np.float32)
  return jnp.asarray(images), jnp.asarray(labels)


@pytest.mark.parametrize('arch, extra', [
    ('unet', {}),
    ('unetpp', dict(deep_supervision=True)),
])
def test_trains_and_loss_decreases(arch, extra):
  model = ARCHS[arch](1, features=TINY, dtype=jnp.float32, dropout_rate=0.1,
                      **extra)
  images, labels = _disk_batch()
  variables = host_init(model, images)
  tx = optax.adam(1e-2)
  params, batch_stats = variables['params'], variables['batch_stats']
  opt_state = tx.init(params)

  def loss_fn(params, batch_stats, rng):
    outs, updates = model.apply(
        {'params': params, 'batch_stats': batch_stats}, images, train=True,
        rngs={'dropout': rng}, mutable=['batch_stats'])
    outs = outs if isinstance(outs, list) else [outs]
    loss = sum(optax.sigmoid_binary_cross_entropy(o[..., 0], labels).mean()
               for o in outs) / len(outs)
    return loss, updates['batch_stats']

  @jax.jit
  def step(params, batch_stats, opt_state, rng):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  losses = []
  for i in range(15):
    params, batch_stats, opt_state, loss = step(
        params, batch_stats, opt_state, rbg_key(i))
    losses.append(float(loss))
  assert all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < 0.6 * losses[0], losses
  for leaf in jax.tree.leaves(params):
    assert leaf.dtype == jnp.float32


@pytest.mark.parametrize('ndim', [2, 3])
def test_transpose_upsampling_equals_flax_conv_transpose(ndim):
  # Up('transpose') is a matmul + depth-to-space; with its kernel reshaped
  # (and spatially flipped, the transposed-convolution convention) it must
  # give exactly nn.ConvTranspose(kernel 2, stride 2).
  x = jax.random.normal(jax.random.PRNGKey(0), (2,) + (3,) * ndim + (4,))
  up = layers.Up(5, 'transpose', dtype=jnp.float32)
  variables = up.init(jax.random.PRNGKey(1), x)
  params = variables['params']
  bias = jnp.arange(5, dtype=jnp.float32)
  params = {**params, 'conv_transpose_bias': bias}
  kernel = params['conv_transpose']['kernel'].reshape(4, *(2,) * ndim, 5)
  kernel = jnp.flip(jnp.moveaxis(kernel, 0, ndim), axis=tuple(range(ndim)))
  reference = nn.ConvTranspose(5, (2,) * ndim, strides=(2,) * ndim,
                               padding='VALID')
  expected = reference.apply({'params': {'kernel': kernel, 'bias': bias}}, x)
  np.testing.assert_allclose(up.apply({'params': params}, x), expected,
                             atol=1e-5)
