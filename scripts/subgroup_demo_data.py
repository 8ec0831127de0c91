"""Writes a folder data set with a site column where site C is harder.

Synthetic lesions (medseg_jax.data.synthetic) as PNG files plus manifest.csv
(image, mask, patient_id, split, site, age). Test images of site C have their
contrast cut to `--contrast` (blended toward the image mean), so a model
trained on normal images segments them worse: a subgroup gap for the README's
worked example to find.

  python scripts/subgroup_demo_data.py /tmp/fdemo/data
  python scripts/subgroup_demo_data.py /tmp/fdemo/external --seed 5 --num 90 \
      --all_test --contrast 0.5
"""

import argparse
import csv
import os

import numpy as np
from PIL import Image

from medseg_jax.data import synthetic

SITES = 'ABC'
SPLITS = ('train', 'val', 'test')


def parse_args(argv=None) -> argparse.Namespace:
  """Parses the command line.

  Args:
    argv: arguments without the program name; None reads sys.argv.

  Returns:
    The parsed flags.
  """
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('out', help='output folder (images/, masks/, '
                      'manifest.csv are written into it)')
  parser.add_argument('--seed', type=int, default=0,
                      help='seed of the synthetic cases and of the ages')
  parser.add_argument('--contrast', type=float, default=0.35,
                      help='contrast factor of site C test images '
                      '(1 = unchanged, 0 = flat at the image mean)')
  parser.add_argument('--num', type=int, default=240, help='number of cases')
  parser.add_argument('--size', type=int, default=48,
                      help='image side length in pixels')
  parser.add_argument('--all_test', action='store_true',
                      help='put every case in the test split (an external '
                      'test set)')
  return parser.parse_args(argv)


def case_split(index: int, all_test: bool) -> str:
  """Split of case `index`: 1 in 4 test, 1 in 8 val, the rest train.

  Args:
    index: case number.
    all_test: whether every case is a test case.

  Returns:
    'train', 'val' or 'test'.
  """
  if all_test or index % 4 == 0:
    return 'test'
  if index % 8 == 1:
    return 'val'
  return 'train'


def reduce_contrast(image: np.ndarray, contrast: float) -> np.ndarray:
  """Blends an image toward its mean.

  Args:
    image: float image.
    contrast: weight of the deviation from the mean that is kept.

  Returns:
    The image with its contrast scaled by `contrast`.
  """
  mean = image.mean()
  return mean + contrast * (image - mean)


def to_uint8(image: np.ndarray) -> np.ndarray:
  """Rounds a float image to 8-bit pixels.

  Args:
    image: float image, nominally in [0, 255].

  Returns:
    uint8 image, rounded to nearest and clipped.
  """
  return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def write_case(out: str, index: int, case: dict, site: str, split: str,
               contrast: float) -> str:
  """Writes one case's image and mask PNGs.

  Args:
    out: output folder, with images/ and masks/ in it.
    index: case number (names the files).
    case: one synthetic record with 'image' and 'mask'.
    site: the case's site.
    split: the case's split.
    contrast: contrast factor applied to site C test images.

  Returns:
    The file name used under images/ and masks/.
  """
  image = case['image'].astype(np.float32)
  if site == 'C' and split == 'test':
    image = reduce_contrast(image, contrast)
  name = f'case{index:04d}.png'
  Image.fromarray(to_uint8(image)).save(os.path.join(out, 'images', name))
  mask = (case['mask'] * 255).astype(np.uint8)
  Image.fromarray(mask).save(os.path.join(out, 'masks', name))
  return name


def write_manifest(out: str, rows: list[dict]) -> None:
  """Writes manifest.csv with one row per case.

  Args:
    out: output folder.
    rows: one dict per case, all with the same keys.
  """
  with open(os.path.join(out, 'manifest.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def split_counts(rows: list[dict]) -> str:
  """Counts cases per split.

  Args:
    rows: manifest rows.

  Returns:
    e.g. 'train 150, val 30, test 60'.
  """
  counts = [f'{s} {sum(r["split"] == s for r in rows)}' for s in SPLITS]
  return ', '.join(counts)


def main(argv=None) -> None:
  """Writes the data set and prints its size per split.

  Args:
    argv: arguments without the program name; None reads sys.argv.
  """
  args = parse_args(argv)
  source = synthetic.SyntheticLesions(args.num, 1, args.size, seed=args.seed)
  os.makedirs(os.path.join(args.out, 'images'), exist_ok=True)
  os.makedirs(os.path.join(args.out, 'masks'), exist_ok=True)
  # A separate generator for ages so they do not perturb the images.
  rng = np.random.default_rng(args.seed)
  rows = []
  for index in range(len(source)):
    case = source[index]
    site = SITES[index % len(SITES)]
    split = case_split(index, args.all_test)
    name = write_case(args.out, index, case, site, split, args.contrast)
    rows.append(dict(image=f'images/{name}', mask=f'masks/{name}',
                     patient_id=case['patient_id'], split=split, site=site,
                     age=int(rng.integers(20, 90))))
  write_manifest(args.out, rows)
  print(f'{len(rows)} cases in {args.out}: {split_counts(rows)}')


if __name__ == '__main__':
  main()
