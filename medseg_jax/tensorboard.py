"""TensorBoard event files of a run, in WORKDIR/tensorboard/ (process 0 only).

A view of `metrics.jsonl` for the TensorBoard UI: every scalar record is
written after its JSON line (by `MetricsLog`), tagged '<split>/<name>' at its
step, and each evaluation adds a few validation overlays (image | truth |
prediction). `metrics.jsonl` stays the source of truth: a failure to write
here warns once and turns the writer off, and never stops training.

Written with tensorboardX's protos and record writer (no TensorFlow),
imported at the first write: with TensorBoard off it is never needed. A
resume's event file starts with a purge marker (tensorboardX's purge_step),
so the steps trained again replace the old ones in TensorBoard.
A sweep's runs each write into their own sub-workdir, so
`tensorboard --logdir SWEEP_WORKDIR` shows them side by side.
`read_events` reads the files back (tests, scripts) without TensorFlow.
"""

import glob
import os
import struct
import time
import warnings

import jax
import numpy as np

from medseg_jax import metrics as metrics_lib
from medseg_jax import metrics_log
from medseg_jax.data import pipeline

SUBDIR = 'tensorboard'
MAX_OVERLAYS = 4
# Class colours of the overlays (class 0, background, is left uncoloured);
# class 1 green, which stands out on skin and on grey scans alike.
_PALETTE = np.array([[0, 0, 0], [64, 255, 64], [255, 64, 64], [64, 128, 255],
                     [255, 224, 0], [255, 0, 255], [0, 255, 255]], np.float32)


class TensorBoardWriter:
  """Writes scalars and overlays to WORKDIR/tensorboard; never raises.

  The event file is opened at the first write, so a run that
  writes nothing (or has `enabled=False`) creates no event file.
  """

  def __init__(self, workdir: str, start_step: int, enabled: bool = True):
    """Args:
      workdir: the run's workdir.
      start_step: the step the run starts from (0: fresh; else the restored
        step, whose later steps are purged from what TensorBoard shows).
      enabled: False writes nothing (config.train.tensorboard, process != 0).
    """
    self.logdir = os.path.join(workdir, SUBDIR)
    self.start_step = int(start_step)
    self.enabled = enabled
    self._writer = None

  def _open(self):
    """Returns the event file's writer, opening it the first time.

    tensorboardX's own SummaryWriter is not used: it writes from a thread
    through a bounded queue, so a write error there (a full disk) is never
    seen here and later writes block; these synchronous writes raise here.
    """
    if self._writer is None:
      # pylint: disable=import-outside-toplevel
      from tensorboardX import event_file_writer
      from tensorboardX.proto import event_pb2
      os.makedirs(self.logdir, exist_ok=True)
      # Files are named by the second and opened with 'wb': the suffix keeps
      # a resume within the same second from overwriting the file before it,
      # and sorts it after that file.
      writer = event_file_writer.EventsWriter(
          os.path.join(self.logdir, 'events'),
          f'.from{self.start_step:09d}.{os.getpid()}')
      if self.start_step > 0:
        # Events at steps > start_step, written before the resume, were
        # trained again: TensorBoard drops them when it reads this marker
        # (what tensorboardX's purge_step writes).
        writer.write_event(event_pb2.Event(
            wall_time=time.time(), step=self.start_step + 1,
            session_log=event_pb2.SessionLog(
                status=event_pb2.SessionLog.START)))
      self._writer = writer
    return self._writer

  def _write(self, step: int, summaries) -> None:
    """Writes one event holding the values of `summaries`, and flushes."""
    # pylint: disable=import-outside-toplevel
    from tensorboardX.proto import event_pb2
    from tensorboardX.proto import summary_pb2
    writer = self._open()
    merged = summary_pb2.Summary(
        value=[value for summary in summaries for value in summary.value])
    writer.write_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                       summary=merged))
    writer.flush()

  def _fail(self, error: Exception) -> None:
    """Warns once and stops writing: TensorBoard is a view, not the record."""
    self.enabled = False
    warnings.warn(f'TensorBoard: writing to {self.logdir} failed ({error!r}); '
                  'no more event files this run. metrics.jsonl is complete.',
                  RuntimeWarning, stacklevel=3)

  def scalars(self, step: int, split: str, values: dict) -> None:
    """Adds each of `values` as scalar '<split>/<name>' at `step`."""
    if not self.enabled or split == metrics_log.RESUME_SPLIT or not values:
      return  # A resume marker holds no values.
    try:
      # pylint: disable=import-outside-toplevel
      from tensorboardX import summary as tbx_summary
      self._write(step, [tbx_summary.scalar(f'{split}/{name}', float(value))
                         for name, value in values.items()])
    except Exception as e:  # pylint: disable=broad-except
      self._fail(e)

  def overlays(self, step: int, sample, num_classes: int) -> None:
    """Adds 'val/overlay/<i>': image | truth | prediction, one per case.

    Args:
      step: the evaluation's step.
      sample: called (only when enabled) for (images [N, *spatial, C],
        truths [N, *spatial], predictions [N, *spatial]), e.g. an
        `OverlaySampler` bound to the state; its errors are caught too.
      num_classes: config.data.num_classes (1: binary).
    """
    if not self.enabled:
      return
    try:
      # pylint: disable=import-outside-toplevel
      from tensorboardX import summary as tbx_summary
      images, truths, predictions = sample()
      self._write(step, [
          tbx_summary.image(f'val/overlay/{i}',
                            overlay_panel(image, truth, pred, num_classes),
                            dataformats='HWC')
          for i, (image, truth, pred) in enumerate(
              zip(images, truths, predictions))])
    except Exception as e:  # pylint: disable=broad-except
      self._fail(e)

  def close(self) -> None:
    """Flushes and closes the event file (safe to call twice)."""
    if self._writer is not None:
      try:
        self._writer.close()
      except Exception as e:  # pylint: disable=broad-except
        if self.enabled:
          self._fail(e)
      self._writer = None


