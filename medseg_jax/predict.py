r"""`--mode=predict`: masks for new images and volumes, in their own geometry.

    python -m medseg_jax.main --mode=predict --workdir=runs/x \
        --input=new_cases/ --output=predictions/

Inputs: PNG/JPEG/TIFF images, NIfTI volumes (.nii, .nii.gz), DICOM series (a
folder of .dcm files), or a folder of any of these. Outputs, per input:

  images   <name>.png          the mask at the input's size (0/255 binary, or
                               config.data.label_values; 0..K-1 multi-class)
  volumes  <name>.nii.gz       the mask with the input's shape, affine, header
  with config.eval.save_probabilities: <name>_prob.npy / _prob.nii.gz
  with config.eval.gradcam_layer (2D images): <name>_gradcam.png, the
  layer's Grad-CAM heat map over the image
  with config.eval.mc_samples = N >= 2 (MC dropout): <name>_mean and _std
  ([*spatial, K]), _entropy and _mutual_information ([*spatial]) maps (.npy
  for images, .nii.gz for volumes)

The eval settings of the run's config.json apply (TTA, post-processing,
threshold); `--config.eval.*` flags change them for this call:

    python -m medseg_jax.main --mode=predict --workdir=runs/x \
        --input=new_cases/ --output=predictions/ \
        --config.eval.mc_samples=20 --config.eval.save_probabilities=True

Images are resized to the training size and the probabilities back to the
input size; volumes go through the training preprocessing (intensity,
resampling) and are predicted by sliding windows of the training patch, then
resampled back. A file that fails is reported and the others still run; the
failures are listed at the end and the exit code is 1. Entries of an input
folder that are neither images nor volumes are listed as skipped. Nothing is
written into the input folder, and nothing over the files of an earlier
prediction unless `--overwrite` is given (then they are replaced). The
prediction itself is `medseg_jax.Predictor`'s; this module reads the inputs
and writes the files.
"""

import dataclasses
import os

import numpy as np
from PIL import Image

from medseg_jax import config_lib
from medseg_jax import fileio
from medseg_jax import gradcam
from medseg_jax import predictor as predictor_lib
from medseg_jax import workdir as workdir_lib
from medseg_jax.data import errors
from medseg_jax.data import image_io
from medseg_jax.data import preprocess
from medseg_jax.data import volume_io

NIFTI_SUFFIXES = ('.nii', '.nii.gz')


@dataclasses.dataclass(frozen=True)
class Failure:
  """An input that could not be predicted, and why."""
  path: str
  reason: str


def _is_nifti(path: str) -> bool:
  return path.lower().endswith(NIFTI_SUFFIXES)


def _is_image(path: str) -> bool:
  return os.path.splitext(path)[1].lower() in image_io.IMAGE_EXTENSIONS


def _is_dicom_dir(path: str) -> bool:
  if not os.path.isdir(path):
    return False
  names = [n for n in os.listdir(path) if not n.startswith('.')]
  return bool(names) and all(
      n.lower().endswith('.dcm') or '.' not in n for n in names
      if os.path.isfile(os.path.join(path, n))) and any(
          n.lower().endswith('.dcm') for n in names)


def list_inputs(path: str) -> tuple[list[str], list[Failure]]:
  """Returns (inputs to predict, entries skipped with the reason).

  A file, a DICOM series folder, or a folder whose entries are images, NIfTI
  files or DICOM series folders.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: a folder with nothing to predict in it.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f'--input={path!r} does not exist.')
  if os.path.isfile(path) or _is_dicom_dir(path):
    return [path], []
  inputs, skipped = [], []
  for name in sorted(os.listdir(path)):
    full = os.path.join(path, name)
    if name.startswith('.'):
      continue
    if _is_nifti(full) or _is_image(full) or _is_dicom_dir(full):
      inputs.append(full)
    else:
      skipped.append(Failure(full, 'not an image, NIfTI file or DICOM series'))
  if not inputs:
    kinds = ', '.join(image_io.IMAGE_EXTENSIONS)
    raise ValueError(f'--input={path!r} holds no image ({kinds}), NIfTI file '
                     '(.nii, .nii.gz) or DICOM series folder (.dcm files).')
  return inputs, skipped


def check_output_dir(input_path: str, output_dir: str) -> None:
  """Raises if predictions in `output_dir` would land among the inputs.

  Refused: the input folder or a folder inside it (a folder input), the
  folder holding the input (a file input: a mask named like its NIfTI input
  would replace it).
  """
  source = os.path.realpath(input_path)
  target = os.path.realpath(output_dir)
  if os.path.isfile(source):
    inside = target == os.path.dirname(source)
  else:
    inside = target == source or target.startswith(source + os.sep)
  if inside:
    raise ValueError(
        f'--output={output_dir!r} is (inside) the folder of the inputs '
        f'{input_path!r}; predictions are never written among the inputs. '
        'Pass another --output folder.')


def output_stem(path: str) -> str:
  """Returns the input's name without its extension(s)."""
  name = os.path.basename(os.path.normpath(path))
  for suffix in (*NIFTI_SUFFIXES, *image_io.IMAGE_EXTENSIONS):
    if name.lower().endswith(suffix):
      return name[:-len(suffix)]
  return name


