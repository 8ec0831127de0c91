"""Training options of issue 13 item 5 through the real loop: reduce-on-plateau,
early stopping, EMA checkpoints and gradient accumulation in one tiny run,
interrupted and resumed; a stopped run started again reports, not trains."""

import json
import os

import jax
import numpy as np
import pytest

from medseg_jax import checkpoint
from medseg_jax import config_checks
from medseg_jax import optim
from medseg_jax import train
from medseg_jax import workdir as workdir_lib
from tests import conftest

# lr 1e-12 and instance norm (no running statistics): the predictions, hence
# the validation Dice, are the same at every evaluation, so only the first
# one improves. 4 steps per epoch: evaluations at 4, 8, 12, ...
CONSTANT_DICE = dict(
    optim__lr=1e-12, optim__schedule='constant', optim__warmup_epochs=0.0,
    model__norm='instance', train__eval_every_epochs=1.0, train__num_steps=20,
    optim__plateau_patience=1, optim__plateau_factor=0.1,
    train__early_stopping_patience=2, train__ema_decay=0.5,
    train__grad_accum_steps=2)


def _records(workdir, split):
  return [r for r in workdir_lib.read_metrics(workdir) if r['split'] == split]


class _Killed(Exception):
  pass


@pytest.mark.slow
def test_plateau_and_early_stopping_resume_exactly_and_stop_once(
    tmp_path, tiny, monkeypatch):
  straight = str(tmp_path / 'straight')
  result = train.train_and_evaluate(tiny(**CONSTANT_DICE), straight)

  # Evaluations at 4 (the best), 8 and 12: the patience of 2 runs out at 12,
  # the first evaluation after it, and the run ends there, not at step 20.
  val = _records(straight, 'val')
  assert [r['step'] for r in val] == [4, 8, 12]
  assert len({r['dice'] for r in val}) == 1
  assert result['early_stop_step'] == 12
  [stop] = _records(straight, 'early_stop')
  assert (stop['step'], stop['best_step'], stop['patience']) == (12, 4, 2)
  assert checkpoint.Checkpointer(straight).latest_step() == 12
  assert checkpoint.load_state_arrays(straight, 'best')[1] == 4
  # EMA parameters: evaluated at each evaluation, their best kept apart.
  assert [r['step'] for r in _records(straight, 'val_ema')] == [4, 8, 12]
  assert checkpoint.load_state_arrays(straight, 'best_ema')[1] == 4
  # ... and evaluated from the command line, beside the raw parameters'.
  conftest.run_main_mode(straight, 'evaluate', '--checkpoint=best_ema')
  with open(os.path.join(straight, 'eval', 'best_ema', 'test',
                         'summary.json')) as f:
    assert json.load(f)['step'] == 4
  assert not os.path.exists(os.path.join(straight, 'eval', 'test'))

  # Plateau (patience 1): no improvement at 8 -> scale 0.1 from step 9 on.
  lrs = {r['step']: r['lr'] for r in _records(straight, 'train')}
  assert sorted(lrs) == list(range(1, 13))
  np.testing.assert_allclose([lrs[s] for s in (1, 8, 9, 12)],
                             [1e-12, 1e-12, 1e-13, 1e-13], rtol=1e-5)

  # The same run, interrupted right after its checkpoint at step 8 (after
  # the plateau cut the scale), then started again: same records, same state.
  resumed = str(tmp_path / 'resumed')
  save_latest = checkpoint.Checkpointer.save_latest

  def save_then_die(self, step, state, data_iterator):
    save_latest(self, step, state, data_iterator)
    if step == 8:
      raise _Killed()

  monkeypatch.setattr(checkpoint.Checkpointer, 'save_latest', save_then_die)
  with pytest.raises(_Killed):
    train.train_and_evaluate(tiny(**CONSTANT_DICE), resumed)
  monkeypatch.undo()
  assert checkpoint.Checkpointer(resumed).latest_step() == 8
  again = train.train_and_evaluate(tiny(**CONSTANT_DICE), resumed)
  assert again['early_stop_step'] == 12
  for split in ('train', 'val', 'val_ema', 'early_stop'):
    drop = ('time', 'images_per_s')
    want = [{k: v for k, v in r.items() if k not in drop}
            for r in _records(straight, split)]
    got = [{k: v for k, v in r.items() if k not in drop}
           for r in _records(resumed, split)]
    assert got == want, split
  for which in ('latest', 'best', 'best_ema'):
    a, _ = checkpoint.load_state_arrays(straight, which)
    b, _ = checkpoint.load_state_arrays(resumed, which)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)

  # Started a third time: it reports, trains nothing, writes no new record.
  lines = len(workdir_lib.read_metrics(resumed))
  third = train.train_and_evaluate(tiny(**CONSTANT_DICE), resumed)
  assert third['early_stop_step'] == 12
  assert third['dice'] == pytest.approx(val[-1]['dice'])
  assert len(workdir_lib.read_metrics(resumed)) == lines
  assert checkpoint.Checkpointer(resumed).latest_step() == 12


def test_ema_and_plateau_state_live_in_the_optimizer_state():
  cfg = _optim_cfg(plateau_patience=2)
  tx = optim.create_optimizer(cfg, lambda _: 0.1, ema_decay=0.9)
  state = tx.init({'w': np.ones((2, 2), np.float32)})
  assert optim.ema_params(state) is not None
  assert float(optim.plateau_scale(state)) == 1.0
  plain = optim.create_optimizer(_optim_cfg(), lambda _: 0.1).init(
      {'w': np.ones((2, 2), np.float32)})
  assert optim.ema_params(plain) is None and optim.plateau_scale(plain) is None


def _optim_cfg(**overrides):
  return conftest.set_fields(conftest.tiny_config().optim, overrides)


def test_bad_option_values_are_named_with_their_keys(tiny):
  assert config_checks.config_problems(tiny(
      optim__name='sgd', optim__schedule='poly', train__grad_accum_steps=2,
      optim__plateau_patience=3, train__early_stopping_patience=15,
      train__ema_decay=0.999)) == []
  problems = '\n'.join(config_checks.config_problems(tiny(
      optim__name='lion', optim__schedule='linear', optim__momentum=1.0,
      optim__plateau_factor=1.5, optim__plateau_patience=-1,
      train__early_stopping_patience=-1, train__ema_decay=1.0,
      train__grad_accum_steps=0)))
  for key in ("optim.name='lion'", "optim.schedule='linear'",
              'optim.momentum=1.0', 'optim.plateau_factor=1.5',
              'optim.plateau_patience=-1',
              'train.early_stopping_patience=-1', 'train.ema_decay=1.0',
              'train.grad_accum_steps=0'):
    assert 'config.' + key in problems, key
  assert 'config.train.batch_size=4 must be a multiple of config.train.' \
      'grad_accum_steps=3' in '\n'.join(config_checks.config_problems(
          tiny(train__grad_accum_steps=3)))
  assert 'config.optim.nesterov=True needs config.optim.momentum' in '\n'.join(
      config_checks.config_problems(tiny(optim__name='sgd',
                                         optim__momentum=0.0)))
