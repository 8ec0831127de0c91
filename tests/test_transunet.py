"""Tests for medseg_jax.models.transunet: shapes, dtypes, position-embedding
interpolation, input validation, dropout, training, and the R50-ViT-B/16
parameter count.

A tiny model (widths 4-16, one ViT layer of width 16) keeps compiles short on
2 cores; pure shape checks use jax.eval_shape, which compiles nothing.
"""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import transunet as transunet_config
from medseg_jax import models
from medseg_jax.models import registry
from medseg_jax.models import transunet
from tests.test_models import host_init
from tests.test_models import init_rngs
from tests.test_models import rbg_key

# Input divisor 2**3 = 8; a 32x32 input gives a 4x4 token grid.
TINY = dict(features=(4, 8, 16), stage_blocks=(1, 1), block='basic',
            hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32,
            vit_dropout_rate=0.0, dtype=jnp.float32)


def _tiny(num_classes=1, **overrides):
  return models.TransUNet(num_classes, **{**TINY, **overrides})


def _abstract_apply(model, shape, apply_shape=None, **kwargs):
  """Returns (variables, output) shapes: init at shape, apply at apply_shape."""

  def run(x, y):
    variables = model.init(init_rngs(), x, train=False)
    return variables, model.apply(variables, y, train=False, **kwargs)

  return jax.eval_shape(run, jax.ShapeDtypeStruct(shape, jnp.float32),
                        jax.ShapeDtypeStruct(apply_shape or shape, jnp.float32))


def _forward(model, variables, x):
  """Eval-mode logits, jitted: one compile instead of one per op."""
  return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)


def _images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape),
                     jnp.float32)


# ---------------------------------------------------------------- shapes ---


@pytest.mark.parametrize('size', [(32, 32), (24, 40), (8, 16)])
@pytest.mark.parametrize('num_classes', [1, 3])
def test_2d_output_shape(size, num_classes):
  variables, out = _abstract_apply(_tiny(num_classes), (2, *size, 3))
  assert out.shape == (2, *size, num_classes)
  assert out.dtype == jnp.float32
  grid = tuple(s // 8 for s in size)
  pos = variables['params']['transformer']['pos_embed']
  assert pos.shape == (*grid, 16)  # The grid it was made for is its shape.


@pytest.mark.parametrize('option', [
    dict(block='bottleneck', features=(4, 16, 32)), dict(norm='batch'),
    dict(norm='instance'), dict(norm='none'), dict(upsample='nearest'),
    dict(upsample='transpose'), dict(vit_patch_size=2),
    dict(decoder_features=(3, 5, 7), head_channels=6),
])
def test_architecture_options(option):
  variables, out = _abstract_apply(_tiny(**option), (1, 32, 32, 2))
  assert out.shape == (1, 32, 32, 1)
  assert bool(variables.get('batch_stats')) == (option.get('norm') == 'batch')


def test_decoder_channels_follow_the_paper():
  model = models.TransUNet(1)
  assert model.decoder_channels() == (16, 64, 128, 256)
  assert model.input_divisor == 16
  assert _tiny().decoder_channels() == (4, 8, 16)  # Basic units: features.
  assert _tiny(vit_patch_size=2).input_divisor == 16


def test_3d_forward_runs():
  model = _tiny(2, features=(4, 8), stage_blocks=(1,), norm='instance')
  x = _images((1, 8, 16, 12, 1))  # Divisible by 4: a 2x4x3 token grid.
  variables = host_init(model, x)
  assert variables['params']['transformer']['pos_embed'].shape == (2, 4, 3, 16)
  assert variables['params']['encoder']['root_conv']['kernel'].shape == (
      7, 7, 7, 1, 4)
  out = _forward(model, variables, x)
  assert out.shape == (1, 8, 16, 12, 2) and out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))


# ----------------------------------------------------- dtypes and bf16 ---


