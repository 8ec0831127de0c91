"""Grain input pipelines: source -> patient split -> transforms -> batches.

The order of training examples is a pure function of (seed, global position):
global position `k` is the k-th example of the global batch stream, i.e. step
`k // global_batch`, slot `k % global_batch`. Each JAX process loads only its
own slots of every global batch, and augmentation randomness is seeded by the
global position. Hence the global batch at step s is the same whatever the
number of processes or devices, and a resumed run sees the same data as an
uninterrupted one. The iterator state (its position) is saved with checkpoints.

This module imports no JAX: process index/count are passed in.
"""

import contextlib
import copy
import dataclasses
import time
from typing import Any

import grain
import numpy as np

from medseg_jax.data import geometric
from medseg_jax.data import intensity
from medseg_jax.data import patches
from medseg_jax.data import splits as splits_lib
from medseg_jax.data import sources
from medseg_jax.data import transforms as transforms_lib


@dataclasses.dataclass(frozen=True)
class DataSplits:
  """A source and its record indices per split."""
  source: Any
  indices: dict[str, np.ndarray]

  def size(self, split: str) -> int:
    """Returns the number of records in `split`."""
    return len(self.indices[split])


def official_split_indices(source, data_cfg) -> dict[str, np.ndarray]:
  """Returns the data set's own train/val/test records (ISIC folders, manifest).

  Raises:
    ValueError: the source has no official splits, a record has none, or a
      patient has records in two splits.
  """
  names = list(getattr(source, 'official_splits', None) or [])
  where = 'config.data.official_splits=True'
  if not names or not any(names):
    raise ValueError(f'{where}, but config.data.source={data_cfg.source!r} '
                     'has no official splits (ISIC validation/test folders, '
                     "or a 'split' column in the manifest).")
  missing = [c for c, n in zip(source.case_ids, names) if not n]
  if missing:
    raise ValueError(f'{where}, but {len(missing)} record(s) have no split, '
                     f'e.g. {missing[:3]}; fill the manifest\'s split column.')
  seen = {}
  for patient, split in zip(source.patient_ids, names):
    if seen.setdefault(patient, split) != split:
      raise ValueError(f'{where}: patient {patient!r} has records in the '
                       f'{seen[patient]!r} and {split!r} splits.')
  names = np.asarray(names)
  return {s: np.flatnonzero(names == s) for s in splits_lib.SPLITS}


def build_splits(data_cfg) -> DataSplits:
  """Builds the source named by `data_cfg` and splits it by patient.

  The split is `splits.split_for_config` (seeded, by patient, with k-fold and
  train fractions), or the data set's own when `data_cfg.official_splits`.
  """
  source = sources.build_source(data_cfg)
  if len(source) == 0:
    raise ValueError(f'config.data.source={data_cfg.source!r} has no records.')
  if data_cfg.official_splits:
    indices = official_split_indices(source, data_cfg)
  else:
    indices = splits_lib.split_for_config(source.patient_ids, data_cfg)
  return DataSplits(source=source, indices=indices)


AUGMENT_PLACES = ('host', 'device')


def augment_on(data_cfg) -> str:
  """Returns where training augmentation runs: 'host' (default) or 'device'.

  Raises:
    ValueError: `config.data.augment_on` is neither.
  """
  place = data_cfg.get('augment_on', 'host') if hasattr(
      data_cfg, 'get') else getattr(data_cfg, 'augment_on', 'host')
  if place not in AUGMENT_PLACES:
    raise ValueError(f'config.data.augment_on={place!r}: must be one of '
                     f'{AUGMENT_PLACES}.')
  return place


def augmentation_transforms(data_cfg) -> list:
  """Returns the random augmentation of `config.data`, in order.

  Flips/rotations and affine, colour jitter (photographs only: hue and
  saturation mean nothing for MRI/CT channels), elastic deformation, then
  intensity augmentation (nnU-Net's order). The host runs them as Grain
  transforms; with `augment_on='device'`, `medseg_jax.device_augment` runs
  the same list inside the train step.
  """
  aug = data_cfg.augment
  colour = (intensity.build_color_transforms(aug)
            if sources.is_photo(data_cfg) else [])
  return (geometric.build_geometric_transforms(aug) + colour
          + geometric.build_elastic_transforms(aug)
          + intensity.build_intensity_transforms(aug))


