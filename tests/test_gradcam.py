"""Grad-CAM: layer names, shape, range, and the region driving the logit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax import gradcam
from medseg_jax import models


class Pool(nn.Module):
  """2x average pooling as a named submodule (so Grad-CAM can target it)."""

  @nn.compact
  def __call__(self, x):
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Probe(nn.Module):
  """feat = relu(1x1 conv); logit = head(upsampled pool(feat)).

  With the identity as `feat` and head weights (1, 0), bias -0.5, the logit
  is driven by input channel 0 only; channel 1 has no influence.
  """

  @nn.compact
  def __call__(self, x, train: bool = False):
    feat = nn.relu(nn.Conv(2, (1, 1), use_bias=False, name='feat')(x))
    pooled = Pool(name='pool')(feat)
    up = jnp.repeat(jnp.repeat(pooled, 2, axis=1), 2, axis=2)
    return nn.Conv(1, (1, 1), name='head')(up)


def _probe_variables():
  return {'params': {
      'feat': {'kernel': jnp.eye(2).reshape(1, 1, 2, 2)},
      'head': {'kernel': jnp.array([1.0, 0.0]).reshape(1, 1, 2, 1),
               'bias': jnp.array([-0.5])}}}


def _two_squares():
  """Channel 0: a square at the top left; channel 1: one at the bottom right."""
  image = np.zeros((16, 16, 2), np.float32)
  image[2:6, 2:6, 0] = 1.0
  image[10:14, 10:14, 1] = 1.0
  return image


def test_highlights_the_region_driving_the_logit():
  model, variables, image = Probe(), _probe_variables(), _two_squares()
  cam = gradcam.grad_cam(model, variables, image, 'feat')
  # d logit / d feat_1 = 0, so alpha_1 = 0 and the map is feat_0 scaled:
  # exactly the top-left square.
  expected = np.zeros((16, 16), np.float32)
  expected[2:6, 2:6] = 1.0
  np.testing.assert_allclose(cam, expected, atol=1e-6)
  # At half resolution the map is upsampled: high on the driving square,
  # nothing on the other one.
  coarse = gradcam.grad_cam(model, variables, image, 'pool')
  assert coarse.shape == (16, 16)
  assert coarse[2:6, 2:6].mean() > 0.5 and coarse.max() == 1.0
  assert coarse[9:, 9:].max() == 0.0


def test_explicit_region_and_target_checks():
  model, variables, image = Probe(), _probe_variables(), _two_squares()
  # A region whose logits do not depend on the features: no map at all.
  np.testing.assert_array_equal(
      gradcam.grad_cam(model, variables, image, 'feat',
                       mask=np.zeros((16, 16))), 0.0)
  # The model is linear in feat_0, so any region gives alpha_0 > 0 and the
  # same normalised map as the default (predicted) region.
  np.testing.assert_allclose(
      gradcam.grad_cam(model, variables, image, 'feat', mask=np.ones((16, 16))),
      gradcam.grad_cam(model, variables, image, 'feat'), atol=1e-6)
  with pytest.raises(ValueError, match='target_class=1'):
    gradcam.grad_cam(model, variables, image, 'feat', target_class=1)
  with pytest.raises(ValueError, match=r'choose one of: feat, pool, head'):
    gradcam.grad_cam(model, variables, image, 'conv_7')


@pytest.mark.parametrize('shape', [(16, 16, 1), (8, 8, 8, 1)])
def test_unet_names_shape_and_range(shape):
  model = models.create_model(
      dict(name='unet', features=(4, 8), norm='batch', dtype='float32'), 3)
  variables = jax.jit(lambda k: model.init({'params': k},
                                           jnp.zeros((1, *shape)),
                                           train=False))(
                                               jax.random.key(0, impl='rbg'))
  image = np.random.RandomState(0).randn(*shape).astype(np.float32)
  names = gradcam.feature_layer_names(model, variables, image)
  assert names.index('enc_0') < names.index('enc_1') < names.index('dec_0')
  assert 'head' in names and 'enc_1/conv2' in names
  for layer in ('enc_1', 'dec_0/conv2'):
    cam = gradcam.grad_cam(model, variables, image, layer, target_class=2)
    assert cam.shape == shape[:-1] and cam.dtype == np.float32
    assert cam.min() == 0.0 and cam.max() == pytest.approx(1.0)


def test_overlay_known_colours():
  image = np.linspace(0, 10, 12, dtype=np.float32).reshape(3, 4)
  heat = np.zeros((3, 4), np.float32)
  heat[0, 0] = 1.0
  grey = gradcam.overlay(image, heat, alpha=0.0)
  assert grey.shape == (3, 4, 3) and grey.dtype == np.uint8
  np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
  assert grey[0, 0, 0] == 0 and grey[-1, -1, 0] == 255
  colours = gradcam.overlay(image[..., None], heat, alpha=1.0, cmap='jet')
  np.testing.assert_array_equal(colours[0, 0], [128, 0, 0])  # jet(1).
  np.testing.assert_array_equal(colours[0, 1], [0, 0, 128])  # jet(0).
  with pytest.raises(ValueError, match='same size'):
    gradcam.overlay(image, heat[:2])
