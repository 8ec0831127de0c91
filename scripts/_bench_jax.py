"""The medseg_jax side of `scripts/benchmark.py` (run by `_bench_worker.py jax`).

`setup(case, subject)` builds one subject: an object with `info` (figures
known after setup: compile time, parameters, FLOPs), `unit()` (one timed
unit of work: a train step, a whole-volume sliding window, an HD95 call, a
batch from the input pipeline) and `finish()` (figures known at the end:
peak device memory).
"""

import dataclasses
import os
import tempfile
import time
import types

import numpy as np

_LOSS_WEIGHTS = {'dice': 0.5, 'ce': 0.5}


def _device_info() -> dict:
  """Returns the platform and kind of JAX's first device."""
  import jax  # pylint: disable=import-outside-toplevel
  device = jax.devices()[0]
  return {'platform': device.platform, 'device_kind': device.device_kind,
          'jax': jax.__version__}


def _device_peak_mib() -> float | None:
  """Returns the device's peak bytes in use (MiB), None where unknown (CPU)."""
  import jax  # pylint: disable=import-outside-toplevel
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return None if peak is None else round(peak / 2**20)


def compiled_figures(compiled) -> dict:
  """Returns XLA's FLOPs and memory estimate of a compiled program.

  Args:
    compiled: a `jax.stages.Compiled`.

  Returns:
    {'flops': float or None, 'xla_memory_mib': arguments + outputs +
    temporaries (minus aliased donated buffers), or None}.
  """
  figures = {'flops': None, 'xla_memory_mib': None}
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    figures['flops'] = float(cost['flops']) if cost and 'flops' in cost else None
  except Exception:  # pylint: disable=broad-except
    pass  # Not every backend implements cost analysis.
  try:
    mem = compiled.memory_analysis()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes +
             mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    figures['xla_memory_mib'] = round(total / 2**20)
  except Exception:  # pylint: disable=broad-except
    pass
  return figures


def _model(case: dict, dtype: str):
  from medseg_jax import models  # pylint: disable=import-outside-toplevel
  return models.create_model(dict(
      name=case['model'], features=tuple(case['features']), norm=case['norm'],
      dtype=dtype, upsample='transpose', residual=False,
      deep_supervision=False, dropout_rate=0.0), case['num_classes'])


def random_batch(case: dict, seed: int = 0) -> dict:
  """Returns a NumPy batch `image` [B, *spatial, C], `label` [B, *spatial]."""
  rng = np.random.default_rng(seed)
  shape = (case['batch'], *case['spatial'])
  k = case['num_classes']
  label = (rng.random(shape) > 0.8 if k == 1 else
           rng.integers(0, k, size=shape))
  return {'image': rng.normal(size=(*shape, case['in_channels'])
                              ).astype(np.float32),
          'label': label.astype(np.int32)}


def setup_train(case: dict, subject: dict):
  """The jitted train step (Dice+CE 0.5/0.5, AdamW, clip 1.0), AOT-compiled."""
  import jax  # pylint: disable=import-outside-toplevel
  from configs import default  # pylint: disable=import-outside-toplevel
  from medseg_jax import models, optim, parallel, state as state_lib, steps  # pylint: disable=import-outside-toplevel
  model = _model(case, subject.get('dtype', 'float32'))
  optim_cfg = default.get_config().optim  # AdamW 1e-4, wd 1e-4, clip 1.0.
  optim_cfg.schedule = 'constant'
  schedule = optim.learning_rate_schedule(optim_cfg, total_steps=1,
                                          warmup_steps=0)
  tx = optim.create_optimizer(optim_cfg, schedule)
  mesh = parallel.create_mesh()
  rng = jax.random.PRNGKey(0)
  shape = (1, *case['spatial'], case['in_channels'])
  state = state_lib.create_train_state(model, tx, shape, rng, mesh)
  batch = parallel.global_batch(random_batch(case), mesh)
  step_fn = jax.jit(steps.make_train_step(model, tx, _LOSS_WEIGHTS, schedule),
                    donate_argnums=0)
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - start
  holder = {'state': state}

  def unit():
    holder['state'], metrics = compiled(holder['state'], batch, rng)
    jax.block_until_ready(metrics['loss'])

  start = time.perf_counter()
  unit()
  first_s = time.perf_counter() - start
  info = {**_device_info(), **compiled_figures(compiled),
          'compile_s': compile_s, 'first_s': first_s,
          'params': models.count_params(holder['state'].params)}
  return types.SimpleNamespace(
      info=info, unit=unit, finish=lambda: {'device_peak_mib': _device_peak_mib()})


def random_volume(case: dict) -> np.ndarray:
  """Returns the benchmark volume `[*volume, C]`, float32, seed 0."""
  rng = np.random.default_rng(0)
  return rng.normal(size=(*case['volume'], case['in_channels'])
                    ).astype(np.float32)


def _run_predict_fn(workdir: str, backend: str):
  """Returns (predict_fn, parameter count or None) of a trained run.

  Args:
    workdir: the run (with WORKDIR/export for the artefacts).
    backend: 'jax' (the checkpoint, jitted), 'stablehlo', 'onnx' or
      'onnx_int8' (WORKDIR/export's artefact).
  """
  # pylint: disable=import-outside-toplevel
  from medseg_jax import exported, inference, models, predictor
  if backend == 'jax':
    run = predictor.Predictor.from_workdir(workdir)
    return (inference.make_predict_fn(run.model, run.variables),
            models.count_params(run.variables['params']))
  return (exported.artefact_predict_fn(os.path.join(workdir, 'export'),
                                       backend), None)


