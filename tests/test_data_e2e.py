"""End-to-end data tests: tiny data sets on disk in every layout, trained a few
steps through `python -m medseg_jax.main`, plus splits and bad input.

Layouts: ISIC 2018 folders, a `folder` data set with a CSV manifest, an MSD
NIfTI task (4D two-channel images, oblique anisotropic affine, 3 classes) in
3D and as 2D slices, and synthetic3d. Bad input (missing mask, mask of
another size, mask values outside the label set, truncated JPEG) must be
listed at once by `--mode=check_data` and stop training before anything is
trained or checkpointed, and the data folder must never be written to.
"""

import csv
import glob
import hashlib
import json
import os
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from medseg_jax import workdir as workdir_lib
from medseg_jax.data import folder_sources
from medseg_jax.data import pipeline
from tests import conftest
from tests.test_folder_sources import lesion_mask
from tests.test_folder_sources import noise
from tests.test_folder_sources import save
from tests.test_folder_sources import write_csv

# A 2D run of configs/unet.py:cpu shrunk to seconds: 3 steps of batch 2.
TINY_2D = dict(data__image_size=16, model__features=(4, 8),
               train__batch_size=2, eval__batch_size=2, train__num_steps=3,
               data__val_fraction=0.2, data__test_fraction=0.2)
# The same for configs/unet3d.py:cpu on (8, 16, 16) patches.
TINY_3D = dict(data__patch_size=(8, 16, 16), model__features=(4, 8),
               train__batch_size=2, eval__batch_size=2, train__num_steps=3,
               data__val_fraction=0.2, data__test_fraction=0.2,
               data__mean=(0.0,), data__std=(1.0,))
NIFTI_DHW = (10, 20, 20)  # Volume shape (D, H, W) of the tiny MSD task.
NIFTI_SPACING_DHW = (2.5, 0.9, 0.8)  # mm; anisotropic, like most MRI.


# ---------------------------------------------------------------- helpers


def _config_path():
  """Makes `configs` importable (as main does, from the repository root)."""
  if conftest.REPO not in sys.path:
    sys.path.insert(0, conftest.REPO)


def data_config(**overrides):
  """Returns configs/default.py's `config.data` with `a__b=value` overrides."""
  _config_path()
  from configs import default  # pylint: disable=import-outside-toplevel
  cfg = default.get_config().data
  return conftest.set_fields(cfg, overrides)


def tree_digest(root):
  """Returns {relative path: sha256 or '<dir>'} of everything under `root`."""
  out = {}
  for folder, dirs, files in os.walk(root):
    for name in dirs:
      out[os.path.relpath(os.path.join(folder, name), root)] = '<dir>'
    for name in files:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def val_events(workdir):
  """Returns the validation records of a run's metrics.jsonl."""
  return [e for e in workdir_lib.read_metrics(str(workdir))
          if e['split'] == 'val']


def assert_trained(workdir, num_steps=3):
  """Asserts a run logged finite losses for every step and a final val record."""
  events = workdir_lib.read_metrics(str(workdir))
  losses = {e['step']: e['loss'] for e in events
            if e['split'] == 'train' and 'loss' in e}
  assert sorted(losses) == list(range(1, num_steps + 1))
  assert all(np.isfinite(v) for v in losses.values())
  val = val_events(workdir)
  assert val and val[-1]['step'] == num_steps
  assert 0.0 <= val[-1]['dice'] <= 1.0
  assert os.listdir(os.path.join(workdir, 'checkpoints'))
  with open(os.path.join(workdir, 'config.json')) as f:
    return json.load(f), val[-1]


def assert_nothing_written(workdir):
  """Asserts a run refused before training left its workdir empty."""
  assert os.listdir(workdir) == []


# ------------------------------------------------------------ data builders


def make_isic(root, sizes=(('Training', 4), ('Validation', 2), ('Test', 2))):
  """ISIC 2018 Task 1 folders: JPEG inputs with 0/255 PNG masks per split."""
  i = 0
  for name, n in sizes:
    inputs, truth = folder_sources.isic_folders(str(root), name)
    for _ in range(n):
      h, w = (20, 24) if i % 2 else (24, 20)
      save(noise(h, w, seed=i), os.path.join(inputs, f'ISIC_{i:07d}.jpg'),
           quality=95)
      save(lesion_mask(h, w), os.path.join(truth,
                                           f'ISIC_{i:07d}_segmentation.png'))
      i += 1
  return str(root)


