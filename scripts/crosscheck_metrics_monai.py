"""Cross-checks medseg_jax metrics against MONAI's on random 2D/3D cases.

Needs PyTorch and MONAI beside medseg_jax (not project dependencies):

    pip install torch monai && python scripts/crosscheck_metrics_monai.py

Prints the largest absolute difference per metric (Dice, IoU, HD95, HD, ASSD,
NSD at 1.5 mm) over 20 random cases with anisotropic spacing.
"""
import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_average_surface_distance, compute_surface_dice, compute_iou
from medseg_jax import metrics
from scipy import ndimage
rng = np.random.default_rng(0)
worst = {'dice':0,'iou':0,'hd95':0,'hd':0,'assd':0,'nsd':0}
for trial in range(20):
  nd = 2 if trial % 2 == 0 else 3
  shape = (40,48) if nd == 2 else (20,24,28)
  spacing = (1.0,0.7) if nd == 2 else (2.5,0.8,0.8)
  t = ndimage.binary_dilation(rng.random(shape) > 0.995, iterations=3)
  p = ndimage.binary_dilation(np.roll(t, 2, axis=0) ^ (rng.random(shape) > 0.99), iterations=1)
  if not t.any() or not p.any(): continue
  T = torch.tensor(t[None,None].astype(np.float32)); P = torch.tensor(p[None,None].astype(np.float32))
  counts = np.asarray(metrics.confusion_counts(p[None].astype(np.int32), t[None].astype(np.int32), 1))
  d_ours = float(metrics.dice_from_counts(counts)[0,0]); d_m = float(compute_dice(P, T, include_background=True))
  i_ours = float(metrics.iou_from_counts(counts)[0,0]); i_m = float(compute_iou(P, T, include_background=True))
  hd95 = metrics.hausdorff_distance(p, t, spacing=spacing, percentile=95); hd95_m = float(compute_hausdorff_distance(P, T, include_background=True, percentile=95, spacing=spacing))
  hd = metrics.hausdorff_distance(p, t, spacing=spacing, percentile=100); hd_m = float(compute_hausdorff_distance(P, T, include_background=True, spacing=spacing))
  assd = metrics.average_symmetric_surface_distance(p, t, spacing=spacing); assd_m = float(compute_average_surface_distance(P, T, include_background=True, symmetric=True, spacing=spacing))
  nsd = metrics.normalized_surface_dice(p, t, 1.5, spacing=spacing); nsd_m = float(compute_surface_dice(P, T, [1.5], include_background=True, spacing=spacing))
  for k, a, b in [('dice',d_ours,d_m),('iou',i_ours,i_m),('hd95',hd95,hd95_m),('hd',hd,hd_m),('assd',assd,assd_m),('nsd',nsd,nsd_m)]:
    worst[k] = max(worst[k], abs(a-b))
print('max abs difference ours vs MONAI over 20 random 2D/3D anisotropic cases:', {k: round(v,6) for k,v in worst.items()})
