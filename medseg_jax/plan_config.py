"""--mode=plan end to end: fingerprint.json, plan.json, config_3d.py, config_2d.py.

    python -m medseg_jax.main --mode=plan --config=configs/unet3d.py:cpu \
        --config.data.source=nifti --config.data.root=/data/Task04 \
        --workdir=plans/task04

1. The config is filled from dataset.json (`config_lib.fill_from_data`;
   contradictions refused before anything is written) and the data set is
   checked (`check.assert_dataset_ok`).
2. The fingerprint of the non-test cases -> WORKDIR/fingerprint.json.
3. The plan (`planning.make_plan`, memory from `plan_memory`) ->
   WORKDIR/plan.json, with the patient split it fixes.
4. One config file per chosen configuration, WORKDIR/config_3d.py and
   WORKDIR/config_2d.py: the base config's values, then the plan's, with a
   docstring that explains each decision and gives the commands. Both keep
   the base config's split keys, so they train, validate and test on the
   same patients.
"""

import json
import os

from medseg_jax import config_lib
from medseg_jax import fileio
from medseg_jax import plan_memory
from medseg_jax import planning
from medseg_jax.data import check
from medseg_jax.data import fingerprint as fingerprint_lib
from medseg_jax.data import splits


def plan_split(data_cfg) -> dict:
  """Returns {'train'|'val'|'test': [case ids]} of the config's patient split."""
  source = fingerprint_lib.raw_source(data_cfg)
  parts = splits.split_for_config(source.patient_ids, data_cfg)
  ids = source.case_ids
  return {name: [ids[int(i)] for i in parts[name]] for name in splits.SPLITS}


def planned_values(plan: dict, kind: str, config) -> dict:
  """Returns the {dotted key: value} a configuration sets over its base.

  Args:
    plan: `planning.make_plan`'s result.
    kind: '3d' or '2d'.
    config: the filled base config (channels, classes, split keys).
  """
  found = plan['configurations'][kind]
  norm = plan['normalization']
  data = config.data
  values = {
      'data.source': 'nifti', 'data.root': os.path.abspath(data.root),
      'data.num_classes': int(data.num_classes),
      'data.in_channels': int(config_lib.volume_channels(config)),
      'data.volume_mode': kind, 'data.slice_context': 0,
      'data.patch_size': tuple(found['patch_size']),
      'data.mean': (0.0,), 'data.std': (1.0,),
      'data.preprocess.intensity': norm['intensity'],
      'data.preprocess.target_spacing': tuple(plan['target_spacing']),
      'data.augment.rotate_axes': (1, 2) if kind == '3d' else (0, 1),
      'data.augment.color_prob': 0.0,
      # One patient split for both configurations (written out, not implied).
      'data.split_seed': int(data.split_seed),
      'data.val_fraction': float(data.val_fraction),
      'data.test_fraction': float(data.test_fraction),
      'model.name': 'unet', 'model.norm': 'instance',
      'model.features': tuple(found['features']),
      'train.batch_size': int(found['batch_size']),
      'eval.batch_size': int(found['batch_size']),
      'model.strides': tuple(tuple(r) for r in found['strides']),
      'train.steps_per_epoch': int(plan['steps_per_epoch']),
  }
  if norm['intensity'] == 'ct':
    values['data.preprocess.ct_window'] = tuple(norm['ct_window'])
  return values


def _docstring(plan, fp, kind, base_name, path, other) -> str:
  found = plan['configurations'][kind]
  run = os.path.join('runs', os.path.basename(os.path.dirname(path)) +
                     f'_{kind}')
  lines = [
      f'Planned {kind.upper()} configuration for {fp["root"]} '
      '(medseg_jax --mode=plan).', '',
      'Train, then evaluate on the test split:', '',
      f'    python -m medseg_jax.main --config={path} --workdir={run}',
      f'    python -m medseg_jax.main --mode=evaluate --workdir={run}', '',
      f'Decisions, from fingerprint.json ({fp["num_cases"]} non-test cases, '
      f'median shape {tuple(int(s) for s in fp["median_shape"])}, anisotropy '
      f'{fp["anisotropy"]:.2f}):', '',
      f'- target spacing {tuple(plan["target_spacing"])} mm: '
      f'{plan["target_spacing_reason"]}.',
      f'- normalisation {plan["normalization"]["intensity"]}: '
      f'{plan["normalization"]["reason"]}.',
      f'- configurations {plan["chosen"]}: {plan["chosen_reason"]}.',
  ]
  lines += [f'- {reason}.' for reason in found['reasons']]
  spe = f'; an epoch is {plan["steps_per_epoch"]} steps (nnU-Net)'
  both = (f' (the same split keys as {other}, so their test figures '
          'compare the same cases)' if len(plan['chosen']) > 1 else '')
  lines += [
      f'- split: the patients of plan.json{both}{spe}.',
      f'- everything else (optimiser, loss, augmentation, schedule): '
      f'{base_name}.']
  return '\n'.join(lines)


