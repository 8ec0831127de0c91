"""End-to-end `--mode=evaluate` and `--mode=predict` of medseg_jax.main.

Two tiny runs are trained once per session (conftest's `run2d` and `run3d`),
both with dropout (for MC dropout): a 2D UNet++ with checkpoints at steps 4
and 6, and a 1-channel 3D U-Net on patches (sliding windows; DICOM series are
single-channel). The tests evaluate or predict with them in subprocesses
(`conftest.run_main_mode`), as a user would.
"""

import hashlib
import json
import os
import pathlib
import shutil

import nibabel as nib
import numpy as np
from PIL import Image
from pydicom.uid import generate_uid
import pytest

from medseg_jax import config_lib
from medseg_jax import evaluate
from medseg_jax import gradcam
from medseg_jax import predict
from medseg_jax import predictor as predictor_lib
from medseg_jax import report
from medseg_jax import run_loader
from medseg_jax import workdir as workdir_lib
from medseg_jax.data import image_io
from medseg_jax.data import pipeline
from medseg_jax.data import volume_io
from tests import conftest
from tests import test_volume_io

RUN_2D = conftest.RUN_2D
MC_MAPS = ('mean', 'std', 'entropy', 'mutual_information')
EVAL_FILES = ('cases.csv', 'summary.json', 'summary.md', 'cases.png',
              'distributions.png', 'training.png', 'reliability.png')
NIFTI_ZOOMS = (0.8, 0.9, 2.5)  # nibabel (x, y, z) voxel sizes.


def _main_with_config(workdir, extra, check=False, **config_overrides):
  """Runs main with --config=configs/unetpp.py:cpu, tiny + these overrides."""
  return conftest.run_main(workdir, check=check, extra=extra,
                           **config_overrides)


def _summary(directory):
  with open(os.path.join(directory, 'summary.json')) as f:
    return json.load(f)


def _steps(workdir, which):
  return sorted(int(n) for n in os.listdir(workdir / 'checkpoints' / which)
                if n.isdigit())


def _snapshot(path):
  """{relative path: sha256} of every file under `path` (empty if absent)."""
  path = pathlib.Path(path)
  return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(path.rglob('*')) if p.is_file()}


def _split_case_ids(workdir, split):
  data = pipeline.build_splits(workdir_lib.load_config(str(workdir)).data)
  return data, [data.source.case_ids[int(i)] for i in data.indices[split]]


# ----------------------------------------------------------------- evaluate


def test_evaluate_2d_writes_reports_whose_summary_matches_the_rows(run2d):
  conftest.run_main_mode(run2d, 'evaluate')
  out = run2d / 'eval' / 'test'
  assert all((out / name).stat().st_size > 0 for name in EVAL_FILES)
  rows = report.read_case_csv(str(out / 'cases.csv'))
  with open(out / 'cases.csv') as f:
    assert f.readline().strip().split(',') == list(report.ROW_KEYS)
  _, test_ids = _split_case_ids(run2d, 'test')
  assert sorted(r['case_id'] for r in rows) == sorted(test_ids)
  assert len(rows) == 4 and {r['class_index'] for r in rows} == {1}
  summary = _summary(out)
  assert summary['step'] == _steps(run2d, 'best')[0]
  assert summary['split'] == 'test' and summary['num_cases'] == 4
  dice = summary['classes'][0]['metrics']['dice']
  np.testing.assert_allclose(dice['mean'], np.mean([r['dice'] for r in rows]),
                             rtol=1e-12)
  assert dice['n'] == 4 and dice['ci_low'] <= dice['mean'] <= dice['ci_high']
  assert dice['ci_low'] < dice['ci_high']
  ious = [r['iou'] for r in rows]
  np.testing.assert_allclose(summary['isic_thresholded_jaccard'],
                             np.mean([v if v >= 0.65 else 0.0 for v in ious]))
  calibration = summary['calibration']
  assert 0.0 <= calibration['ece'] <= 1.0
  assert calibration['num_pixels'] == 4 * 32 * 32
  assert summary['config']['eval']['threshold'] == 0.5
  assert rows[0]['volume_unit'] == 'pixels'
  assert 'ISIC thresholded Jaccard' in (out / 'summary.md').read_text()


