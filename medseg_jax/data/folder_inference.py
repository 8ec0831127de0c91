"""What a photograph data set (`folder`, `isic2018`) states about itself.

A NIfTI data set states its channels and labels in dataset.json; image/mask
folders state them in their files. `fill_config` applies the rule of
`config_lib.fill_from_data` to them: a value the config left at
configs/default.py's default is filled from the files, a value that
contradicts them is refused with one line naming both (before anything is
written).

* `in_channels`: the channels `image_io.read_image` yields (grayscale 1;
  RGB, RGBA, palette, CMYK... 3) for every image: headers only, one file
  per Pillow mode decoded (`image_channels`). Every image, not a sample:
  with in_channels=3 at its default, a sample of gray images before a
  colour one would fill 1, and the default 3 could not be asked for again.
  A mix of grayscale and colour images gives 3 (gray is repeated to 3
  channels by the source) and one warning line.
* `num_classes` / `label_values`: the distinct raw values of the first
  `LABEL_SAMPLE` masks, sorted, when `label_values` was left at (); with
  num_classes given too, only its raw values are filled (K values, not
  0..K-1).
  Masks that `image_io.map_labels` already reads as binary (each within
  {0, 255} or {0, 1}) keep num_classes=1. Otherwise the sorted values are the
  classes: two values are binary with `label_values`, K > 2 values give
  num_classes=K (and `label_values` unless they are 0..K-1). Nothing is
  inferred (the data check then names the files) when a mask is JPEG
  (compression invents values near edges), when there are more than
  `MAX_INFERRED_CLASSES` values (antialiased or photographic masks), and a
  value seen in only one mask of several is not taken as a class (a single
  bad mask must stay a data-check problem, not become a class).
* `mean` / `std` left at their defaults with 1-channel images become the
  mean of their three values, (0.449,) / (0.226,) for ImageNet's: a gray
  image repeated to RGB and normalised per channel is, on average,
  normalised by these. `transforms.Normalize` accepts 1 or C values, so
  3 values on a 1-channel image would fail on the first batch; an explicit
  mean/std of another length is refused here instead.

Files that cannot be read are skipped (the data check lists them); a data
set that cannot be listed is left to the data check. Reads only, no JAX.
"""

import dataclasses
import logging
import os

import numpy as np
from PIL import Image

from medseg_jax.data import image_io
from medseg_jax.data import photo_layout
from medseg_jax.data.errors import FileError

_log = logging.getLogger(__name__)

PHOTO_FILE_SOURCES = ('folder', 'isic2018')
LABEL_SAMPLE = 32  # Masks whose values are read (first, sorted).
MAX_INFERRED_CLASSES = 16  # More distinct values: set num_classes yourself.
_BINARY = ({0, 1}, {0, 255})  # What map_labels reads as binary with ().
_DECODE_SIZE = (8, 8)  # JPEGs decoded at 1/8 scale: channels are the same.
# Mixes already warned about: main and train both fill the config; say it once.
_WARNED = set()


@dataclasses.dataclass(frozen=True)
class PhotoInfo:
  """What the images and the sampled masks of a photograph data set say.

  Attributes:
    where: the images' folder (or manifest), for messages.
    channels: {image path: channels as read_image yields them}, every
      readable image.
    label_values: None (no inference: see module docstring), () for binary
      masks, or the sorted raw values of the classes.
  """
  where: str
  channels: dict
  label_values: tuple | None


def _pairs_and_where(data_cfg) -> tuple[list, str]:
  """Returns (the source's pairs sorted by image path, the images' place).

  Raises:
    ValueError: the layout cannot be listed (the data check says why).
  """
  root = os.path.abspath(data_cfg.root)
  if data_cfg.source == 'isic2018':
    pairs, _ = photo_layout.list_isic_pairs(root)
    where = photo_layout.isic_folders(root, 'Training')[0]
  elif data_cfg.folder.manifest:
    pairs, _ = photo_layout.list_manifest_pairs(root, data_cfg.folder.manifest)
    where = photo_layout.resolve(root, data_cfg.folder.manifest)
  else:
    folder = data_cfg.folder
    pairs, _ = photo_layout.list_folder_pairs(root, folder.images,
                                              folder.masks, folder.mask_suffix)
    where = photo_layout.resolve(root, folder.images)
  return sorted(pairs, key=lambda p: p.image), where


def _header_mode(path: str) -> str | None:
  """Returns a file's Pillow mode from its header (nothing decoded)."""
  try:
    with Image.open(path) as img:
      return img.mode
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
    return None  # The data check lists it with its reason.


def image_channels(paths, tries: int = 3) -> dict:
  """Returns {path: channels read_image yields} for every readable file.

  Only headers are read (cheap, so every image counts and a colour image
  after the first few is not missed); the channels of each Pillow mode come
  from decoding one file of that mode with `image_io.read_image`, so they
  are the reader's own (RGBA -> 3, palette -> 3, 16-bit gray -> 1).

  Args:
    paths: image files.
    tries: files of one mode tried before the mode is given up (corrupt).
  """
  by_mode = {}
  for path in paths:
    mode = _header_mode(path)
    if mode is not None:
      by_mode.setdefault(mode, []).append(path)
  found = {}
  for group in by_mode.values():
    for path in group[:tries]:
      try:
        channels = int(image_io.read_image(path, min_size=_DECODE_SIZE)
                       .shape[-1])
      except FileError:
        continue  # The data check lists it with its reason.
      found.update(dict.fromkeys(group, channels))
      break
  return found


