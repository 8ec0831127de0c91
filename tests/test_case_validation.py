"""Recipes for small volume sets: fixed-length epochs and whole-case validation."""

import json
import os
import types

import numpy as np
import pytest

from medseg_jax import case_validation
from medseg_jax import checkpoint_files
from medseg_jax import config_checks
from medseg_jax import config_lib
from medseg_jax import predictor as predictor_lib
from medseg_jax import train
from medseg_jax.data import pipeline
from tests import conftest


def _schedule_config(**train_values):
  config = config_lib.default_config()
  config.train.batch_size = 4
  config.train.num_epochs = 3
  config.train.eval_every_epochs = 1.0
  config.optim.warmup_epochs = 0.2
  for key, value in train_values.items():
    config.train[key] = value
  return config


def test_schedule_counts_cases_by_default_and_fixed_steps_when_set():
  # 10 training cases at batch 4: 10 // 4 = 2 steps per epoch.
  by_cases = train.training_schedule(_schedule_config(), 10)
  assert (by_cases['steps_per_epoch'], by_cases['total_steps'],
          by_cases['warmup_steps'], by_cases['eval_every']) == (2, 6, 0, 2)
  # nnU-Net-style: 25 steps per epoch whatever the number of cases.
  fixed = train.training_schedule(_schedule_config(steps_per_epoch=25), 10)
  assert (fixed['steps_per_epoch'], fixed['total_steps'],
          fixed['warmup_steps'], fixed['eval_every'],
          fixed['checkpoint_every']) == (25, 75, 5, 25, 25)
  # num_steps still wins over epochs.
  steps = train.training_schedule(
      _schedule_config(steps_per_epoch=25, num_steps=40), 10)
  assert (steps['total_steps'], steps['eval_every']) == (40, 25)


def test_new_train_keys_are_validated():
  config = _schedule_config(steps_per_epoch=-1, case_val_every=-2)
  problems = config_checks.config_problems(config)
  assert any(p.startswith('config.train.steps_per_epoch=-1') for p in problems)
  assert any(p.startswith('config.train.case_val_every=-2') for p in problems)


def test_case_validation_is_due_every_kth_evaluation_and_at_the_end():
  # Evaluations at 5, 10, 15, 20 and the last step 23; every 2nd: 10, 20.
  due = [s for s in (5, 10, 15, 20, 23)
         if case_validation.is_due(s, 5, 23, 2)]
  assert due == [10, 20, 23]
  assert not any(case_validation.is_due(s, 5, 23, 0) for s in (5, 23))


def test_score_cases_reduces_whole_case_dice_like_the_loop():
  """Case A predicted exactly (Dice 1); case B: 2 of 4 voxels right and 2
  false positives (Dice 2*2 / (4 + 4) = 0.5); mean 0.75."""
  mask_a = np.zeros((2, 4, 4), np.int32)
  mask_a[0, :2, :2] = 1
  mask_b = np.zeros((2, 4, 4), np.int32)
  mask_b[1, 0, :4] = 1
  pred_b = np.zeros((2, 4, 4), np.int32)
  pred_b[1, 0, :2] = 1
  pred_b[1, 3, :2] = 1
  records = [{'image': 0, 'mask': mask_a}, {'image': 1, 'mask': mask_b}]
  predictions = {0: mask_a, 1: pred_b}
  fake = types.SimpleNamespace(predict_prepared=lambda image, uncertainty: (
      predictor_lib.Prediction(predictions[image], None)))
  data = pipeline.DataSplits(source=records,
                             indices={'val': np.array([0, 1])})
  result = case_validation.score_cases(fake, data, 'val', num_classes=2)
  assert result['num_cases'] == 2
  assert result['dice'] == pytest.approx(0.75)


def test_empty_validation_split_is_refused_before_training():
  config = conftest.tiny_config(train__case_val_every=1)
  data = pipeline.DataSplits(source=[], indices={'val': np.array([], int)})
  with pytest.raises(ValueError, match='config.train.case_val_every=1 needs'):
    case_validation.CaseValidator(config, None, data, 1, 1)


def test_tiny_3d_run_logs_val_cases_and_chooses_the_best_by_them(
    tmp_path):
  """Anisotropic strides, patch depth 6 (a multiple of the depth product 2,
  not of 4): whole volumes by sliding windows at every evaluation."""
  workdir = tmp_path / 'run'
  run = dict(conftest.RUN_3D, model__dropout_rate=0.0,
             data__patch_size=(6, 16, 16), model__features=(4, 8, 8),
             model__strides=((1, 2, 2), (2, 2, 2)),
             train__steps_per_epoch=1, train__eval_every_epochs=1.0,
             train__case_val_every=1, train__num_steps=3)
  conftest.run_main(workdir, **run)
  with open(workdir / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  cases = {r['step']: r for r in records if r['split'] == 'val_cases'}
  assert sorted(cases) == [1, 2, 3]  # One step per epoch, every evaluation.
  assert {r['step'] for r in records if r['split'] == 'val'} == {1, 2, 3}
  assert all(r['num_cases'] == 1 for r in cases.values())
  steps = sorted(cases)
  dices = [cases[s]['dice'] for s in steps]
  best_dir = workdir / 'checkpoints' / 'best'
  best_step = max(int(d) for d in os.listdir(best_dir) if d.isdigit())
  assert best_step == steps[int(np.argmax(dices))]
  meta = checkpoint_files.read_meta(str(best_dir / str(best_step)))
  assert meta['dice'] == pytest.approx(cases[best_step]['dice'])
