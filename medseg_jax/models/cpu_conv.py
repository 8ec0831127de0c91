"""CPU convolution speed: the XLA option that is used, and the im2col experiment.

XLA's CPU backend computed a convolution's weight gradient ~5x slower than its
forward pass (issue 17). The cause is the YNNPACK convolution that jaxlib
>= 0.10.2 uses by default; XLA's older Eigen convolution computes the same
gradients 3-4x faster and the UNet train step ~1.5x faster (figures and
command in README "Performance"). `prefer_eigen_convolutions` switches to it;
main.py calls `configure_cpu_convolutions` (config.model.conv_impl) before JAX
starts. YNNPACK keeps the matmuls, where it is faster than Eigen.

The experiment that did not help is kept for the benchmark: the same function,
`lax.conv_general_dilated` for stride 1, no dilation and one feature group,
with a `jax.custom_vjp` whose weight gradient is a sum of per-offset matmuls
(im2col without materialising the patch matrix) and whose input gradient is a
forward convolution with the flipped kernel. `scripts/bench_conv_grad.py`
measures it against XLA's own gradient; `conv_general_dilated` is a drop-in
for flax's `nn.Conv(conv_general_dilated=...)`.

Arrays are channels-last: `x [B, *spatial, Cin]`, kernel `[*window, Cin, Cout]`.
"""

import itertools
import math
import os
from typing import MutableMapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ('xla', 'im2col')

# Takes convolutions (not dots or reductions) away from YNNPACK, back to Eigen.
EIGEN_CONV_FLAG = ('--xla_cpu_experimental_ynn_fusion_type='
                   '-individual_convolution')
_YNN_FLAG_NAME = 'xla_cpu_experimental_ynn_fusion_type'
# The first jaxlib that parses the flag; an unknown flag in XLA_FLAGS aborts
# the process, so older jaxlibs (which use Eigen convs anyway) are left alone.
_FIRST_JAXLIB_WITH_FLAG = (0, 10, 1)


def _version_tuple(version: str) -> tuple[int, ...]:
  parts = []
  for piece in version.split('.')[:3]:
    digits = ''.join(itertools.takewhile(str.isdigit, piece))
    parts.append(int(digits or 0))
  return tuple(parts)


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # Private API: assume the worst.
    return True


# config.model.conv_impl: which XLA:CPU convolution a run uses.
CONV_IMPLS = ('auto', 'eigen', 'ynnpack')
# 'auto' picks Eigen when the first level is at least this wide: measured
# 1.5x on the UNet train step at widths 32..512, but 0.87-0.90x on the :cpu
# recipes' widths 8..64 (YNNPACK is faster on convs with few channels at small
# spatial sizes). Every full-size recipe starts at >= 32.
AUTO_MIN_WIDTH = 32


def wants_eigen(model_cfg) -> bool:
  """Returns whether a model config asks for Eigen convolutions on CPU.

  Args:
    model_cfg: `config.model` (a ConfigDict or dict), or None when unknown
      (e.g. --mode=evaluate reads it from the workdir later).

  Returns:
    True for conv_impl 'eigen', and for 'auto' (the default) unless the first
    entry of `features` is below AUTO_MIN_WIDTH. False for 'ynnpack' and for
    invalid values, which `config_checks.validate_config` reports.
  """
  model_cfg = model_cfg if model_cfg is not None else {}
  impl = model_cfg.get('conv_impl', 'auto')
  if impl != 'auto':
    return impl == 'eigen'
  try:
    return int(model_cfg.get('features')[0]) >= AUTO_MIN_WIDTH
  except (TypeError, IndexError, ValueError):
    return True  # Width unknown: wide convolutions are the common case.


def configure_cpu_convolutions(get_model_config) -> bool:
  """Applies config.model.conv_impl before JAX starts; see `wants_eigen`.

  Args:
    get_model_config: zero-argument callable returning `config.model`; its
      errors (a config that does not load) count as "unknown": the caller
      reports them.

  Returns:
    Whether Eigen convolutions were switched on.
  """
  try:
    model_cfg = get_model_config()
  except (OSError, AttributeError, KeyError, TypeError, ValueError):
    model_cfg = None
  return wants_eigen(model_cfg) and prefer_eigen_convolutions()


