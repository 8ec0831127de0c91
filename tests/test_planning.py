"""--mode=plan: fingerprint, nnU-Net's decisions, XLA memory search, configs."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from medseg_jax import config_lib
from medseg_jax import plan_config
from medseg_jax import plan_memory
from medseg_jax import planning
from medseg_jax.data import fingerprint
from tests import conftest

# (spacing (D, H, W) per case, shape (D, H, W), channel names, kind).
SETS = {
    'iso': dict(spacings=[(1.0, 1.0, 1.0)] * 6, shape=(16, 24, 24),
                channels=('T1',)),
    # 0.7 x 0.7 x ~5 mm, few slices: the low-resolution-axis rule applies.
    'aniso': dict(spacings=[(4.0, .7, .7), (4.5, .7, .7), (5.0, .7, .7),
                            (5.0, .7, .7), (5.5, .7, .7), (6.0, .7, .7)],
                  shape=(10, 48, 48), channels=('T2',)),
    'ct': dict(spacings=[(2.0, 1.0, 1.0)] * 6, shape=(12, 24, 24),
               channels=('CT',)),
    'mr2': dict(spacings=[(1.0, 1.0, 1.0)] * 6, shape=(12, 16, 16),
                channels=('T1', 'T2')),
}


def _affine(spacing_dhw):
  return np.diag([spacing_dhw[2], spacing_dhw[1], spacing_dhw[0], 1.0])


def _case(i, shape, channels):
  """(image [D, H, W, C], label [D, H, W]) of case i: a ball with a core."""
  rng = np.random.default_rng(i)
  d, h, w = shape
  z, y, x = np.meshgrid(*[np.arange(n) - n / 2 + 0.5 for n in shape],
                        indexing='ij')
  r = np.sqrt((z / (d / 2)) ** 2 + (y / (h / 2)) ** 2 + (x / (w / 2)) ** 2)
  label = np.where(r < 0.6, 1, 0) + np.where(r < 0.3, 1, 0)
  images = []
  for name in channels:
    if name == 'CT':  # Air, soft tissue (~40 HU), an enhancing lesion.
      image = np.full(shape, -1000.0) + rng.normal(0, 5, shape)
      image[r < 0.9] = 40 + rng.normal(0, 10, (r < 0.9).sum())
      image[label == 2] = 120 + rng.normal(0, 10, (label == 2).sum())
    else:
      image = 300 + 100 * label + rng.normal(0, 20, shape)
    images.append(image.astype(np.float32))
  return np.stack(images, -1), label.astype(np.uint8)


def write_msd(root, kind, n=None):
  """Writes data set `kind` of SETS in the MSD layout under `root`."""
  spec = SETS[kind]
  os.makedirs(os.path.join(root, 'imagesTr'))
  os.makedirs(os.path.join(root, 'labelsTr'))
  spacings = spec['spacings'][:n] if n else spec['spacings']
  for i, spacing in enumerate(spacings):
    image, label = _case(i, spec['shape'], spec['channels'])
    name = f'case_{i:03d}.nii.gz'
    # NIfTI axes are (x, y, z): reverse (D, H, W).
    image = np.transpose(image, (2, 1, 0, 3))
    if image.shape[-1] == 1:
      image = image[..., 0]
    nib.save(nib.Nifti1Image(image, _affine(spacing)),
             os.path.join(root, 'imagesTr', name))
    nib.save(nib.Nifti1Image(label.transpose(2, 1, 0), _affine(spacing)),
             os.path.join(root, 'labelsTr', name))
  meta = dict(name=f'Tiny_{kind}',
              modality={str(c): m for c, m in enumerate(spec['channels'])},
              labels={'0': 'background', '1': 'organ', '2': 'lesion'},
              numTraining=len(spacings))
  with open(os.path.join(root, 'dataset.json'), 'w') as f:
    json.dump(meta, f)
  return str(root)


def base_config(root, **overrides):
  """configs/unet3d.py:cpu on the NIfTI set at root, nothing data-specific."""
  sys.path.insert(0, conftest.REPO)
  from configs import unet3d  # pylint: disable=import-outside-toplevel
  config = unet3d.get_config('cpu')
  config.data.source, config.data.root = 'nifti', root
  config.data.in_channels = 3  # configs/default.py's: filled from the data.
  config.data.num_classes = 1
  config.data.cache = 'none'
  return conftest.set_fields(config, overrides)


@pytest.fixture(scope='session')
def data_sets(tmp_path_factory):
  root = tmp_path_factory.mktemp('plan_sets')
  return {kind: write_msd(str(root / kind), kind) for kind in SETS}


def fake_measure(spatial, batch, features, strides):
  """Bytes ~ activations: a stand-in for XLA's figure in pure-logic tests."""
  del strides
  return int(1000 + 40 * batch * np.prod(spatial) * features[0])


