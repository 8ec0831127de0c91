"""Optax optimiser and learning-rate schedule from `config.optim`."""

import jax
import optax


def learning_rate_schedule(optim_cfg, *, total_steps: int,
                           warmup_steps: int) -> optax.Schedule:
  """Returns the schedule: linear warmup from 0, then cosine decay or constant.

  Args:
    optim_cfg: `config.optim` (lr, schedule, min_lr_ratio).
    total_steps: length of training in steps.
    warmup_steps: steps of linear warmup (clipped to total_steps).
  """
  warmup_steps = min(warmup_steps, total_steps)
  if optim_cfg.schedule == 'constant':
    after = optax.constant_schedule(optim_cfg.lr)
  elif optim_cfg.schedule == 'cosine':
    after = optax.cosine_decay_schedule(
        optim_cfg.lr, decay_steps=max(1, total_steps - warmup_steps),
        alpha=optim_cfg.min_lr_ratio)
  else:
    raise ValueError(f"config.optim.schedule={optim_cfg.schedule!r}: expected "
                     "'cosine' or 'constant'.")
  if warmup_steps == 0:
    return after
  warmup = optax.linear_schedule(0.0, optim_cfg.lr, warmup_steps)
  return optax.join_schedules([warmup, after], [warmup_steps])


def create_optimizer(optim_cfg, schedule: optax.Schedule):
  """Returns the optax chain: global-norm clipping, then AdamW or Adam.

  Weight decay is not applied to biases and normalisation scales (rank-1
  parameters), as is usual for convolutional networks.
  """
  if optim_cfg.name not in ('adamw', 'adam'):
    raise ValueError(f"config.optim.name={optim_cfg.name!r}: expected 'adamw' "
                     "or 'adam'.")
  weight_decay = optim_cfg.weight_decay if optim_cfg.name == 'adamw' else 0.0
  chain = []
  if optim_cfg.grad_clip_norm and optim_cfg.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(optim_cfg.grad_clip_norm))
  chain.append(optax.adamw(
      schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, weight_decay=weight_decay,
      mask=_decay_mask))
  return optax.chain(*chain)


def _decay_mask(params):
  """Returns a pytree of bools: True where a parameter has rank > 1."""
  return jax.tree.map(lambda p: p.ndim > 1, params)
