"""Orbax checkpoints: the latest (state + data iterator) and the best (by Dice).

Layout under the workdir:
  checkpoints/latest/<step>/{state,data}  resumable: model state + Grain iterator
  checkpoints/best/<step>/{state,meta}    best validation Dice so far

Orbax writes each checkpoint to a temporary directory and renames it when
complete, so a run killed mid-save never leaves a partial latest checkpoint.
"""

import os
from typing import Any

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp


def _manager(directory: str, max_to_keep: int, item_names) -> ocp.CheckpointManager:
  """Returns an async Orbax manager for `directory`."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=item_names)


class Checkpointer:
  """Saves and restores the latest and the best checkpoint of a run."""

  def __init__(self, workdir: str, max_to_keep: int = 2):
    root = os.path.join(workdir, 'checkpoints')
    self.latest = _manager(os.path.join(root, 'latest'), max_to_keep,
                           ('state', 'data'))
    self.best = _manager(os.path.join(root, 'best'), 1, ('state', 'meta'))

  def latest_step(self) -> int | None:
    """Returns the step of the latest checkpoint, or None if there is none."""
    return self.latest.latest_step()

  def save_latest(self, step: int, state, data_iterator) -> None:
    """Saves state and data iterator at `step` (asynchronously)."""
    self.latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator)))

  def restore_latest(self, abstract_state, data_iterator) -> tuple[Any, int]:
    """Restores the latest checkpoint into the given abstract state and iterator.

    Args:
      abstract_state: a pytree of `jax.ShapeDtypeStruct` with shardings.
      data_iterator: the Grain iterator to set to the saved position.

    Returns:
      (state, step).
    """
    step = self.latest.latest_step()
    restored = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored['state'], step

  def best_metric(self) -> float:
    """Returns the validation Dice of the best checkpoint, or -inf."""
    step = self.best.latest_step()
    if step is None:
      return float('-inf')
    meta = self.best.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta']
    return float(meta['dice'])

  def save_best(self, step: int, state, metrics: dict[str, float]) -> None:
    """Saves `state` as the new best checkpoint, with its metrics."""
    self.best.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({k: float(v) for k, v in metrics.items()})),
        force=True)

  def restore_best(self, abstract_state) -> tuple[Any, int]:
    """Restores the best checkpoint's state; returns (state, step)."""
    step = self.best.latest_step()
    if step is None:
      raise FileNotFoundError('No best checkpoint in '
                              f'{self.best.directory}; train first.')
    restored = self.best.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored['state'], step

  def wait(self) -> None:
    """Blocks until every pending asynchronous save has been written."""
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the managers."""
    self.latest.close()
    self.best.close()


def abstract_with_shardings(abstract_state, shardings):
  """Attaches shardings to a pytree of ShapeDtypeStructs, for restoring."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, shardings)


def load_state_arrays(workdir: str, which: str = 'latest', step=None):
  """Loads a saved TrainState as host NumPy arrays, without a model or mesh.

  Works whatever the device layout the checkpoint was saved with (e.g. saved
  on 4 devices, read on 1): arrays are restored onto the first local device.

  Args:
    workdir: the run's workdir.
    which: 'latest' or 'best'.
    step: a step to load; the newest of `which` when None.

  Returns:
    (state dict with 'step', 'params', 'batch_stats', 'opt_state'; step).
  """
  directory = os.path.abspath(os.path.join(workdir, 'checkpoints', which))
  if step is None:
    steps = [int(name) for name in os.listdir(directory) if name.isdigit()] if (
        os.path.isdir(directory)) else []
    if not steps:
      raise FileNotFoundError(f'No checkpoint in {directory}.')
    step = max(steps)
  path = os.path.join(directory, str(step), 'state')
  checkpointer = ocp.StandardCheckpointer()
  # The step's metadata file is one level up (the manager wrote it): Orbax
  # warns that the item has none, which is expected here and only noise.
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    tree = checkpointer.metadata(path).item_metadata
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        tree)
    state = jax.device_get(checkpointer.restore(path, target))
  finally:
    logging.set_verbosity(verbosity)
  return state, step
