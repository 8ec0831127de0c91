"""scripts/benchmark.py: suites, the worker protocol, figures and tables.

No timing is asserted: only shapes, arithmetic and the orchestration.
"""

import io
import json
import os
import sys

import numpy as np
import pytest

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'scripts')
sys.path.insert(0, SCRIPTS)

import _bench_suites as suites  # pylint: disable=wrong-import-position
import _bench_table as table  # pylint: disable=wrong-import-position
import _bench_worker as worker  # pylint: disable=wrong-import-position
import benchmark  # pylint: disable=wrong-import-position

HD95_CASE = dict(name='hd95_compact', kind='hd95', pair='compact',
                 shape=[24, 24, 12], repeats=2, units_per_block=2,
                 items_per_unit=1, item='calls', setting='tiny',
                 subjects=[{'framework': 'jax', 'label': 'ours'},
                           {'framework': 'torch', 'variant': 'eager',
                            'label': 'MONAI'}])


@pytest.mark.parametrize('kind, tflops', [
    ('NVIDIA H100 80GB HBM3', 989.4), ('NVIDIA H100 PCIe', 756.0),
    ('NVIDIA H200', 989.4), ('NVIDIA A100-SXM4-80GB', 312.0),
    ('NVIDIA L4', 121.0), ('cpu', None)])
def test_peak_table_matches_specific_names_first(kind, tflops):
  assert table.peak_bf16_tflops(kind) == tflops


