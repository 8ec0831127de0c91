"""Predictor: the one way to load a trained run and predict with it.

In the spirit of nnU-Net's `nnUNetPredictor`: one object holds a run's model,
its parameters (or an ensemble's) and the inference settings of its config,
and predicts a case given as an array or a file. `--mode=evaluate`,
`--mode=predict` and every later consumer share it.

    from medseg_jax import Predictor
    predictor = Predictor.from_workdir('runs/x')             # best checkpoint
    prediction = predictor.predict(image)                     # [*spatial, C]
    prediction.labels, prediction.probabilities               # [*spatial](, K)
    prediction, case = predictor.predict_file('scan.nii.gz')  # + geometry

`predict` takes one case in the raw units of the training data (a uint8
photograph of any size; a volume's raw intensities and its spacing) and
prepares it exactly as training did: photographs are resized to
`config.data.image_size`, volumes go through `config.data.preprocess`
(intensity normalisation, resampling), then `config.data.mean/std`. The
prediction comes back in the input's geometry. The run's config decides
whole-image or sliding-window prediction (`config.data.patch_size`), slice by
slice prediction for runs trained on 2D slices of volumes, mirror TTA
(`config.eval.tta`), MC-dropout uncertainty (`config.eval.mc_samples`) and
post-processing (`config.eval.postprocess`).
"""

import dataclasses

import jax
import numpy as np

from medseg_jax import config_lib
from medseg_jax import inference
from medseg_jax import postprocess
from medseg_jax import register_cases
from medseg_jax import run_loader
from medseg_jax.data import dicom_series
from medseg_jax.data import image_io
from medseg_jax.data import preprocess
from medseg_jax.data import transforms as transforms_lib
from medseg_jax.data import volume_io
from medseg_jax.data import volume_sources


@dataclasses.dataclass(frozen=True)
class Prediction:
  """The prediction of one case, in the geometry of the case given.

  Attributes:
    labels: int32 class map `[*spatial]`, post-processed.
    probabilities: float32 `[*spatial, K]` (K = 1: foreground probability).
    uncertainty: MC-dropout maps {'mean', 'std' `[*spatial, K]`, 'entropy',
      'mutual_information' `[*spatial]`} (see
      `inference.mc_dropout_predict`), or None when not asked for.
  """
  labels: np.ndarray
  probabilities: np.ndarray
  uncertainty: dict[str, np.ndarray] | None = None


@dataclasses.dataclass(frozen=True)
class InputCase:
  """A file read for prediction, with what is needed to write results back.

  Attributes:
    path: the file (or DICOM series folder).
    kind: 'image' (a 2D photograph) or 'volume' (NIfTI or DICOM).
    image: the array given to `Predictor.predict`: uint8 `[H, W, C]` or
      float32 `[D, H, W, C]`.
    spacing: (D, H, W) mm of a volume; None for an image.
    volume: the `volume_io.Volume` read (affine, header) for
      `volume_io.write_nifti_like`; None for an image.
  """
  path: str
  kind: str
  image: np.ndarray
  spacing: tuple[float, ...] | None = None
  volume: volume_io.Volume | None = None


def _resize(array: np.ndarray, shape) -> np.ndarray:
  """Resamples `[*spatial]` or `[*spatial, K]` to `shape` (linear)."""
  return preprocess.resample_to_shape(array, shape, order=1)


# --------------------------------------------------------------------------
# The predictor.


