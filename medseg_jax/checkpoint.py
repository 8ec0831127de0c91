"""Orbax checkpoints: the latest (state + data iterator) and the best (by Dice).

Layout under the workdir:
  checkpoints/latest/<step>/{state,data,meta}  resumable: state + Grain iterator
  checkpoints/best/<step>/{state,meta}         best validation Dice so far
  checkpoints/best_ema/<step>/{state,meta}     with train.ema_decay > 0: the
                                               best of the EMA parameters (the
                                               state with params = the EMA)
  checkpoints/damaged/<kind>-<step>            damaged checkpoints, moved aside

Orbax writes each checkpoint to a temporary directory and renames it when
complete, so a run killed mid-save never leaves a partial checkpoint. Damage
after the fact is found by `checkpoint_files` (unreadable metadata, missing
arrays, checksums); a damaged newest `latest` falls back to the next older one.
"""

import os
from typing import Any

from absl import logging
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from medseg_jax import checkpoint_files
from medseg_jax import parallel
from medseg_jax import workdir as workdir_lib
# The public names of checkpoint_files, used with the Checkpointer.
from medseg_jax.checkpoint_files import (CheckpointDamagedError,
                                         CheckpointMismatchError,
                                         check_all_match, saved_shapes,
                                         state_checksums, step_numbers)


# --- The run's checkpoints ---------------------------------------------------