def test_evaluate_val_split_latest_and_a_given_step(run2d):
  latest = _steps(run2d, 'latest')
  assert latest == [4, 6]
  conftest.run_main_mode(run2d, 'evaluate', '--split=val',
                         '--checkpoint=latest')
  summary = _summary(run2d / 'eval' / 'val')
  assert (summary['split'], summary['step'], summary['num_cases']) == (
      'val', 6, 4)
  # The step that is not the best one lives only under checkpoints/latest.
  other = next(s for s in latest if s not in _steps(run2d, 'best'))
  conftest.run_main_mode(run2d, 'evaluate', '--split=val', f'--step={other}')
  assert _summary(run2d / 'eval' / 'val')['step'] == other


def test_evaluate_unknown_step_lists_the_saved_steps(run2d):
  before = _snapshot(run2d / 'eval')
  proc = conftest.run_main_mode(run2d, 'evaluate', '--step=99', check=False)
  assert proc.returncode == 1
  assert 'step 99' in proc.stderr and 'latest: [4, 6]' in proc.stderr
  assert _snapshot(run2d / 'eval') == before


def test_two_evaluations_of_one_split_do_not_mix(run2d):
  out = run2d / 'eval' / 'val'
  before = _snapshot(out)
  with workdir_lib.acquire_lock(str(out), '--mode=evaluate'):
    with pytest.raises(workdir_lib.WorkdirInUseError,
                       match=f'in use by PID {os.getpid()}'):
      evaluate.evaluate_run(workdir_lib.load_config(str(run2d)), str(run2d),
                            split='val')
  assert _snapshot(out) == before


def test_evaluate_3d_sliding_window_reports_volumes_in_mm3(run3d):
  conftest.run_main_mode(run3d, 'evaluate', '--config.eval.nsd_tolerance_mm=2')
  out = run3d / 'eval' / 'test'
  assert all((out / name).stat().st_size > 0 for name in EVAL_FILES)
  rows = report.read_case_csv(str(out / 'cases.csv'))
  data, (case_id,) = _split_case_ids(run3d, 'test')
  record = data.source[int(data.indices['test'][0])]
  voxel = float(np.prod(record['spacing']))
  assert voxel != 1.0  # Anisotropic mm spacing, not voxel counts.
  assert [r['class_name'] for r in rows] == ['oedema', 'enhancing', 'necrosis']
  for row in rows:
    assert row['case_id'] == case_id
    assert (row['volume_unit'], row['distance_unit']) == ('mm^3', 'mm')
    truth_voxels = int((record['mask'] == row['class_index']).sum())
    np.testing.assert_allclose(row['truth_volume'], truth_voxels * voxel)
    pred_voxels = row['pred_volume'] / voxel
    assert abs(pred_voxels - round(pred_voxels)) < 1e-6
    assert row['nsd_tolerance'] == 2.0
    assert 0.0 <= row['nsd'] <= 1.0
  summary = _summary(out)
  assert summary['nsd_tolerance'] == 2.0
  assert 'area-weighted' in summary['distance_conventions']['nsd']
  assert summary['volume_unit'] == 'mm^3' and summary['num_cases'] == 1
  assert summary['isic_thresholded_jaccard'] is None  # Several classes.