def setup_sliding_window(case: dict, subject: dict):
  """`inference.sliding_window` over one volume (Gaussian blending).

  A random-weight model of the case's widths, or, when the case has a
  `workdir`, the trained run's model through `subject['backend']`.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from medseg_jax import inference, models  # pylint: disable=import-outside-toplevel
  if case.get('workdir'):
    predict_fn, params = _run_predict_fn(case['workdir'], subject['backend'])
  else:
    model = _model(case, subject.get('dtype', 'float32'))
    window = jnp.zeros((1, *case['patch'], case['in_channels']), jnp.float32)
    with jax.threefry_partitionable(False):  # Compiles ~10x faster on CPU.
      variables = jax.jit(lambda k: model.init(
          {'params': k}, window, train=False))(jax.random.PRNGKey(0))
    predict_fn = inference.make_predict_fn(model, variables)
    params = models.count_params(variables['params'])
  volume = random_volume(case)

  def unit():
    probs = inference.sliding_window(
        predict_fn, volume, case['patch'], overlap=case['overlap'],
        blend='gaussian', batch_size=case['sw_batch'])
    assert np.isfinite(probs).all()

  start = time.perf_counter()
  unit()  # Compiles the window program.
  first_s = time.perf_counter() - start
  windows = int(np.prod([len(s) for s in inference.window_starts(
      case['volume'], case['patch'], case['overlap'])]))
  info = {**_device_info(), 'first_s': first_s, 'windows': windows,
          'params': params}
  return types.SimpleNamespace(
      info=info, unit=unit, finish=lambda: {'device_peak_mib': _device_peak_mib()})


def setup_hd95(case: dict, subject: dict):
  """`surface_metrics.hausdorff_distance` (95th percentile) on one pair."""
  del subject
  import bench_surface_metrics as bsm  # pylint: disable=import-outside-toplevel
  from medseg_jax import surface_metrics  # pylint: disable=import-outside-toplevel
  make = bsm.compact_pair if case['pair'] == 'compact' else bsm.stray_pair
  pred, truth = make(tuple(case['shape']))
  out = {}

  def unit():
    out['value'] = surface_metrics.hausdorff_distance(pred, truth,
                                                      spacing=bsm.SPACING)

  unit()
  return types.SimpleNamespace(info={'value': float(out['value'])}, unit=unit,
                               finish=dict)


def _pipeline_config(case: dict, root: str):
  """Returns the recipe config of a pipeline case (worker_count 0)."""
  # pylint: disable=import-outside-toplevel
  from configs import unet3d, unetpp
  if case['pipeline'] == 'photo2d':
    import bench_input_pipeline as bip
    bip._write_photos(root, case['num_images'], tuple(case['photo_size']))  # pylint: disable=protected-access
    config = unetpp.get_config()
    data = config.data
    data.source, data.root = 'folder', root
    data.val_fraction = data.test_fraction = 0.0
    data.image_size = case['size']
  else:
    config = unet3d.get_config()
    data = config.data
    data.synthetic3d.num_patients = case['num_images']
    data.synthetic3d.volume_size = tuple(case['volume'])
    data.patch_size = tuple(case['patch'])
    data.val_fraction = data.test_fraction = 0.0
  # In this process, without read-ahead threads: process_time() over a
  # block is then exactly the cost of the batches it delivered.
  data.worker_count = 0
  data.prefetch_buffer_size = 0
  data.cache = 'memory'
  return config


class _Memoized:
  """A data source whose records are read once and then kept in memory."""

  def __init__(self, source):
    self._source, self._records = source, {}

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    if index not in self._records:
      self._records[index] = self._source[index]
    return self._records[index]

  def __getattr__(self, name):
    return getattr(self._source, name)


def setup_pipeline(case: dict, subject: dict):
  """The Grain training pipeline with host or device augmentation.

  With `augment_on='device'` the host keeps decoding, caching, patch
  sampling, normalisation and batching; its cost is what this measures.
  The first epoch (decoding into the memory cache) runs during setup, so
  units are steady-state training batches.
  """
  from absl import flags  # pylint: disable=import-outside-toplevel
  from medseg_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  flags.FLAGS.mark_as_parsed()  # Grain reads absl flags; none are parsed here.
  tmp = tempfile.TemporaryDirectory()
  config = _pipeline_config(case, tmp.name)
  where = subject['augment_on']
  if where != 'host':
    if 'augment_on' not in config.data:
      raise ValueError('config.data.augment_on does not exist in '
                       'configs/default.py yet: no device-augmentation figure.')
    config.data.augment_on = where
  data = pipeline.build_splits(config.data)
  if case['pipeline'] == 'patches3d':
    # synthetic3d generates a volume at every read; NIfTI cases are decoded
    # once and then served from the memory cache: hold the volumes likewise.
    data = dataclasses.replace(data, source=_Memoized(data.source))
  batch = case['batch']
  per_epoch = max(1, data.size('train') // batch)
  iterator = iter(pipeline.train_dataset(data, config.data, global_batch=batch,
                                         num_steps=100_000, seed=0))
  start = time.perf_counter()
  for _ in range(per_epoch):
    next(iterator)
  first_s = time.perf_counter() - start

  def finish():
    tmp.cleanup()
    return {}

  return types.SimpleNamespace(
      info={'first_epoch_s': first_s, 'train_images': data.size('train')},
      unit=lambda: next(iterator), finish=finish)


def setup(case: dict, subject: dict):
  """Returns the subject of `case` (see the module docstring)."""
  return {'train': setup_train, 'sliding_window': setup_sliding_window,
          'hd95': setup_hd95, 'pipeline': setup_pipeline}[case['kind']](
              case, subject)

