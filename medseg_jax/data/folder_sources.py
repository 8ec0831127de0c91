"""2D photographs with masks as Grain sources: ISIC 2018 folders, image folders.

Layouts under `config.data.root` (which is only ever read):

* `isic2018` (`IsicSource`): the ISIC 2018 Task 1 archives as unzipped,
  `ISIC2018_Task1-2_Training_Input/ISIC_<id>.jpg` with
  `ISIC2018_Task1_Training_GroundTruth/ISIC_<id>_segmentation.png`, plus the
  `Validation` and `Test` folder pairs (same names with `Validation`/`Test`
  for `Training`) when both folders of a pair are present (an input folder
  without its ground truth is ignored). `official_splits` says which official
  folder each record came from ('train', 'val', 'test'). Patient id = image
  id, unless `config.data.isic.metadata_csv` (relative to root, or absolute)
  maps image ids to patients: a CSV with an image id column (`image`,
  `image_id` or `isic_id`) and `patient_id` and/or `lesion_id` (the ISIC
  archive's and HAM10000's metadata files). A row's patient is its first
  non-empty `patient_id`, else `lesion_id`, else the image id itself; every
  image must have a row.
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

Constructors only list files: a file without its partner, a bad manifest or
metadata row or a missing folder goes to `listing_problems` (and out of the
records) instead of raising, so `check.find_problems_2d` can list them with
everything else. `build_isic_source`/`build_folder_source` raise on them
unless strict=False.

Cache (`config.data.cache`): 'memory' keeps decoded records in an LRU of at
most `config.data.cache_memory_mb` MB (default 4096) per process (each Grain
worker holds its own); 'disk' also stores them as `.npz` in
`config.data.cache_dir` (default ~/.cache/medseg_jax/cases), keyed by the
files' paths, mtimes and sizes and the decoding options, written atomically,
and reused by later runs and workers; 'none' decodes every time.
"""

import collections
import csv
import dataclasses
import hashlib
import json
import os
import re
import threading
import warnings
import zipfile

import numpy as np

from medseg_jax.data import image_io
from medseg_jax.data.check import DataCheckError
from medseg_jax.data.check import Problem

_CACHE_VERSION = 1
ISIC_SPLITS = (('train', 'Training'), ('val', 'Validation'), ('test', 'Test'))
ISIC_IMAGE_ID_COLUMNS = ('image', 'image_id', 'isic_id')
ISIC_PATIENT_COLUMNS = ('patient_id', 'lesion_id')
_SPLIT_NAMES = {'train': 'train', 'training': 'train', 'val': 'val',
                'valid': 'val', 'validation': 'val', 'test': 'test',
                'testing': 'test', '': ''}


def default_cache_dir() -> str:
  """Returns ~/.cache/medseg_jax/cases (the default `config.data.cache_dir`)."""
  return os.path.join(os.path.expanduser('~'), '.cache', 'medseg_jax', 'cases')


@dataclasses.dataclass(frozen=True)
class Pair:
  """One record's files and ids."""
  image: str
  mask: str
  case_id: str
  patient_id: str
  official_split: str = ''


def _image_names(folder: str) -> list[str]:
  """Sorted image file names in `folder` (hidden files skipped)."""
  if not os.path.isdir(folder):
    return []
  return sorted(n for n in os.listdir(folder)
                if not n.startswith('.') and image_io.is_image_file(n)
                and os.path.isfile(os.path.join(folder, n)))


def _index(folder: str, names, strip: str, problems) -> dict[str, str]:
  """Returns {stem without `strip`: path}; two files of one stem: a problem."""
  found = collections.defaultdict(list)
  for name in names:
    stem = os.path.splitext(name)[0]
    found[stem[:len(stem) - len(strip)] if strip else stem].append(name)
  for stem, group in found.items():
    if len(group) > 1:
      problems.append(Problem(os.path.join(folder, group[0]), (
          f'several files for {stem!r}: {", ".join(group)}; keep one.')))
  # The first file of a repeated stem stays, so its partner is not reported
  # as unpaired too.
  return {stem: os.path.join(folder, group[0]) for stem, group in found.items()}