MC_MAPS = ('mean', 'std', 'entropy', 'mutual_information')


def output_names(path: str, config) -> list[str]:
  """Returns the names of the files predicting `path` writes, mask first.

  Args:
    path: an input (image, NIfTI file or DICOM series folder).
    config: the run's config (`eval.save_probabilities`, `eval.mc_samples`,
      `eval.gradcam_layer`).
  """
  stem = output_stem(path)
  suffix = '.png' if _is_image(path) else '.nii.gz'
  array = '.npy' if _is_image(path) else '.nii.gz'
  names = [stem + suffix]
  if config.eval.save_probabilities:
    names.append(f'{stem}_prob{array}')
  if _is_image(path) and config.eval.gradcam_layer:
    names.append(f'{stem}_gradcam.png')
  if config.eval.mc_samples:
    names.extend(f'{stem}_{name}{array}' for name in MC_MAPS)
  return names


def check_output_free(inputs, output_dir: str, config,
                      overwrite: bool) -> None:
  """Raises if `output_dir` is a file, or holds outputs and not `overwrite`.

  Args:
    inputs: the inputs to predict (`list_inputs`).
    output_dir: --output.
    config: the run's config (which files each input writes).
    overwrite: --overwrite: files of an earlier prediction may be replaced.

  Raises:
    ValueError: one line naming --output and the first file in the way.
  """
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise ValueError(f'--output={output_dir!r} is a file; --output is the '
                     'folder the masks are written to: pass a folder.')
  if overwrite:
    return
  taken = [name for path in inputs for name in output_names(path, config)
           if os.path.lexists(os.path.join(output_dir, name))]
  if taken:
    raise ValueError(
        f'--output={output_dir!r} already holds {len(taken)} of the files '
        f'this would write (e.g. {taken[0]}); pass --overwrite to replace '
        'them, or choose another --output.')


def _save_npy(path: str, array: np.ndarray) -> None:
  with fileio.atomic_write(path, 'wb') as f:
    np.save(f, array)


def check_gradcam_layer(predictor) -> None:
  """Raises before any prediction if config.eval.gradcam_layer is unusable.

  Args:
    predictor: the run's Predictor.

  Raises:
    ValueError: an ensemble, a volume run, or a name that is not a layer
      (the valid names are listed).
  """
  config = predictor.config
  layer = config.eval.gradcam_layer
  if not layer:
    return
  if len(predictor.members) > 1:
    raise ValueError('--ensemble averages probabilities; Grad-CAM '
                     '(config.eval.gradcam_layer) is per model: run it '
                     'without --ensemble.')
  if predictor.case_ndim != 2:
    raise ValueError('config.eval.gradcam_layer: predict writes Grad-CAM '
                     'overlays for 2D image runs only; for volumes call '
                     'medseg_jax.gradcam.grad_cam on a case.')
  dummy = np.zeros(config_lib.model_input_shape(config)[1:], np.float32)
  names = gradcam.feature_layer_names(predictor.model, predictor.variables,
                                      dummy)
  if layer not in names:
    raise ValueError(f'config.eval.gradcam_layer={layer!r} is not a '
                     f'feature-map layer of this {config.model.name}; '
                     f'choose one of: {", ".join(names)}.')


def gradcam_overlay(predictor, raw: np.ndarray) -> np.ndarray:
  """Returns the RGB uint8 Grad-CAM overlay of `config.eval.gradcam_layer`.

  Args:
    predictor: the run's Predictor (a 2D image run).
    raw: the image as read, `[H, W, C]`; the heat map is computed at the
      training size and resized back to it.
  """
  config = predictor.config
  heatmap = gradcam.grad_cam(
      predictor.model, predictor.variables,
      predictor.model_input(predictor.prepare(raw)),
      config.eval.gradcam_layer, threshold=config.eval.threshold)
  heatmap = preprocess.resample_to_shape(np.asarray(heatmap, np.float32),
                                         raw.shape[:2], order=1)
  return gradcam.overlay(raw, np.clip(heatmap, 0.0, 1.0))


