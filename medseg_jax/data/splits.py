"""Patient-level data splits: train/val/test, nested training fractions, k-fold.

Splitting is by patient, never by image: every image of a patient lands in the
same split, so a model is never validated on a patient it was trained on. All
functions are deterministic given their seed and depend only on the *set* of
patient ids, not on record order.
"""

from collections.abc import Sequence
import math

import numpy as np

from medseg_jax.data.errors import Problem

SPLITS = ('train', 'val', 'test')


def _shuffled_patients(patient_ids: Sequence[str], seed: int) -> list[str]:
  """Returns the unique patient ids in a seeded random order."""
  unique = sorted(set(patient_ids))
  order = np.random.default_rng(seed).permutation(len(unique))
  return [unique[i] for i in order]


def _records_of(patient_ids: Sequence[str], chosen: set[str]) -> np.ndarray:
  """Returns the sorted record indices whose patient is in `chosen`."""
  return np.array([i for i, p in enumerate(patient_ids) if p in chosen],
                  dtype=np.int64)


def split_patients(patient_ids: Sequence[str], *, val_fraction: float,
                   test_fraction: float, seed: int = 0,
                   train_fraction: float = 1.0) -> dict[str, np.ndarray]:
  """Splits records into train/val/test by patient.

  Args:
    patient_ids: the patient id of each record, `patient_ids[i]` for record i.
    val_fraction: share of patients (not images) in the validation split.
    test_fraction: share of patients in the test split.
    seed: seed of the patient shuffle.
    train_fraction: share of the *training* patients kept (e.g. 0.1, 0.25).
      Fractions are nested: the patients kept at 0.1 are among those kept at
      0.25, and validation/test do not change with this value.

  Returns:
    {'train': idx, 'val': idx, 'test': idx}: sorted record indices.

  Raises:
    ValueError: fractions out of range, or a split left without patients.
  """
  if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or (
      val_fraction + test_fraction >= 1):
    raise ValueError(
        f'val_fraction={val_fraction} and test_fraction={test_fraction} must '
        'each be in [0, 1) and sum to less than 1 (config.data.val_fraction, '
        'config.data.test_fraction).')
  if not 0 < train_fraction <= 1:
    raise ValueError(f'config.data.train_fraction={train_fraction} must be in '
                     '(0, 1].')
  patients = _shuffled_patients(patient_ids, seed)
  n = len(patients)
  n_test = round(n * test_fraction)
  n_val = round(n * val_fraction)
  test, val = patients[:n_test], patients[n_test:n_test + n_val]
  train = patients[n_test + n_val:]
  # Prefix of a fixed order, so smaller fractions are subsets of larger ones.
  train = train[:max(1, math.ceil(len(train) * train_fraction))]
  chosen = {'train': train, 'val': val, 'test': test}
  wanted = {'train': 1.0, 'val': val_fraction, 'test': test_fraction}
  for name in SPLITS:
    if wanted[name] > 0 and not chosen[name]:
      raise ValueError(
          f'The {name} split is empty: {n} patient(s) are too few for '
          f'val_fraction={val_fraction}, test_fraction={test_fraction}. Add '
          'data or lower the fractions.')
  return {name: _records_of(patient_ids, set(chosen[name])) for name in SPLITS}


def kfold_patients(patient_ids: Sequence[str], *, num_folds: int, fold: int,
                   seed: int = 0) -> dict[str, np.ndarray]:
  """Returns the train/val record indices of one fold of a k-fold split by patient.

  Every patient is in the validation set of exactly one fold.

  Args:
    patient_ids: the patient id of each record.
    num_folds: k, at least 2 and at most the number of patients.
    fold: which fold, in [0, num_folds).
    seed: seed of the patient shuffle.

  Returns:
    {'train': idx, 'val': idx}: sorted record indices.
  """
  patients = _shuffled_patients(patient_ids, seed)
  if not 2 <= num_folds <= len(patients):
    raise ValueError(f'num_folds={num_folds} must be in [2, {len(patients)}] '
                     f'for {len(patients)} patients.')
  if not 0 <= fold < num_folds:
    raise ValueError(f'fold={fold} must be in [0, {num_folds}).')
  val = set(patients[fold::num_folds])
  train = set(patients) - val
  return {'train': _records_of(patient_ids, train),
          'val': _records_of(patient_ids, val)}


def split_for_config(patient_ids: Sequence[str], data_cfg) -> dict[str, np.ndarray]:
  """Returns train/val/test record indices as `config.data` asks.

  Without folds (`num_folds` <= 1) this is `split_patients`. With k folds the
  test patients are held out first (`test_fraction`, same seed, so the test
  split does not depend on the fold), the other patients are split into k
  folds, and fold `fold` is the validation split; `train_fraction` then keeps
  a nested share of that fold's training patients.

  Args:
    patient_ids: the patient id of each record.
    data_cfg: `config.data` (val_fraction, test_fraction, split_seed,
      train_fraction, num_folds, fold).

  Returns:
    {'train': idx, 'val': idx, 'test': idx}: sorted record indices.
  """
  seed = data_cfg.split_seed
  train_fraction = data_cfg.train_fraction
  num_folds = data_cfg.num_folds
  if num_folds <= 1:
    return split_patients(patient_ids, val_fraction=data_cfg.val_fraction,
                          test_fraction=data_cfg.test_fraction, seed=seed,
                          train_fraction=train_fraction)
  if not 0 < train_fraction <= 1:
    raise ValueError(f'config.data.train_fraction={train_fraction} must be in '
                     '(0, 1].')
  held_out = split_patients(patient_ids, val_fraction=0.0,
                            test_fraction=data_cfg.test_fraction, seed=seed)
  rest = held_out['train']
  try:
    folds = kfold_patients([patient_ids[i] for i in rest], num_folds=num_folds,
                           fold=data_cfg.fold, seed=seed)
  except ValueError as e:
    raise ValueError(f'config.data.num_folds/fold: {e}') from e
  train_patients = _shuffled_patients(
      [patient_ids[rest[i]] for i in folds['train']], seed)
  kept = set(train_patients[:max(1, math.ceil(len(train_patients) *
                                               train_fraction))])
  return {'train': _records_of(patient_ids, kept),
          'val': np.sort(rest[folds['val']]),
          'test': held_out['test']}


def split_problems(patient_ids: Sequence[str], data_cfg) -> list[Problem]:
  """Returns a problem if the patient split of config.data cannot be made.

  Uses the pipeline's own split (`split_for_config`), so a split left empty
  by too few patients is reported before training.

  Args:
    patient_ids: one per record.
    data_cfg: config.data.

  Returns:
    [] or one Problem naming the config keys; [] for no records (reported
    as an empty data set elsewhere).
  """
  if not len(patient_ids):
    return []
  try:
    split_for_config(list(patient_ids), data_cfg)
  except ValueError as e:
    return [Problem('config.data', str(e))]
  return []
