"""Procedural lesions: determinism, record format, patients, areas, hair."""

import pickle

import grain
import numpy as np
import pytest

from medseg_jax.data import synthetic


def _source(size=48, patients=6, per_patient=3, seed=0):
  return synthetic.SyntheticLesions(patients, per_patient, size, seed=seed)


def test_same_index_gives_the_same_record_in_any_instance():
  a, b = _source(), _source()
  for i in (0, 5, 17):
    ra, rb = a[i], b[i]
    np.testing.assert_array_equal(ra['image'], rb['image'])
    np.testing.assert_array_equal(ra['mask'], rb['mask'])
    assert ra['case_id'] == rb['case_id']
  # Read order does not matter, and other indices and seeds differ.
  np.testing.assert_array_equal(a[3]['image'], _source()[3]['image'])
  assert not np.array_equal(a[0]['image'], a[1]['image'])
  assert not np.array_equal(a[0]['image'], _source(seed=1)[0]['image'])


@pytest.mark.parametrize('size,shape', [(32, (32, 32)), (96, (96, 96)),
                                        ((40, 72), (40, 72))])
def test_records_have_the_documented_format(size, shape):
  record = _source(size=size)[4]
  assert set(record) == {'image', 'mask', 'patient_id', 'case_id'}
  assert record['image'].dtype == np.uint8
  assert record['image'].shape == shape + (3,)
  assert record['mask'].dtype == np.uint8 and record['mask'].shape == shape
  assert set(np.unique(record['mask'])) <= {0, 1}
  assert record['mask'].any()
  assert isinstance(record['patient_id'], str)
  assert record['case_id'].startswith(record['patient_id'])


def test_patient_ids_match_the_records():
  source = _source(patients=5, per_patient=4)
  ids = source.patient_ids
  assert len(ids) == len(source) == 20
  assert ids == [source[i]['patient_id'] for i in range(len(source))]
  assert len(set(ids)) == 5 and all(ids.count(p) == 4 for p in set(ids))
  assert len({source[i]['case_id'] for i in range(20)}) == 20
  assert source[-1]['case_id'] == source[19]['case_id']


def test_out_of_range_index_and_bad_arguments_raise():
  source = _source()
  with pytest.raises(IndexError):
    source[len(source)]
  with pytest.raises(ValueError, match='num_patients'):
    synthetic.SyntheticLesions(0, 2, 32)
  with pytest.raises(ValueError, match='image_size'):
    synthetic.SyntheticLesions(2, 2, 4)


def test_images_of_a_patient_share_the_skin_tone():
  source = _source(size=48, patients=8, per_patient=3)

  def skin(i):
    record = source[i]
    return np.median(record['image'][record['mask'] == 0], axis=0)

  tones = np.array([[skin(p * 3 + k) for k in range(3)] for p in range(8)])
  within = np.abs(tones - tones.mean(axis=1, keepdims=True)).mean()
  between = np.abs(tones.mean(axis=1) - tones.mean(axis=(0, 1))).mean()
  assert within < between / 2


def test_lesion_areas_span_small_to_large_with_small_ones_common():
  source = _source(size=64, patients=60, per_patient=4)
  areas = np.array([source[i]['mask'].mean() for i in range(len(source))])
  assert areas.min() < 0.01
  assert 0.3 < areas.max() <= 0.5
  assert 0.02 < np.median(areas) < 0.1
  assert (areas < 0.02).mean() > 0.15


def test_hair_changes_the_image_but_never_the_mask():
  tone = synthetic.patient_skin(0, 0)[0]
  over_lesion = 0
  for seed in range(12):
    bare = synthetic.render_lesion(np.random.default_rng(seed), 64, tone,
                                   hair_prob=0.0, vignette_prob=0.0)
    hairy = synthetic.render_lesion(np.random.default_rng(seed), 64, tone,
                                    hair_prob=1.0, vignette_prob=0.0)
    np.testing.assert_array_equal(bare[1], hairy[1])
    changed = np.abs(bare[0].astype(int) - hairy[0]).max(axis=-1) > 30
    assert changed.any()
    # Hair is dark and thin: it never darkens most of the image.
    assert changed.mean() < 0.3
    over_lesion += (changed & (bare[1] == 1)).any()
  assert over_lesion > 0  # Hair is drawn over lesions too.


def test_a_global_intensity_threshold_does_not_solve_the_task():
  source = _source(size=48, patients=20, per_patient=4)
  records = [source[i] for i in range(len(source))]
  luma = [r['image'] @ np.array([0.299, 0.587, 0.114]) for r in records]

  def mean_dice(threshold):
    scores = []
    for lum, record in zip(luma, records):
      pred, mask = lum < threshold, record['mask'] == 1
      scores.append(2 * (pred & mask).sum() / (pred.sum() + mask.sum()))
    return np.mean(scores)

  assert max(mean_dice(t) for t in range(40, 230, 10)) < 0.7


def test_source_works_in_grain_and_pickles_for_workers():
  source = _source(size=32)
  dataset = grain.MapDataset.source(source)
  np.testing.assert_array_equal(dataset[2]['image'], source[2]['image'])
  clone = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(clone[2]['mask'], source[2]['mask'])
  assert repr(source).startswith('SyntheticLesions(')


def test_smooth_noise_has_unit_variance_and_the_asked_feature_size():
  rng = np.random.default_rng(0)
  fields = np.stack([synthetic.smooth_noise(rng, (64, 96), 16.0)
                     for _ in range(200)])
  assert fields.shape == (200, 64, 96) and fields.dtype == np.float32
  assert 0.9 < fields.std() < 1.1
  # Neighbouring pixels are strongly correlated, pixels 3 features apart not.
  near = np.corrcoef(fields[:, 32, 40], fields[:, 32, 41])[0, 1]
  far = np.corrcoef(fields[:, 32, 10], fields[:, 32, 58])[0, 1]
  assert near > 0.9 and abs(far) < 0.25
