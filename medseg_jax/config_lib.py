"""The one view of a config: defaults merged once, derived values in one place.

Defaults live only in `configs/default.py`. A run's saved `config.json` is
merged over them once, on load (`from_saved`), so a run saved before a key
existed still loads, with that key's default. Every value that is computed
from several keys (the model's input shape, the patch, the image size, the
slice mode, the sliding-window settings) is computed here, and nowhere else:

    config = from_saved(json.load(open('runs/x/config.json')))
    spatial_shape(config)   # (64, 64), or the 3D patch (16, 32, 32)
    slice_context(config)   # None, or the context of a 2D-slice run

`fill_from_data(config)` fills the values a data set states itself
(dataset.json's channels and labels, volume statistics instead of the photo
ones) where the config left them at their defaults.

This module imports nothing from medseg_jax at import time (everything may
import it); `fill_from_data` reads dataset.json through the JSON-only
`medseg_jax.data.dataset_json`, imported when called.
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
# Sources of volumes (no photographs): ImageNet statistics never apply.
VOLUME_DATA_SOURCES = ('nifti', 'synthetic3d')


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



# --------------------------------------------------------------------------
# Values the data set states itself.


def _at_default(config, key: str) -> bool:
  """Whether `config`'s dotted `key` still has configs/default.py's value."""
  parent, leaf = resolve_key(default_config(), key)
  node, leaf2 = resolve_key(config, key)
  return _tuples(node[leaf2]) == _tuples(parent[leaf])


def _fill_volume_statistics(config, explicit) -> None:
  """Volumes: the photo (ImageNet) mean/std become 0/1 (sources normalise)."""
  if config.data.source not in VOLUME_DATA_SOURCES:
    return
  if not (_given(config, 'data.mean', explicit) or
          _given(config, 'data.std', explicit)):
    config.data.mean, config.data.std = (0.0,), (1.0,)


def _given(config, key: str, explicit) -> bool:
  """Whether `key` binds: named in `explicit`, else not at its default."""
  if explicit is not None:
    return key in explicit
  return not _at_default(config, key)


def _contradiction(key: str, have, info, what: str, want) -> ValueError:
  return ValueError(
      f'config.{key}={have} contradicts {info.path}, which lists {what}; '
      f'remove the value (it is filled from dataset.json) or set it to '
      f'{want}.')


def _fill_channels(config, info, explicit) -> None:
  data = config.data
  context = slice_context(config) or 0
  want = info.num_channels * (2 * context + 1)
  if not _given(config, 'data.in_channels', explicit):
    data.in_channels = want
  elif int(data.in_channels) != want:
    slices = (f' x {2 * context + 1} slices (slice_context={context})'
              if context else '')
    raise _contradiction('data.in_channels', data.in_channels, info,
                         f'{info.num_channels} channel(s) '
                         f'{list(info.channel_names)}{slices}', want)


def _fill_classes(config, info, explicit) -> None:
  data = config.data
  k = len(info.class_names)
  if not _given(config, 'data.num_classes', explicit):
    data.num_classes = info.num_classes
  elif max(2, int(data.num_classes)) != k:
    raise _contradiction('data.num_classes', data.num_classes, info,
                         f'{k} labels {list(info.class_names)}',
                         info.num_classes)


def _fill_normalization(config, info, explicit) -> None:
  """All channels CT: the 'ct' scheme, unless the config chose one."""
  schemes = set(info.normalization)
  if schemes == {'ct'} and not _given(config, 'data.preprocess.intensity',
                                      explicit):
    config.data.preprocess.intensity = 'ct'


def _fill_slice_patch(config) -> None:
  """2D slices of several sizes (or not image_size): the median slice size.

  Rounded up to a multiple of the model's total downsampling, so the U-Net
  accepts it; slices smaller than it are padded by the patch sampler.
  """
  data = config.data
  if slice_context(config) is None or patch_size(config):
    return
  from medseg_jax.data import dataset_json  # pylint: disable=import-outside-toplevel
  median = dataset_json.median_slice_shape(
      data.root, tuple(data.preprocess.target_spacing))
  if not median or tuple(median) == image_size(config):
    return  # Whole slices of the configured size need no patch.
  # The model's total downsampling per axis: the product of
  # config.model.strides (2 per level and axis when it is ()).
  levels = len(config.model.features) if 'features' in config.model else 1
  strides = (tuple(config.model.get('strides', ()))
             or ((2,) * len(median),) * max(0, levels - 1))
  unit = [1] * len(median)
  for row in strides:
    unit = [u * int(r) for u, r in zip(unit, row)]
  data.patch_size = tuple(-(-int(s) // u) * u for s, u in zip(median, unit))


def fill_from_data(config, explicit=None) -> ml_collections.ConfigDict:
  """Returns a copy of `config` with the values its data set states filled.

  Volume sources (`nifti`, `synthetic3d`) with `data.mean`/`data.std` left
  at the photo (ImageNet) defaults get 0/1: their sources normalise each
  case, and photo statistics must never scale volumes. A `nifti` data set's
  dataset.json gives `in_channels` (channels x (2 * slice_context + 1) for
  slices), `num_classes` (1 for two labels), and the `ct` intensity scheme
  when every channel is CT; each is filled only where the config kept
  configs/default.py's value. 2D slices of several sizes get
  `patch_size` = the median slice size (rounded up to the U-Net's
  downsampling). `folder` and `isic2018` data sets give `in_channels`, the
  mask values (`num_classes`, `label_values`) and 1-value mean/std for
  grayscale from their first files (`data.folder_inference`).

  A config file written for another source (configs/unet3d.py makes
  4-channel synthetic tumours) run with `--config.data.source=nifti` passes
  `explicit`: then only the keys given on the command line bind, and the
  file's values for its own source are replaced by the data set's.

  Args:
    config: a full config (configs/default.py's keys).
    explicit: None (a value binds when it differs from configs/default.py),
      or the dotted keys given explicitly (only those bind).

  Returns:
    A new ConfigDict; `config` is not changed.

  Raises:
    ValueError: a config value contradicts dataset.json or the images (one
      line naming both), or dataset.json has region-based labels.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  _fill_volume_statistics(config, explicit)
  if config.data.source in ('folder', 'isic2018') and config.data.root:
    # Photographs state channels and labels in their files (first ones read).
    from medseg_jax.data import folder_inference  # pylint: disable=import-outside-toplevel
    folder_inference.fill_config(
        config, lambda key: _given(config, key, explicit))
    return config
  if config.data.source != 'nifti' or not config.data.root:
    return config
  from medseg_jax.data import dataset_json  # pylint: disable=import-outside-toplevel
  try:
    info = dataset_json.read_dataset_json(config.data.root)
  except dataset_json.RegionLabelsError:
    raise
  except (OSError, ValueError):
    return config  # Missing or broken: the data check lists it with the rest.
  _fill_channels(config, info, explicit)
  _fill_classes(config, info, explicit)
  _fill_normalization(config, info, explicit)
  _fill_slice_patch(config)
  return config


def nested(flat: dict) -> dict:
  """Returns {'a.b': v} as {'a': {'b': v}} (for `from_saved`)."""
  out = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split('.')
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return out


def from_dotted(*flat_dicts: dict) -> ml_collections.ConfigDict:
  """Returns the defaults with `{'data.patch_size': (..), ...}` set, in order.

  A generated config file (`--mode=plan`) is its base config's differences
  from configs/default.py, then the plan's values, as flat dotted dicts.

  Args:
    *flat_dicts: {dotted key: value}; later dicts win; keys configs/default.py
      lacks are kept (as in `from_saved`).

  Returns:
    A new ConfigDict.
  """
  merged = {}
  for flat in flat_dicts:
    merged = _merge(merged, nested(flat))
  return from_saved(merged)


def differences(config, base=None, path: str = '') -> dict:
  """Returns {dotted key: value} where `config` differs from `base`.

  Args:
    config: a ConfigDict or dict.
    base: what to compare with (default: configs/default.py); sections in
      `_WHOLE_SECTIONS` are compared and returned whole.
    path: the dotted prefix (recursion).

  Returns:
    Flat dotted keys of the leaves (or whole sections) that differ.
  """
  config = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  if base is None:
    base = default_config().to_dict()
  out = {}
  for key, value in config.items():
    dotted = f'{path}.{key}' if path else key
    other = base.get(key) if isinstance(base, dict) else None
    whole = tuple(dotted.split('.')) in _WHOLE_SECTIONS
    if isinstance(value, dict) and isinstance(other, dict) and not whole:
      out.update(differences(value, other, dotted))
    elif _tuples(value) != _tuples(other):
      out[dotted] = _tuples(value)
  return out