def test_external_validation_writes_beside_the_runs_own_reports(run2d):
  own = _snapshot(run2d / 'eval' / 'test')
  # Another data set: 20 patients and another split seed (6 test images).
  proc = _main_with_config(run2d, ['--mode=evaluate'], check=True, **RUN_2D,
                           data__synthetic__num_patients=20,
                           data__split_seed=7)
  (external,) = (run2d / 'eval').glob('external-*')
  summary = _summary(external / 'test')
  assert summary['num_cases'] == 6
  assert summary['config']['data']['synthetic']['num_patients'] == 20
  assert len(report.read_case_csv(str(external / 'test' / 'cases.csv'))) == 6
  assert str(external / 'test') in proc.stdout
  assert _snapshot(run2d / 'eval' / 'test') == own
  # The same data given again goes to the same folder.
  conftest.run_main_mode(run2d, 'evaluate',
                         '--config.data.synthetic.num_patients=20',
                         '--config.data.split_seed=7')
  assert list((run2d / 'eval').glob('external-*')) == [external]


def test_evaluate_refuses_another_model_and_writes_nothing(run2d):
  before = _snapshot(run2d / 'eval')
  proc = _main_with_config(run2d, ['--mode=evaluate'], **RUN_2D,
                           model__features=(4, 8, 32))
  assert proc.returncode == 1
  assert 'config.model.features' in proc.stderr
  assert '[4, 8, 16]' in proc.stderr and '[4, 8, 32]' in proc.stderr
  assert _snapshot(run2d / 'eval') == before


def test_unknown_config_key_or_file_is_one_clear_error(run2d):
  proc = _main_with_config(run2d, ['--mode=evaluate'], **RUN_2D,
                           eval__no_such_key=1)
  assert proc.returncode == 1
  assert 'config.eval has no field' in proc.stderr
  assert 'no_such_key' in proc.stderr and 'mc_samples' in proc.stderr
  assert 'Traceback' not in proc.stderr
  proc = conftest.run_main_mode(run2d, 'evaluate',
                                '--config=configs/no_such_file.py',
                                check=False)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert 'No such file' in proc.stderr and 'no_such_file.py' in proc.stderr


# ------------------------------------------------------------------ predict


def _image_inputs(folder):
  """Writes images of sizes unlike training, a corrupt one and a .txt."""
  folder.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (50, 70, 3), np.uint8)).save(
      folder / 'wide.png')
  Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(
      folder / 'square.jpg')
  Image.fromarray(rng.integers(0, 255, (45, 30), np.uint8)).save(
      folder / 'gray.png')
  (folder / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
  (folder / 'notes.txt').write_text('scanned on Monday')
  return folder


def test_predict_images_at_their_own_size_and_lists_the_corrupt_one(
    run2d, tmp_path):
  inputs = _image_inputs(tmp_path / 'in')
  before = _snapshot(inputs)
  out = tmp_path / 'out'
  proc = conftest.run_main_mode(run2d, 'predict', f'--input={inputs}',
                                f'--output={out}', check=False)
  assert proc.returncode == 1
  assert sorted(os.listdir(out)) == ['gray.png', 'square.png', 'wide.png']
  for name, shape in [('wide', (50, 70)), ('square', (40, 40)),
                      ('gray', (45, 30))]:
    mask = np.asarray(Image.open(out / f'{name}.png'))
    assert mask.shape == shape and set(np.unique(mask)) <= {0, 255}
  lines = proc.stdout.strip().splitlines()
  summary_at = next(i for i, l in enumerate(lines) if 'Predicted 3 of 4' in l)
  assert lines[summary_at + 1:-1] == [
      f'skipped {inputs / "notes.txt"}: not an image, NIfTI file or DICOM '
      'series', '1 input(s) failed:']
  assert lines[-1].startswith(
      f'  {inputs / "broken.png"}: cannot be opened as an image (')
  assert _snapshot(inputs) == before


def test_predict_refuses_an_output_folder_among_the_inputs(run2d, tmp_path):
  inputs = _image_inputs(tmp_path / 'in')
  before = _snapshot(inputs)
  for given, output in [(inputs / 'wide.png', inputs),  # would be overwritten
                        (inputs, inputs / 'masks')]:
    proc = conftest.run_main_mode(run2d, 'predict', f'--input={given}',
                                  f'--output={output}', check=False)
    assert proc.returncode == 1
    assert 'never written among the inputs' in proc.stderr
    assert _snapshot(inputs) == before and not (inputs / 'masks').exists()


def _one_error_line(proc):
  """The single `error:` line of a refused run (no traceback)."""
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  (line,) = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  return line


def test_predict_never_replaces_outputs_without_overwrite(run2d, tmp_path):
  inputs = _image_inputs(tmp_path / 'in')
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'wide.png').write_bytes(b'an earlier mask')
  flags = (f'--input={inputs / "wide.png"}', f'--output={out}')
  line = _one_error_line(conftest.run_main_mode(run2d, 'predict', *flags,
                                                check=False))
  assert 'already holds 1 of the files' in line and 'wide.png' in line
  assert '--overwrite' in line
  assert (out / 'wide.png').read_bytes() == b'an earlier mask'
  conftest.run_main_mode(run2d, 'predict', *flags, '--overwrite')
  assert np.asarray(Image.open(out / 'wide.png')).shape == (50, 70)
  assert sorted(os.listdir(out)) == ['wide.png']  # The lock file is gone.
  # An --output that is a file: one line, nothing written.
  line = _one_error_line(conftest.run_main_mode(
      run2d, 'predict', flags[0], f'--output={out / "wide.png"}',
      check=False))
  assert 'is a file' in line and 'wide.png' in line


