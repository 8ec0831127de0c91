"""Optax optimiser and learning-rate schedule from `config.optim`.

Two optional pieces of training state live inside the optimiser state (so
they are checkpointed, donated and restored with it, and resumes stay exact),
each as a wrapper around the base optimiser that is absent when turned off,
so the default optimiser state and train step are exactly as without them:

  EmaState(inner, ema)          `config.train.ema_decay` > 0: an exponential
                                moving average of the parameters.
  PlateauState(inner, plateau)  `config.optim.plateau_patience` > 0:
                                `optax.contrib.reduce_on_plateau`'s state; its
                                scale multiplies every update, and it is fed
                                the validation Dice once per evaluation by
                                `observe_plateau`, never by the train step.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

# reduce_on_plateau's relative tolerance: an evaluation improves when
# 1 - Dice falls below (1 - rtol) times its best value (PyTorch's default).
PLATEAU_RTOL = 1e-4
# nnU-Net's PolyLRScheduler exponent.
POLY_POWER = 0.9


def learning_rate_schedule(optim_cfg, *, total_steps: int,
                           warmup_steps: int) -> optax.Schedule:
  """Returns the schedule: linear warmup from 0, then cosine, poly or constant.

  'poly' is nnU-Net's lr * (1 - t / T) ** 0.9, t counted from the end of the
  warmup and T the steps after it; it ends at 0 (min_lr_ratio is not used).

  Args:
    optim_cfg: `config.optim` (lr, schedule, min_lr_ratio).
    total_steps: length of training in steps.
    warmup_steps: steps of linear warmup (clipped to total_steps).

  Returns:
    An optax schedule: step -> learning rate.
  """
  warmup_steps = min(warmup_steps, total_steps)
  decay_steps = max(1, total_steps - warmup_steps)
  if optim_cfg.schedule == 'constant':
    after = optax.constant_schedule(optim_cfg.lr)
  elif optim_cfg.schedule == 'cosine':
    after = optax.cosine_decay_schedule(
        optim_cfg.lr, decay_steps=decay_steps, alpha=optim_cfg.min_lr_ratio)
  elif optim_cfg.schedule == 'poly':
    after = optax.polynomial_schedule(
        init_value=optim_cfg.lr, end_value=0.0, power=POLY_POWER,
        transition_steps=decay_steps)
  else:
    raise ValueError(f"config.optim.schedule={optim_cfg.schedule!r}: expected "
                     "'cosine', 'poly' or 'constant'.")
  if warmup_steps == 0:
    return after
  warmup = optax.linear_schedule(0.0, optim_cfg.lr, warmup_steps)
  return optax.join_schedules([warmup, after], [warmup_steps])


def create_optimizer(optim_cfg, schedule: optax.Schedule, ema_decay: float = 0.0):
  """Returns the optax chain: global-norm clipping, then AdamW, Adam or SGD.

  Weight decay is not applied to biases and normalisation scales (rank-1
  parameters), as is usual for convolutional networks. AdamW's decay is
  decoupled; SGD's is an L2 term added to the gradient before momentum, as
  PyTorch's SGD(weight_decay=...) that nnU-Net uses.

  Args:
    optim_cfg: `config.optim` (name, lr, weight_decay, b1, b2, momentum,
      nesterov, grad_clip_norm, plateau_factor, plateau_patience).
    schedule: the learning-rate schedule.
    ema_decay: `config.train.ema_decay`; > 0 keeps an EMA of the parameters
      in the optimiser state (see `ema_params`).

  Returns:
    An `optax.GradientTransformation`.
  """
  if optim_cfg.name not in ('adamw', 'adam', 'sgd'):
    raise ValueError(f"config.optim.name={optim_cfg.name!r}: expected 'adamw', "
                     "'adam' or 'sgd'.")
  chain = []
  if optim_cfg.grad_clip_norm and optim_cfg.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(optim_cfg.grad_clip_norm))
  if optim_cfg.name == 'sgd':
    if optim_cfg.weight_decay > 0:
      chain.append(optax.add_decayed_weights(optim_cfg.weight_decay,
                                             mask=_decay_mask))
    chain.append(optax.sgd(schedule, momentum=optim_cfg.momentum or None,
                           nesterov=bool(optim_cfg.nesterov)))
  else:
    weight_decay = optim_cfg.weight_decay if optim_cfg.name == 'adamw' else 0.0
    chain.append(optax.adamw(
        schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, weight_decay=weight_decay,
        mask=_decay_mask))
  tx = optax.chain(*chain)
  if optim_cfg.plateau_patience > 0:
    tx = _with_plateau(tx, optim_cfg.plateau_factor,
                       optim_cfg.plateau_patience)
  if ema_decay > 0:
    tx = _with_ema(tx, ema_decay)
  return tx


def _decay_mask(params):
  """Returns a pytree of bools: True where a parameter has rank > 1."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


