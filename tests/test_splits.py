"""Patient-level splits: no overlap, determinism, nesting, k-fold coverage."""

import numpy as np
import pytest

from medseg_jax.data import splits


def _patient_ids(num_patients=40, per_patient=3):
  # Records of a patient interleaved with others, as in real folders.
  return [f'p{i % num_patients:03d}' for i in range(num_patients * per_patient)]


def _patients(ids, idx):
  return {ids[i] for i in idx}


def test_split_has_no_patient_overlap_and_covers_all_records():
  ids = _patient_ids()
  s = splits.split_patients(ids, val_fraction=0.15, test_fraction=0.15, seed=3)
  sets = [_patients(ids, s[name]) for name in splits.SPLITS]
  assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (
      sets[1] & sets[2])
  all_idx = np.concatenate([s[n] for n in splits.SPLITS])
  np.testing.assert_array_equal(np.sort(all_idx), np.arange(len(ids)))
  # 40 patients: round(6.0) test and val patients, 28 train, 3 images each.
  assert [len(s[n]) for n in splits.SPLITS] == [84, 18, 18]


def test_split_is_deterministic_and_independent_of_record_order():
  ids = _patient_ids()
  a = splits.split_patients(ids, val_fraction=0.2, test_fraction=0.1, seed=7)
  b = splits.split_patients(ids, val_fraction=0.2, test_fraction=0.1, seed=7)
  for name in splits.SPLITS:
    np.testing.assert_array_equal(a[name], b[name])
  reversed_ids = ids[::-1]
  c = splits.split_patients(reversed_ids, val_fraction=0.2, test_fraction=0.1,
                            seed=7)
  for name in splits.SPLITS:
    assert _patients(ids, a[name]) == _patients(reversed_ids, c[name])
  d = splits.split_patients(ids, val_fraction=0.2, test_fraction=0.1, seed=8)
  assert _patients(ids, d['val']) != _patients(ids, a['val'])


def test_train_fractions_are_nested_and_leave_val_test_unchanged():
  ids = _patient_ids(100, 2)
  full = splits.split_patients(ids, val_fraction=0.15, test_fraction=0.15)
  previous = set()
  for fraction in (0.1, 0.25, 0.5, 1.0):
    s = splits.split_patients(ids, val_fraction=0.15, test_fraction=0.15,
                              train_fraction=fraction)
    kept = _patients(ids, s['train'])
    assert previous <= kept
    assert len(kept) == int(np.ceil(70 * fraction))
    np.testing.assert_array_equal(s['val'], full['val'])
    np.testing.assert_array_equal(s['test'], full['test'])
    previous = kept


def test_kfold_puts_every_patient_in_exactly_one_validation_fold():
  ids = _patient_ids(23, 2)
  seen = []
  for fold in range(5):
    s = splits.kfold_patients(ids, num_folds=5, fold=fold, seed=1)
    val, train = _patients(ids, s['val']), _patients(ids, s['train'])
    assert not val & train and len(val | train) == 23
    seen.extend(val)
  assert sorted(seen) == sorted(set(ids))


def test_too_few_patients_names_the_empty_split():
  with pytest.raises(ValueError, match='val split is empty'):
    splits.split_patients(['a', 'a', 'b'], val_fraction=0.1,
                          test_fraction=0.1)


def test_bad_fractions_name_the_config_keys():
  with pytest.raises(ValueError, match='config.data.val_fraction'):
    splits.split_patients(_patient_ids(), val_fraction=0.6, test_fraction=0.5)


def _fold_cfg(**kw):
  import ml_collections
  values = dict(val_fraction=0.2, test_fraction=0.2, split_seed=3,
                train_fraction=1.0, num_folds=0, fold=0)
  values.update(kw)
  return ml_collections.ConfigDict(values)


def test_split_for_config_folds_cover_non_test_patients_once():
  patients = [f'p{i // 3}' for i in range(3 * 23)]  # 23 patients, 3 images.
  k = 4
  results = [splits.split_for_config(patients, _fold_cfg(num_folds=k, fold=f))
             for f in range(k)]
  tests = {tuple(r['test']) for r in results}
  assert len(tests) == 1  # The test split does not depend on the fold.
  test_patients = {patients[i] for i in results[0]['test']}
  seen = []
  for r in results:
    val = {patients[i] for i in r['val']}
    train = {patients[i] for i in r['train']}
    assert not val & train and not val & test_patients
    assert not train & test_patients
    assert val | train | test_patients == set(patients)
    seen.extend(val)
  assert sorted(seen) == sorted(set(patients) - test_patients)  # Exactly once.


def test_split_for_config_fold_fractions_nested():
  patients = [f'p{i}' for i in range(40)]
  trains = [set(splits.split_for_config(
      patients, _fold_cfg(num_folds=5, fold=2, train_fraction=f))['train'])
            for f in (0.25, 0.5, 1.0)]
  assert trains[0] < trains[1] < trains[2]


def test_split_for_config_without_folds_is_split_patients():
  patients = [f'p{i % 17}' for i in range(50)]
  cfg = _fold_cfg(train_fraction=0.5)
  expected = splits.split_patients(patients, val_fraction=0.2,
                                   test_fraction=0.2, seed=3,
                                   train_fraction=0.5)
  got = splits.split_for_config(patients, cfg)
  for name in splits.SPLITS:
    np.testing.assert_array_equal(got[name], expected[name])
