"""Inference: whole image, sliding windows, TTA, ensembles, MC dropout."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax import inference
from medseg_jax import models

TRACES = []


class Pointwise(nn.Module):
  """A 1x1 conv: each output voxel depends on its own input voxel only.

  Appends to TRACES whenever it is traced (a Python side effect).
  """
  num_classes: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False, mc_dropout: bool = False):
    TRACES.append(x.shape)
    return nn.Conv(self.num_classes, (1,) * (x.ndim - 2))(x)


def _key(seed):
  # 'rbg' keys: threefry random programs take seconds to compile on CPU.
  return jax.random.key(seed, impl='rbg')


def _init(model, shape, seed=0):
  """Returns variables for inputs of `shape`, filled on the host (no RNG
  program to compile): N(0, 0.5) everywhere, BatchNorm variances in [0.5, 1.5].
  """
  abstract = jax.eval_shape(
      lambda: model.init({'params': _key(0)}, jnp.zeros(shape, jnp.float32),
                         train=False))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if 'var' in jax.tree_util.keystr(path[-1:]):
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
    return jnp.asarray(rng.normal(0.0, 0.5, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def _unet(num_classes=1, **kwargs):
  cfg = dict(name='unet', features=(4, 8), norm='batch', dtype='float32',
             **kwargs)
  return models.create_model(cfg, num_classes)


def _random(shape, seed=0):
  return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def test_probabilities_and_labels_known_answers():
  logits = np.array([[0.0], [np.log(3.0)], [-50.0]], np.float32)
  np.testing.assert_allclose(inference.probabilities(logits)[:, 0],
                             [0.5, 0.75, np.exp(-50.0)], rtol=1e-6)
  np.testing.assert_allclose(inference.probabilities(jnp.asarray(logits)),
                             inference.probabilities(logits), rtol=1e-6)
  multi = np.log(np.array([[1.0, 2.0, 5.0], [4.0, 4.0, 2.0]], np.float32))
  np.testing.assert_allclose(inference.probabilities(multi),
                             [[0.125, 0.25, 0.625], [0.4, 0.4, 0.2]],
                             rtol=1e-6)
  # K == 1: strictly above the threshold, as metrics.predict_classes.
  binary = np.array([[0.5], [0.51], [0.2]], np.float32)
  np.testing.assert_array_equal(
      inference.labels_from_probabilities(binary), [0, 1, 0])
  np.testing.assert_array_equal(
      inference.labels_from_probabilities(binary, threshold=0.1), [1, 1, 1])
  np.testing.assert_array_equal(
      inference.labels_from_probabilities(
          np.array([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])), [2, 0])


def test_predictive_entropy_known_answers():
  np.testing.assert_allclose(
      inference.predictive_entropy(np.full((2, 3, 1), 0.5)), np.log(2.0),
      rtol=1e-6)
  np.testing.assert_allclose(
      inference.predictive_entropy(np.array([[0.5, 0.5], [0.75, 0.25]])),
      [np.log(2.0), -0.75 * np.log(0.75) - 0.25 * np.log(0.25)], rtol=1e-6)
  np.testing.assert_allclose(
      inference.predictive_entropy(np.full((1, 4), 0.25)), [np.log(4.0)],
      rtol=1e-6)
  np.testing.assert_array_equal(
      inference.predictive_entropy(np.array([[1.0], [0.0], [0.0]])), 0.0)
  np.testing.assert_array_equal(
      inference.predictive_entropy(np.array([[0.0, 1.0, 0.0]])), [0.0])


def test_window_starts_cover_image_with_last_window_flush():
  assert inference.window_starts((20,), (8,), 0.5) == [[0, 4, 8, 12]]
  assert inference.window_starts((8, 5), (8, 8), 0.5) == [[0], [0]]
  for size in (9, 21, 37, 100):
    for overlap in (0.0, 0.25, 0.5, 0.75):
      (starts,) = inference.window_starts((size,), (8,), overlap)
      assert starts[0] == 0 and starts[-1] == size - 8
      assert all(0 < b - a <= 8 * (1 - overlap) + 0.5
                 for a, b in zip(starts, starts[1:]))
  with pytest.raises(ValueError, match='overlap'):
    inference.window_starts((20,), (8,), 1.0)


def test_gaussian_importance_map_nnunet():
  w = inference.gaussian_importance_map((9, 13), sigma_scale=0.125)
  assert w.shape == (9, 13) and w.dtype == np.float32
  assert w[4, 6] == pytest.approx(1.0) and w.max() == pytest.approx(1.0)
  np.testing.assert_allclose(w, w[::-1, ::-1])
  sigma = 9 * 0.125
  assert w[6, 6] == pytest.approx(np.exp(-0.5 * (2 / sigma)**2), rel=1e-5)
  # Far from the centre the Gaussian underflows; it is clipped, never 0.
  far = inference.gaussian_importance_map((400,), sigma_scale=0.01)
  assert far.min() > 0 and far.min() == far[0] == far[-1]


@pytest.mark.parametrize('shape', [(16, 16, 1), (8, 8, 8, 2)])
def test_sliding_window_equals_whole_when_window_covers_image(shape):
  model = _unet(num_classes=3)
  variables = _init(model, (1, *shape))
  predict_fn = inference.make_predict_fn(model, variables)
  image = _random(shape)
  whole = inference.predict_whole(predict_fn, image, divisor=2)
  for blend in inference.BLENDS:
    windowed = inference.sliding_window(predict_fn, image, shape[:-1],
                                        blend=blend)
    np.testing.assert_allclose(windowed, whole, atol=1e-6)
  # Smaller than the patch: padded to it, as the whole image padded to it.
  small = image[tuple(slice(1, s - 2) for s in shape[:-1])]
  padded_whole = inference.predict_whole(predict_fn, small, divisor=8)
  windowed = inference.sliding_window(predict_fn, small, shape[:-1])
  assert windowed.shape == (*small.shape[:-1], 3)
  np.testing.assert_allclose(windowed, padded_whole, atol=1e-6)


@pytest.mark.parametrize('num_classes', [1, 3])
@pytest.mark.parametrize('shape,patch', [((19, 23, 2), (8, 8)),
                                         ((9, 10, 11, 1), (4, 4, 4))])
def test_pointwise_model_sliding_window_equals_whole(num_classes, shape,
                                                     patch):
  model = Pointwise(num_classes)
  variables = _init(model, (1, *patch, shape[-1]))
  predict_fn = inference.make_predict_fn(model, variables)
  image = _random(shape, seed=1)
  whole = inference.predict_whole(predict_fn, image)
  for blend in inference.BLENDS:
    for overlap in (0.0, 0.5, 0.7):
      windowed = inference.sliding_window(predict_fn, image, patch,
                                          overlap=overlap, blend=blend,
                                          batch_size=3)
      np.testing.assert_allclose(windowed, whole, atol=2e-6)


@pytest.mark.parametrize('blend', inference.BLENDS)
def test_no_seams_on_constant_prediction(blend):
  # Every window predicts the same value: the blend must give it back
  # everywhere (weights normalised), seams included.
  def predict_fn(x):
    return jnp.full((*x.shape[:-1], 2), 0.3, jnp.float32)

  out = inference.sliding_window(predict_fn, np.ones((37, 29, 3), np.float32),
                                 (16, 12), overlap=0.5, blend=blend)
  np.testing.assert_allclose(out, 0.3, rtol=1e-6)


def test_one_compilation_per_patch_shape():
  traces, batch_shapes = [], []

  @jax.jit
  def predict_fn(x):
    traces.append(x.shape)
    return jax.nn.sigmoid(x[..., :1])

  def counted(x):
    batch_shapes.append(x.shape)
    return predict_fn(x)

  for shape in ((20, 20, 1), (23, 17, 1), (8, 30, 1)):  # 16, 12, 8 windows.
    inference.sliding_window(counted, _random(shape), (8, 8), batch_size=5)
  assert traces == [(5, 8, 8, 1)]
  assert set(batch_shapes) == {(5, 8, 8, 1)}
  inference.sliding_window(counted, _random((20, 20, 1)), (8, 4))
  assert len(traces) == 2


def test_make_predict_fn_compiles_once_per_shape():
  model = Pointwise(1)
  variables = _init(model, (1, 4, 4, 1))
  predict_fn = inference.make_predict_fn(model, variables)
  TRACES.clear()
  for _ in range(3):
    predict_fn(np.zeros((2, 6, 6, 1)))  # float64 in: cast, not retraced.
  predict_fn(jnp.zeros((2, 6, 6, 1)), _key(3))
  assert TRACES == [(2, 6, 6, 1)]
  predict_fn(np.zeros((2, 8, 6, 1)))
  assert len(TRACES) == 2


def test_tta_with_flip_equivariant_model_equals_no_tta():
  model = Pointwise(3)
  variables = _init(model, (1, 4, 4, 4, 1))
  predict_fn = inference.make_predict_fn(model, variables)
  image = _random((5, 6, 7, 1))

  def case(im):
    return inference.predict_whole(predict_fn, im)

  np.testing.assert_allclose(inference.tta_flips(case, image), case(image),
                             atol=1e-6)


def test_tta_flips_back_each_prediction():
  image = _random((6, 5, 2))
  # A predictor that returns its input: TTA must give the input back.
  np.testing.assert_allclose(inference.tta_flips(lambda im: im, image), image,
                             rtol=1e-6)
  # Position-dependent: input + ramp i along axis 0. A pass flipped along
  # axis 0 gives, flipped back, input + (5 - i); half of the 4 passes over
  # axes (0, 1) are, so the mean is input + 2.5 everywhere.
  ramp = np.arange(6, dtype=np.float32)[:, None, None]

  def predict(im):
    return im + ramp

  np.testing.assert_allclose(inference.tta_flips(predict, image),
                             image + 2.5, rtol=1e-6)
  np.testing.assert_allclose(inference.tta_flips(predict, image, axes=(1,)),
                             image + ramp, rtol=1e-6)
  np.testing.assert_allclose(
      inference.tta_flips(predict, image, flips=[(), (0,), (0, 1)]),
      image + (ramp + 2 * (5 - ramp)) / 3, rtol=1e-6)
  assert len(inference.flip_combinations((0, 1, 2))) == 8
  with pytest.raises(ValueError, match='spatial axes'):
    inference.tta_flips(predict, image, axes=(2,))


def test_ensemble_averages_members_with_one_compilation():
  model = Pointwise(2)
  members = [_init(model, (1, 4, 4, 1), seed=s) for s in (0, 1, 2)]
  x = _random((2, 5, 5, 1))
  singles = [np.asarray(inference.make_predict_fn(model, v)(x))
             for v in members]
  TRACES.clear()
  inference._jitted_apply.cache_clear()  # pylint: disable=protected-access
  ensemble = inference.make_predict_fn(model, members)
  np.testing.assert_allclose(ensemble(x), np.mean(singles, axis=0),
                             atol=1e-6)
  assert len(TRACES) == 1  # One program for all members.
  TRACES.clear()
  again = inference.make_predict_fn(model, members)
  np.testing.assert_allclose(again(x), ensemble(x))
  assert not TRACES  # A second predict function reuses the compilation.
  np.testing.assert_allclose(
      inference.make_predict_fn(model, members[:1])(x), singles[0])
  with pytest.raises(ValueError, match='at least one'):
    inference.make_predict_fn(model, [])


def test_mc_dropout_maps():
  model = _unet(dropout_rate=0.5)
  variables = _init(model, (1, 8, 8, 1))
  image = _random((8, 8, 1))
  plain = inference.make_predict_fn(model, variables)
  np.testing.assert_array_equal(
      plain(image[None], _key(0)),
      plain(image[None], _key(1)))  # mc_dropout off: no noise.
  rng = _key(7)
  maps = inference.mc_dropout_predict(model, variables, image, 5, rng)
  assert maps['mean'].shape == maps['std'].shape == (8, 8, 1)
  assert maps['entropy'].shape == maps['mutual_information'].shape == (8, 8)
  assert maps['std'].max() > 1e-3
  # The same as 5 passes by hand with the documented keys.
  noisy = inference.make_predict_fn(model, variables, mc_dropout=True)
  samples = np.stack([np.asarray(noisy(image[None],
                                       jax.random.fold_in(rng, s)))[0]
                      for s in range(5)])
  np.testing.assert_allclose(maps['mean'], samples.mean(0), atol=1e-6)
  np.testing.assert_allclose(maps['std'], samples.std(0), atol=1e-6)
  np.testing.assert_allclose(
      maps['entropy'], inference.predictive_entropy(samples.mean(0)),
      atol=1e-5)
  with pytest.raises(ValueError, match='rng'):
    noisy(image[None])
  # By sliding windows, for images larger than the training patch.
  windowed = inference.mc_dropout_predict(
      model, variables, _random((12, 8, 1)), 3, rng, patch_size=(8, 8))
  assert windowed['mean'].shape == (12, 8, 1)
  assert windowed['std'].max() > 1e-3


def test_mc_dropout_without_dropout_is_an_error():
  model = _unet()
  variables = _init(model, (1, 8, 8, 1))
  with pytest.raises(ValueError, match='dropout_rate'):
    inference.mc_dropout_predict(model, variables, _random((8, 8, 1)), 4)


def test_bad_inputs_name_the_problem():

  def predict_fn(x):
    return x

  with pytest.raises(ValueError, match=r'channels-last case.*\(8, 8\)'):
    inference.sliding_window(predict_fn, np.zeros((8, 8)), (8, 8))
  with pytest.raises(ValueError, match='blend'):
    inference.sliding_window(predict_fn, np.zeros((8, 8, 1)), (8, 8),
                             blend='median')
  with pytest.raises(ValueError, match='overlap'):
    inference.sliding_window(predict_fn, np.zeros((8, 8, 1)), (4, 4),
                             overlap=1.0)
  assert inference.input_divisor(_unet()) == 2
  assert inference.input_divisor(Pointwise()) == 1