@dataclasses.dataclass(frozen=True)
class DeviceInput(grain.transforms.Map):
  """What the device needs to augment an example: image and label, as loaded.

  Returns `image` (uint8 photographs stay uint8: a quarter of the bytes to
  transfer; other dtypes become float32) and `label` int32; the device
  augments, then normalises (`device_augment`).
  """

  def map(self, element):
    """Returns {'image', 'label'} (label only with a class map)."""
    image = np.asarray(element['image'])
    if image.dtype != np.uint8:
      image = image.astype(np.float32, copy=False)
    out = {'image': image}
    for key in ('mask', 'label'):
      if key in element:
        out['label'] = np.asarray(element[key]).astype(np.int32)
        break
    return out


def train_transforms(data_cfg) -> list:
  """Returns the training transforms of `config.data`, in order.

  Patch sampling (3D/2D patches with foreground oversampling, when
  `patch_size` is set), then with `augment_on='host'` the augmentation
  (`augmentation_transforms`) and `Normalize`; with `augment_on='device'`
  only `DeviceInput` (the train step augments and normalises).
  """
  patch = patches.build_patch_transforms(data_cfg, training=True)
  if augment_on(data_cfg) == 'device':
    return patch + [DeviceInput()]
  return (patch + augmentation_transforms(data_cfg)
          + transforms_lib.build_eval_transforms(data_cfg.mean, data_cfg.std))


def eval_transforms(data_cfg) -> list:
  """Returns the transforms of evaluation during training.

  With `patch_size` set, one patch centred on the case's foreground (the
  "pseudo Dice" nnU-Net reports while training); `--mode=evaluate` predicts
  whole cases by sliding windows instead.
  """
  return (patches.build_patch_transforms(data_cfg, training=False) +
          transforms_lib.build_eval_transforms(data_cfg.mean, data_cfg.std))


class _EpochShuffledOrder:
  """Maps a global position to a record index, reshuffling every epoch."""

  def __init__(self, indices: np.ndarray, seed: int):
    self._indices = np.asarray(indices)
    self._seed = seed
    self._cached = (-1, None)

  def __call__(self, position: int) -> int:
    n = len(self._indices)
    epoch, offset = divmod(int(position), n)
    if self._cached[0] != epoch:
      perm = np.random.default_rng([self._seed, epoch]).permutation(n)
      self._cached = (epoch, perm)
    return int(self._indices[self._cached[1][offset]])


@dataclasses.dataclass(frozen=True)
class _LocalSlots:
  """Maps a process-local example index to its global position."""
  global_batch: int
  local_batch: int
  process_index: int

  def __call__(self, local_index: int) -> int:
    step, slot = divmod(int(local_index), self.local_batch)
    return step * self.global_batch + self.process_index * self.local_batch + slot


class _LoadAndTransform(grain.transforms.Map):
  """Loads the record at a global position and applies the transforms.

  Random transforms get a generator seeded by (seed, position), so the same
  global position is augmented identically in every process layout. With
  `with_position`, the element carries its global position (int32), which
  keys on-device augmentation the same way.
  """

  def __init__(self, source, record_of_position, ops, seed: int,
               with_position: bool = False):
    self._source = source
    self._record_of_position = record_of_position
    self._ops = ops
    self._seed = seed
    self._with_position = with_position

  def map(self, position):
    position, valid = position if isinstance(position, tuple) else (position, 1)
    element = dict(self._source[self._record_of_position(position)])
    rng = np.random.default_rng([self._seed, int(position)])
    for op in self._ops:
      if isinstance(op, grain.transforms.RandomMap):
        element = op.random_map(element, rng)
      else:
        element = op.map(element)
    element['valid'] = np.float32(valid)
    if self._with_position:
      element['position'] = np.int32(position)
    return element


def _local_batch_size(global_batch: int, process_count: int, key: str) -> int:
  """Returns the per-process batch size, or raises if it does not divide."""
  if global_batch % process_count:
    raise ValueError(f'{key}={global_batch} must be divisible by the number of '
                     f'JAX processes ({process_count}).')
  return global_batch // process_count


def _to_iter(dataset: grain.MapDataset, data_cfg) -> grain.IterDataset:
  """Turns a map dataset into a prefetching iterable, with workers if asked."""
  iter_ds = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=max(1, data_cfg.prefetch_buffer_size),
      prefetch_buffer_size=data_cfg.prefetch_buffer_size))
  if data_cfg.worker_count > 0:
    iter_ds = iter_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=data_cfg.worker_count))
  return iter_ds


