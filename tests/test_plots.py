"""Tests of medseg_jax.plots: case picking, slices, and valid PNG files."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from medseg_jax import plots
from medseg_jax import report
from medseg_jax import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png_size(path) -> tuple[int, int]:
  """Opens `path` with Pillow, checks it is a valid PNG, returns its size."""
  with Image.open(path) as im:
    assert im.format == 'PNG'
    im.load()  # decodes every pixel: a truncated file fails here
    pixels = np.asarray(im)
    size = im.size
  assert pixels.std() > 0  # something was drawn
  assert not [f for f in os.listdir(os.path.dirname(path)) if f.startswith('.')]
  return size


def _row(case_id, dice, index=1, hd95=1.0):
  row = {m: 0.5 for m in report.METRICS}
  row.update(case_id=case_id, class_index=index, class_name=f'k{index}',
             dice=dice, hd95=hd95, distance_unit='mm', volume_unit='mm^3')
  return row


# ----------------------------------------------------------- case selection


def test_pick_best_median_worst():
  rows = [_row(c, d) for c, d in
          (('a', 0.5), ('b', 0.9), ('c', 0.1), ('d', 0.7), ('e', 0.3))]
  # Ranked b (0.9), d, a (median), e, c (0.1).
  assert plots.pick_best_median_worst(rows, k=3) == ['b', 'a', 'c']
  assert plots.pick_best_median_worst(rows, k=5) == ['b', 'd', 'a', 'e', 'c']
  assert plots.pick_best_median_worst(rows[:1], k=3) == ['a']
  assert plots.pick_best_median_worst(rows[:2], k=3) == ['b', 'a']
  assert plots.pick_best_median_worst([], k=3) == []
  # Multi-class: ranked by the mean Dice over classes of a case.
  multi = [_row('x', 0.9, 1), _row('x', 0.1, 2), _row('y', 0.6, 1),
           _row('y', 0.6, 2)]
  assert plots.pick_best_median_worst(multi, k=2) == ['y', 'x']
  with pytest.raises(ValueError, match='k must be'):
    plots.pick_best_median_worst(rows, k=0)


def test_representative_slice():
  truth = np.zeros((4, 5, 5), np.uint8)
  truth[1, 1:3, 1:3] = 1  # 4 voxels
  truth[2, 0:3, 0:3] = 2  # 9 voxels: the most foreground
  pred = np.zeros_like(truth)
  pred[3] = 1
  image = np.arange(4 * 5 * 5 * 2, dtype=np.float32).reshape(4, 5, 5, 2)
  im, t, p = plots.representative_slice(image, truth, pred)
  np.testing.assert_array_equal(im, image[2])
  np.testing.assert_array_equal(t, truth[2])
  np.testing.assert_array_equal(p, pred[2])
  empty = np.zeros_like(truth)
  assert plots.representative_slice_index(empty, pred) == 3  # falls back
  assert plots.representative_slice_index(empty, empty) == 2  # middle
  with pytest.raises(ValueError, match='same spatial shape'):
    plots.representative_slice(image[:, :4], truth, pred)


def test_display_image():
  x = np.zeros((2, 2, 3), np.float32)
  x[..., 0] = [[-1, 0], [1, 3]]  # -> (x + 1) / 4
  x[..., 1] = 7.0  # constant channel -> 0
  x[..., 2] = [[0, 0.5], [np.inf, 1]]  # non-finite -> 0
  out = plots.display_image(x)
  np.testing.assert_allclose(out[..., 0], [[0, 0.25], [0.5, 1]])
  np.testing.assert_allclose(out[..., 1], 0)
  np.testing.assert_allclose(out[..., 2], [[0, 0.5], [0, 1]])
  u8 = np.array([[0, 51], [255, 102]], np.uint8)
  np.testing.assert_allclose(plots.display_image(u8), u8 / 255)
  five = np.random.default_rng(0).normal(size=(3, 3, 5))
  first = plots.display_image(five)
  assert first.shape == (3, 3)  # > 3 channels: the first, as grey
  np.testing.assert_allclose(first, plots.display_image(five[..., 0]))


# -------------------------------------------------------------------- PNGs


def _case(rng, num_classes=2, channels=3, dtype=np.float32):
  truth = np.zeros((24, 32), np.int32)
  truth[5:15, 6:20] = 1
  if num_classes > 2:
    truth[8:12, 9:14] = 2
  pred = np.roll(truth, 2, axis=1)
  image = rng.normal(size=(24, 32, channels)) * 40 + 100
  return image.astype(dtype), truth, pred


def test_plot_case_grid(tmp_path):
  rng = np.random.default_rng(0)
  cases = [(*_case(rng), 'best  Dice 0.900'),
           (*_case(rng, channels=1), 0.5),
           (*_case(rng, channels=4), 'worst')]
  path = str(tmp_path / 'cases.png')
  plots.plot_case_grid(cases, path)
  assert _png_size(path) == (900, 900)  # 9 x 9 inches at 100 dpi
  # One case; uint8 RGB; multi-class; an empty prediction.
  image, truth, _ = _case(rng, num_classes=3)
  single = [(image.clip(0, 255).astype(np.uint8), truth, np.zeros_like(truth),
             'only')]
  plots.plot_case_grid(single, path)
  assert _png_size(path) == (900, 300)
  with pytest.raises(ValueError, match='case 0.*representative_slice'):
    plots.plot_case_grid([(image, truth[:5], truth[:5], 'x')], path)
  with pytest.raises(ValueError, match='no cases'):
    plots.plot_case_grid([], path)


def test_plot_metric_distributions(tmp_path):
  rng = np.random.default_rng(0)
  rows = []
  for i in range(6):
    image, truth, pred = _case(rng, num_classes=3)
    rows += report.case_metrics(pred, truth, 3, (1.0, 0.5), f'c{i}')
  rows[0]['hd95'] = float('inf')
  path = str(tmp_path / 'distributions.png')
  plots.plot_metric_distributions(rows, path)
  assert _png_size(path) == (1600, 700)
  # A single case whose distances are all inf (prediction empty).
  one = report.case_metrics(np.zeros_like(truth), truth > 0, 1)
  plots.plot_metric_distributions(one, path)
  assert _png_size(path) == (1600, 700)


def test_plot_training_curves(tmp_path):
  log = workdir_lib.MetricsLog(str(tmp_path))
  log.write(1, 'train', {'compile_time_s': 3.0})
  for step in range(10, 60, 10):
    log.write(step, 'train', {'loss': 1.0 / step, 'lr': 1e-3})
  for step, dice in ((25, 0.5), (50, 0.7)):
    log.write(step, 'val', {'dice': dice, 'dice_std': 0.1, 'loss': 0.3})
  records = workdir_lib.read_metrics(str(tmp_path))
  out = str(tmp_path / 'plots' / 'training.png')
  plots.plot_training_curves(records, out)
  assert _png_size(out) == (1100, 400)
  # Training records only (no evaluation yet), and no records at all.
  plots.plot_training_curves([r for r in records if r['split'] == 'train'],
                             out)
  assert _png_size(out) == (1100, 400)
  plots.plot_training_curves([], out)
  assert _png_size(out) == (1100, 400)
  with pytest.raises(ValueError, match='record 0 has no "step"'):
    plots.plot_training_curves([{'loss': 1.0}], out)


def test_plot_reliability(tmp_path):
  rng = np.random.default_rng(0)
  probs = rng.uniform(size=(8, 8, 1))
  truth = (rng.uniform(size=(8, 8)) < probs[..., 0]).astype(np.int32)
  bins = report.calibration_summary([probs], [truth], num_bins=10)
  path = str(tmp_path / 'reliability.png')
  plots.plot_reliability(bins, path)
  assert _png_size(path) == (500, 600)
  # JSON round trip (empty bins as None), and the raw metrics bins (no ECE).
  bins['accuracy'][0] = bins['confidence'][0] = None
  plots.plot_reliability(bins, path)
  plots.plot_reliability(report.metrics.reliability_bins(probs, truth, 4),
                         path)
  assert _png_size(path) == (500, 600)
  with pytest.raises(ValueError, match='lack'):
    plots.plot_reliability({'edges': [0, 1]}, path)


def test_plots_need_no_display_or_pyplot(tmp_path):
  """Drawing works headless and never imports pyplot (no backend switch)."""
  code = (
      'import sys, numpy as np\n'
      'from medseg_jax import plots\n'
      'm = np.zeros((8, 8), int); m[2:5, 2:5] = 1\n'
      f'plots.plot_case_grid([(np.ones((8, 8)), m, m, 1.0)], {str(tmp_path / "a.png")!r})\n'
      'assert "matplotlib.pyplot" not in sys.modules\n')
  env = {k: v for k, v in os.environ.items()
         if k not in ('DISPLAY', 'MPLBACKEND', 'WAYLAND_DISPLAY')}
  env['PYTHONPATH'] = REPO
  subprocess.run([sys.executable, '-c', code], env=env, check=True, cwd=REPO,
                 timeout=120)
  assert _png_size(str(tmp_path / 'a.png')) == (900, 300)
