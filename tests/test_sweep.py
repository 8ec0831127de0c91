"""--mode=sweep: a tiny 2x2 sweep end to end, killed and resumed; bad input."""

import csv
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from medseg_jax import metrics_log
from medseg_jax import report
from medseg_jax import sweep
from medseg_jax import sweep_report
from medseg_jax import workdir as workdir_lib
from tests import conftest

SWEEP_FILE = '''
from configs import unetpp

def get_config(arg=None):
  return unetpp.get_config('cpu')

def get_sweep(arg=None):
  return {sweep}
'''
TINY_SWEEP = ("[{'model.name': m, 'data.train_fraction': f} "
              "for m in ('unet', 'unetpp') for f in (0.5, 1.0)]")
NAMES = ['unet-train_fraction0.5', 'unet-train_fraction1',
         'unetpp-train_fraction0.5', 'unetpp-train_fraction1']


def _sweep_file(tmp_path, runs=TINY_SWEEP):
  path = tmp_path / 'sweep_tiny.py'
  path.write_text(SWEEP_FILE.format(sweep=runs))
  return str(path)


def _sweep_command(sweep_file, workdir, *extra):
  # Validation and checkpoints every epoch (2 or 4 steps of 6): a best
  # checkpoint before
  # the last step, and a latest one to resume from.
  return conftest.main_command(workdir, config_arg=sweep_file,
                               extra=('--mode=sweep', *extra),
                               train__eval_every_epochs=1.0)


def _run(command, check=True):
  proc = subprocess.run(command, cwd=conftest.REPO,
                        env=conftest.subprocess_env(), capture_output=True,
                        text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f'sweep failed ({proc.returncode}):\n'
                         f'{proc.stdout[-3000:]}{proc.stderr[-3000:]}')
  return proc


def _files(run_dir):
  """{relative path: bytes} of a run's checkpoints and metrics.jsonl."""
  found = {}
  for root, _, names in os.walk(run_dir / 'checkpoints'):
    for name in names:
      path = os.path.join(root, name)
      found[os.path.relpath(path, run_dir)] = open(path, 'rb').read()
  found['metrics.jsonl'] = (run_dir / 'metrics.jsonl').read_bytes()
  return found


def _has_checkpoint(run_dir):
  latest = run_dir / 'checkpoints' / 'latest'
  return latest.is_dir() and any(p.name.isdigit() for p in latest.iterdir())