def train_dataset(data: DataSplits, data_cfg, *, global_batch: int,
                  num_steps: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
  """Returns this process's training batches for `num_steps` steps.

  Args:
    data: the source and its splits.
    data_cfg: `config.data`.
    global_batch: examples per step over all processes.
    num_steps: length of the stream in steps.
    seed: seed of the shuffle and of augmentation.
    process_index: index of this JAX process.
    process_count: number of JAX processes.

  Returns:
    An IterDataset of dicts `image` f32 `[b, *spatial, C]`, `label` i32
    `[b, *spatial]`, `valid` f32 `[b]`, with b = global_batch / process_count.
    With `augment_on='device'`, `image` is as loaded (uint8 or float32,
    not augmented or normalised) and `position` int32 `[b]` holds each
    example's global position. Its iterators are checkpointable
    (`get_state`/`set_state`).
  """
  local_batch = _local_batch_size(global_batch, process_count,
                                  'config.train.batch_size')
  ops = train_transforms(data_cfg)
  order = _EpochShuffledOrder(data.indices['train'], seed)
  dataset = (
      grain.MapDataset.range(num_steps * local_batch)
      .map(_LocalSlots(global_batch, local_batch, process_index))
      .map(_LoadAndTransform(data.source, order, ops, seed,
                             with_position=augment_on(data_cfg) == 'device'))
      .batch(local_batch, drop_remainder=True))
  return _to_iter(dataset, data_cfg)


def host_seconds_per_example(data: DataSplits, data_cfg, *, batch_size: int,
                             num_batches: int, augment: str | None = None,
                             seed: int = 0, preload: bool = True) -> float:
  """Returns the host CPU seconds spent per training example, in one process.

  Reads `num_batches` batches of `train_dataset` with no worker processes
  (so every transform runs in this process) and divides the process's CPU
  time (`time.process_time()`, all threads: Grain's prefetch threads too)
  from creating the iterator to its last batch by the examples read; the
  stream holds exactly those batches, so no read-ahead escapes the count.
  With `augment='device'` this is the host's share only: loading, patches
  and batching.

  Args:
    data: the source and its splits.
    data_cfg: `config.data`; not modified.
    batch_size: examples per batch.
    num_batches: batches read.
    augment: 'host' or 'device' to override `data_cfg.augment_on`.
    seed: seed of the order and of augmentation.
    preload: read the training records into memory first (a warm case
      cache; synthetic sources regenerate a record on every read), so the
      figure is the cost per example once decoding is cached.

  Returns:
    CPU seconds per example.
  """
  if preload:
    records = {int(i): data.source[int(i)] for i in data.indices['train']}
    data = dataclasses.replace(data, source=records)
  cfg = copy.deepcopy(data_cfg)
  unlocked = getattr(cfg, 'unlocked', None)  # A locked ConfigDict.
  with unlocked() if unlocked else contextlib.nullcontext():
    cfg.worker_count = 0
    if augment is not None:
      cfg.augment_on = augment
  augment_on(cfg)
  dataset = train_dataset(data, cfg, global_batch=batch_size,
                          num_steps=num_batches, seed=seed)
  start = time.process_time()
  iterator = iter(dataset)
  try:
    for _ in range(num_batches):
      next(iterator)
    return (time.process_time() - start) / (num_batches * batch_size)
  finally:
    close = getattr(iterator, 'close', None)
    if close is not None:
      close()


class _IndexLookup:
  """Maps a position in a split to its record index (picklable, for workers)."""

  def __init__(self, indices: np.ndarray):
    self._indices = np.asarray(indices)

  def __call__(self, position: int) -> int:
    return int(self._indices[position])


@dataclasses.dataclass(frozen=True)
class _PaddedEvalSlots:
  """Maps a local eval index to (global position, valid) over a padded split."""
  num_records: int
  global_batch: int
  local_batch: int
  process_index: int

  def __call__(self, local_index: int):
    position = _LocalSlots(self.global_batch, self.local_batch,
                           self.process_index)(local_index)
    valid = int(position < self.num_records)
    return (min(position, self.num_records - 1), valid)


def eval_dataset(data: DataSplits, data_cfg, split: str, *, global_batch: int,
                 process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
  """Returns this process's batches of a whole split, in a fixed order.

  The split is padded to a multiple of `global_batch` with copies of its last
  record whose `valid` is 0, so metrics summed under `valid` are exact and every
  step has the same shape (one compilation).
  """
  local_batch = _local_batch_size(global_batch, process_count,
                                  'config.eval.batch_size')
  indices = data.indices[split]
  if not len(indices):
    raise ValueError(f'The {split!r} split is empty.')
  num_steps = -(-len(indices) // global_batch)
  ops = eval_transforms(data_cfg)
  dataset = (
      grain.MapDataset.range(num_steps * local_batch)
      .map(_PaddedEvalSlots(len(indices), global_batch, local_batch,
                            process_index))
      .map(_LoadAndTransform(data.source, _IndexLookup(indices), ops, 0))
      .batch(local_batch, drop_remainder=True))
  return _to_iter(dataset, data_cfg)