def test_bfloat16_compute_float32_params_and_logits_close_to_f32():
  x = _images((1, 16, 16, 3))  # bf16 convolutions are slow on CPU.
  f32, bf16 = _tiny(), _tiny(dtype=jnp.bfloat16)
  variables = host_init(f32, x)
  for leaf in jax.tree.leaves(jax.eval_shape(
      lambda x: bf16.init(init_rngs(), x, train=False), x)):
    assert leaf.dtype == jnp.float32
  jaxpr = str(jax.make_jaxpr(
      lambda v, x: bf16.apply(v, x, train=False))(variables, x))
  dots = [line for line in jaxpr.splitlines() if 'dot_general' in line]
  assert dots and all('bf16[' in line for line in dots)  # The ViT in bf16.
  out_f32 = _forward(f32, variables, x)
  out_bf16 = _forward(bf16, variables, x)
  assert out_bf16.dtype == jnp.float32
  # bf16 keeps 8 mantissa bits (relative rounding 0.4%) over ~15 layers;
  # U-Net at the same widths is off by ~0.7% of the logit spread on average.
  error, scale = jnp.abs(out_bf16 - out_f32), float(jnp.std(out_f32))
  assert float(jnp.mean(error)) < 0.03 * scale
  assert float(jnp.max(error)) < 0.25 * scale
  assert np.corrcoef(np.ravel(out_f32), np.ravel(out_bf16))[0, 1] > 0.999


# ------------------------------------------------- position embeddings ---


def test_resize_position_embedding_known_answers():
  pos = jnp.arange(24, dtype=jnp.float32).reshape(2, 3, 4)
  assert transunet.resize_position_embedding(pos, (2, 3)) is pos
  # Linear interpolation of a function linear in the row index: doubling
  # the rows (half-pixel centres) puts rows 0, 0.25, 0.75, 1 of the
  # original grid, clamped at the edges; columns stay.
  ramp = jnp.broadcast_to(jnp.array([0.0, 4.0])[:, None, None], (2, 3, 4))
  out = transunet.resize_position_embedding(ramp, (4, 3))
  np.testing.assert_allclose(out[:, 0, 0], [0.0, 1.0, 3.0, 4.0], atol=1e-6)


def test_position_embeddings_interpolated_for_another_input_size():
  model = _tiny()
  small, large = _images((1, 32, 32, 3)), _images((1, 48, 40, 3), seed=1)
  variables = host_init(model, small)  # pos_embed made for a 4x4 grid.
  pos = variables['params']['transformer']['pos_embed']
  out = _forward(model, variables, large)
  assert out.shape == (1, 48, 40, 1)
  # Same as a model whose embeddings were made for the 6x5 grid and hold
  # the interpolated values: the resize is what happens at apply.
  made_for_6x5 = _tiny(pos_embed_grid=(6, 5))
  resized = jax.tree.map(lambda v: v, variables)
  resized['params']['transformer']['pos_embed'] = (
      transunet.resize_position_embedding(pos, (6, 5)))
  np.testing.assert_allclose(_forward(made_for_6x5, resized, large), out,
                             atol=1e-5)
  # ...and the embeddings matter: without resizing them the output differs.
  resized['params']['transformer']['pos_embed'] = jnp.zeros((6, 5, 16))
  assert not np.allclose(_forward(made_for_6x5, resized, large), out,
                         atol=1e-3)


def test_pos_embed_grid_attribute_sets_parameter_shape():
  variables, out = _abstract_apply(_tiny(pos_embed_grid=(14, 14)),
                                   (1, 32, 32, 3), (1, 64, 64, 3))
  assert variables['params']['transformer']['pos_embed'].shape == (14, 14, 16)
  assert out.shape == (1, 64, 64, 1)


# ------------------------------------------------------------ bad input ---