def _manager(directory: str, max_to_keep: int, item_names) -> ocp.CheckpointManager:
  """Returns an async Orbax manager for `directory`."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=item_names)


class Checkpointer:
  """Saves and restores the latest and the best checkpoint of a run."""

  def __init__(self, workdir: str, max_to_keep: int = 2, state_bytes: int = 0,
               ema: bool = False):
    """Opens (creating if needed) the run's checkpoint managers.

    Args:
      workdir: the run's workdir.
      max_to_keep: latest checkpoints kept (older ones are deleted by Orbax).
      state_bytes: the size of the saved state, for the free-space check.
      ema: also keep checkpoints/best_ema/ (train.ema_decay > 0).
    """
    self.workdir, self.state_bytes = workdir, state_bytes
    root = os.path.join(workdir, 'checkpoints')
    self.latest = _manager(os.path.join(root, 'latest'), max_to_keep,
                           ('state', 'data', 'meta'))
    self.best = _manager(os.path.join(root, 'best'), 1, ('state', 'meta'))
    self.best_ema = (_manager(os.path.join(root, 'best_ema'), 1,
                              ('state', 'meta')) if ema else None)

  def _bests(self):
    return [m for m in (self.best, self.best_ema) if m is not None]

  def disk_full_error(self) -> workdir_lib.DiskFullError:
    """The one-line error for a full disk, naming the newest complete save."""
    saved = step_numbers(str(self.latest.directory))
    # Room for this save and one still being written in the background.
    return workdir_lib.disk_full_error(self.workdir, 2 * self.state_bytes,
                                       saved[0] if saved else None)

  def check_space(self) -> None:
    """Raises DiskFullError before a save that cannot fit.

    Called before each save (a statvfs call, nothing per step), so a full
    disk stops the run here rather than deep inside Orbax's writer threads.
    A disk filled by someone else during the save is caught when it fails.
    """
    if workdir_lib.free_bytes(self.workdir) < 2 * self.state_bytes:
      self.wait()  # So the error names the newest save that completed.
      raise self.disk_full_error()

  def latest_step(self) -> int | None:
    """Returns the step of the latest checkpoint, or None if there is none."""
    return self.latest.latest_step()

  def save_latest(self, step: int, state, data_iterator) -> None:
    """Saves state, data iterator and checksums at `step` (asynchronously)."""
    self.latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        meta=ocp.args.JsonSave({'checksums': state_checksums(state)})))

  def _restore_step(self, step: int, abstract_state, data_iterator):
    """Restores one latest step, its files and checksums verified first."""
    step_dir = os.path.join(str(self.latest.directory), str(step))
    checkpoint_files.verify_state_files(os.path.join(step_dir, 'state'),
                                        checkpoint_files.read_meta(step_dir))
    restored = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored['state']

  def restore_latest(self, abstract_state, data_iterator, is_main: bool = True,
                     known_damaged=None) -> tuple[Any, int | None]:
    """Restores the newest intact latest checkpoint; damaged ones are set aside.

    Each damaged step is reported in one line and moved to
    checkpoints/damaged/ (by process 0), then the next older one is tried.

    Args:
      abstract_state: a pytree of `jax.ShapeDtypeStruct` with shardings.
      data_iterator: the Grain iterator to set to the saved position.
      is_main: whether this process reports and moves damaged folders.
      known_damaged: {step folder: reason} found by `check_all_match`; not
        handed to Orbax again (it would only repeat the error, noisily).

    Returns:
      (state, step), or (None, None) if there is no checkpoint.

    Raises:
      CheckpointDamagedError: there are checkpoints, none of them intact.
    """
    steps = step_numbers(str(self.latest.directory))
    damaged = []
    for step in steps:
      step_dir = os.path.join(str(self.latest.directory), str(step))
      reason = (known_damaged or {}).get(os.path.abspath(step_dir))
      if reason is None:
        try:
          state = self._restore_step(step, abstract_state, data_iterator)
        except Exception as e:  # pylint: disable=broad-except
          # Shapes were checked before (check_all_match): what fails now is
          # the files themselves.
          reason = checkpoint_files.one_line(e)
      if reason is not None:
        damaged.append(step_dir)
        if is_main:
          print(f'Checkpoint {step_dir} is damaged ({reason}); trying the '
                'next older one.')
        continue
      if damaged:
        self._set_aside(damaged, 'latest', is_main)
      return state, step
    if damaged:
      raise CheckpointDamagedError(
          f'No intact checkpoint in {self.latest.directory}: steps {steps} '
          'are all damaged (left as they are). Delete that folder to train '
          'from scratch, or use a new --workdir.')
    return None, None

  def _set_aside(self, step_dirs, kind: str, is_main: bool) -> None:
    """Moves damaged step folders out of a manager's view (process 0)."""
    if is_main:
      for step_dir in step_dirs:
        moved = checkpoint_files.set_aside(step_dir, kind)
        print(f'Moved the damaged {step_dir} to {moved}.')
    parallel.barrier('damaged_checkpoints_set_aside')
    self.latest.reload()
    for manager in self._bests():
      manager.reload()

  def best_metric(self, is_main: bool = True, kind: str = 'best') -> float:
    """Returns the validation Dice of the best checkpoint, or -inf.

    A best checkpoint whose metadata is damaged is reported and set aside:
    the next evaluation then saves a new best.

    Args:
      is_main: whether this process reports and moves damaged folders.
      kind: 'best', or 'best_ema' (the EMA parameters' best).

    Returns:
      The Dice saved with that checkpoint, or -inf when there is none.
    """
    manager = self.best_ema if kind == 'best_ema' else self.best
    step = manager.latest_step()
    if step is None:
      return float('-inf')
    step_dir = os.path.join(str(manager.directory), str(step))
    try:
      saved_shapes(os.path.join(step_dir, 'state'))
      meta = checkpoint_files.read_meta(step_dir)
      return float(meta['dice'])
    except (CheckpointDamagedError, KeyError, TypeError, ValueError) as e:
      if is_main:
        print(f'Best checkpoint {step_dir} is damaged '
              f'({checkpoint_files.one_line(e)}).')
      self._set_aside([step_dir], kind, is_main)
      return float('-inf')

  def best_step(self, kind: str = 'best') -> int | None:
    """Returns the step of the best (or best_ema) checkpoint, or None."""
    manager = self.best_ema if kind == 'best_ema' else self.best
    return manager.latest_step()

  def save_best(self, step: int, state, metrics: dict[str, float],
                kind: str = 'best') -> bool:
    """Saves `state` as the new best checkpoint, with its metrics.

    Args:
      step: the training step.
      state: the state to save (for 'best_ema', with params = the EMA).
      metrics: its validation metrics ('dice' is read back by best_metric).
      kind: 'best' or 'best_ema'.

    Returns:
      False if a best checkpoint of this step or a later one exists already
      (a run resumed from before it, e.g. after dying between save_best and
      save_latest, retrains the same steps): it is kept.
    """
    manager = self.best_ema if kind == 'best_ema' else self.best
    newest = manager.latest_step()
    if newest is not None and step <= newest:
      return False
    meta = {k: float(v) for k, v in metrics.items()}
    meta['checksums'] = state_checksums(state)
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                   force=True)
    return True

  def wait(self) -> None:
    """Blocks until every pending asynchronous save has been written."""
    self.latest.wait_until_finished()
    for manager in self._bests():
      manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the managers."""
    self.latest.close()
    for manager in self._bests():
      manager.close()


def abstract_with_shardings(abstract_state, shardings):
  """Attaches shardings to a pytree of ShapeDtypeStructs, for restoring."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, shardings)