def _pair_up(images: dict, masks: dict, split: str, expected_mask,
             expected_image, problems) -> list[Pair]:
  """Pairs {stem: path} dicts; unpaired files on either side are problems."""
  pairs = []
  for stem in sorted(images):
    if stem in masks:
      pairs.append(Pair(images[stem], masks[stem], stem, stem, split))
    else:
      problems.append(Problem(images[stem], 'no mask: expected '
                              f'{expected_mask(stem)}.'))
  for stem in sorted(set(masks) - set(images)):
    problems.append(Problem(masks[stem], 'mask without image: expected '
                            f'{expected_image(stem)}.'))
  return pairs


def isic_folders(root: str, name: str) -> tuple[str, str]:
  """Returns (input folder, ground-truth folder) of an ISIC 2018 split name."""
  return (os.path.join(root, f'ISIC2018_Task1-2_{name}_Input'),
          os.path.join(root, f'ISIC2018_Task1_{name}_GroundTruth'))


def _nested_hint(root: str, name: str) -> str:
  """Points at `name` one level below root, where unzipping may have put it."""
  for sub in sorted(os.listdir(root)):
    if os.path.isdir(os.path.join(root, sub, name)):
      return (f'; it is in {sub}/: set config.data.root to '
              f'{os.path.join(root, sub)}')
  return ''


def list_isic_pairs(root: str) -> tuple[list[Pair], list[Problem]]:
  """Lists the ISIC 2018 Task 1 pairs under `root` (names only, nothing read)."""
  pairs, problems = [], []
  for split, name in ISIC_SPLITS:
    inputs, truth = isic_folders(root, name)
    if split != 'train' and not (os.path.isdir(inputs) and
                                 os.path.isdir(truth)):
      continue
    for folder in (inputs, truth):
      if not os.path.isdir(folder):
        problems.append(Problem(folder, (
            'folder not found: the ISIC 2018 layout needs '
            f'{os.path.basename(inputs)}/ and {os.path.basename(truth)}/ in '
            'config.data.root (unzip the challenge archives there)'
            f'{_nested_hint(root, os.path.basename(folder))}, or use '
            "config.data.source='folder' for other layouts.")))
    images = _index(inputs, [  # ISIC 2017 kept superpixel maps there too.
        n for n in _image_names(inputs) if n.startswith('ISIC_') and
        not os.path.splitext(n)[0].endswith('_superpixels')], '', problems)
    masks = _index(truth, [n for n in _image_names(truth) if os.path.splitext(
        n)[0].endswith('_segmentation')], '_segmentation', problems)
    pairs += _pair_up(
        images, masks, split,
        lambda s, t=truth: os.path.join(t, f'{s}_segmentation.png'),
        lambda s, i=inputs: os.path.join(i, f'{s}.jpg'), problems)
  return pairs, problems


def _read_csv(path: str) -> tuple[list[dict], list[Problem]]:
  """Returns (rows with lower-case stripped keys, problems)."""
  try:
    with open(path, newline='', encoding='utf-8-sig') as f:
      rows = list(csv.DictReader(f))
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    return [], [Problem(path, f'cannot read the CSV ({e}).')]
  # Cells beyond the header come under the key None: ignored.
  return [{k.strip().lower(): (v or '').strip() for k, v in r.items()
           if isinstance(k, str)} for r in rows], []


def read_isic_metadata(path: str, image_ids) -> tuple[dict, list[Problem]]:
  """Returns ({image id: patient id}, problems) from an ISIC metadata CSV.

  Args:
    path: CSV with an image id column (ISIC_IMAGE_ID_COLUMNS) and a patient
      column (ISIC_PATIENT_COLUMNS); image ids may carry an extension.
    image_ids: the data set's image ids; each needs a row.
  """
  rows, problems = _read_csv(path)
  if problems:
    return {}, problems
  header = set(rows[0]) if rows else set()
  id_col = next((c for c in ISIC_IMAGE_ID_COLUMNS if c in header), None)
  patient_cols = [c for c in ISIC_PATIENT_COLUMNS if c in header]
  if id_col is None or not patient_cols:
    return {}, [Problem(path, (
        'metadata CSV (config.data.isic.metadata_csv) needs an image id '
        f'column ({" or ".join(ISIC_IMAGE_ID_COLUMNS)}) and a patient column '
        f'({" or ".join(ISIC_PATIENT_COLUMNS)}); found columns '
        f'{sorted(header)}.'))]
  mapping = {}
  for row in rows:
    image_id = os.path.splitext(os.path.basename(row[id_col]))[0]
    patient = next((row[c] for c in patient_cols if row[c]), image_id)
    if mapping.get(image_id, patient) != patient:
      problems.append(Problem(path, f'image {image_id} has two patients: '
                              f'{mapping[image_id]} and {patient}.'))
    mapping[image_id] = patient
  missing = [i for i in image_ids if i not in mapping]
  if missing:
    problems.append(Problem(path, (
        f'{len(missing)} image(s) have no row, e.g. {", ".join(missing[:5])}; '
        'add them (an empty patient_id makes an image its own patient).')))
  return mapping, problems


