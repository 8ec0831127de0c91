r"""Train-step speed of medseg_jax models, against MONAI (PyTorch) in the same run.

Measures, for one model config: compile time, median step time, images/s and
peak memory of the jitted JAX train step (Dice+BCE loss, AdamW); then, if
PyTorch and MONAI are importable, the same for MONAI's BasicUNetPlusPlus /
BasicUNet with the same widths, loss and optimiser, and prints the ratio.

    python scripts/bench_train_step.py --model=unetpp --size=128 --batch=8
    python scripts/bench_train_step.py --model=unet --size=256 --batch=16 \
        --dtype=bfloat16 --steps=50          # on a GPU

The architectures are not identical (MONAI's blocks differ in details), so
parameter counts are printed beside the times.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

import numpy as np

# Run from anywhere: the configs/ package lives at the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _jax_benchmark(args) -> dict:
  """Times the medseg_jax train step; returns figures as a dict."""
  import jax  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from medseg_jax import models, optim, parallel, state as state_lib, steps  # pylint: disable=import-outside-toplevel

  model_cfg = ml_collections.ConfigDict(dict(
      name=args.model, features=tuple(args.features), norm='batch',
      dtype=args.dtype, upsample='transpose', residual=False,
      deep_supervision=False, dropout_rate=0.0))
  model = models.create_model(model_cfg, 1)
  from configs import default  # pylint: disable=import-outside-toplevel
  # The base optimiser (AdamW 1e-4, wd 1e-4, clip 1.0): every key
  # optim.create_optimizer reads is there.
  optim_cfg = default.get_config().optim
  optim_cfg.schedule = 'constant'
  schedule = optim.learning_rate_schedule(optim_cfg, total_steps=1,
                                          warmup_steps=0)
  tx = optim.create_optimizer(optim_cfg, schedule)
  mesh = parallel.create_mesh()
  shape = (1, args.size, args.size, 3)
  rng = jax.random.PRNGKey(0)
  state = state_lib.create_train_state(model, tx, shape, rng, mesh)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  data_rng = np.random.default_rng(0)
  batch = parallel.global_batch({
      'image': data_rng.normal(size=(args.batch, args.size, args.size, 3)
                               ).astype(np.float32),
      'label': (data_rng.random((args.batch, args.size, args.size)) > 0.8
                ).astype(np.int32)}, mesh)
  step_fn = jax.jit(steps.make_train_step(model, tx, {'dice': 0.5, 'ce': 0.5},
                                          schedule), donate_argnums=0)
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - start
  times = []
  for i in range(args.warmup + args.steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics['loss'])
    if i >= args.warmup:
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  return {
      'framework': 'jax', 'device': device.device_kind,
      'params': int(num_params), 'compile_s': compile_s, 'step_s': step_s,
      'images_per_s': args.batch / step_s,
      'peak_device_bytes': stats.get('peak_bytes_in_use'),
      'host_max_rss_mb': resource.getrusage(
          resource.RUSAGE_SELF).ru_maxrss / 1024,
  }


def _torch_benchmark(args) -> dict | None:
  """Times MONAI's equivalent network with the same loss and optimiser."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from monai.losses import DiceCELoss  # pylint: disable=import-outside-toplevel
    from monai.networks import nets  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  torch.manual_seed(0)
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  f = list(args.features)
  if args.model == 'unetpp':
    net = nets.BasicUNetPlusPlus(spatial_dims=2, in_channels=3, out_channels=1,
                                 features=(*f[:5], f[0]), norm='batch')
  else:
    net = nets.BasicUNet(spatial_dims=2, in_channels=3, out_channels=1,
                         features=(*f[:5], f[0]), norm='batch')
  net = net.to(device).train()
  opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-4)
  loss_fn = DiceCELoss(sigmoid=True, lambda_dice=0.5, lambda_ce=0.5)
  x = torch.randn(args.batch, 3, args.size, args.size, device=device)
  y = (torch.rand(args.batch, 1, args.size, args.size, device=device) > 0.8
       ).float()
  use_amp = args.dtype == 'bfloat16' and device == 'cuda'

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=use_amp):
      out = net(x)
      out = out[-1] if isinstance(out, (list, tuple)) else out
      loss = loss_fn(out.float(), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    return loss

  times = []
  for i in range(args.warmup + args.steps):
    start = time.perf_counter()
    step().item()
    if i >= args.warmup:
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  return {
      'framework': f'torch {torch.__version__} + MONAI', 'device': device,
      'params': sum(p.numel() for p in net.parameters()), 'step_s': step_s,
      'images_per_s': args.batch / step_s,
      'torch_threads': torch.get_num_threads(),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='unetpp', choices=['unet', 'unetpp'])
  parser.add_argument('--features', type=int, nargs='+',
                      default=[32, 64, 128, 256, 512])
  parser.add_argument('--size', type=int, default=128)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--dtype', default='float32',
                      choices=['float32', 'bfloat16'])
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--no_torch', action='store_true')
  args = parser.parse_args()
  # Before JAX starts: the CPU convolution kernel main.py picks for these
  # widths (config.model.conv_impl='auto', models/cpu_conv.py).
  from medseg_jax.models import cpu_conv  # pylint: disable=import-outside-toplevel
  if cpu_conv.wants_eigen({'features': args.features}):
    cpu_conv.prefer_eigen_convolutions()
  results = [_jax_benchmark(args)]
  if not args.no_torch:
    torch_result = _torch_benchmark(args)
    if torch_result is None:
      print('PyTorch/MONAI not importable: JAX figures only.')
    else:
      results.append(torch_result)
  print(json.dumps({'args': vars(args), 'results': results}, indent=2))
  if len(results) == 2:
    ratio = results[1]['step_s'] / results[0]['step_s']
    print(f'{args.model} {args.size}x{args.size} batch {args.batch} '
          f'{args.dtype}: JAX {results[0]["step_s"]*1e3:.1f} ms/step, MONAI '
          f'{results[1]["step_s"]*1e3:.1f} ms/step -> JAX is {ratio:.2f}x '
          'the speed of MONAI (>1 = faster).')


if __name__ == '__main__':
  main()
