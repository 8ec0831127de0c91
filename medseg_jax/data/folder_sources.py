"""2D photographs with masks as Grain sources: ISIC 2018 folders, image folders.

Layouts under `config.data.root` (which is only ever read):

* `isic2018` (`IsicSource`): the ISIC 2018 Task 1 archives as unzipped,
  `ISIC2018_Task1-2_Training_Input/ISIC_<id>.jpg` with
  `ISIC2018_Task1_Training_GroundTruth/ISIC_<id>_segmentation.png`, plus the
  `Validation` and `Test` folder pairs (same names with `Validation`/`Test`
  for `Training`) when both folders of a pair are present (an input folder
  without its ground truth is ignored). `official_splits` says which official
  folder each record came from ('train', 'val', 'test'). Patient id = image
  id, unless a metadata CSV maps image ids to patients: a CSV with an image
  id column (`image`, `image_id` or `isic_id`) and `patient_id` and/or
  `lesion_id` (the ISIC archive's and HAM10000's metadata files), named by
  `config.data.isic.metadata_csv` (relative to root, or absolute) or else
  found in the root (`photo_layout.find_isic_metadata`; the first by name is
  used, and a log line says which; 'none' uses none). A row's patient is its
  first non-empty `patient_id`, else `lesion_id`, else the image id itself;
  every image must have a row. Without a metadata file the split is per
  image, and a warning says so: ISIC has several images of one lesion or
  patient.
* `folder` (`FolderSource`): `root/<folder.images>/<stem>.<ext>` with
  `root/<folder.masks>/<stem><folder.mask_suffix>.<ext>` (any extension of
  `image_io.IMAGE_EXTENSIONS`; the two folders may be the same when
  `mask_suffix` is set). Patient id = case id = image stem: without a
  manifest every image is its own patient, so splits are per image. To
  split by patient give `folder.manifest`, a CSV (relative to root, or
  absolute) with columns `image`, `mask`, `patient_id` and optionally
  `split` (train/val/test, in `official_splits`); paths in it are relative to
  root, or absolute.

Records follow the shared data contract: `image` uint8 `[H, W, C]` resized
(bilinear, antialiased) to `config.data.image_size`, `mask` uint8 `[H, W]`
class indices (nearest; raw values mapped by `image_io.map_labels`),
`spacing` (1.0, 1.0), `patient_id`, `case_id`. Grayscale images feed a
3-channel model (`in_channels=3`) with the gray repeated; other channel
mismatches are errors. Records are sorted (ISIC: official split, then id;
folders: case id).

Constructors only list files (`photo_layout`): a file without its partner,
a broken link, a bad manifest or metadata row or a missing folder goes to
`listing_problems` (and out of the records) instead of raising, so
`find_problems_2d` can list them with everything else.
`build_isic_source`/`build_folder_source` raise on them unless strict=False.
`find_problems(config.data)` is the data-set check of both sources.

Decoded records are cached as `config.data.cache` says (`cache.CaseCache`).
"""

import concurrent.futures
import dataclasses
import logging
import os

import numpy as np

from medseg_jax.data import cache as cache_lib
from medseg_jax.data import image_io
from medseg_jax.data import photo_layout
from medseg_jax.data import splits
from medseg_jax.data.errors import DataCheckError
from medseg_jax.data.errors import FileError
from medseg_jax.data.errors import Problem
from medseg_jax.data.photo_layout import isic_folders
from medseg_jax.data.photo_layout import Pair

_log = logging.getLogger(__name__)
# JPEGs are decoded at 1/8 scale when checking: libjpeg still parses every
# byte of the file (truncation and corruption are found), ~5x faster.
_CHECK_DECODE_SIZE = (8, 8)


