"""--plan_compare_nnunet: nnU-Net v2's planner on the same cases, side by side.

nnU-Net v2 (PyTorch) is not a dependency: it runs from its own venv,

    python3 -m venv /tmp/venv-nnunet && /tmp/venv-nnunet/bin/pip install nnunetv2

(or the venv `$NNUNET_VENV` names). The non-test cases that medseg_jax
fingerprinted are converted on the fly to nnU-Net's raw layout in a
temporary folder (one file per channel, `dataset.json` with channel_names
and labels); then its own `nnUNetv2_extract_fingerprint` and
`nnUNetv2_plan_experiment` (the two steps of `nnUNetv2_plan_and_preprocess`
before preprocessing) write `nnUNetPlans.json`, read back here. Both plans
use (D, H, W) order: nnU-Net reads NIfTI with SimpleITK as (z, y, x).
"""

import json
import os
import shutil
import subprocess
import tempfile

import nibabel as nib
import numpy as np

from medseg_jax.data import dataset_json
from medseg_jax.data import nifti_layout

DATASET_ID = 999
DEFAULT_VENV = '/tmp/venv-nnunet'


def nnunet_venv() -> str:
  """Returns the venv holding nnunetv2, or raises naming how to make one."""
  venv = os.environ.get('NNUNET_VENV', DEFAULT_VENV)
  tool = os.path.join(venv, 'bin', 'nnUNetv2_plan_experiment')
  if not os.path.exists(tool):
    raise FileNotFoundError(
        f'{tool} does not exist: --plan_compare_nnunet runs nnU-Net v2 from '
        f'its own venv; make one with `python3 -m venv {venv} && {venv}/bin/'
        'pip install nnunetv2`, or set $NNUNET_VENV.')
  return venv


def write_nnunet_raw(root: str, case_ids, folder: str) -> str:
  """Writes the cases `case_ids` of the NIfTI set at `root` as nnU-Net raw.

  Args:
    root: an MSD or nnU-Net v2 data folder.
    case_ids: the cases to convert (the planning cases).
    folder: nnUNet_raw; Dataset999_Plan/ is created in it.

  Returns:
    The dataset folder.
  """
  info = dataset_json.read_dataset_json(root)
  scan = nifti_layout.scan_dataset(os.path.abspath(root))
  out = os.path.join(folder, f'Dataset{DATASET_ID:03d}_Plan')
  os.makedirs(os.path.join(out, 'imagesTr'))
  os.makedirs(os.path.join(out, 'labelsTr'))
  wanted = set(case_ids)
  for case in scan.cases:
    if case.case_id not in wanted:
      continue
    channel = 0
    for path in case.images:
      image = nib.load(path)
      data = np.asanyarray(image.dataobj)
      parts = ([data[..., c] for c in range(data.shape[-1])]
               if data.ndim == 4 else [data])
      for part in parts:
        nib.save(nib.Nifti1Image(np.asarray(part, np.float32), image.affine),
                 os.path.join(out, 'imagesTr',
                              f'{case.case_id}_{channel:04d}.nii.gz'))
        channel += 1
    label = nib.load(case.label)
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj).astype(np.uint8),
                             label.affine),
             os.path.join(out, 'labelsTr', f'{case.case_id}.nii.gz'))
  meta = {'channel_names': {str(i): n for i, n in
                            enumerate(info.channel_names)},
          'labels': {n: i for i, n in enumerate(info.class_names)},
          'numTraining': len(wanted), 'file_ending': '.nii.gz'}
  with open(os.path.join(out, 'dataset.json'), 'w') as f:
    json.dump(meta, f, indent=1)
  return out


