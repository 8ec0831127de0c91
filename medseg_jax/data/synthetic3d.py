"""Procedural BraTS-like multi-sequence MRI volumes: 3D data with no files.

`SyntheticTumours` is a Grain random-access source with one case per patient.
Record `i` is a pure function of `(seed, i)`. Each volume shows a brain (a
noisy-edged ellipsoid with grey/white-matter-like texture, a smooth bias field
per sequence and sensor noise) holding one tumour with nested sub-regions:
a necrotic core inside an enhancing rim inside oedema. Every sub-region is a
randomly rotated, noise-bordered ellipsoid, cut so that nesting always holds
(each is at least one voxel inside the next, 26-connectivity).

Classes (num_classes=4): 0 background (air and healthy brain), 1 oedema,
2 enhancing tumour, 3 necrosis. num_classes=3 merges 2 and 3 into one tumour
core (0, 1 oedema, 2 core); num_classes 1 or 2 give the whole tumour as 1.

Channels are the four BraTS sequences (T1, T1ce, T2, FLAIR, in that order;
`in_channels < 4` keeps the first ones). Their contrasts (`CONTRAST`) are
chosen so that no single one tells all classes apart: oedema and enhancing
tumour look alike in T1, T2 and FLAIR and differ only in T1ce, where oedema
looks like healthy brain; necrosis looks like healthy brain in FLAIR.

Geometry is drawn in millimetres on an anisotropic grid: the spacing is
`spacing` (D, H, W) jittered per patient (slices 0.8-1.25x, in-plane
0.9-1.1x), so round tumours are flattened along D in voxels. With
`size_jitter > 0` each patient's volume size varies too (to exercise padding
and patching). Images are z-scored per channel over the whole volume.

Generation is vectorised NumPy/SciPy on one thread: about 20 ms for 32x64x64
and 150 ms for 80x128x128 (run `python -m medseg_jax.data.synthetic3d`).
"""

from collections.abc import Sequence
import math

import numpy as np
from scipy import ndimage

from medseg_jax.data import noise

SEQUENCES = ('t1', 't1ce', 't2', 'flair')
# Tissue intensities per sequence before texture, bias field and noise.
# Columns: air, brain, oedema, enhancing, necrosis.
CONTRAST = np.array([
    [0.0, 1.0, 0.75, 0.75, 0.45],  # T1: oedema ~ enhancing.
    [0.0, 1.0, 1.0, 1.8, 0.45],  # T1ce: brain ~ oedema; the rim enhances.
    [0.0, 1.0, 1.65, 1.65, 2.1],  # T2: oedema ~ enhancing.
    [0.0, 1.0, 1.7, 1.7, 1.0],  # FLAIR: brain ~ necrosis, oedema ~ enhancing.
], np.float32)
# Grey/white-matter texture amplitude per sequence (sign: white matter is
# bright in T1, dark in T2 and FLAIR).
_TEXTURE = np.array([0.08, 0.06, -0.08, -0.06], np.float32)
_STREAM = 3  # Seed-sequence tag of this data set's draws.
MIN_SIZE = 8


def _as_dhw(volume_size) -> tuple[int, int, int]:
  """Returns (D, H, W) from a 3-sequence, or raises naming the config key."""
  size = tuple(int(s) for s in np.atleast_1d(volume_size))
  if len(size) != 3 or min(size) < MIN_SIZE:
    raise ValueError(
        f'volume_size={volume_size!r} must be 3 sizes (D, H, W), each >= '
        f'{MIN_SIZE} (config.data.synthetic3d.volume_size).')
  return size


