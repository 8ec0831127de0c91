"""The clinical analyses of `--mode=evaluate`, as evaluate.py calls them.

    metadata = check_metadata(config, source)        # before any prediction
    summary.update(analyses(config, rows, max_probs, metadata))
    write_reports(summary, out_dir)                  # CSVs and plots
    line = compare_external(workdir, root, out_dir, flags)

Subgroups (`config.eval.subgroups`: subgroups.csv, subgroups.png and a
summary.md section), decision curves (`config.eval.decision`:
decision_curve.csv, decision_cases.csv, decision_curve.png, roc_pr.png and
a section) and, for an external data set, comparison.md/.png against the
run's internal test split. Imports no JAX.
"""

import os

from medseg_jax import case_metadata
from medseg_jax import clinical_plots
from medseg_jax import decision_curve
from medseg_jax import external_report
from medseg_jax import subgroups


def check_metadata(config, source) -> dict:
  """Returns {case_id: {column: value}} for the analyses the config asks for.

  Raises ValueError (one line: the missing column and those available)
  before anything is predicted. {} when no analysis needs metadata.
  """
  return case_metadata.metadata_for_evaluation(config, source)


def analyses(config, rows, max_probs: dict, metadata: dict) -> dict:
  """Returns {'subgroups': ..., 'decision': ...}, the analyses configured.

  Args:
    config: the evaluation's config (eval.subgroups, eval.decision).
    rows: the split's per-case rows.
    max_probs: {case_id: max foreground probability} of the same
      predictions.
    metadata: `check_metadata` output.
  """
  out = {}
  columns = [str(c).strip().lower() for c in config.eval.subgroups]
  if columns:
    out['subgroups'] = subgroups.analyse(
        rows, metadata, columns, num_bins=config.eval.subgroup_bins)
  if config.eval.decision.rule:
    table = decision_curve.case_table(rows, max_probs, metadata,
                                      config.eval.decision)
    out['decision'] = decision_curve.analyse(table, config.eval.decision)
  return out


def write_reports(summary: dict, out_dir: str) -> None:
  """Writes the CSVs and plots of the analyses in `summary` into `out_dir`.

  The decision analysis' case table goes to decision_cases.csv and is
  taken out of the summary (summary.json stays one line per statistic).
  """
  if summary.get('subgroups'):
    subgroups.write_csv(summary['subgroups'],
                        os.path.join(out_dir, 'subgroups.csv'))
    clinical_plots.plot_forest(summary['subgroups'],
                               os.path.join(out_dir, 'subgroups.png'))
  if summary.get('decision'):
    decision = summary['decision']
    decision_curve.write_csv(decision,
                             os.path.join(out_dir, 'decision_curve.csv'))
    decision_curve.write_case_csv(decision,
                                  os.path.join(out_dir, 'decision_cases.csv'))
    decision.pop('cases')
    clinical_plots.plot_decision_curve(
        decision, os.path.join(out_dir, 'decision_curve.png'))
    clinical_plots.plot_roc_pr(decision, os.path.join(out_dir, 'roc_pr.png'))


def internal_root(workdir: str, root: str):
  """Returns the run's own report root matching an external `root`, or None.

  WORKDIR/eval/external-<h>[/rest] -> WORKDIR/eval[/rest]; None when `root`
  is not an external data set's.
  """
  eval_dir = os.path.join(workdir, 'eval')
  parts = os.path.relpath(root, eval_dir).split(os.sep)
  if not parts[0].startswith('external-'):
    return None
  return os.path.join(eval_dir, *parts[1:])


def compare_external(workdir: str, root: str, out_dir: str,
                     flags: str = '') -> str | None:
  """Writes comparison.md into an external split's folder; returns its line.

  Args:
    workdir: the run's workdir.
    root: the evaluation's report root (`evaluate.eval_root`).
    out_dir: the external split's folder (its cases.csv and summary.json
      written).
    flags: the checkpoint/ensemble flags of this evaluation, repeated in the
      command that writes the internal test split when it is missing.

  Returns:
    A console line, or None for the run's own data (nothing written).
  """
  internal = internal_root(workdir, root)
  if internal is None:
    return None
  command = ('python -m medseg_jax.main --mode=evaluate '
             f'--workdir={workdir} --split=test{flags}')
  return external_report.write_comparison(os.path.join(internal, 'test'),
                                          out_dir, command)
