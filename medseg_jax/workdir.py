"""The run's working directory: checks, `config.json` and `metrics.jsonl`.

Nothing here touches an existing checkpoint: incompatibilities are found by
comparing configs before the run starts writing.
"""

import json
import os
import tempfile
import time

# Config sections that fix the shapes of the saved state: a checkpoint made
# with other values cannot be restored into this run.
STATE_DEFINING_KEYS = ('model', 'data.num_classes', 'data.in_channels',
                       'optim.name')


def check_writable(workdir: str) -> None:
  """Creates `workdir` if needed and raises a clear error if it is not writable."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix='.write_test'):
      pass
  except OSError as e:
    raise PermissionError(
        f'Cannot write to workdir {workdir!r} ({e.strerror}); pass a '
        'writable --workdir.') from e


def _lookup(config_dict: dict, dotted: str):
  """Returns the value at a dotted key of a nested dict, or None."""
  value = config_dict
  for part in dotted.split('.'):
    if not isinstance(value, dict) or part not in value:
      return None
    value = value[part]
  return value


def _flatten(value, prefix: str) -> dict[str, object]:
  """Flattens nested dicts to {dotted key: leaf}."""
  if not isinstance(value, dict):
    return {prefix: value}
  flat = {}
  for key, sub in value.items():
    flat.update(_flatten(sub, f'{prefix}.{key}'))
  return flat


def incompatible_keys(saved: dict, current: dict) -> list[str]:
  """Lists state-defining config keys whose values differ, with both values.

  Args:
    saved: the config of the existing run (from its config.json).
    current: the config of this run, as JSON-like dicts.

  Returns:
    Human-readable lines 'config.KEY: saved X, now Y'; empty if compatible.
  """
  lines = []
  for key in STATE_DEFINING_KEYS:
    old = _flatten(_lookup(saved, key), key)
    new = _flatten(_lookup(current, key), key)
    for flat_key in sorted(set(old) | set(new)):
      if old.get(flat_key) != new.get(flat_key):
        lines.append(f'config.{flat_key}: checkpoint has {old.get(flat_key)!r}, '
                     f'this run has {new.get(flat_key)!r}')
  return lines


def config_as_json_dict(config) -> dict:
  """Returns the config as plain JSON types (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def check_resumable(workdir: str, config, has_checkpoint: bool) -> None:
  """Raises if `workdir` holds a checkpoint made with an incompatible config."""
  path = os.path.join(workdir, 'config.json')
  if not has_checkpoint or not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  lines = incompatible_keys(saved, config_as_json_dict(config))
  if lines:
    raise ValueError(
        f'Workdir {workdir!r} holds a checkpoint from an incompatible config:\n'
        + '\n'.join('  ' + line for line in lines) +
        '\nUse a new --workdir, or the same config to resume. The existing '
        'checkpoint was not modified.')


def saved_config_dict(workdir: str) -> dict:
  """Returns the run's `config.json` as a dict; raises if there is none."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{path} does not exist: {workdir!r} is not a training workdir (train '
        'first with --mode=train, or pass the --workdir of a trained run).')
  with open(path) as f:
    return json.load(f)


def load_config(workdir: str):
  """Returns the ConfigDict a run was trained with (from its config.json).

  JSON has no tuples: lists of numbers come back as tuples, as configs write
  them.
  """
  import ml_collections  # pylint: disable=import-outside-toplevel

  def tuples(value):
    if isinstance(value, dict):
      return {k: tuples(v) for k, v in value.items()}
    if isinstance(value, list):
      return tuple(tuples(v) for v in value)
    return value

  return ml_collections.ConfigDict(tuples(saved_config_dict(workdir)))


def check_same_model(workdir: str, config) -> None:
  """Raises if `config` describes another model than the one `workdir` trained.

  Used before loading a checkpoint for evaluation or prediction, so a
  mismatch is reported by config key instead of as a shape error.
  """
  lines = incompatible_keys(saved_config_dict(workdir),
                            config_as_json_dict(config))
  lines = [line for line in lines if not line.startswith('config.optim.')]
  if lines:
    raise ValueError(
        f'The checkpoints in {workdir!r} were trained with another model '
        'config than the one given:\n' + '\n'.join('  ' + l for l in lines) +
        '\nPass the config the run was trained with, or leave --config out '
        'to use its config.json.')


def write_config(workdir: str, config) -> None:
  """Writes `config.json` (atomically, so a crash never leaves half a file)."""
  path = os.path.join(workdir, 'config.json')
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(tmp, path)


class MetricsLog:
  """Appends one JSON object per event to `metrics.jsonl`."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.enabled = enabled

  def write(self, step: int, split: str, values: dict) -> None:
    """Appends {'step', 'split', 'time', **values}."""
    if not self.enabled:
      return
    record = {'step': int(step), 'split': split, 'time': time.time()}
    record.update({k: float(v) for k, v in values.items()})
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')


def read_metrics(workdir: str) -> list[dict]:
  """Returns every event of a run's `metrics.jsonl`, in order."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
