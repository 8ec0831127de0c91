"""Registration as preprocessing: `config.data.preprocess.register_to`.

With `register_to = r` (a channel index; -1 is off), every other channel of
a case is registered to channel r with `registration.register` (a rigid or
affine transform, `register_kind`; Mattes MI or NCC, `register_metric`),
once per case, before intensity normalisation:

* `attach(source, config.data, report_dir)` runs in the main process after
  the source is built (training, evaluation): it computes each case's
  transforms with JAX, or reads them from
  `<cache_dir or ~/.cache/medseg_jax>/registration/` (one small JSON per
  case; the name hashes the case's files and the registration settings), and
  hands them to the source. The data code applies them with SciPy when it
  decodes a case (`preprocess.apply_channel_transforms`), in any Grain
  worker, and the case cache key includes them, so cached cases are always
  the registered ones. `<report_dir>/registration.csv` lists, per case and
  channel, the metric before and after and whether it converged.
* `align_channels(image, spacing, config.data.preprocess)` registers one new
  case the same way (the Predictor calls it before preprocessing).

A channel's registration is flagged as not converged when its final metric
is below the metric before registration by more than `CONVERGENCE_TOL`
(relative): it made the alignment worse (diverged, or a wrong optimum); or
when the finest pyramid level was still improving at its end: the linear
trend over its last fifth of steps gains more than `CONVERGENCE_TOL`, so
more iterations would help. Flagged cases are listed in the report and on
the console; their transforms are still applied. (At the optimum the metric
wobbles by a percent or two on small volumes, as interpolation changes the
histogram: hence a tolerance and a trend over many steps.)
This module imports JAX (through `registration`); medseg_jax/data never does.
"""

import csv
import io
import json
import os
import re
import time

import jax.numpy as jnp
import numpy as np

from medseg_jax import fileio
from medseg_jax import registration
from medseg_jax import registration_metrics
from medseg_jax.data import cache as cache_lib
from medseg_jax.data import preprocess
from medseg_jax.data import volume_io

CONVERGENCE_TOL = 0.05
_FORMAT = 2  # Part of every cached file's key: bump when its content changes.
REPORT_NAME = 'registration.csv'
REPORT_COLUMNS = ('case_id', 'channel', 'register_to', 'metric_before',
                  'final_metric', 'converged', 'seconds', 'cached')


def converged(result: registration.Registration,
              metric_before: float) -> bool:
  """Whether a registration may be trusted (module docstring).

  Args:
    result: what `registration.register` returned.
    metric_before: the metric of the unregistered pair (`metric_before`).

  Returns:
    False when the final metric is not finite or below `metric_before` by
    more than CONVERGENCE_TOL x scale, or when the finest level's linear
    trend over its last fifth of steps gains more than that; scale =
    max(|final|, |metric_before|, 1e-3). Else True.
  """
  final = float(result.final_metric)
  scale = max(abs(final), abs(metric_before), 1e-3)
  if not np.isfinite(final) or final < metric_before - CONVERGENCE_TOL * scale:
    return False
  history = np.asarray(result.metric_history[-result.level_steps[-1]:],
                       np.float64)
  n = len(history) // 5
  if n < 2:
    return True  # Too few steps to see a trend.
  gain = np.polyfit(np.arange(n), history[-n:], 1)[0] * n
  return bool(gain <= CONVERGENCE_TOL * scale)


def metric_before(fixed: np.ndarray, moving: np.ndarray, spacing, metric: str,
                  bins: int = 32, max_samples: int | None = 200_000) -> float:
  """Returns the metric of two channels as they are (identity transform).

  Computed as `registration.register` computes its final metric (the same
  samples, histogram ranges and bins), so the two compare.
  """
  fixed = np.asarray(fixed, np.float32)
  moving = np.asarray(moving, np.float32)
  values, points = registration.sample_points(fixed, spacing, max_samples)
  moved, inside = registration.resample(
      jnp.asarray(moving), jnp.eye(fixed.ndim + 1), jnp.asarray(points),
      jnp.asarray(spacing, jnp.float32))
  metric_fn = registration_metrics.make_metric(
      metric, jnp.asarray(values), (float(fixed.min()), float(fixed.max())),
      (float(moving.min()), float(moving.max())), bins)
  return float(metric_fn(moved, inside))