def make_manifest_folder(root, num_patients=10, per_patient=2, splits=None):
  """A `folder` data set with a CSV manifest of several images per patient.

  Even patients have RGB JPEGs, odd ones grayscale PNGs; masks are 0/255.

  Args:
    root: the data folder.
    num_patients, per_patient: records = num_patients * per_patient.
    splits: optional {patient index: split name} for a `split` column.

  Returns:
    (root, rows): rows as written (image, mask, patient_id[, split]).
  """
  rows = []
  for p in range(num_patients):
    for k in range(per_patient):
      stem = f'p{p:02d}_img{k}'
      gray = p % 2 == 1
      image = os.path.join('scans', f'{stem}.png' if gray else f'{stem}.jpg')
      mask = os.path.join('labels', f'{stem}_seg.png')
      save(noise(20, 20, c=1 if gray else 3, seed=10 * p + k),
           os.path.join(root, image))
      save(lesion_mask(20, 20), os.path.join(root, mask))
      row = [image, mask, f'patient{p:02d}']
      if splits is not None:
        row.append(splits[p])
      rows.append(row)
  header = ['image', 'mask', 'patient_id'] + (['split'] if splits else [])
  write_csv(os.path.join(root, 'manifest.csv'), header, rows)
  return str(root), rows


def oblique_affine():
  """A rotated, translated affine with voxel sizes NIFTI_SPACING_DHW."""
  rot = Rotation.from_euler('xyz', [12, -8, 25], degrees=True).as_matrix()
  affine = np.eye(4)
  affine[:3, :3] = rot @ np.diag(NIFTI_SPACING_DHW[::-1])  # x, y, z.
  affine[:3, 3] = (-30.0, 12.5, 4.0)
  return affine


def make_msd(root, n=5, channels=2):
  """An MSD task: 4D `channels`-channel images, labels 0/1/2, dataset.json."""
  d, h, w = NIFTI_DHW
  affine = oblique_affine()
  os.makedirs(os.path.join(root, 'imagesTr'))
  os.makedirs(os.path.join(root, 'labelsTr'))
  for i in range(n):
    rng = np.random.default_rng(i)
    label = np.zeros((w, h, d), np.uint8)  # NIfTI axes are (x, y, z).
    label[4:14, 5:15, 2:8] = 1
    label[7:11, 8:12, 3 + i % 2:6] = 2
    image = rng.normal(0, 1, (w, h, d, channels)).astype(np.float32)
    image += label[..., None] * np.arange(1, channels + 1, dtype=np.float32)
    name = f'case_{i:03d}.nii.gz'
    nib.save(nib.Nifti1Image(100 + 20 * image, affine),
             os.path.join(root, 'imagesTr', name))
    nib.save(nib.Nifti1Image(label, affine),
             os.path.join(root, 'labelsTr', name))
  meta = dict(name='TinyTask', modality={str(c): f'mr{c}' for c in
                                         range(channels)},
              labels={'0': 'background', '1': 'oedema', '2': 'core'},
              numTraining=n, test=[],
              training=[dict(image=f'./imagesTr/case_{i:03d}.nii.gz',
                             label=f'./labelsTr/case_{i:03d}.nii.gz')
                        for i in range(n)])
  with open(os.path.join(root, 'dataset.json'), 'w') as f:
    json.dump(meta, f)
  return str(root)