def run_nnunet_planner(raw: str, work: str, venv: str,
                       memory_gb: float) -> dict:
  """Runs nnU-Net v2's fingerprint and planner; returns nnUNetPlans.json."""
  env = dict(os.environ, nnUNet_raw=raw,
             nnUNet_preprocessed=os.path.join(work, 'preprocessed'),
             nnUNet_results=os.path.join(work, 'results'))
  env.pop('PYTHONPATH', None)  # Its own venv only.
  for command in (
      ['nnUNetv2_extract_fingerprint', '-d', str(DATASET_ID), '-np', '1'],
      ['nnUNetv2_plan_experiment', '-d', str(DATASET_ID),
       '-gpu_memory_target', f'{memory_gb:g}']):
    proc = subprocess.run([os.path.join(venv, 'bin', command[0]),
                           *command[1:]], env=env, capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode != 0:
      raise ValueError(f'{command[0]} failed ({proc.returncode}): '
                       + ' '.join(proc.stderr.split()[-60:]))
  path = os.path.join(work, 'preprocessed', f'Dataset{DATASET_ID:03d}_Plan',
                      'nnUNetPlans.json')
  with open(path) as f:
    return json.load(f)


def nnunet_summary(plans: dict) -> dict:
  """Returns {'3d'|'2d': {spacing, patch_size, batch_size, strides,
  normalization}} of an nnUNetPlans.json (3d = its 3d_fullres)."""
  out = {}
  for kind, name in (('3d', '3d_fullres'), ('2d', '2d')):
    conf = plans.get('configurations', {}).get(name)
    if not conf:
      continue
    arch = conf.get('architecture', {}).get('arch_kwargs', {})
    strides = arch.get('strides') or conf.get('pool_op_kernel_sizes') or []
    out[kind] = {'spacing': conf.get('spacing'),
                 'patch_size': conf.get('patch_size'),
                 'batch_size': conf.get('batch_size'),
                 'strides': [list(s) for s in strides[1:]],  # [0] is 1s.
                 'normalization': conf.get('normalization_schemes')}
  return out


def _levels(strides, axes: str) -> str:
  """'D from 3, H from 1, W from 1' (first level each axis is pooled)."""
  parts = []
  for a, name in enumerate(axes):
    first = next((i for i, row in enumerate(strides, 1) if row[a] > 1), None)
    parts.append(f'{name} {"from " + str(first) if first else "never"}'
                 f' ({sum(1 for row in strides if row[a] > 1)}x)')
  return ', '.join(parts)


def comparison_table(plan: dict, theirs: dict) -> str:
  """Returns a Markdown table of both plans (rows: what each decided)."""
  rows = [('target spacing (mm)', tuple(plan['target_spacing']),
           tuple(round(s, 4) for s in (theirs.get('3d') or theirs.get(
               '2d', {})).get('spacing', ())))]
  for kind in ('3d', '2d'):
    ours = plan['configurations'].get(kind) if kind in plan['chosen'] else None
    them = theirs.get(kind)
    if not ours and not them:
      continue
    axes = 'DHW' if kind == '3d' else 'HW'
    rows += [
        (f'{kind} patch', tuple(ours['patch_size']) if ours else 'not planned',
         tuple(them['patch_size']) if them else 'not planned'),
        (f'{kind} batch', ours['batch_size'] if ours else '-',
         them['batch_size'] if them else '-'),
        (f'{kind} pooling', _levels(ours['strides'], axes) if ours else '-',
         _levels(them['strides'], axes) if them else '-')]
  norm = plan['normalization']['intensity']
  if norm == 'ct':
    norm += f' window {tuple(plan["normalization"]["ct_window"])}'
  any_conf = theirs.get('3d') or theirs.get('2d') or {}
  rows.append(('normalisation', norm, ', '.join(
      any_conf.get('normalization') or [])))
  lines = ['| | medseg_jax | nnU-Net v2 |', '|---|---|---|']
  lines += [f'| {a} | {b} | {c} |' for a, b, c in rows]
  return '\n'.join(lines)


def compare(config, plan: dict, memory_gb: float = 8.0) -> str:
  """Runs nnU-Net v2's planner on the plan's non-test cases; returns the table.

  Args:
    config: the config that was planned (config.data.root).
    plan: `plan_config.run_plan`'s result (with its 'split').
    memory_gb: nnU-Net's -gpu_memory_target (its default is 8 GB).

  Raises:
    FileNotFoundError: no nnunetv2 venv (says how to make one).
    ValueError: nnU-Net's planner failed (its last error words).
  """
  venv = nnunet_venv()
  case_ids = plan['split']['train'] + plan['split']['val']
  work = tempfile.mkdtemp(prefix='medseg_nnunet_')
  try:
    raw = os.path.join(work, 'raw')
    write_nnunet_raw(config.data.root, case_ids, raw)
    theirs = nnunet_summary(run_nnunet_planner(raw, work, venv, memory_gb))
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return comparison_table(plan, theirs)
