"""im2col custom_vjp convolution: same values and gradients as XLA's conv."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from medseg_jax.models import cpu_conv


def _plain_conv(x, kernel, padding='SAME'):
  ndim = x.ndim - 2
  return lax.conv_general_dilated(
      x, kernel, (1,) * ndim, padding,
      dimension_numbers=cpu_conv.channels_last_numbers(ndim))


def _inputs(x_shape, k_shape, dtype=jnp.float32):
  kx, kk, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, x_shape, dtype)
  kernel = jax.random.normal(kk, k_shape, dtype)
  return x, kernel, kg


CASES = [
    ((2, 9, 7, 3), (3, 3, 3, 4)),          # 2D 3x3, odd sizes
    ((2, 6, 5, 4, 3), (3, 3, 3, 3, 2)),    # 3D 3x3x3
    ((2, 8, 8, 5), (1, 1, 5, 2)),          # 1x1 (heads, skip projections)
]


@pytest.mark.parametrize('x_shape,k_shape', CASES)
def test_values_and_gradients_match_xla(x_shape, k_shape):
  x, kernel, kg = _inputs(x_shape, k_shape)
  # A random linear cotangent plus a nonlinearity, so every output voxel's
  # gradient differs (a plain sum would hide transposed/flipped kernels).
  weights = jax.random.normal(kg, x_shape[:-1] + (k_shape[-1],))

  def loss(conv):
    return lambda x, k: jnp.sum(jnp.tanh(conv(x, k)) * weights)

  np.testing.assert_array_equal(cpu_conv.im2col_conv(x, kernel),
                                _plain_conv(x, kernel))
  want = jax.grad(loss(_plain_conv), (0, 1))(x, kernel)
  got = jax.jit(jax.grad(loss(cpu_conv.im2col_conv), (0, 1)))(x, kernel)
  for w, g in zip(want, got):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('padding', ['VALID', ((1, 0), (0, 1))])
def test_other_paddings_match_xla(padding):
  x, kernel, _ = _inputs((2, 7, 6, 3), (2, 3, 3, 4))
  want = jax.grad(lambda x, k: jnp.sum(_plain_conv(x, k, padding) ** 2),
                  (0, 1))(x, kernel)
  got = jax.grad(lambda x, k: jnp.sum(cpu_conv.im2col_conv(x, k, padding)**2),
                 (0, 1))(x, kernel)
  for w, g in zip(want, got):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)


def test_vmap_of_grad_equals_loop():
  x, kernel, _ = _inputs((3, 1, 6, 6, 2), (3, 3, 2, 2))
  grad = jax.grad(lambda x, k: jnp.sum(cpu_conv.im2col_conv(x, k) ** 2), 1)
  batched = jax.vmap(grad, in_axes=(0, None))(x, kernel)
  for i in range(3):
    np.testing.assert_allclose(batched[i], grad(x[i], kernel), rtol=1e-6)


def test_forward_mode_is_refused():
  # A custom_vjp has no jvp rule; nothing in the training stack needs one.
  x, kernel, _ = _inputs((1, 4, 4, 1), (3, 3, 1, 1))
  with pytest.raises(TypeError, match='custom_vjp'):
    jax.jvp(cpu_conv.im2col_conv, (x, kernel), (x, kernel))


def test_bfloat16_gradient_dtypes():
  x, kernel, _ = _inputs((1, 5, 5, 2), (3, 3, 2, 3), jnp.bfloat16)
  dx, dk = jax.grad(lambda x, k: jnp.sum(
      cpu_conv.im2col_conv(x, k).astype(jnp.float32)), (0, 1))(x, kernel)
  assert dx.dtype == jnp.bfloat16 and dk.dtype == jnp.bfloat16


def test_flax_drop_in_and_strided_fallback():
  x, _, _ = _inputs((2, 8, 8, 3), (1, 1, 1, 1))
  for strides in (1, 2):
    plain = nn.Conv(4, (3, 3), strides=strides, padding='SAME')
    im2col = nn.Conv(4, (3, 3), strides=strides, padding='SAME',
                     conv_general_dilated=cpu_conv.conv_general_dilated)
    params = plain.init(jax.random.PRNGKey(1), x)
    loss = lambda m: lambda p: jnp.sum(jnp.sin(m.apply(p, x)))
    np.testing.assert_array_equal(im2col.apply(params, x),
                                  plain.apply(params, x))
    want = jax.grad(loss(plain))(params)['params']['kernel']
    got = jax.grad(loss(im2col))(params)['params']['kernel']
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_mismatched_channels_name_the_shapes():
  x, kernel, _ = _inputs((1, 4, 4, 2), (3, 3, 3, 1))
  with pytest.raises(ValueError, match=r'\(1, 4, 4, 2\).*\(3, 3, 3, 1\)'):
    cpu_conv.im2col_conv(x, kernel)


# ------------------------------------------------- the adopted XLA option
def test_prefer_eigen_convolutions_edits_only_what_it_should():
  flag = cpu_conv.EIGEN_CONV_FLAG
  env = {}
  assert cpu_conv.prefer_eigen_convolutions(env, '0.10.2')
  assert env == {'XLA_FLAGS': flag}
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  assert cpu_conv.prefer_eigen_convolutions(env, '0.11.0')
  assert env['XLA_FLAGS'] == f'--xla_force_host_platform_device_count=4 {flag}'
  # The user's own YNNPACK choice wins; an older jaxlib would abort on the flag.
  mine = {'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type='}
  assert not cpu_conv.prefer_eigen_convolutions(mine, '0.10.2')
  assert mine == {'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type='}
  old = {}
  assert not cpu_conv.prefer_eigen_convolutions(old, '0.4.35')
  assert not old


_EIGEN_SCRIPT = r'''
import sys
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from medseg_jax.models import cpu_conv
out = {}
for name, (xs, ks) in {'2d': ((2, 12, 10, 4), (3, 3, 4, 5)),
                       '3d': ((1, 6, 8, 5, 3), (3, 3, 3, 3, 4))}.items():
  kx, kk, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  x, k = jax.random.normal(kx, xs), jax.random.normal(kk, ks)
  wts = jax.random.normal(kg, xs[:-1] + (ks[-1],))
  n = len(xs) - 2
  conv = lambda x, k: lax.conv_general_dilated(
      x, k, (1,) * n, 'SAME', dimension_numbers=cpu_conv.channels_last_numbers(n))
  loss = lambda x, k: jnp.sum(jnp.tanh(conv(x, k)) * wts)
  grad = jax.jit(jax.grad(loss, (0, 1)))
  out[name + '_hlo_ynn'] = np.array('__ynn_fusion' in grad.lower(x, k).compile().as_text())
  out[name + '_dx'], out[name + '_dk'] = map(np.asarray, grad(x, k))
np.savez(sys.argv[1], **out)
'''


def test_eigen_convolution_gradients_match_default(tmp_path):
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  env = dict(os.environ)
  if not cpu_conv.prefer_eigen_convolutions(env):
    pytest.skip('this jaxlib has no YNNPACK flag (Eigen convolutions anyway)')
  script, result = tmp_path / 'eigen.py', tmp_path / 'eigen.npz'
  script.write_text(_EIGEN_SCRIPT)
  subprocess.run([sys.executable, str(script), str(result)], env=env,
                 check=True, timeout=300)
  got = np.load(result)
  cases = {'2d': ((2, 12, 10, 4), (3, 3, 4, 5)),
           '3d': ((1, 6, 8, 5, 3), (3, 3, 3, 3, 4))}
  for name, (xs, ks) in cases.items():
    assert not got[name + '_hlo_ynn']  # The flag reached XLA.
    x, kernel, kg = _inputs(xs, ks)
    weights = jax.random.normal(kg, xs[:-1] + (ks[-1],))
    loss = lambda x, k: jnp.sum(jnp.tanh(_plain_conv(x, k)) * weights)
    dx, dk = jax.grad(loss, (0, 1))(x, kernel)  # This process: XLA's default.
    np.testing.assert_allclose(got[name + '_dx'], dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[name + '_dk'], dk, rtol=1e-5, atol=1e-5)


def test_conv_impl_choice_follows_config():
  from configs import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  assert config.model.conv_impl == 'auto'
  assert cpu_conv.wants_eigen(config.model)  # features[0] = 32
  default.shrink_for_cpu(config)  # features (8, 16, 32, 64)
  assert not cpu_conv.wants_eigen(config.model)
  config.model.conv_impl = 'eigen'
  assert cpu_conv.wants_eigen(config.model)
  config.model.features = (64, 128)
  config.model.conv_impl = 'ynnpack'
  assert not cpu_conv.wants_eigen(config.model)
  assert cpu_conv.wants_eigen(None)  # --mode=evaluate without --config.


def test_bad_conv_impl_is_one_clear_error():
  from configs import default  # pylint: disable=import-outside-toplevel
  from medseg_jax import config_checks  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.model.conv_impl = 'im2col'
  assert not cpu_conv.wants_eigen(config.model)
  with pytest.raises(ValueError, match=r"config.model.conv_impl='im2col'"):
    config_checks.validate_config(config)