def make_broken_folder(root):
  """images/ + masks/ (same names): 6 good pairs and one of each problem."""
  images, masks = os.path.join(root, 'images'), os.path.join(root, 'masks')
  for i in range(6):
    save(noise(20, 24, seed=i), os.path.join(images, f'good{i}.png'))
    save(lesion_mask(20, 24), os.path.join(masks, f'good{i}.png'))
  save(noise(20, 24, seed=10), os.path.join(images, 'nomask.png'))
  save(noise(20, 24, seed=11), os.path.join(images, 'wrongsize.png'))
  save(lesion_mask(30, 36), os.path.join(masks, 'wrongsize.png'))
  save(noise(20, 24, seed=12), os.path.join(images, 'badvalues.png'))
  save(lesion_mask(20, 24, value=7), os.path.join(masks, 'badvalues.png'))
  corrupt = save(noise(40, 48, seed=13), os.path.join(images, 'truncated.jpg'),
                 quality=95)
  save(lesion_mask(40, 48), os.path.join(masks, 'truncated.png'))
  with open(corrupt, 'rb') as f:
    data = f.read()
  with open(corrupt, 'wb') as f:
    f.write(data[:len(data) // 2])
  return str(root)


# Planted file -> words its line of the report must contain.
BROKEN = {
    'images/nomask.png': 'no mask',
    'masks/wrongsize.png': '36x30',
    'masks/badvalues.png': '[0, 7]',
    'images/truncated.jpg': 'truncated',
}


# -------------------------------------------------------------- 2D layouts


def test_isic2018_layout_trains_on_its_official_splits(tmp_path):
  root = make_isic(tmp_path / 'isic')
  before = tree_digest(root)
  workdir = tmp_path / 'run'
  # A seeded split would put round(8 * 0.4) = 3 images in val.
  proc = conftest.run_main(workdir, config_arg='configs/unet.py:cpu',
                           data__source='isic2018', data__root=root,
                           data__official_splits=True,
                           **dict(TINY_2D, data__val_fraction=0.4))
  assert '4/2/2 train/val/test cases' in proc.stdout
  config, val = assert_trained(workdir)
  assert config['data']['source'] == 'isic2018'
  assert config['model']['name'] == 'unet'
  assert val['num_cases'] == 2  # The Validation folder's two images.
  assert tree_digest(root) == before


def test_manifest_folder_trains(tmp_path):
  root, _ = make_manifest_folder(str(tmp_path / 'data'))
  before = tree_digest(root)
  workdir = tmp_path / 'run'
  conftest.run_main(workdir, config_arg='configs/unet.py:cpu',
                    data__source='folder', data__root=root,
                    data__folder__manifest='manifest.csv', **TINY_2D)
  _, val = assert_trained(workdir)
  # 10 patients: 2 in val, 2 images each (grayscale and RGB alike).
  assert val['num_cases'] == 4
  assert tree_digest(root) == before


def _manifest_config(root, **overrides):
  return data_config(source='folder', root=root, image_size=16,
                     folder__manifest='manifest.csv', val_fraction=0.2,
                     test_fraction=0.2, **overrides)


def _patients(data, split):
  return {data.source.patient_ids[i] for i in data.indices[split]}


def test_manifest_splits_are_by_patient_and_nested(tmp_path):
  root, _ = make_manifest_folder(str(tmp_path / 'data'), num_patients=10,
                                 per_patient=3)
  by_fraction = {}
  for fraction in (0.25, 0.5, 1.0):
    data = pipeline.build_splits(_manifest_config(root,
                                                  train_fraction=fraction))
    names = {s: _patients(data, s) for s in ('train', 'val', 'test')}
    assert not names['train'] & names['val']
    assert not names['train'] & names['test']
    assert not names['val'] & names['test']
    # Every image of a patient is in its patient's split.
    for split, idx in data.indices.items():
      assert len(idx) == 3 * len(names[split])
    by_fraction[fraction] = names
  full = by_fraction[1.0]
  assert (len(full['train']), len(full['val']), len(full['test'])) == (6, 2, 2)
  assert full['train'] | full['val'] | full['test'] == {
      f'patient{p:02d}' for p in range(10)}
  # ceil(6 * f) patients, nested, with val and test unchanged.
  assert len(by_fraction[0.25]['train']) == 2
  assert len(by_fraction[0.5]['train']) == 3
  assert (by_fraction[0.25]['train'] < by_fraction[0.5]['train'] <
          full['train'])
  for fraction in (0.25, 0.5):
    assert by_fraction[fraction]['val'] == full['val']
    assert by_fraction[fraction]['test'] == full['test']


def test_manifest_kfold_covers_every_non_test_patient_once(tmp_path):
  root, _ = make_manifest_folder(str(tmp_path / 'data'), num_patients=11)
  folds = [pipeline.build_splits(_manifest_config(root, num_folds=3, fold=k))
           for k in range(3)]
  tests = [_patients(d, 'test') for d in folds]
  assert tests[0] == tests[1] == tests[2] and len(tests[0]) == 2
  everyone = {f'patient{p:02d}' for p in range(11)}
  vals = [_patients(d, 'val') for d in folds]
  assert sorted(len(v) for v in vals) == [3, 3, 3]
  assert set().union(*vals) == everyone - tests[0]
  assert sum(len(v) for v in vals) == len(everyone - tests[0])  # Disjoint.
  for data, val in zip(folds, vals):
    train = _patients(data, 'train')
    assert train == everyone - tests[0] - val


def test_official_splits_from_the_manifest_column(tmp_path):
  splits = ['train'] * 5 + ['val', 'val', 'test', 'train', 'test']
  root, rows = make_manifest_folder(str(tmp_path / 'data'),
                                    splits=dict(enumerate(splits)))
  data = pipeline.build_splits(_manifest_config(root, official_splits=True))
  source = data.source
  # The seeded fractions are ignored: the column decides, image by image.
  want = {os.path.splitext(os.path.basename(r[0]))[0]: r[3] for r in rows}
  for split, idx in data.indices.items():
    assert sorted(source.case_ids[i] for i in idx) == sorted(
        c for c, s in want.items() if s == split)
  assert _patients(data, 'val') == {'patient05', 'patient06'}
  assert _patients(data, 'test') == {'patient07', 'patient09'}


def test_official_splits_reject_a_patient_in_two_splits(tmp_path):
  root, rows = make_manifest_folder(str(tmp_path / 'data'), num_patients=4,
                                    splits={0: 'train', 1: 'train', 2: 'val',
                                            3: 'test'})
  rows[1][3] = 'val'  # patient00's second image in val, its first in train.
  write_csv(os.path.join(root, 'manifest.csv'),
            ['image', 'mask', 'patient_id', 'split'], rows)
  with pytest.raises(ValueError, match="patient 'patient00'"):
    pipeline.build_splits(_manifest_config(root, official_splits=True))


# -------------------------------------------------------------- 3D layouts


def test_msd_nifti_trains_in_3d(tmp_path):
  root = make_msd(str(tmp_path / 'Task99_Tiny'))
  before = tree_digest(root)
  workdir = tmp_path / 'run'
  conftest.run_main(workdir, config_arg='configs/unet3d.py:cpu',
                    data__source='nifti', data__root=root,
                    data__num_classes=3, data__in_channels=2, **TINY_3D)
  config, val = assert_trained(workdir)
  assert config['data']['patch_size'] == [8, 16, 16]
  # What was trained on: (D, H, W, C) volumes with the affine's spacing.
  source = pipeline.build_splits(data_config(
      source='nifti', root=root, num_classes=3, in_channels=2,
      patch_size=(8, 16, 16))).source
  record = source[0]
  assert record['image'].shape == NIFTI_DHW + (2,)
  np.testing.assert_allclose(record['spacing'], NIFTI_SPACING_DHW, rtol=1e-5)
  assert set(np.unique(record['mask'])) == {0, 1, 2}
  assert val['num_cases'] == 1  # 5 cases: 1 val, 1 test, 3 train.
  assert tree_digest(root) == before


def slice_run_settings(root: str) -> dict:
  """run_main settings of a tiny 2D run on axial slices (one neighbour each
  side, 2 channels x 3 slices) of the make_msd volumes in `root`."""
  return dict(TINY_2D, config_arg='configs/unet.py:cpu', data__source='nifti',
              data__root=root, data__volume_mode='2d', data__slice_context=1,
              data__num_classes=3, data__in_channels=2 * 3,
              data__mean=(0.0,), data__std=(1.0,),
              data__image_size=NIFTI_DHW[1])


def test_msd_nifti_trains_on_2d_slices_with_context(tmp_path):
  root = make_msd(str(tmp_path / 'Task99_Tiny'))
  workdir = tmp_path / 'run'
  conftest.run_main(workdir, **slice_run_settings(root))
  _, val = assert_trained(workdir)
  assert val['num_cases'] == NIFTI_DHW[0]  # The val case's axial slices.
  # Evaluated per volume: the test case's slices predicted and restacked.
  proc = conftest.run_main_mode(workdir, 'evaluate')
  with open(os.path.join(workdir, 'eval', 'test', 'summary.json')) as f:
    summary = json.load(f)
  assert summary['num_cases'] == 1, proc.stdout
  with open(os.path.join(workdir, 'eval', 'test', 'cases.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [r['case_id'] for r in rows] == [rows[0]['case_id']] * 2  # 2 classes.
  assert ':z' not in rows[0]['case_id']
  # And a volume is predicted into its own geometry.
  image = sorted(glob.glob(os.path.join(root, 'imagesTr', '*.nii.gz')))[0]
  out = tmp_path / 'pred'
  conftest.run_main_mode(workdir, 'predict', f'--input={image}',
                         f'--output={out}')
  mask = nib.load(str(out / os.path.basename(image)))
  source = nib.load(image)
  assert mask.shape == source.shape[:3]
  np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)


def test_colour_jitter_keeps_z_scored_slices(tmp_path):
  # configs/unet.py jitters colours (color_prob=0.8); on z-scored NIfTI
  # slices it must not clip the intensities to [0, 1] (it used to).
  root = make_msd(str(tmp_path / 'Task99_Tiny'), n=3)
  cfg = data_config(source='nifti', root=root, volume_mode='2d',
                    slice_context=1, num_classes=3, in_channels=6,
                    image_size=NIFTI_DHW[1], mean=(0.0,), std=(1.0,),
                    val_fraction=0.0, test_fraction=0.0, worker_count=0,
                    augment__color_prob=1.0, augment__affine_prob=0.0)
  data = pipeline.build_splits(cfg)
  batch = next(iter(pipeline.train_dataset(data, cfg, global_batch=4,
                                           num_steps=1, seed=0)))
  image = batch['image']
  assert image.shape == (4, NIFTI_DHW[1], NIFTI_DHW[2], 6)
  # Jittered z-scores: about half negative, several beyond +-1.
  assert 0.3 < (image < 0).mean() < 0.7
  assert image.min() < -1 and image.max() > 1


def test_nifti_3d_without_patch_size_is_a_clear_error(tmp_path):
  root = make_msd(str(tmp_path / 'Task99_Tiny'), n=3)
  workdir = tmp_path / 'run'
  proc = conftest.run_main(workdir, check=False,
                           config_arg='configs/unet3d.py:cpu',
                           data__source='nifti', data__root=root,
                           data__num_classes=3, data__in_channels=2,
                           **dict(TINY_3D, data__patch_size=()))
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert 'config.data.patch_size' in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert_nothing_written(workdir)


def test_synthetic3d_cpu_config_trains(tmp_path):
  workdir = tmp_path / 'run'
  conftest.run_main(workdir, config_arg='configs/unet3d.py:cpu',
                    data__synthetic3d__num_patients=6,
                    data__synthetic3d__volume_size=(16, 32, 32),
                    **TINY_3D)
  config, val = assert_trained(workdir)
  assert config['data']['source'] == 'synthetic3d'
  assert val['num_cases'] == 1


# ------------------------------------------------------------ bad input


@pytest.fixture(scope='module')
def broken(tmp_path_factory):
  """A broken data folder, check_data and training run on it, and snapshots."""
  tmp = tmp_path_factory.mktemp('broken')
  root = make_broken_folder(str(tmp / 'data'))
  before = tree_digest(root)
  args = dict(config_arg='configs/unet.py:cpu', data__source='folder',
              data__root=root, **TINY_2D)
  check_proc = conftest.run_main(tmp / 'check', check=False,
                                 extra=('--mode=check_data',), **args)
  workdir = tmp / 'train'
  train_proc = conftest.run_main(workdir, check=False, **args)
  return dict(root=root, before=before, after=tree_digest(root),
              check=check_proc, train=train_proc, workdir=str(workdir))


def _assert_lists_every_problem(text):
  # main prefixes its error message (the report's first line) with 'error:'.
  lines = [line.strip().removeprefix('error:').strip()
           for line in text.splitlines()]
  for name, words in BROKEN.items():
    found = [line for line in lines if line.startswith(name + ':')]
    assert len(found) == 1, (name, text[-3000:])
    assert words in found[0], (name, found[0])
  assert f'{len(BROKEN)} problem(s) found' in text
  assert not any(line.startswith(('images/good', 'masks/good'))
                 for line in lines)


def test_check_data_lists_every_problem_at_once(broken):
  _assert_lists_every_problem(broken['check'].stdout)


def test_check_data_exits_non_zero_on_problems(broken):
  assert broken['check'].returncode != 0


def test_training_refuses_bad_data_before_training(broken):
  proc = broken['train']
  assert proc.returncode == 1, proc.stderr[-2000:]
  _assert_lists_every_problem(proc.stderr)
  assert 'Traceback' not in proc.stderr
  assert_nothing_written(broken['workdir'])


def test_bad_data_folder_is_never_written(broken):
  assert broken['after'] == broken['before']
  assert sorted(broken['before']) == sorted([
      'images', 'masks', *[f'images/good{i}.png' for i in range(6)],
      *[f'masks/good{i}.png' for i in range(6)], 'images/nomask.png',
      'images/wrongsize.png', 'masks/wrongsize.png', 'images/badvalues.png',
      'masks/badvalues.png', 'images/truncated.jpg', 'masks/truncated.png'])