def _resolve(root: str, path: str) -> str:
  return os.path.normpath(path if os.path.isabs(path) else
                          os.path.join(root, path))


def list_manifest_pairs(root: str, manifest: str
                        ) -> tuple[list[Pair], list[Problem]]:
  """Lists the pairs of a CSV manifest (image, mask, patient_id[, split])."""
  path = _resolve(root, manifest)
  rows, problems = _read_csv(path)
  if problems:
    return [], problems
  if not rows or not {'image', 'mask', 'patient_id'} <= set(rows[0]):
    found = sorted(rows[0]) if rows else 'no rows'
    return [], [Problem(path, (
        'manifest (config.data.folder.manifest) needs columns image, mask, '
        f'patient_id (and optionally split); found {found}.'))]
  pairs, seen = [], {}
  for line, row in enumerate(rows, start=2):  # Line 1 is the header.
    where = f'line {line} of {os.path.basename(path)}'
    image = _resolve(root, row['image']) if row['image'] else ''
    mask = _resolve(root, row['mask']) if row['mask'] else ''
    split = _SPLIT_NAMES.get(row.get('split', '').lower())
    found = []
    if not image:
      found.append(Problem(path, f'{where}: empty image cell.'))
    elif not os.path.isfile(image):
      found.append(Problem(image, f'image on {where} does not exist.'))
    elif image in seen:
      found.append(Problem(path, f'{where}: {row["image"]} is already on line '
                           f'{seen[image]}.'))
    elif not mask or not os.path.isfile(mask):
      found.append(Problem(image, f'no mask: {mask or "(empty cell)"} on '
                           f'{where} does not exist.'))
    if not row['patient_id']:
      found.append(Problem(path, f'{where}: empty patient_id.'))
    if split is None:
      found.append(Problem(path, f'{where}: split {row["split"]!r} is not '
                           'train, val or test.'))
    seen.setdefault(image, line)
    if found:
      problems += found
    else:
      pairs.append(Pair(image, mask, '', row['patient_id'], split))
  stems = [os.path.splitext(os.path.basename(p.image))[0] for p in pairs]
  if len(set(stems)) < len(stems):  # Names repeat: ids from relative paths.
    stems = [os.path.splitext(os.path.relpath(p.image, root))[0].replace(
        os.sep, '/') for p in pairs]
  pairs = [dataclasses.replace(p, case_id=s) for p, s in zip(pairs, stems)]
  return sorted(pairs, key=lambda p: p.case_id), problems


