"""TensorBoard event files: a view of metrics.jsonl; overlays; resume purge."""

import os
import shutil

import numpy as np
import pytest

from medseg_jax import config_checks
from medseg_jax import metrics_log
from medseg_jax import tensorboard
from medseg_jax import train
from medseg_jax import workdir as workdir_lib
from tests.conftest import tiny_config

# 16 train images, batch 4: 4 steps per epoch; evaluations at steps 4 and 6.
RUN = dict(train__num_steps=6, train__eval_every_epochs=1.0,
           train__log_every_steps=2, train__tensorboard=True)


def _event_files(workdir):
  folder = os.path.join(workdir, tensorboard.SUBDIR)
  return os.listdir(folder) if os.path.isdir(folder) else []


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny run with TensorBoard on: (workdir, events)."""
  workdir = str(tmp_path_factory.mktemp('tb'))
  train.train_and_evaluate(tiny_config(**RUN), workdir)
  return workdir, tensorboard.read_events(workdir)


def test_scalars_equal_metrics_jsonl(trained):
  workdir, events = trained
  records = metrics_log.read_metrics(workdir)
  expected = {}
  for record in records:
    for name, value in metrics_log.record_values(record).items():
      expected.setdefault(f'{record["split"]}/{name}', {})[record['step']] = (
          value)
  # Every scalar of metrics.jsonl, and nothing else, at its step.
  assert set(events['scalars']) == set(expected)
  for tag, by_step in expected.items():
    got = events['scalars'][tag]
    assert sorted(got) == sorted(by_step), tag
    for step, value in by_step.items():  # Event files hold float32.
      np.testing.assert_allclose(got[step], np.float32(value), rtol=1e-6,
                                 err_msg=tag)
  for tag in ('train/loss', 'train/lr', 'train/l2_params',
              'train/images_per_s', 'val/dice', 'val/iou'):
    assert tag in events['scalars'], tag
  assert sorted(events['scalars']['val/dice']) == [4, 6]
  assert sorted(events['scalars']['train/loss']) == [2, 4, 6]


def test_overlays_at_each_evaluation(trained):
  _, events = trained
  images = events['images']
  # The 4 val cases of the first eval batch (batch 4): image|truth|prediction.
  assert sorted(images) == [f'val/overlay/{i}' for i in range(4)]
  for by_step in images.values():
    assert by_step == {4: (32, 96), 6: (32, 96)}


def test_off_writes_no_event_file_and_same_metrics(trained, tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config(**{**RUN, 'train__tensorboard': False}),
                           workdir)
  assert not os.path.exists(os.path.join(workdir, tensorboard.SUBDIR))
  # The overlays' predictions change nothing the run records.
  def results(path):
    return [(r['step'], r['split'], {k: v for k, v in r.items() if k not in (
        'time', 'images_per_s', 'compile_time_s')})
            for r in metrics_log.read_metrics(path)]
  assert results(workdir) == results(trained[0])


def test_resume_purges_replayed_steps(tmp_path):
  workdir = str(tmp_path)
  first = tensorboard.TensorBoardWriter(workdir, start_step=0)
  for step in range(1, 5):
    first.scalars(step, 'train', {'loss': float(step)})
  first.close()
  # Resumed from step 2: step 3 is trained again (new value), then it stops;
  # the old step 4 is gone from what TensorBoard shows.
  second = tensorboard.TensorBoardWriter(workdir, start_step=2)
  second.scalars(3, 'train', {'loss': 30.0})
  second.close()
  assert len(_event_files(workdir)) == 2  # Not overwritten in one second.
  events = tensorboard.read_events(workdir)
  assert events['scalars']['train/loss'] == {1: 1.0, 2: 2.0, 3: 30.0}
  assert events['purge_steps'] == [3]


def test_training_resume_writes_purge_and_matches_metrics(trained, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained[0], workdir)
  # The newest checkpoint is lost: the run resumes from step 4, trains 5-6.
  shutil.rmtree(os.path.join(workdir, 'checkpoints', 'latest', '6'))
  train.train_and_evaluate(tiny_config(**RUN), workdir)
  events = tensorboard.read_events(workdir)
  assert events['purge_steps'] == [5]
  assert len(_event_files(workdir)) == 2
  for record in metrics_log.read_metrics(workdir):
    for name, value in metrics_log.record_values(record).items():
      got = events['scalars'][f'{record["split"]}/{name}'][record['step']]
      np.testing.assert_allclose(got, np.float32(value), rtol=1e-6)
  assert events['images']['val/overlay/0'] == {4: (32, 96), 6: (32, 96)}


def test_write_failure_warns_once_and_never_raises(tmp_path):
  blocker = tmp_path / 'tensorboard'
  blocker.write_text('a file where the folder should be')
  writer = tensorboard.TensorBoardWriter(str(tmp_path), start_step=0)
  log = metrics_log.MetricsLog(str(tmp_path), tensorboard=writer)
  with pytest.warns(RuntimeWarning, match='TensorBoard') as caught:
    log.write(1, 'train', {'loss': 1.0})
    log.write(2, 'train', {'loss': 2.0})
    writer.overlays(2, lambda: 1 / 0, num_classes=1)
  assert len(caught) == 1 and not writer.enabled
  # metrics.jsonl, the record, is complete.
  assert [r['loss'] for r in metrics_log.read_metrics(str(tmp_path))] == [1, 2]


def test_failing_overlay_sample_warns_and_never_raises(tmp_path):
  writer = tensorboard.TensorBoardWriter(str(tmp_path), start_step=0)
  with pytest.warns(RuntimeWarning, match='ZeroDivisionError'):
    writer.overlays(2, lambda: 1 / 0, num_classes=1)
  assert not writer.enabled
  writer.scalars(3, 'train', {'loss': 1.0})  # Off now: nothing, no raise.
  writer.close()


def test_training_survives_an_unwritable_tensorboard_folder(tmp_path):
  (tmp_path / 'tensorboard').write_text('a file, not a folder')
  with pytest.warns(RuntimeWarning, match='TensorBoard'):
    train.train_and_evaluate(
        tiny_config(train__num_steps=2, train__tensorboard=True),
        str(tmp_path))
  splits = [r['split'] for r in metrics_log.read_metrics(str(tmp_path))]
  assert splits == ['compile', 'train', 'train', 'val']


def test_overlay_panel_known_pixels():
  image = np.zeros((2, 2, 1), np.float32)
  image[0, 0] = 4.0  # Scaled to 255; the rest to 0.
  truth = np.array([[1, 0], [0, 0]])
  pred = np.array([[0, 0], [0, 2]])
  panel = tensorboard.overlay_panel(image, truth, pred, num_classes=3)
  assert panel.shape == (2, 6, 3) and panel.dtype == np.uint8
  np.testing.assert_array_equal(panel[0, 0], [255, 255, 255])
  np.testing.assert_array_equal(panel[0, 2], [159, 255, 159])  # Class 1.
  np.testing.assert_array_equal(panel[1, 3], [0, 0, 0])  # Background.
  np.testing.assert_array_equal(panel[1, 5], [127, 32, 32])  # Class 2.
  # 3D: the middle axial slice (index 1 of depth 3).
  volume = np.zeros((3, 2, 2, 1), np.float32)
  labels = np.zeros((3, 2, 2), int)
  labels[1, 0, 0] = 1
  volume[1, 0, 0] = 1.0
  panel3d = tensorboard.overlay_panel(volume, labels, labels, num_classes=1)
  np.testing.assert_array_equal(panel3d, tensorboard.overlay_panel(
      volume[1], labels[1], labels[1], num_classes=1))


def test_config_key_checked_and_result_neutral():
  # A ConfigDict refuses a str for a bool itself; a dict (config.json) not.
  config = tiny_config().to_dict()
  config['train']['tensorboard'] = 'yes'
  problems = config_checks.config_problems(config)
  assert [p for p in problems if 'train.tensorboard' in p], problems
  # Turning it off (or on) on resume is no change of recipe.
  on = tiny_config().to_dict()
  off = tiny_config(train__tensorboard=False).to_dict()
  assert workdir_lib.recipe_differences(on, off) == []
  assert workdir_lib.recipe_differences(
      on, tiny_config(train__log_every_steps=7, seed=5).to_dict())


def test_tensorboard_itself_reads_the_same(trained):
  """TensorBoard's own reader, where installed (it is not a dependency)."""
  accumulator = pytest.importorskip(
      'tensorboard.backend.event_processing.event_accumulator')
  workdir, events = trained
  reader = accumulator.EventAccumulator(
      os.path.join(workdir, tensorboard.SUBDIR), size_guidance={
          accumulator.SCALARS: 0, accumulator.IMAGES: 0})
  reader.Reload()
  assert sorted(reader.Tags()['scalars']) == sorted(events['scalars'])
  for tag, by_step in events['scalars'].items():
    assert {e.step: e.value for e in reader.Scalars(tag)} == by_step
  for tag, by_step in events['images'].items():
    assert {e.step: (e.height, e.width)
            for e in reader.Images(tag)} == by_step