def test_two_predictions_into_one_folder_do_not_mix(run2d, tmp_path):
  inputs = _image_inputs(tmp_path / 'in')
  out = tmp_path / 'out'
  config = workdir_lib.load_config(str(run2d))
  # Another prediction is writing into `out` (here: this process holds the
  # lock; flock locks of two open files conflict within a process too).
  with workdir_lib.acquire_lock(str(out), '--mode=predict'):
    with pytest.raises(workdir_lib.WorkdirInUseError,
                       match=f'in use by PID {os.getpid()}'):
      predict.predict_paths(config, str(run2d), str(inputs / 'wide.png'),
                            str(out))
  assert not os.listdir(out)


def test_predict_mc_dropout_maps_with_eval_overrides(run2d, tmp_path):
  inputs = _image_inputs(tmp_path / 'in')
  out = tmp_path / 'out'
  conftest.run_main_mode(run2d, 'predict', f'--input={inputs / "wide.png"}',
                         f'--output={out}', '--config.eval.mc_samples=3',
                         '--config.eval.save_probabilities=True')
  assert sorted(os.listdir(out)) == sorted(
      ['wide.png', 'wide_prob.npy', 'wide_mean.npy', 'wide_std.npy',
       'wide_entropy.npy', 'wide_mutual_information.npy'])
  maps = {n: np.load(out / f'wide_{n}.npy') for n in ('prob', *MC_MAPS)}
  assert maps['prob'].shape == maps['mean'].shape == maps['std'].shape == (
      50, 70, 1)
  assert maps['entropy'].shape == maps['mutual_information'].shape == (50, 70)
  assert 0.0 <= maps['mean'].min() and maps['mean'].max() <= 1.0
  assert maps['std'].max() > 0.0  # Dropout is on: the samples differ.
  assert maps['entropy'].min() >= 0.0 and maps['entropy'].max() <= np.log(2)
  # The Predictor gives the same, called on the array (2D run).
  predictor = predictor_lib.Predictor.from_workdir(
      str(run2d), config_overrides={'eval.mc_samples': 3})
  prediction = predictor.predict(image_io.read_image(str(inputs /
                                                         'wide.png')))
  mask = np.asarray(Image.open(out / 'wide.png')) // 255
  _assert_same_prediction(prediction, mask, maps['prob'],
                          {n: maps[n] for n in MC_MAPS})


