"""--mode=export: StableHLO and ONNX artefacts, manifest, parity, bad input."""

import copy
import json
import os
import shutil

import numpy as np
import pytest

from tests.conftest import run_main_mode, set_fields

pytest.importorskip('onnxruntime')
pytest.importorskip('onnx')
jax2onnx = pytest.importorskip('jax2onnx')

# pylint: disable=wrong-import-position
from medseg_jax import export
from medseg_jax import exported
from medseg_jax import inference
from medseg_jax import models
from medseg_jax import predictor as predictor_lib
from medseg_jax import workdir as workdir_lib
from medseg_jax.data import sources

FILES_INT8 = ['manifest.json', 'model.int8.onnx', 'model.onnx',
              'model.stablehlo', 'parity.json']


def _leftovers(workdir) -> list[str]:
  return [n for n in os.listdir(workdir) if n.startswith('.export-')]


def _config(workdir, **overrides):
  config = workdir_lib.load_config(str(workdir))
  return set_fields(config, overrides)


@pytest.fixture(scope='module')
def export2d(run2d):
  """The tiny 2D run exported by the CLI with int8 (two parity cases)."""
  run_main_mode(run2d, 'export', '--config.export.quantize=int8',
                '--config.export.parity_cases=2')
  return os.path.join(run2d, 'export')


def test_cli_export_writes_artefacts_manifest_and_parity(run2d, export2d):
  assert sorted(os.listdir(export2d)) == FILES_INT8
  assert not _leftovers(run2d)
  # An ordinary folder (umask), not mkdtemp's private 0700.
  plain = os.path.join(run2d, 'plain')
  os.mkdir(plain)
  assert os.stat(export2d).st_mode & 0o777 == os.stat(plain).st_mode & 0o777
  os.rmdir(plain)
  parity = json.load(open(os.path.join(export2d, 'parity.json')))
  assert parity['split'] == 'test' and parity['num_cases'] == 2
  for name in ('stablehlo', 'onnx'):
    assert parity[name]['max_abs_diff'] <= 1e-4, parity
    assert parity[name]['within_tolerance'] and parity[name][
        'dice_change'] == pytest.approx(0.0, abs=1e-6)
  # int8 is reported with its Dice change, not held to the tolerance.
  int8 = parity['onnx_int8']
  assert int8['dice_change'] == pytest.approx(
      int8['dice'] - parity['reference_dice'])
  manifest = json.load(open(os.path.join(export2d, 'manifest.json')))
  predictor = predictor_lib.Predictor.from_workdir(str(run2d))
  assert manifest['checkpoint_step'] == predictor.step
  assert manifest['config_hash'] == export.config_hash(predictor.config)
  assert manifest['class_names'] == list(
      sources.class_names(predictor.config.data))
  assert manifest['input']['channels'] == 3
  assert manifest['training_size'] == [32, 32] and manifest['patch_size'] == []
  assert manifest['normalisation']['kind'] == 'photo'
  assert manifest['output']['activation'] == 'sigmoid'
  # Whole-image model: batch and spatial sizes symbolic (multiples of 4).
  assert manifest['artefacts']['stablehlo']['input_shape'] == (
      'b, 4*s0, 4*s1, 3')
  import onnx  # pylint: disable=import-outside-toplevel
  dims = onnx.load(os.path.join(export2d, 'model.onnx')
                   ).graph.input[0].type.tensor_type.shape.dim
  assert [d.dim_param or d.dim_value for d in dims] == ['B', 32, 32, 3]


