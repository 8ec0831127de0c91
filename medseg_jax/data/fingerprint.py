"""A NIfTI data set's fingerprint: what planning decides from (nnU-Net's idea).

    fp = compute_fingerprint(config.data)   # a JSON-ready dict
    fp['median_spacing'], fp['anisotropy'], fp['channels'][0]['p99_5']

Per case: shape and spacing (native, before any resampling). Per channel:
intensity mean, std, median and 0.5/99.5 percentiles inside the foreground
(label > 0), from up to `SAMPLES_PER_CASE` foreground voxels per case drawn
with a seeded generator (nnU-Net samples 10,000 the same way), so the result
is deterministic. Per class: voxel frequency, and the smallest connected
object (voxels and mm^3). Then the medians, the 10th-percentile spacing and
the anisotropy (largest over smallest median spacing).

Only the training and validation cases of the config's patient split are
read: the test cases stay unseen. Cases are decoded through the source's case
cache (`config.data.cache`), with intensities as stored (no normalisation,
native grid). Imports no JAX.
"""

import numpy as np
from scipy import ndimage

from medseg_jax.data import dataset_json
from medseg_jax.data import splits
from medseg_jax.data import volume_sources

SAMPLES_PER_CASE = 10_000
FINGERPRINT_VERSION = 1


def raw_source(data_cfg) -> volume_sources.NiftiSource:
  """Returns the config's NIfTI cases with stored intensities, native grid.

  Args:
    data_cfg: config.data of a `nifti` data set.

  Raises:
    ValueError: not a `nifti` source, or the data set's layout problems.
  """
  if data_cfg.source != 'nifti' or not data_cfg.root:
    raise ValueError(
        f"planning reads a NIfTI data set: config.data.source='nifti' with "
        f'config.data.root set (got source={data_cfg.source!r}, root='
        f'{data_cfg.root!r}).')
  return volume_sources.NiftiSource(
      data_cfg.root, num_classes=int(data_cfg.num_classes),
      preprocess_cfg={'intensity': 'none', 'target_spacing': ()},
      label_values=tuple(data_cfg.label_values), cache=data_cfg.cache,
      cache_dir=data_cfg.cache_dir,
      patients_csv=volume_sources.nifti_options(data_cfg).get(
          'patients_csv', ''))


def planning_cases(source, data_cfg) -> list[int]:
  """Returns the record indices of the train and val splits (not test)."""
  parts = splits.split_for_config(source.patient_ids, data_cfg)
  return sorted(int(i) for i in np.concatenate([parts['train'],
                                                parts['val']]))


def _smallest_objects(mask: np.ndarray, num_labels: int) -> list:
  """Returns the smallest connected object per class 1..K-1 (None if absent)."""
  out = []
  for c in range(1, num_labels):
    components, n = ndimage.label(mask == c)
    if n == 0:
      out.append(None)
      continue
    sizes = np.bincount(components.ravel())[1:]
    out.append(int(sizes.min()))
  return out


def _channel_stats(values: np.ndarray) -> dict:
  """Returns mean, std, median, 0.5/99.5 percentiles, min, max of values."""
  values = np.asarray(values, np.float64)
  lo, median, hi = np.percentile(values, [0.5, 50.0, 99.5])
  return {'mean': float(values.mean()), 'std': float(values.std()),
          'median': float(median), 'p00_5': float(lo), 'p99_5': float(hi),
          'min': float(values.min()), 'max': float(values.max())}


def _case_fingerprint(image, mask, index: int, num_labels: int) -> dict:
  """Returns one case's counts, smallest objects and foreground samples."""
  fg = mask > 0
  use = fg if fg.any() else np.ones_like(fg)  # Empty label: whole volume.
  voxels = image[use]  # [N, C]
  rng = np.random.default_rng(index)
  if len(voxels) > SAMPLES_PER_CASE:
    voxels = voxels[np.sort(rng.choice(len(voxels), SAMPLES_PER_CASE,
                                       replace=False))]
  return {'counts': np.bincount(mask.ravel(), minlength=num_labels)[
              :num_labels].astype(np.int64),
          'smallest': _smallest_objects(mask, num_labels),
          'samples': voxels}


def _min_or_none(values):
  values = [v for v in values if v is not None]
  return min(values) if values else None


def compute_fingerprint(data_cfg) -> dict:
  """Computes the fingerprint of a NIfTI data set's non-test cases.

  Args:
    data_cfg: config.data (`nifti` source; root, split keys, cache).

  Returns:
    A JSON-ready dict: cases [{case_id, shape, spacing}], channels [{name,
    normalization, mean, std, median, p00_5, p99_5, min, max}], classes
    [{name, frequency, smallest_object_voxels, smallest_object_mm3}],
    median_shape, median_spacing, spacing_p10, anisotropy, and the totals.

  Raises:
    ValueError: not a NIfTI data set, or its layout problems.
  """
  info = dataset_json.read_dataset_json(data_cfg.root)
  source = raw_source(data_cfg)
  num_labels = len(info.class_names)
  cases, counts, samples, smallest_vox, smallest_mm3 = [], 0, [], [], []
  for index in planning_cases(source, data_cfg):
    image, mask, spacing = source.load(index)
    one = _case_fingerprint(image, mask, index, num_labels)
    cases.append({'case_id': source.case_ids[index],
                  'shape': [int(s) for s in mask.shape],
                  'spacing': [round(float(s), 6) for s in spacing]})
    counts = counts + one['counts']
    samples.append(one['samples'])
    voxel_mm3 = float(np.prod(spacing))
    smallest_vox.append(one['smallest'])
    smallest_mm3.append([None if v is None else v * voxel_mm3
                         for v in one['smallest']])
  if not cases:
    raise ValueError(f'{data_cfg.root}: no training case to plan from (the '
                     'split left none outside the test set).')
  stacked = np.concatenate(samples, axis=0)
  channels = [dict(name=name, normalization=scheme,
                   **_channel_stats(stacked[:, c]))
              for c, (name, scheme) in enumerate(
                  zip(info.channel_names, info.normalization))]
  total = max(1, int(counts.sum()))
  classes = []
  for c, name in enumerate(info.class_names):
    entry = {'name': name, 'frequency': float(counts[c]) / total}
    if c > 0:
      entry['smallest_object_voxels'] = _min_or_none(
          [s[c - 1] for s in smallest_vox])
      mm3 = _min_or_none([s[c - 1] for s in smallest_mm3])
      entry['smallest_object_mm3'] = None if mm3 is None else round(mm3, 4)
    classes.append(entry)
  shapes = np.array([c['shape'] for c in cases], np.float64)
  spacings = np.array([c['spacing'] for c in cases], np.float64)
  median_spacing = np.median(spacings, axis=0)
  return {
      'version': FINGERPRINT_VERSION,
      'root': str(source.root),
      'layout': info.layout,
      'num_cases': len(cases),
      'cases': cases,
      'channels': channels,
      'classes': classes,
      'median_shape': [float(s) for s in np.median(shapes, axis=0)],
      'median_spacing': [round(float(s), 6) for s in median_spacing],
      'spacing_p10': [round(float(s), 6)
                      for s in np.percentile(spacings, 10, axis=0)],
      'anisotropy': round(float(median_spacing.max() / median_spacing.min()),
                          6),
  }
