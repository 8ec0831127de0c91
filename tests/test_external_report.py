"""External validation: comparison.md of the internal test split vs other data."""

import json
import os
import shutil

import numpy as np
import pytest
from scipy import stats

from medseg_jax import clinical
from medseg_jax import evaluate
from medseg_jax import external_report
from medseg_jax import report
from medseg_jax import subgroups
from medseg_jax import workdir as workdir_lib


def _rows(dice, prefix):
  return [{'case_id': f'{prefix}{i}', 'class_index': 1,
           'class_name': 'foreground', 'dice': d, 'hd95': h}
          for i, (d, h) in enumerate(dice)]


INTERNAL = _rows([(0.8, 2.0), (0.9, 1.0), (0.85, 3.0), (0.75, np.inf)], 'i')
# Every external Dice is 0.2 lower than an internal one: the difference is
# -0.2; all external values below all internal ones: U = 0, and the exact
# two-sided Mann-Whitney p for 4 vs 4 is 2 / C(8, 4) = 2 / 70.
EXTERNAL = _rows([(0.6, 4.0), (0.7, 5.0), (0.65, 6.0), (0.55, 7.0)], 'e')


def test_differences_and_p_values_of_two_tables_with_a_known_shift():
  rows = external_report.compare_rows(INTERNAL, EXTERNAL, ('dice', 'hd95'))
  dice, hd95 = rows
  assert (dice['internal_n'], dice['external_n']) == (4, 4)
  assert dice['difference'] == pytest.approx(-0.2)
  assert dice['ci_low'] <= -0.2 <= dice['ci_high'] < 0
  assert dice['p_value'] == pytest.approx(2 / 70)
  # inf HD95 is left out (as in the summaries): 3 internal values.
  assert hd95['internal_n'] == 3
  assert hd95['difference'] == pytest.approx(5.5 - 2.0)
  assert hd95['p_value'] == pytest.approx(stats.mannwhitneyu(
      [2.0, 1.0, 3.0], [4.0, 5.0, 6.0, 7.0]).pvalue)


def test_comparison_markdown_names_both_sets_and_their_calibration():
  rows = external_report.compare_rows(INTERNAL, EXTERNAL, ('dice',))
  text = external_report.comparison_markdown(
      rows, {'num_cases': 4, 'step': 6, 'calibration': {'ece': 0.0125}},
      {'num_cases': 4, 'step': 6, 'calibration': {'ece': 0.25}},
      'eval/test', 'eval/external-x/test')
  assert '| dice | 0.8250 (4) | 0.6250 (4) | -0.2000 [' in text
  assert 'internal 0.0125, external 0.2500' in text


def test_internal_root_of_an_external_report_folder():
  assert clinical.internal_root('w', os.path.join(
      'w', 'eval', 'external-ab12', 'ensemble-cd', 'best_ema')) == (
          os.path.join('w', 'eval', 'ensemble-cd', 'best_ema'))
  assert clinical.internal_root('w', os.path.join('w', 'eval')) is None


def test_without_the_internal_test_evaluation_it_names_the_command(tmp_path):
  line = external_report.write_comparison(
      str(tmp_path / 'eval' / 'test'), str(tmp_path),
      'python -m medseg_jax.main --mode=evaluate --workdir=w --split=test')
  assert 'run `python -m medseg_jax.main --mode=evaluate --workdir=w' in line
  text = (tmp_path / 'comparison.md').read_text()
  assert '--workdir=w --split=test' in text
  assert not (tmp_path / 'comparison.png').exists()


@pytest.fixture(scope='module')
def run_copy(run2d, tmp_path_factory):
  """A copy of the tiny 2D run without its reports."""
  copy = tmp_path_factory.mktemp('external') / 'run'
  shutil.copytree(run2d, copy, ignore=shutil.ignore_patterns('eval'))
  return copy


def _external_config(workdir):
  config = workdir_lib.load_config(str(workdir))
  config.data.synthetic.num_patients = 20  # Other data: 6 test images.
  config.data.split_seed = 7
  return config


def test_external_evaluation_writes_the_comparison_with_the_internal_test(
    run_copy, capsys):
  workdir = str(run_copy)
  evaluate.evaluate_run(workdir_lib.load_config(workdir), workdir)
  evaluate.evaluate_run(_external_config(run_copy), workdir)
  assert 'Comparison with the internal test split' in capsys.readouterr().out
  (external,) = (run_copy / 'eval').glob('external-*')
  text = (external / 'test' / 'comparison.md').read_text()
  assert (external / 'test' / 'comparison.png').stat().st_size > 0
  internal = report.read_case_csv(str(run_copy / 'eval' / 'test' /
                                      'cases.csv'))
  other = report.read_case_csv(str(external / 'test' / 'cases.csv'))
  (dice,) = external_report.compare_rows(internal, other, ('dice',))
  assert dice['difference'] == pytest.approx(
      np.mean([r['dice'] for r in other]) - np.mean(
          [r['dice'] for r in internal]))
  assert (dice['internal_n'], dice['external_n']) == (4, 6)
  row = (f'| dice | {dice["internal_mean"]:.4f} (4) | '
         f'{dice["external_mean"]:.4f} (6) | {dice["difference"]:.4f} ')
  assert row in text
  assert subgroups.format_p(dice['p_value']) in text
  with open(external / 'test' / 'summary.json') as f:
    ece = json.load(f)['calibration']['ece']
  assert f'external {ece:.4f}' in text