def test_isotropic_spacing_is_the_median_and_pools_every_axis(data_sets):
  cfg = config_lib.fill_from_data(base_config(data_sets['iso']))
  fp = fingerprint.compute_fingerprint(cfg.data)
  assert fp['median_spacing'] == [1.0, 1.0, 1.0] and fp['anisotropy'] == 1.0
  spacing, reason = planning.target_spacing(fp)
  assert spacing == [1.0, 1.0, 1.0] and 'median' in reason
  assert planning.pooling((16, 24, 24), spacing, 4) == [(2, 2, 2)] * 2


def test_anisotropic_set_takes_the_10th_percentile_and_pools_z_late(
    data_sets):
  cfg = config_lib.fill_from_data(base_config(data_sets['aniso']))
  fp = fingerprint.compute_fingerprint(cfg.data)
  spacings = [c['spacing'][0] for c in fp['cases']]
  assert len(spacings) < 6  # The test case is not fingerprinted.
  assert fp['anisotropy'] > 3
  spacing, reason = planning.target_spacing(fp)
  assert spacing[0] == pytest.approx(np.percentile(spacings, 10), abs=1e-6)
  assert spacing[0] < np.median(spacings)
  assert spacing[1:] == pytest.approx([0.7, 0.7])
  assert '10th percentile' in reason
  # z (~12 slices at 4.2 mm) waits until H and W reach 2.8 mm (level 3).
  median = planning.resampled_median_shape(fp, spacing)
  strides = planning.pooling(median, spacing, 4)
  assert [row[0] for row in strides] == [1, 1, 2]
  assert [row[1] for row in strides] == [2, 2, 2]
  # Spacing (2, 1, 1): z waits one level, then pools with the others.
  assert planning.pooling((32, 32, 32), (2.0, 1.0, 1.0), 4) == [
      (1, 2, 2), (2, 2, 2), (2, 2, 2)]
  plan = planning.make_plan(fp, (8, 16, 32, 64), fake_measure, 10**9)
  assert plan['chosen'] == ['3d', '2d']  # 2D too: anisotropy > 3.


def test_ct_set_gets_ct_window_from_foreground_percentiles(data_sets):
  cfg = config_lib.fill_from_data(base_config(data_sets['ct']))
  assert cfg.data.preprocess.intensity == 'ct'
  fp = fingerprint.compute_fingerprint(cfg.data)
  # By hand: every foreground voxel of the fingerprinted cases (fewer than
  # SAMPLES_PER_CASE each, so all of them).
  values = []
  for case in fp['cases']:
    i = int(case['case_id'].split('_')[1])
    image, label = _case(i, SETS['ct']['shape'], ('CT',))
    values.append(image[label > 0, 0])
  lo, hi = np.percentile(np.concatenate(values), [0.5, 99.5])
  norm = planning.normalization(fp)
  assert norm['intensity'] == 'ct'
  assert norm['ct_window'] == pytest.approx([lo, hi], abs=1e-2)
  assert -50 < lo < 40 < 120 < hi < 200  # Soft tissue and lesion, no air.


def test_two_channel_mr_gets_zscore(data_sets):
  cfg = config_lib.fill_from_data(base_config(data_sets['mr2']))
  assert cfg.data.in_channels == 2 and cfg.data.num_classes == 3
  fp = fingerprint.compute_fingerprint(cfg.data)
  assert [c['name'] for c in fp['channels']] == ['T1', 'T2']
  assert planning.normalization(fp)['intensity'] == 'zscore'
  assert fp['classes'][2]['frequency'] > 0
  assert fp['classes'][2]['smallest_object_voxels'] > 0


