"""The run's event log, `metrics.jsonl`: one JSON object per line, with `step` and `split`.

Written by training (train, compile, val records); read by reports and plots.
A resume appends a marker, and readers drop the records of steps that were
trained again after it, so every (step, split) appears once in what they read.
A partial last line (a write cut off by a crash or a full disk) is skipped.
Each record is passed on to the run's TensorBoard writer after its line is
written (tensorboard.py): this file stays the source of truth.
"""

import json
import os
import time


RESUME_SPLIT = 'resume'


class MetricsLog:
  """Appends one JSON object per event to `metrics.jsonl`."""

  def __init__(self, workdir: str, enabled: bool = True, tensorboard=None):
    """Args:
      workdir: the run's workdir.
      enabled: False writes nothing (processes other than 0).
      tensorboard: optional `tensorboard.TensorBoardWriter`; each record's
        values are passed to its `scalars` after the JSON line is written.
    """
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.enabled = enabled
    self.tensorboard = tensorboard

  def start(self, start_step: int) -> None:
    """Prepares the log for this start of the run, at `start_step` (0: fresh).

    A partial last line (a write cut off by a crash or a full disk) is
    removed, so the next record starts on its own line. If earlier starts
    wrote records, a marker {'split': 'resume', 'step': start_step} is
    appended: records of later steps, written before a crash and trained
    again now, are superseded (see `read_metrics`).
    """
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path, 'rb+') as f:
      data = f.read()
      if data and not data.endswith(b'\n'):
        f.truncate(data.rfind(b'\n') + 1)
    if data.strip():
      self.write(start_step, RESUME_SPLIT, {})

  def write(self, step: int, split: str, values: dict) -> None:
    """Appends {'step', 'split', 'time', **values}."""
    if not self.enabled:
      return
    record = {'step': int(step), 'split': split, 'time': time.time()}
    record.update({k: float(v) for k, v in values.items()})
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    # After the line: metrics.jsonl is the record, TensorBoard a view of it
    # (its writer never raises, so it cannot stop the run).
    if self.tensorboard is not None:
      self.tensorboard.scalars(step, split, record_values(record))


def record_values(record: dict) -> dict:
  """The values of a record: all but its 'step', 'split' and 'time'."""
  return {k: v for k, v in record.items()
          if k not in ('step', 'split', 'time')}


def read_metrics(workdir: str, keep_resumes: bool = False) -> list[dict]:
  """Returns the events of a run's `metrics.jsonl` as its reports should see them.

  A partial last line (an interrupted write) is skipped. At each resume
  marker, the records of steps after the restored one are dropped: they were
  trained again, so every (step, split) appears once.

  Args:
    workdir: the run's workdir.
    keep_resumes: also return the resume markers (split 'resume').

  Returns:
    The records, in order.

  Raises:
    ValueError: a line other than the last is not JSON (names file and line).
  """
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().split('\n')
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError as e:
      if number == len(lines):  # Cut off: the file does not end in '\n'.
        break
      raise ValueError(f'{path}, line {number}, is not JSON ({e}); remove '
                       'that line.') from e
    if record.get('split') == RESUME_SPLIT:
      records = [r for r in records if r.get('step', 0) <= record['step']]
      if not keep_resumes:
        continue
    records.append(record)
  return records
