"""`--mode=predict`: masks for new images and volumes, in their own geometry.

    python -m medseg_jax.main --mode=predict --workdir=runs/x \
        --input=new_cases/ --output=predictions/

Inputs: PNG/JPEG/TIFF images, NIfTI volumes (.nii, .nii.gz), DICOM series (a
folder of .dcm files), or a folder of any of these. Outputs, per input:

  images   <name>.png          the mask at the input's size (0/255 binary,
                               0..K-1 multi-class)
  volumes  <name>.nii.gz       the mask with the input's shape, affine, header
  with config.eval.save_probabilities: <name>_prob.npy / _prob.nii.gz
  with config.eval.mc_samples = N > 0 (MC dropout): <name>_mean, _std and
  _entropy maps (.npy for images, .nii.gz for volumes)

Images are resized to the training size and the probabilities back to the
input size; volumes go through the training preprocessing (intensity,
resampling) and are predicted by sliding windows of the training patch, then
resampled back. A file that fails is reported and the others still run; the
failures are listed at the end. Nothing is written next to the inputs.
"""

import dataclasses
import os
import traceback

import jax
import numpy as np
from scipy import ndimage

from medseg_jax import evaluate
from medseg_jax import inference
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
  return inputs, skipped


def output_stem(path: str) -> str:
  """Returns the input's name without its extension(s)."""
  name = os.path.basename(os.path.normpath(path))
  for suffix in (*NIFTI_SUFFIXES, *image_io.IMAGE_EXTENSIONS):
    if name.lower().endswith(suffix):
      return name[:-len(suffix)]
  return name


def _check_channels(image: np.ndarray, config, path: str) -> np.ndarray:
  """Returns the image with the model's channel count, or raises."""
  want = config.data.in_channels
  have = image.shape[-1]
  if have == want:
    return image
  if have == 1 and want == 3:  # Grayscale photograph for an RGB model.
    return np.repeat(image, 3, axis=-1)
  raise ValueError(f'{path}: the image has {have} channel(s), the model was '
                   f'trained on {want} (config.data.in_channels).')


def _resize(array: np.ndarray, shape, order: int) -> np.ndarray:
  """Resizes the spatial axes of `[*spatial, K]` to `shape`."""
  factors = [t / s for t, s in zip(shape, array.shape[:-1])] + [1.0]
  if all(f == 1.0 for f in factors):
    return array
  out = ndimage.zoom(array, factors, order=order, mode='nearest', grid_mode=True)
  return out


class Predictor:
  """A trained run's model with the inference settings of its config."""

  def __init__(self, config, workdir: str, which: str = 'best', step=None):
    self.config = config
    self.model, self.variables, self.step = evaluate.load_model(
        config, workdir, which, step)
    self.predict_case = evaluate.make_case_predictor(config, self.model,
                                                     self.variables)
    self._normalize = evaluate._normalizer(config)  # pylint: disable=protected-access

  def probabilities(self, image: np.ndarray) -> np.ndarray:
    """Returns the probabilities `[*spatial, K]` of a raw (unnormalised) image."""
    image = self._normalize({'image': image})['image']
    return np.asarray(self.predict_case(image), np.float32)

  def mc_maps(self, image: np.ndarray) -> dict[str, np.ndarray]:
    """Returns MC-dropout mean/std/entropy maps of a raw image."""
    image = self._normalize({'image': image})['image']
    maps = inference.mc_dropout_predict(
        self.model, self.variables, image,
        num_samples=self.config.eval.mc_samples, rng=jax.random.PRNGKey(0))
    return {k: np.asarray(v, np.float32) for k, v in maps.items()}

  def labels(self, probs: np.ndarray) -> np.ndarray:
    """Returns the post-processed label map of probabilities `[*spatial, K]`."""
    labels = inference.labels_from_probabilities(probs,
                                                 self.config.eval.threshold)
    return evaluate.postprocess_labels(np.asarray(labels), self.config.eval)


def predict_image(predictor: Predictor, path: str, out_dir: str) -> list[str]:
  """Predicts one 2D image file; returns the files written."""
  config = predictor.config
  raw = _check_channels(image_io.read_image(path), config, path)
  size = config.data.image_size
  size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
  resized = image_io.resize_image(raw, size)
  probs = _resize(predictor.probabilities(resized), raw.shape[:2], order=1)
  stem = os.path.join(out_dir, output_stem(path))
  image_io.write_mask_png(stem + '.png', predictor.labels(probs),
                          num_classes=config.data.num_classes)
  written = [stem + '.png']
  if config.eval.save_probabilities:
    np.save(stem + '_prob.npy', probs)
    written.append(stem + '_prob.npy')
  if config.eval.mc_samples:
    for name, values in predictor.mc_maps(resized).items():
      np.save(f'{stem}_{name}.npy', _resize(values[..., None] if values.ndim == 2
                                            else values, raw.shape[:2], 1))
      written.append(f'{stem}_{name}.npy')
  return written


def predict_volume(predictor: Predictor, path: str, out_dir: str) -> list[str]:
  """Predicts one NIfTI file or DICOM series; returns the files written."""
  config = predictor.config
  volume = volume_io.read_volume(path)
  array = volume.array if volume.array.ndim == 4 else volume.array[..., None]
  array = _check_channels(array.astype(np.float32), config, path)
  image, _, _ = preprocess.preprocess_case(array, None, volume.spacing,
                                           config.data.preprocess)
  probs = predictor.probabilities(image)
  probs = preprocess.resample_to_shape(probs, array.shape[:-1], order=1)
  stem = os.path.join(out_dir, output_stem(path))
  volume_io.write_nifti_like(stem + '.nii.gz',
                             predictor.labels(probs).astype(np.uint8), volume)
  written = [stem + '.nii.gz']
  if config.eval.save_probabilities:
    volume_io.write_nifti_like(stem + '_prob.nii.gz', probs, volume)
    written.append(stem + '_prob.nii.gz')
  if config.eval.mc_samples:
    for name, values in predictor.mc_maps(image).items():
      values = preprocess.resample_to_shape(
          values if values.ndim == 4 else values[..., None], array.shape[:-1],
          order=1)
      volume_io.write_nifti_like(f'{stem}_{name}.nii.gz', values, volume)
      written.append(f'{stem}_{name}.nii.gz')
  return written


def predict_paths(config, workdir: str, input_path: str, output_dir: str,
                  which: str = 'best', step=None) -> list[Failure]:
  """Predicts every input under `input_path` into `output_dir`.

  Returns:
    The inputs that failed or were skipped (also printed), empty if none.
  """
  inputs, failures = list_inputs(input_path)
  if os.path.abspath(output_dir) == os.path.abspath(input_path):
    raise ValueError('--output must differ from --input: predictions are '
                     'never written next to the inputs.')
  os.makedirs(output_dir, exist_ok=True)
  predictor = Predictor(config, workdir, which, step)
  for path in inputs:
    try:
      if _is_image(path):
        written = predict_image(predictor, path, output_dir)
      else:
        written = predict_volume(predictor, path, output_dir)
      print(f'{path} -> {", ".join(os.path.basename(w) for w in written)}')
    except (ValueError, OSError, EOFError) as e:
      failures.append(Failure(path, str(e) or traceback.format_exc(limit=1)))
  done = len(inputs) - sum(f.path in inputs for f in failures)
  print(f'Predicted {done} of {len(inputs)} input(s) into '
        f'{os.path.abspath(output_dir)} with step {predictor.step}.')
  if failures:
    print(f'{len(failures)} problem(s):')
    for f in failures:
      print(f'  {f.path}: {f.reason}')
  return failures
