r"""Sliding-window inference speed on a large volume (issue 6 benchmark).

A small 3D U-Net (random weights: speed does not depend on them) predicts a
single-channel volume by `inference.sliding_window`; prints the number of
windows, the compile time of the window program, the total time and
windows/s.

    python scripts/bench_sliding_window.py                    # 128x256x256, 96^3
    python scripts/bench_sliding_window.py --size 64 128 128 --patch 64 \
        --batch 2 --blend constant

The window program is compiled ahead of time (`jit(...).lower().compile()`),
so the compile time is measured on its own and the timed run compiles
nothing; the total is the whole `sliding_window` call (gathering windows,
the model, blending and normalisation).
"""

import argparse
import json
import resource
import time

import numpy as np


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', type=int, nargs=3, default=(128, 256, 256),
                      help='volume D H W')
  parser.add_argument('--patch', type=int, default=96, help='cubic patch')
  parser.add_argument('--overlap', type=float, default=0.5)
  parser.add_argument('--blend', default='gaussian',
                      choices=('gaussian', 'constant'))
  parser.add_argument('--batch', type=int, default=4, help='windows per call')
  parser.add_argument('--features', type=int, nargs='+',
                      default=(8, 16, 32, 64))
  parser.add_argument('--dtype', default='float32')
  args = parser.parse_args()

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from medseg_jax import inference, models  # pylint: disable=import-outside-toplevel

  model = models.create_model(dict(name='unet', features=tuple(args.features),
                                   norm='batch', dtype=args.dtype), 1)
  patch = (args.patch,) * 3
  window = jnp.zeros((args.batch, *patch, 1), jnp.float32)
  # Non-partitionable threefry: the init program compiles ~10x faster on CPU.
  with jax.threefry_partitionable(False):
    variables = jax.jit(lambda k: model.init({'params': k}, window[:1],
                                             train=False))(
                                                 jax.random.PRNGKey(0))
  predict_fn = inference.make_predict_fn(model, variables)
  rng = jax.random.PRNGKey(0)
  start = time.perf_counter()
  compiled = predict_fn.jitted.lower(variables, window, rng).compile()
  compile_s = time.perf_counter() - start

  def run_windows(x):
    return compiled(variables, x, rng)

  volume = np.random.default_rng(0).normal(
      size=(*args.size, 1)).astype(np.float32)
  num_windows = int(np.prod([len(s) for s in inference.window_starts(
      args.size, patch, args.overlap)]))
  start = time.perf_counter()
  probs = inference.sliding_window(run_windows, volume, patch,
                                   overlap=args.overlap, blend=args.blend,
                                   batch_size=args.batch)
  total_s = time.perf_counter() - start
  assert probs.shape == (*args.size, 1) and np.isfinite(probs).all()
  result = {
      'device': jax.devices()[0].device_kind,
      'volume': list(args.size), 'patch': list(patch),
      'overlap': args.overlap, 'blend': args.blend, 'batch': args.batch,
      'features': list(args.features), 'dtype': args.dtype,
      'params': models.count_params(variables['params']),
      'windows': num_windows, 'compile_s': round(compile_s, 2),
      'total_s': round(total_s, 2),
      'windows_per_s': round(num_windows / total_s, 3),
      'host_max_rss_mb': round(resource.getrusage(
          resource.RUSAGE_SELF).ru_maxrss / 1024),
  }
  print(f'{num_windows} windows of {patch} over {tuple(args.size)} '
        f'(overlap {args.overlap}, {args.blend}, batch {args.batch}) on '
        f'{result["device"]}: compile {compile_s:.1f} s, total '
        f'{total_s:.1f} s, {result["windows_per_s"]:.2f} windows/s.')
  print(json.dumps(result))


if __name__ == '__main__':
  main()
