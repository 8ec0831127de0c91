"""--mode=export: a trained run as StableHLO and ONNX, with a manifest and parity.

    python -m medseg_jax.main --mode=export --workdir=runs/x \
        [--config.export.quantize=int8]

writes `runs/x/export/`:

  model.stablehlo   `jax.export`, serialised: probabilities `[B, *spatial, K]`
                    of normalised inputs `[B, *spatial, C]`; B is symbolic;
                    spatial sizes are the training patch for patch models,
                    else symbolic multiples of the model's downsampling.
  model.onnx        the same function via jax2onnx (B symbolic, or 1 for a
                    model that reshapes with it, TransUNet; spatial fixed at
                    the training patch / image size: jax2onnx cannot make
                    them symbolic through pooling and concatenation).
  model.int8.onnx   with quantize=int8: onnxruntime dynamic quantisation.
  manifest.json     what to do around the model: input layout, channels,
                    normalisation, threshold, class names, sizes,
                    sliding-window settings, version, config hash, step; and
                    the run's config, so `load` predicts as the Predictor does.
  parity.json       max |p_artefact - p_in_process| on the test split.

The exported function is the model plus its probability rule
(`metrics.probabilities`); pre- and post-processing stay in Python.
`load(W/export)` gives an object with the Predictor's `prepare` /
`predict` / `predict_prepared`, whose model is the artefact. The folder is
written beside its final place and renamed: a failed export leaves nothing.
All artefacts compute in float32 (ONNX has no bfloat16 convolutions), from
the run's float32 parameters, whatever `config.model.dtype` trained in.
"""

import contextlib
import copy
import hashlib
import importlib.metadata
import json
import logging as std_logging
import os
import shutil
import tempfile
import time

import jax
from jax import export as jax_export
import jax.numpy as jnp
import numpy as np

import medseg_jax
from medseg_jax import config_lib
from medseg_jax import export_parity
from medseg_jax import exported
from medseg_jax import fileio
from medseg_jax import inference
from medseg_jax import metrics
from medseg_jax import models
from medseg_jax import predictor as predictor_lib
from medseg_jax import workdir as workdir_lib
from medseg_jax.data import sources

EXPORT_DIR = 'export'
STABLEHLO, ONNX, ONNX_INT8 = exported.STABLEHLO, exported.ONNX, exported.ONNX_INT8
MANIFEST = exported.MANIFEST
PARITY = 'parity.json'
QUANTIZE = ('', 'int8')
_FILES = exported.FILES
# `medseg_jax.export.load(W/export)`: the loader lives in `exported`.
load = exported.load
ExportedPredictor = exported.ExportedPredictor


# --------------------------------------------------------------------------
# The function exported.


def probability_fn(model, variables):
  """Returns x `[B, *spatial, C]` -> probabilities `[B, *spatial, K]`.

  The weights are closure constants, so an artefact is self-contained.
  """

  def probabilities(x):
    logits = model.apply(variables, x, train=False)
    return metrics.probabilities(logits)

  return probabilities


def export_shapes(config, model) -> tuple[tuple, str]:
  """Returns (the ONNX input shape, the StableHLO symbolic shape spec).

  Args:
    config: the run's config.
    model: its module (for its input divisor).

  Returns:
    (('B', *spatial, C) with the training patch / image size, e.g.
    'b, 8*s0, 8*s1, 3' for a whole-image model or 'b, 8, 16, 16, 1' for a
    patch model).
  """
  spatial = config_lib.spatial_shape(config)
  channels = int(config.data.in_channels)
  if config_lib.patch_size(config):
    dims = [str(s) for s in spatial]  # Sliding windows: always the patch.
  else:
    divisors = inference.per_axis(inference.input_divisor(model),
                                  len(spatial))
    dims = [f'{d}*s{i}' for i, d in enumerate(divisors)]
  return ('B', *spatial, channels), ', '.join(['b', *dims, str(channels)])


def export_stablehlo(fn, config, model) -> tuple[bytes, str]:
  """Serialises `fn` with `jax.export`; returns (bytes, the shape exported).

  Spatial sizes are symbolic where the model allows; if shape polymorphism
  fails for this model, they are fixed at the training size.
  """
  onnx_shape, spec = export_shapes(config, model)
  fixed = ', '.join(['b', *map(str, onnx_shape[1:])])
  jitted = jax.jit(fn)
  for shape in dict.fromkeys((spec, fixed)):
    try:
      arg = jax.ShapeDtypeStruct(jax_export.symbolic_shape(shape), jnp.float32)
      return jax_export.export(jitted)(arg).serialize(), shape
    except Exception as error:  # pylint: disable=broad-except
      last = error
  raise ValueError(f'jax.export cannot export model {config.model.name!r} '
                   f'(shape {fixed}): {_first_line(last)}')


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return '?'


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0] if lines else ""}'