def register_channels(image: np.ndarray, spacing, preprocess_cfg,
                      **register_kwargs) -> tuple[list, list[dict]]:
  """Registers every channel of one case to channel `register_to`.

  Args:
    image: `[D, H, W, C]` raw intensities.
    spacing: (D, H, W) mm.
    preprocess_cfg: config.data.preprocess (register_to, register_kind,
      register_metric).
    **register_kwargs: passed to `registration.register` (levels,
      iterations, ...), e.g. fewer iterations in tests.

  Returns:
    (matrices: one per channel, None for the reference; rows: one dict per
    registered channel with 'channel', 'final_metric', 'converged',
    'seconds').

  Raises:
    ValueError: register_to is not a channel of the image.
  """
  options = preprocess.options(preprocess_cfg)
  ref = options['register_to']
  image = np.asarray(image, np.float32)
  if image.ndim == 3:
    image = image[..., None]
  channels = image.shape[-1]
  if not 0 <= ref < channels:
    raise ValueError(f'config.data.preprocess.register_to={ref} is out of '
                     f'range: the case has {channels} channel(s) '
                     f'(0..{channels - 1}).')
  matrices, rows = [], []
  for c in range(channels):
    if c == ref:
      matrices.append(None)
      continue
    start = time.perf_counter()
    result = registration.register(
        image[..., ref], image[..., c], spacing_fixed=spacing,
        kind=options['register_kind'], metric=options['register_metric'],
        **register_kwargs)
    before = metric_before(
        image[..., ref], image[..., c], spacing, options['register_metric'],
        **{k: register_kwargs[k] for k in ('bins', 'max_samples')
           if k in register_kwargs})
    matrices.append(np.asarray(result.matrix, np.float64))
    rows.append(dict(channel=c, metric_before=before,
                     final_metric=float(result.final_metric),
                     converged=converged(result, before),
                     seconds=time.perf_counter() - start))
  return matrices, rows


def align_channels(image: np.ndarray, spacing, preprocess_cfg,
                   **register_kwargs) -> np.ndarray:
  """Returns a new case with its channels registered as in training.

  Args:
    image: `[D, H, W, C]` raw intensities.
    spacing: (D, H, W) mm.
    preprocess_cfg: config.data.preprocess; register_to -1 returns `image`.
    **register_kwargs: see `register_channels`.

  Returns:
    float32 `[D, H, W, C]`, every channel resampled onto channel
    `register_to` (`preprocess.apply_channel_transforms`).
  """
  if preprocess.options(preprocess_cfg)['register_to'] < 0:
    return image
  matrices, _ = register_channels(image, spacing, preprocess_cfg,
                                  **register_kwargs)
  return preprocess.apply_channel_transforms(image, spacing, matrices)


def _cache_path(data_cfg, case, settings) -> str:
  """The JSON of a case's transforms: its files and settings hashed."""
  files = [f for path in case.images for f in volume_io.volume_files(path)]
  key = cache_lib.files_key(files, [_FORMAT, settings])
  safe = re.sub(r'[^A-Za-z0-9_.-]', '_', case.case_id)[-80:]
  base = data_cfg.cache_dir or cache_lib.cache_home()
  return os.path.join(base, 'registration', f'{safe}-{key[:20]}.json')


def _read_cached(path: str):
  """Returns (matrices, rows) from a cached JSON, or None if unusable."""
  try:
    with open(path) as f:
      data = json.load(f)
    matrices = [None if m is None else np.asarray(m, np.float64)
                for m in data['matrices']]
    return matrices, list(data['rows'])
  except (OSError, ValueError, KeyError, TypeError):
    return None  # Absent or damaged: registered again and rewritten.