class Predictor:
  """A trained run's model (or ensemble) and its config's inference settings.

  Attributes:
    config: the config predictions follow (the run's, with any overrides).
    model: the Flax module.
    variables: this run's variables ({'params', ['batch_stats']}).
    members: the variables of every ensemble member, this run's first.
    step: the checkpoint step loaded (this run's).
  """

  def __init__(self, config, model, variables, step: int, members=()):
    """Use `from_workdir`; this takes what it loaded.

    Args:
      config: the run's config.
      model: the module of `config.model`.
      variables: this run's variables.
      step: their checkpoint step.
      members: other runs' variables to average with (an ensemble).

    Raises:
      ValueError: unusable MC-dropout settings, or MC dropout with an
        ensemble.
    """
    run_loader.check_mc_settings(config)
    if members and config.eval.mc_samples:
      raise ValueError('An ensemble averages probabilities; MC-dropout maps '
                       '(config.eval.mc_samples) are per model: ask for them '
                       'without --ensemble.')
    self.config = config
    self.model = model
    self.variables = variables
    self.members = [variables, *members]
    self.step = step
    self._predict_fn = inference.make_predict_fn(model, self.members)
    self._normalize = transforms_lib.build_eval_transforms(config.data.mean,
                                                           config.data.std)

  @classmethod
  def from_workdir(cls, workdir: str, checkpoint: str = 'best', step=None,
                   ensemble=(), config_overrides=None, config=None
                   ) -> 'Predictor':
    """Loads a trained run (and the other runs of an ensemble).

    Args:
      workdir: the run's workdir.
      checkpoint: 'best' or 'latest'.
      step: a step to load instead of the newest of `checkpoint`.
      ensemble: workdirs of other runs of the same model (e.g. the other
        cross-validation folds), whose `checkpoint` checkpoints are averaged
        with this run's.
      config_overrides: {dotted key: value} changes of the run's config,
        e.g. {'eval.tta': True}; the model part must stay the run's.
      config: a config to use instead of the run's config.json (e.g. another
        data set for external validation); the model part must be the run's.

    Returns:
      The Predictor.

    Raises:
      ValueError: a config or ensemble member of another model, or a
        checkpoint that does not fit the model.
      FileNotFoundError: no config.json or no such checkpoint.
    """
    config, model, variables, step, members = run_loader.load_run(
        workdir, checkpoint, step, ensemble, config_overrides, config)
    return cls(config, model, variables, step, members)

  # -------------------------------------------------------------- shapes

  @property
  def slice_context(self) -> int | None:
    """The slice context of a run trained on 2D slices of volumes, else None."""
    return config_lib.slice_context(self.config)

  @property
  def case_ndim(self) -> int:
    """Spatial axes of the cases this run predicts (3 for a 2D-slice run)."""
    if self.slice_context is not None:
      return 3
    return len(config_lib.spatial_shape(self.config))

  def _checked(self, image) -> np.ndarray:
    """Returns `image` with the model's channel count, or raises ValueError."""
    image = np.asarray(image)
    ndim = image.ndim - 1
    spatial = config_lib.spatial_shape(self.config)
    if ndim != self.case_ndim:
      what = {2: 'a 2D image', 3: 'a volume'}.get(ndim, f'a {ndim}D array')
      hint = ('give it NIfTI files or DICOM series' if self.case_ndim == 3
              else 'give it 2D images')
      trained = ('slices of volumes' if self.slice_context is not None else
                 f'inputs of {spatial}')
      raise ValueError(
          f'{what} cannot be predicted by this {len(spatial)}D model '
          f'(trained on {trained}); {hint}. Arrays are channels-last '
          f'[*spatial, C] (got shape {image.shape}).')
    want = config_lib.volume_channels(self.config)
    have = image.shape[-1]
    if have == want:
      return image
    if have == 1 and want == 3 and ndim == 2:  # A grey photo, an RGB model.
      return np.repeat(image, 3, axis=-1)
    context = self.slice_context
    slices = (f' ({self.config.data.in_channels} = {want} x '
              f'{2 * context + 1} slices)') if context else ''
    raise ValueError(
        f'the image has {have} channel(s), the model was trained on '
        f'{want}{slices} (config.data.in_channels).')

  def prepare(self, image, spacing=None) -> np.ndarray:
    """Returns a raw case prepared as the training data were.

    Args:
      image: `[H, W, C]` photograph (uint8, or float in [0, 1]) or
        `[D, H, W, C]` volume in raw intensities.
      spacing: (D, H, W) mm of a volume; needed when the run resamples
        (`config.data.preprocess.target_spacing`), else 1 mm is assumed.

    Returns:
      A photograph resized to `config.data.image_size`, or the volume after
      `config.data.preprocess`: what the data source gave training.

    Raises:
      ValueError: wrong dimensions or channels, or a missing spacing.
    """
    image = self._checked(image)
    if image.ndim == 3 and self.slice_context is None:
      size = config_lib.image_size(self.config)
      if image.dtype == np.uint8:
        return image_io.resize_image(image, size)
      return _resize(image.astype(np.float32), size)
    if spacing is None:
      target = tuple(self.config.data.preprocess.target_spacing)
      if target:
        raise ValueError(
            'This run resamples volumes to config.data.preprocess.'
            f'target_spacing={target}: pass the spacing (D, H, W) in mm of '
            'the volume.')
      spacing = (1.0,) * 3
    image = register_cases.align_channels(  # register_to, as in training.
        image.astype(np.float32), spacing, self.config.data.preprocess)
    prepared, _, _ = preprocess.preprocess_case(
        image.astype(np.float32), None, spacing, self.config.data.preprocess)
    return prepared

  def model_input(self, prepared: np.ndarray) -> np.ndarray:
    """Returns the normalised model input of a prepared case.

    For a 2D-slice run, every slice of the volume `[D, H, W, C]` with its
    context as channels, `[D, H, W, C * (2 * context + 1)]`.
    """
    if self.slice_context is not None:
      prepared = volume_sources.stack_slice_context(prepared,
                                                    self.slice_context)
    record = {'image': prepared}
    for op in self._normalize:
      record = op.map(record)
    return record['image']

  # -------------------------------------------------------------- predict

  def _probabilities_of(self, x: np.ndarray) -> np.ndarray:
    """Probabilities `[*spatial, K]` of one normalised 2D or 3D input."""
    patch = config_lib.patch_size(self.config)
    divisor = inference.input_divisor(self.model)

    def once(image):
      if patch:
        return inference.sliding_window(
            self._predict_fn, image, patch,
            **config_lib.sliding_window(self.config))
      return inference.predict_whole(self._predict_fn, image, divisor)

    if self.config.eval.tta:
      return inference.tta_flips(once, x)
    return np.asarray(once(x), np.float32)

  def _mc_maps_of(self, x: np.ndarray, rng) -> dict[str, np.ndarray]:
    """MC-dropout maps of one normalised 2D or 3D input."""
    maps = inference.mc_dropout_predict(
        self.model, self.variables, x, num_samples=self.config.eval.mc_samples,
        rng=rng, patch_size=config_lib.patch_size(self.config) or None,
        **config_lib.sliding_window(self.config))
    return {k: np.asarray(v, np.float32) for k, v in maps.items()}

  def _per_case(self, fn, x: np.ndarray):
    """Applies `fn(input, z)` to the input, or to each slice and restacks."""
    if self.slice_context is None:
      return fn(x, 0)
    outputs = [fn(s, z) for z, s in enumerate(x)]
    if isinstance(outputs[0], dict):
      return {k: np.stack([o[k] for o in outputs]) for k in outputs[0]}
    return np.stack(outputs)

  def labels(self, probabilities: np.ndarray) -> np.ndarray:
    """Returns the post-processed int32 label map of `[*spatial, K]`."""
    labels = inference.labels_from_probabilities(probabilities,
                                                 self.config.eval.threshold)
    return postprocess.from_config(np.asarray(labels),
                                   self.config.eval.postprocess)

  def _wants_uncertainty(self, uncertainty) -> bool:
    return bool(self.config.eval.mc_samples) if uncertainty is None else bool(
        uncertainty)

  def _probabilities_and_maps(self, prepared, uncertainty):
    x = self.model_input(prepared)
    probs = self._per_case(lambda s, z: self._probabilities_of(s), x)
    maps = None
    if self._wants_uncertainty(uncertainty):
      rng = jax.random.PRNGKey(0)
      # A slice run draws each slice's samples from its own keys.
      maps = self._per_case(
          lambda s, z: self._mc_maps_of(
              s, rng if self.slice_context is None else
              jax.random.fold_in(rng, z)), x)
    return np.asarray(probs, np.float32), maps

  def predict_prepared(self, image: np.ndarray, *, uncertainty=None
                       ) -> Prediction:
    """Predicts a case as the run's data source gives it (already prepared).

    What `--mode=evaluate` predicts: a photograph at the training size, a
    volume after `config.data.preprocess`; no resizing.

    Args:
      image: `[*spatial, C]`, see `prepare`.
      uncertainty: compute the MC-dropout maps; None: when
        `config.eval.mc_samples` asks for them.

    Returns:
      The Prediction, in the geometry of `image`.
    """
    probs, maps = self._probabilities_and_maps(image, uncertainty)
    return Prediction(self.labels(probs), probs, maps)

  def predict(self, image, spacing=None, *, uncertainty=None) -> Prediction:
    """Predicts one case given in the raw units of the training data.

    Args:
      image: `[H, W, C]` photograph (uint8 as read from a file; any size) or
        `[D, H, W, C]` volume (raw intensities), see `prepare`.
      spacing: (D, H, W) mm of a volume, see `prepare`.
      uncertainty: compute the MC-dropout maps; None: when
        `config.eval.mc_samples` asks for them.

    Returns:
      The Prediction in the geometry of `image`: the probabilities (and
      maps) are resampled back to its shape, then thresholded.

    Raises:
      ValueError: an image of other dimensions or channels than the model's.
    """
    shape = np.shape(image)[:-1]
    probs, maps = self._probabilities_and_maps(self.prepare(image, spacing),
                                               uncertainty)
    probs = _resize(probs, shape)
    if maps is not None:
      maps = {k: _resize(v, shape) for k, v in maps.items()}
    return Prediction(self.labels(probs), probs, maps)

  def read_file(self, path: str) -> InputCase:
    """Reads an image file, a NIfTI file or a DICOM series folder.

    Raises:
      FileError: unreadable file (a ValueError naming it).
    """
    if image_io.is_image_file(path):
      return InputCase(path, 'image', image_io.read_image(path))
    volume = volume_io.read_volume(path)
    array = volume.array if volume.array.ndim == 4 else volume.array[..., None]
    if preprocess.options(self.config.data.preprocess)['intensity'] == 'suv':
      array = array * dicom_series.suv_factors([path], array.shape[-1])
    return InputCase(path, 'volume', array.astype(np.float32),
                     tuple(volume.spacing), volume)

  def predict_file(self, path: str, *, uncertainty=None
                   ) -> tuple[Prediction, InputCase]:
    """Predicts an image, NIfTI file or DICOM series.

    Args:
      path: the file or series folder.
      uncertainty: see `predict`.

    Returns:
      (the Prediction in the file's geometry, the InputCase read: its
      `volume` holds the affine and header to write results back with
      `volume_io.write_nifti_like`).
    """
    case = self.read_file(path)
    return self.predict(case.image, case.spacing,
                        uncertainty=uncertainty), case