def list_folder_pairs(root: str, images: str = 'images', masks: str = 'masks',
                      mask_suffix: str = '') -> tuple[list[Pair], list[Problem]]:
  """Lists image/mask pairs by name: masks/<stem><mask_suffix>.<ext>."""
  images_dir, masks_dir = _resolve(root, images), _resolve(root, masks)
  same = os.path.realpath(images_dir) == os.path.realpath(masks_dir)
  if same and not mask_suffix:
    raise ValueError(
        f'config.data.folder.images and .masks are the same folder '
        f'{images_dir}: set config.data.folder.mask_suffix (e.g. "_mask") '
        'to tell the masks apart.')
  problems = [Problem(d, f'folder not found (config.data.folder.{key}).')
              for key, d in (('images', images_dir), ('masks', masks_dir))
              if not os.path.isdir(d)]

  def is_mask(name):
    return os.path.splitext(name)[0].endswith(mask_suffix)

  mask_names = _image_names(masks_dir)
  image_names = _image_names(images_dir)
  if same:
    image_names = [n for n in image_names if not is_mask(n)]
  else:
    for name in mask_names:
      if not is_mask(name):
        problems.append(Problem(os.path.join(masks_dir, name), (
            f'name does not end with mask_suffix {mask_suffix!r} '
            '(config.data.folder.mask_suffix): not the mask of any image.')))
  image_index = _index(images_dir, image_names, '', problems)
  mask_index = _index(masks_dir, [n for n in mask_names if is_mask(n)],
                      mask_suffix, problems)
  pairs = _pair_up(
      image_index, mask_index, '',
      lambda s: os.path.join(masks_dir, f'{s}{mask_suffix}.png (or another '
                             'image extension)'),
      lambda s: os.path.join(images_dir, f'{s}.<ext>'), problems)
  return pairs, problems


