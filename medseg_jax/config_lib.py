"""The one view of a config: defaults merged once, derived values in one place.

Defaults live only in `configs/default.py`. A run's saved `config.json` is
merged over them once, on load (`from_saved`), so a run saved before a key
existed still loads, with that key's default. Every value that is computed
from several keys (the model's input shape, the patch, the image size, the
slice mode, the sliding-window settings) is computed here, and nowhere else:

    config = from_saved(json.load(open('runs/x/config.json')))
    spatial_shape(config)   # (64, 64), or the 3D patch (16, 32, 32)
    slice_context(config)   # None, or the context of a 2D-slice run

This module imports nothing from medseg_jax (everything may import it).
"""

import functools
import importlib.util
import os

import ml_collections

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS_DIR = os.path.join(REPO_ROOT, 'configs')
# The config file of a trained run (`get_config(workdir)`), for absl's
# `--config=configs/run.py:<workdir>`.
RUN_CONFIG = os.path.join(CONFIGS_DIR, 'run.py')
# Sections whose keys are data, not schema: a saved one replaces the default
# whole (a run trained with only a Dice loss must not gain the default CE).
_WHOLE_SECTIONS = (('loss', 'weights'),)
VOLUME_SOURCES = ('nifti',)  # Sources whose 2D runs train on slices.


@functools.cache
def _default_module():
  """Returns the `configs/default.py` module beside this package.

  Raises:
    FileNotFoundError: no configs/default.py next to the package (e.g. a
      non-editable install); says where it was looked for.
  """
  path = os.path.join(CONFIGS_DIR, 'default.py')
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{path} does not exist: medseg_jax reads its config defaults from '
        'configs/default.py of its repository. Install it editable from a '
        'checkout (pip install -e .) or run from the repository root.')
  spec = importlib.util.spec_from_file_location('_medseg_jax_config_default',
                                                path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def default_config() -> ml_collections.ConfigDict:
  """Returns `configs/default.py`'s `get_config()`, the base of every config.

  Returns:
    A fresh, unlocked ConfigDict (callers may change it).
  """
  return _default_module().get_config()


def _tuples(value):
  """Returns `value` with every list as a tuple (JSON has no tuples)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  return value


def _merge(default: dict, saved: dict, path: tuple = ()) -> dict:
  """Returns `saved` over `default`, section by section (saved wins)."""
  merged = dict(default)
  for key, value in saved.items():
    sub = path + (key,)
    if (isinstance(value, dict) and isinstance(default.get(key), dict)
        and sub not in _WHOLE_SECTIONS):
      merged[key] = _merge(default[key], value, sub)
    else:
      merged[key] = value
  return merged


def from_saved(saved: dict) -> ml_collections.ConfigDict:
  """Returns a run's saved config (its config.json) merged over the defaults.

  Keys the saved config lacks (added to configs/default.py after the run was
  trained) get their default; keys it has keep its value, also keys that
  configs/default.py does not know (an experiment file's own). Lists become
  tuples, as config files write them.

  Args:
    saved: the JSON dict of a run's config.json.

  Returns:
    A new ConfigDict.
  """
  default = default_config().to_dict()
  return ml_collections.ConfigDict(_tuples(_merge(default, saved)))


def resolve_key(config, key: str):
  """Returns (parent section, leaf name) of the dotted `key` in `config`.

  Args:
    config: a ConfigDict (or nested dicts).
    key: e.g. 'eval.tta'.

  Raises:
    ValueError: a part of the key does not exist; one line naming the
      section where it was looked up and that section's fields.
  """
  node, parts = config, key.split('.')
  for depth, part in enumerate(parts):
    if not hasattr(node, 'keys') or part not in node:
      where = '.'.join(['config', *parts[:depth]])
      fields = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else ''
      raise ValueError(f'--config.{key}: {where} has no field {part!r}'
                       + (f' (its fields: {fields}).' if fields else '.'))
    if depth < len(parts) - 1:
      node = node[part]
  return node, parts[-1]


def with_overrides(config, overrides) -> ml_collections.ConfigDict:
  """Returns a copy of `config` with `{dotted key: value}` set.

  Args:
    config: a ConfigDict.
    overrides: e.g. {'eval.tta': True, 'eval.mc_samples': 20}; None or {}
      for none.

  Raises:
    ValueError: an unknown key (see `resolve_key`).
  """
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in (overrides or {}).items():
    parent, leaf = resolve_key(config, key)
    parent[leaf] = value
  return config


# --------------------------------------------------------------------------
# Derived values.


def image_size(config) -> tuple[int, int]:
  """Returns `config.data.image_size` as (H, W) (an int is square)."""
  size = config.data.image_size
  return (tuple(int(s) for s in size) if isinstance(size, (tuple, list))
          else (int(size), int(size)))


def patch_size(config) -> tuple[int, ...]:
  """Returns the training patch `config.data.patch_size`; () = whole images."""
  return tuple(int(p) for p in config.data.patch_size)


def slice_context(config) -> int | None:
  """Returns the slice context of a run trained on 2D slices of volumes.

  Returns:
    `config.data.slice_context` when the run trained on axial slices of
    volumes (a volume source with `volume_mode='2d'`), else None.
  """
  data = config.data
  if data.source in VOLUME_SOURCES and data.volume_mode == '2d':
    return int(data.slice_context)
  return None


def spatial_shape(config) -> tuple[int, ...]:
  """Returns the spatial shape of a training example (the model's input).

  The training patch when `config.data.patch_size` is set; else the volume
  size of `synthetic3d`; else `config.data.image_size` as (H, W).
  """
  patch = patch_size(config)
  if patch:
    return patch
  if config.data.source == 'synthetic3d':
    return tuple(int(s) for s in config.data.synthetic3d.volume_size)
  return image_size(config)


def model_input_shape(config) -> tuple[int, ...]:
  """Returns the `[1, *spatial, C]` shape the model is initialised with."""
  return (1, *spatial_shape(config), int(config.data.in_channels))


def volume_channels(config) -> int:
  """Returns the channels of one input case, before slice context.

  A 2D-slice run takes `in_channels = C * (2 * context + 1)`; its volumes
  have C channels. Every other run takes `in_channels`.
  """
  context = slice_context(config)
  channels = int(config.data.in_channels)
  return channels if context is None else channels // (2 * context + 1)


def sliding_window(config) -> dict:
  """Returns the sliding-window settings of `config.eval`.

  Returns:
    {'overlap', 'blend', 'batch_size'}: the keyword arguments of
    `inference.sliding_window` (batch_size is `config.eval.sw_batch_size`).
  """
  return {'overlap': float(config.eval.overlap),
          'blend': str(config.eval.blend),
          'batch_size': int(config.eval.sw_batch_size)}