def smooth_noise(rng: np.random.Generator, shape: Sequence[int],
                 feature) -> np.ndarray:
  """Returns smooth Gaussian noise, float32 `shape`, unit standard deviation.

  `noise.smooth_noise` with features of at least one voxel, interpolating
  the first axis first (the order these volumes were generated with).

  Args:
    rng: source of randomness.
    shape: spatial shape, any number of axes.
    feature: typical blob size in voxels, one value or one per axis.
  """
  return noise.smooth_noise(rng, shape, np.maximum(feature, 1.0),
                            axis_order=range(len(shape)))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
  """Returns a uniformly random 3x3 rotation matrix."""
  q, r = np.linalg.qr(rng.standard_normal((3, 3)))
  q *= np.sign(np.diag(r))
  if np.linalg.det(q) < 0:
    q[:, 0] *= -1
  return q


def _axis_mm(n: int, step: float, centre: float) -> np.ndarray:
  """Returns voxel-centre coordinates in mm along one axis, minus `centre`."""
  return ((np.arange(n, dtype=np.float32) + 0.5) * step - centre).astype(
      np.float32)


def _brain(rng, shape, spacing):
  """Returns (brain bool [D, H, W], semi-axes in mm, centre in mm)."""
  extent = np.asarray(shape) * spacing
  semi = extent / 2 * rng.uniform(0.72, 0.88, 3)
  centre = extent / 2 + rng.uniform(-0.04, 0.04, 3) * extent
  z, y, x = (_axis_mm(n, s, c) / a for n, s, c, a in
             zip(shape, spacing, centre, semi))
  rho = np.sqrt(z[:, None, None] ** 2 + y[None, :, None] ** 2 +
                x[None, None, :] ** 2)
  feature = np.asarray(shape) / 4  # Lobes: a few per axis.
  rho += 0.05 * np.clip(smooth_noise(rng, shape, feature), -3, 3)
  return rho < 1.0, semi, centre


def _ellipsoid_field(rng, box, spacing, centre, semi, rotation):
  """Returns the noisy normalised radius of an ellipsoid inside `box`.

  < 1 inside. `box` is a tuple of slices; `centre` and `semi`-axes are in mm.
  """
  z, y, x = (_axis_mm(b.stop - b.start, s, c - b.start * s)
             for b, s, c in zip(box, spacing, centre))
  # Offsets from the centre in the ellipsoid's own (rotated) frame.
  coords = [rotation[0, k] * z[:, None, None] + rotation[1, k] *
            y[None, :, None] + rotation[2, k] * x[None, None, :]
            for k in range(3)]
  rho = np.sqrt(sum((c / a) ** 2 for c, a in zip(coords, semi)))
  shape = rho.shape
  feature = np.maximum(min(semi) / 1.5 / np.asarray(spacing), 1.0)
  rho += rng.uniform(0.05, 0.15) * np.clip(smooth_noise(rng, shape, feature),
                                           -3, 3)
  return rho


def _tumour(rng, shape, spacing, brain, brain_semi, brain_centre):
  """Returns the tissue map uint8 [D, H, W]: 0 air, 1 brain, 2 oedema,
  3 enhancing, 4 necrosis, and the tumour box (tuple of slices)."""
  # Centre within 40% of the brain's radius, so most of the tumour is brain.
  direction = rng.standard_normal(3)
  direction /= np.linalg.norm(direction)
  centre = brain_centre + direction * rng.uniform(0, 0.4) * brain_semi
  radius = rng.uniform(0.4, 0.7) * brain_semi.min()
  reach = radius * 1.2 * 1.5 + 2 * max(spacing)
  box = tuple(slice(max(0, int((c - reach) / s)),
                    min(n, math.ceil((c + reach) / s)))
              for c, s, n in zip(centre, spacing, shape))
  tissue = brain.astype(np.uint8)
  region = brain[box]
  # Each nested region: smaller, shifted a little, its own shape and border.
  enhancing = rng.uniform(0.6, 0.85)
  scales = (1.0, enhancing, enhancing * rng.uniform(0.5, 0.75))
  labels = (2, 3, 4) if rng.random() > 0.15 else (2, 3)  # Some: no necrosis.
  inner = None
  for label, scale in zip(labels, scales):
    semi = radius * scale * rng.uniform(0.8, 1.2, 3)
    shift = rng.uniform(-0.12, 0.12, 3) * radius
    rho = _ellipsoid_field(rng, box, spacing, centre + shift, semi,
                           _random_rotation(rng))
    inside = rho < 1.0
    if inner is None:
      inside &= region
    else:  # At least one voxel inside the enclosing region: nesting holds.
      inside &= ndimage.binary_erosion(inner, np.ones((3, 3, 3), bool))
    tissue[box][inside] = label
    inner = inside
  return tissue, box


