"""Checks the values of a whole config once, before a run writes anything.

`validate_config(config)` lists every bad key with its value in one error,
e.g. `config.train.batch_size=0: must be a positive integer`, instead of a
ZeroDivisionError deep in the schedule or a silently corrected value.
Names (data sources, models, losses) are checked by the registries that own
them; this module checks numbers, ranges and choices. Imports no JAX.
"""

import math
from typing import Any, Callable

_Check = tuple[str, Callable[[Any], bool], str]


def _number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v) -> bool:
  return _number(v) and math.isfinite(v)


def _positive_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _nonneg_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _positive(v) -> bool:
  return _finite(v) and v > 0


def _nonneg(v) -> bool:
  return _finite(v) and v >= 0


def _probability(v) -> bool:
  return _finite(v) and 0 <= v <= 1


def _below_one(v) -> bool:
  return _finite(v) and 0 <= v < 1


def _one_of(*choices) -> Callable[[Any], bool]:
  return lambda v: v in choices


def _sizes(v) -> bool:
  """An int or a sequence of positive ints (image sizes, patch sizes, widths)."""
  if _positive_int(v):
    return True
  return (isinstance(v, (tuple, list)) and len(v) > 0
          and all(_positive_int(x) for x in v))


def _sizes_or_empty(v) -> bool:
  return v in ((), []) or _sizes(v)


def _int_or_off(v) -> bool:
  # -1 (or any value <= 0) means "off" / "derived" for these keys.
  return isinstance(v, int) and not isinstance(v, bool) and (v > 0 or v == -1)


_POSITIVE_INT = 'must be a positive integer'
_NONNEG_INT = 'must be an integer >= 0'
_PROB = 'must be a number in [0, 1]'