def test_bad_spatial_size_message():
  with pytest.raises(ValueError) as info:
    _abstract_apply(models.TransUNet(1), (1, 100, 100, 3))
  message = str(info.value)
  assert '(100, 100)' in message and 'divisible by 16' in message
  assert 'nearest valid sizes: 96, 112' in message


def test_bottleneck_smaller_than_vit_patch_message():
  model = _tiny(vit_patch_size=2)  # Divisor 16; 8x8 gives a 1x1 bottleneck.
  with pytest.raises(ValueError, match=r'\(8, 8\).*divisible by 16.*smaller '
                     r'than the ViT patch 2.*nearest valid sizes: 16\.'):
    _abstract_apply(model, (1, 8, 8, 3))


def test_bad_size_3d_and_channels_first_hint():
  model = _tiny(features=(4, 8), stage_blocks=(1,))  # Divisor 4.
  with pytest.raises(ValueError, match=r'\(8, 10, 8\).*8, 12'):
    _abstract_apply(model, (1, 8, 10, 8, 1))
  with pytest.raises(ValueError, match='channels-first'):
    _abstract_apply(_tiny(), (1, 3, 32, 32))
  with pytest.raises(ValueError, match=r'channels-last.*\[B, H, W, C\]'):
    _abstract_apply(_tiny(), (32, 32))


@pytest.mark.parametrize('bad, match', [
    (dict(features=(16,), stage_blocks=()), 'features must list >= 2'),
    (dict(stage_blocks=(1,)), 'stage_blocks must be 2 positive'),
    (dict(decoder_features=(4, 8)), 'decoder_features must be 3 positive'),
    (dict(block='preact'), 'Unknown block'),
    (dict(num_heads=3), 'divisible by num_heads'),
    (dict(vit_patch_size=0), 'positive'),
    (dict(attention_dropout_rate=1.0), 'attention_dropout_rate'),
    (dict(norm='layer'), 'Unknown norm'),
    (dict(upsample='pixelshuffle'), 'Unknown upsample'),
])
def test_bad_options_fail_at_construction(bad, match):
  with pytest.raises(ValueError, match=match):
    _tiny(**bad)


# -------------------------------------------------------------- dropout ---


def test_dropout_deterministic_unless_train_or_mc():
  model = _tiny(vit_dropout_rate=0.1, attention_dropout_rate=0.1,
                dropout_rate=0.5, dropout_at=('bottleneck', 'decoder'))
  x = _images((2, 16, 16, 1))
  variables = host_init(model, x)
  apply = jax.jit(lambda v, x, rng, mc: model.apply(
      v, x, train=False, mc_dropout=mc, rngs={'dropout': rng}),
                  static_argnums=3)
  a = apply(variables, x, rbg_key(1), False)
  b = apply(variables, x, rbg_key(2), False)
  np.testing.assert_array_equal(a, b)
  c = apply(variables, x, rbg_key(1), True)
  d = apply(variables, x, rbg_key(2), True)
  np.testing.assert_array_equal(c, apply(variables, x, rbg_key(1), True))
  assert not np.allclose(c, d)
  assert not np.allclose(a, c)


def test_no_dropout_rng_needed_when_rates_are_zero():
  x = jnp.ones((1, 16, 16, 1))
  variables = jax.eval_shape(
      lambda x: _tiny().init(init_rngs(), x, train=False), x)

  def program(model, mc):
    return str(jax.make_jaxpr(lambda v, x: model.apply(
        v, x, train=False, mc_dropout=mc))(variables, x))

  # Traces in mc_dropout mode without a 'dropout' rng: nothing to drop, so
  # the program is the deterministic one.
  assert program(_tiny(), True) == program(_tiny(), False)
  # Any one rate > 0 needs the rng: the check has teeth.
  for rate in ('dropout_rate', 'vit_dropout_rate', 'attention_dropout_rate'):
    with pytest.raises(flax.errors.InvalidRngError):
      program(_tiny(**{rate: 0.1}), True)


