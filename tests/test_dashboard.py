"""Tests of the dashboard's logic (medseg_jax/dashboard/*, no browser).

The page itself runs in a real browser in test_dashboard_browser.py; here
its computations get known answers, and Streamlit's AppTest runs the script.
"""

import csv
import functools
import io
import sys
import types
import zipfile

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydicom.uid import generate_uid
from streamlit.testing.v1 import AppTest

from medseg_jax import predictor as predictor_lib
from medseg_jax.dashboard import __main__ as dashboard_main
from medseg_jax.dashboard import cli
from medseg_jax.dashboard import loading
from medseg_jax.dashboard import results
from medseg_jax.dashboard import uploads
from medseg_jax.dashboard import views
from tests import test_volume_io
from tests.conftest import tiny_config


# Predictor.read_file of a binary photo run, without loading a model: it
# reads with the config only.
READ_FILE = functools.partial(predictor_lib.Predictor.read_file,
                              types.SimpleNamespace(config=tiny_config()))


def _png_bytes(array) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, 'PNG')
  return buffer.getvalue()


def _nifti_bytes(tmp_path, data, affine, name='case.nii.gz') -> bytes:
  path = tmp_path / name
  nib.save(nib.Nifti1Image(data, affine), str(path))
  return path.read_bytes()


# ----------------------------------------------------------- thresholds


