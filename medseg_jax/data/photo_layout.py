"""Photograph data sets on disk: image/mask pairs and patients, names only.

Lists the records of the layouts `folder_sources` reads (see its docstring):
ISIC 2018 Task 1 folders (`list_isic_pairs`, `read_isic_metadata`,
`find_isic_metadata`), image/mask folders paired by name
(`list_folder_pairs`) and CSV manifests (`list_manifest_pairs`). Only names
and CSV files are read; nothing is decoded and nothing is written. Every
listing returns `(pairs, problems)`: a file without its partner, a broken
link, a bad manifest or metadata row or a missing folder is a `Problem`, so
a data-set check lists them all at once.
"""

import collections
import csv
import dataclasses
import os

from medseg_jax.data import image_io
from medseg_jax.data.errors import broken_link_reason
from medseg_jax.data.errors import is_broken_link
from medseg_jax.data.errors import Problem

ISIC_SPLITS = (('train', 'Training'), ('val', 'Validation'), ('test', 'Test'))
ISIC_IMAGE_ID_COLUMNS = ('image', 'image_id', 'isic_id')
ISIC_PATIENT_COLUMNS = ('patient_id', 'lesion_id')
_SPLIT_NAMES = {'train': 'train', 'training': 'train', 'val': 'val',
                'valid': 'val', 'validation': 'val', 'test': 'test',
                'testing': 'test', '': ''}


@dataclasses.dataclass(frozen=True)
class Pair:
  """One record's files and ids."""
  image: str
  mask: str
  case_id: str
  patient_id: str
  official_split: str = ''


def _image_names(folder: str, problems=None) -> list[str]:
  """Sorted image file names in `folder` (hidden files skipped).

  A name that is a link to nothing is left out and, when `problems` is
  given, reported there as a broken link (not as a missing partner).
  """
  if not os.path.isdir(folder):
    return []
  names = []
  for n in sorted(os.listdir(folder)):
    path = os.path.join(folder, n)
    if n.startswith('.') or not image_io.is_image_file(n):
      continue
    if os.path.isfile(path):
      names.append(n)
    elif problems is not None and is_broken_link(path):
      problems.append(Problem(path, broken_link_reason(path)))
  return names


def _broken_stems(folder: str, strip: str) -> set[str]:
  """Stems (without `strip`) of the broken image links in `folder`."""
  if not os.path.isdir(folder):
    return set()
  stems = set()
  for n in os.listdir(folder):
    if image_io.is_image_file(n) and is_broken_link(os.path.join(folder, n)):
      stem = os.path.splitext(n)[0]
      stems.add(stem[:len(stem) - len(strip)] if strip and stem.endswith(
          strip) else stem)
  return stems


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
             expected_image, problems, broken=frozenset()) -> list[Pair]:
  """Pairs {stem: path} dicts; unpaired files on either side are problems.

  A stem in `broken` has a broken link as its partner, already reported.
  """
  pairs = []
  for stem in sorted(images):
    if stem in masks:
      pairs.append(Pair(images[stem], masks[stem], stem, stem, split))
    elif stem not in broken:
      problems.append(Problem(images[stem], 'no mask: expected '
                              f'{expected_mask(stem)}.'))
  for stem in sorted(set(masks) - set(images) - set(broken)):
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
        n for n in _image_names(inputs, problems) if n.startswith('ISIC_') and
        not os.path.splitext(n)[0].endswith('_superpixels')], '', problems)
    masks = _index(truth, [n for n in _image_names(truth, problems) if
                           os.path.splitext(n)[0].endswith('_segmentation')],
                   '_segmentation', problems)
    broken = _broken_stems(inputs, '') | _broken_stems(truth, '_segmentation')
    pairs += _pair_up(
        images, masks, split,
        lambda s, t=truth: os.path.join(t, f'{s}_segmentation.png'),
        lambda s, i=inputs: os.path.join(i, f'{s}.jpg'), problems, broken)
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


def resolve(root: str, path: str) -> str:
  """Returns `path` if absolute, else `root`/`path`, normalised."""
  return os.path.normpath(path if os.path.isabs(path) else
                          os.path.join(root, path))


def find_isic_metadata(root: str) -> list[str]:
  """Returns the CSV files in `root` that map ISIC image ids to patients.

  Args:
    root: the ISIC data folder; only its top level is searched.

  Returns:
    Sorted paths of the `.csv` files whose header has an image id column
    (ISIC_IMAGE_ID_COLUMNS) and a patient column (ISIC_PATIENT_COLUMNS):
    the ISIC archive's `metadata.csv`, HAM10000's metadata, and the like.
  """
  found = []
  for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    path = os.path.join(root, name)
    if name.startswith('.') or not name.lower().endswith('.csv') or (
        not os.path.isfile(path)):
      continue
    try:
      with open(path, newline='', encoding='utf-8-sig') as f:
        header = {c.strip().lower() for c in next(csv.reader(f), [])}
    except (OSError, UnicodeDecodeError, csv.Error):
      continue  # Not a metadata file we can use; the split says so.
    if header & set(ISIC_IMAGE_ID_COLUMNS) and header & set(
        ISIC_PATIENT_COLUMNS):
      found.append(path)
  return found


def list_manifest_pairs(root: str, manifest: str
                        ) -> tuple[list[Pair], list[Problem]]:
  """Lists the pairs of a CSV manifest (image, mask, patient_id[, split])."""
  path = resolve(root, manifest)
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
    image = resolve(root, row['image']) if row['image'] else ''
    mask = resolve(root, row['mask']) if row['mask'] else ''
    split = _SPLIT_NAMES.get(row.get('split', '').lower())
    found = []
    if not image:
      found.append(Problem(path, f'{where}: empty image cell.'))
    elif is_broken_link(image):
      found.append(Problem(image, f'image on {where}: '
                           + broken_link_reason(image)))
    elif not os.path.isfile(image):
      found.append(Problem(image, f'image on {where} does not exist.'))
    elif image in seen:
      found.append(Problem(path, f'{where}: {row["image"]} is already on line '
                           f'{seen[image]}.'))
    elif mask and is_broken_link(mask):
      found.append(Problem(mask, f'mask on {where}: '
                           + broken_link_reason(mask)))
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
  images_dir, masks_dir = resolve(root, images), resolve(root, masks)
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

  mask_names = _image_names(masks_dir, problems)
  image_names = _image_names(images_dir, None if same else problems)
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
      lambda s: os.path.join(images_dir, f'{s}.<ext>'), problems,
      _broken_stems(images_dir, '') | _broken_stems(masks_dir, mask_suffix))
  return pairs, problems
