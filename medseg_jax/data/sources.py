"""Random-access data sources, selected by `config.data.source`: one registry.

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

Each has one entry in `REGISTRY`: its builder, its data-set check (every
problem at once, see `check.py`), whether its images are photographs (RGB or
grey, where colour augmentation means something), and the names of its
classes when the data set has them. A new source adds one entry.
"""

from collections.abc import Callable
import dataclasses
import os

from medseg_jax.data import folder_sources
from medseg_jax.data import nifti_layout
from medseg_jax.data import patches
from medseg_jax.data import synthetic
from medseg_jax.data import synthetic3d
from medseg_jax.data import volume_sources
from medseg_jax.data.errors import Problem


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """What the stack knows about one source.

  Attributes:
    build: config.data -> the random-access source.
    check: config.data -> every Problem of the data set ([] if usable).
    is_photo: RGB/grey photographs (colour augmentation applies).
    class_names: config.data -> names of classes 1..K-1 that the data set
      itself gives (dataset.json, the generator), or () when it has none.
  """
  build: Callable
  check: Callable
  is_photo: bool
  class_names: Callable = lambda data_cfg: ()


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
      seed=data_cfg.synthetic.seed)


def _nifti_source(data_cfg):
  """Returns the NIfTI source; checks the model input size can be known.

  The model's input shape comes from the config alone (`patch_size`, else
  `image_size`), so whole 2D slices must have the size `image_size` says.
  """
  source = volume_sources.build_nifti_source(data_cfg)
  if patches.patch_size(data_cfg):
    return source
  if data_cfg.volume_mode == '3d':
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


def _nifti_class_names(data_cfg) -> tuple[str, ...]:
  """dataset.json's label names after the background (names only read)."""
  if not data_cfg.root:
    return ()
  return tuple(nifti_layout.scan_dataset(
      os.path.abspath(data_cfg.root)).class_names[1:])


def _no_problems(data_cfg) -> list[Problem]:
  del data_cfg  # Generated data: nothing to check.
  return []


REGISTRY = {
    'synthetic': SourceSpec(_synthetic_source, _no_problems, is_photo=True),
    'synthetic3d': SourceSpec(
        synthetic3d.build_synthetic3d_source, _no_problems, is_photo=False,
        class_names=lambda cfg: synthetic3d.class_names(cfg.num_classes)),
    'isic2018': SourceSpec(folder_sources.build_2d_source,
                           folder_sources.find_problems, is_photo=True),
    'folder': SourceSpec(folder_sources.build_2d_source,
                         folder_sources.find_problems, is_photo=True),
    'nifti': SourceSpec(_nifti_source, volume_sources.find_problems,
                        is_photo=False, class_names=_nifti_class_names),
}
KNOWN_SOURCES = tuple(REGISTRY)
PHOTO_SOURCES = tuple(n for n, s in REGISTRY.items() if s.is_photo)


def spec(data_cfg) -> SourceSpec:
  """Returns the registry entry of `config.data.source`.

  Raises:
    ValueError: unknown source (names the known ones).
  """
  entry = REGISTRY.get(data_cfg.source)
  if entry is None:
    raise ValueError(f'Unknown config.data.source={data_cfg.source!r}; known '
                     f'sources: {", ".join(KNOWN_SOURCES)}.')
  return entry


def is_photo(data_cfg) -> bool:
  """Returns whether config.data.source holds photographs (not volumes)."""
  return spec(data_cfg).is_photo


def class_names(data_cfg) -> tuple[str, ...]:
  """Returns the names of classes 1..K-1 of a run's data, for reports.

  The data set's own names when it has them (a NIfTI set's dataset.json
  `labels`, the synthetic tumours' classes), else config.data.class_names,
  else 'foreground' (binary) or 'class_1'..'class_{K-1}'.

  Args:
    data_cfg: config.data.

  Returns:
    max(1, K - 1) names.

  Raises:
    ValueError: config.data.class_names names another number of classes,
      or other names than the data set (one line naming both).
  """
  problems = class_names_problems(data_cfg)
  if problems:
    raise ValueError(f'{problems[0].path}: {problems[0].reason}')
  return _resolved_class_names(data_cfg)


def _foreground_count(data_cfg) -> int:
  return max(1, int(data_cfg.num_classes) - 1)


def _config_class_names(data_cfg) -> tuple[str, ...]:
  """config.data.class_names as classes 1..K-1 (background dropped)."""
  names = tuple(str(n) for n in (data_cfg.class_names or ()))
  if int(data_cfg.num_classes) >= 2 and len(names) == int(
      data_cfg.num_classes):
    names = names[1:]  # All K names given, background first.
  return names


def _resolved_class_names(data_cfg) -> tuple[str, ...]:
  own = tuple(spec(data_cfg).class_names(data_cfg))
  if own:
    return own
  names = _config_class_names(data_cfg)
  if names:
    return names
  if int(data_cfg.num_classes) <= 2:
    return ('foreground',)
  return tuple(f'class_{k}' for k in range(1, int(data_cfg.num_classes)))


def class_names_problems(data_cfg) -> list[Problem]:
  """Returns a problem if config.data.class_names disagrees with the data.

  Args:
    data_cfg: config.data.

  Returns:
    [] or one Problem on config.data.class_names that names both lists.
  """
  names = _config_class_names(data_cfg)
  if not names:
    return []
  want = _foreground_count(data_cfg)
  try:
    own = tuple(spec(data_cfg).class_names(data_cfg))
  except ValueError:
    own = ()  # The source's own check reports an unreadable data set.
  key = 'config.data.class_names'
  if own and names != own:
    return [Problem(key, (
        f'{names} but the data set ({data_cfg.source}) names its classes '
        f'1..{want} {own}; remove config.data.class_names or set it to '
        f'{own}.'))]
  if len(names) != want:
    return [Problem(key, (
        f'{names} names {len(names)} class(es) but config.data.num_classes='
        f'{data_cfg.num_classes} has {want} foreground class(es); give '
        f'{want} names (classes 1..{want}).'))]
  return []


def build_source(data_cfg):
  """Returns the random-access source that `data_cfg.source` names.

  Args:
    data_cfg: the `config.data` section.

  Returns:
    A random-access source with `patient_ids` and `case_ids` attributes.

  Raises:
    ValueError: unknown source name, options the source cannot honour,
      class names that contradict the data set, or (file sources) the
      problems found while listing the data folder.
  """
  entry = spec(data_cfg)
  class_names(data_cfg)  # Refuses names that contradict the data set.
  return entry.build(data_cfg)


def find_problems(data_cfg) -> list[Problem]:
  """Returns every problem of the data set that config.data names.

  Args:
    data_cfg: config.data (source, root, and the source's keys).

  Returns:
    The source's check, then class-name problems; [] when usable.
  """
  if data_cfg.source not in REGISTRY:
    return [Problem('config.data.source', (
        f'unknown source {data_cfg.source!r}; known: '
        f'{", ".join(sorted(REGISTRY))}.'))]
  return (REGISTRY[data_cfg.source].check(data_cfg) +
          class_names_problems(data_cfg))
