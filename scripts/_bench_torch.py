"""The PyTorch/MONAI side of `scripts/benchmark.py` (`_bench_worker.py torch`).

Runs in a separate venv with torch and MONAI (no JAX needed). Each subject
mirrors the JAX one of the same case: MONAI's BasicUNet / BasicUNetPlusPlus
with the same widths (5 levels), MONAI's DiceCELoss (0.5/0.5), AdamW and
gradient clipping at 1.0; `sliding_window_inference` with Gaussian blending;
`compute_hausdorff_distance` at the 95th percentile.

Subject variants: 'eager' (float32), 'amp_bf16' (autocast bfloat16) and
'compile' (`torch.compile` plus autocast bfloat16).
"""

import time
import types

import numpy as np


def _device():
  import torch  # pylint: disable=import-outside-toplevel
  return 'cuda' if torch.cuda.is_available() else 'cpu'


def _sync():
  import torch  # pylint: disable=import-outside-toplevel
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def _info() -> dict:
  import monai  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  kind = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else
          'cpu')
  return {'platform': _device(), 'device_kind': kind,
          'torch': torch.__version__, 'monai': monai.__version__,
          'torch_threads': torch.get_num_threads()}


def _peak() -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  if not torch.cuda.is_available():
    return {'device_peak_mib': None}
  return {'device_peak_mib': round(torch.cuda.max_memory_allocated() / 2**20)}


def network(case: dict):
  """Returns MONAI's network of the case's model and widths.

  BasicUNet / BasicUNetPlusPlus (always 5 levels) for 5 widths; for a U-Net
  of another depth, DynUNet (nnU-Net's U-Net: two conv-norm-LeakyReLU per
  level, strided-convolution downsampling, transposed-convolution upsampling).
  """
  from monai.networks import nets  # pylint: disable=import-outside-toplevel
  f = list(case['features'])
  norm = 'batch' if case['norm'] == 'batch' else ('instance', {'affine': True})
  dims = len(case.get('spatial') or case['volume'])
  if len(f) != 5:
    if case['model'] != 'unet':
      raise ValueError(f'MONAI has no {case["model"]} of {len(f)} levels '
                       f'(features={f}): use 5 widths.')
    return nets.DynUNet(
        spatial_dims=dims, in_channels=case['in_channels'],
        out_channels=case['num_classes'], kernel_size=[3] * len(f),
        strides=[1] + [2] * (len(f) - 1),
        upsample_kernel_size=[2] * (len(f) - 1), filters=f, norm_name=norm)
  cls = nets.BasicUNetPlusPlus if case['model'] == 'unetpp' else nets.BasicUNet
  return cls(spatial_dims=dims, in_channels=case['in_channels'],
             out_channels=case['num_classes'],
             features=(*f, f[0]), norm=norm)


def _autocast(variant: str):
  import torch  # pylint: disable=import-outside-toplevel
  return torch.autocast(_device(), dtype=torch.bfloat16,
                        enabled=variant in ('amp_bf16', 'compile'))


def setup_train(case: dict, subject: dict):
  """MONAI's train step of the case; the first step (and compile) timed."""
  import torch  # pylint: disable=import-outside-toplevel
  from monai.losses import DiceCELoss  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  device, variant = _device(), subject['variant']
  net = network(case).to(device).train()
  params = sum(p.numel() for p in net.parameters())
  opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-4)
  k = case['num_classes']
  loss_fn = (DiceCELoss(sigmoid=True, lambda_dice=0.5, lambda_ce=0.5) if k == 1
             else DiceCELoss(softmax=True, to_onehot_y=True, lambda_dice=0.5,
                             lambda_ce=0.5))
  rng = np.random.default_rng(0)
  shape = (case['batch'], *case['spatial'])
  x = torch.from_numpy(rng.normal(size=(shape[0], case['in_channels'],
                                        *shape[1:])).astype(np.float32)).to(device)
  label = (rng.random(shape) > 0.8 if k == 1 else rng.integers(0, k, size=shape))
  y = torch.from_numpy(label[:, None].astype(np.float32)).to(device)
  model = torch.compile(net) if variant == 'compile' else net

  def unit():
    opt.zero_grad(set_to_none=True)
    with _autocast(variant):
      out = model(x)
      out = out[-1] if isinstance(out, (list, tuple)) else out
    loss = loss_fn(out.float(), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    loss.item()  # Waits for the device.

  start = time.perf_counter()
  unit()
  first_s = time.perf_counter() - start
  if device == 'cuda':
    unit()  # Second step: cuDNN autotuning / recompiles out of the timing.
  return types.SimpleNamespace(
      info={**_info(), 'first_s': first_s, 'params': params}, unit=unit,
      finish=_peak)


def setup_sliding_window(case: dict, subject: dict):
  """MONAI's `sliding_window_inference` over the benchmark volume."""
  import torch  # pylint: disable=import-outside-toplevel
  from monai.inferers import sliding_window_inference  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  device, variant = _device(), subject['variant']
  net = network(case).to(device).eval()
  # The JAX side's volume: the same generator and seed, channels first.
  volume = np.random.default_rng(0).normal(
      size=(*case['volume'], case['in_channels'])).astype(np.float32)
  x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume, -1, 0)[None]))
  x = x.to(device)
  act = (torch.sigmoid if case['num_classes'] == 1 else
         (lambda logits: torch.softmax(logits, 1)))

  def predictor(window):
    with _autocast(variant):
      return act(net(window).float())

  def unit():
    with torch.inference_mode():
      probs = sliding_window_inference(
          x, roi_size=tuple(case['patch']), sw_batch_size=case['sw_batch'],
          predictor=predictor, overlap=case['overlap'], mode='gaussian',
          sigma_scale=0.125)
      out = probs.cpu().numpy()  # As the JAX side: probabilities on the host.
    assert np.isfinite(out).all()

  start = time.perf_counter()
  unit()
  first_s = time.perf_counter() - start
  return types.SimpleNamespace(
      info={**_info(), 'first_s': first_s,
            'params': sum(p.numel() for p in net.parameters())},
      unit=unit, finish=_peak)


def setup_hd95(case: dict, subject: dict):
  """MONAI's `compute_hausdorff_distance(percentile=95)` on the same pair."""
  del subject
  import torch  # pylint: disable=import-outside-toplevel
  from monai.metrics import compute_hausdorff_distance  # pylint: disable=import-outside-toplevel
  import bench_surface_metrics as bsm  # pylint: disable=import-outside-toplevel
  make = bsm.compact_pair if case['pair'] == 'compact' else bsm.stray_pair
  pred, truth = make(tuple(case['shape']))
  as_tensor = lambda m: torch.from_numpy(m[None, None].astype(np.float32))
  p, t = as_tensor(pred), as_tensor(truth)
  out = {}

  def unit():
    out['value'] = float(compute_hausdorff_distance(
        p, t, include_background=True, percentile=95, spacing=bsm.SPACING))

  unit()
  return types.SimpleNamespace(info={**_info(), 'value': out['value']},
                               unit=unit, finish=dict)


def setup(case: dict, subject: dict):
  """Returns the subject of `case` (see `_bench_jax.setup`)."""
  return {'train': setup_train, 'sliding_window': setup_sliding_window,
          'hd95': setup_hd95}[case['kind']](case, subject)
