"""Evaluation plots as PNG files: cases, metric distributions, curves, calibration.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot,
no display, no global backend switch), and written atomically
(`fileio.atomic_write`). Inputs are what `medseg_jax.report` produces: `case_metrics`
rows, `CalibrationAccumulator.summary()` bins, and `workdir.read_metrics`
records. Non-finite values (inf HD95) are left out of the plots and counted
in the titles.
"""

from collections.abc import Sequence
import math

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from medseg_jax import fileio
from medseg_jax import report

DPI = 100
TRUTH_COLOR = (0.1, 0.85, 0.2)  # Binary truth: green; prediction: red.
PRED_COLOR = (0.95, 0.15, 0.1)


def save_png(fig: Figure, path: str) -> None:
  """Renders `fig` to PNG at `path`, atomically (`fileio.atomic_write`)."""
  FigureCanvasAgg(fig)
  with fileio.atomic_write(path, 'wb') as f:
    fig.savefig(f, format='png', dpi=DPI)


# ----------------------------------------------------------- case selection


def _case_dice(rows) -> dict[str, float]:
  """Mean Dice over the foreground classes of each case (finite values)."""
  per_case = {}
  for r in rows:
    per_case.setdefault(str(r['case_id']), []).append(float(r['dice']))
  return {c: float(np.mean([v for v in d if math.isfinite(v)] or [np.nan]))
          for c, d in per_case.items()}


def pick_best_median_worst(rows, k: int = 3) -> list[str]:
  """Returns the ids of `k` cases at evenly spaced Dice ranks, best first.

  k == 3 gives the best, the median and the worst case; larger k adds cases
  in between. Cases are ranked by their mean Dice over foreground classes
  (ties by case id); fewer cases than k gives every case once.

  Args:
    rows: `report.case_metrics` rows (keys 'case_id', 'dice').
    k: number of cases wanted (>= 1).
  """
  if k < 1:
    raise ValueError(f'pick_best_median_worst: k must be >= 1, got {k}.')
  dice = _case_dice(rows)
  ranked = sorted(dice, key=lambda c: (-np.nan_to_num(dice[c], nan=-1.0), c))
  if not ranked:
    return []
  ranks = np.round(np.linspace(0, len(ranked) - 1, k)).astype(int)
  return list(dict.fromkeys(ranked[i] for i in ranks))


