r"""CPU convolution gradients: XLA vs im2col vs XLA flags vs layout vs PyTorch.

Times, for stride-1 SAME convolutions, the forward pass, the weight gradient
and the input gradient, and the whole UNet train step of
`scripts/bench_train_step.py` (Dice+BCE, AdamW), for several variants:

  xla               plain `lax.conv_general_dilated` (today's models)
  im2col            `medseg_jax.models.cpu_conv` (custom_vjp, matmul gradients)
  nchw              the same conv computed in NCHW/OIHW (transposes around it)
  xla+eigen_conv    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=
                    -individual_convolution (Eigen convs, YNNPACK dots)
  xla+no_ynn        XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=
                    (no YNNPACK at all: Eigen convs and dots)
  im2col+eigen_conv, nchw+eigen_conv   the combinations
  xla+onednn        XLA_FLAGS=--xla_cpu_use_onednn=true
  torch             PyTorch conv2d/conv3d and MONAI BasicUNet (other venv)

XLA flags are read once per process, so every variant is a worker process
that compiles everything first and then answers "time op X once" requests.
The driver asks each worker in turn, round after round, so all variants see
the same machine load (other processes share the cores); medians are printed.

    python scripts/bench_conv_grad.py --reps=7
    python scripts/bench_conv_grad.py --variants=xla,im2col --shapes=base \
        --train=none --reps=5
    python scripts/bench_conv_grad.py --torch_python=/tmp/venv-monai/bin/python

The train step of non-`xla` variants swaps flax's `lax` for one whose
`conv_general_dilated` is the variant's, inside the worker process only.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types

# name -> (batch, spatial, cin, cout, window): the figure, the first
# level of unetpp:cpu (batch 16, 64², 8 ch), of unet at 256² (64 ch; batch 2
# instead of 16 so that a repeat takes < 1 s) and a 3D level (unet3d's 32 ch,
# half its 64x96x96 patch per side, batch 1).
SHAPES = {
    'base': (8, (128, 128), 32, 32, (3, 3)),
    'unetpp_cpu': (16, (64, 64), 8, 8, (3, 3)),
    'unet256': (2, (256, 256), 64, 64, (3, 3)),
    '3d': (1, (32, 48, 48), 32, 32, (3, 3, 3)),
}
# name -> (model, size, batch, features) for the whole train step.
TRAINS = {
    'unet128': ('unet', 128, 8, (32, 64, 128, 256, 512)),
    'unetpp_cpu': ('unetpp', 64, 16, (8, 16, 32, 64)),
}
YNN = '--xla_cpu_experimental_ynn_fusion_type='
VARIANTS = {
    'xla': ('xla', ''),
    'im2col': ('im2col', ''),
    'nchw': ('nchw', ''),
    'xla+eigen_conv': ('xla', YNN + '-individual_convolution'),
    'im2col+eigen_conv': ('im2col', YNN + '-individual_convolution'),
    'nchw+eigen_conv': ('nchw', YNN + '-individual_convolution'),
    'xla+no_ynn': ('xla', YNN),
    'xla+onednn': ('xla', '--xla_cpu_use_onednn=true'),
    'torch': ('torch', ''),
}
OPS = ('fwd', 'wgrad', 'igrad')


def parse_shape(name: str):
  """Returns SHAPES[name], or parses 'BxHxWxCIN>COUT' (3D: BxDxHxWxCIN>COUT).

  Custom shapes use a 3-wide window along every spatial axis.
  """
  if name in SHAPES:
    return SHAPES[name]
  try:
    dims, cout = name.split('>')
    *lead, cin = [int(v) for v in dims.split('x')]
    batch, spatial = lead[0], tuple(lead[1:])
    if len(spatial) not in (2, 3):
      raise ValueError(name)
    return batch, spatial, cin, int(cout), (3,) * len(spatial)
  except ValueError:
    raise ValueError(f'unknown shape {name!r}: use one of {sorted(SHAPES)} or '
                     "'BxHxWxCIN>COUT', e.g. 16x32x32x16>16") from None


# ---------------------------------------------------------------- JAX worker
def _nchw_conv(lax):
  """Returns a conv_general_dilated that computes channels-last convs in NCHW."""

  def conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
           rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
           batch_group_count=1, precision=None, preferred_element_type=None):
    n = lhs.ndim - 2
    first = (0, n + 1, *range(1, n + 1))      # [B, *S, C] -> [B, C, *S]
    kfirst = (n + 1, n, *range(n))            # [*K, I, O] -> [O, I, *K]
    spec = 'NC' + 'DHW'[-n:]
    y = lax.conv_general_dilated(
        lhs.transpose(first), rhs.transpose(kfirst), window_strides, padding,
        lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=(spec, 'OI' + 'DHW'[-n:], spec),
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
    return y.transpose(0, *range(2, n + 2), 1)

  return conv


def _conv_fn(impl):
  """Returns conv(x, w) (channels-last, stride 1, SAME) and the lax drop-in."""
  from jax import lax  # pylint: disable=import-outside-toplevel
  from medseg_jax.models import cpu_conv  # pylint: disable=import-outside-toplevel
  if impl == 'xla':
    general = lax.conv_general_dilated
  elif impl == 'im2col':
    general = cpu_conv.conv_general_dilated
  else:
    general = _nchw_conv(lax)

  def conv(x, w):
    n = x.ndim - 2
    return general(x, w, (1,) * n, 'SAME',
                   dimension_numbers=cpu_conv.channels_last_numbers(n))
  return conv, general


def _conv_ops(impl, shape, dtype) -> dict:
  """Returns {op: zero-arg callable} for one conv shape, compiled and warm."""
  import jax  # pylint: disable=import-outside-toplevel
  conv, _ = _conv_fn(impl)
  batch, spatial, cin, cout, window = shape
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(keys[0], (batch, *spatial, cin), dtype)
  w = (jax.random.normal(keys[1], (*window, cin, cout)) * 0.1).astype(dtype)
  g = jax.random.normal(keys[2], (batch, *spatial, cout), dtype)
  fns = {
      'fwd': jax.jit(conv),
      'wgrad': jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0]),
      'igrad': jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0]),
  }
  args = {'fwd': (x, w), 'wgrad': (x, w, g), 'igrad': (x, w, g)}
  ops = {}
  for name, fn in fns.items():
    compiled = fn.lower(*args[name]).compile()
    ops[name] = (lambda c=compiled, a=args[name]: c(*a).block_until_ready())
  return ops


def _patch_flax_conv(impl):
  """Makes flax's nn.Conv use the variant's conv, in this process only."""
  if impl == 'xla':
    return
  import flax.linen.linear as linear  # pylint: disable=import-outside-toplevel
  from jax import lax  # pylint: disable=import-outside-toplevel
  _, general = _conv_fn(impl)
  proxy = types.SimpleNamespace(**{k: getattr(lax, k) for k in dir(lax)
                                   if not k.startswith('__')})
  proxy.conv_general_dilated = general
  linear.lax = proxy


def _train_op(impl, train, dtype) -> callable:
  """Returns a zero-arg callable running one compiled, warm train step."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from configs import default as default_config  # pylint: disable=import-outside-toplevel
  from medseg_jax import models, optim, parallel, state as state_lib, steps  # pylint: disable=import-outside-toplevel
  _patch_flax_conv(impl)
  name, size, batch_size, features = train
  # Defaults from configs/default.py (so new keys are filled in), set to
  # bench_train_step.py's recipe: float32, batch norm, AdamW 1e-4 constant.
  config = default_config.get_config()
  config.model.update(dict(name=name, features=features, norm='batch',
                           dtype=dtype, upsample='transpose',
                           residual=False, deep_supervision=False,
                           dropout_rate=0.0))
  config.optim.update(dict(name='adamw', lr=1e-4, weight_decay=1e-4,
                           schedule='constant', grad_clip_norm=1.0))
  model = models.create_model(config.model, 1)
  optim_cfg = config.optim
  schedule = optim.learning_rate_schedule(optim_cfg, total_steps=1,
                                          warmup_steps=0)
  tx = optim.create_optimizer(optim_cfg, schedule)
  mesh = parallel.create_mesh()
  rng = jax.random.PRNGKey(0)
  holder = {'state': state_lib.create_train_state(
      model, tx, (1, size, size, 3), rng, mesh)}
  data = np.random.default_rng(0)
  batch = parallel.global_batch({
      'image': data.normal(size=(batch_size, size, size, 3)).astype(np.float32),
      'label': (data.random((batch_size, size, size)) > 0.8).astype(np.int32)},
                                mesh)
  step = jax.jit(steps.make_train_step(model, tx, {'dice': 0.5, 'ce': 0.5},
                                       schedule), donate_argnums=0)
  compiled = step.lower(holder['state'], batch, rng).compile()

  def run():
    holder['state'], metrics = compiled(holder['state'], batch, rng)
    jax.block_until_ready(metrics['loss'])
  return run