def _display_slice(array):
  """Middle axial slice (axis 0 of (D, H, W, ...)) of a 3D case; 2D as is."""
  return array[array.shape[0] // 2] if array.ndim >= 3 else array


def overlay_panel(image, truth, pred, num_classes: int) -> np.ndarray:
  """Returns image | truth over image | prediction over image, side by side.

  Args:
    image: [*spatial, C] (2D or 3D; 3D shows its middle axial slice). Three
      channels are shown as RGB; otherwise the centre channel (the slice
      itself of a slice stack) in grey. Scaled to its own min..max.
    truth, pred: [*spatial] integer class maps.
    num_classes: config.data.num_classes (1: binary, foreground 1).

  Returns:
    uint8 [H, 3 * W, 3].
  """
  image = np.asarray(image, np.float32)
  truth, pred = np.asarray(truth), np.asarray(pred)
  if image.ndim == truth.ndim + 1 and truth.ndim == 3:
    image, truth, pred = (_display_slice(a) for a in (image, truth, pred))
  if image.ndim != 3 or truth.shape != image.shape[:2] != pred.shape:
    raise ValueError(f'overlay_panel: image {image.shape}, truth {truth.shape} '
                     f'and prediction {pred.shape} do not match.')
  rgb = image[..., :3] if image.shape[-1] == 3 else np.repeat(
      image[..., image.shape[-1] // 2:image.shape[-1] // 2 + 1], 3, axis=-1)
  low, high = float(rgb.min()), float(rgb.max())
  rgb = (rgb - low) / (high - low) * 255 if high > low else np.zeros_like(rgb)
  panels = [rgb]
  for mask in (truth, pred):
    classes = np.clip(mask.astype(np.int64), 0, max(num_classes, 2) - 1)
    colour = _PALETTE[classes % len(_PALETTE)]
    alpha = np.where(classes > 0, 0.5, 0.0)[..., None]
    panels.append(rgb * (1 - alpha) + colour * alpha)
  return np.clip(np.concatenate(panels, axis=1), 0, 255).astype(np.uint8)


class OverlaySampler:
  """Predicts the first validation images for the overlays, at each evaluation.

  The images (at most MAX_OVERLAYS valid cases of the first validation
  batch) are read once; the predict function is jitted once on their fixed
  shape, apart from the train and eval steps, which it leaves untouched.
  """

  def __init__(self, model, config, data):
    self._model, self._config, self._data = model, config, data
    self._batch = None
    threshold = config.eval.threshold

    def predict(state, images):
      logits = model.apply({'params': state.params,
                            'batch_stats': state.batch_stats},
                           images, train=False)
      return metrics_lib.predict_classes(logits, threshold=threshold)

    self._predict = jax.jit(predict)

  def _first_batch(self) -> dict:
    """The first validation batch's valid cases (at most MAX_OVERLAYS)."""
    if self._batch is None:
      dataset = pipeline.eval_dataset(
          self._data, self._config.data, 'val',
          global_batch=self._config.eval.batch_size)
      iterator = iter(dataset)
      try:
        local = next(iterator)
      finally:
        iterator.close()  # Stops worker processes.
      keep = np.flatnonzero(np.asarray(local['valid']) > 0)[:MAX_OVERLAYS]
      self._batch = {k: np.asarray(local[k])[keep] for k in ('image', 'label')}
    return self._batch

  def __call__(self, state):
    """Returns (images, truths, predictions) as host NumPy arrays."""
    batch = self._first_batch()
    predictions = np.asarray(self._predict(state, batch['image']))
    return batch['image'], batch['label'], predictions


# ------------------------------------------------------------------ reading


def _records(path: str):
  """Yields the records of a TFRecord file (length, crc, data, crc)."""
  with open(path, 'rb') as f:
    while True:
      header = f.read(12)
      if len(header) < 12:
        return
      (length,) = struct.unpack('<Q', header[:8])
      data = f.read(length)
      if len(data) < length:
        return  # Cut off: a write interrupted by a crash.
      f.read(4)
      yield data


def read_events(workdir: str) -> dict:
  """Reads a run's event files back, as TensorBoard would show them.

  Files are read in name order (their names start with the creation
  time); a purge (a session start with a step, written on resume) drops the
  events at or after its step that earlier files held.

  Args:
    workdir: the run's workdir (its tensorboard/ folder is read).

  Returns:
    {'scalars': {tag: {step: value}}, 'images': {tag: {step: (height,
    width)}}, 'purge_steps': [the purge step of each resume, in order]}.
  """
  # pylint: disable=import-outside-toplevel
  from tensorboardX.proto import event_pb2
  scalars, images, purges = {}, {}, []
  paths = sorted(glob.glob(os.path.join(workdir, SUBDIR, 'events.out.*')))
  for path in paths:
    for data in _records(path):
      event = event_pb2.Event.FromString(data)
      if (event.HasField('session_log') and event.session_log.status ==
          event.session_log.START and event.step > 0):
        purges.append(event.step)
        for table in (*scalars.values(), *images.values()):
          for old in [s for s in table if s >= event.step]:
            del table[old]
      if not event.HasField('summary'):
        continue
      for value in event.summary.value:
        if value.HasField('simple_value'):
          scalars.setdefault(value.tag, {})[event.step] = value.simple_value
        elif value.HasField('image'):
          images.setdefault(value.tag, {})[event.step] = (
              value.image.height, value.image.width)
  return {'scalars': scalars, 'images': images, 'purge_steps': purges}