def export_onnx(fn, config, model) -> tuple[bytes, tuple]:
  """Converts `fn` to ONNX with jax2onnx; returns (the model, its input shape).

  The batch is symbolic ('B') where the converter allows; a model that
  reshapes with the batch size (TransUNet's tokens) gets batch 1, and
  `exported.load` feeds it one input at a time.

  Raises:
    ValueError: jax2onnx is not installed, or cannot express the model.
  """
  try:
    import jax2onnx  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ValueError('--mode=export needs jax2onnx, onnx and onnxruntime: '
                     "pip install -e '.[export]' && pip install --no-deps "
                     "'jax2onnx>=0.17.1'.") from e
  shape, _ = export_shapes(config, model)
  # jax2onnx's IR serialiser warns once per shape constant; not actionable.
  std_logging.getLogger('onnx_ir').setLevel(std_logging.ERROR)
  for batch in ('B', 1):
    try:
      proto = jax2onnx.to_onnx(
          fn, inputs=[(batch, *shape[1:])], opset=int(config.export.opset),
          model_name=str(config.model.name), input_names=['image'],
          output_names=['probabilities'])
      return proto.SerializeToString(), (batch, *shape[1:])
    except Exception as e:  # pylint: disable=broad-except
      error = e
  raise ValueError(
      f'the ONNX converter (jax2onnx {_version("jax2onnx")}) cannot express '
      f'model {config.model.name!r}: {_first_line(error)}') from error


def quantize_int8(onnx_path: str, out_path: str) -> None:
  """Writes the dynamic int8 quantisation of an ONNX model (QInt8 weights)."""
  from onnxruntime import quantization  # pylint: disable=import-outside-toplevel
  root = std_logging.getLogger()
  level = root.level
  root.setLevel(std_logging.ERROR)  # Its advice to pre-process is for CNNs
  try:                              # with shape inference gaps; ours has none.
    quantization.quantize_dynamic(onnx_path, out_path,
                                  weight_type=quantization.QuantType.QInt8)
  finally:
    root.setLevel(level)


# --------------------------------------------------------------------------
# The manifest.