def prefer_eigen_convolutions(environ: MutableMapping[str, str] | None = None,
                              jaxlib_version: str | None = None) -> bool:
  """Makes XLA:CPU run convolutions with Eigen instead of YNNPACK.

  Appends `EIGEN_CONV_FLAG` to $XLA_FLAGS. XLA reads the flags once, when the
  first backend starts, so call this before any JAX computation; it changes
  nothing on GPU/TPU. Values and gradients are the same convolutions up to
  float summation order (tests/test_cpu_conv.py).

  Args:
    environ: the environment to edit (default os.environ).
    jaxlib_version: the installed jaxlib's version (default: read it).

  Returns:
    True if the flag was added; False when the user's $XLA_FLAGS already set
    the YNNPACK fusion types (their choice wins), the jaxlib predates the
    flag, or a JAX backend already started (too late to take effect).
  """
  environ = os.environ if environ is None else environ
  if jaxlib_version is None:
    import jaxlib.version  # pylint: disable=import-outside-toplevel
    jaxlib_version = jaxlib.version.__version__
  flags = environ.get('XLA_FLAGS', '')
  if (_YNN_FLAG_NAME in flags
      or _version_tuple(jaxlib_version) < _FIRST_JAXLIB_WITH_FLAG
      or (environ is os.environ and _backends_started())):
    return False
  environ['XLA_FLAGS'] = f'{flags} {EIGEN_CONV_FLAG}'.strip()
  return True


def channels_last_numbers(ndim: int) -> tuple[str, str, str]:
  """Returns the channels-last dimension numbers for `ndim` spatial dims.

  Args:
    ndim: 1, 2 or 3 spatial dimensions.

  Returns:
    `(lhs, rhs, out)` specs, e.g. ('NHWC', 'HWIO', 'NHWC') for 2D.
  """
  if not 1 <= ndim <= 3:
    raise ValueError(f'channels_last_numbers: ndim must be 1..3, got {ndim}.')
  spatial = 'DHW'[-ndim:]
  return f'N{spatial}C', f'{spatial}IO', f'N{spatial}C'


def resolve_padding(padding, window: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """Returns explicit (low, high) pads for a stride-1 convolution.

  Args:
    padding: 'SAME', 'VALID' or a sequence of (low, high) pairs.
    window: the kernel's spatial size.

  Returns:
    One (low, high) pair per spatial dimension.
  """
  if isinstance(padding, str):
    ones = (1,) * len(window)
    return tuple(map(tuple, lax.padtype_to_pads(ones, window, ones, padding)))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def _forward(x, kernel, pads):
  ndim = x.ndim - 2
  return lax.conv_general_dilated(
      x, kernel, (1,) * ndim, pads,
      dimension_numbers=channels_last_numbers(ndim))


def _weight_gradient(x, g, window, pads):
  """Returns dL/dkernel `[*window, Cin, Cout]` as one matmul per window offset."""
  out_spatial = g.shape[1:-1]
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  g2 = g.reshape(-1, g.shape[-1])
  blocks = []
  for offset in itertools.product(*(range(k) for k in window)):
    index = (slice(None),) + tuple(
        slice(o, o + s) for o, s in zip(offset, out_spatial)) + (slice(None),)
    # Contract over batch and space: [Cin, N] @ [N, Cout], accumulated in f32.
    blocks.append(lax.dot_general(
        xp[index].reshape(-1, x.shape[-1]), g2, (((0,), (0,)), ((), ())),
        preferred_element_type=jnp.float32))
  return jnp.stack(blocks).reshape(*window, x.shape[-1], g.shape[-1])


def _input_gradient(g, kernel, window, pads, in_spatial):
  """Returns dL/dx: the convolution of g with the flipped, transposed kernel."""
  ndim = g.ndim - 2
  flipped = jnp.flip(kernel, axis=tuple(range(ndim)))
  flipped = jnp.swapaxes(flipped, -1, -2)
  # A stride-1 conv's transpose pads by k-1-low before; the high pad makes the
  # output size equal to the input size (it differs from k-1-high only for
  # explicit pads that drop input voxels).
  tpads = []
  for k, (lo, _), n_in, n_out in zip(window, pads, in_spatial, g.shape[1:-1]):
    low = k - 1 - lo
    tpads.append((low, n_in - (n_out + low - k + 1)))
  return _forward(g, flipped, tuple(tpads))


def _make_conv():
  """Builds the custom_vjp convolution with `pads` as a static argument."""

  def conv(x, kernel, pads):
    return _forward(x, kernel, pads)

  conv = jax.custom_vjp(conv, nondiff_argnums=(2,))

  def fwd(x, kernel, pads):
    return _forward(x, kernel, pads), (x, kernel)

  def bwd(pads, residuals, g):
    x, kernel = residuals
    window = kernel.shape[:-2]
    dx = _input_gradient(g, kernel, window, pads, x.shape[1:-1])
    dk = _weight_gradient(x, g, window, pads)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)

  conv.defvjp(fwd, bwd)
  return conv