class _RecordCache:
  """Decoded records in a per-process memory LRU, optionally also on disk."""

  def __init__(self, mode: str, cache_dir: str, root: str, memory_mb: float):
    if mode not in ('memory', 'disk', 'none'):
      raise ValueError(f"config.data.cache={mode!r} must be 'memory', 'disk' "
                       "or 'none'.")
    self.mode = mode
    self.memory_bytes = int(float(memory_mb) * 2**20) if mode != 'none' else 0
    self.folder = ''
    if mode == 'disk':
      base = os.path.realpath(cache_dir or default_cache_dir())
      real_root = os.path.realpath(root)
      if os.path.commonpath([base, real_root]) == real_root:
        raise ValueError(f'config.data.cache_dir={base} is inside the data '
                         f'folder {real_root}, which is never written to; '
                         'choose another folder.')
      tag = hashlib.sha1(real_root.encode()).hexdigest()[:12]
      self.folder = os.path.join(base, f'photos-{tag}')
    self._memory, self._used = collections.OrderedDict(), 0
    self._lock = threading.Lock()  # Grain reads with several threads.

  def __getstate__(self):
    state = dict(self.__dict__)  # Workers start with an empty memory cache.
    del state['_lock']
    state['_memory'], state['_used'] = collections.OrderedDict(), 0
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def get_memory(self, index: int):
    with self._lock:
      if index in self._memory:
        self._memory.move_to_end(index)
        return self._memory[index]
    return None

  def put_memory(self, index: int, value) -> None:
    size = sum(a.nbytes for a in value)
    with self._lock:
      if index not in self._memory and size <= self.memory_bytes:
        self._memory[index] = value
        self._used += size
      while self._used > self.memory_bytes:
        self._used -= sum(a.nbytes for a in self._memory.popitem(last=False)[1])

  def get_disk(self, name: str):
    try:
      with np.load(name) as npz:
        return npz['image'], npz['mask']
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
      return None  # Absent or damaged: decoded again and rewritten.

  def put_disk(self, name: str, value) -> None:
    tmp = f'{name}.{os.getpid()}.{threading.get_ident()}.tmp'
    try:
      os.makedirs(self.folder, exist_ok=True)
      with open(tmp, 'wb') as f:
        np.savez(f, image=value[0], mask=value[1])
      os.replace(tmp, name)  # Readers see a whole file or none.
    except OSError as e:  # A full or read-only disk slows, never stops, us.
      warnings.warn(f'Could not cache {name}: {e}')
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)


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
    self._cache = _RecordCache(cache, cache_dir, self.root, cache_memory_mb)

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
      raise image_io.FileError(pair.mask, (
          f'mask is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image is '
          f'{full_hw[1]}x{full_hw[0]}.'))
    image = image_io.match_channels(image, self.in_channels, pair.image)
    mask = image_io.map_labels(raw, self.label_values, self.num_classes,
                               pair.mask)
    return (image_io.resize_image(image, self.image_size),
            np.ascontiguousarray(image_io.resize_mask(mask, self.image_size)))

  def _disk_name(self, pair: Pair) -> str:
    """Cache file of a pair: hash of its files' stats and decoding options."""
    stats = [(p, os.stat(p).st_mtime_ns, os.stat(p).st_size)
             for p in (pair.image, pair.mask)]
    blob = json.dumps([_CACHE_VERSION, stats, self.image_size,
                       self.num_classes, self.in_channels, self.label_values])
    key = hashlib.sha1(blob.encode()).hexdigest()[:20]
    name = re.sub(r'[^A-Za-z0-9_.-]', '_', pair.case_id)[-80:]
    return os.path.join(self._cache.folder, f'{name}-{key}.npz')

  def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns the (image, mask) of record `index`, from a cache if there."""
    value = self._cache.get_memory(index)
    if value is not None:
      return value
    pair = self.pairs[index]
    disk_name = self._disk_name(pair) if self._cache.mode == 'disk' else ''
    value = self._cache.get_disk(disk_name) if disk_name else None
    if value is None:
      value = self.decode(pair)
      if disk_name:
        self._cache.put_disk(disk_name, value)
    for array in value:
      array.setflags(write=False)  # Shared by later reads: no edits in place.
    self._cache.put_memory(index, value)
    return value

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


class IsicSource(PhotoSource):
  """The ISIC 2018 Task 1 folders (module docstring); `official_splits` set."""

  def __init__(self, root: str, metadata_csv: str = '', **options):
    """Args: root, metadata_csv (see module docstring), options of PhotoSource."""
    root = os.path.abspath(root)  # Workers may run elsewhere: absolute paths.
    if os.path.isdir(root):
      pairs, problems = list_isic_pairs(root)
    else:
      pairs, problems = [], [Problem(root, 'data folder does not exist '
                                           '(config.data.root).')]
    if metadata_csv and pairs:
      mapping, more = read_isic_metadata(_resolve(root, metadata_csv),
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
      pairs, problems = list_manifest_pairs(root, manifest)
    else:
      pairs, problems = list_folder_pairs(root, images, masks, mask_suffix)
    super().__init__(root, pairs, problems, **options)
    self.images_dir = _resolve(self.root, manifest or images)


def _options(data_cfg) -> dict:
  """PhotoSource keyword arguments from config.data."""
  return dict(image_size=data_cfg.get('image_size', 256),
              num_classes=int(data_cfg.get('num_classes', 1)),
              in_channels=int(data_cfg.get('in_channels', 3)),
              label_values=tuple(data_cfg.get('label_values', ()) or ()),
              cache=data_cfg.get('cache', 'memory'),
              cache_dir=data_cfg.get('cache_dir', '') or '',
              cache_memory_mb=float(data_cfg.get('cache_memory_mb', 4096)))


def _root(data_cfg) -> str:
  root = data_cfg.get('root', '')
  if not root:
    raise ValueError(f'config.data.source={data_cfg.get("source")!r} needs '
                     'config.data.root: the folder holding the data set.')
  return root


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
  isic = dict(data_cfg.get('isic', None) or {})
  return _finish(IsicSource(_root(data_cfg), isic.get('metadata_csv', ''),
                            **_options(data_cfg)), strict)


def build_folder_source(data_cfg, strict: bool = True) -> FolderSource:
  """Returns the `folder` source of config.data (root, folder, image_size...).

  Raises:
    DataCheckError: (strict) unpaired files, missing folders, manifest rows.
    ValueError: missing root or invalid options.
  """
  folder = dict(data_cfg.get('folder', None) or {})
  return _finish(FolderSource(
      _root(data_cfg), images=folder.get('images', 'images'),
      masks=folder.get('masks', 'masks'),
      mask_suffix=folder.get('mask_suffix', ''),
      manifest=folder.get('manifest', ''), **_options(data_cfg)), strict)


def build_2d_source(data_cfg, strict: bool = True) -> PhotoSource:
  """Returns the 'isic2018' or 'folder' source that config.data.source names."""
  builders = {'isic2018': build_isic_source, 'folder': build_folder_source}
  if data_cfg.get('source') not in builders:
    raise ValueError(f'config.data.source={data_cfg.get("source")!r} is not a '
                     'photograph source (isic2018, folder).')
  return builders[data_cfg.get('source')](data_cfg, strict=strict)