def _distinct(raw: np.ndarray) -> frozenset:
  """Returns the distinct values of an integer mask (bincount when cheap)."""
  if raw.dtype in (np.uint8, np.uint16) and raw.size:
    return frozenset(np.flatnonzero(np.bincount(raw.ravel())).tolist())
  return frozenset(int(v) for v in np.unique(raw))


def mask_value_sets(paths) -> list[frozenset]:
  """Returns each readable mask's distinct raw values, in `paths` order."""
  found = []
  for path in paths:
    try:
      found.append(_distinct(image_io.read_mask(path)))
    except FileError:
      continue  # The data check lists it with its reason.
  return found


def infer_label_values(value_sets) -> tuple | None:
  """Returns the classes that masks' raw values state (module docstring).

  Args:
    value_sets: each sampled mask's distinct raw values.

  Returns:
    None when unsure (no masks, too many values), () when every mask is
    binary as map_labels reads it, else the sorted raw class values.
  """
  if not value_sets:
    return None
  if all(any(s <= b for b in _BINARY) for s in value_sets):
    return ()
  # A value in one mask of several is more likely a bad file than a class.
  least = min(2, len(value_sets))
  values = sorted(v for v in set().union(*value_sets)
                  if sum(v in s for s in value_sets) >= least)
  if len(values) > MAX_INFERRED_CLASSES:
    return None
  if len(values) < 2 or any(set(values) <= b for b in _BINARY):
    return ()  # The rest were strays: binary, and the check names them.
  return tuple(values)


def read_photo_info(data_cfg) -> PhotoInfo | None:
  """Returns what the first images and masks of `data_cfg`'s data set say.

  Args:
    data_cfg: config.data of a `folder` or `isic2018` source.

  Returns:
    A PhotoInfo, or None when the data set cannot be listed or has no pairs
    (the data check reports that).
  """
  try:
    pairs, where = _pairs_and_where(data_cfg)
  except (OSError, ValueError):
    return None
  if not pairs:
    return None
  channels = image_channels([p.image for p in pairs])
  masks = [p.mask for p in pairs[:LABEL_SAMPLE]]
  lossy = any(os.path.splitext(m)[1].lower() in ('.jpg', '.jpeg')
              for m in masks)
  labels = None if lossy else infer_label_values(mask_value_sets(masks))
  return PhotoInfo(where, channels, labels)


def _channel_words(counts) -> str:
  """'1 channel', '3 channels' or '1 and 3 channels'."""
  values = sorted(set(counts))
  return (' and '.join(map(str, values)) +
          (' channel' if values == [1] else ' channels'))


def _fill_channels(data, info: PhotoInfo, given) -> None:
  """in_channels from the images (module docstring), or refused."""
  counts = list(info.channels.values())
  if not counts:
    return
  # Grayscale repeats to 3 channels (image_io.match_channels): a mix needs 3.
  want = max(counts)
  if len(set(counts)) > 1 and info.where not in _WARNED:
    _WARNED.add(info.where)
    gray = [os.path.basename(p) for p, c in info.channels.items() if c == 1]
    _log.warning('The images under %s have %s (%d of %d are grayscale, '
                 'e.g. %s); grayscale images are repeated to 3 '
                 'channels.', info.where, _channel_words(counts), len(gray),
                 len(counts), gray[0])
  if not given('data.in_channels'):
    data.in_channels = want
  elif int(data.in_channels) != want:
    raise ValueError(
        f'config.data.in_channels={data.in_channels} but the images under '
        f'{info.where} have {_channel_words(counts)}; remove the value (it is '
        f'filled from the images) or set it to {want}.')


def _fill_statistics(data, given) -> None:
  """mean/std of 1 or in_channels values (module docstring), or refused."""
  channels = int(data.in_channels)
  for key in ('mean', 'std'):
    values = tuple(float(v) for v in np.atleast_1d(data[key]))
    if len(values) in (1, channels):
      continue
    if given(f'data.{key}'):
      raise ValueError(
          f'config.data.{key}={values} has {len(values)} values but '
          f'config.data.in_channels={channels}; give {channels} values or '
          'one.')
    data[key] = (round(sum(values) / len(values), 6),)


def _fill_labels(data, info: PhotoInfo, given) -> None:
  """num_classes/label_values from the masks, where both were left alone."""
  values = info.label_values
  if values is None or given('data.label_values'):
    return
  if not given('data.num_classes'):
    if len(values) <= 2:  # Binary: a sigmoid, with its two raw values.
      data.num_classes, data.label_values = 1, values
    else:
      data.num_classes = len(values)
      data.label_values = (() if values == tuple(range(len(values)))
                           else values)
  elif (len(values) == max(2, int(data.num_classes)) and
        values != tuple(range(len(values)))):
    data.label_values = values  # num_classes given: only the raw values.


def fill_config(config, given) -> None:
  """Fills `config.data` in place from the images and masks it names.

  Args:
    config: a full config whose data.source is in PHOTO_FILE_SOURCES.
    given: dotted key -> whether the config's value binds
      (`config_lib._given`); asked before any value is changed.

  Raises:
    ValueError: one line, when a binding in_channels (or mean/std length)
      contradicts the images.
  """
  data = config.data
  if data.source not in PHOTO_FILE_SOURCES or not data.root:
    return
  info = read_photo_info(data)
  if info is None:
    return
  binds = {k: given(k) for k in ('data.in_channels', 'data.num_classes',
                                 'data.label_values', 'data.mean',
                                 'data.std')}
  _fill_channels(data, info, binds.__getitem__)
  _fill_statistics(data, binds.__getitem__)
  _fill_labels(data, info, binds.__getitem__)