def _noise(rng: np.random.Generator, shape, std: float) -> np.ndarray:
  """Returns zero-mean noise of standard deviation `std`, float32 `shape`.

  The sum of two uniform bytes (a triangular distribution): it looks like
  Gaussian noise at this amplitude and costs a tenth of `standard_normal`.
  """
  size = math.prod(shape)
  a = np.frombuffer(rng.bytes(size), np.int8).reshape(shape)
  b = np.frombuffer(rng.bytes(size), np.int8).reshape(shape)
  out = a.astype(np.float32)
  out += b
  out += 1.0  # Bytes are in [-128, 127]: mean -0.5 each.
  out *= np.float32(std / math.sqrt(2 * (256 ** 2 - 1) / 12))
  return out


def render_tumour_volume(rng: np.random.Generator, shape: Sequence[int],
                         spacing: Sequence[float], in_channels: int = 4
                         ) -> tuple[np.ndarray, np.ndarray]:
  """Draws one multi-sequence MRI-like volume and its tumour classes.

  Args:
    rng: the only source of randomness (seed it for reproducibility).
    shape: (D, H, W) in voxels.
    spacing: (D, H, W) voxel size in mm.
    in_channels: number of sequences, 1 to 4 (T1, T1ce, T2, FLAIR first).

  Returns:
    (image float32 [D, H, W, in_channels], z-scored per channel over the
    volume; classes uint8 [D, H, W]: 0 background, 1 oedema, 2 enhancing,
    3 necrosis).
  """
  shape = _as_dhw(shape)
  spacing = np.asarray(spacing, np.float64)
  brain, semi, centre = _brain(rng, shape, spacing)
  tissue, box = _tumour(rng, shape, spacing, brain, semi, centre)
  # Per-patient strength of each sequence's tumour contrast; it keeps the
  # look-alike pairs of CONTRAST alike.
  contrast = CONTRAST.copy()
  strength = rng.uniform(0.75, 1.25, (len(SEQUENCES), 1))
  contrast[:, 1:] = 1.0 + (contrast[:, 1:] - 1.0) * strength
  noise_std = 0.08 * rng.uniform(0.5, 1.5)
  # Brain texture (~6 mm gyri) outside the tumour, its own texture inside.
  texture = smooth_noise(rng, shape, 6.0 / spacing)
  np.clip(texture, -2.5, 2.5, out=texture)
  tumour = tissue[box] >= 2
  texture[box] *= ~tumour
  heterogeneity = smooth_noise(rng, tumour.shape, 3.0 / spacing)
  heterogeneity *= 0.08 * tumour
  tissue = tissue.astype(np.intp)
  channels = []
  for c in range(in_channels):
    shade = _TEXTURE[c] * texture
    shade += 1.0
    shade[box] += heterogeneity
    bias = smooth_noise(rng, shape, np.asarray(shape) / 1.5)
    bias *= 0.12
    bias += 1.0
    shade *= bias
    img = np.take(contrast[c].astype(np.float32), tissue)
    img *= shade
    img += _noise(rng, shape, noise_std)
    img -= img.mean(dtype=np.float64)
    img /= max(float(img.std(dtype=np.float64)), 1e-6)
    channels.append(img)
  image = np.stack(channels, axis=-1)
  classes = np.clip(tissue.astype(np.int16) - 1, 0, None).astype(np.uint8)
  return image, classes


