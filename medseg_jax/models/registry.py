"""Model registry (config name -> Flax module) and size/cost summaries.

A new architecture registers itself with `@register('name')` in its own file
and is imported in `medseg_jax/models/__init__.py`.
"""

import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_MODELS: dict[str, type[nn.Module]] = {}

DTYPES = {'bfloat16': jnp.bfloat16, 'float32': jnp.float32,
          'float16': jnp.float16}

# config.model key -> module attribute; keys a model does not have are
# accepted only at their neutral value (see `_module_kwargs`). A model class
# adds its own keys in a `CONFIG_KEYS` class attribute.
_CONFIG_KEYS = ('features', 'norm', 'upsample', 'downsample', 'residual',
                'deep_supervision', 'dropout_rate', 'dropout_at', 'strides')


def _as_tuples(value):
  """Returns nested lists (JSON) as nested tuples (hashable attributes)."""
  if isinstance(value, (list, tuple)):
    return tuple(_as_tuples(v) for v in value)
  return value


def _is_neutral(key: str, value) -> bool:
  """Whether a key a model lacks holds a value that asks for nothing."""
  if key == 'strides':  # Explicit 2s everywhere are the default pooling.
    rows = _as_tuples(value)
    return all(isinstance(r, tuple) and all(s == 2 for s in r) for r in rows)
  return value in (False, None, 0, 0.0, ())


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
  """Returns a class decorator that makes `config.model.name=name` build it."""

  def wrap(cls):
    if name in _MODELS and _MODELS[name] is not cls:
      raise ValueError(f'Model name {name!r} is already registered '
                       f'({_MODELS[name].__name__}).')
    _MODELS[name] = cls
    return cls

  return wrap


def known_models() -> tuple[str, ...]:
  """Returns the registered model names, sorted."""
  return tuple(sorted(_MODELS))


def parse_dtype(name: Any):
  """Returns the jnp dtype for a config string such as 'bfloat16'."""
  if not isinstance(name, str):
    return name
  if name not in DTYPES:
    raise ValueError(f'Unknown config.model.dtype {name!r}; use one of '
                     f'{sorted(DTYPES)}.')
  return DTYPES[name]


def _module_kwargs(cls, name: str, model_cfg) -> dict:
  """Returns the module attributes given by model_cfg that cls accepts."""
  fields = {f.name for f in dataclasses.fields(cls)} - {'name', 'parent'}
  kwargs = {}
  # A model may read more keys than the shared ones (TransUNet's ViT size).
  for key in _CONFIG_KEYS + tuple(getattr(cls, 'CONFIG_KEYS', ())):
    if key not in model_cfg:
      continue
    value = model_cfg[key]
    if key in fields:
      kwargs[key] = _as_tuples(value)
    elif key == 'strides' and not _is_neutral(key, value):
      raise ValueError(
          f'config.model.strides={_as_tuples(value)!r}: model {name!r} '
          f'({cls.__name__}) pools by 2 along every axis; set '
          'config.model.strides=() or use model unet or unetpp for '
          'anisotropic pooling.')
    elif not _is_neutral(key, value):
      raise ValueError(
          f'config.model.{key}={value!r} is not supported by model '
          f'{name!r} ({cls.__name__}); remove it or set it to a '
          'neutral value.')
  return kwargs


def create_model(model_cfg, num_classes: int) -> nn.Module:
  """Returns the Flax module that `model_cfg` describes.

  Args:
    model_cfg: `config.model`: an ml_collections.ConfigDict (or dict) with
      `name` (see `known_models()`), `features`, `norm`, `dtype` ('bfloat16' /
      'float32'), `upsample`, `residual`, `deep_supervision`, `dropout_rate`;
      optionally `downsample`, `dropout_at`, `strides` (U-Net, UNet++).
      Missing keys take the module's default.
    num_classes: output channels K (1 = binary, >= 2 = softmax classes).

  Returns:
    An unbound module; call `init(rngs, x, train=False)` / `apply`.
  """
  name = model_cfg['name'] if 'name' in model_cfg else None
  if name not in _MODELS:
    raise ValueError(f'Unknown config.model.name {name!r}; known models: '
                     f'{", ".join(known_models())}.')
  if int(num_classes) < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}.')
  cls = _MODELS[name]
  kwargs = _module_kwargs(cls, name, model_cfg)
  if 'dtype' in model_cfg:
    kwargs['dtype'] = parse_dtype(model_cfg['dtype'])
  return cls(num_classes=int(num_classes), **kwargs)


def count_params(params) -> int:
  """Returns the number of scalars in a pytree of arrays or ShapeDtypeStructs."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


def abstract_variables(model: nn.Module, input_shape: Sequence[int]):
  """Returns the model's variables as ShapeDtypeStructs (nothing allocated)."""
  x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
  return jax.eval_shape(lambda r, x: model.init(r, x, train=False), rngs, x)


def _flops(cost) -> float:
  # cost_analysis() is a dict in recent jax, a list of dicts (one per
  # computation) in older ones, or None where the backend gives none.
  if cost is None:
    return float('nan')
  if isinstance(cost, dict):
    cost = [cost]
  total = sum(float(c.get('flops', 0.0)) for c in cost if c)
  return total if total > 0 else float('nan')


def model_summary(model: nn.Module, input_shape: Sequence[int]) -> dict:
  """Returns the parameter count and forward FLOPs per example.

  Compiles the eval-mode forward for abstract inputs; no parameters are
  allocated. FLOPs are XLA's cost analysis of the compiled program on the
  default backend (a multiply-add counts 2).

  Args:
    model: a Flax module with `__call__(x, train)`.
    input_shape: `[B, *spatial, C]`.

  Returns:
    dict(params=int, flops_per_example=float (nan if unavailable)).
  """
  variables = abstract_variables(model, input_shape)
  x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  flops = _flops(forward.lower(variables, x).compile().cost_analysis())
  return dict(params=count_params(variables['params']),
              flops_per_example=flops / input_shape[0])