# --- Reduce-on-plateau -------------------------------------------------------


class PlateauState(NamedTuple):
  """The base optimiser's state and reduce_on_plateau's."""
  inner: Any
  plateau: Any


def _plateau(factor: float, patience: int) -> optax.GradientTransformationExtraArgs:
  return optax.contrib.reduce_on_plateau(factor=factor, patience=patience,
                                         rtol=PLATEAU_RTOL, atol=0.0)


def _with_plateau(tx, factor: float, patience: int):
  """Wraps `tx`: its updates are multiplied by the plateau scale (no counting)."""
  plateau = _plateau(factor, patience)

  def init(params):
    return PlateauState(tx.init(params), plateau.init(params))

  def update(updates, state, params=None):
    updates, inner = tx.update(updates, state.inner, params)
    scale = state.plateau.scale
    updates = jax.tree.map(lambda u: (scale * u).astype(u.dtype), updates)
    return updates, PlateauState(inner, state.plateau)

  return optax.GradientTransformation(init, update)


def observe_plateau(opt_state, dice, optim_cfg):
  """Feeds one evaluation's validation Dice to reduce_on_plateau (jittable).

  The plateau logic minimises 1 - Dice: after `plateau_patience` evaluations
  without improvement the scale is multiplied by `plateau_factor`.

  Args:
    opt_state: an optimiser state of `create_optimizer` with plateau on.
    dice: the validation Dice (scalar).
    optim_cfg: `config.optim`.

  Returns:
    The optimiser state with the plateau state updated.
  """
  if isinstance(opt_state, EmaState):
    return opt_state._replace(
        inner=observe_plateau(opt_state.inner, dice, optim_cfg))
  plateau = _plateau(optim_cfg.plateau_factor, optim_cfg.plateau_patience)
  _, new = plateau.update({}, opt_state.plateau,
                          value=1.0 - jnp.asarray(dice, jnp.float32))
  return opt_state._replace(plateau=new)


def plateau_scale(opt_state):
  """Returns the plateau's learning-rate scale, or None if plateau is off."""
  if isinstance(opt_state, EmaState):
    return plateau_scale(opt_state.inner)
  if isinstance(opt_state, PlateauState):
    return opt_state.plateau.scale
  return None


# --- EMA of the parameters ---------------------------------------------------


class EmaState(NamedTuple):
  """The wrapped optimiser's state and the moving average of the parameters."""
  inner: Any
  ema: Any


def _with_ema(tx, decay: float):
  """Wraps `tx`: after each update, ema = decay * ema + (1 - decay) * params.

  The average starts at the initial parameters (no bias correction) and is
  taken of the parameters after the step's update.
  """

  def init(params):
    # A copy, not the same buffers: the state is donated to the train step.
    return EmaState(tx.init(params), jax.tree.map(jnp.copy, params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('The EMA of the parameters needs `params` in update.')
    updates, inner = tx.update(updates, state.inner, params)
    new_params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                       state.ema, new_params)
    return updates, EmaState(inner, ema)

  return optax.GradientTransformation(init, update)


def ema_params(opt_state):
  """Returns the EMA of the parameters, or None if `train.ema_decay` is 0."""
  return opt_state.ema if isinstance(opt_state, EmaState) else None