# ------------------------------------------------------------- training ---


def _disk_batch(size=16):
  yy, xx = np.mgrid[:size, :size]
  labels = np.stack([(yy - cy)**2 + (xx - cx)**2 <= r**2
                     for cy, cx, r in [(6, 7, 3.5), (10, 9, 4.5)]])
  labels = labels.astype(np.float32)
  noise = np.random.default_rng(0).normal(0, 0.3, labels.shape)
  return jnp.asarray((labels + noise)[..., None], jnp.float32), jnp.asarray(
      labels)


def test_trains_and_loss_decreases():
  model = _tiny(norm='batch', vit_dropout_rate=0.1, dropout_rate=0.1)
  images, labels = _disk_batch()
  variables = host_init(model, images)
  tx = optax.adam(1e-2)
  params, batch_stats = variables['params'], variables['batch_stats']
  opt_state = tx.init(params)

  def loss_fn(params, batch_stats, rng):
    out, updates = model.apply(
        {'params': params, 'batch_stats': batch_stats}, images, train=True,
        rngs={'dropout': rng}, mutable=['batch_stats'])
    loss = optax.sigmoid_binary_cross_entropy(out[..., 0], labels).mean()
    return loss, updates['batch_stats']

  @jax.jit
  def step(params, batch_stats, opt_state, rng):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  losses = []
  for i in range(15):
    params, batch_stats, opt_state, loss = step(params, batch_stats,
                                                opt_state, rbg_key(i))
    losses.append(float(loss))
  assert all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < 0.6 * losses[0], losses
  for leaf in jax.tree.leaves(params):
    assert leaf.dtype == jnp.float32


# ------------------------------------------------- configs and registry ---


def _from_config(model_cfg, num_classes=1):
  """Builds the model the way training does (shared keys and CONFIG_KEYS)."""
  return models.create_model(model_cfg, num_classes)


def test_config_keys_are_module_attributes():
  fields = {f.name for f in dataclasses.fields(models.TransUNet)}
  assert set(models.TransUNet.CONFIG_KEYS) <= fields
  shared = set(registry._CONFIG_KEYS)  # pylint: disable=protected-access
  assert not set(models.TransUNet.CONFIG_KEYS) & shared
  for arg in (None, 'cpu'):
    model_cfg = transunet_config.get_config(arg).model
    # conv_impl picks XLA's CPU convolution kernel before JAX starts
    # (models/cpu_conv.py): a process setting, not a module attribute.
    known = {'name', 'dtype', 'conv_impl', *shared,
             *models.TransUNet.CONFIG_KEYS}
    assert set(model_cfg.keys()) <= known


def test_vit_b16_hybrid_parameter_count():
  config = transunet_config.get_config()
  model = _from_config(config.model)
  assert isinstance(model, models.TransUNet) and model.num_layers == 12
  size = config.data.image_size
  params = models.abstract_variables(model, (1, size, size, 3))['params']
  # Paper (Chen et al. 2021): 105.28M. The position embeddings scale with
  # the token grid (16x16 at 256, 14x14 at 224); the rest does not.
  assert abs(models.count_params(params) - 105.3e6) < 0.02 * 105.3e6
  assert params['transformer']['pos_embed'].shape == (16, 16, 768)


def test_cpu_config_builds_and_runs_at_its_size():
  config = transunet_config.get_config('cpu')
  model = _from_config(config.model)
  size = config.data.image_size
  assert model.hidden_size == 64 and model.num_layers == 2
  assert model.block == 'basic' and tuple(model.stage_blocks) == (1, 1, 1)
  assert model.num_heads == 4 and model.mlp_dim == 256
  assert size % model.input_divisor == 0
  _, out = _abstract_apply(model, (2, size, size, 3))
  assert out.shape == (2, size, size, 1)
  with pytest.raises(ValueError, match="Unknown config variant 'gpu'"):
    transunet_config.get_config('gpu')