# --- Loading weights for evaluation and prediction --------------------------

_WEIGHTS = ('step', 'params', 'batch_stats')


def _restore_weights(step_dir: str) -> dict:
  """Restores step, params and batch_stats of one step as NumPy arrays.

  Only these are read (a partial restore), so a damaged optimiser state does
  not stop evaluation; their files and checksums are verified first.
  """
  state_dir = os.path.join(step_dir, 'state')
  checkpoint_files.verify_state_files(
      state_dir, checkpoint_files.read_meta(step_dir), only=_WEIGHTS)
  item = {}
  for key in saved_shapes(state_dir, _WEIGHTS):
    parts = key.split('/')
    if parts[0] in _WEIGHTS:
      node = item
      for part in parts[:-1]:
        node = node.setdefault(part, {})
      node[parts[-1]] = 0
  restore_args = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  # Orbax warns that the item has no metadata of its own (the manager wrote
  # it one level up); expected here, only noise.
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    state = ocp.PyTreeCheckpointer().restore(
        state_dir, args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))
  finally:
    logging.set_verbosity(verbosity)
  state.setdefault('batch_stats', {})
  return state


def load_state_arrays(workdir: str, which: str = 'latest', step=None):
  """Loads a saved model's weights as host NumPy arrays, without a model or mesh.

  Works whatever the device layout the checkpoint was saved with. Only the
  weights are read, so a damaged optimiser state does not matter. With
  `step=None`, a damaged newest checkpoint is reported in one line and the
  next older one of `which` is loaded.

  Args:
    workdir: the run's workdir.
    which: 'latest', 'best' or 'best_ema'.
    step: a step to load; the newest intact one of `which` when None.

  Returns:
    (state dict with 'step', 'params', 'batch_stats'; step).

  Raises:
    FileNotFoundError: no checkpoint of `which` (or not that step).
    CheckpointDamagedError: the step asked for (or every step) is damaged.
  """
  directory = os.path.abspath(os.path.join(workdir, 'checkpoints', which))
  steps = step_numbers(directory)
  if not steps:
    raise FileNotFoundError(f'No checkpoint in {directory}.')
  if step is not None:
    if int(step) not in steps:
      raise FileNotFoundError(f'No checkpoint of step {step} in {directory} '
                              f'(it has steps {sorted(steps)}).')
    steps = [int(step)]
  errors = []
  for candidate in steps:
    step_dir = os.path.join(directory, str(candidate))
    try:
      return _restore_weights(step_dir), candidate
    except Exception as e:  # pylint: disable=broad-except
      errors.append(f'Checkpoint {step_dir} is damaged '
                    f'({checkpoint_files.one_line(e)})')
      if len(steps) > 1:
        print(errors[-1] + '; trying the next older one.')
  raise CheckpointDamagedError(
      ('; '.join(errors) if len(errors) == 1 else
       f'No intact checkpoint in {directory}') + '. The files were left as '
      'they are; load another --step or --checkpoint.')