def test_loaded_artefacts_predict_raw_images_as_the_predictor(run2d,
                                                              export2d):
  predictor = predictor_lib.Predictor.from_workdir(str(run2d))
  image = np.random.default_rng(0).integers(0, 256, (40, 52, 3), np.uint8)
  reference = predictor.predict(image)
  for artefact in ('stablehlo', 'onnx'):
    got = export.load(export2d, artefact).predict(image)
    assert got.probabilities.shape == (40, 52, 1)
    np.testing.assert_allclose(got.probabilities, reference.probabilities,
                               atol=1e-4)
  # The StableHLO batch and spatial sizes are symbolic: 3 inputs of 64x48.
  x = np.random.default_rng(1).normal(size=(3, 64, 48, 3)).astype(np.float32)
  fn = exported.artefact_predict_fn(export2d, 'stablehlo')
  jitted = inference.make_predict_fn(predictor.model, predictor.variables)
  np.testing.assert_allclose(np.asarray(fn(x)), np.asarray(jitted(x)),
                             atol=1e-5)


def test_export_3d_sliding_window_parity(run3d):
  report = export.export_run(_config(run3d, export__parity_cases=1),
                             str(run3d))
  for name in ('stablehlo', 'onnx'):
    assert report[name]['max_abs_diff'] <= 1e-4, report
  out = os.path.join(run3d, 'export')
  manifest = json.load(open(os.path.join(out, 'manifest.json')))
  assert manifest['artefacts']['stablehlo']['input_shape'] == (
      'b, 8, 16, 16, 1')  # Patch models: the patch, batch symbolic.
  assert manifest['sliding_window']['overlap'] == 0.5
  assert manifest['normalisation']['intensity'] == 'zscore'
  # A raw volume that is no multiple of the patch: partial windows.
  volume = np.random.default_rng(2).normal(50, 10, (11, 21, 19, 1))
  reference = predictor_lib.Predictor.from_workdir(str(run3d)).predict(volume)
  got = export.load(out, 'onnx').predict(volume)
  assert got.probabilities.shape == (11, 21, 19, 4)
  np.testing.assert_allclose(got.probabilities, reference.probabilities,
                             atol=1e-4)


def test_export_without_checkpoint_is_one_error_line(run2d, tmp_path):
  workdir = tmp_path / 'untrained'
  workdir.mkdir()
  shutil.copy(os.path.join(run2d, 'config.json'), workdir)
  proc = run_main_mode(workdir, 'export', check=False)
  assert proc.returncode == 1
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'Traceback' not in proc.stderr, proc.stderr
  assert 'checkpoint' in errors[0]
  assert sorted(os.listdir(workdir)) == ['config.json']


def test_unsupported_quantisation_is_refused_before_any_work(run2d):
  before = sorted(os.listdir(run2d))
  with pytest.raises(ValueError, match=r"config.export.quantize='fp16'.*int8"):
    export.export_run(_config(run2d, export__quantize='fp16'), str(run2d))
  assert sorted(os.listdir(run2d)) == before


def test_converter_failure_leaves_the_old_export(run2d, tmp_path,
                                                 monkeypatch):
  workdir = tmp_path / 'run'
  shutil.copytree(run2d, workdir, ignore=shutil.ignore_patterns('export'))
  (workdir / 'export').mkdir()
  (workdir / 'export' / 'model.onnx').write_text('an earlier export')

  def cannot(*args, **kwargs):
    raise NotImplementedError('No ONNX handler for primitive "fft"\ndetails')

  monkeypatch.setattr(jax2onnx, 'to_onnx', cannot)
  with pytest.raises(ValueError, match='cannot express model') as error:
    export.export_run(_config(workdir), str(workdir))
  assert '\n' not in str(error.value)
  assert os.listdir(workdir / 'export') == ['model.onnx']
  assert (workdir / 'export' / 'model.onnx').read_text() == 'an earlier export'
  assert not _leftovers(workdir)


def test_export_shapes_follow_patch_and_divisor(tiny):
  config = tiny()
  # Only the model's input divisor is read: a stand-in with one of 8.
  stand_in = type('M', (), {'input_divisor': 8})()
  assert export.export_shapes(config, stand_in) == (
      ('B', 32, 32, 3), 'b, 8*s0, 8*s1, 3')
  config.data.patch_size = (16, 16)
  assert export.export_shapes(config, stand_in)[1] == 'b, 16, 16, 3'


