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
written into the input folder.
"""

import dataclasses
import os

import jax
import numpy as np
from PIL import Image
from scipy import ndimage

from medseg_jax import evaluate
from medseg_jax import gradcam
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


def _check_channels(image: np.ndarray, config, path: str) -> np.ndarray:
  """Returns the image with the model's channel count, or raises."""
  want = evaluate.volume_channels(config) if image.ndim == 4 else \
      config.data.in_channels
  have = image.shape[-1]
  if have == want:
    return image
  if have == 1 and want == 3:  # Grayscale photograph for an RGB model.
    return np.repeat(image, 3, axis=-1)
  context = evaluate.slice_context(config)
  slices = (f' ({config.data.in_channels} = {want} x {2 * context + 1} '
            'slices)') if context else ''
  raise volume_io.FileError(
      path, f'the image has {have} channel(s), the model was trained on '
      f'{want}{slices} (config.data.in_channels).')


def _check_spatial_dims(config, path: str, ndim: int) -> None:
  """Raises if the model cannot take `ndim`-D inputs (a photo for a 3D model).

  A run trained on slices of volumes predicts volumes, slice by slice.
  """
  spatial = evaluate.model_input_shape(config)[1:-1]
  sliced = evaluate.slice_context(config) is not None
  if (len(spatial) == ndim) != sliced:
    return
  what = 'a 2D image' if ndim == 2 else 'a volume'
  hint = ('give it NIfTI files or DICOM series' if len(spatial) == 3 or sliced
          else 'give it 2D images')
  trained = 'slices of volumes' if sliced else f'inputs of {spatial}'
  raise volume_io.FileError(
      path, f'{what} cannot be predicted by this {len(spatial)}D model '
      f'(trained on {trained}); {hint}.')


def _resize(array: np.ndarray, shape, order: int) -> np.ndarray:
  """Resizes the spatial axes of `[*spatial, K]` to `shape`."""
  factors = [t / s for t, s in zip(shape, array.shape[:-1])] + [1.0]
  if all(f == 1.0 for f in factors):
    return array
  out = ndimage.zoom(array, factors, order=order, mode='nearest', grid_mode=True)
  return out


def check_mc_settings(config) -> None:
  """Raises before any prediction if MC dropout is asked for but cannot work."""
  samples = config.eval.get('mc_samples', 0)
  if not samples:
    return
  if samples < 2:
    raise ValueError(f'config.eval.mc_samples={samples}: MC dropout needs at '
                     'least 2 samples (20 is common), or 0 for none.')
  if not config.model.get('dropout_rate', 0.0) > 0:
    raise ValueError(
        f'config.eval.mc_samples={samples} needs a model trained with dropout, '
        'but this run has config.model.dropout_rate='
        f'{config.model.get("dropout_rate", 0.0)}. Set '
        '--config.eval.mc_samples=0, or train with --config.model.dropout_rate'
        '=0.1 (or more).')


def _gradcam_layer(config) -> str:
  return config.eval.get('gradcam_layer', '') or ''


class Predictor:
  """A trained run's model with the inference settings of its config."""

  def __init__(self, config, workdir: str, which: str = 'best', step=None,
               ensemble=()):
    """Args: the run's config and workdir, its checkpoint (`which`, `step`),
    and other runs' workdirs to average with it (`ensemble`)."""
    check_mc_settings(config)
    if ensemble and (config.eval.get('mc_samples', 0) or
                     _gradcam_layer(config)):
      raise ValueError('--ensemble averages probabilities; MC-dropout maps '
                       '(config.eval.mc_samples) and Grad-CAM '
                       '(config.eval.gradcam_layer) are per model: run them '
                       'without --ensemble.')
    self.config = config
    self.model, self.variables, self.step = evaluate.load_model(
        config, workdir, which, step)
    members = evaluate.load_ensemble_members(config, ensemble, which)
    self.predict_case = evaluate.make_case_predictor(
        config, self.model, [self.variables, *members] if members else
        self.variables)
    self._normalize = evaluate.normalizer(config)
    self._check_gradcam_layer()

  def _check_gradcam_layer(self) -> None:
    """Raises before any prediction if config.eval.gradcam_layer is unusable."""
    layer = _gradcam_layer(self.config)
    if not layer:
      return
    spatial = evaluate.model_input_shape(self.config)[1:-1]
    if len(spatial) != 2 or evaluate.slice_context(self.config) is not None:
      raise ValueError('config.eval.gradcam_layer: predict writes Grad-CAM '
                       'overlays for 2D image runs only; for volumes call '
                       'medseg_jax.gradcam.grad_cam on a case.')
    dummy = np.zeros(evaluate.model_input_shape(self.config)[1:], np.float32)
    names = gradcam.feature_layer_names(self.model, self.variables, dummy)
    if layer not in names:
      raise ValueError(f'config.eval.gradcam_layer={layer!r} is not a '
                       f'feature-map layer of this {self.config.model.name}; '
                       f'choose one of: {", ".join(names)}.')

  def gradcam_overlay(self, raw: np.ndarray, resized: np.ndarray
                      ) -> np.ndarray:
    """Returns the RGB uint8 Grad-CAM overlay of `config.eval.gradcam_layer`
    on the raw image, from the model input `resized` (the training size)."""
    heatmap = gradcam.grad_cam(self.model, self.variables,
                               self._model_input(resized),
                               _gradcam_layer(self.config),
                               threshold=self.config.eval.threshold)
    heatmap = _resize(heatmap[..., None], raw.shape[:2], order=1)[..., 0]
    return gradcam.overlay(raw, np.clip(heatmap, 0.0, 1.0))

  def _model_input(self, image: np.ndarray) -> np.ndarray:
    """The normalised model input of a raw image (slices for a slice run)."""
    image = evaluate.as_model_input(self.config, image)
    return self._normalize({'image': image})['image']

  def probabilities(self, image: np.ndarray) -> np.ndarray:
    """Returns the probabilities `[*spatial, K]` of a raw (unnormalised) image."""
    return np.asarray(self.predict_case(self._model_input(image)), np.float32)

  def _mc_maps_of(self, image: np.ndarray, rng) -> dict[str, np.ndarray]:
    eval_cfg = self.config.eval
    patch = tuple(self.config.data.get('patch_size', ()) or ()) or None
    maps = inference.mc_dropout_predict(
        self.model, self.variables, image, num_samples=eval_cfg.mc_samples,
        rng=rng, patch_size=patch, overlap=eval_cfg.get('overlap', 0.5),
        blend=eval_cfg.get('blend', 'gaussian'),
        batch_size=eval_cfg.get('sw_batch_size', 4))
    return {k: np.asarray(v, np.float32) for k, v in maps.items()}

  def mc_maps(self, image: np.ndarray) -> dict[str, np.ndarray]:
    """Returns MC-dropout mean/std/entropy/mutual-information maps of a raw
    image, whole or by the sliding windows of `probabilities` (slice by
    slice, restacked, for a run trained on slices of volumes)."""
    image = self._model_input(image)
    rng = jax.random.PRNGKey(0)
    if evaluate.slice_context(self.config) is None:
      return self._mc_maps_of(image, rng)
    per_slice = [self._mc_maps_of(s, jax.random.fold_in(rng, z))
                 for z, s in enumerate(image)]
    return {k: np.stack([m[k] for m in per_slice]) for k in per_slice[0]}

  def labels(self, probs: np.ndarray) -> np.ndarray:
    """Returns the post-processed label map of probabilities `[*spatial, K]`."""
    labels = inference.labels_from_probabilities(probs,
                                                 self.config.eval.threshold)
    return evaluate.postprocess_labels(np.asarray(labels), self.config.eval)