# (dotted key, predicate, what it must be). Keys missing from a config are
# skipped: an experiment may leave out what its model does not use.
CHECKS: tuple[_Check, ...] = (
    ('seed', lambda v: isinstance(v, int) and not isinstance(v, bool),
     'must be an integer'),
    ('data.image_size', _sizes, 'must be a positive integer or (H, W)'),
    ('data.num_classes', _positive_int, _POSITIVE_INT),
    ('data.in_channels', _positive_int, _POSITIVE_INT),
    ('data.synthetic.num_patients', _positive_int, _POSITIVE_INT),
    ('data.synthetic.images_per_patient', _positive_int, _POSITIVE_INT),
    ('data.synthetic3d.num_patients', _positive_int, _POSITIVE_INT),
    ('data.synthetic3d.volume_size', _sizes, 'must be positive (D, H, W)'),
    ('data.synthetic3d.in_channels', _positive_int, _POSITIVE_INT),
    ('data.cache', _one_of('memory', 'disk', 'none'),
     "must be 'memory', 'disk' or 'none'"),
    ('data.volume_mode', _one_of('3d', '2d'), "must be '3d' or '2d'"),
    ('data.slice_context', _nonneg_int, _NONNEG_INT),
    ('data.patch_size', _sizes_or_empty, 'must be () or positive (D, H, W)'),
    ('data.foreground_oversample', _probability, _PROB),
    ('data.val_fraction', _below_one, 'must be a number in [0, 1)'),
    ('data.test_fraction', _below_one, 'must be a number in [0, 1)'),
    ('data.train_fraction', lambda v: _finite(v) and 0 < v <= 1,
     'must be a number in (0, 1]'),
    ('data.num_folds', _nonneg_int, _NONNEG_INT),
    ('data.fold', _nonneg_int, _NONNEG_INT),
    ('data.std', lambda v: isinstance(v, (tuple, list)) and all(
        _positive(x) for x in v), 'must be positive numbers'),
    ('data.worker_count', _nonneg_int, _NONNEG_INT),
    ('data.preprocess.register_kind', _one_of('rigid', 'affine'),
     "must be 'rigid' or 'affine'"),
    ('data.preprocess.register_metric', _one_of('mattes_mi', 'ncc'),
     "must be 'mattes_mi' or 'ncc'"),
    ('data.prefetch_buffer_size', _nonneg_int, _NONNEG_INT),
    ('data.augment_on', _one_of('host', 'device'),
     "must be 'host' or 'device'"),
    ('model.features', _sizes, 'must be positive integers'),
    ('model.dtype', _one_of('float32', 'bfloat16', 'float16'),
     "must be 'float32', 'bfloat16' or 'float16'"),
    ('model.dropout_rate', _below_one, 'must be a number in [0, 1)'),
    ('model.conv_impl', _one_of('auto', 'eigen', 'ynnpack'),
     "must be 'auto', 'eigen' or 'ynnpack'"),
    ('optim.lr', _positive, 'must be a finite number > 0'),
    ('optim.weight_decay', _nonneg, 'must be a finite number >= 0'),
    ('optim.b1', _below_one, 'must be a number in [0, 1)'),
    ('optim.b2', _below_one, 'must be a number in [0, 1)'),
    ('optim.schedule', _one_of('cosine', 'poly', 'constant'),
     "must be 'cosine', 'poly' or 'constant'"),
    ('optim.name', _one_of('adamw', 'adam', 'sgd'),
     "must be 'adamw', 'adam' or 'sgd'"),
    ('optim.momentum', _below_one, 'must be a number in [0, 1)'),
    ('optim.nesterov', lambda v: isinstance(v, bool), 'must be True or False'),
    ('optim.plateau_patience', _nonneg_int, _NONNEG_INT + ' (0 = off)'),
    ('optim.plateau_factor', lambda v: _finite(v) and 0 < v < 1,
     'must be a number in (0, 1)'),
    ('optim.warmup_epochs', _nonneg, 'must be a finite number >= 0'),
    ('optim.min_lr_ratio', _probability, _PROB),
    ('optim.grad_clip_norm', _finite, 'must be a finite number (<= 0: off)'),
    ('train.batch_size', _positive_int, _POSITIVE_INT),
    ('train.num_steps', lambda v: isinstance(v, int) and not isinstance(
        v, bool), 'must be an integer (<= 0: use num_epochs)'),
    ('train.num_epochs', _nonneg, 'must be a finite number >= 0'),
    ('train.log_every_steps', _positive_int, _POSITIVE_INT),
    ('train.eval_every_epochs', _positive, 'must be a finite number > 0'),
    ('train.checkpoint_every_steps', _int_or_off,
     'must be a positive integer, or -1 for every evaluation'),
    ('train.max_checkpoints', _positive_int, _POSITIVE_INT),
    ('train.tensorboard', lambda v: isinstance(v, bool),
     'must be True or False'),
    ('train.early_stopping_patience', _nonneg_int, _NONNEG_INT + ' (0 = off)'),
    ('train.steps_per_epoch', _nonneg_int,
     _NONNEG_INT + ' (0 = one pass over the training cases)'),
    ('train.case_val_every', _nonneg_int,
     _NONNEG_INT + ' (0 = off; k = every k-th evaluation)'),
    ('train.ema_decay', _below_one, 'must be a number in [0, 1) (0 = off)'),
    ('train.grad_accum_steps', _positive_int, _POSITIVE_INT),
    ('eval.batch_size', _positive_int, _POSITIVE_INT),
    ('eval.threshold', lambda v: _finite(v) and 0 < v < 1,
     'must be a number in (0, 1)'),
    ('eval.overlap', _below_one, 'must be a number in [0, 1)'),
    ('eval.blend', _one_of('gaussian', 'constant'),
     "must be 'gaussian' or 'constant'"),
    ('eval.sw_batch_size', _positive_int, _POSITIVE_INT),
    ('eval.mc_samples', _nonneg_int, _NONNEG_INT),
    ('eval.nsd_tolerance_mm', lambda v: _finite(v) and v >= 0,
     'must be a finite number >= 0 (0 = no NSD column)'),
    ('eval.postprocess.min_size', _nonneg_int, _NONNEG_INT),
    ('eval.subgroups', lambda v: isinstance(v, (tuple, list)) and all(
        isinstance(x, str) and x.strip() for x in v),
     "must be a tuple of metadata column names, e.g. ('sex', 'site')"),
    ('eval.subgroup_bins', lambda v: _positive_int(v) and v >= 2,
     'must be an integer >= 2'),
    ('eval.decision.rule', _one_of('', 'volume', 'max_prob'),
     "must be '' (off), 'volume' or 'max_prob'"),
    ('eval.decision.truth', _one_of('volume', 'column'),
     "must be 'volume' or 'column'"),
    ('eval.decision.volume', _nonneg, 'must be a finite number >= 0'),
)


def _get(config, dotted: str):
  """Returns (found, value) of a dotted key of a ConfigDict or dict."""
  node = config
  for part in dotted.split('.'):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return False, None
  return True, node


