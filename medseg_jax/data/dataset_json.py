"""What an MSD / nnU-Net v2 `dataset.json` says: channels, modalities, labels.

    info = read_dataset_json('/data/Task04_Hippocampus')
    info.channel_names      # ('MRI',)
    info.class_names        # ('background', 'Anterior', 'Posterior')
    info.normalization      # ('zscore',): one scheme per channel
    info.num_classes        # 3 (config.data.num_classes: 1 for 2 labels)

Normalisation per channel follows nnU-Net: a channel named CT gets the `ct`
scheme (one fixed HU window for every case, as CT is calibrated; the plan
sets the window from the data set's foreground percentiles); every other
modality (MR sequences, PET, ...) gets a per-case z-score.

nnU-Net v2 region-based labels (`{"whole tumour": [1, 2, 3]}` with
`regions_class_order`) train overlapping sigmoid outputs, which medseg_jax
does not; they are refused with one line. Reads one JSON file; imports no JAX.
"""

import dataclasses
import json
import os

CT_NAMES = ('ct',)  # Channel names (lower case) that mean calibrated HU.


class RegionLabelsError(ValueError):
  """dataset.json has nnU-Net v2 region-based labels (not supported)."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """A data set's own description (dataset.json).

  Attributes:
    path: the dataset.json file.
    layout: 'msd' (`modality`) or 'nnunet' (`channel_names`).
    channel_names: one name per input channel, in channel order.
    class_names: classes 0..K-1, background first.
  """
  path: str
  layout: str
  channel_names: tuple[str, ...]
  class_names: tuple[str, ...]

  @property
  def num_channels(self) -> int:
    """The channels of one case (before slice context)."""
    return len(self.channel_names)

  @property
  def num_classes(self) -> int:
    """config.data.num_classes for these labels (1 = binary, sigmoid)."""
    k = len(self.class_names)
    return 1 if k == 2 else k

  @property
  def normalization(self) -> tuple[str, ...]:
    """The intensity scheme of each channel: 'ct' or 'zscore'."""
    return tuple(channel_normalization(n) for n in self.channel_names)


def channel_normalization(name: str) -> str:
  """Returns 'ct' for a CT channel name, else 'zscore' (nnU-Net's rule).

  Args:
    name: a channel name of dataset.json, e.g. 'CT', 'T2', 'FLAIR'.
  """
  return 'ct' if str(name).strip().lower() in CT_NAMES else 'zscore'


def _ordered_names(mapping, path: str, key: str) -> tuple[str, ...]:
  """Returns names ordered by index from {"0": name} or {name: index}.

  Raises:
    ValueError: region-based labels (lists), or indices not 0..n-1.
  """
  if not isinstance(mapping, dict) or not mapping:
    raise ValueError(f'{path}: "{key}" is missing or not a non-empty map.')
  if all(str(k).isdigit() for k in mapping):
    pairs = {int(k): str(v) for k, v in mapping.items()}
  else:
    regions = [k for k, v in mapping.items() if isinstance(v, (list, tuple))]
    if regions:
      raise RegionLabelsError(
          f'{path}: "{key}" has region-based labels ({regions[0]!r}: '
          f'{mapping[regions[0]]}), which medseg_jax does not train; give '
          'one integer label per class (e.g. {"background": 0, "edema": 1}).')
    if any(not isinstance(v, int) or isinstance(v, bool)
           for v in mapping.values()):
      raise ValueError(f'{path}: "{key}" must map names to integer labels, '
                       f'got {mapping}.')
    pairs = {int(v): str(k) for k, v in mapping.items()}
  if sorted(pairs) != list(range(len(pairs))):
    raise ValueError(f'{path}: "{key}" indices {sorted(pairs)} are not 0, 1, '
                     '..., n-1.')
  return tuple(pairs[i] for i in range(len(pairs)))


def read_dataset_json(root: str) -> DatasetInfo:
  """Reads `root/dataset.json` (MSD or nnU-Net v2 layout).

  Args:
    root: the data folder (config.data.root).

  Returns:
    A DatasetInfo.

  Raises:
    FileNotFoundError: no dataset.json under root.
    ValueError: invalid JSON, neither layout, region-based labels, or
      indices that are not 0..n-1 (one line naming the file and key).
  """
  path = os.path.join(os.path.abspath(root), 'dataset.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist: the MSD and nnU-Net '
                            'layouts need one (config.data.root).')
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'{path}: not valid JSON ({e}).') from e
  if not isinstance(meta, dict):
    raise ValueError(f'{path}: not a JSON object.')
  if 'regions_class_order' in meta:
    raise RegionLabelsError(f'{path}: "regions_class_order" marks region-based '
                     'labels, which medseg_jax does not train; give one '
                     'integer label per class.')
  if 'channel_names' in meta:
    layout, key = 'nnunet', 'channel_names'
  elif 'modality' in meta:
    layout, key = 'msd', 'modality'
  else:
    raise ValueError(f'{path}: has neither "modality" (MSD) nor '
                     '"channel_names" (nnU-Net v2).')
  channels = _ordered_names(meta[key], path, key)
  labels = _ordered_names(meta.get('labels'), path, 'labels')
  if len(labels) < 2:
    raise ValueError(f'{path}: "labels" lists {len(labels)} class; a '
                     'segmentation needs background and >= 1 foreground.')
  return DatasetInfo(path, layout, channels, labels)


def ct_channels(info: DatasetInfo) -> tuple[int, ...]:
  """Returns the indices of the channels that take the `ct` scheme."""
  return tuple(i for i, n in enumerate(info.normalization) if n == 'ct')


def median_slice_shape(root: str, target_spacing=()) -> tuple[int, int]:
  """Returns the median in-plane (H, W) of a NIfTI set's cases, from headers.

  Args:
    root: the data folder (MSD or nnU-Net layout).
    target_spacing: config.data.preprocess.target_spacing (() = native).

  Returns:
    (H, W) after resampling, the per-axis median over cases; () when the
    folder lists no case.
  """
  # Imported here: reading headers needs nibabel, the JSON part does not.
  from medseg_jax.data import nifti_layout  # pylint: disable=import-outside-toplevel
  from medseg_jax.data import preprocess  # pylint: disable=import-outside-toplevel
  from medseg_jax.data import volume_io  # pylint: disable=import-outside-toplevel
  shapes = []
  for case in nifti_layout.scan_dataset(os.path.abspath(root)).cases:
    try:
      shape, spacing, _, _ = volume_io.read_nifti_header(case.images[0])
    except volume_io.FileError:
      continue  # The data check names the unreadable file.
    shapes.append(preprocess.resampled_shape(shape[:3], spacing,
                                             target_spacing)[1:])
  if not shapes:
    return ()
  hs = sorted(s[0] for s in shapes)
  ws = sorted(s[1] for s in shapes)
  return hs[(len(hs) - 1) // 2], ws[(len(ws) - 1) // 2]
