"""Figures and Markdown of `scripts/benchmark.py` (pure functions, no JAX).

`summarize` turns a row's timed units into medians, rates, ratios and MFU;
`markdown` writes the tables.
"""

import os
import statistics

# Dense bf16 peak TFLOP/s (no sparsity), from the vendors' data sheets.
# Matched in order against JAX's device_kind: specific names first.
PEAK_BF16_TFLOPS = (
    ('H100 PCIe', 756.0), ('H100 NVL', 835.0), ('GH200', 989.4),
    ('H200', 989.4), ('H100', 989.4), ('H800', 989.4), ('B200', 2250.0),
    ('A100', 312.0), ('A800', 312.0), ('L40S', 362.0), ('L40', 181.0),
    ('L4', 121.0), ('A10G', 70.0), ('A10', 125.0), ('RTX 4090', 165.2),
    ('RTX 3090', 71.0), ('V100', 125.0),  # V100: fp16 tensor cores, no bf16.
    ('TPU v6 lite', 918.0), ('TPU v5p', 459.0), ('TPU v5 lite', 197.0),
    ('TPU v5e', 197.0), ('TPU v4', 275.0),
)


def peak_bf16_tflops(device_kind: str) -> float | None:
  """Returns the device's dense bf16 peak in TFLOP/s, None if unknown (CPUs).

  Args:
    device_kind: JAX's `device.device_kind`, e.g. 'NVIDIA H100 80GB HBM3'.
  """
  for name, tflops in PEAK_BF16_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops
  return None


def summarize(result: dict, peak_tflops: float | None) -> dict:
  """Adds medians, rates, ratios and MFU to a row from `run_case`.

  Per subject: `unit_s` (median wall seconds per unit), `rate` (items/s),
  `cpu_s_per_item` (median process CPU seconds per item), `tflops` and `mfu`
  (when XLA's FLOPs and a peak are known). Every subject after the first
  gets `ratio`: for timed rows, its unit time over the first's (the first
  subject's speed relative to it, > 1 = the first is faster); for pipeline
  rows, the first's host CPU seconds per item over its own (how many times
  less host CPU it needs).

  Args:
    result: a row with subjects' 'units' ([[wall, cpu], ...]) and 'info'.
    peak_tflops: the device's peak bf16 TFLOP/s, or None.

  Returns:
    The row, completed.
  """
  items = result['items_per_unit']
  for s in result['subjects']:
    if s.get('error') or not s.get('units'):
      s.setdefault('error', 'no timed units')
      continue
    wall = statistics.median(u[0] for u in s['units'])
    cpu = statistics.median(u[1] for u in s['units'])
    s.update(unit_s=wall, rate=items / wall, cpu_s_per_item=cpu / items,
             spread=(max(u[0] for u in s['units']) -
                     min(u[0] for u in s['units'])) / wall)
    flops = s.get('info', {}).get('flops')
    if flops:
      s['tflops'] = flops / wall / 1e12
      if peak_tflops:
        s['mfu'] = s['tflops'] / peak_tflops
  first = result['subjects'][0]
  for s in result['subjects'][1:]:
    if 'unit_s' in s and 'unit_s' in first:
      s['ratio'] = (first['cpu_s_per_item'] / s['cpu_s_per_item']
                    if result['kind'] == 'pipeline' else
                    s['unit_s'] / first['unit_s'])
  return result


def _f(value, fmt: str, missing: str = '—') -> str:
  return missing if value is None else format(value, fmt)


def _ratio(s: dict) -> str:
  return f'{s["ratio"]:.2f}×' if s.get('ratio') is not None else '(reference)'


def _memory(s: dict) -> str:
  info = s.get('info', {})
  if info.get('device_peak_mib') is not None:
    return f'{info["device_peak_mib"]}'
  if info.get('xla_memory_mib') is not None:
    return f'{info["xla_memory_mib"]} (XLA est.)'
  return '—'


def _train_line(row: dict, s: dict) -> str:
  info = s.get('info', {})
  compile_s = info.get('compile_s')
  first = (f'{compile_s:.1f} compile' if compile_s is not None else
           f'{_f(info.get("first_s"), ".1f")} 1st step')
  flops = info.get('flops')
  return (f'| {row["name"]} | {row["setting"]} | {s["label"]} | '
          f'{s["rate"]:.3g} | {1e3 * s["unit_s"]:.0f} | {first} | '
          f'{_memory(s)} | {_f(info.get("peak_rss_mib"), ".0f")} | '
          f'{_f(info.get("params") and info["params"] / 1e6, ".2f")} | '
          f'{_f(flops and flops / 1e9, ".1f")} | '
          f'{_f(s.get("mfu") and 100 * s["mfu"], ".1f")} | '
          f'{_ratio(s)} |')


