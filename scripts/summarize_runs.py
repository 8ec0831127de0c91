r"""Speed figures of finished training runs, from their metrics.jsonl.

    python scripts/summarize_runs.py runs/unetpp runs/unet [--output=runs.md]

For each workdir: the model, dtype, `data.augment_on`, `data.worker_count`,
global batch and device count (from config.json and the compile record),
the train-step compile time, the median and the last logged training
throughput (images or patches per second, over the logging intervals after
the first, which include compilation and the input pipeline's start), the
last validation Dice, and the peak device memory when the run logged it.
Prints a Markdown table (and writes it to --output). Reads only what the
runs wrote; nothing is re-run.
"""

import argparse
import json
import os
import statistics


def read_records(workdir: str) -> list[dict]:
  """Returns the JSON records of WORKDIR/metrics.jsonl (a cut line skipped).

  Args:
    workdir: a training workdir.

  Returns:
    The records in file order.
  """
  records = []
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue  # A line cut off by a killed run.
  return records


def summarize(workdir: str) -> dict:
  """Returns one table row of figures for a workdir (see the module doc).

  Args:
    workdir: a training workdir with config.json and metrics.jsonl.

  Returns:
    {column: value}; missing figures are None.
  """
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    config = json.load(f)
  records = read_records(workdir)
  speeds = [r['images_per_s'] for r in records
            if r.get('split') == 'train' and 'images_per_s' in r]
  compiles = [r['compile_time_s'] for r in records
              if r.get('split') == 'compile']
  vals = [r for r in records if r.get('split') == 'val' and 'dice' in r]
  steady = speeds[1:] or speeds
  return {
      'run': os.path.basename(os.path.normpath(workdir)),
      'model': config['model']['name'],
      'dtype': config['model'].get('dtype'),
      'augment_on': config['data'].get('augment_on', 'host'),
      'workers': config['data'].get('worker_count'),
      'batch': config['train']['batch_size'],
      'compile_s': compiles[-1] if compiles else None,
      'images_per_s_median': statistics.median(steady) if steady else None,
      'images_per_s_last': speeds[-1] if speeds else None,
      'val_dice': vals[-1]['dice'] if vals else None,
      'steps': max((r.get('step', 0) for r in records), default=0),
  }


def _cell(value) -> str:
  if value is None:
    return '—'
  if isinstance(value, float):
    return f'{value:.4g}'
  return str(value)


def markdown(rows: list[dict]) -> str:
  """Returns the rows as a Markdown table (columns of the first row)."""
  if not rows:
    return '(no runs)\n'
  columns = list(rows[0])
  lines = ['| ' + ' | '.join(columns) + ' |',
           '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(_cell(r[c]) for c in columns) + ' |'
            for r in rows]
  return '\n'.join(lines) + '\n'


def main(argv=None) -> None:
  """Prints (and optionally writes) the table of the given workdirs."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('workdirs', nargs='+', help='training workdirs')
  parser.add_argument('--output', default='', help='also write the table here')
  args = parser.parse_args(argv)
  rows = []
  for workdir in args.workdirs:
    try:
      rows.append(summarize(workdir))
    except (OSError, KeyError, ValueError) as error:
      print(f'skipped {workdir}: {error}')
  table = markdown(rows)
  print(table)
  if args.output:
    with open(args.output, 'w', encoding='utf-8') as f:
      f.write(table)


if __name__ == '__main__':
  main()
