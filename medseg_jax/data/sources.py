"""Random-access data sources, selected by `config.data.source`.

A source is a Grain random-access data source (`__len__`, `__getitem__`) whose
records are dicts with `image` (`[*spatial, C]`: uint8 photographs, float32
z-scored volumes), `mask` (uint8 `[*spatial]`, class indices), `spacing`,
`patient_id` and `case_id`, plus cheap `patient_ids` and `case_ids` lists (one
per record) used to split by patient without decoding.

  synthetic    procedural dermoscopy-like lesions (2D, binary, RGB)
  synthetic3d  procedural BraTS-like volumes (3D, up to 4 channels/classes)
  isic2018     the ISIC 2018 Task 1 folders as unzipped
  folder       image + mask folders paired by name, or a CSV manifest
  nifti        MSD / nnU-Net NIfTI data sets, as volumes or 2D slices
"""

from medseg_jax.data import folder_sources
from medseg_jax.data import synthetic
from medseg_jax.data import synthetic3d
from medseg_jax.data import volume_sources

KNOWN_SOURCES = ('synthetic', 'synthetic3d', 'isic2018', 'folder', 'nifti')
PHOTO_SOURCES = ('synthetic', 'isic2018', 'folder')  # RGB/gray photographs.


def _synthetic_source(data_cfg):
  if data_cfg.num_classes != 1 or data_cfg.in_channels != 3:
    raise ValueError(
        "config.data.source='synthetic' makes binary RGB lesions: it needs "
        f'config.data.num_classes=1 (got {data_cfg.num_classes}) and '
        f'config.data.in_channels=3 (got {data_cfg.in_channels}).')
  return synthetic.SyntheticLesions(
      num_patients=data_cfg.synthetic.num_patients,
      images_per_patient=data_cfg.synthetic.images_per_patient,
      image_size=data_cfg.image_size,
      seed=data_cfg.synthetic.get('seed', 0))


def _nifti_source(data_cfg):
  """Returns the NIfTI source; checks the model input size can be known.

  The model's input shape comes from the config alone (`patch_size`, else
  `image_size`), so whole 2D slices must have the size `image_size` says.
  """
  source = volume_sources.build_nifti_source(data_cfg)
  if tuple(data_cfg.get('patch_size', ()) or ()):
    return source
  if data_cfg.get('volume_mode', '3d') == '3d':
    raise ValueError(
        "config.data.source='nifti' with volume_mode='3d' trains on patches: "
        'set config.data.patch_size=(D, H, W), e.g. (64, 96, 96) or '
        "configs/unet3d.py's value (volumes differ in size and cannot be "
        "batched whole), or use volume_mode='2d'.")
  slice_hw = tuple(source.volumes.shapes()[0][1:]) if len(source) else ()
  size = data_cfg.image_size
  size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
  if slice_hw and slice_hw != size:
    square = (f'config.data.image_size={slice_hw[0]}, or '
              if slice_hw[0] == slice_hw[1] else '')
    raise ValueError(
        f'volume_mode=2d: the slices are {slice_hw[0]}x{slice_hw[1]} (HxW) but '
        f'config.data.image_size={data_cfg.image_size}; set {square}'
        f'config.data.patch_size=({slice_hw[0]}, {slice_hw[1]}) (or smaller, '
        'to train on random 2D patches).')
  return source


_BUILDERS = {
    'synthetic': _synthetic_source,
    'synthetic3d': synthetic3d.build_synthetic3d_source,
    'isic2018': folder_sources.build_2d_source,
    'folder': folder_sources.build_2d_source,
    'nifti': _nifti_source,
}


def build_source(data_cfg):
  """Returns the random-access source that `data_cfg.source` names.

  Args:
    data_cfg: the `config.data` section.

  Returns:
    A random-access source with `patient_ids` and `case_ids` attributes.

  Raises:
    ValueError: unknown source name, options the source cannot honour, or
      (file sources) the problems found while listing the data folder.
  """
  builder = _BUILDERS.get(data_cfg.source)
  if builder is None:
    raise ValueError(f'Unknown config.data.source={data_cfg.source!r}; known '
                     f'sources: {", ".join(KNOWN_SOURCES)}.')
  return builder(data_cfg)