def merge_classes(classes: np.ndarray, num_classes: int) -> np.ndarray:
  """Returns the 4-class tumour map relabelled for `num_classes`.

  Args:
    classes: uint8 map, 0 background, 1 oedema, 2 enhancing, 3 necrosis.
    num_classes: 4 (as is), 3 (0, 1 oedema, 2 core = enhancing + necrosis),
      1 or 2 (whole tumour = 1).
  """
  if num_classes == 4:
    return classes
  if num_classes == 3:
    return np.minimum(classes, 2)
  return (classes > 0).astype(np.uint8)


class SyntheticTumours:
  """Grain random-access source of BraTS-like volumes, one case per patient.

  Each record is a dict:
    image: float32 [D, H, W, in_channels], z-scored per channel;
    mask: uint8 [D, H, W], classes as `merge_classes(..., num_classes)`;
    spacing: (D, H, W) voxel size in mm; patient_id and case_id: str, e.g.
    'synth3d-p00012' (the same string: each patient has one case).
  """

  def __init__(self, num_patients: int, volume_size=(32, 64, 64),
               in_channels: int = 4, num_classes: int = 4, seed: int = 0,
               spacing: Sequence[float] = (2.0, 1.0, 1.0),
               size_jitter: float = 0.0):
    """Args:
      num_patients: number of patients (= records).
      volume_size: (D, H, W) in voxels.
      in_channels: 1 to 4 sequences (T1, T1ce, T2, FLAIR, first ones kept).
      num_classes: 1 or 2 (whole tumour), 3 (oedema, core) or 4 (oedema,
        enhancing, necrosis); the mask has max(2, num_classes) classes.
      seed: data set seed; different seeds give different data sets.
      spacing: typical (D, H, W) voxel size in mm, jittered per patient.
      size_jitter: each patient's size along each axis is volume_size times
        a factor uniform in [1 - size_jitter, 1 + size_jitter] (0 = all the
        same size, which whole-volume batches need).
    """
    where = 'config.data.synthetic3d'
    if num_patients < 1:
      raise ValueError(f'SyntheticTumours needs num_patients >= 1 ({where}.'
                       f'num_patients), got {num_patients}.')
    if not 1 <= in_channels <= len(SEQUENCES):
      raise ValueError(
          f'SyntheticTumours makes 1 to {len(SEQUENCES)} channels '
          f'({", ".join(SEQUENCES)}); got in_channels={in_channels} '
          '(config.data.in_channels).')
    if num_classes not in (1, 2, 3, 4):
      raise ValueError(
          f'SyntheticTumours supports num_classes 1 or 2 (whole tumour), 3 '
          '(oedema, core) or 4 (oedema, enhancing, necrosis); got '
          f'{num_classes} (config.data.num_classes).')
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
      raise ValueError(f'spacing={spacing} must be 3 positive sizes in mm '
                       f'({where}.spacing).')
    if not 0 <= size_jitter < 0.5:
      raise ValueError(f'size_jitter={size_jitter} must be in [0, 0.5) '
                       f'({where}.size_jitter).')
    self.num_patients = int(num_patients)
    self.volume_size = _as_dhw(volume_size)
    self.in_channels = int(in_channels)
    self.num_classes = int(num_classes)
    self.seed = int(seed)
    self.spacing = spacing
    self.size_jitter = float(size_jitter)

  def __len__(self) -> int:
    return self.num_patients

  def __repr__(self) -> str:
    return (f'SyntheticTumours(num_patients={self.num_patients}, '
            f'volume_size={self.volume_size}, in_channels={self.in_channels}, '
            f'num_classes={self.num_classes}, seed={self.seed}, '
            f'spacing={self.spacing}, size_jitter={self.size_jitter})')

  @property
  def patient_ids(self) -> list[str]:
    """The patient id of every record, in record order (nothing is drawn)."""
    return [f'synth3d-p{i:05d}' for i in range(len(self))]

  @property
  def case_ids(self) -> list[str]:
    """The case id of every record: its patient id (one case per patient)."""
    return self.patient_ids

  def _geometry(self, rng) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Draws one patient's (shape, spacing)."""
    j = self.size_jitter
    factors = rng.uniform(1 - j, 1 + j, 3)
    shape = tuple(max(MIN_SIZE, round(n * f))
                  for n, f in zip(self.volume_size, factors))
    in_plane = rng.uniform(0.9, 1.1)
    scale = (rng.uniform(0.8, 1.25), in_plane, in_plane)
    spacing = tuple(round(s * f, 3) for s, f in zip(self.spacing, scale))
    return shape, spacing

  def __getitem__(self, index: int) -> dict:
    """Returns record `index` (negative indices count from the end)."""
    n = len(self)
    index = int(index)
    if not -n <= index < n:
      raise IndexError(f'SyntheticTumours index {index} out of range [0, {n}).')
    index %= n
    rng = np.random.default_rng([self.seed, index, _STREAM])
    shape, spacing = self._geometry(rng)
    image, classes = render_tumour_volume(rng, shape, spacing,
                                          self.in_channels)
    pid = self.patient_ids[index]
    return {'image': image, 'mask': merge_classes(classes, self.num_classes),
            'spacing': spacing, 'patient_id': pid, 'case_id': pid}