def _kill_during_third_run(command, workdir):
  """Starts the sweep; kills it (all its processes) once the third run has
  a checkpoint. Returns whether the third run had finished training then."""
  proc = subprocess.Popen(command, cwd=conftest.REPO,
                          env=conftest.subprocess_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
  third = workdir / NAMES[2]
  deadline = time.time() + 400
  try:
    while not _has_checkpoint(third):
      assert proc.poll() is None, 'the sweep ended before its third run'
      assert time.time() < deadline, 'the third run never saved a checkpoint'
      time.sleep(0.02)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  return (third / sweep_report.TRAINED_MARKER).exists()


def test_tiny_sweep_killed_in_third_run_resumes_and_reports(tmp_path):
  workdir = tmp_path / 'sweep'
  command = _sweep_command(_sweep_file(tmp_path), workdir)
  third_was_trained = _kill_during_third_run(command, workdir)
  assert not third_was_trained  # Killed while it trained.
  for name in NAMES[:2]:
    assert sweep_report.is_finished(str(workdir / name))
  assert not sweep_report.is_finished(str(workdir / NAMES[2]))
  before = {name: _files(workdir / name) for name in NAMES[:2]}

  out = _run([*command, '--sweep_parallel=2']).stdout  # The last two at once.
  assert f'{NAMES[0]}: done' in out and f'{NAMES[2]}: finished' in out
  for name in NAMES[:2]:  # Not retrained, not re-evaluated.
    assert _files(workdir / name) == before[name]
  for name in NAMES:
    assert sweep_report.is_finished(str(workdir / name))
  resumes = [r for r in metrics_log.read_metrics(str(workdir / NAMES[2]),
                                                 keep_resumes=True)
             if r['split'] == metrics_log.RESUME_SPLIT]
  assert resumes and resumes[0]['step'] >= 2  # Resumed, not restarted.
  config = workdir_lib.load_config(str(workdir / NAMES[2]))  # --config.KEY
  assert (config.train.num_steps, config.model.name,  # and the run's keys.
          config.data.train_fraction) == (6, 'unetpp', 0.5)
  # Same patient split for all: the same test cases in every run.
  case_ids = {name: sorted(r['case_id'] for r in report.read_case_csv(
      str(workdir / name / 'eval' / 'test' / 'cases.csv'))) for name in NAMES}
  assert len({tuple(v) for v in case_ids.values()}) == 1

  with open(workdir / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['run'] for r in rows] == NAMES
  assert list(rows[0]) == ['model.name', 'data.train_fraction',
                           *sweep_report.RESULT_COLUMNS]
  assert [r['model.name'] for r in rows] == ['unet', 'unet', 'unetpp', 'unetpp']
  summary = sweep_report.read_test_summary(str(workdir / NAMES[3]))
  dice = summary['classes'][0]['metrics']['dice']
  assert float(rows[3]['test_dice']) == pytest.approx(dice['mean'])
  assert float(rows[3]['test_dice_ci_low']) == pytest.approx(dice['ci_low'])
  for row in rows:
    assert row['status'] == 'finished'
    for column in ('test_iou', 'val_dice_best', 'train_time_s',
                   'images_per_s'):
      assert np.isfinite(float(row[column])), column
    assert 0 < float(row['train_time_s']) < 300
  assert int(rows[0]['params']) != int(rows[2]['params']) > 0

  table = (workdir / 'results.md').read_text()
  assert table.count('\n| unet | ') == 2 and table.count('\n| unetpp | ') == 2
  assert '| unetpp | 50% | ' in table  # Fractions as seed 002 writes them.
  for png in ('dice_vs_train_fraction.png', 'case_dice.png'):
    assert (workdir / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  comparison = (workdir / 'comparison.md').read_text()
  verdicts = [l for l in comparison.splitlines() if l.startswith('- ')]
  assert len(verdicts) == 4  # 2 model pairs + 2 fraction pairs.
  assert any(v.startswith('- unetpp vs unet at data.train_fraction=1.0: ')
             and 'Dice points [' in v for v in verdicts)
  assert any(v.startswith('- data.train_fraction=1.0 vs '
                          'data.train_fraction=0.5 at model.name=unet: ')
             for v in verdicts)


def _base():
  return conftest.tiny_config()


def test_run_names_and_duplicates(tmp_path):
  assert sweep.run_name({'model.name': 'unet', 'data.train_fraction': 0.1}) == (
      'unet-train_fraction0.1')
  assert sweep.run_name({'data.fold': 3, 'model.features': (8, 16)}) == (
      'fold3-features8x16')
  assert sweep.run_name({}) == 'base'
  with pytest.raises(ValueError, match=r"runs 0 and 2 .*'fold1'"):
    sweep.plan_runs(_base(), [{'data.fold': 1}, {'data.fold': 2},
                              {'data.fold': 1}], str(tmp_path))


@pytest.mark.parametrize('bad, message', [
    ({'model.nmae': 'unet'}, r"run 1, key 'model.nmae'.*no field 'nmae'"),
    ({'train.num_steps': 2.5}, r"run 1, key 'train.num_steps': 2.5 \(float\)"),
    ({'train.batch_size': 0}, r'(?s)run 1 .*config.train.batch_size=0'),
])
def test_bad_keys_and_values_are_refused_naming_run_and_key(tmp_path, bad,
                                                            message):
  with pytest.raises(ValueError, match=message):
    sweep.plan_runs(_base(), [{'seed': 1}, bad], str(tmp_path))


def test_bad_sweep_refused_before_any_run_starts(tmp_path):
  workdir = tmp_path / 'sweep'
  sweep_file = _sweep_file(tmp_path, "[{'seed': 1}, {'seed': 'two'}]")
  proc = _run(_sweep_command(sweep_file, workdir), check=False)
  assert proc.returncode == 1
  assert "Sweep run 1, key 'seed'" in proc.stderr
  assert not (workdir / 'seed1').exists()


def test_changed_recipe_of_an_existing_run_refused(tmp_path):
  runs = sweep.plan_runs(_base(), [{'seed': 1}, {'seed': 2}], str(tmp_path))
  for run in runs:
    os.makedirs(run.workdir)
    workdir_lib.write_config(run.workdir, run.config)
  assert sweep.plan_runs(_base(), [{'seed': 1}, {'seed': 2}], str(tmp_path))
  base = _base()
  base.optim.lr = 0.5
  with pytest.raises(ValueError, match=r'(?s)Sweep run 0 \(seed1\).*optim.lr'):
    sweep.plan_runs(base, [{'seed': 1}, {'seed': 2}], str(tmp_path))


def test_sweep_index_and_slurm_script(tmp_path):
  runs = sweep.plan_runs(_base(), [{'seed': s} for s in range(3)],
                         str(tmp_path))
  argv = ['main.py', '--mode=sweep', '--config=configs/sweeps/x.py:cpu',
          '--workdir=runs/s', '--sweep_emit=slurm', '--config.seed=4']
  script = sweep.slurm_script(runs, argv, str(tmp_path))
  assert '#SBATCH --array=0-2' in script and '--sweep_emit' not in script
  assert script.rstrip().endswith('--config.seed=4 '
                                  '--sweep_index=$SLURM_ARRAY_TASK_ID')
  assert '#   2: seed2' in script


def test_parallel_slots_are_pinned_round_robin(monkeypatch):
  monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
  monkeypatch.delenv('XLA_PYTHON_CLIENT_MEM_FRACTION', raising=False)
  assert sweep.slot_env(1, 2, gpus=0) == {}  # CPU: nothing pinned.
  assert [sweep.slot_env(s, 2, 2) for s in range(2)] == [
      {'CUDA_VISIBLE_DEVICES': '0'}, {'CUDA_VISIBLE_DEVICES': '1'}]
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '4,6')
  assert sweep.slot_env(2, 4, 2) == {'CUDA_VISIBLE_DEVICES': '4',
                                     'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.45'}
  assert sweep.slot_env(3, 4, 2)['CUDA_VISIBLE_DEVICES'] == '6'


def test_pixel_accuracy_from_a_case_row():
  truth = np.zeros((10, 10), np.int32)
  truth[:4, :5] = 1  # 20 pixels.
  pred = np.zeros((10, 10), np.int32)
  pred[1:6, :5] = 1  # 25 pixels: TP 15, FP 10, FN 5, TN 70.
  row = report.case_metrics(pred, truth, 1)[0]
  assert sweep_report.pixel_accuracy(row) == pytest.approx(0.85, abs=1e-5)
  assert np.isnan(sweep_report.pixel_accuracy(report.case_metrics(
      truth, truth, 1)[0]))  # No false positive: TN unknown.


def test_comparable_pairs_count_a_model_with_its_widths_as_one_thing():
  runs = [sweep.Run(i, str(i), o, None, '') for i, o in enumerate([
      {'model.name': 'unet', 'model.features': (1,), 'data.train_fraction': 1},
      {'model.name': 'unetpp', 'model.features': (2,),
       'data.train_fraction': 1},
      {'model.name': 'unetpp', 'model.features': (2,),
       'data.train_fraction': 2},
  ])]
  pairs = [(a.index, b.index, k) for a, b, k in
           sweep_report.comparable_pairs(runs)]
  assert pairs == [(0, 1, 'model.name'), (1, 2, 'data.train_fraction')]



def _fake_finished_run(tmp_path, index, overrides, dice_by_case):
  """A sub-workdir as a finished run leaves it: marker, best checkpoint at
  step 4, eval/test/summary.json of step 4 and cases.csv."""
  run = sweep.Run(index, sweep.run_name(overrides), overrides, None,
                  str(tmp_path / sweep.run_name(overrides)))
  test_dir = tmp_path / run.name / 'eval' / 'test'
  test_dir.mkdir(parents=True)
  (tmp_path / run.name / 'checkpoints' / 'best' / '4').mkdir(parents=True)
  (tmp_path / run.name / sweep_report.TRAINED_MARKER).write_text('')
  (test_dir / 'summary.json').write_text('{"step": 4}')
  rows = [{**dict.fromkeys(report.METRICS, 0.0), 'case_id': c,
           'class_index': 1, 'class_name': 'foreground', 'dice': d}
          for c, d in dice_by_case.items()]
  report.write_case_csv(rows, str(test_dir / 'cases.csv'))
  return run


def test_comparison_by_hand_and_different_cases_refused(tmp_path):
  unet = _fake_finished_run(tmp_path, 0, {'model.name': 'unet'},
                            {'a': 0.5, 'b': 0.6, 'c': 0.7, 'd': 0.8})
  unetpp = _fake_finished_run(tmp_path, 1, {'model.name': 'unetpp'},
                              {'a': 0.6, 'b': 0.6, 'c': 0.9, 'd': 0.7})
  results, refused = sweep_report.comparisons([unet, unetpp])
  assert not refused and len(results) == 1
  # Differences 0.1, 0, 0.2, -0.1: mean +5.0 points; one comparison, so the
  # Holm p is the Wilcoxon p.
  assert results[0]['p_holm'] == results[0]['p_value'] > 0.05
  assert sweep_report.verdict(results[0]).startswith(
      'unetpp vs unet: +5.0 Dice points [')
  assert sweep_report.verdict(results[0]).count('not significant') == 1

  split0 = _fake_finished_run(tmp_path, 2, {'data.split_seed': 0},
                              {'a': 0.5, 'b': 0.6})
  split1 = _fake_finished_run(tmp_path, 3, {'data.split_seed': 1},
                              {'a': 0.5, 'x': 0.6})
  results, refused = sweep_report.comparisons([split0, split1])
  assert not results and len(refused) == 1
  text = sweep_report.comparison_markdown(results, refused)
  assert '## Not compared' in text and 'different test cases' in text
  assert 'data.split_seed=1 vs data.split_seed=0: not compared.' in text


def test_sweep_emit_and_index_through_main(tmp_path):
  workdir = tmp_path / 'sweep'
  sweep_file = _sweep_file(tmp_path)
  _run(_sweep_command(sweep_file, workdir, '--sweep_emit=slurm'))
  script = (workdir / 'sweep.slurm').read_text()
  assert '#SBATCH --array=0-3' in script
  assert '--config.train.num_steps=6' in script  # The base overrides kept.
  assert not any((workdir / name).exists() for name in NAMES)  # Nothing ran.
  proc = _run(_sweep_command(sweep_file, workdir, '--sweep_index=4'),
              check=False)
  assert proc.returncode == 1 and '--sweep_index=4' in proc.stderr


def test_verdict_says_when_rank_test_and_mean_interval_disagree():
  result = {'label': 'unetpp vs unet', 'mean_diff': -0.0001, 'ci_low': -0.016,
            'ci_high': 0.01, 'significant': True, 'p_holm': 0.0005, 'n': 120,
            'wins': 81, 'losses': 36}
  text = sweep_report.verdict(result)
  assert text.startswith('unetpp vs unet: -0.0 Dice points [-1.6, +1.0], '
                         'significant by rank (Wilcoxon), though the CI')
  result.update(ci_low=0.002, ci_high=0.02, mean_diff=0.01)
  assert 'by rank' not in sweep_report.verdict(result)
