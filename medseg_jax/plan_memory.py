"""Memory of one train step, as XLA compiles it: the planner's yardstick.

nnU-Net estimates the memory of a candidate (patch, batch, network) from a
reference network's VRAM; here the real train step is compiled for the
candidate (`jax.jit(step).lower(...).compile()`) and XLA's own
`memory_analysis()` gives its peak: parameters, optimiser state, batch,
activations kept for the backward pass and temporaries, on the device that
runs it. Nothing is executed and nothing is allocated (shapes only).

    measure = step_memory_fn(config)
    measure((64, 96, 96), 2, (32, 64, 128, 256), strides)  # bytes

`default_budget_bytes()` is the present accelerator's memory (the
allocator's limit); on CPU, which reports none, `CPU_DEFAULT_GB`.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from medseg_jax import models
from medseg_jax import optim
from medseg_jax import state as state_lib
from medseg_jax import steps

CPU_DEFAULT_GB = 8.0  # The budget on a host without accelerator statistics.


def default_budget_bytes() -> tuple[int, str]:
  """Returns (the present device's memory in bytes, where it came from)."""
  device = jax.devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}  # Some backends do not implement memory_stats.
  limit = int(stats.get('bytes_limit', 0))
  if limit > 0:
    return limit, f'{device.device_kind} memory limit'
  return int(CPU_DEFAULT_GB * 2**30), (
      f'{device.platform.upper()} default {CPU_DEFAULT_GB:g} GiB (no device '
      'memory statistics; set --plan_memory_gb)')


def peak_bytes(compiled) -> int:
  """Returns the peak memory of a compiled program (XLA's analysis).

  `peak_memory_in_bytes` where the backend reports it; else arguments +
  outputs + temporaries - aliased (donated) buffers.
  """
  stats = compiled.memory_analysis()
  peak = int(getattr(stats, 'peak_memory_in_bytes', 0) or 0)
  if peak > 0:
    return peak
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes +
             stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def _model_config(config, features, strides) -> ml_collections.ConfigDict:
  model_cfg = ml_collections.ConfigDict(config.model.to_dict())
  model_cfg.features = tuple(int(f) for f in features)
  model_cfg.strides = tuple(tuple(int(s) for s in row) for row in strides)
  return model_cfg


def train_step_bytes(config, spatial, batch: int, features, strides) -> int:
  """Returns the peak bytes of one compiled train step for a candidate.

  Args:
    config: the base config (model, optimiser, loss, data.in_channels,
      data.num_classes, train.grad_accum_steps, train.ema_decay).
    spatial: the patch, (D, H, W) or (H, W).
    batch: the global batch on this one device.
    features: U-Net widths, one per level.
    strides: per-axis strides of each downsampling (see planning.pooling).

  Returns:
    XLA's peak memory of the step, in bytes.
  """
  model = models.create_model(_model_config(config, features, strides),
                              int(config.data.num_classes))
  schedule = optax.constant_schedule(float(config.optim.lr))
  tx = optim.create_optimizer(config.optim, schedule,
                              float(config.train.ema_decay))
  channels = int(config.data.in_channels)
  rng = jax.random.PRNGKey(0)
  abstract = state_lib.abstract_train_state(model, tx,
                                            (1, *spatial, channels), rng)
  step = steps.make_train_step(model, tx, config.loss.weights, schedule)
  batch_spec = {
      'image': jax.ShapeDtypeStruct((batch, *spatial, channels), jnp.float32),
      'label': jax.ShapeDtypeStruct((batch, *spatial), jnp.int32)}
  rng_spec = jax.ShapeDtypeStruct(rng.shape, rng.dtype)
  compiled = jax.jit(step, donate_argnums=0).lower(
      abstract, batch_spec, rng_spec).compile()
  return peak_bytes(compiled)


def step_memory_fn(config):
  """Returns measure(spatial, batch, features, strides) -> bytes, memoised.

  Args:
    config: the base config with the planned data.in_channels and
      data.num_classes (2D: channels x (2 * slice_context + 1)).
  """

  @functools.cache
  def measure(spatial, batch, features, strides):
    return train_step_bytes(config, tuple(spatial), int(batch),
                            tuple(features), tuple(map(tuple, strides)))

  return measure