def build_synthetic3d_source(data_cfg) -> SyntheticTumours:
  """Returns the `synthetic3d` source that `data_cfg` describes.

  Args:
    data_cfg: `config.data`; reads `num_classes`, `in_channels` and
      `synthetic3d` (num_patients, volume_size, in_channels, seed, and
      optionally spacing, size_jitter).

  Raises:
    ValueError: `synthetic3d.in_channels` differs from `in_channels`, or a
      value the source cannot honour.
  """
  sub = data_cfg.synthetic3d
  in_channels = int(data_cfg.in_channels)
  if int(sub.in_channels) != in_channels:
    raise ValueError(
        f'config.data.synthetic3d.in_channels={sub.in_channels} differs from '
        f'config.data.in_channels={in_channels}: the model would see a '
        'different number of channels than the data has; set both to the '
        'same value (1 to 4).')
  return SyntheticTumours(
      num_patients=int(sub.num_patients),
      volume_size=tuple(sub.volume_size),
      in_channels=in_channels,
      num_classes=int(data_cfg.num_classes),
      seed=int(sub.seed),
      # Not in configs/default.py: tests and benchmarks set them.
      spacing=tuple(sub.get('spacing', (2.0, 1.0, 1.0))),
      size_jitter=float(sub.get('size_jitter', 0.0)))


def class_names(num_classes: int) -> tuple[str, ...]:
  """Returns the names of classes 1..K-1 of `merge_classes(., num_classes)`.

  Args:
    num_classes: 1 to 4, as config.data.num_classes.

  Returns:
    ('oedema', 'enhancing', 'necrosis') for 4, ('oedema', 'core') for 3,
    ('tumour',) for 1 or 2.
  """
  return {4: ('oedema', 'enhancing', 'necrosis'),
          3: ('oedema', 'core')}.get(int(num_classes), ('tumour',))


def _benchmark():
  """Prints the CPU time per volume at a few sizes."""
  import time  # pylint: disable=import-outside-toplevel
  for size in ((24, 48, 48), (32, 64, 64), (80, 128, 128)):
    source = SyntheticTumours(20, size)
    source[0]
    start = time.process_time()
    for i in range(len(source)):
      source[i]
    ms = (time.process_time() - start) / len(source) * 1e3
    print(f'SyntheticTumours {size}: {ms:.1f} ms/volume')


if __name__ == '__main__':
  _benchmark()