def _write_cached(path: str, matrices, rows) -> None:
  """Writes a case's transforms; a cache that cannot be written is skipped."""
  blob = json.dumps({'matrices': [None if m is None else m.tolist()
                                  for m in matrices], 'rows': rows})
  try:
    fileio.write_text(path, blob)
  except OSError:
    pass  # Only costs a registration next time.


def attach(source, data_cfg, report_dir: str = '', **register_kwargs
           ) -> list[dict]:
  """Registers every case of a volume source and hands it the transforms.

  Args:
    source: a `NiftiSource` or a `SliceSource` over one.
    data_cfg: config.data (preprocess.register_*, cache_dir).
    report_dir: where `registration.csv` is written ('' = nowhere).
    **register_kwargs: see `register_channels`.

  Returns:
    The report rows (one per case and registered channel, REPORT_COLUMNS);
    [] when config.data.preprocess.register_to is -1.

  Raises:
    ValueError: a source that is not made of volume channels, or
      register_to out of range.
  """
  options = preprocess.options(data_cfg.preprocess)
  if options['register_to'] < 0:
    return []
  volumes = getattr(source, 'volumes', source)
  if not hasattr(volumes, 'set_registration'):
    raise ValueError(f'config.data.preprocess.register_to='
                     f'{options["register_to"]} needs volume channels '
                     f"(config.data.source='nifti'); {source!r} has none.")
  settings = {k: options[k] for k in ('register_to', 'register_kind',
                                      'register_metric')}
  settings['kwargs'] = {k: register_kwargs[k] for k in sorted(register_kwargs)}
  start, all_matrices, report = time.perf_counter(), [], []
  for index, case in enumerate(volumes.cases):
    path = _cache_path(data_cfg, case, settings)
    cached = _read_cached(path)
    if cached is None:
      image, spacing = volumes.read_raw(index)
      try:
        matrices, rows = register_channels(image, spacing, data_cfg.preprocess,
                                           **register_kwargs)
      except ValueError as e:
        raise ValueError(f'{case.images[0]}: {e}') from e
      _write_cached(path, matrices, rows)
    else:
      matrices, rows = cached
    all_matrices.append(matrices)
    report += [dict(case_id=case.case_id, register_to=options['register_to'],
                    cached=cached is not None, **row) for row in rows]
  volumes.set_registration(all_matrices)
  _summarise(report, time.perf_counter() - start, options['register_to'])
  if report_dir:
    write_report(os.path.join(report_dir, REPORT_NAME), report)
  return report


def _summarise(report, seconds: float, ref: int) -> None:
  """Prints one line, and one more naming the cases that did not converge."""
  cases = {r['case_id'] for r in report}
  cached = {r['case_id'] for r in report if r['cached']}
  print(f'Registration: channels of {len(cases)} case(s) registered to '
        f'channel {ref} ({len(cached)} from the cache) in {seconds:.1f} s.')
  bad = sorted({r['case_id'] for r in report if not r['converged']})
  if bad:
    print(f'Registration did not converge for {len(bad)} case(s): '
          f'{", ".join(bad[:10])}{" ..." if len(bad) > 10 else ""} '
          f'(see {REPORT_NAME}); check them or use more iterations.')


def write_report(path: str, rows) -> None:
  """Writes the registration report CSV (REPORT_COLUMNS) atomically."""
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=REPORT_COLUMNS,
                          extrasaction='ignore', lineterminator='\n')
  writer.writeheader()
  for row in rows:
    writer.writerow({**row, 'final_metric': f'{row["final_metric"]:.6g}',
                     'metric_before': f'{row["metric_before"]:.6g}',
                     'seconds': f'{row["seconds"]:.3f}'})
  fileio.write_text(path, buffer.getvalue())
