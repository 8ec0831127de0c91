"""Loading a trained run for prediction: config, model, checkpoint, ensemble.

What `Predictor.from_workdir` does before it can predict:

    config, model, variables, step, members = load_run('runs/x')

Checkpoints are read as host arrays (`checkpoint.load_state_arrays`: any
device layout, a damaged optimiser state does not matter) and checked against
the model of the config, so a mismatch is reported by config key or by array
shape, never deep inside a jitted call.
"""

import os

import jax
import numpy as np

from medseg_jax import checkpoint as checkpoint_lib
from medseg_jax import config_lib
from medseg_jax import models
from medseg_jax import workdir as workdir_lib
from medseg_jax.models import registry


def _saved_steps(workdir: str, which: str) -> list[int]:
  directory = os.path.join(workdir, 'checkpoints', which)
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(n) for n in names if n.isdigit())


def checkpoint_kind(workdir: str, which: str, step) -> str:
  """Returns 'best' or 'latest': `which`, or the kind that holds `step`.

  `step` is loaded from the best checkpoints when it is there, else from the
  latest ones (the best directory keeps only one step).

  Args:
    workdir: the run's workdir.
    which: 'best' or 'latest'.
    step: a step, or None for the newest of `which`.

  Returns:
    The checkpoint kind to load from.

  Raises:
    FileNotFoundError: no checkpoint of that step; lists the saved steps.
  """
  if step is None:
    return which
  kinds = (which, 'latest' if which == 'best' else 'best')
  for kind in kinds:
    if int(step) in _saved_steps(workdir, kind):
      return kind
  saved = '; '.join(f'{k}: {_saved_steps(workdir, k) or "none"}'
                    for k in kinds)
  raise FileNotFoundError(
      f'No checkpoint of step {step} in '
      f'{os.path.join(workdir, "checkpoints")} (saved steps, {saved}). Pass '
      'one of those to --step, or leave --step out.')


def _check_variables_match(variables, abstract, workdir: str) -> None:
  """Raises a clear error if the checkpoint's arrays are not the model's."""
  def shapes(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): tuple(np.shape(leaf))
            for path, leaf in flat}

  saved, wanted = shapes(variables), shapes(abstract)
  if saved != wanted:
    diff = sorted(set(saved.items()) ^ set(wanted.items()))[:5]
    raise ValueError(
        f'The checkpoint in {workdir!r} does not fit the model of this config '
        f'(first differences: {diff}). Evaluate with the config the run was '
        'trained with (leave --config out to use its config.json).')


def load_variables(config, model, workdir: str, which: str = 'best',
                   step=None) -> tuple[dict, int]:
  """Returns (variables, step) of a run's checkpoint, on one device.

  Args:
    config: the run's config (its model and input shape).
    model: the module `config.model` describes.
    workdir: the run's workdir.
    which: 'best' or 'latest'.
    step: a step to load (from `which`, else from the other kind); the
      newest of `which` when None.

  Returns:
    ({'params', ['batch_stats']} as host arrays, the step loaded).

  Raises:
    ValueError: the checkpoint's arrays do not fit the model.
    FileNotFoundError: no such checkpoint.
  """
  which = checkpoint_kind(workdir, which, step)
  state, step = checkpoint_lib.load_state_arrays(workdir, which, step)
  variables = {'params': state['params']}
  if state.get('batch_stats'):  # Absent for models without batch norm.
    variables['batch_stats'] = state['batch_stats']
  abstract = registry.abstract_variables(
      model, config_lib.model_input_shape(config))
  abstract = {k: v for k, v in abstract.items() if k in variables}
  _check_variables_match(variables, abstract, workdir)
  return variables, step


def check_mc_settings(config) -> None:
  """Raises before any prediction if MC dropout is asked for but cannot work.

  Args:
    config: the run's config (`eval.mc_samples`, `model.dropout_rate`).

  Raises:
    ValueError: one sample, or a model trained without dropout.
  """
  samples = config.eval.mc_samples
  if not samples:
    return
  if samples < 2:
    raise ValueError(f'config.eval.mc_samples={samples}: MC dropout needs at '
                     'least 2 samples (20 is common), or 0 for none.')
  if not config.model.dropout_rate > 0:
    raise ValueError(
        f'config.eval.mc_samples={samples} needs a model trained with dropout, '
        'but this run has config.model.dropout_rate='
        f'{config.model.dropout_rate}. Set --config.eval.mc_samples=0, or '
        'train with --config.model.dropout_rate=0.1 (or more).')


def load_run(workdir: str, which: str = 'best', step=None, ensemble=(),
             config_overrides=None, config=None):
  """Loads a run's config, model and variables, and an ensemble's others.

  Args:
    workdir: the run's workdir.
    which: 'best' or 'latest'.
    step: a step to load instead of the newest of `which`.
    ensemble: workdirs of other runs of the same model, whose `which`
      checkpoints are loaded too.
    config_overrides: {dotted key: value} changes of the config.
    config: a config to use instead of the run's config.json; its model
      part must be the run's.

  Returns:
    (config, model, variables, step, [the other members' variables]).

  Raises:
    ValueError: a config or ensemble member of another model, or a
      checkpoint that does not fit the model.
    FileNotFoundError: no config.json or no such checkpoint.
  """
  if config is None:
    config = workdir_lib.load_config(workdir)
  config = config_lib.with_overrides(config, config_overrides)
  workdir_lib.check_same_model(workdir, config)
  model = models.create_model(config.model, config.data.num_classes)
  variables, step = load_variables(config, model, workdir, which, step)
  members = []
  for other in ensemble:
    if not os.path.exists(os.path.join(other, 'config.json')):
      raise FileNotFoundError(f'--ensemble: {other!r} has no config.json; '
                              'give the workdirs of trained runs.')
    workdir_lib.check_same_model(other, config)
    members.append(load_variables(config, model, other, which)[0])
  return config, model, variables, step, members