def write_prediction(predictor, path: str, out_dir: str) -> list[str]:
  """Predicts one input and writes its files (see `output_names`).

  Args:
    predictor: the run's Predictor.
    path: an image, NIfTI file or DICOM series folder.
    out_dir: the output folder (exists).

  Returns:
    The paths written, mask first.
  """
  config = predictor.config
  prediction, case = predictor.predict_file(path)
  names = iter(output_names(path, config))
  written = [os.path.join(out_dir, next(names))]
  if case.kind == 'image':
    image_io.write_mask_png(written[0], prediction.labels,
                            num_classes=config.data.num_classes,
                            label_values=tuple(config.data.label_values))
    write_array = _save_npy
  else:
    volume_io.write_nifti_like(written[0],
                               prediction.labels.astype(np.uint8), case.volume)
    write_array = lambda p, a: volume_io.write_nifti_like(p, a, case.volume)
  if config.eval.save_probabilities:
    written.append(os.path.join(out_dir, next(names)))
    write_array(written[-1], prediction.probabilities)
  if case.kind == 'image' and config.eval.gradcam_layer:
    written.append(os.path.join(out_dir, next(names)))
    with fileio.atomic_write(written[-1], 'wb') as f:
      Image.fromarray(gradcam_overlay(predictor, case.image)).save(f, 'PNG')
  for name in MC_MAPS if prediction.uncertainty else ():
    written.append(os.path.join(out_dir, next(names)))
    write_array(written[-1], prediction.uncertainty[name])
  return written

def _reason(error: Exception, path: str) -> str:
  """The message of an input's error (with its type when unexpected)."""
  if isinstance(error, errors.FileError) and error.path == path:
    return error.reason  # Listed after the path already.
  if isinstance(error, (ValueError, OSError, EOFError)) and str(error):
    return str(error)
  return f'{type(error).__name__}: {error}'


def predict_paths(config, workdir: str, input_path: str, output_dir: str,
                  which: str = 'best', step=None, ensemble=(),
                  overwrite: bool = False) -> list[Failure]:
  """Predicts every input under `input_path` into `output_dir`.

  Checks everything it can before predicting: the inputs, that the output
  folder is not among them and is not a file, that it holds none of the files
  this would write (unless `overwrite`), the model and its settings. The
  output folder is locked while it is written, so two predictions into one
  folder never mix their files (the second is refused).

  Args:
    config: the run's config (with any --config.KEY=VALUE changes).
    workdir: the run's workdir.
    input_path: a file, a DICOM series folder, or a folder of those.
    output_dir: the folder of the masks (created).
    which: 'best' or 'latest' checkpoint.
    step: a step to load instead of the newest.
    ensemble: other runs' workdirs (same model) whose probabilities are
      averaged with this run's.
    overwrite: replace files of an earlier prediction in `output_dir`.

  Returns:
    The inputs that failed (also printed, after the skipped entries), empty
    if none.
  """
  inputs, skipped = list_inputs(input_path)
  check_output_dir(input_path, output_dir)
  check_output_free(inputs, output_dir, config, overwrite)
  predictor = predictor_lib.Predictor.from_workdir(
      workdir, which, step, ensemble, config=config)
  check_gradcam_layer(predictor)
  failures, stems = [], {}
  with workdir_lib.acquire_lock(output_dir, '--mode=predict'):
    for path in inputs:
      stem = output_stem(path)
      if stem in stems:
        failures.append(Failure(path, f'its output name {stem!r} is already '
                                f'taken by {stems[stem]}; rename one of them.'))
        continue
      stems[stem] = path
      try:
        written = write_prediction(predictor, path, output_dir)
        print(f'{path} -> {", ".join(os.path.basename(w) for w in written)}')
      except Exception as e:  # pylint: disable=broad-except
        # One bad input must not stop the others; it is listed at the end.
        failures.append(Failure(path, _reason(e, path)))
  print(f'Predicted {len(inputs) - len(failures)} of {len(inputs)} input(s) '
        f'into {os.path.abspath(output_dir)} with step {predictor.step}.')
  for f in skipped:
    print(f'skipped {f.path}: {f.reason}')
  if failures:
    print(f'{len(failures)} input(s) failed:')
    for f in failures:
      print(f'  {f.path}: {f.reason}')
  return failures