def test_labels_at_rethresholds_binary_and_postprocesses():
  probs = np.array([[0.2, 0.6, 0.9], [0.55, 0.1, 0.75]], np.float32)[..., None]
  np.testing.assert_array_equal(views.labels_at(probs, 0.5),
                                [[0, 1, 1], [1, 0, 1]])
  np.testing.assert_array_equal(views.labels_at(probs, 0.7),
                                [[0, 0, 1], [0, 0, 1]])
  assert views.labels_at(probs, 1.0).sum() == 0
  assert views.labels_at(probs, 0.0).sum() == 6
  # The run's post-processing applies after the threshold: the stray pixel
  # (0, 0) is not the largest component (8-connected), so it goes.
  post = tiny_config().eval.postprocess
  post.largest_component = True
  probs = np.array([[0.6, 0.1, 0.1, 0.1], [0.1, 0.1, 0.8, 0.9],
                    [0.1, 0.1, 0.7, 0.6]], np.float32)[..., None]
  np.testing.assert_array_equal(views.labels_at(probs, 0.5, post),
                                [[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
  np.testing.assert_array_equal(views.labels_at(probs, 0.5)[0, 0], 1)


def test_labels_at_multiclass_keeps_confident_argmax():
  probs = np.array([[[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]]],
                   np.float32)
  np.testing.assert_array_equal(views.labels_at(probs, 0.0), [[1, 0, 2]])
  np.testing.assert_array_equal(views.labels_at(probs, 0.5), [[1, 0, 2]])
  np.testing.assert_array_equal(views.labels_at(probs, 0.6), [[0, 0, 0]])
  config = tiny_config(data__num_classes=3)
  assert views.default_threshold(config) == 0.0
  assert views.default_threshold(tiny_config()) == 0.5


# --------------------------------------------------------------- drawing


def test_overlay_tints_each_class_and_outlines_it():
  rgb = np.full((8, 8, 3), 100, np.uint8)
  labels = np.zeros((8, 8), np.int32)
  labels[1:6, 1:6] = 1
  labels[7, 7] = 2
  out = views.overlay(rgb, labels, alpha=0.5, outline=True)
  red, green = np.array(views.class_colour(1)), np.array(views.class_colour(2))
  np.testing.assert_array_equal(out[0, 0], [100, 100, 100])  # Background.
  np.testing.assert_array_equal(out[3, 3], np.round(50 + red / 2))  # Inside.
  np.testing.assert_array_equal(out[1, 3], red)  # Border: full colour.
  np.testing.assert_array_equal(out[7, 7], green)  # A one-pixel region.
  flat = views.overlay(rgb, labels, alpha=0.5, outline=False)
  np.testing.assert_array_equal(flat[1, 3], np.round(50 + red / 2))
  assert views.class_colour(1) != views.class_colour(2)
  assert views.class_colour(len(views.PALETTE) + 1) == views.class_colour(1)


def test_slices_windows_and_heat_maps():
  volume = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
  np.testing.assert_array_equal(views.slice_of(volume, 'axial', 1),
                                volume[1])
  # Coronal/sagittal: slice 0 of the volume at the bottom.
  np.testing.assert_array_equal(views.slice_of(volume, 'coronal', 2),
                                volume[::-1, 2, :])
  np.testing.assert_array_equal(views.slice_of(volume, 'sagittal', 0),
                                volume[::-1, :, 0])
  assert views.slice_spacing((5.0, 0.7, 0.9), 'coronal') == (5.0, 0.9)
  # Thick slices are stretched: 2 rows of 5 mm vs 4 columns of 1 mm.
  shown = views.physical_aspect(np.zeros((2, 4, 3), np.uint8), (5.0, 1.0), 40)
  assert shown.shape == (40, 16, 3)
  rgb = views.to_rgb(np.array([[0.0, 50.0], [100.0, 200.0]]), (0.0, 100.0))
  np.testing.assert_array_equal(rgb[..., 0], [[0, 128], [255, 255]])
  heat = views.heat_rgb(np.array([[0.0, 2.0]]), high=2.0, cmap='gray')
  np.testing.assert_array_equal(heat[0, :, 0], [0, 255])
  std = np.zeros((2, 2, 3), np.float32)
  std[0, 0] = (0.1, 0.3, 0.2)
  maps = views.uncertainty_maps({'mean': np.full((2, 2, 3), 1 / 3),
                                 'std': std, 'entropy': np.ones((2, 2))})
  np.testing.assert_allclose(maps['mean'], 2 / 3)
  assert maps['std'][0, 0] == pytest.approx(0.3)


# ------------------------------------------------------------- measures


def test_areas_and_volumes_use_the_spacing():
  labels = np.zeros((4, 5), np.int32)
  labels[:2, :5] = 1
  labels[3, 0] = 2
  photo = uploads.Case('a.png', 'image', np.zeros((4, 5, 3), np.uint8))
  assert results.class_sizes(labels, photo, ['a', 'b']) == {'a': 10.0,
                                                            'b': 1.0}
  assert results.size_unit(photo) == (1.0, 'px')
  slice_ = uploads.Case('s.dcm', 'image', photo.image, (0.5, 0.25))
  assert results.class_sizes(labels, slice_, ['a', 'b'])['a'] == 1.25
  assert results.size_unit(slice_)[1] == 'mm²'
  volume = uploads.Case('v.nii', 'volume', np.zeros((10, 10, 10, 1)),
                        (2.0, 1.0, 0.5))
  assert results.class_sizes(np.ones((10, 10, 10)), volume,
                             ['t'])['t'] == pytest.approx(1.0)  # 1000 mm³.
  assert results.size_unit(volume)[1] == 'mL'
  assert results.format_size(1234.0, 'px') == '1,234 px'
  assert results.format_size(2.5, 'mL') == '2.50 mL'


def test_dice_per_class_known_values():
  pred = np.array([[1, 1, 1, 1, 0, 0, 2]])
  truth = np.array([[0, 1, 1, 1, 1, 1, 1]])
  # Class 1: |A| = 4, |B| = 6, overlap 3 -> 0.6. Class 2: 1 vs 0 -> 0.
  # Class 3: absent from both -> 1.
  assert results.dice_per_class(pred, truth, 3) == [0.6, 0.0, 1.0]
  with pytest.raises(ValueError, match='shape'):
    results.dice_per_class(pred, truth[:, :3], 1)


def test_zip_holds_masks_in_the_input_geometry_and_the_csv(tmp_path):
  config = tiny_config()
  affine = test_volume_io.oblique_affine()  # Rotated, 0.8 x 0.8 x 2.5 mm.
  data = np.random.default_rng(0).normal(size=(6, 5, 4)).astype(np.float32)
  volume = uploads.read_case('ct.nii.gz',
                             _nifti_bytes(tmp_path, data, affine), READ_FILE,
                             two_d=False)
  assert volume.kind == 'volume' and volume.image.shape == (4, 5, 6, 1)
  assert volume.spacing == (2.5, 0.8, 0.8)
  vol_labels = np.zeros((4, 5, 6), np.int32)
  vol_labels[1:3, 2:4, 1:5] = 1  # 16 voxels of 1.6 mm³.
  photo = uploads.read_case('skin.png', _png_bytes(
      np.full((3, 7, 3), 90, np.uint8)), READ_FILE, two_d=True)
  photo_labels = np.zeros((3, 7), np.int32)
  photo_labels[1, 2:5] = 1
  names = ['lesion']
  rows = [results.table_row(volume, vol_labels, names),
          results.table_row(photo, photo_labels, names, photo_labels),
          results.failure_row('bad.png', 'bad.png: cannot be decoded')]
  archive = zipfile.ZipFile(io.BytesIO(results.zip_bytes(
      [(volume, vol_labels), (photo, photo_labels)], rows, config)))
  assert sorted(archive.namelist()) == ['ct.nii.gz', results.CSV_NAME,
                                        'skin.png']
  (tmp_path / 'out').mkdir()
  archive.extractall(tmp_path / 'out')
  mask = nib.load(str(tmp_path / 'out' / 'ct.nii.gz'))
  assert mask.shape == data.shape
  np.testing.assert_allclose(mask.affine, affine, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(mask.dataobj).transpose(2, 1, 0),
                                vol_labels)
  png = np.asarray(Image.open(tmp_path / 'out' / 'skin.png'))
  np.testing.assert_array_equal(png, photo_labels * 255)
  table = list(csv.DictReader(io.StringIO(archive.read(
      results.CSV_NAME).decode())))
  assert float(table[0]['lesion']) == pytest.approx(16 * 2.5 * 0.8 * 0.8 /
                                                    1000)
  assert table[0]['unit'] == 'mL' and table[1]['unit'] == 'px'
  assert float(table[1]['lesion']) == 3 and table[1]['dice_lesion'] == '1.0'
  assert table[2]['kind'] == 'error' and 'cannot' in table[2]['error']
  assert results.mask_name(photo, {'skin.png'}) == 'skin_2.png'


# --------------------------------------------------------------- uploads


@pytest.mark.parametrize('name, data, expected', [
    ('broken.png', b'\x89PNG\r\n\x1a\n not an image', 'broken.png: cannot'),
    ('scan.nii.gz', b'\x1f\x8b truncated', 'scan.nii.gz: not a readable NIfTI'),
    ('series.zip', b'PK not a zip', 'series.zip: not a readable ZIP'),
    ('notes.txt', b'hello', 'notes.txt: unsupported file type'),
])
def test_unreadable_uploads_give_one_line_naming_them(name, data, expected):
  with pytest.raises(uploads.UploadError) as info:
    uploads.read_case(name, data, READ_FILE, two_d=True)
  message = str(info.value)
  assert message.startswith(expected), message
  assert 'medseg_dashboard_' not in message and '\n' not in message


def test_zipped_dicom_series_and_single_slice(tmp_path):
  folder = tmp_path / 'series'
  folder.mkdir()
  uid = generate_uid()
  for k in range(3):
    test_volume_io.dicom_slice(folder / f'{k}.dcm', k, uid)
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w') as archive:
    for k in range(3):
      archive.write(folder / f'{k}.dcm', f'study/series/{k}.dcm')
    archive.writestr('__MACOSX/study/._0.dcm', b'junk')
  case = uploads.read_case('series.zip', buffer.getvalue(), READ_FILE,
                           two_d=False)
  assert case.kind == 'volume' and case.image.shape == (3, 4, 5, 1)
  np.testing.assert_allclose(case.spacing, (test_volume_io.GAP, 0.7, 0.9))
  np.testing.assert_array_equal(
      case.image[2, ..., 0], 2.0 * test_volume_io.stored_pixels(2) - 1024)
  # One slice for a 2D model: an image with its pixel spacing (mm²).
  one = uploads.read_case('one.dcm', (folder / '1.dcm').read_bytes(),
                          READ_FILE, two_d=True)
  assert one.kind == 'image' and one.image.dtype == np.uint8
  assert one.image.shape == (4, 5, 1) and one.spacing == (0.7, 0.9)
  assert results.mask_name(one) == 'one.nii.gz'  # Written back as NIfTI.


def test_ground_truth_pairing_and_reading(tmp_path):
  pairs = uploads.match_ground_truth(
      ['ISIC_001.jpg', 'ISIC_002.png', 'case.nii.gz', 'twin.png', 'twin.jpg'],
      ['ISIC_001_segmentation.png', 'isic_002_mask.png', 'case.nii.gz',
       'twin_mask.png', 'other.png'])
  assert pairs == {'ISIC_001.jpg': 'ISIC_001_segmentation.png',
                   'ISIC_002.png': 'isic_002_mask.png',
                   'case.nii.gz': 'case.nii.gz'}  # 'twin' is ambiguous.
  case = uploads.Case('a.png', 'image', np.zeros((2, 3, 3), np.uint8))
  mask = np.array([[0, 255, 255], [0, 0, 255]], np.uint8)
  truth = uploads.read_ground_truth('a_mask.png', _png_bytes(mask), case,
                                    tiny_config())
  np.testing.assert_array_equal(truth, mask // 255)
  with pytest.raises(uploads.UploadError, match=r'\(3, 2\).*a.png.*\(2, 3\)'):
    uploads.read_ground_truth('a_mask.png', _png_bytes(mask.T.copy()), case,
                              tiny_config())
  with pytest.raises(uploads.UploadError, match='values'):
    uploads.read_ground_truth('a_mask.png', _png_bytes(mask // 2), case,
                              tiny_config())
  # A label volume (x, y, z) on disk is (D, H, W) = (z, y, x) in memory.
  labels = np.random.default_rng(0).integers(0, 3, (6, 5, 4)).astype(np.uint8)
  volume = uploads.Case('v.nii.gz', 'volume', np.zeros((4, 5, 6, 1)))
  truth = uploads.read_ground_truth(
      'v.nii.gz', _nifti_bytes(tmp_path, labels, np.eye(4)), volume,
      tiny_config(data__num_classes=3))
  np.testing.assert_array_equal(truth, labels.transpose(2, 1, 0))


# -------------------------------------------------------------------- CLI


def test_cli_refuses_a_workdir_without_checkpoint(tmp_path, capsys):
  assert dashboard_main.main([f'--workdir={tmp_path}']) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: ') and 'config.json' in err
  assert len(err.splitlines()) == 1
  (tmp_path / 'config.json').write_text('{}')
  assert dashboard_main.main([f'--workdir={tmp_path}', '--port=9']) == 2
  err = capsys.readouterr().err
  assert 'no best checkpoint' in err and str(tmp_path) in err


def test_cli_arguments_reach_streamlit(run2d):
  args = cli.parse_args([f'--workdir={run2d},{run2d}x', '--port', '8600',
                         '--ensemble'])
  assert args.workdir == [str(run2d), f'{run2d}x'] and args.port == 8600
  with pytest.raises(FileNotFoundError, match='x'):
    cli.check_args(args)  # The second run does not exist.
  args.workdir = [str(run2d)]
  with pytest.raises(ValueError, match='two or more'):
    cli.check_args(args)
  args.ensemble = False
  cli.check_args(args)
  argv = cli.streamlit_argv('python', 'app.py', args)
  assert argv[:5] == ['python', '-m', 'streamlit', 'run', 'app.py']
  assert '--server.port=8600' in argv and '--server.address=127.0.0.1' in argv
  assert argv[argv.index('--') + 1:] == [f'--workdir={run2d}',
                                         '--checkpoint=best']
  assert loading.choices(['a/r1', 'b/r1', 'c/r2'], True) == [
      'a/r1', 'b/r1', 'r2', 'Ensemble of 3 models (mean probability)']


# ------------------------------------------------------ with the real run


@pytest.fixture(scope='module')
def predictor(run2d):
  return loading.load_predictor([str(run2d)], 0, False)


def test_loaded_run_thresholds_like_the_predictor(predictor):
  # run2d has dropout and eval.mc_samples = 0: the dashboard offers MC maps.
  assert predictor.config.eval.mc_samples == loading.DEFAULT_MC_SAMPLES
  image = np.random.default_rng(1).integers(0, 255, (20, 28, 3), np.uint8)
  prediction = predictor.predict(image, uncertainty=False)
  np.testing.assert_array_equal(
      views.labels_at(prediction.probabilities,
                      views.default_threshold(predictor.config),
                      predictor.config.eval.postprocess), prediction.labels)
  heat = views.gradcam_heatmap(predictor, image, 'X_0_2')
  assert heat.shape == (20, 28) and 0 <= heat.min() and heat.max() <= 1
  assert 'X_0_2' in views.gradcam_layers(
      loading.gradcam_layer_names(predictor))


def test_app_script_loads_the_model_once(run2d, monkeypatch):
  calls = []
  real = loading.load_predictor
  monkeypatch.setattr(loading, 'load_predictor',
                      lambda *a, **k: calls.append(a) or real(*a, **k))
  monkeypatch.setattr('sys.argv', ['app.py', f'--workdir={run2d}'])
  # AppTest installs the script as sys.modules['__main__'] and leaves it;
  # restore it, or multiprocessing children spawned later in this pytest
  # worker (Grain's worker processes) would re-run the app as their main.
  monkeypatch.setitem(sys.modules, '__main__', sys.modules['__main__'])
  app_path = dashboard_main.APP
  first = AppTest.from_file(app_path, default_timeout=120).run()
  assert not first.exception, first.exception
  assert first.title[0].value == 'Segmentation dashboard'
  assert first.sidebar.slider[0].value == 0.5  # config.eval.threshold.
  assert not first.sidebar.toggle[0].disabled  # MC dropout: has dropout.
  assert 'Upload one or more files' in first.info[0].value
  first.sidebar.slider[0].set_value(0.8).run()  # A rerun: no new load.
  assert not first.exception
  second = AppTest.from_file(app_path, default_timeout=120).run()  # A tab.
  assert not second.exception
  assert len(calls) == 1  # One load per server process.
