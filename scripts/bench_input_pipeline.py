r"""Input-pipeline throughput against the train step that consumes it.

Prints (1) how fast the Grain training pipeline delivers augmented batches
(decode + resize + flips/rotation/affine/colour jitter + normalisation), with
`--workers` worker processes, and (2) how fast a UNet++ train step consumes
batches of the same shape on this machine, and their ratio. The pipeline
should be several times faster than the step, or the accelerator waits.

    python scripts/bench_input_pipeline.py                       # JPEG folder
    python scripts/bench_input_pipeline.py --source=synthetic
    python scripts/bench_input_pipeline.py --workers=8 --skip_step  # on a GPU host

`--source=folder` first writes `--num_images` random-texture JPEGs of
`--photo_size` (ISIC photographs are ~1000x700 and larger) with PNG masks to a
temporary folder, so decoding and resizing are part of the measure. The first
pass over them decodes; `--cache=memory` (the default config) then serves
later epochs from memory in each worker, so both figures are printed.
"""

import argparse
import os
import sys
import tempfile
import time

from absl import flags
import numpy as np
from PIL import Image

# Run from anywhere: the configs/ package lives at the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_photos(root: str, count: int, size: tuple[int, int]) -> None:
  """Writes `count` RGB JPEGs and 0/255 PNG masks in the `folder` layout."""
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(root, 'images'))
  os.makedirs(os.path.join(root, 'masks'))
  w, h = size
  yy, xx = np.mgrid[:h, :w]
  for i in range(count):
    base = rng.integers(90, 200, size=3)
    noise = rng.normal(0, 20, size=(h // 8, w // 8, 3))
    noise = np.kron(noise, np.ones((8, 8, 1)))[:h, :w]
    image = np.clip(base + noise, 0, 255).astype(np.uint8)
    cy, cx, r = h / 2, w / 2, min(h, w) / 4
    mask = ((yy - cy)**2 + (xx - cx)**2 < r**2).astype(np.uint8) * 255
    image[mask > 0] //= 2
    Image.fromarray(image).save(os.path.join(root, 'images', f'img{i:04d}.jpg'),
                                quality=90)
    Image.fromarray(mask).save(os.path.join(root, 'masks', f'img{i:04d}.png'))


def _data_config(args, root: str):
  """Returns configs/unetpp.py's data section for this benchmark."""
  from configs import unetpp  # pylint: disable=import-outside-toplevel
  config = unetpp.get_config()
  data = config.data
  data.image_size = args.size
  data.worker_count = args.workers
  data.cache = args.cache
  if args.source == 'folder':
    data.source = 'folder'
    data.root = root
    data.val_fraction = data.test_fraction = 0.0
  return config


def _pipeline_rate(config, batch: int, num_batches: int) -> tuple[float, float]:
  """Returns (first-epoch images/s, later-epochs images/s) of the train pipeline."""
  from medseg_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  data = pipeline.build_splits(config.data)
  per_epoch = max(1, data.size('train') // batch)
  iterator = iter(pipeline.train_dataset(
      data, config.data, global_batch=batch,
      num_steps=per_epoch + num_batches + 2, seed=0))
  next(iterator)  # Workers started.
  start = time.perf_counter()
  for _ in range(per_epoch - 1):
    next(iterator)
  first = (per_epoch - 1) * batch / (time.perf_counter() - start)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  later = num_batches * batch / (time.perf_counter() - start)
  iterator.close()
  return first, later


def _step_rate(size: int, batch: int, dtype: str, steps: int) -> float:
  """Returns the images/s of the UNet++ train step at `size`, `batch`."""
  import jax  # pylint: disable=import-outside-toplevel
  from medseg_jax import models, optim, parallel, state as state_lib, steps as steps_lib  # pylint: disable=import-outside-toplevel
  from configs import unetpp  # pylint: disable=import-outside-toplevel
  config = unetpp.get_config()
  config.model.dtype = dtype
  model = models.create_model(config.model, 1)
  schedule = optim.learning_rate_schedule(config.optim, total_steps=10,
                                          warmup_steps=0)
  tx = optim.create_optimizer(config.optim, schedule)
  mesh = parallel.create_mesh()
  rng = jax.random.PRNGKey(0)
  state = state_lib.create_train_state(model, tx, (1, size, size, 3), rng, mesh)
  gen = np.random.default_rng(0)
  data = parallel.global_batch({
      'image': gen.normal(size=(batch, size, size, 3)).astype(np.float32),
      'label': (gen.random((batch, size, size)) > 0.8).astype(np.int32)}, mesh)
  step = jax.jit(steps_lib.make_train_step(model, tx, config.loss.weights,
                                           schedule), donate_argnums=0)
  step = step.lower(state, data, rng).compile()
  state, out = step(state, data, rng)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(steps):
    state, out = step(state, data, rng)
  jax.block_until_ready(out)
  return steps * batch / (time.perf_counter() - start)


def main():
  # Grain's worker processes read absl flags; this script parses argparse.
  flags.FLAGS.mark_as_parsed()
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--source', default='folder',
                      choices=('folder', 'synthetic'))
  parser.add_argument('--size', type=int, default=256)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--cache', default='memory')
  parser.add_argument('--num_images', type=int, default=160)
  parser.add_argument('--photo_size', type=int, nargs=2, default=(1024, 768))
  parser.add_argument('--num_batches', type=int, default=20)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--step_repeats', type=int, default=3)
  parser.add_argument('--skip_step', action='store_true')
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as root:
    if args.source == 'folder':
      _write_photos(root, args.num_images, tuple(args.photo_size))
    config = _data_config(args, root)
    first, later = _pipeline_rate(config, args.batch, args.num_batches)
  print(f'input pipeline ({args.source}, {args.size}x{args.size}, batch '
        f'{args.batch}, {args.workers} workers, cache={args.cache}): '
        f'{first:.1f} img/s first epoch (decoding), {later:.1f} img/s later')
  if args.skip_step:
    return
  step = _step_rate(args.size, args.batch, args.dtype, args.step_repeats)
  print(f'UNet++ train step ({args.size}x{args.size}, batch {args.batch}, '
        f'{args.dtype}): {step:.1f} img/s')
  print(f'pipeline / step: {first / step:.1f}x first epoch, '
        f'{later / step:.1f}x later epochs')


if __name__ == '__main__':
  main()