def config_hash(config) -> str:
  """Returns the first 16 hex digits of the SHA-256 of the config's JSON.

  The `export` section is left out: exporting the same run with other
  export settings (int8 or not) gives artefacts of the same config.
  """
  values = workdir_lib.config_as_json_dict(config)
  values.pop('export', None)
  text = json.dumps(values, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def manifest_of(config, model, step: int, shapes: dict) -> dict:
  """Returns the manifest: everything to run the artefacts as the Predictor.

  Args:
    config: the run's config.
    model: its module.
    step: the checkpoint step exported.
    shapes: {artefact: input shape exported}.
  """
  photo = sources.is_photo(config.data)
  slices = config_lib.slice_context(config)
  if photo:
    normalisation = {'kind': 'photo', 'scale': 'uint8 / 255',
                     'resize_to': list(config_lib.image_size(config))}
  else:  # Per-case intensity scheme (and resampling), then mean/std.
    normalisation = {'kind': 'volume',
                     **json.loads(config.data.preprocess.to_json())}
  normalisation.update(mean=list(np.atleast_1d(config.data.mean).tolist()),
                       std=list(np.atleast_1d(config.data.std).tolist()))
  return {
      'format': 'medseg_jax export 1',
      'medseg_jax_version': medseg_jax.__version__,
      'jax_version': jax.__version__,
      'jax2onnx_version': _version('jax2onnx'),
      'model': str(config.model.name),
      'config_hash': config_hash(config),
      'checkpoint_step': int(step),
      # The artefacts compute in float32 whatever the run trained in.
      'compute_dtype': 'float32',
      'trained_dtype': str(config.model.dtype),
      'input': {'layout': 'channels-last [B, *spatial, C]',
                'channels': int(config.data.in_channels),
                'dtype': 'float32', 'normalised': True,
                'slice_context': slices},
      'output': {'layout': 'channels-last [B, *spatial, K]',
                 'classes': int(config.data.num_classes),
                 'activation': ('sigmoid' if config.data.num_classes == 1
                                else 'softmax'),
                 'values': 'probabilities'},
      'normalisation': normalisation,
      'threshold': float(config.eval.threshold),
      'class_names': list(sources.class_names(config.data)),
      'training_size': list(config_lib.spatial_shape(config)),
      'patch_size': list(config_lib.patch_size(config)),
      'input_divisor': inference.input_divisor(model),  # int, or per axis.
      'sliding_window': config_lib.sliding_window(config),
      'tta': bool(config.eval.tta),
      'postprocess': json.loads(config.eval.postprocess.to_json()),
      'artefacts': {k: {'file': _FILES[k], 'input_shape': v}
                    for k, v in shapes.items()},
      'config': workdir_lib.config_as_json_dict(config),
  }


# --------------------------------------------------------------------------
# --mode=export.


def float32_predictor(predictor):
  """Returns the predictor computing in float32 (itself if it already does).

  ONNX has no bfloat16 convolutions (onnxruntime refuses the graph), so the
  artefacts compute in float32 from the float32 parameters, and parity is
  measured against the in-process model computing in float32 too.
  """
  if str(predictor.config.model.dtype) == 'float32':
    return predictor
  config = copy.deepcopy(predictor.config)
  config.model.dtype = 'float32'
  model = models.create_model(config.model, config.data.num_classes)
  return predictor_lib.Predictor(config, model, predictor.variables,
                                 predictor.step)


@contextlib.contextmanager
def _staging_dir(final: str):
  """Yields a temporary folder beside `final` that replaces it on success.

  On any error the temporary folder is removed and `final` is untouched.
  """
  parent = os.path.dirname(os.path.abspath(final))
  staging = tempfile.mkdtemp(prefix='.export-tmp-', dir=parent)
  try:
    # mkdtemp makes it private (0700); the export is an ordinary folder.
    os.chmod(staging, 0o777 & ~fileio._UMASK)  # pylint: disable=protected-access
    yield staging
    old = None
    if os.path.exists(final):
      old = tempfile.mkdtemp(prefix='.export-old-', dir=parent)
      os.rename(final, os.path.join(old, 'export'))
    os.rename(staging, final)
    if old:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def check_export_config(config) -> None:
  """Raises ValueError for an unsupported `config.export` before any work."""
  quantize = str(config.export.quantize)
  if quantize not in QUANTIZE:
    raise ValueError(f'config.export.quantize={quantize!r} is not supported: '
                     "use '' (none) or 'int8'.")
  if int(config.export.parity_cases) < 0:
    raise ValueError('config.export.parity_cases must be >= 0 (0 = all).')


def export_run(config, workdir: str, which: str = 'best', step=None) -> dict:
  """Exports a trained run to WORKDIR/export and measures parity; prints a summary.

  Args:
    config: the run's config (configs/run.py:<workdir>, with overrides).
    workdir: the run's workdir.
    which: 'best' or 'latest' checkpoint.
    step: a step to export instead of the newest of `which`.

  Returns:
    The parity report (also in WORKDIR/export/parity.json).

  Raises:
    ValueError: unsupported settings, or a model a converter cannot express.
    FileNotFoundError: a workdir without config.json or checkpoint.
  """
  check_export_config(config)
  run = predictor_lib.Predictor.from_workdir(workdir, which, step,
                                             config=config)
  predictor = float32_predictor(run)
  config, model = run.config, predictor.model
  fn = probability_fn(model, predictor.variables)
  final = os.path.join(workdir, EXPORT_DIR)
  timings = {}
  with _staging_dir(final) as out:
    start = time.perf_counter()
    blob, hlo_shape = export_stablehlo(fn, config, model)
    fileio.write_bytes(os.path.join(out, STABLEHLO), blob)
    timings['stablehlo_s'] = time.perf_counter() - start
    start = time.perf_counter()
    onnx_blob, onnx_shape = export_onnx(fn, config, model)
    fileio.write_bytes(os.path.join(out, ONNX), onnx_blob)
    timings['onnx_s'] = time.perf_counter() - start
    onnx_shape = ', '.join(map(str, onnx_shape))
    shapes = {'stablehlo': hlo_shape, 'onnx': onnx_shape}
    if config.export.quantize == 'int8':
      quantize_int8(os.path.join(out, ONNX), os.path.join(out, ONNX_INT8))
      shapes['onnx_int8'] = onnx_shape
    manifest = manifest_of(config, model, predictor.step, shapes)
    fileio.write_text(os.path.join(out, MANIFEST),
                      json.dumps(manifest, indent=2) + '\n')
    report = export_parity.measure_parity(predictor, out, list(shapes),
                            int(config.export.parity_cases))
    report['export_seconds'] = timings
    fileio.write_text(os.path.join(out, PARITY),
                      json.dumps(report, indent=2) + '\n')
  _print_summary(final, report, shapes)
  return report


def _print_summary(final: str, report: dict, shapes: dict) -> None:
  print(f'Exported to {os.path.abspath(final)}: '
        + ', '.join(_FILES[k] for k in shapes) + ', manifest.json, parity.json')
  for name in shapes:
    entry = report[name]
    dice = (f', Dice change {entry["dice_change"]:+.4f}'
            if 'dice_change' in entry else '')
    flag = ('' if entry.get('within_tolerance', True) else
            f'  WARNING: above the tolerance {report["tolerance"]:g}')
    print(f'  {name}: max |p - p_jax| = {entry["max_abs_diff"]:.2e} over '
          f'{report["num_cases"]} {report["split"]} case(s){dice}{flag}')
