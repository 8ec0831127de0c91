"""Anisotropic pooling: `config.model.strides` in U-Net and UNet++, 2D and 3D."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax import config_checks
from medseg_jax import config_lib
from medseg_jax import export
from medseg_jax import inference
from medseg_jax import models

RNGS = {'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)}


def _model(name, strides=(), **kwargs):
  cfg = dict(name=name, features=(4, 8, 16), norm='batch', dtype='float32',
             strides=strides, deep_supervision=name == 'unetpp')
  cfg.update(kwargs)
  return models.create_model(cfg, 2)


@pytest.mark.parametrize('name', ['unet', 'unetpp'])
def test_default_strides_equal_explicit_twos(name):
  """strides=() is 2 on every axis: same parameter tree, bit-equal outputs."""
  x = jax.random.normal(jax.random.PRNGKey(2), (1, 8, 8, 3))
  default, explicit = _model(name), _model(name, ((2, 2), (2, 2)))
  v_default = default.init(RNGS, x, train=False)
  v_explicit = explicit.init(RNGS, x, train=False)
  shapes = lambda v: jax.tree.map(lambda a: a.shape, v)  # pylint: disable=unnecessary-lambda-assignment
  assert shapes(v_default) == shapes(v_explicit)
  assert jax.tree.all(jax.tree.map(np.array_equal, v_default, v_explicit))
  np.testing.assert_array_equal(default.apply(v_default, x, train=False),
                                explicit.apply(v_explicit, x, train=False))
  assert default.input_divisor == 4 == inference.input_divisor(default)


def _forward_shapes(model, x):
  """(logits shape, {module name: spatial shape of its output}), traced
  only (jax.eval_shape: nothing is computed)."""

  def forward(x):
    variables = model.init(RNGS, x, train=False)
    return model.apply(variables, x, train=False, capture_intermediates=True,
                       mutable=['intermediates'])

  logits, state = jax.eval_shape(forward, x)
  return logits.shape, {name: out['__call__'][0].shape[1:-1]
                        for name, out in state['intermediates'].items()
                        if name != '__call__'}


@pytest.mark.parametrize('name,spatial,strides,up,down', [
    ('unet', (4, 16), ((1, 2), (2, 2)), 'transpose', 'maxpool'),
    ('unetpp', (8, 8, 16), ((1, 2, 2), (2, 1, 2)), 'linear', 'strided'),
    ('unet', (4, 8, 8), ((1, 2, 2), (2, 2, 2)), 'transpose', 'strided'),
])
def test_anisotropic_levels_follow_the_strides(name, spatial, strides, up,
                                               down):
  """Each level's feature map is the input divided by the strides so far;
  the output has the input's shape."""
  model = _model(name, strides, upsample=up, downsample=down)
  x = jax.ShapeDtypeStruct((1, *spatial, 1), jnp.float32)
  logits, shapes = _forward_shapes(model, x)
  expected = [tuple(spatial)]
  for row in strides:
    expected.append(tuple(s // r for s, r in zip(expected[-1], row)))
  enc = 'enc_{}' if name == 'unet' else 'X_{}_0'
  for level, shape in enumerate(expected):
    assert shapes[enc.format(level)] == shape, (level, shapes)
  for level in range(len(strides)):  # Upsampling undoes the same strides.
    up_name = f'up_{level}' if name == 'unet' else f'up_{level}_1'
    assert shapes[up_name] == expected[level]
  total = tuple(int(np.prod([r[a] for r in strides]))
                for a in range(len(spatial)))
  assert model.input_divisor == total
  assert logits == (1, *spatial, 2)


def test_sliding_window_with_a_patch_only_the_anisotropic_model_accepts():
  """Patch (2, 8, 8): divisible by the per-axis product (2, 4, 4), not by 4."""
  strides = ((1, 2, 2), (2, 2, 2))
  patch = (2, 8, 8)
  with pytest.raises(ValueError, match='divisible by 4'):
    _model('unet').init(RNGS, jnp.ones((1, *patch, 1)), train=False)
  model = _model('unet', strides)
  variables = model.init(RNGS, jnp.ones((1, *patch, 1)), train=False)
  image = np.random.default_rng(0).normal(size=(5, 11, 9, 1))
  probs = inference.sliding_window(inference.make_predict_fn(model,
                                                             variables),
                                   image, patch, overlap=0.5, batch_size=2)
  assert probs.shape == (5, 11, 9, 2)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_whole_image_padding_is_per_axis():
  """predict_whole pads each axis to its own multiple, then crops back."""
  seen = []

  def predict_fn(x):
    seen.append(x.shape)
    return np.zeros((*x.shape[:-1], 1), np.float32)

  out = inference.predict_whole(predict_fn, np.ones((5, 6, 7, 1)), (2, 4, 4))
  assert seen == [(1, 6, 8, 8, 1)] and out.shape == (5, 6, 7, 1)
  with pytest.raises(ValueError, match='config.model.strides'):
    inference.predict_whole(predict_fn, np.ones((6, 7, 1)), (2, 4, 4))


def test_export_symbolic_shape_uses_per_axis_multiples():
  config = config_lib.default_config()
  config.data.image_size = 32
  config.model.features = (4, 8, 16)
  config.model.strides = ((1, 2), (2, 2))
  config.model.name = 'unet'
  model = models.create_model(config.model, 1)
  _, spec = export.export_shapes(config, model)
  assert spec == 'b, 2*s0, 4*s1, 3'


@pytest.mark.parametrize('strides,fragment', [
    (((1, 2, 2),), 'expected 2 per-axis stride tuples'),
    (((1, 2, 2), (2, 2)), 'expected 2 per-axis stride tuples'),
    (((1, 2, 2, 2), (2, 2, 2, 2)), 'expected 2 per-axis stride tuples'),
])
def test_bad_strides_are_one_line_naming_the_key(strides, fragment):
  with pytest.raises(ValueError, match=fragment) as error:
    _model('unet', strides)
  assert 'config.model.strides=' in str(error.value)
  assert '\n' not in str(error.value)
  config = config_lib.default_config()
  config.model.features = (4, 8, 16)
  config.model.strides = strides
  problems = [p for p in config_checks.config_problems(config)
              if 'model.strides' in p]
  assert len(problems) == 1 and '\n' not in problems[0]


def test_rank_mismatch_with_the_input_or_patch_is_refused():
  model = _model('unet', ((1, 2), (2, 2)))
  with pytest.raises(ValueError, match='give 3 strides per level'):
    model.init(RNGS, jnp.ones((1, 4, 8, 8, 1)), train=False)
  config = config_lib.default_config()
  config.model.features = (4, 8, 16)
  config.model.strides = ((1, 2), (2, 2))
  config.data.patch_size = (4, 8, 8)
  assert any('give one stride per patch axis' in p
             for p in config_checks.config_problems(config))


def test_transunet_refuses_anisotropic_strides():
  cfg = dict(name='transunet', features=(8, 16, 32), stage_blocks=(1, 1),
             hidden_size=16, num_layers=1, num_heads=2, mlp_dim=16)
  models.create_model(dict(cfg, strides=()), 1)
  models.create_model(dict(cfg, strides=((2, 2), (2, 2))), 1)
  with pytest.raises(ValueError, match='pools by 2 along every axis'):
    models.create_model(dict(cfg, strides=((1, 2), (2, 2))), 1)