def test_plans_are_deterministic(data_sets):
  cfg = config_lib.fill_from_data(base_config(data_sets['mr2']))
  plans = [json.dumps(planning.make_plan(
      fingerprint.compute_fingerprint(cfg.data), (8, 16, 32), fake_measure,
      3 * 10**6)) for _ in range(2)]
  assert plans[0] == plans[1]


def test_memory_search_on_cpu_follows_the_budget(data_sets):
  # Real compiles of the train step (memory_analysis on CPU).
  cfg = config_lib.fill_from_data(base_config(
      data_sets['mr2'], model__features=(4, 8)))
  measure = plan_memory.step_memory_fn(cfg)
  large = measure((12, 16, 16), 2, (4, 8), ((2, 2, 2),))
  median, spacing = (12, 16, 16), (1.0, 1.0, 1.0)
  # A tight budget (and a data set small enough for batch 2): a smaller
  # patch; a roomy one: the whole median shape and a larger batch.
  tight = planning.plan_patch_and_batch(median, spacing, measure, large - 1,
                                        (4, 8), 1e4)
  roomy = planning.plan_patch_and_batch(median, spacing, measure, 4 * large,
                                        (4, 8), 1e6)
  assert np.prod(tight['patch_size']) < np.prod(roomy['patch_size'])
  assert roomy['patch_size'] == [12, 16, 16]
  assert roomy['batch_size'] > 2 and tight['batch_size'] == 2
  assert tight['memory_bytes'] <= large - 1 < roomy['memory_bytes']
  assert roomy['memory_bytes'] <= 4 * large
  # Every candidate is a compile; nothing fits 1000 bytes: one clear error.
  with pytest.raises(ValueError, match='plan_memory_gb'):
    planning.plan_patch_and_batch(median, spacing, fake_measure, 1000, (4, 8),
                                  1e6)


def test_contradiction_is_refused_before_anything_is_written(data_sets,
                                                             tmp_path):
  workdir = tmp_path / 'plan'
  with pytest.raises(ValueError, match=r'num_classes=5 contradicts .*'
                     r'dataset\.json.*3 labels'):
    plan_config.run_plan(base_config(data_sets['iso'], data__num_classes=5),
                         str(workdir), 'configs/unet3d.py:cpu')
  assert not workdir.exists()


# ------------------------------------------------- through main, end to end


@pytest.fixture(scope='session')
def planned(data_sets, tmp_path_factory):
  """`--mode=plan` on the anisotropic set (3D and 2D chosen), tiny budget."""
  workdir = tmp_path_factory.mktemp('plan') / 'aniso'
  proc = conftest.run_main_mode(
      workdir, 'plan', '--config=configs/unet3d.py:cpu',
      '--config.data.source=nifti', f'--config.data.root={data_sets["aniso"]}',
      '--config.model.features=(4,8,16)', '--plan_memory_gb=0.01')
  return workdir, proc.stdout


