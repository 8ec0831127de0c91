"""Parity of exported artefacts with the in-process model, on the test split.

`measure_parity` predicts the same prepared cases with the run's Predictor
and with each artefact loaded by `exported.load` (the same preparation,
sliding windows and TTA), and reports the largest probability difference
and the Dice change. `--mode=export` writes it to WORKDIR/export/parity.json.
"""

import numpy as np

from medseg_jax import config_lib
from medseg_jax import evaluate
from medseg_jax import exported
from medseg_jax import register_cases
from medseg_jax.data import pipeline

PARITY_TOLERANCE = 1e-4  # float32 artefacts vs the in-process model.


def _dice(labels: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
  """Mean foreground Dice of one case (classes empty in both are skipped)."""
  scores = []
  for k in range(1, max(2, num_classes)):
    a, b = labels == k, truth == k
    total = a.sum() + b.sum()
    if total:
      scores.append(2.0 * np.logical_and(a, b).sum() / total)
  return float(np.mean(scores)) if scores else float('nan')


def parity_cases(config, limit: int):
  """Returns up to `limit` (0: all) prepared test-split records (else val)."""
  data = pipeline.build_splits(config.data)
  register_cases.attach(data.source, config.data)  # register_to: as trained.
  if config_lib.slice_context(config) is not None:
    data = evaluate.volume_cases(data)
  split = 'test' if data.size('test') else 'val'
  indices = list(data.indices[split])[:limit or None]
  return split, [dict(data.source[int(i)]) for i in indices]


def measure_parity(predictor, export_dir: str, artefacts, limit: int) -> dict:
  """Returns the parity report of the artefacts against the in-process model.

  Args:
    predictor: the run's Predictor (the reference).
    export_dir: the folder holding the artefacts and manifest.
    artefacts: which artefacts to compare.
    limit: test cases to predict (0: all).

  Returns:
    {'split', 'num_cases', 'tolerance', 'reference_dice', artefact:
    {'max_abs_diff', 'dice', 'dice_change', 'within_tolerance'}}; int8 is
    reported, not held to the tolerance.
  """
  split, records = parity_cases(predictor.config, limit)
  k = int(predictor.config.data.num_classes)
  reference = [predictor.predict_prepared(r['image'], uncertainty=False)
               for r in records]
  ref_dice = [_dice(p.labels, r['mask'], k) for p, r in zip(reference, records)
              ] if records and 'mask' in records[0] else []
  report = {'split': split, 'num_cases': len(records),
            'tolerance': PARITY_TOLERANCE,
            'reference_dtype': str(predictor.config.model.dtype),
            'reference_dice': float(np.nanmean(ref_dice)) if ref_dice else None}
  for name in artefacts:
    loaded = exported.load(export_dir, name)
    diff, dice = 0.0, []
    for ref, record in zip(reference, records):
      got = loaded.predict_prepared(record['image'])
      diff = max(diff, float(np.abs(got.probabilities -
                                    ref.probabilities).max()))
      if ref_dice:
        dice.append(_dice(got.labels, record['mask'], k))
    entry = {'max_abs_diff': diff}
    if ref_dice:
      entry['dice'] = float(np.nanmean(dice))
      entry['dice_change'] = entry['dice'] - report['reference_dice']
    if name != 'onnx_int8':
      entry['within_tolerance'] = diff <= PARITY_TOLERANCE
    report[name] = entry
  return report