# -------------------------------------------------------------- torch worker
def _torch_ops(shape) -> dict:
  """Returns {op: callable} timing PyTorch's conv forward / gradients."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  batch, spatial, cin, cout, window = shape
  conv = F.conv2d if len(spatial) == 2 else F.conv3d
  gen = torch.Generator().manual_seed(0)
  x = torch.randn(batch, cin, *spatial, generator=gen)
  w = torch.randn(cout, cin, *window, generator=gen) * 0.1
  g = torch.randn(batch, cout, *spatial, generator=gen)
  pad = tuple(k // 2 for k in window)
  xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)

  def fwd():
    with torch.no_grad():
      conv(x, w, padding=pad)

  def wgrad():
    torch.autograd.grad(conv(x, wg, padding=pad), wg, g)

  def igrad():
    torch.autograd.grad(conv(xg, w, padding=pad), xg, g)
  return {'fwd': fwd, 'wgrad': wgrad, 'igrad': igrad}


def _torch_train_op(train) -> callable:
  """Returns a callable running one MONAI BasicUNet(++) train step."""
  import torch  # pylint: disable=import-outside-toplevel
  from monai.losses import DiceCELoss  # pylint: disable=import-outside-toplevel
  from monai.networks import nets  # pylint: disable=import-outside-toplevel
  name, size, batch_size, f = train
  torch.manual_seed(0)
  cls = nets.BasicUNetPlusPlus if name == 'unetpp' else nets.BasicUNet
  net = cls(spatial_dims=2, in_channels=3, out_channels=1,
            features=(*f[:5], f[0]), norm='batch').train()
  opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-4)
  loss_fn = DiceCELoss(sigmoid=True, lambda_dice=0.5, lambda_ce=0.5)
  x = torch.randn(batch_size, 3, size, size)
  y = (torch.rand(batch_size, 1, size, size) > 0.8).float()

  def run():
    opt.zero_grad(set_to_none=True)
    out = net(x)
    out = out[-1] if isinstance(out, (list, tuple)) else out
    loss_fn(out, y).backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
  return run


def worker(impl: str, shapes: list[str], trains: list[str],
           dtype: str) -> None:
  """Compiles every op, then times one op per stdin line ('shape/op')."""
  ops = {}
  for s in shapes:
    made = (_torch_ops(parse_shape(s)) if impl == 'torch'
            else _conv_ops(impl, parse_shape(s), dtype))
    ops.update({f'{s}/{k}': v for k, v in made.items()})
  for t in trains:
    if impl != 'torch':
      ops[f'train/{t}'] = _train_op(impl, TRAINS[t], dtype)
    elif len(TRAINS[t][3]) == 5:  # MONAI's BasicUNet(++) has 5 levels.
      ops[f'train/{t}'] = _torch_train_op(TRAINS[t])
  for fn in ops.values():  # Warm-up: first calls allocate and page in.
    fn()
    fn()
  print(json.dumps({'ready': sorted(ops)}), flush=True)
  for line in sys.stdin:
    fn = ops[line.strip()]
    start = time.perf_counter()
    fn()
    print(json.dumps({'s': time.perf_counter() - start}), flush=True)


# -------------------------------------------------------------------- driver
def _start(variant, args):
  impl, flags = VARIANTS[variant]
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + flags).strip()
  python = args.torch_python if impl == 'torch' else sys.executable
  cmd = [python, os.path.abspath(__file__), f'--worker={impl}',
         f'--shapes={args.shapes}', f'--train={args.train}',
         f'--dtype={args.dtype}']
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = repo + os.pathsep + env.get('PYTHONPATH', '')
  proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True, env=env, cwd=repo)
  start = time.perf_counter()
  line = proc.stdout.readline()
  if not line:
    raise RuntimeError(f'worker {variant} died while compiling; run '
                       f'{" ".join(cmd)} by hand to see its error.')
  print(f'{variant}: ready in {time.perf_counter() - start:.0f} s',
        file=sys.stderr, flush=True)
  return proc, json.loads(line)['ready']


def _ask(proc, op) -> float:
  proc.stdin.write(op + '\n')
  proc.stdin.flush()
  return json.loads(proc.stdout.readline())['s']


def _table(medians, variants, ops) -> str:
  """Returns a Markdown table: one row per variant, ms per op, train ratio."""
  train_ops = [o for o in ops if o.startswith('train/')]
  header = [f'{o} ms' for o in ops] + [f'{o} vs xla' for o in train_ops]
  lines = ['| variant | ' + ' | '.join(header) + ' |',
           '|' + '---|' * (1 + len(ops) + len(train_ops))]
  for v in variants:
    cells = [f'{medians[v][o] * 1e3:.1f}' if o in medians[v] else '-'
             for o in ops]
    cells += [f'{medians["xla"][o] / medians[v][o]:.2f}x'
              if o in medians[v] and o in medians.get('xla', {}) else '-'
              for o in train_ops]
    lines.append(f'| {v} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--shapes', default=','.join(SHAPES))
  parser.add_argument('--train', default='unet128',
                      help=f'comma list of {sorted(TRAINS)}, or none')
  parser.add_argument('--reps', type=int, default=7)
  parser.add_argument('--dtype', default='float32',
                      choices=['float32', 'bfloat16'],
                      help='JAX compute dtype (PyTorch stays float32)')
  parser.add_argument('--torch_python', default='/tmp/venv-monai/bin/python')
  parser.add_argument('--json', default='', help='also write medians here')
  parser.add_argument('--worker', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  shapes = [s for s in args.shapes.split(',') if s]
  trains = [t for t in args.train.split(',') if t and t != 'none']
  try:
    for name in shapes:
      parse_shape(name)
  except ValueError as e:
    parser.error(str(e))
  for name in trains:
    if name not in TRAINS:
      parser.error(f'unknown train {name!r}; use {sorted(TRAINS)}')
  if args.worker:
    worker(args.worker, shapes, trains, args.dtype)
    return
  variants = [v for v in args.variants.split(',') if v]
  bad = [v for v in variants if v not in VARIANTS]
  if bad:
    parser.error(f'unknown variants {bad}; use any of {sorted(VARIANTS)}')
  if 'torch' in variants and not os.path.exists(args.torch_python):
    print(f'{args.torch_python} not found: skipping torch.', file=sys.stderr)
    variants.remove('torch')
  workers = {v: _start(v, args) for v in variants}
  ops = [f'{s}/{o}' for s in shapes for o in OPS] + [f'train/{t}' for t in trains]
  times = {v: {o: [] for o in ops} for v in variants}
  for rep in range(args.reps):
    for op in ops:
      # Rotate the order each round so no variant always runs first.
      for v in variants[rep % len(variants):] + variants[:rep % len(variants)]:
        if op in workers[v][1]:
          times[v][op].append(_ask(workers[v][0], op))
    print(f'round {rep + 1}/{args.reps} done', file=sys.stderr, flush=True)
  for proc, _ in workers.values():
    proc.stdin.close()
    proc.wait()
  medians = {v: {o: statistics.median(t) for o, t in times[v].items() if t}
             for v in variants}
  print(_table(medians, variants, ops))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'args': vars(args), 'medians_s': medians, 'times_s': times},
                f, indent=1)


if __name__ == '__main__':
  main()