def _assert_same_prediction(prediction, labels, probabilities, maps):
  """Asserts a Prediction equals what --mode=predict wrote (to 1e-6)."""
  np.testing.assert_array_equal(prediction.labels, labels)
  assert prediction.probabilities.dtype == np.float32
  np.testing.assert_allclose(prediction.probabilities, probabilities,
                             rtol=0, atol=1e-6)
  assert sorted(prediction.uncertainty) == sorted(maps)
  for name, values in maps.items():
    np.testing.assert_allclose(prediction.uncertainty[name], values, rtol=0,
                               atol=1e-6, err_msg=name)


def test_predict_gradcam_overlay_and_a_wrong_layer(run2d, tmp_path):
  predictor = predictor_lib.Predictor.from_workdir(str(run2d))
  layers = gradcam.feature_layer_names(
      predictor.model, predictor.variables,
      np.zeros(config_lib.model_input_shape(predictor.config)[1:]))
  inputs = _image_inputs(tmp_path / 'in')
  out = tmp_path / 'out'
  conftest.run_main_mode(run2d, 'predict', f'--input={inputs / "wide.png"}',
                         f'--output={out}',
                         f'--config.eval.gradcam_layer={layers[1]}')
  assert sorted(os.listdir(out)) == ['wide.png', 'wide_gradcam.png']
  cam = np.asarray(Image.open(out / 'wide_gradcam.png'))
  assert cam.shape == (50, 70, 3) and cam.dtype == np.uint8
  # The heat map's colours are blended in: not the image alone, rescaled.
  image = np.asarray(Image.open(inputs / 'wide.png'), np.float32)
  plain = np.round((image - image.min()) / (image.max() - image.min()) * 255)
  assert np.abs(cam - plain).mean() > 5
  proc = conftest.run_main_mode(run2d, 'predict',
                                f'--input={inputs / "wide.png"}',
                                f'--output={tmp_path / "out2"}',
                                '--config.eval.gradcam_layer=no_such_layer',
                                check=False)
  assert proc.returncode == 1
  assert "gradcam_layer='no_such_layer'" in proc.stderr
  assert layers[1] in proc.stderr  # The valid names are listed.
  assert not (tmp_path / 'out2').exists() or not os.listdir(tmp_path / 'out2')


def test_mc_dropout_without_dropout_or_with_one_sample_is_refused(run2d):
  config = workdir_lib.load_config(str(run2d))
  config.eval.mc_samples = 1
  with pytest.raises(ValueError, match='mc_samples=1: MC dropout needs at '
                     'least 2'):
    run_loader.check_mc_settings(config)
  config.eval.mc_samples, config.model.dropout_rate = 3, 0.0
  with pytest.raises(ValueError, match=r'mc_samples=3 needs a model trained '
                     r'with dropout.*dropout_rate=0.0'):
    run_loader.check_mc_settings(config)


def _write_nifti(path, channels):
  """Writes a (x, y, z, C) = (20, 18, 10, C) image, oblique and anisotropic."""
  data = np.random.default_rng(channels).normal(
      size=(20, 18, 10, channels)).astype(np.float32)
  image = nib.Nifti1Image(data, test_volume_io.oblique_affine(NIFTI_ZOOMS))
  nib.save(image, str(path))
  return nib.load(str(path))


def _write_dicom_series(folder, num_slices=3):
  folder.mkdir()
  uid = generate_uid()
  for k in range(num_slices):
    test_volume_io.dicom_slice(folder / f'{k:03d}.dcm', k, uid, rows=12,
                               columns=14)
  return volume_io.read_dicom_series(str(folder))