def representative_slice_index(truth, pred=None) -> int:
  """Index along axis 0 (axial, for (D, H, W)) with the most foreground.

  Counts truth foreground; if the truth is empty, the prediction's; if both
  are empty, the middle slice.
  """
  for mask in (truth, pred):
    if mask is None:
      continue
    mask = np.asarray(mask)
    per_slice = (mask != 0).reshape(mask.shape[0], -1).sum(axis=1)
    if per_slice.any():
      return int(np.argmax(per_slice))
  return int(np.asarray(truth).shape[0] // 2)


def representative_slice(image, truth, pred):
  """Returns (image[z], truth[z], pred[z]) at `representative_slice_index`.

  Args:
    image: [D, H, W, C] or [D, H, W].
    truth, pred: class maps [D, H, W].
  """
  truth, pred, image = np.asarray(truth), np.asarray(pred), np.asarray(image)
  if truth.ndim != 3 or pred.shape != truth.shape or (
      image.shape[:3] != truth.shape):
    raise ValueError(f'representative_slice: image {image.shape}, truth '
                     f'{truth.shape} and pred {pred.shape} must be volumes '
                     '[D, H, W(, C)] of the same spatial shape.')
  z = representative_slice_index(truth, pred)
  return image[z], truth[z], pred[z]


# ----------------------------------------------------------------- the grid


def display_image(image) -> np.ndarray:
  """Returns `image` [H, W(, C)] as [H, W] grey or [H, W, 3] RGB in [0, 1].

  uint8 is divided by 255; other dtypes are scaled per channel to [0, 1]
  (min-max of the finite values; constant channels become 0). Three channels
  are shown as RGB; one, two or more than three channels as the first.
  """
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3:
    raise ValueError(f'display_image: image must be [H, W] or [H, W, C], got '
                     f'shape {image.shape}.')
  image = image if image.shape[-1] == 3 else image[..., :1]
  if image.dtype == np.uint8:
    out = image.astype(np.float64) / 255.0
  else:
    x = np.where(np.isfinite(image), image, np.nan).astype(np.float64)
    low = np.nanmin(x, axis=(0, 1), initial=np.inf, where=~np.isnan(x))
    high = np.nanmax(x, axis=(0, 1), initial=-np.inf, where=~np.isnan(x))
    span = np.where(high > low, high - low, 1.0)
    out = np.nan_to_num((x - np.where(np.isfinite(low), low, 0.0)) / span)
  out = np.clip(out, 0.0, 1.0)
  return out[..., 0] if out.shape[-1] == 1 else out


def _class_color(index: int, num_foreground: int):
  if num_foreground == 1:
    return None
  return colormaps['tab10']((index - 1) % 10)[:3]


def _overlay(ax, image, mask, color_of, contour=None) -> None:
  """Draws `image`, `mask` filled per class, and `contour` class outlines."""
  ax.imshow(image, cmap='gray', vmin=0.0, vmax=1.0, interpolation='nearest')
  classes = sorted(set(np.unique(mask).tolist()) - {0})
  for c in classes:
    fill = np.zeros(mask.shape + (4,))
    fill[mask == c] = (*color_of(c), 0.45)
    ax.imshow(fill, interpolation='nearest')
  if contour is not None:
    for c in sorted(set(np.unique(contour).tolist()) - {0}):
      outline = (contour == c).astype(float)
      if 0 < outline.sum() < outline.size:
        ax.contour(outline, levels=[0.5], colors=[(1, 1, 1)], linewidths=1.0,
                   linestyles='dashed')
  ax.set_axis_off()


def _case_title(title) -> str:
  if isinstance(title, (int, float, np.number)):
    return f'Dice {float(title):.3f}'
  return str(title)


def plot_case_grid(cases: Sequence, path: str) -> None:
  """Writes one row per case: image | truth overlay | prediction overlay.

  The prediction panel also outlines the truth (white, dashed), so misses and
  false positives show. Binary masks are green (truth) and red (prediction);
  multi-class maps use one colour per class in both.

  Args:
    cases: (image [H, W(, C)], truth [H, W], pred [H, W], title) per case;
      title is a string or a Dice value. For volumes pass a 2D slice
      (`representative_slice`).
    path: PNG file to write.
  """
  cases = list(cases)
  if not cases:
    raise ValueError(f'plot_case_grid({path!r}): no cases to plot.')
  prepared = []
  for i, case in enumerate(cases):
    if len(case) != 4:
      raise ValueError(f'plot_case_grid: case {i} must be (image, truth, '
                       f'pred, title), got {len(case)} items.')
    image, truth, pred, title = case
    image, truth, pred = display_image(image), np.asarray(truth), np.asarray(
        pred)
    if truth.shape != image.shape[:2] or pred.shape != truth.shape:
      raise ValueError(
          f'plot_case_grid: case {i} ({_case_title(title)}) has image '
          f'{image.shape[:2]}, truth {truth.shape}, pred {pred.shape}; all '
          'must be the same [H, W] (for volumes use representative_slice).')
    prepared.append((image, truth, pred, _case_title(title)))
  num_fg = max(max(int(t.max(initial=0)), int(p.max(initial=0)))
               for _, t, p, _ in prepared)
  fig = Figure(figsize=(9, 3 * len(prepared)))
  axes = fig.subplots(len(prepared), 3, squeeze=False)
  for row, (image, truth, pred, title) in zip(axes, prepared):
    truth_color = lambda c: _class_color(c, num_fg) or TRUTH_COLOR
    pred_color = lambda c: _class_color(c, num_fg) or PRED_COLOR
    row[0].imshow(image, cmap='gray', vmin=0.0, vmax=1.0)
    row[0].set_axis_off()
    row[0].set_title(title, fontsize=9)
    _overlay(row[1], image, truth, truth_color)
    row[1].set_title('truth', fontsize=9)
    _overlay(row[2], image, pred, pred_color, contour=truth)
    row[2].set_title('prediction (truth dashed)', fontsize=9)
  fig.tight_layout()
  save_png(fig, path)


# ------------------------------------------------------------ distributions


def _finite(values) -> tuple[np.ndarray, int]:
  v = np.asarray(values, np.float64)
  keep = np.isfinite(v)
  return v[keep], int((~keep).sum())


def plot_metric_distributions(rows, path: str) -> None:
  """Writes box plots (with the cases as points) per metric and class.

  One panel per overlap and distance metric, one box per class; non-finite
  values are left out and counted in the panel title. A last panel plots
  predicted against true volume per case.

  Args:
    rows: `report.case_metrics` rows.
    path: PNG file to write.
  """
  if not rows:
    raise ValueError(f'plot_metric_distributions({path!r}): no rows.')
  classes = sorted({(int(r['class_index']), str(r['class_name']))
                    for r in rows})
  names = report.OVERLAP_METRICS + report.DISTANCE_METRICS
  fig = Figure(figsize=(16, 7))
  axes = fig.subplots(2, 4).ravel()
  jitter = np.random.default_rng(0)
  for ax, metric in zip(axes, names):
    data, excluded = [], 0
    for index, _ in classes:
      values, bad = _finite([r[metric] for r in rows
                             if int(r['class_index']) == index])
      data.append(values)
      excluded += bad
    positions = np.arange(1, len(classes) + 1)
    keep = [i for i, d in enumerate(data) if d.size]
    if keep:
      ax.boxplot([data[i] for i in keep], positions=positions[keep],
                 widths=0.5, showfliers=False)
      for i in keep:
        x = positions[i] + jitter.uniform(-0.12, 0.12, data[i].size)
        ax.plot(x, data[i], '.', alpha=0.6, markersize=4)
    else:
      ax.text(0.5, 0.5, 'no finite values', ha='center', va='center',
              transform=ax.transAxes)
    ax.set_xticks(positions, [name for _, name in classes], fontsize=8)
    ax.set_xlim(0.4, len(classes) + 0.6)
    unit = f' ({rows[0].get("distance_unit", "")})' if (
        metric in report.DISTANCE_METRICS) else ''
    ax.set_title(metric + unit + (f'\n{excluded} non-finite excluded'
                                  if excluded else ''), fontsize=9)
  _plot_volumes(axes[-1], rows, classes)
  fig.tight_layout()
  save_png(fig, path)


def _plot_volumes(ax, rows, classes) -> None:
  """Scatter of predicted against true volume, one colour per class."""
  top = 0.0
  for index, name in classes:
    mine = [r for r in rows if int(r['class_index']) == index]
    t = np.asarray([float(r['truth_volume']) for r in mine])
    p = np.asarray([float(r['pred_volume']) for r in mine])
    ax.plot(t, p, 'o', markersize=4, alpha=0.7, label=name)
    top = max(top, float(np.max(t, initial=0)), float(np.max(p, initial=0)))
  top = top or 1.0
  ax.plot([0, top], [0, top], 'k--', linewidth=0.8)
  unit = rows[0].get('volume_unit', '')
  ax.set_xlabel(f'true volume ({unit})', fontsize=8)
  ax.set_ylabel(f'predicted volume ({unit})', fontsize=8)
  ax.set_title('volume agreement', fontsize=9)
  if len(classes) > 1:
    ax.legend(fontsize=7)


# ---------------------------------------------------------- training curves


def _series(records, split: str, key: str):
  """(steps, values) of `key` in the records of `split`, by step."""
  points = sorted((int(r['step']), float(r[key])) for r in records
                  if r.get('split') == split and key in r
                  and r[key] is not None)
  return (np.asarray([s for s, _ in points]),
          np.asarray([v for _, v in points]))


def plot_training_curves(records, path: str) -> None:
  """Writes training loss and validation Dice against step.

  Args:
    records: `workdir.read_metrics(workdir)`: dicts with 'step', 'split'
      and metric keys ('loss' in 'train' records; 'dice' and optionally
      'dice_std' and 'loss' in 'val' records).
    path: PNG file to write.
  """
  records = list(records)
  for i, r in enumerate(records):
    if 'step' not in r or 'split' not in r:
      raise ValueError(f'plot_training_curves: record {i} has no "step" or '
                       f'"split" key ({sorted(r)}); pass the records of '
                       'workdir.read_metrics.')
  fig = Figure(figsize=(11, 4))
  ax_loss, ax_dice = fig.subplots(1, 2)
  for split, style in (('train', '-'), ('val', 'o-')):
    steps, loss = _series(records, split, 'loss')
    if steps.size:
      ax_loss.plot(steps, loss, style, markersize=3, label=f'{split} loss')
  steps, dice = _series(records, 'val', 'dice')
  if steps.size:
    ax_dice.plot(steps, dice, 'o-', markersize=3, label='val Dice')
    s_steps, std = _series(records, 'val', 'dice_std')
    if s_steps.size == steps.size:
      ax_dice.fill_between(steps, dice - std, dice + std, alpha=0.2,
                           label='± std over cases')
    best = int(np.nanargmax(dice)) if np.isfinite(dice).any() else None
    if best is not None:
      ax_dice.plot(steps[best], dice[best], '*', markersize=12,
                   label=f'best {dice[best]:.4f} @ {steps[best]}')
  for ax, what in ((ax_loss, 'loss'), (ax_dice, 'Dice')):
    ax.set_xlabel('step')
    ax.set_ylabel(what)
    if ax.lines:
      ax.legend(fontsize=8)
    else:
      ax.text(0.5, 0.5, f'no {what} records', ha='center', va='center',
              transform=ax.transAxes)
  ax_loss.set_title('training loss')
  ax_dice.set_title('validation Dice')
  fig.tight_layout()
  save_png(fig, path)


# --------------------------------------------------------------- calibration


def _floats(values) -> np.ndarray:
  """Array of floats with None (JSON null) as NaN."""
  return np.asarray([np.nan if v is None else float(v) for v in values])


def plot_reliability(bins: dict, path: str) -> None:
  """Writes a reliability diagram with the ECE in its title.

  Args:
    bins: `calibration.CalibrationAccumulator.summary()` or
      `calibration.reliability_bins` output ('edges', 'confidence', 'accuracy',
      'count', optional 'ece'; None read back from JSON counts as empty).
    path: PNG file to write.
  """
  missing = {'edges', 'confidence', 'accuracy', 'count'} - set(bins)
  if missing:
    raise ValueError(f'plot_reliability: bins lack {sorted(missing)}; pass '
                     'CalibrationAccumulator.summary() or reliability_bins.')
  edges, count = _floats(bins['edges']), _floats(bins['count'])
  confidence, accuracy = _floats(bins['confidence']), _floats(
      bins['accuracy'])
  ece = bins.get('ece')
  if ece is None:
    n = np.nansum(count)
    ece = float(np.nansum(count * np.abs(accuracy - confidence)) / n) if (
        n) else 0.0
  centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
  fig = Figure(figsize=(5, 6))
  ax, ax_count = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
  filled = np.isfinite(accuracy)
  ax.bar(centers[filled], accuracy[filled], width[filled], edgecolor='k',
         linewidth=0.5, label='accuracy')
  ax.bar(centers[filled], (confidence - accuracy)[filled], width[filled],
         bottom=accuracy[filled], color='tab:red', alpha=0.3, label='gap')
  ax.plot([0, 1], [0, 1], 'k--', linewidth=0.8, label='perfect calibration')
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_ylabel('accuracy')
  ax.legend(fontsize=8, loc='upper left')
  ax.set_title(f'Reliability (ECE = {ece:.4f})')
  ax_count.bar(centers, np.nan_to_num(count), width, color='gray')
  if np.nansum(count) > 0:
    ax_count.set_yscale('log')
  ax_count.set_xlabel('confidence')
  ax_count.set_ylabel('pixels')
  fig.tight_layout()
  save_png(fig, path)
