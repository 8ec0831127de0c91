"""Grain pipeline: global batches independent of process count, resumable iterators."""

from absl import flags
import numpy as np

from medseg_jax.data import pipeline
from tests import conftest


def _data_and_cfg():
  config = conftest.tiny_config()
  return pipeline.build_splits(config.data), config.data


def _batches(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_two_processes_load_exactly_the_halves_of_the_global_batch():
  data, data_cfg = _data_and_cfg()
  kwargs = dict(global_batch=4, num_steps=6, seed=3)
  whole = _batches(iter(pipeline.train_dataset(data, data_cfg, **kwargs)), 6)
  parts = [_batches(iter(pipeline.train_dataset(
      data, data_cfg, process_index=i, process_count=2, **kwargs)), 6)
           for i in range(2)]
  for step in range(6):
    for key in ('image', 'label'):
      joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
      np.testing.assert_array_equal(joined, whole[step][key])


def test_each_epoch_visits_every_training_image_once_in_a_new_order():
  data, _ = _data_and_cfg()
  n = data.size('train')
  order = pipeline._EpochShuffledOrder(data.indices['train'], seed=0)
  first = [order(k) for k in range(n)]
  second = [order(k) for k in range(n, 2 * n)]
  assert sorted(first) == sorted(second) == sorted(data.indices['train'].tolist())
  assert first != second


def test_restored_iterator_continues_with_the_same_batches():
  data, data_cfg = _data_and_cfg()
  dataset = pipeline.train_dataset(data, data_cfg, global_batch=4, num_steps=6,
                                   seed=1)
  iterator = iter(dataset)
  _batches(iterator, 2)
  state = iterator.get_state()
  expected = _batches(iterator, 3)
  resumed = iter(dataset)
  resumed.set_state(state)
  for a, b in zip(expected, _batches(resumed, 3)):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_eval_dataset_pads_with_invalid_copies_to_whole_batches():
  data, data_cfg = _data_and_cfg()
  n = data.size('val')
  batches = list(pipeline.eval_dataset(data, data_cfg, 'val', global_batch=4))
  valid = np.concatenate([b['valid'] for b in batches])
  assert len(valid) == -(-n // 4) * 4
  assert valid.sum() == n and (valid[:n] == 1).all()
  # Evaluation images are not augmented: the same record twice is identical.
  again = list(pipeline.eval_dataset(data, data_cfg, 'val', global_batch=4))
  np.testing.assert_array_equal(batches[0]['image'], again[0]['image'])


def test_worker_processes_give_the_same_batches_and_resume():
  # Grain's worker start reads absl flags, parsed by main's app.run; the data
  # code itself reads none, so a caller outside app.run marks them parsed.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  data, data_cfg = _data_and_cfg()
  kwargs = dict(global_batch=4, num_steps=5, seed=2)
  in_process = _batches(iter(pipeline.train_dataset(data, data_cfg, **kwargs)),
                        5)
  data_cfg.worker_count = 2
  dataset = pipeline.train_dataset(data, data_cfg, **kwargs)
  iterator = iter(dataset)
  first = _batches(iterator, 2)
  state = iterator.get_state()
  resumed = iter(dataset)
  resumed.set_state(state)
  for a, b in zip(in_process, first + _batches(resumed, 3)):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