@pytest.mark.parametrize('suite', suites.SUITES)
def test_suite_shapes_fit_the_models_full_and_shrunk(suite):
  rows = suites.cases(suite)
  assert {r['name'] for r in rows} >= {
      'train_unet_256', 'train_unetpp_256', 'train_unet3d_patch',
      'pipeline_photo2d', 'pipeline_patches3d', 'sliding_window_3d',
      'hd95_compact', 'hd95_stray'}
  for case in rows + [suites.shrink(r) for r in rows]:
    if case['kind'] in ('train', 'sliding_window'):
      divisor = 2**(len(case['features']) - 1)
      shape = case['spatial'] if case['kind'] == 'train' else case['patch']
      # Every level's size is even and the bottom has > 1 element (MONAI's
      # instance/batch norm refuse a single one).
      assert all(s % divisor == 0 and s // divisor >= 2 for s in shape), case
      assert len(case['features']) == 5  # MONAI's BasicUNet depth.
    assert case['setting'] == (suites.describe(case) if 'dry run' not in
                               case['setting'] else
                               '[dry run] ' + suites.describe(case))
  train3d = next(r for r in rows if r['name'] == 'train_unet3d_patch')
  assert train3d['spatial'] == [64, 96, 96]  # configs/unet3d.py's patch.
  labels = [s['label'] for r in rows if r['kind'] == 'train'
            for s in r['subjects']]
  assert any('compile' in label for label in labels) == (suite == 'gpu')


def _row(kind, walls_a, walls_b, cpus=None, flops=None):
  cpus = cpus or ([1.0] * len(walls_a), [1.0] * len(walls_b))
  return {'kind': kind, 'items_per_unit': 4, 'subjects': [
      {'label': 'a', 'units': [list(u) for u in zip(walls_a, cpus[0])],
       'info': {'flops': flops}},
      {'label': 'b', 'units': [list(u) for u in zip(walls_b, cpus[1])],
       'info': {}},
      {'label': 'c', 'error': 'venv absent'}]}


def test_summarize_medians_ratio_and_mfu():
  row = table.summarize(_row('train', [2.0, 1.0, 9.0], [3.0, 4.0, 5.0],
                             flops=4e12), peak_tflops=8.0)
  a, b, c = row['subjects']
  assert a['unit_s'] == 2.0 and a['rate'] == 2.0  # 4 items / median 2 s.
  assert a['tflops'] == 2.0 and a['mfu'] == 0.25  # 4e12 / 2 s / 8e12.
  assert b['ratio'] == 2.0  # b's median 4 s over a's 2 s: a is 2x faster.
  assert 'ratio' not in c and c['error'] == 'venv absent'
  # Pipeline rows compare host CPU seconds per item, not wall time.
  row = table.summarize(_row('pipeline', [1.0, 1.0], [9.0, 9.0],
                             cpus=([0.8, 0.8], [0.2, 0.2])), None)
  assert row['subjects'][0]['cpu_s_per_item'] == pytest.approx(0.2)
  assert row['subjects'][1]['ratio'] == pytest.approx(4.0)
  assert 'mfu' not in row['subjects'][0]


def test_markdown_has_a_line_per_subject_and_says_what_failed():
  row = table.summarize(dict(_row('train', [2.0], [4.0]), name='r',
                             setting='s'), None)
  header = {'device': {'device_kind': 'cpu'}, 'suite': 'cpu', 'dry_run': False,
            'date': 'today', 'host_cores': 2, 'command': 'python x',
            'torch': 'no torch', 'peak_bf16_tflops': None}
  page = table.markdown(header, [row])
  lines = [l for l in page.splitlines() if l.startswith('| r |')]
  assert len(lines) == 3
  assert '(reference)' in lines[0] and '2.00×' in lines[1]
  assert 'not run: venv absent' in lines[2]
  assert 'nproc' in page and 'shared with other jobs' in page


def test_device_slug_and_missing_torch():
  assert benchmark.device_slug({'platform': 'gpu', 'device_kind':
                                'NVIDIA H100 80GB HBM3'}) == \
      'nvidia-h100-80gb-hbm3'
  assert benchmark.device_slug({'platform': 'cpu', 'device_kind': 'x'}) == 'cpu'
  path, note = benchmark.torch_python('none')
  assert path is None and 'JAX rows only' in note
  path, note = benchmark.torch_python(sys.executable + '-missing')
  assert path is None and 'cannot import' in note


def test_worker_protocol_answers_each_command_in_process():
  from medseg_jax import surface_metrics  # pylint: disable=import-outside-toplevel
  import bench_surface_metrics as bsm  # pylint: disable=import-outside-toplevel
  commands = [{'op': 'setup', 'case': HD95_CASE, 'subject': {}},
              {'op': 'run', 'units': 3}, {'op': 'finish'}]
  out = io.StringIO()
  worker.serve('jax', io.StringIO(''.join(json.dumps(c) + '\n'
                                          for c in commands)), out)
  setup, run, finish = [json.loads(l) for l in out.getvalue().splitlines()]
  pred, truth = bsm.compact_pair((24, 24, 12))
  expected = surface_metrics.hausdorff_distance(pred, truth,
                                                spacing=bsm.SPACING)
  assert setup['info']['value'] == pytest.approx(expected)
  assert np.array(run['units']).shape == (3, 2)
  assert finish['info']['peak_rss_mib'] > 0


def test_run_case_alternates_blocks_and_notes_an_absent_torch():
  result = benchmark.run_case(HD95_CASE, {'jax': sys.executable,
                                          'torch': None}, log=lambda m: None)
  ours, monai = result['subjects']
  # repeats x units_per_block timed units, all from one worker process.
  assert len(ours['units']) == 4 and 'error' not in ours
  assert ours['info']['peak_rss_mib'] > 0
  assert 'venv not given' in monai['error']


def test_bench_inference_volume_case_follows_the_manifest():
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(
      'bench_inference', os.path.join(SCRIPTS, 'bench_inference.py'))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  manifest = {
      'patch_size': [16, 32, 32], 'input': {'channels': 4},
      'output': {'classes': 4},
      'sliding_window': {'overlap': 0.5, 'batch_size': 4},
      'config': {'data': {'source': 'synthetic3d',
                          'synthetic3d': {'volume_size': [24, 48, 48]}},
                 'model': {'name': 'unet', 'features': [8, 16, 32, 64],
                           'norm': 'instance'}}}
  case = bench.volume_case(manifest, None, 2, 'W')
  assert case['volume'] == [24, 48, 48] and case['patch'] == [16, 32, 32]
  assert (case['sw_batch'], case['in_channels'], case['features']) == (
      4, 4, [8, 16, 32, 64])
  assert bench.volume_case(manifest, (8, 64, 64), 2, 'W')['volume'] == [8, 64, 64]
  with pytest.raises(ValueError, match='not trained on 3D patches'):
    bench.volume_case(dict(manifest, patch_size=None), None, 2, 'W')
  case['subjects'] = [
      {'label': 'JAX jit', 'units': [[2.0, 2.0]], 'info': {'windows': 27}},
      {'label': 'MONAI', 'units': [[3.0, 3.0]], 'info': {}},
      {'label': 'ONNX', 'error': 'no file'}]
  lines = bench.volume_markdown(table.summarize(case, None)).splitlines()
  assert '(reference)' in lines[4] and '| 27 |' in lines[4]
  assert '1.50×' in lines[5] and 'not run: no file' in lines[6]