def _timed_line(row: dict, s: dict) -> str:
  info = s.get('info', {})
  extra = (f'{info["value"]:.4f} mm' if 'value' in info else
           f'{_f(info.get("params") and info["params"] / 1e6, ".2f")}M params')
  if 'windows' in info:
    extra += f', {info["windows"]} windows'
  return (f'| {row["name"]} | {row["setting"]} | {s["label"]} | '
          f'{s["unit_s"]:.3f} | {_f(info.get("first_s"), ".2f")} | {extra} | '
          f'{_memory(s)} | {_f(info.get("peak_rss_mib"), ".0f")} | '
          f'{_ratio(s)} |')


def _pipeline_line(row: dict, s: dict) -> str:
  return (f'| {row["name"]} | {row["setting"]} | {s["label"]} | '
          f'{1e3 * s["cpu_s_per_item"]:.2f} | {1 / s["cpu_s_per_item"]:.0f} | '
          f'{s["rate"]:.0f} | {_ratio(s)} |')


_TABLES = {
    'train': ('Train step (Dice+CE 0.5/0.5, AdamW, clip 1.0; random data). '
              '`ratio` = medseg_jax speed / this subject\'s (> 1: medseg_jax '
              'faster); memory = device peak, or XLA\'s estimate on CPU.',
              '| row | setting | subject | items/s | ms/step | compile / 1st '
              'step s | memory MiB | peak RSS MiB | params M | GFLOP/step '
              '(XLA) | MFU % | ratio |',
              '|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
              _train_line),
    'timed': ('Inference and metrics. `ratio` = medseg_jax speed / this '
              'subject\'s.',
              '| row | setting | subject | s per call | 1st call s | '
              'value / size | memory MiB | peak RSS MiB | ratio |',
              '|---|---|---|---:|---:|---|---:|---:|---:|',
              _timed_line),
    'pipeline': ('Input pipeline, one host process (worker_count 0), after '
                 'the first epoch (decoding) has filled the memory cache. '
                 'Host CPU = process CPU time (all threads) per training '
                 'item; `ratio` = host-augmentation CPU / this subject\'s.',
                 '| row | setting | subject | host CPU ms / item | items/s '
                 'per host core | items/s (wall) | ratio |',
                 '|---|---|---|---:|---:|---:|---:|',
                 _pipeline_line),
}


def _group(row: dict) -> str:
  return row['kind'] if row['kind'] in ('train', 'pipeline') else 'timed'


def case_lines(row: dict) -> str:
  """Returns a row's Markdown lines (one per subject; failures as notes)."""
  line = _TABLES[_group(row)][3]
  return '\n'.join(
      f'| {row["name"]} | {row["setting"]} | {s["label"]} | not run: '
      f'{s["error"]} |' if s.get('error') else line(row, s)
      for s in row['subjects'])


def markdown(header: dict, rows: list[dict]) -> str:
  """Returns the benchmark's Markdown page: header, then one table per kind."""
  device = header['device']
  load = ', '.join(f'{x:.1f}' for x in os.getloadavg())
  lines = [
      f'# Benchmark: {device["device_kind"]} ({header["suite"]} suite'
      f'{", dry run" if header["dry_run"] else ""})', '',
      f'- Date: {header["date"]}; host cores (`nproc`): {header["host_cores"]};'
      f' load average at the end: {load}.',
      f'- Command: `{header["command"]}`',
      f'- {header["torch"]}',
      f'- Peak bf16 TFLOP/s for MFU: {_f(header["peak_bf16_tflops"], ".1f")}'
      ' (none on a CPU: no MFU).',
      '- Each row alternates short timed blocks of its subjects (each in its '
      'own process; order reversed every other round), so all see the same '
      'machine load; figures are medians.',
  ]
  lines += [f'- {note}' for note in header.get('notes', [])]
  if header.get('kept_rows'):
    lines.append(f'- Rows {", ".join(header["kept_rows"])} are from an '
                 'earlier run of the same suite (this command used '
                 '`--update`).')
  if header.get('rows_left'):
    lines.append(f'- Incomplete: rows not run yet: '
                 f'{", ".join(header["rows_left"])}.')
  if header['suite'] == 'cpu':
    lines.append('- CPU suite: the recipes\' models, image sizes and 3D '
                 'patch, with batch 1 and float32 (bf16 is emulated on '
                 'CPUs), few repeats; a smaller model for the 3D sliding '
                 'window. The machine was shared with other jobs: absolute '
                 'figures are noisy, the interleaved ratios less so.')
  for group in ('train', 'pipeline', 'timed'):
    chosen = [r for r in rows if _group(r) == group]
    if not chosen:
      continue
    title, head, rule, _ = _TABLES[group]
    lines += ['', title, '', head, rule]
    lines += [case_lines(r) for r in chosen]
  return '\n'.join(lines) + '\n'