class PhotoSource:
  """Grain random-access source of (image, mask) pairs; see module docstring."""

  def __init__(self, root: str, pairs, listing_problems=(), *,
               image_size=256, num_classes: int = 1, in_channels: int = 3,
               label_values=(), cache: str = 'memory', cache_dir: str = '',
               cache_memory_mb: float = 4096):
    self.root = os.path.abspath(root)
    self.pairs = tuple(pairs)
    self.listing_problems = list(listing_problems)
    self.image_size = image_io.as_hw(image_size)
    self.num_classes = int(num_classes)
    self.in_channels = int(in_channels)
    self.label_values = tuple(int(v) for v in label_values)
    self._cache = cache_lib.CaseCache(cache, cache_dir, self.root,
                                      cache_memory_mb, kind='photos')

  def __len__(self) -> int:
    return len(self.pairs)

  def __repr__(self) -> str:
    return (f'{type(self).__name__}({self.root!r}, records={len(self)}, '
            f'image_size={self.image_size})')

  @property
  def patient_ids(self) -> list[str]:
    """The patient of every record (no file is read)."""
    return [p.patient_id for p in self.pairs]

  @property
  def case_ids(self) -> list[str]:
    """The case id of every record: the image name without extension."""
    return [p.case_id for p in self.pairs]

  @property
  def official_splits(self) -> list[str]:
    """Each record's official split ('train'/'val'/'test'), '' if none."""
    return [p.official_split for p in self.pairs]

  def decode(self, pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    """Returns (image uint8 [H, W, C], mask uint8 [H, W]) read from files.

    Raises:
      FileError: unreadable file, size or channel mismatch, bad mask values.
    """
    image = image_io.read_image(pair.image, min_size=self.image_size)
    raw = image_io.read_mask(pair.mask)
    full_hw = image_io.read_size(pair.image)
    if raw.shape != full_hw:
      raise FileError(pair.mask, (
          f'mask is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image is '
          f'{full_hw[1]}x{full_hw[0]}.'))
    image = image_io.match_channels(image, self.in_channels, pair.image)
    mask = image_io.map_labels(raw, self.label_values, self.num_classes,
                               pair.mask)
    return (image_io.resize_image(image, self.image_size),
            np.ascontiguousarray(image_io.resize_mask(mask, self.image_size)))

  def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns the (image, mask) of record `index`, from the cache if there."""
    pair = self.pairs[index]
    options = [self.image_size, self.num_classes, self.in_channels,
               self.label_values]
    return self._cache.get_or_compute(
        index, pair.case_id,
        lambda: cache_lib.files_key((pair.image, pair.mask), options),
        lambda: self.decode(pair))

  def __getitem__(self, index: int) -> dict:
    n = len(self)
    index = int(index)
    if not -n <= index < n:
      raise IndexError(f'{type(self).__name__} index {index} out of range '
                       f'[0, {n}).')
    index %= n
    image, mask = self.load(index)
    pair = self.pairs[index]
    return {'image': image, 'mask': mask, 'spacing': (1.0, 1.0),
            'patient_id': pair.patient_id, 'case_id': pair.case_id}


def _isic_metadata(root: str, metadata_csv: str) -> str:
  """Returns the metadata CSV to use: the one named, else one in the root.

  Says in one log line which file was found, or warns that the split will
  be per image when there is none (or metadata_csv is 'none').
  """
  if metadata_csv and metadata_csv.lower() != 'none':
    return metadata_csv
  found = [] if metadata_csv else photo_layout.find_isic_metadata(root)
  if found:
    others = (f' ({len(found) - 1} other candidate(s): '
              f'{", ".join(os.path.basename(f) for f in found[1:])})'
              if len(found) > 1 else '')
    _log.info('ISIC: patients from %s found in %s%s; set '
              'config.data.isic.metadata_csv to use another file.',
              os.path.basename(found[0]), root, others)
    return found[0]
  _log.warning(
      'ISIC: no metadata CSV with patient or lesion ids in %s '
      '(config.data.isic.metadata_csv=%r), so the split is PER IMAGE: images '
      'of one lesion or patient can land in both train and test. Put the '
      "ISIC archive's metadata.csv (isic_id, patient_id/lesion_id) in the "
      'root or set config.data.isic.metadata_csv.', root, metadata_csv)
  return ''


class IsicSource(PhotoSource):
  """The ISIC 2018 Task 1 folders (module docstring); `official_splits` set."""

  def __init__(self, root: str, metadata_csv: str = '', **options):
    """Args: root, metadata_csv (see module docstring), options of PhotoSource."""
    root = os.path.abspath(root)  # Workers may run elsewhere: absolute paths.
    if os.path.isdir(root):
      pairs, problems = photo_layout.list_isic_pairs(root)
    else:
      pairs, problems = [], [Problem(root, 'data folder does not exist '
                                           '(config.data.root).')]
    self.metadata_csv = _isic_metadata(root, metadata_csv) if pairs else ''
    if self.metadata_csv and pairs:
      mapping, more = photo_layout.read_isic_metadata(
          photo_layout.resolve(root, self.metadata_csv),
          [p.case_id for p in pairs])
      problems += more
      pairs = [dataclasses.replace(p, patient_id=mapping.get(p.case_id)
                                   or p.case_id) for p in pairs]
    super().__init__(root, pairs, problems, **options)
    self.images_dir = isic_folders(self.root, 'Training')[0]


class FolderSource(PhotoSource):
  """Images and masks paired by name or by a CSV manifest (module docstring)."""

  def __init__(self, root: str, images: str = 'images', masks: str = 'masks',
               mask_suffix: str = '', manifest: str = '', **options):
    """Args: root, the config.data.folder keys, options of PhotoSource."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
      pairs, problems = [], [Problem(root, 'data folder does not exist '
                                           '(config.data.root).')]
    elif manifest:
      pairs, problems = photo_layout.list_manifest_pairs(root, manifest)
    else:
      pairs, problems = photo_layout.list_folder_pairs(root, images, masks,
                                                       mask_suffix)
    super().__init__(root, pairs, problems, **options)
    self.images_dir = photo_layout.resolve(self.root, manifest or images)


def _options(data_cfg) -> dict:
  """PhotoSource keyword arguments from config.data."""
  return dict(image_size=data_cfg.image_size,
              num_classes=int(data_cfg.num_classes),
              in_channels=int(data_cfg.in_channels),
              label_values=tuple(data_cfg.label_values or ()),
              cache=data_cfg.cache, cache_dir=data_cfg.cache_dir or '',
              # Not in configs/default.py: a memory cap few need to change.
              cache_memory_mb=float(data_cfg.get('cache_memory_mb', 4096)))


def _root(data_cfg) -> str:
  if not data_cfg.root:
    raise ValueError(f'config.data.source={data_cfg.source!r} needs '
                     'config.data.root: the folder holding the data set.')
  return data_cfg.root


def _finish(source: PhotoSource, strict: bool) -> PhotoSource:
  if strict and source.listing_problems:
    raise DataCheckError(source.listing_problems, source.root)
  return source


def build_isic_source(data_cfg, strict: bool = True) -> IsicSource:
  """Returns the `isic2018` source of config.data (root, isic, image_size...).

  Raises:
    DataCheckError: (strict) unpaired files, missing folders, metadata rows.
    ValueError: missing root or invalid options.
  """
  return _finish(IsicSource(_root(data_cfg), data_cfg.isic.metadata_csv,
                            **_options(data_cfg)), strict)


def build_folder_source(data_cfg, strict: bool = True) -> FolderSource:
  """Returns the `folder` source of config.data (root, folder, image_size...).

  Raises:
    DataCheckError: (strict) unpaired files, missing folders, manifest rows.
    ValueError: missing root or invalid options.
  """
  folder = data_cfg.folder
  return _finish(FolderSource(
      _root(data_cfg), images=folder.images, masks=folder.masks,
      mask_suffix=folder.mask_suffix, manifest=folder.manifest,
      **_options(data_cfg)), strict)


def build_2d_source(data_cfg, strict: bool = True) -> PhotoSource:
  """Returns the 'isic2018' or 'folder' source that config.data.source names."""
  builders = {'isic2018': build_isic_source, 'folder': build_folder_source}
  if data_cfg.source not in builders:
    raise ValueError(f'config.data.source={data_cfg.source!r} is not a '
                     'photograph source (isic2018, folder).')
  return builders[data_cfg.source](data_cfg, strict=strict)


# ------------------------------------------------------------------ checks


def pair_problems(image_path: str, mask_path: str, *, num_classes: int,
                  label_values=(), in_channels: int = 3) -> list[Problem]:
  """Returns the problems of one image/mask pair (both files are decoded).

  Args:
    image_path, mask_path: the two files.
    num_classes, label_values, in_channels: as in config.data.

  Returns:
    Problems: unreadable image or mask, channel count, mask size differing
    from the image's, mask values outside the label set.
  """
  problems, image_hw = [], None
  try:
    image_hw = image_io.read_size(image_path)
    image = image_io.read_image(image_path, min_size=_CHECK_DECODE_SIZE)
    image_io.match_channels(image, in_channels, image_path)
  except FileError as e:
    problems.append(e.problem())
  try:
    raw = image_io.read_mask(mask_path)
    if image_hw is not None and raw.shape != image_hw:
      problems.append(Problem(mask_path, (
          f'mask is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image '
          f'{os.path.basename(image_path)} is {image_hw[1]}x{image_hw[0]}; '
          'a mask must have its image\'s size.')))
    image_io.map_labels(raw, label_values, num_classes, mask_path)
  except FileError as e:
    problems.append(e.problem())
  return problems


def _label_values_problem(label_values, num_classes) -> list[Problem]:
  """Returns a problem if label_values cannot name K classes (checked once)."""
  try:
    image_io.map_labels(np.zeros((1, 1), np.uint8), label_values,
                        num_classes)
  except FileError:
    pass  # 0 not among the values: a property of the masks, not the config.
  except ValueError as e:
    return [Problem('config.data.label_values', str(e))]
  return []


def find_problems_2d(source, num_threads: int | None = None) -> list[Problem]:
  """Lists every problem of a 2D image/mask source at once (files read only).

  Args:
    source: a `PhotoSource` built with strict=False, so files without a
      partner are in `listing_problems`.
    num_threads: decoding threads (Pillow releases the GIL); default: CPUs.

  Returns:
    The source's listing problems (unpaired files, broken links, bad
    manifest or metadata rows, missing folders), then each pair's problems
    in record order, or an "empty data set" problem.
  """
  problems = list(source.listing_problems)
  if not source.pairs:
    if not problems:
      where = getattr(source, 'images_dir', source.root)
      problems.append(Problem(where, 'empty data set: no image files ('
                              + ', '.join(image_io.IMAGE_EXTENSIONS) +
                              ') with masks found.'))
    return problems
  config_problems = _label_values_problem(source.label_values,
                                          source.num_classes)
  if config_problems:
    return problems + config_problems

  def check(pair):
    return pair_problems(pair.image, pair.mask,
                         num_classes=source.num_classes,
                         label_values=source.label_values,
                         in_channels=source.in_channels)

  workers = num_threads or min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for found in pool.map(check, source.pairs):
      problems += found
  return problems


def find_problems(data_cfg) -> list[Problem]:
  """Returns every problem of an 'isic2018' or 'folder' data set.

  Args:
    data_cfg: config.data.

  Returns:
    `find_problems_2d` of the source, then split problems; [] when usable.
  """
  try:
    source = build_2d_source(data_cfg, strict=False)
  except ValueError as e:
    return [Problem('config.data', str(e))]
  return find_problems_2d(source) + splits.split_problems(source.patient_ids,
                                                          data_cfg)
