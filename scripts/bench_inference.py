r"""Inference speed of a trained run: the jitted model and its exported artefacts.

    python -m medseg_jax.main --mode=export --workdir=W --config.export.quantize=int8
    python scripts/bench_inference.py --workdir=W [--batch=32] [--iters=50]

For each backend (the jitted JAX model of the checkpoint, the StableHLO
artefact, ONNX Runtime float32 and int8), in a fresh subprocess so the peak
memory is its own: load time (checkpoint restore / deserialise / session),
first-call time at batch 1 (the compilation for JAX), latency p50/p95 at
batch 1, throughput (images or patches per second) at --batch, and peak RSS.
The input is one model input of the manifest's shape (the training image
size, or the patch of a sliding-window model), normalised random values.
Writes a Markdown table to W/export/bench_inference.md (or --output) and
prints it. JAX rows run on JAX's default device; ONNX Runtime on the CPU.

For a run trained on 3D patches (sliding-window inference), a second table
times whole volumes: `inference.sliding_window` over one random normalised
volume (`--volume D H W`, default the run's synthetic3d volume size) with
the run's window, overlap, Gaussian blending and windows per call, through
each backend, and MONAI's `sliding_window_inference` on the same volume and
window with a MONAI U-Net of the run's widths (random weights: speed only)
when a PyTorch + MONAI Python is given (`--torch_python`, or
$MEDSEG_TORCH_PYTHON). These subjects run in their own processes and their
timed volumes alternate (`scripts/benchmark.py`'s workers), so all see the
same machine load.

    python scripts/bench_inference.py --workdir=runs/unet3d_cpu \
        --torch_python=/tmp/venv-monai/bin/python --volume 80 128 128
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

BACKENDS = ('jax', 'stablehlo', 'onnx', 'onnx_int8')
_NAMES = {'jax': 'JAX jit (checkpoint)', 'stablehlo': 'StableHLO artefact',
          'onnx': 'ONNX Runtime fp32', 'onnx_int8': 'ONNX Runtime int8'}


def _import(backend: str) -> None:
  """Imports what a backend needs (not timed; ONNX rows import no JAX)."""
  if backend.startswith('onnx'):
    import onnxruntime  # pylint: disable=import-outside-toplevel,unused-import
  else:
    from medseg_jax import exported, predictor  # pylint: disable=import-outside-toplevel,unused-import


def _load(backend: str, workdir: str):
  """Returns (predict_fn(x) -> host array, device description)."""
  export_dir = os.path.join(workdir, 'export')
  cpu = f'CPU ({os.cpu_count()} cores)'
  if backend.startswith('onnx'):
    import onnxruntime  # pylint: disable=import-outside-toplevel
    name = 'model.int8.onnx' if backend == 'onnx_int8' else 'model.onnx'
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(
        os.path.join(export_dir, name), options,
        providers=['CPUExecutionProvider'])
    input_name = session.get_inputs()[0].name
    return (lambda x: session.run(None, {input_name: x})[0],
            f'{cpu}, onnxruntime {onnxruntime.__version__}')
  import jax  # pylint: disable=import-outside-toplevel
  from medseg_jax import exported, inference, predictor  # pylint: disable=import-outside-toplevel
  if backend == 'jax':
    run = predictor.Predictor.from_workdir(workdir)
    fn = inference.make_predict_fn(run.model, run.variables)
  else:
    fn = exported.artefact_predict_fn(export_dir, backend)
  device = jax.devices()[0]
  where = cpu if device.platform == 'cpu' else device.device_kind
  return lambda x: np.asarray(fn(x)), f'{where}, JAX {jax.__version__}'


def measure(backend: str, workdir: str, batch: int, iters: int) -> dict:
  """Times one backend in this process; returns its figures."""
  with open(os.path.join(workdir, 'export', 'manifest.json')) as f:
    manifest = json.load(f)
  shape = [int(s) for s in manifest['artefacts']['onnx']['input_shape']
           .split(', ')[1:]]
  rng = np.random.default_rng(0)
  one = rng.normal(size=(1, *shape)).astype(np.float32)
  many = rng.normal(size=(batch, *shape)).astype(np.float32)
  _import(backend)
  start = time.perf_counter()  # Modules imported: load is restore/parse.
  fn, device = _load(backend, workdir)
  load_s = time.perf_counter() - start
  start = time.perf_counter()
  fn(one)
  first_s = time.perf_counter() - start
  latencies = []
  for _ in range(iters):
    start = time.perf_counter()
    fn(one)
    latencies.append(time.perf_counter() - start)
  fn(many)  # Compiles (JAX) or sizes buffers (ORT) for this batch.
  rounds = max(3, iters // 10)
  start = time.perf_counter()
  for _ in range(rounds):
    fn(many)
  throughput = rounds * batch / (time.perf_counter() - start)
  return {'backend': backend, 'device': device, 'load_s': load_s,
          'first_call_s': first_s,
          'p50_ms': 1e3 * float(np.percentile(latencies, 50)),
          'p95_ms': 1e3 * float(np.percentile(latencies, 95)),
          'throughput': throughput, 'batch': batch,
          'input_shape': shape,
          'peak_rss_mib': resource.getrusage(
              resource.RUSAGE_SELF).ru_maxrss / 1024}


def _run_child(backend: str, args) -> dict | None:
  """Measures one backend in a subprocess; None (and a note) if it fails."""
  command = [sys.executable, __file__, f'--workdir={args.workdir}',
             f'--batch={args.batch}', f'--iters={args.iters}',
             f'--child={backend}']
  proc = subprocess.run(command, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    tail = (proc.stderr.strip().splitlines() or ['?'])[-1]
    print(f'{backend}: failed ({tail})', file=sys.stderr)
    return None
  return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict], workdir: str) -> str:
  """Returns the Markdown table of the figures."""
  shape = rows[0]['input_shape'] if rows else '?'
  lines = [f'Inference of `{workdir}`, one input {shape} (channels-last); '
           f'throughput at batch {rows[0]["batch"] if rows else "?"}.', '',
           '| backend | device | load s | first call s | p50 ms (b=1) | '
           'p95 ms (b=1) | throughput /s | peak RSS MiB |',
           '|---|---|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(
        f'| {_NAMES[r["backend"]]} | {r["device"]} | {r["load_s"]:.2f} | '
        f'{r["first_call_s"]:.2f} | {r["p50_ms"]:.2f} | {r["p95_ms"]:.2f} | '
        f'{r["throughput"]:.1f} | {r["peak_rss_mib"]:.0f} |')
  return '\n'.join(lines) + '\n'


def volume_case(manifest: dict, volume, repeats: int, workdir: str) -> dict:
  """Returns the `scripts/benchmark.py` row of a whole-volume sliding window.

  Args:
    manifest: the export's manifest.json (patch, sliding-window settings,
      channels, classes, the run's config).
    volume: (D, H, W), or None for the run's synthetic3d volume size.
    repeats: timed volumes per subject.
    workdir: the run.

  Raises:
    ValueError: a run without a patch (no sliding window) or no volume size.
  """
  patch = manifest.get('patch_size')
  if not patch or len(patch) != 3:
    raise ValueError(f'{workdir} was not trained on 3D patches: no '
                     'whole-volume sliding window to time.')
  config = manifest['config']
  if volume is None:
    if config['data']['source'] != 'synthetic3d':
      raise ValueError('Give the volume to predict: --volume D H W.')
    volume = config['data']['synthetic3d']['volume_size']
  sw = manifest['sliding_window']
  model = config['model']
  return dict(
      name='sliding_window_volume', kind='sliding_window', workdir=workdir,
      model=model['name'], features=list(model['features']),
      norm=model['norm'], in_channels=manifest['input']['channels'],
      num_classes=manifest['output']['classes'], volume=list(volume),
      patch=list(patch), overlap=sw['overlap'], sw_batch=sw['batch_size'],
      repeats=repeats, units_per_block=1, items_per_unit=1, item='volumes')


def volume_markdown(row: dict) -> str:
  """Returns the whole-volume table of a summarised row."""
  lines = [f'Whole-volume sliding window: volume {row["volume"]} x '
           f'{row["in_channels"]} channels, window {row["patch"]}, overlap '
           f'{row["overlap"]}, Gaussian, {row["sw_batch"]} windows per call; '
           'median of the timed volumes; `ratio` = JAX jit speed / this '
           "backend's (> 1: JAX faster).", '',
           '| backend | device | params | first call s | s per volume | '
           'windows | peak RSS MiB | ratio |',
           '|---|---|---:|---:|---:|---:|---:|---:|']
  for s in row['subjects']:
    info = s.get('info', {})
    if s.get('error'):
      lines.append(f'| {s["label"]} | not run: {s["error"]} |')
      continue
    ratio = f'{s["ratio"]:.2f}×' if 'ratio' in s else '(reference)'
    lines.append(
        f'| {s["label"]} | {info.get("device_kind", "?")} | '
        f'{info.get("params") or "—"} | '
        f'{info.get("first_s", float("nan")):.2f} | {s["unit_s"]:.3f} | '
        f'{info.get("windows", "—")} | {info.get("peak_rss_mib", "—")} | '
        f'{ratio} |')
  return '\n'.join(lines) + '\n'


def run_volume(args, manifest: dict, backends: list[str]) -> str:
  """Times the whole-volume sliding window of every backend (and MONAI)."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import _bench_table  # pylint: disable=import-outside-toplevel
  import benchmark  # pylint: disable=import-outside-toplevel
  case = volume_case(manifest, args.volume, args.volume_repeats, args.workdir)
  case['subjects'] = [{'framework': 'jax', 'backend': b, 'label': _NAMES[b]}
                      for b in backends]
  case['subjects'].append({'framework': 'torch', 'variant': 'eager',
                           'label': 'MONAI sliding_window_inference (eager '
                           'f32, random weights)'})
  torch_path, note = benchmark.torch_python(args.torch_python)
  print(note, file=sys.stderr)
  row = benchmark.run_case(case, {'jax': sys.executable, 'torch': torch_path},
                           log=lambda m: print(m, file=sys.stderr))
  return volume_markdown(_bench_table.summarize(row, None))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--iters', type=int, default=50)
  parser.add_argument('--backends', default=','.join(BACKENDS))
  parser.add_argument('--output', default=None)
  parser.add_argument('--volume', type=int, nargs=3, default=None,
                      help='D H W of the whole-volume sliding-window table')
  parser.add_argument('--volume_repeats', type=int, default=3)
  parser.add_argument('--torch_python', default=None,
                      help="Python with torch + MONAI; 'none' = no MONAI row")
  parser.add_argument('--child', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(measure(args.child, args.workdir, args.batch, args.iters)))
    return
  export_dir = os.path.join(args.workdir, 'export')
  if not os.path.exists(os.path.join(export_dir, 'manifest.json')):
    sys.exit(f'error: {export_dir}/manifest.json does not exist: run '
             f'python -m medseg_jax.main --mode=export --workdir={args.workdir}'
             ' --config.export.quantize=int8 first.')
  rows, backends = [], []
  for backend in args.backends.split(','):
    if backend == 'onnx_int8' and not os.path.exists(
        os.path.join(export_dir, 'model.int8.onnx')):
      print('onnx_int8: skipped (export with --config.export.quantize=int8)',
            file=sys.stderr)
      continue
    backends.append(backend)
    row = _run_child(backend, args)
    if row:
      rows.append(row)
  table = markdown(rows, args.workdir)
  with open(os.path.join(export_dir, 'manifest.json')) as f:
    manifest = json.load(f)
  if manifest.get('patch_size') and len(manifest['patch_size']) == 3:
    table += '\n' + run_volume(args, manifest, backends)
  output = args.output or os.path.join(export_dir, 'bench_inference.md')
  with open(output, 'w') as f:
    f.write(table)
  print(table + f'\nWritten to {output}.')


if __name__ == '__main__':
  main()