@pytest.fixture(scope='module')
def volume_prediction(run3d, tmp_path_factory):
  """Predicts a NIfTI, a DICOM series and a 2-channel NIfTI with the 3D run."""
  root = tmp_path_factory.mktemp('volumes')
  inputs = root / 'in'
  inputs.mkdir()
  nifti = _write_nifti(inputs / 'scan.nii.gz', channels=1)
  _write_nifti(inputs / 'two_channels.nii.gz', channels=2)
  series = _write_dicom_series(inputs / 'series')
  Image.fromarray(np.zeros((40, 40), np.uint8)).save(inputs / 'photo.png')
  out = root / 'out'
  proc = conftest.run_main_mode(run3d, 'predict', f'--input={inputs}',
                                f'--output={out}',
                                '--config.eval.save_probabilities=True',
                                '--config.eval.mc_samples=2', check=False)
  return dict(proc=proc, out=out, nifti=nifti, series=series, inputs=inputs)


def test_predict_nifti_keeps_shape_affine_and_zooms(volume_prediction):
  out, nifti = volume_prediction['out'], volume_prediction['nifti']
  mask = nib.load(str(out / 'scan.nii.gz'))
  assert mask.shape == (20, 18, 10)
  np.testing.assert_array_equal(mask.affine, nifti.affine)
  assert mask.header.get_zooms() == nifti.header.get_zooms()[:3]
  labels = np.asarray(mask.dataobj)
  assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2, 3}
  probs = nib.load(str(out / 'scan_prob.nii.gz'))
  assert probs.shape == (20, 18, 10, 4)
  np.testing.assert_array_equal(probs.affine, nifti.affine)
  values = np.asarray(probs.dataobj)
  np.testing.assert_allclose(values.sum(axis=-1), 1.0, atol=1e-4)
  # The mask is the argmax of the probability map written beside it.
  np.testing.assert_array_equal(labels, values.argmax(axis=-1))
  # MC dropout by sliding windows: maps in the input's geometry.
  maps = {n: nib.load(str(out / f'scan_{n}.nii.gz')) for n in MC_MAPS}
  assert maps['mean'].shape == maps['std'].shape == (20, 18, 10, 4)
  assert maps['entropy'].shape == maps['mutual_information'].shape == (
      20, 18, 10)
  assert all(np.array_equal(m.affine, nifti.affine) for m in maps.values())
  assert np.asarray(maps['std'].dataobj).max() > 0.0
  np.testing.assert_allclose(np.asarray(maps['mean'].dataobj).sum(axis=-1),
                             1.0, atol=1e-4)


def test_predictor_predicts_volumes_like_predict_mode(run3d,
                                                      volume_prediction):
  # 3D patch run: sliding windows, MC dropout by sliding windows.
  path = volume_prediction['inputs'] / 'scan.nii.gz'
  volume = volume_io.read_volume(str(path))
  predictor = predictor_lib.Predictor.from_workdir(
      str(run3d), config_overrides={'eval.mc_samples': 2})
  assert volume.array.shape == (10, 18, 20, 1)  # [D, H, W, C], C = 1.
  prediction = predictor.predict(volume.array, spacing=volume.spacing)
  read = lambda name: volume_io.read_nifti(
      str(volume_prediction['out'] / f'scan{name}.nii.gz')).array
  _assert_same_prediction(prediction, read(''), read('_prob'),
                          {n: read(f'_{n}') for n in MC_MAPS})


def test_predict_dicom_series_writes_a_nifti_in_its_geometry(volume_prediction):
  out, series = volume_prediction['out'], volume_prediction['series']
  mask = volume_io.read_nifti(str(out / 'series.nii.gz'))
  assert mask.array.shape == series.array.shape == (3, 12, 14)
  np.testing.assert_allclose(mask.affine, series.affine, atol=1e-5)
  np.testing.assert_allclose(mask.spacing, series.spacing, rtol=1e-6)
  assert set(np.unique(mask.array)) <= {0, 1, 2, 3}


