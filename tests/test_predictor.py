"""Predictor: one object loads a run and predicts arrays or files, exactly as
`--mode=predict` does (it is what `--mode=predict` runs).

The 2D run is conftest's session fixture; a 2D-slice run of a tiny MSD NIfTI
task is trained once for this module. The same equality for the 2D run and
the 3D patch run (sliding windows, MC dropout) is checked in
test_evaluate_predict.py, on the files its --mode=predict tests write.
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from medseg_jax import Prediction
from medseg_jax import inference
from medseg_jax import Predictor
from medseg_jax import predict
from medseg_jax import workdir as workdir_lib
from medseg_jax.data import pipeline
from medseg_jax.data import transforms
from medseg_jax.data import volume_io
from tests import conftest
from tests import test_data_e2e


@pytest.fixture(scope='module')
def slice_run(tmp_path_factory):
  """A 2D run on axial slices (one neighbour each side) of NIfTI volumes."""
  root = test_data_e2e.make_msd(str(tmp_path_factory.mktemp('msd') / 'Task'))
  workdir = tmp_path_factory.mktemp('slice_run')
  conftest.run_main(workdir, **test_data_e2e.slice_run_settings(root))
  return workdir, root


def _predict_mode(workdir, path, out):
  """What `--mode=predict --config.eval.save_probabilities=True` runs."""
  config = workdir_lib.load_config(str(workdir))
  config.eval.save_probabilities = True
  assert not predict.predict_paths(config, str(workdir), str(path), str(out))


def _assert_same_as_files(prediction, mask, probs):
  np.testing.assert_array_equal(prediction.labels, mask)
  assert prediction.probabilities.dtype == np.float32
  np.testing.assert_allclose(prediction.probabilities, probs, atol=1e-6,
                             rtol=0)


def test_import_is_light_and_exports_the_predictor():
  code = ('import sys, medseg_jax; assert "jax" not in sys.modules; '
          'from medseg_jax import Predictor, Prediction; '
          'print(Predictor.__name__, Prediction.__name__)')
  out = subprocess.run([sys.executable, '-c', code], cwd=conftest.REPO,
                       capture_output=True, text=True, timeout=120,
                       check=True)
  assert out.stdout.split() == ['Predictor', 'Prediction']


def test_2d_slice_run_predicts_volumes_like_predict_mode(slice_run, tmp_path):
  workdir, root = slice_run
  path = f'{root}/imagesTr/case_000.nii.gz'
  _predict_mode(workdir, path, tmp_path / 'out')
  predictor = Predictor.from_workdir(str(workdir))
  assert predictor.slice_context == 1 and predictor.case_ndim == 3
  prediction, case = predictor.predict_file(path)
  assert isinstance(prediction, Prediction) and prediction.uncertainty is None
  assert case.kind == 'volume' and case.image.shape == (10, 20, 20, 2)
  direct = predictor.predict(case.image, spacing=case.spacing)
  np.testing.assert_array_equal(direct.probabilities, prediction.probabilities)
  assert prediction.probabilities.shape == (10, 20, 20, 3)
  resampling = Predictor.from_workdir(
      str(workdir),
      config_overrides={'data.preprocess.target_spacing': (2.0, 1.0, 1.0)})
  with pytest.raises(ValueError, match=r'target_spacing=\(2.0, 1.0, 1.0\): '
                     r'pass the spacing'):
    resampling.predict(case.image)
  out = tmp_path / 'out'
  _assert_same_as_files(
      direct, volume_io.read_nifti(str(out / 'case_000.nii.gz')).array,
      volume_io.read_nifti(str(out / 'case_000_prob.nii.gz')).array)


def test_predict_checks_the_input_and_prepares_it_like_training(run2d):
  predictor = Predictor.from_workdir(str(run2d))
  rng = np.random.default_rng(1)
  grey = rng.integers(0, 255, (32, 32, 1), np.uint8)
  # A grey photograph is an RGB one with three equal channels.
  np.testing.assert_array_equal(
      predictor.predict(grey).probabilities,
      predictor.predict(np.repeat(grey, 3, axis=-1)).probabilities)
  # At the training size there is nothing to resize: as the data source.
  rgb = rng.integers(0, 255, (32, 32, 3), np.uint8)
  np.testing.assert_array_equal(predictor.predict(rgb).probabilities,
                                predictor.predict_prepared(rgb).probabilities)
  with pytest.raises(ValueError, match=r'the image has 2 channel\(s\), the '
                     r'model was trained on 3 \(config.data.in_channels\)'):
    predictor.predict(rng.normal(size=(32, 32, 2)))
  with pytest.raises(ValueError, match='a volume cannot be predicted by this '
                     '2D model'):
    predictor.predict(rng.normal(size=(4, 32, 32, 3)))


def test_uncertainty_maps_in_the_input_geometry(run2d):
  predictor = Predictor.from_workdir(str(run2d),
                                     config_overrides={'eval.mc_samples': 2})
  image = np.random.default_rng(2).integers(0, 255, (40, 24, 3), np.uint8)
  maps = predictor.predict(image).uncertainty
  assert maps['mean'].shape == maps['std'].shape == (40, 24, 1)
  assert maps['entropy'].shape == maps['mutual_information'].shape == (40, 24)
  assert predictor.predict(image, uncertainty=False).uncertainty is None
  with pytest.raises(ValueError, match='MC-dropout maps'):
    Predictor.from_workdir(str(run2d), ensemble=[str(run2d)],
                           config_overrides={'eval.mc_samples': 2})


def test_a_run_saved_before_newer_config_keys_still_predicts(run2d, tmp_path):
  old = tmp_path / 'old_run'
  shutil.copytree(run2d / 'checkpoints', old / 'checkpoints')
  saved = json.loads((run2d / 'config.json').read_text())
  # Keys that configs/default.py gained after this run was trained.
  del saved['model']['residual'], saved['eval']['sw_batch_size']
  del saved['data']['preprocess']
  (old / 'config.json').write_text(json.dumps(saved))
  image = np.random.default_rng(3).integers(0, 255, (32, 32, 3), np.uint8)
  np.testing.assert_array_equal(
      Predictor.from_workdir(str(old)).predict(image).probabilities,
      Predictor.from_workdir(str(run2d)).predict(image).probabilities)


def test_slice_run_predicts_each_slice_as_training_saw_it(slice_run):
  # The restacked prediction of a volume equals predicting, one by one, the
  # 2D records (slice + context) the run trained on, normalised as training.
  workdir, _ = slice_run
  predictor = Predictor.from_workdir(str(workdir))
  slices = pipeline.build_splits(predictor.config.data).source
  volume = slices.volumes[0]['image']
  probs = predictor.predict_prepared(volume).probabilities
  predict_fn = inference.make_predict_fn(predictor.model, predictor.variables)
  divisor = inference.input_divisor(predictor.model)
  normalize = transforms.build_eval_transforms(predictor.config.data.mean,
                                               predictor.config.data.std)
  for z in (0, 4, volume.shape[0] - 1):
    record = {'image': slices[z]['image']}  # Volume 0's slices come first.
    for op in normalize:
      record = op.map(record)
    np.testing.assert_allclose(
        probs[z], inference.predict_whole(predict_fn, record['image'],
                                          divisor), rtol=0, atol=1e-6)