def predict_image(predictor: Predictor, path: str, out_dir: str) -> list[str]:
  """Predicts one 2D image file; returns the files written."""
  config = predictor.config
  _check_spatial_dims(config, path, 2)
  raw = _check_channels(image_io.read_image(path), config, path)
  size = config.data.image_size
  size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
  resized = image_io.resize_image(raw, size)
  probs = _resize(predictor.probabilities(resized), raw.shape[:2], order=1)
  stem = os.path.join(out_dir, output_stem(path))
  image_io.write_mask_png(stem + '.png', predictor.labels(probs),
                          num_classes=config.data.num_classes,
                          label_values=tuple(config.data.get('label_values',
                                                             ()) or ()))
  written = [stem + '.png']
  if config.eval.save_probabilities:
    np.save(stem + '_prob.npy', probs)
    written.append(stem + '_prob.npy')
  if _gradcam_layer(config):
    Image.fromarray(predictor.gradcam_overlay(raw, resized)).save(
        stem + '_gradcam.png')
    written.append(stem + '_gradcam.png')
  if config.eval.mc_samples:
    for name, values in predictor.mc_maps(resized).items():
      scalar = values.ndim == 2  # entropy, mutual_information: [H, W].
      values = _resize(values[..., None] if scalar else values, raw.shape[:2],
                       order=1)
      np.save(f'{stem}_{name}.npy', values[..., 0] if scalar else values)
      written.append(f'{stem}_{name}.npy')
  return written


def predict_volume(predictor: Predictor, path: str, out_dir: str) -> list[str]:
  """Predicts one NIfTI file or DICOM series; returns the files written."""
  config = predictor.config
  _check_spatial_dims(config, path, 3)
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
      scalar = values.ndim == 3  # entropy, mutual_information: [D, H, W].
      values = preprocess.resample_to_shape(
          values[..., None] if scalar else values, array.shape[:-1], order=1)
      volume_io.write_nifti_like(f'{stem}_{name}.nii.gz',
                                 values[..., 0] if scalar else values, volume)
      written.append(f'{stem}_{name}.nii.gz')
  return written


def _predict_one(predictor: Predictor, path: str, out_dir: str) -> list[str]:
  if _is_image(path):
    return predict_image(predictor, path, out_dir)
  return predict_volume(predictor, path, out_dir)


def _reason(error: Exception, path: str) -> str:
  """The message of an input's error (with its type when unexpected)."""
  if isinstance(error, volume_io.FileError) and error.path == path:
    return error.reason  # Listed after the path already.
  if isinstance(error, (ValueError, OSError, EOFError)) and str(error):
    return str(error)
  return f'{type(error).__name__}: {error}'


def predict_paths(config, workdir: str, input_path: str, output_dir: str,
                  which: str = 'best', step=None,
                  ensemble=()) -> list[Failure]:
  """Predicts every input under `input_path` into `output_dir`.

  With `ensemble` (other runs' workdirs, same model), the probabilities are
  the mean over this run's and their models.

  Returns:
    The inputs that failed (also printed, after the skipped entries), empty
    if none.
  """
  inputs, skipped = list_inputs(input_path)
  check_output_dir(input_path, output_dir)
  predictor = Predictor(config, workdir, which, step, ensemble)
  os.makedirs(output_dir, exist_ok=True)
  failures, stems = [], {}
  for path in inputs:
    stem = output_stem(path)
    if stem in stems:
      failures.append(Failure(path, f'its output name {stem!r} is already '
                              f'taken by {stems[stem]}; rename one of them.'))
      continue
    stems[stem] = path
    try:
      written = _predict_one(predictor, path, output_dir)
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