def _cross_checks(config) -> list[str]:
  """Rules between keys (each named with its value)."""
  problems = []
  found_s, steps = _get(config, 'train.num_steps')
  found_e, epochs = _get(config, 'train.num_epochs')
  if (found_s and found_e and _number(steps) and _number(epochs)
      and steps <= 0 and epochs <= 0):
    problems.append(f'config.train.num_steps={steps} and config.train.'
                    f'num_epochs={epochs}: set one of them > 0 (steps win).')
  _, val = _get(config, 'data.val_fraction')
  _, test = _get(config, 'data.test_fraction')
  if _finite(val) and _finite(test) and val + test >= 1:
    problems.append(f'config.data.val_fraction={val} + config.data.'
                    f'test_fraction={test} must be < 1 (nothing left to '
                    'train on).')
  _, folds = _get(config, 'data.num_folds')
  _, fold = _get(config, 'data.fold')
  if _nonneg_int(folds) and folds > 1 and _nonneg_int(fold) and fold >= folds:
    problems.append(f'config.data.fold={fold} must be < config.data.'
                    f'num_folds={folds}.')
  _, mean = _get(config, 'data.mean')
  _, std = _get(config, 'data.std')
  if (isinstance(mean, (tuple, list)) and isinstance(std, (tuple, list))
      and len(mean) != len(std)):
    problems.append(f'config.data.mean={tuple(mean)} and config.data.std='
                    f'{tuple(std)} must have the same length.')
  _, batch = _get(config, 'train.batch_size')
  _, accum = _get(config, 'train.grad_accum_steps')
  if _positive_int(batch) and _positive_int(accum) and batch % accum:
    problems.append(f'config.train.batch_size={batch} must be a multiple of '
                    f'config.train.grad_accum_steps={accum} (the micro-batch '
                    'is batch_size / grad_accum_steps).')
  _, name = _get(config, 'optim.name')
  _, nesterov = _get(config, 'optim.nesterov')
  _, momentum = _get(config, 'optim.momentum')
  if name == 'sgd' and nesterov is True and momentum == 0:
    problems.append('config.optim.nesterov=True needs config.optim.momentum '
                    '> 0 (it is 0); set nesterov=False for plain SGD.')
  problems += _register_to_problems(config)
  problems += _strides_problems(config)
  _, weights = _get(config, 'loss.weights')
  if weights is not None:
    items = dict(weights.items()) if hasattr(weights, 'items') else {}
    bad = {k: v for k, v in items.items() if not _nonneg(v)}
    for key, value in bad.items():
      problems.append(f'config.loss.weights.{key}={value!r}: must be a finite '
                      'number >= 0.')
    if items and not bad and not any(v > 0 for v in items.values()):
      problems.append(f'config.loss.weights={items}: at least one weight '
                      'must be > 0.')
  _, rule = _get(config, 'eval.decision.rule')
  _, truth = _get(config, 'eval.decision.truth')
  _, column = _get(config, 'eval.decision.truth_column')
  if rule and truth == 'column' and not column:
    problems.append("config.eval.decision.truth='column' needs config.eval."
                    'decision.truth_column (and truth_positive), e.g. '
                    'diagnosis and melanoma.')
  return problems


def _strides_problems(config) -> list[str]:
  """config.model.strides: (), or one per-axis tuple per downsampling level."""
  found, strides = _get(config, 'model.strides')
  _, features = _get(config, 'model.features')
  if not found or strides in ((), []) or not isinstance(features,
                                                         (tuple, list)):
    return []
  levels = len(features) - 1
  rows = strides if isinstance(strides, (tuple, list)) else None
  ok = (rows is not None and len(rows) == levels and all(
      isinstance(r, (tuple, list)) and len(r) in (2, 3)
      and all(_positive_int(x) for x in r) for r in rows)
        and len({len(r) for r in rows}) == 1)
  if not ok:
    return [f'config.model.strides={strides!r}: must be () (2 on every axis) '
            f'or {levels} per-axis stride tuples, one per downsampling level '
            f'of features {tuple(features)}, all of one rank, e.g. '
            f'{((1, 2, 2),) + ((2, 2, 2),) * (levels - 1)}.']
  _, patch = _get(config, 'data.patch_size')
  if isinstance(patch, (tuple, list)) and patch and len(patch) != len(rows[0]):
    return [f'config.model.strides={strides!r} has {len(rows[0])} axes per '
            f'level, config.data.patch_size={tuple(patch)} has {len(patch)}: '
            'give one stride per patch axis.']
  return []


def _register_to_problems(config) -> list[str]:
  """config.data.preprocess.register_to: -1, or a channel of a NIfTI case."""
  found, index = _get(config, 'data.preprocess.register_to')
  if not found or index == -1:
    return []
  key = f'config.data.preprocess.register_to={index!r}'
  _, channels = _get(config, 'data.in_channels')
  _, mode = _get(config, 'data.volume_mode')
  _, context = _get(config, 'data.slice_context')
  if mode == '2d' and _nonneg_int(context) and _positive_int(channels):
    channels //= 2 * context + 1  # in_channels counts the context slices.
  if not isinstance(index, int) or isinstance(index, bool) or index < -1:
    return [f'{key}: must be a channel index (0, 1, ...) or -1 (off).']
  if _get(config, 'data.source')[1] != 'nifti':
    return [f"{key}: registration works on volume channels of "
            "config.data.source='nifti' (MSD/nnU-Net folders, DICOM series); "
            'set it to -1.']
  if _positive_int(channels) and index >= channels:
    return [f'{key}: out of range, the cases have {channels} channel(s) '
            f'(0..{channels - 1}); set a channel index or -1 (off).']
  return []


def config_problems(config) -> list[str]:
  """Returns one line per bad value of `config`, naming the key and its value.

  Args:
    config: an experiment ConfigDict (or nested dicts).

  Returns:
    Lines like 'config.train.batch_size=0: must be a positive integer.';
    empty when every value is valid.
  """
  problems = []
  for key, valid, rule in CHECKS:
    found, value = _get(config, key)
    if found and not valid(value):
      problems.append(f'config.{key}={value!r}: {rule}.')
  return problems + _cross_checks(config)


def validate_config(config) -> None:
  """Raises one ValueError listing every bad value of `config`.

  Called once at the start of a run, before anything is written.
  """
  problems = config_problems(config)
  if problems:
    raise ValueError('Invalid config (nothing was written):\n' + '\n'.join(
        '  ' + p for p in problems) + '\nFix these values (e.g. '
        '--config.KEY=VALUE) and run again.')