def config_file_text(plan, fp, kind, config, base_name, path) -> str:
  """Returns the text of a generated config file (docstring + values)."""
  other = 'config_2d.py' if kind == '3d' else 'config_3d.py'
  base = config_lib.differences(config)
  planned = planned_values(plan, kind, config)
  # The generators' keys mean nothing for a NIfTI set.
  base = {k: v for k, v in base.items() if k not in planned and not
          k.startswith(('data.synthetic', 'data.folder', 'data.isic'))}

  def block(values):
    return '\n'.join(f'    {k!r}: {v!r},' for k, v in sorted(values.items()))

  doc = _docstring(plan, fp, kind, base_name, path, other)
  return (f'r"""{doc}\n"""\n\nfrom medseg_jax import config_lib\n\n'
          f'# {base_name}: its values that differ from configs/default.py.\n'
          f'BASE = {{\n{block(base)}\n}}\n\n'
          '# The plan (plan.json); see the docstring for why.\n'
          f'PLANNED = {{\n{block(planned)}\n}}\n\n\n'
          'def get_config(arg=None):\n'
          '  """Returns configs/default.py, then BASE, then PLANNED."""\n'
          '  del arg\n'
          '  return config_lib.from_dotted(BASE, PLANNED)\n')


def _budget(memory_gb: float | None) -> tuple[int, str]:
  if memory_gb is not None:
    return int(memory_gb * 2**30), f'--plan_memory_gb={memory_gb:g}'
  return plan_memory.default_budget_bytes()


def format_plan(plan: dict) -> str:
  """Returns the plan as the lines `--mode=plan` prints."""
  lines = [f'target spacing {tuple(plan["target_spacing"])} mm: '
           f'{plan["target_spacing_reason"]}',
           f'normalisation {plan["normalization"]["intensity"]}: '
           f'{plan["normalization"]["reason"]}',
           f'configurations {plan["chosen"]}: {plan["chosen_reason"]}']
  for kind in plan['chosen']:
    found = plan['configurations'][kind]
    lines.append(f'{kind}: patch {tuple(found["patch_size"])}, batch '
                 f'{found["batch_size"]}, widths {tuple(found["features"])}, '
                 f'strides {[tuple(r) for r in found["strides"]]}, '
                 f'{found["memory_bytes"] / 2**20:.1f} MiB')
  return '\n'.join(lines)


def run_plan(config, workdir: str, base_name: str,
             memory_gb: float | None = None, explicit=None) -> dict:
  """Fingerprints, plans and writes the config files of `--mode=plan`.

  Args:
    config: the base config (a `nifti` data set).
    workdir: the plan folder (created).
    base_name: how the docstrings name the base config (its --config).
    memory_gb: the budget of one train step; None/0 = the device's.
    explicit: the command line's keys when they alone bind (see
      `config_lib.fill_from_data`); None otherwise.

  Returns:
    The plan (also in WORKDIR/plan.json).

  Raises:
    ValueError: a config that contradicts dataset.json, a data set with
      problems, or a budget nothing fits in; raised before anything is
      written.
  """
  if memory_gb is not None and not memory_gb > 0:
    raise ValueError(f'--plan_memory_gb={memory_gb} must be > 0 (GiB), or '
                     "left out for the present device's memory.")
  config = config_lib.fill_from_data(config, explicit=explicit)
  if config.data.source != 'nifti':
    raise ValueError(f"--mode=plan needs config.data.source='nifti' (got "
                     f'{config.data.source!r}) and config.data.root.')
  # Both configurations train on the volumes' own channels (no slice
  # context, as nnU-Net's 2D); the memory search measures them so.
  channels = config_lib.volume_channels(config)
  config.data.volume_mode, config.data.slice_context = '3d', 0
  config.data.in_channels = channels
  if config.data.check:
    check.assert_dataset_ok(config.data)
  budget, budget_from = _budget(memory_gb)
  fp = fingerprint_lib.compute_fingerprint(config.data)
  plan = planning.make_plan(fp, tuple(config.model.features),
                            plan_memory.step_memory_fn(config), budget)
  plan['memory_budget_from'] = budget_from
  plan['base_config'] = base_name
  plan['split'] = plan_split(config.data)
  os.makedirs(workdir, exist_ok=True)
  fileio.write_text(os.path.join(workdir, 'fingerprint.json'),
                    json.dumps(fp, indent=1) + '\n')
  fileio.write_text(os.path.join(workdir, 'plan.json'),
                    json.dumps(plan, indent=1) + '\n')
  for kind in plan['chosen']:
    path = os.path.join(workdir, f'config_{kind}.py')
    fileio.write_text(path, config_file_text(plan, fp, kind, config,
                                             base_name, path))
  return plan