im2col_conv_raw = _make_conv()


def im2col_conv(x, kernel, padding='SAME'):
  """Stride-1 channels-last convolution with im2col-matmul gradients.

  Same values as `lax.conv_general_dilated(x, kernel, (1,)*n, padding,
  dimension_numbers=channels_last_numbers(n))`; gradients equal XLA's up to
  float summation order. Differentiable in reverse mode (grad, vjp) and
  vmappable; not forward-mode (a custom_vjp has no jvp).

  Args:
    x: `[B, *spatial, Cin]`.
    kernel: `[*window, Cin, Cout]`, same dtype as x.
    padding: 'SAME', 'VALID' or explicit (low, high) pairs.

  Returns:
    `[B, *out_spatial, Cout]`.
  """
  if x.ndim != kernel.ndim or x.shape[-1] != kernel.shape[-2]:
    raise ValueError(
        f'im2col_conv: input {x.shape} and kernel {kernel.shape} do not match '
        '(expected x [B, *spatial, Cin] and kernel [*window, Cin, Cout]).')
  pads = resolve_padding(padding, kernel.shape[:-2])
  return im2col_conv_raw(x, kernel, pads)


def _is_plain(lhs, rhs, window_strides, lhs_dilation, rhs_dilation,
              feature_group_count, batch_group_count, dimension_numbers) -> bool:
  ndim = lhs.ndim - 2
  ones = (1,) * ndim
  if not (1 <= ndim <= 3 and dimension_numbers is not None):
    return False
  # flax passes ConvDimensionNumbers, users pass strings: compare normalised.
  given = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  wanted = lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                      channels_last_numbers(ndim))
  return (tuple(window_strides) == ones
          and (lhs_dilation is None or tuple(lhs_dilation) == ones)
          and (rhs_dilation is None or tuple(rhs_dilation) == ones)
          and feature_group_count == 1 and batch_group_count == 1
          and given == wanted)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """Drop-in for `lax.conv_general_dilated` using `im2col_conv` where it can.

  Stride-1, undilated, ungrouped channels-last convolutions (every 3x3 and
  1x1 conv of the U-Nets) go through `im2col_conv`; anything else (strided
  downsampling, dilation, other layouts) falls back to XLA unchanged.

  Args:
    lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
    dimension_numbers, feature_group_count, batch_group_count, precision,
    preferred_element_type: as `lax.conv_general_dilated`.

  Returns:
    The convolution output.
  """
  if (_is_plain(lhs, rhs, window_strides, lhs_dilation, rhs_dilation,
                feature_group_count, batch_group_count, dimension_numbers)
      and precision is None and preferred_element_type is None
      and lhs.dtype == rhs.dtype):
    return im2col_conv(lhs, rhs, padding)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)


def conv_flops(batch: int, spatial: Sequence[int], cin: int, cout: int,
               window: Sequence[int]) -> int:
  """Returns the multiply-add FLOPs (2 per MAC) of one stride-1 SAME conv."""
  return 2 * batch * math.prod(spatial) * cin * cout * math.prod(window)
