"""The models the dashboard offers: one per --workdir, and their ensemble.

The app loads each one at most once per server process (Streamlit's
`cache_resource` around `load_predictor`); loading also compiles the model
once (`warm_up`), so the first upload is not slow.
"""

import os

import numpy as np

from medseg_jax import config_lib
from medseg_jax import gradcam
from medseg_jax import predictor as predictor_lib
from medseg_jax import workdir as workdir_lib

# MC-dropout samples when the run's config asks for none (eval.mc_samples=0)
# but the model has dropout: enough for a stable std map on a CPU.
DEFAULT_MC_SAMPLES = 10


def choices(workdirs, ensemble: bool) -> list[str]:
  """Returns the model picker's labels: one per workdir (+ the ensemble).

  Args:
    workdirs: the --workdir values.
    ensemble: --ensemble: the last choice is the mean of all runs.
  """
  names = [os.path.basename(os.path.normpath(w)) or w for w in workdirs]
  labels = [n if names.count(n) == 1 else w for n, w in zip(names, workdirs)]
  if ensemble:
    labels.append(f'Ensemble of {len(workdirs)} models (mean probability)')
  return labels


def mc_samples(config) -> int:
  """Returns the MC-dropout samples to offer: 0 for a model without dropout."""
  if not config.model.dropout_rate > 0:
    return 0
  return int(config.eval.mc_samples) or DEFAULT_MC_SAMPLES


def load_predictor(workdirs, choice: int, ensemble: bool,
                   checkpoint: str = 'best') -> predictor_lib.Predictor:
  """Loads the model of picker entry `choice`, compiled.

  Args:
    workdirs: the --workdir values.
    choice: an index into `choices(workdirs, ensemble)`.
    ensemble: --ensemble (then the last choice is the ensemble).
    checkpoint: 'best' or 'latest'.

  Returns:
    The Predictor: a single run with MC dropout set up when its model has
    dropout (`mc_samples`), or the ensemble of all runs (MC dropout off:
    its maps are per model).

  Raises:
    ValueError / FileNotFoundError: as `Predictor.from_workdir`.
  """
  workdirs = list(workdirs)
  if ensemble and choice == len(workdirs):
    predictor = predictor_lib.Predictor.from_workdir(
        workdirs[0], checkpoint, ensemble=workdirs[1:],
        config_overrides={'eval.mc_samples': 0})
  else:
    config = workdir_lib.load_config(workdirs[choice])
    predictor = predictor_lib.Predictor.from_workdir(
        workdirs[choice], checkpoint,
        config_overrides={'eval.mc_samples': mc_samples(config)})
  warm_up(predictor)
  return predictor


def is_two_d(predictor) -> bool:
  """Returns whether the model predicts 2D images (not volumes)."""
  return predictor.case_ndim == 2


def warm_up(predictor) -> None:
  """Compiles a 2D model by predicting a blank image of the training size.

  Volume runs compile per input shape (sliding windows of the training
  patch), on the first volume.
  """
  if not is_two_d(predictor):
    return
  shape = (*config_lib.image_size(predictor.config),
           config_lib.volume_channels(predictor.config))
  predictor.predict(np.zeros(shape, np.uint8), uncertainty=False)


def gradcam_layer_names(predictor) -> list[str]:
  """Returns the Grad-CAM layers of a single 2D run ([] for other models)."""
  if not is_two_d(predictor) or len(predictor.members) > 1:
    return []
  dummy = np.zeros(config_lib.model_input_shape(predictor.config)[1:],
                   np.float32)
  return gradcam.feature_layer_names(predictor.model, predictor.variables,
                                     dummy)