def test_predict_wrong_channels_or_dimensions_name_the_file(
    volume_prediction):
  proc, inputs = volume_prediction['proc'], volume_prediction['inputs']
  assert proc.returncode == 1
  failures = proc.stdout[proc.stdout.index('2 input(s) failed'):]
  assert (f'{inputs / "two_channels.nii.gz"}: the image has 2 channel(s), the '
          'model was trained on 1 (config.data.in_channels).') in failures
  assert (f'{inputs / "photo.png"}: a 2D image cannot be predicted by this 3D '
          'model (trained on inputs of (8, 16, 16))') in failures
  assert 'Predicted 2 of 4' in proc.stdout
  assert sorted(os.listdir(volume_prediction['out'])) == sorted(
      f'{stem}{suffix}.nii.gz' for stem in ('scan', 'series')
      for suffix in ('', '_prob', *(f'_{n}' for n in MC_MAPS)))


def test_predict_refuses_another_model(run2d, run3d, tmp_path):
  inputs = _image_inputs(tmp_path / 'in')
  # Overrides of the run's config.json that change the model.
  proc = conftest.run_main_mode(run2d, 'predict', f'--input={inputs}',
                                f'--output={tmp_path / "a"}',
                                '--config.model.features=(4,8,32)',
                                check=False)
  assert proc.returncode == 1 and 'config.model.features' in proc.stderr
  # A checkpoint that does not fit its config.json (e.g. copied over).
  mixed = tmp_path / 'mixed'
  shutil.copytree(run2d / 'checkpoints', mixed / 'checkpoints')
  shutil.copy(run3d / 'config.json', mixed / 'config.json')
  proc = conftest.run_main_mode(mixed, 'predict', f'--input={inputs}',
                                f'--output={tmp_path / "b"}', check=False)
  assert proc.returncode == 1
  assert 'does not fit the model' in proc.stderr and str(mixed) in proc.stderr
  assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()


# ----------------------------------------------------------------- ensembles


@pytest.fixture(scope='module')
def run2d_other_seed(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run2d_seed1')
  conftest.run_main(workdir, **dict(RUN_2D, seed=1))
  return workdir


def test_ensemble_averages_the_members_probabilities(run2d, run2d_other_seed,
                                                     tmp_path):
  inputs = _image_inputs(tmp_path / 'in')
  probs = {}
  for name, flags in [('a', ()), ('b', ()),
                      ('ab', (f'--ensemble={run2d_other_seed}',))]:
    workdir = run2d_other_seed if name == 'b' else run2d
    out = tmp_path / name
    conftest.run_main_mode(workdir, 'predict',
                           f'--input={inputs / "wide.png"}', f'--output={out}',
                           '--config.eval.save_probabilities=True', *flags)
    probs[name] = np.load(out / 'wide_prob.npy')
  assert np.abs(probs['a'] - probs['b']).max() > 1e-3  # Different models.
  np.testing.assert_allclose(probs['ab'], (probs['a'] + probs['b']) / 2,
                             atol=1e-5)
  # evaluate writes the ensemble's reports beside the run's own.
  own = _snapshot(run2d / 'eval')
  conftest.run_main_mode(run2d, 'evaluate', f'--ensemble={run2d_other_seed}')
  [folder] = [d for d in os.listdir(run2d / 'eval')
              if d.startswith('ensemble-')]
  summary = _summary(run2d / 'eval' / folder / 'test')
  assert summary['ensemble_size'] == 2
  assert {k: v for k, v in _snapshot(run2d / 'eval').items()
          if not k.startswith('ensemble-')} == own


def test_ensemble_of_another_model_is_refused(run2d, run3d, tmp_path):
  inputs = _image_inputs(tmp_path / 'in')
  proc = conftest.run_main_mode(run2d, 'predict',
                                f'--input={inputs / "wide.png"}',
                                f'--output={tmp_path / "out"}',
                                f'--ensemble={run3d}', check=False)
  assert proc.returncode == 1
  assert str(run3d) in proc.stderr and 'another model' in proc.stderr
  assert not (tmp_path / 'out').exists()