def _load(path):
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location('planned_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_plan_mode_writes_explained_configs(planned):
  workdir, stdout = planned
  with open(workdir / 'plan.json') as f:
    plan = json.load(f)
  with open(workdir / 'fingerprint.json') as f:
    fp = json.load(f)
  assert plan['chosen'] == ['3d', '2d'] and 'anisotropy' in stdout
  assert plan['memory_budget_bytes'] == int(0.01 * 2**30)
  found = plan['configurations']['3d']
  assert found['memory_bytes'] <= plan['memory_budget_bytes']
  # z is pooled last (its spacing catches up only at the deepest level).
  assert [row[0] for row in found['strides']] == [1, 1]
  assert fp['num_cases'] == len(plan['split']['train'] + plan['split']['val'])
  text = (workdir / 'config_3d.py').read_text()
  assert '10th percentile' in text and 'D never pooled' in text
  assert f'--config={workdir / "config_3d.py"}' in text
  config = _load(workdir / 'config_3d.py').get_config()
  assert config.data.in_channels == 1 and config.data.num_classes == 3
  assert tuple(config.data.patch_size) == tuple(found['patch_size'])
  assert tuple(config.data.preprocess.target_spacing) == pytest.approx(
      plan['target_spacing'])


def test_both_configs_share_one_patient_split(planned):
  from medseg_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  workdir, _ = planned
  patients = {}
  for kind in ('3d', '2d'):
    config = _load(workdir / f'config_{kind}.py').get_config()
    data = pipeline.build_splits(config.data)
    patients[kind] = {
        split: sorted({data.source.patient_ids[int(i)]
                       for i in data.indices[split]})
        for split in ('train', 'val', 'test')}
  assert patients['3d'] == patients['2d']
  assert patients['3d']['test']


def test_planned_config_trains_without_data_overrides(planned, tmp_path):
  workdir, _ = planned
  run = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, '-m', 'medseg_jax.main',
       f'--config={workdir / "config_3d.py"}', f'--workdir={run}',
       '--config.train.num_steps=2', '--config.train.eval_every_epochs=100',
       '--config.train.progress_bar=False', '--config.train.tensorboard=False'],
      cwd=conftest.REPO, env=conftest.subprocess_env(1), capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(run / 'config.json') as f:
    saved = json.load(f)
  assert saved['data']['source'] == 'nifti'
  assert saved['model']['features'] == [4, 8, 16]


def test_plan_mode_refuses_a_contradiction_in_one_line(data_sets, tmp_path):
  workdir = tmp_path / 'plan'
  proc = conftest.run_main_mode(
      workdir, 'plan', '--config=configs/unet3d.py:cpu',
      '--config.data.source=nifti', f'--config.data.root={data_sets["iso"]}',
      '--config.data.in_channels=4', check=False)
  assert proc.returncode == 1
  error = proc.stderr.strip().splitlines()
  assert len(error) == 1 and error[0].startswith('error: ')
  assert 'in_channels=4' in error[0] and '1 channel(s)' in error[0]
  assert not workdir.exists()


def test_nnunet_comparison_converts_cases_and_reads_its_plans(data_sets,
                                                             tmp_path):
  from medseg_jax import plan_nnunet  # pylint: disable=import-outside-toplevel
  out = plan_nnunet.write_nnunet_raw(data_sets['mr2'], ['case_001'],
                                     str(tmp_path))
  assert sorted(os.listdir(os.path.join(out, 'imagesTr'))) == [
      'case_001_0000.nii.gz', 'case_001_0001.nii.gz']  # One file a channel.
  t2 = nib.load(os.path.join(out, 'imagesTr', 'case_001_0001.nii.gz'))
  image, _ = _case(1, SETS['mr2']['shape'], ('T1', 'T2'))
  np.testing.assert_allclose(np.asarray(t2.dataobj).transpose(2, 1, 0),
                             image[..., 1], rtol=1e-6)
  with open(os.path.join(out, 'dataset.json')) as f:
    meta = json.load(f)
  assert meta['labels'] == {'background': 0, 'organ': 1, 'lesion': 2}
  theirs = plan_nnunet.nnunet_summary({'configurations': {'3d_fullres': {
      'spacing': [4.2, 0.7, 0.7], 'patch_size': [20, 96, 96], 'batch_size': 2,
      'normalization_schemes': ['ZScoreNormalization'],
      'architecture': {'arch_kwargs': {'strides': [
          [1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2]]}}}}})
  assert theirs['3d']['strides'] == [[1, 2, 2], [1, 2, 2], [2, 2, 2]]
  plan = {'target_spacing': [4.2, 0.7, 0.7], 'chosen': ['3d'],
          'normalization': {'intensity': 'zscore'},
          'configurations': {'3d': {'patch_size': [12, 96, 96],
                                    'batch_size': 2,
                                    'strides': [[1, 2, 2], [2, 2, 2]]}}}
  table = plan_nnunet.comparison_table(plan, theirs)
  assert '| 3d patch | (12, 96, 96) | (20, 96, 96) |' in table
  assert '| 3d pooling | D from 2 (1x), H from 1 (2x), W from 1 (2x) | ' \
      'D from 3 (1x), H from 1 (3x), W from 1 (3x) |' in table
