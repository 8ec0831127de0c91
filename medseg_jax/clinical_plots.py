"""Plots of the clinical analyses: forest plot, decision curve, ROC/PR, comparison.

Inputs are the dicts of `subgroups.analyse`, `decision_curve.analyse` and
`external_report`; figures are drawn like `plots` (object API, Agg canvas,
atomic PNG writes).
"""

import math

from matplotlib.figure import Figure
import numpy as np

from medseg_jax import plots


def plot_forest(analysis: dict, path: str) -> None:
  """Writes a forest plot: each group's mean and CI, per column.

  Args:
    analysis: `subgroups.analyse` output.
    path: PNG file to write.
  """
  labels, means, lows, highs, flagged = [], [], [], [], []
  for c in analysis['columns']:
    for g in c['groups']:
      labels.append(f'{c["column"]}: {g["group"]} (n={g["n"]})')
      means.append(g['mean'])
      lows.append(g['ci_low'] if math.isfinite(g['ci_low']) else g['mean'])
      highs.append(g['ci_high'] if math.isfinite(g['ci_high']) else g['mean'])
      flagged.append(g['flagged'])
  fig = Figure(figsize=(7, 1.2 + 0.35 * max(len(labels), 1)))
  ax = fig.subplots()
  y = np.arange(len(labels))[::-1]
  means = np.asarray(means, np.float64)
  errors = np.abs(np.array([means - np.asarray(lows), np.asarray(highs) -
                            means]))
  colors = ['tab:red' if f else 'tab:blue' for f in flagged]
  for yi, m, e0, e1, color in zip(y, means, errors[0], errors[1], colors):
    ax.errorbar([m], [yi], xerr=[[e0], [e1]], fmt='o', color=color,
                capsize=3)
  overall = analysis.get('overall_mean')
  if overall is not None and math.isfinite(overall):
    ax.axvline(overall, color='k', linestyle='--', linewidth=0.8,
               label=f'all cases {overall:.3f}')
    ax.legend(fontsize=8, loc='lower right')
  ax.set_yticks(y, labels, fontsize=8)
  ax.set_xlabel(f'{analysis["metric"]} (mean, 95% CI); red: significantly '
                'worse')
  ax.set_title(f'Subgroups ({analysis["num_cases"]} cases)')
  ax.grid(axis='x', alpha=0.3)
  fig.tight_layout()
  plots.save_png(fig, path)


def plot_decision_curve(analysis: dict, path: str) -> None:
  """Writes net benefit against threshold probability: model, all, none.

  Args:
    analysis: `decision_curve.analyse` output.
    path: PNG file to write.
  """
  c = analysis['curve']
  fig = Figure(figsize=(6, 4.5))
  ax = fig.subplots()
  ax.plot(c['threshold'], c['model'], label='model', color='tab:blue')
  ax.plot(c['threshold'], c['treat_all'], label='treat all',
          color='tab:gray', linestyle='--')
  ax.plot(c['threshold'], c['treat_none'], label='treat none', color='k',
          linewidth=0.8)
  prevalence = analysis['num_positive'] / max(analysis['num_cases'], 1)
  top = max(max(c['model']), prevalence, 0.01)
  ax.set_ylim(-0.1 * top - 0.02, 1.15 * top)
  ax.set_xlim(0, 1)
  ax.set_xlabel('threshold probability')
  ax.set_ylabel('net benefit')
  ax.set_title(f'Decision curve ({analysis["num_positive"]}/'
               f'{analysis["num_cases"]} positive)')
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  plots.save_png(fig, path)


def plot_roc_pr(analysis: dict, path: str) -> None:
  """Writes the case-level ROC and precision-recall curves side by side.

  Args:
    analysis: `decision_curve.analyse` output.
    path: PNG file to write.
  """
  fig = Figure(figsize=(10, 4.5))
  ax_roc, ax_pr = fig.subplots(1, 2)
  roc, pr = analysis['roc'], analysis['pr']
  ax_roc.plot(roc['fpr'], roc['tpr'])  # Ties between classes: diagonal.
  ax_roc.plot([0, 1], [0, 1], 'k--', linewidth=0.8)
  ax_roc.set_xlabel('false positive rate')
  ax_roc.set_ylabel('true positive rate')
  ax_roc.set_title(f'ROC, AUC {analysis["auc"]:.3f} [{analysis["auc_ci_low"]:.3f}, '
                   f'{analysis["auc_ci_high"]:.3f}]')
  # Each precision holds over the recall step it ends, as AP counts it.
  ax_pr.plot([0.0] + list(pr['recall']), list(pr['precision'][:1]) +
             list(pr['precision']), drawstyle='steps-pre')
  ax_pr.set_xlabel('recall')
  ax_pr.set_ylabel('precision')
  ax_pr.set_title(f'Precision-recall, AP {analysis["average_precision"]:.3f}')
  for ax in (ax_roc, ax_pr):
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  plots.save_png(fig, path)


def _reliability(ax, bins: dict, name: str) -> None:
  edges = np.asarray(bins['edges'], np.float64)
  accuracy = np.array([np.nan if a is None else a for a in bins['accuracy']],
                      np.float64)
  centers = (edges[:-1] + edges[1:]) / 2
  filled = np.isfinite(accuracy)
  ax.bar(centers[filled], accuracy[filled], np.diff(edges)[filled],
         edgecolor='k', linewidth=0.5)
  ax.plot([0, 1], [0, 1], 'k--', linewidth=0.8)
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_xlabel('confidence')
  ax.set_ylabel('accuracy')
  ax.set_title(f'{name}: ECE {bins.get("ece") or 0.0:.4f}')


def plot_comparison(internal: dict, external: dict, path: str,
                    metric: str = 'dice') -> None:
  """Writes the internal/external pair: metric distributions and reliability.

  Args:
    internal: {'values': per-case metric values, 'calibration': bins or
      None} of the internal test split.
    external: the same for the external data.
    path: PNG file to write.
    metric: the metric whose distributions are shown.
  """
  fig = Figure(figsize=(13, 4.2))
  ax_dist, ax_int, ax_ext = fig.subplots(1, 3)
  data = [np.asarray(d['values'], np.float64) for d in (internal, external)]
  data = [d[np.isfinite(d)] for d in data]
  ax_dist.boxplot([d if d.size else [np.nan] for d in data], showfliers=False,
                  tick_labels=['internal test', 'external'])
  for i, d in enumerate(data, start=1):
    jitter = np.random.default_rng(i).uniform(-0.12, 0.12, d.size)
    ax_dist.plot(i + jitter, d, 'o', alpha=0.5, markersize=3)
  ax_dist.set_ylabel(metric)
  ax_dist.set_title(f'{metric} per case')
  for ax, d, name in ((ax_int, internal, 'internal test'),
                      (ax_ext, external, 'external')):
    if d.get('calibration'):
      _reliability(ax, d['calibration'], name)
    else:
      ax.set_title(f'{name}: no calibration bins')
      ax.axis('off')
  fig.tight_layout()
  plots.save_png(fig, path)
