"""Cross-checks medseg_jax metrics against MONAI's on random 2D/3D cases.

Needs PyTorch and MONAI beside medseg_jax (not project dependencies), e.g. a
separate venv with the project's packages on the path:

    python -m venv /tmp/venv-monai && /tmp/venv-monai/bin/pip install monai torch
    PYTHONPATH=.:.venv/lib/python3.11/site-packages \\
        /tmp/venv-monai/bin/python scripts/crosscheck_metrics_monai.py

Prints the largest absolute difference per metric over 20 random cases with
anisotropic spacing: Dice, IoU, HD95, HD, ASSD, NSD at 1.5 mm with both
conventions ('voxels' vs MONAI's default, 'deepmind' vs use_subvoxels=True),
and the mean Dice of one multi-class batch with ignore_empty (the project's
reducer vs MONAI's DiceMetric, reduction='mean').
"""

import numpy as np
from scipy import ndimage
import torch
from monai import metrics as monai_metrics

from medseg_jax import metrics

SPACING = {2: (1.0, 0.7), 3: (2.5, 0.8, 0.8)}


def random_pair(rng, ndim):
  """Returns (pred, truth) bool masks: blobs, the prediction shifted, noisy."""
  shape = (40, 48) if ndim == 2 else (20, 24, 28)
  truth = ndimage.binary_dilation(rng.random(shape) > 0.995, iterations=3)
  pred = ndimage.binary_dilation(
      np.roll(truth, 2, axis=0) ^ (rng.random(shape) > 0.99), iterations=1)
  return pred, truth


def binary_differences(rng) -> dict[str, float]:
  """Largest |ours - MONAI| per metric over random binary cases."""
  worst = {}
  for trial in range(20):
    ndim = 2 + trial % 2
    p, t = random_pair(rng, ndim)
    if not (t.any() and p.any()):
      continue
    spacing = SPACING[ndim]
    tensor = lambda m: torch.tensor(m[None, None].astype(np.float32))
    P, T = tensor(p), tensor(t)  # pylint: disable=invalid-name
    kw = dict(include_background=True, spacing=spacing)
    counts = np.asarray(metrics.confusion_counts(
        p[None].astype(np.int32), t[None].astype(np.int32), 1))
    pairs = {
        'dice': (metrics.dice_from_counts(counts)[0, 0],
                 monai_metrics.compute_dice(P, T, include_background=True)),
        'iou': (metrics.iou_from_counts(counts)[0, 0],
                monai_metrics.compute_iou(P, T, include_background=True)),
        'hd95': (metrics.hausdorff_distance(p, t, spacing=spacing),
                 monai_metrics.compute_hausdorff_distance(P, T, percentile=95,
                                                          **kw)),
        'hd': (metrics.hausdorff_distance(p, t, spacing=spacing,
                                          percentile=100),
               monai_metrics.compute_hausdorff_distance(P, T, **kw)),
        'assd': (metrics.average_symmetric_surface_distance(p, t,
                                                            spacing=spacing),
                 monai_metrics.compute_average_surface_distance(
                     P, T, symmetric=True, **kw)),
        'nsd (voxels)': (
            metrics.normalized_surface_dice(p, t, tolerance_mm=1.5,
                                            spacing=spacing),
            monai_metrics.compute_surface_dice(P, T, [1.5], **kw)),
        'nsd (deepmind)': (
            metrics.normalized_surface_dice(p, t, tolerance_mm=1.5,
                                            spacing=spacing,
                                            convention='deepmind'),
            monai_metrics.compute_surface_dice(P, T, [1.5], use_subvoxels=True,
                                               **kw)),
    }
    for name, (ours, theirs) in pairs.items():
      worst[name] = max(worst.get(name, 0.0), abs(float(ours) - float(theirs)))
  return worst


def multiclass_mean_dice(rng) -> tuple[float, float]:
  """(ours, MONAI) mean Dice with ignore_empty on one 3-class batch."""
  labels = rng.integers(0, 3, size=(4, 12, 12))
  labels[0][labels[0] == 2] = 0  # class 2 absent from case 0's truth
  preds = np.where(rng.random(labels.shape) < 0.3,
                   rng.integers(0, 3, size=labels.shape), labels)
  counts = metrics.confusion_counts(preds, labels, 3)
  ours = metrics.summarize_counts(counts, ignore_empty=True)['dice']
  one_hot = lambda x: torch.nn.functional.one_hot(
      torch.tensor(x), 3).permute(0, 3, 1, 2).float()
  dice = monai_metrics.DiceMetric(include_background=False, reduction='mean',
                                  ignore_empty=True)
  dice(one_hot(preds), one_hot(labels))
  return float(ours), float(dice.aggregate())


def main():
  rng = np.random.default_rng(0)
  worst = binary_differences(rng)
  print('max |ours - MONAI| over 20 random 2D/3D anisotropic cases:',
        {k: float(f'{v:.2g}') for k, v in worst.items()})
  ours, theirs = multiclass_mean_dice(rng)
  print(f'multi-class mean Dice, ignore_empty: ours {ours:.6f}, MONAI '
        f'{theirs:.6f}')


if __name__ == '__main__':
  main()