def test_bfloat16_runs_export_float32_graphs(run2d, tmp_path):
  """onnxruntime has no bfloat16 Conv: a bf16 run exports in float32."""
  run = predictor_lib.Predictor.from_workdir(str(run2d))
  config = copy.deepcopy(run.config)
  config.model.dtype = 'bfloat16'
  bf16 = predictor_lib.Predictor(
      config, models.create_model(config.model, config.data.num_classes),
      run.variables, run.step)
  fp32 = export.float32_predictor(bf16)
  assert fp32.config.model.dtype == 'float32'
  assert bf16.config.model.dtype == 'bfloat16'  # The run's config is kept.
  path = tmp_path / 'model.onnx'
  blob, shape = export.export_onnx(
      export.probability_fn(fp32.model, fp32.variables), config, fp32.model)
  assert shape == ('B', 32, 32, 3)
  path.write_bytes(blob)
  session = exported.onnx_session(str(path))  # Refuses a bf16 graph.
  x = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)
  expected = inference.make_predict_fn(run.model, run.variables)(x)
  np.testing.assert_allclose(session.run(None, {'image': x})[0],
                             np.asarray(expected), atol=1e-5)


def test_onnx_of_fixed_size_names_the_size_it_takes(export2d):
  fn = exported.artefact_predict_fn(export2d, 'onnx')
  assert fn(np.zeros((2, 32, 32, 3))).shape == (2, 32, 32, 1)
  with pytest.raises(ValueError, match=r'takes inputs \[B, 32, 32, 3\].*'
                     'StableHLO'):
    fn(np.zeros((1, 64, 48, 3)))


def test_bench_inference_measures_and_tabulates(run2d, export2d):
  """scripts/bench_inference.py, in-process on ONNX fp32 (few iterations)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'scripts',
                      'bench_inference.py')
  spec = importlib.util.spec_from_file_location('bench_inference', path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  del export2d  # Needed for its artefacts.
  row = bench.measure('onnx', str(run2d), batch=2, iters=5)
  assert row['input_shape'] == [32, 32, 3]
  assert 0 < row['p50_ms'] <= row['p95_ms'] and row['throughput'] > 0
  table = bench.markdown([row], str(run2d)).splitlines()
  assert table[-1].startswith('| ONNX Runtime fp32 | CPU') and len(table) == 5


def test_transunet_exports_with_a_batch_1_onnx_graph(tmp_path):
  """TransUNet reshapes with the batch size: its ONNX graph takes batch 1,
  and the loader feeds a batch one input at a time."""
  import jax  # pylint: disable=import-outside-toplevel
  from configs import transunet  # pylint: disable=import-outside-toplevel
  config = set_fields(transunet.get_config('cpu'), {
      'data.image_size': 32, 'model.features': (4, 8, 16, 32),
      'model.hidden_size': 16, 'model.num_layers': 1, 'model.num_heads': 2,
      'model.mlp_dim': 32})
  model = models.create_model(config.model, config.data.num_classes)
  variables = jax.jit(lambda rng: model.init(  # Jitted: 1 s, not 13 s.
      rng, np.zeros((1, 32, 32, 3)), train=False))(jax.random.PRNGKey(0))
  fn = export.probability_fn(model, variables)
  blob, shape = export.export_onnx(fn, config, model)
  assert shape == (1, 32, 32, 3)
  (tmp_path / 'model.onnx').write_bytes(blob)
  predict = exported.artefact_predict_fn(str(tmp_path), 'onnx')
  x = np.random.default_rng(4).normal(size=(3, 32, 32, 3)).astype(np.float32)
  np.testing.assert_allclose(predict(x), np.asarray(jax.jit(fn)(x)),
                             atol=1e-4)
