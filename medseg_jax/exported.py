"""Loading an export (WORKDIR/export, see `export`): predict with an artefact.

    from medseg_jax import exported
    model = exported.load('runs/x/export', 'onnx')   # or 'stablehlo', 'onnx_int8'
    prediction = model.predict(image)                # as Predictor.predict

The loaded object is a `Predictor` whose model is the artefact: the same
preparation (resizing, intensity scheme, mean/std from the exported config),
whole-image or sliding-window prediction, TTA and post-processing. Only
this module and onnxruntime (for the ONNX files) are needed, not the
checkpoint.
"""

import json
import os
import types

import jax
from jax import export as jax_export
import jax.numpy as jnp
import numpy as np

from medseg_jax import config_lib
from medseg_jax import predictor as predictor_lib
from medseg_jax.data import transforms as transforms_lib

STABLEHLO = 'model.stablehlo'
ONNX = 'model.onnx'
ONNX_INT8 = 'model.int8.onnx'
MANIFEST = 'manifest.json'
ARTEFACTS = ('stablehlo', 'onnx', 'onnx_int8')
FILES = {'stablehlo': STABLEHLO, 'onnx': ONNX, 'onnx_int8': ONNX_INT8}


def _stablehlo_predict_fn(path: str):
  with open(path, 'rb') as f:
    exported = jax_export.deserialize(bytearray(f.read()))
  call = jax.jit(exported.call)
  return lambda x, rng=None: call(jnp.asarray(x, jnp.float32))


def onnx_session(path: str):
  """Returns an onnxruntime CPU InferenceSession of `path`, quiet."""
  import onnxruntime  # pylint: disable=import-outside-toplevel
  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3  # Shape-merge warnings of NHWC pools.
  return onnxruntime.InferenceSession(path, options,
                                      providers=['CPUExecutionProvider'])


def _onnx_predict_fn(path: str):
  session = onnx_session(path)
  spec = session.get_inputs()[0]
  fixed = tuple(spec.shape[1:])  # jax2onnx cannot make spatial sizes symbolic.

  def predict(x, rng=None):
    del rng
    x = np.asarray(x, np.float32)
    if x.shape[1:] != fixed:
      raise ValueError(
          f'{path} takes inputs [B, {", ".join(map(str, fixed))}] (fixed at '
          f'export), not {list(x.shape)}: predict cases of other sizes with '
          "the StableHLO artefact (load(..., 'stablehlo')).")
    if spec.shape[0] == 1 and len(x) != 1:  # A batch-1 graph (TransUNet).
      return np.concatenate([session.run(None, {spec.name: x[i:i + 1]})[0]
                             for i in range(len(x))])
    return session.run(None, {spec.name: x})[0]

  return predict


class ExportedPredictor(predictor_lib.Predictor):
  """A Predictor whose model is an exported artefact (no JAX model, no weights).

  `prepare`, `model_input`, `predict`, `predict_prepared` and `labels` are
  the Predictor's, following the exported run's config; MC dropout is not
  available (the artefacts are deterministic).

  Attributes:
    manifest: the export's manifest.json.
    artefact: 'stablehlo', 'onnx' or 'onnx_int8'.
  """

  def __init__(self, manifest: dict, artefact: str, predict_fn):  # pylint: disable=super-init-not-called
    config = config_lib.from_saved(manifest['config'])
    config = config_lib.with_overrides(config, {'eval.mc_samples': 0})
    self.manifest = manifest
    self.artefact = artefact
    self.config = config
    # Only the input divisor of the model is needed (whole-image padding).
    divisor = manifest['input_divisor']  # Per axis with model.strides.
    self.model = types.SimpleNamespace(input_divisor=(
        tuple(divisor) if isinstance(divisor, list) else int(divisor)))
    self.variables = None
    self.members = []
    self.step = int(manifest['checkpoint_step'])
    self._predict_fn = predict_fn
    self._normalize = transforms_lib.build_eval_transforms(config.data.mean,
                                                           config.data.std)


def load(export_dir: str, artefact: str = 'stablehlo') -> ExportedPredictor:
  """Loads an export to predict whole images and volumes like the Predictor.

  Args:
    export_dir: WORKDIR/export.
    artefact: 'stablehlo', 'onnx' or 'onnx_int8'.

  Returns:
    The ExportedPredictor.

  Raises:
    ValueError: an unknown artefact.
    FileNotFoundError: no manifest or no such artefact in the folder.
  """
  if artefact not in ARTEFACTS:
    raise ValueError(f'artefact={artefact!r}: use one of {", ".join(ARTEFACTS)}.')
  manifest_path = os.path.join(export_dir, MANIFEST)
  path = os.path.join(export_dir, FILES[artefact])
  for needed in (manifest_path, path):
    if not os.path.exists(needed):
      raise FileNotFoundError(
          f'{needed} does not exist: run python -m medseg_jax.main '
          '--mode=export --workdir=W (with --config.export.quantize=int8 for '
          'model.int8.onnx).')
  with open(manifest_path) as f:
    manifest = json.load(f)
  return ExportedPredictor(manifest, artefact,
                           artefact_predict_fn(export_dir, artefact))


def artefact_predict_fn(export_dir: str, artefact: str):
  """Returns the predict function of one artefact of an export.

  Args:
    export_dir: WORKDIR/export.
    artefact: 'stablehlo', 'onnx' or 'onnx_int8'.

  Returns:
    `predict_fn(x [B, *spatial, C], rng=None) -> probabilities [B, *spatial,
    K]`, the signature of `inference.make_predict_fn` (rng is ignored).
  """
  path = os.path.join(export_dir, FILES[artefact])
  if artefact == 'stablehlo':
    return _stablehlo_predict_fn(path)
  return _onnx_predict_fn(path)
