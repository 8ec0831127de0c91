"""Tests of 2D image I/O and the ISIC / image-folder sources."""

import csv
import os
import pickle

import ml_collections
import numpy as np
from PIL import Image
import pytest

from medseg_jax.data import check
from medseg_jax.data import folder_sources
from medseg_jax.data import image_io

SIZES = ((20, 30), (24, 36), (30, 20))  # (H, W) of the training images.


def lesion_mask(h, w, value=255):
  """A rectangle of `value` at rows 5..9, columns 4..11 (fits in 20x20)."""
  mask = np.zeros((h, w), np.uint8)
  mask[5:10, 4:12] = value
  return mask


def save(array, path, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)
  return path


def noise(h, w, c=3, seed=0):
  shape = (h, w, c) if c > 1 else (h, w)
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def make_isic(root, validation=True):
  """ISIC 2018 layout: 3 training pairs, 1 validation pair, test inputs only."""
  inputs, truth = folder_sources.isic_folders(root, 'Training')
  for i, (h, w) in enumerate(SIZES):
    save(noise(h, w, seed=i), os.path.join(inputs, f'ISIC_{i:07d}.jpg'))
    save(lesion_mask(h, w), os.path.join(truth,
                                         f'ISIC_{i:07d}_segmentation.png'))
  with open(os.path.join(inputs, 'LICENSE.txt'), 'w') as f:
    f.write('CC-BY-NC')
  if validation:
    inputs, truth = folder_sources.isic_folders(root, 'Validation')
    save(noise(20, 30, seed=9), os.path.join(inputs, 'ISIC_0000100.jpg'))
    save(lesion_mask(20, 30), os.path.join(truth,
                                           'ISIC_0000100_segmentation.png'))
    test_inputs, _ = folder_sources.isic_folders(root, 'Test')
    save(noise(20, 30, seed=10), os.path.join(test_inputs, 'ISIC_0000200.jpg'))
  return root


def make_folder(root):
  """images/ + masks/ with a PNG, a JPEG, a TIFF and a grayscale PNG."""
  files = {'a.png': noise(20, 30), 'b.jpg': noise(24, 36),
           'c.tif': noise(20, 30), 'd.png': noise(30, 20, c=1)}
  for name, image in files.items():
    save(image, os.path.join(root, 'images', name))
    stem = os.path.splitext(name)[0]
    save(lesion_mask(*image.shape[:2]),
         os.path.join(root, 'masks', f'{stem}_mask.png'))
  return root


def write_csv(path, header, rows):
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return path


def data_cfg(root, source='folder', **overrides):
  """configs/default.py's config.data for a file data set, then `overrides`."""
  from configs import default  # pylint: disable=import-outside-toplevel
  values = default.get_config().data.to_dict()
  values.update(
      source=source, root=str(root), image_size=16, num_classes=1,
      in_channels=3, label_values=(), cache='memory', cache_dir='',
      folder=dict(images='images', masks='masks', mask_suffix='_mask',
                  manifest=''),
      isic=dict(metadata_csv=''), val_fraction=0.0, test_fraction=0.0,
      split_seed=0, train_fraction=1.0)
  for key, value in overrides.items():  # Before typing: image_size may be (H, W).
    node = values
    *parents, leaf = key.split('__')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return ml_collections.ConfigDict(values)


def snapshot(root):
  """(path, mtime, size) of everything under root."""
  out = set()
  for folder, dirs, files in os.walk(root):
    for name in dirs + files:
      st = os.stat(os.path.join(folder, name))
      out.add((os.path.join(folder, name), st.st_mtime_ns, st.st_size))
  return out


def test_isic_records_and_official_splits(tmp_path):
  root = make_isic(tmp_path / 'isic')
  source = folder_sources.build_isic_source(data_cfg(root, 'isic2018'))
  assert source.case_ids == ['ISIC_0000000', 'ISIC_0000001', 'ISIC_0000002',
                             'ISIC_0000100']
  assert source.patient_ids == source.case_ids
  # Test inputs without their ground-truth folder are not used.
  assert source.official_splits == ['train', 'train', 'train', 'val']
  for i in range(len(source)):
    record = source[i]
    assert record['image'].shape == (16, 16, 3)
    assert record['image'].dtype == np.uint8
    assert record['mask'].shape == (16, 16) and record['mask'].dtype == np.uint8
    assert set(np.unique(record['mask'])) == {0, 1}  # 0/255 -> 0/1.
    assert record['spacing'] == (1.0, 1.0)
    assert record['case_id'] == source.case_ids[i]
  # Record 0 is 20x30 -> 16x16 by nearest: row r samples int((r + .5) * 20
  # / 16), column c int((c + .5) * 30 / 16); lesion rows 5..9, cols 4..11.
  rows = [int((r + 0.5) * 20 / 16) for r in range(16)]
  cols = [int((c + 0.5) * 30 / 16) for c in range(16)]
  expected = np.array([[5 <= r < 10 and 4 <= c < 12 for c in cols]
                       for r in rows], np.uint8)
  np.testing.assert_array_equal(source[0]['mask'], expected)


def test_isic_patient_ids_from_metadata(tmp_path):
  root = make_isic(tmp_path / 'isic')
  write_csv(root / 'meta.csv', ['isic_id', 'patient_id', 'lesion_id'], [
      ['ISIC_0000000', 'IP_1', 'IL_9'], ['ISIC_0000001', '', 'IL_9'],
      ['ISIC_0000002.jpg', 'IP_1', ''], ['ISIC_0000100', '', '']])
  source = folder_sources.build_isic_source(
      data_cfg(root, 'isic2018', isic__metadata_csv='meta.csv'))
  # patient_id first, else lesion_id, else the image id itself.
  assert source.patient_ids == ['IP_1', 'IL_9', 'IP_1', 'ISIC_0000100']


def test_isic_metadata_without_known_columns_is_reported(tmp_path):
  root = make_isic(tmp_path / 'isic')
  write_csv(root / 'meta.csv', ['name', 'patient'], [['ISIC_0000000', 'p']])
  cfg = data_cfg(root, 'isic2018', isic__metadata_csv='meta.csv')
  with pytest.raises(check.DataCheckError, match='isic_id') as info:
    folder_sources.build_isic_source(cfg)
  assert [os.path.basename(p.path) for p in info.value.problems] == [
      'meta.csv']
  # Not strict: the problem is listed, the source still builds.
  source = folder_sources.build_isic_source(cfg, strict=False)
  assert len(source) == 4 and len(source.listing_problems) == 1


def test_folder_pairing_formats_and_grayscale(tmp_path):
  root = make_folder(tmp_path / 'data')
  source = folder_sources.build_folder_source(data_cfg(root))
  assert source.case_ids == ['a', 'b', 'c', 'd']
  assert source.patient_ids == ['a', 'b', 'c', 'd']  # Per image: no manifest.
  assert source.official_splits == [''] * 4
  for i in range(4):
    assert source[i]['image'].shape == (16, 16, 3)
    assert source[i]['mask'].max() == 1
  gray = source[3]['image']  # Grayscale repeated to in_channels=3.
  np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
  # TIFF and PNG are lossless: record = resize of the original pixels.
  original = np.asarray(Image.open(root / 'images' / 'c.tif'))
  np.testing.assert_array_equal(source[2]['image'],
                                image_io.resize_image(original, 16))


def test_manifest_patients_and_split_column(tmp_path):
  root = make_folder(tmp_path / 'data')
  write_csv(root / 'manifest.csv', ['image', 'mask', 'patient_id', 'split'], [
      ['images/d.png', 'masks/d_mask.png', 'P2', 'test'],
      ['images/a.png', 'masks/a_mask.png', 'P1', 'train'],
      ['images/b.jpg', str(root / 'masks' / 'b_mask.png'), 'P1', 'Validation'],
  ])
  source = folder_sources.build_folder_source(
      data_cfg(root, folder__manifest='manifest.csv'))
  assert source.case_ids == ['a', 'b', 'd']  # Sorted, not in file order.
  assert source.patient_ids == ['P1', 'P1', 'P2']
  assert source.official_splits == ['train', 'val', 'test']
  assert source[1]['image'].shape == (16, 16, 3)


def test_label_values_map_to_classes(tmp_path):
  root = tmp_path / 'data'
  save(noise(20, 30), str(root / 'images' / 'x.png'))
  raw = np.zeros((20, 30), np.uint8)
  raw[:, 10:20], raw[:, 20:] = 128, 255
  save(raw, str(root / 'masks' / 'x.png'))
  source = folder_sources.build_folder_source(data_cfg(
      root, image_size=(20, 30), num_classes=3, label_values=(0, 128, 255),
      folder__mask_suffix=''))
  expected = np.zeros((20, 30), np.uint8)
  expected[:, 10:20], expected[:, 20:] = 1, 2
  np.testing.assert_array_equal(source[0]['mask'], expected)
  np.testing.assert_array_equal(source[0]['image'], noise(20, 30))


def test_map_labels_rules_and_errors():
  np.testing.assert_array_equal(
      image_io.map_labels(np.array([[0, 1]], np.uint8), (), 1), [[0, 1]])
  np.testing.assert_array_equal(
      image_io.map_labels(np.array([[0, 255]], np.uint8), (), 1), [[0, 1]])
  np.testing.assert_array_equal(  # K classes: values kept.
      image_io.map_labels(np.array([[0, 2, 3]], np.uint16), (), 4), [[0, 2, 3]])
  np.testing.assert_array_equal(
      image_io.map_labels(np.array([[10, 30, 20]], np.int32), (10, 20, 30), 3),
      [[0, 2, 1]])
  with pytest.raises(ValueError, match=r'm\.png.*\[7\].*label_values'):
    image_io.map_labels(np.array([[0, 7]], np.uint8), (0, 255), 1, 'm.png')
  with pytest.raises(ValueError, match=r'm\.jpg.*\[0, 1, 254, 255\].*PNG'):
    image_io.map_labels(np.array([[0, 1, 254, 255]], np.uint8), (), 1, 'm.jpg')
  with pytest.raises(ValueError, match=r'\[5\] are outside the 3 classes'):
    image_io.map_labels(np.array([[0, 5]], np.uint8), (), 3, 'm.png')
  with pytest.raises(ValueError, match='must list 3 distinct'):
    image_io.map_labels(np.zeros((1, 1), np.uint8), (0, 255), 3)


def test_read_image_modes(tmp_path):
  rgba = noise(4, 5, c=4)
  path = save(rgba, str(tmp_path / 'rgba.png'))
  np.testing.assert_array_equal(image_io.read_image(path), rgba[..., :3])
  palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), 'P')
  palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
  palette.save(tmp_path / 'p.png')
  np.testing.assert_array_equal(image_io.read_image(str(tmp_path / 'p.png')),
                                [[[10, 20, 30], [200, 100, 50]],
                                 [[200, 100, 50], [10, 20, 30]]])
  # 16-bit: [min, max] -> [0, 255]; 2000 is halfway -> 127.5 -> 128.
  wide = np.array([[1000, 2000, 3000]], np.uint16)
  Image.fromarray(wide).save(tmp_path / 'w16.png')
  image = image_io.read_image(str(tmp_path / 'w16.png'))
  assert image.dtype == np.uint8 and image.shape == (1, 3, 1)
  np.testing.assert_array_equal(image[..., 0], [[0, 128, 255]])
  gray = save(noise(3, 4, c=1), str(tmp_path / 'g.tif'))
  np.testing.assert_array_equal(image_io.read_image(gray)[..., 0],
                                noise(3, 4, c=1))


def test_read_mask_palette_rgb_and_colour_error(tmp_path):
  indices = np.array([[0, 2], [1, 0]], np.uint8)
  palette = Image.fromarray(indices, 'P')
  palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
  palette.save(tmp_path / 'p.png')
  np.testing.assert_array_equal(image_io.read_mask(str(tmp_path / 'p.png')),
                                indices)
  gray_rgb = np.repeat(lesion_mask(20, 20)[..., None], 3, axis=-1)
  path = save(gray_rgb, str(tmp_path / 'rgb.png'))
  np.testing.assert_array_equal(image_io.read_mask(path), lesion_mask(20, 20))
  path = save(noise(4, 4), str(tmp_path / 'colour.png'))
  with pytest.raises(image_io.FileError, match=r'colour\.png.*colour'):
    image_io.read_mask(path)


def test_resize_known_answers():
  mask = np.array([[1, 2], [3, 4]], np.uint8)
  np.testing.assert_array_equal(image_io.resize_mask(mask, 4),
                                np.kron(mask, np.ones((2, 2), np.uint8)))
  flat = np.full((20, 30, 3), 77, np.uint8)
  np.testing.assert_array_equal(image_io.resize_image(flat, (8, 9)),
                                np.full((8, 9, 3), 77, np.uint8))
  two = np.full((6, 4, 2), 5, np.uint8)
  assert image_io.resize_image(two, (3, 2)).shape == (3, 2, 2)


def test_jpeg_draft_decodes_at_least_the_target_size(tmp_path):
  path = save(noise(400, 600), str(tmp_path / 'big.jpg'))
  small = image_io.read_image(path, min_size=(64, 64))
  assert 64 <= small.shape[0] < 400 and 64 <= small.shape[1] < 600
  assert image_io.read_image(path).shape == (400, 600, 3)


def test_write_mask_png_round_trip(tmp_path):
  mask = np.array([[0, 1], [1, 0]], np.uint8)
  image_io.write_mask_png(str(tmp_path / 'b.png'), mask)
  np.testing.assert_array_equal(image_io.read_mask(str(tmp_path / 'b.png')),
                                mask * 255)
  multi = np.array([[0, 1, 2]], np.int32)
  image_io.write_mask_png(str(tmp_path / 'm.png'), multi, num_classes=3)
  raw = image_io.read_mask(str(tmp_path / 'm.png'))
  np.testing.assert_array_equal(raw, multi)
  np.testing.assert_array_equal(image_io.map_labels(raw, (), 3), multi)
  with pytest.raises(ValueError, match='0..1'):
    image_io.write_mask_png(str(tmp_path / 'x.png'), multi, num_classes=1)
  assert sorted(os.listdir(tmp_path)) == ['b.png', 'm.png']  # No temp left.


def test_channel_mismatch_names_file(tmp_path):
  root = make_folder(tmp_path / 'data')
  source = folder_sources.build_folder_source(data_cfg(root, in_channels=1))
  assert source[3]['image'].shape == (16, 16, 1)  # The grayscale one.
  with pytest.raises(ValueError, match=r'a\.png.*3 channel.*in_channels=1'):
    source[0]  # pylint: disable=expression-not-assigned


def test_pickled_source_gives_equal_records(tmp_path):
  root = make_folder(tmp_path / 'data')
  source = folder_sources.build_folder_source(data_cfg(root))
  first = source[1]
  clone = pickle.loads(pickle.dumps(source))
  assert clone.case_ids == source.case_ids
  np.testing.assert_array_equal(clone[1]['image'], first['image'])
  np.testing.assert_array_equal(clone[1]['mask'], first['mask'])


def _count_decodes(monkeypatch):
  calls = []
  real = image_io.read_image

  def counting(path, *args, **kwargs):
    calls.append(os.path.basename(path))
    return real(path, *args, **kwargs)

  monkeypatch.setattr(image_io, 'read_image', counting)
  return calls


def test_memory_cache_is_bounded(tmp_path, monkeypatch):
  root = make_folder(tmp_path / 'data')
  calls = _count_decodes(monkeypatch)
  record_mb = (16 * 16 * 3 + 16 * 16) / 2**20
  small = folder_sources.build_folder_source(
      data_cfg(root, cache_memory_mb=1.5 * record_mb))  # Room for one record.
  for i in (0, 1, 0):
    small[i]  # pylint: disable=expression-not-assigned
  assert calls == ['a.png', 'b.jpg', 'a.png']
  calls.clear()
  large = folder_sources.build_folder_source(data_cfg(root))
  for i in (0, 1, 0, 1):
    large[i]  # pylint: disable=expression-not-assigned
  assert calls == ['a.png', 'b.jpg']


def test_disk_cache_is_reused_and_root_untouched(tmp_path, monkeypatch):
  root = make_isic(tmp_path / 'isic')
  before = snapshot(root)
  cfg = data_cfg(root, 'isic2018', cache='disk',
                 cache_dir=str(tmp_path / 'cache'))
  calls = _count_decodes(monkeypatch)
  first = folder_sources.build_isic_source(cfg)
  records = [first[i] for i in range(len(first))]
  assert len(calls) == 4
  second = folder_sources.build_isic_source(cfg)  # A new run: empty memory.
  for i, record in enumerate(records):
    np.testing.assert_array_equal(second[i]['image'], record['image'])
    np.testing.assert_array_equal(second[i]['mask'], record['mask'])
  assert len(calls) == 4  # Nothing decoded again.
  assert snapshot(root) == before
  cached = [n for _, _, files in os.walk(tmp_path / 'cache') for n in files]
  assert len(cached) == 4 and all(n.endswith('.npz') for n in cached)
  with pytest.raises(ValueError, match='inside the data folder'):
    folder_sources.build_isic_source(
        data_cfg(root, 'isic2018', cache='disk', cache_dir=str(root / 'c')))


def test_damaged_disk_cache_entry_is_decoded_again(tmp_path, monkeypatch):
  root = make_folder(tmp_path / 'data')
  cfg = data_cfg(root, cache='disk', cache_dir=str(tmp_path / 'cache'))
  expected = folder_sources.build_folder_source(cfg)[0]
  (entry,) = [os.path.join(d, n) for d, _, files in os.walk(tmp_path / 'cache')
              for n in files if n.startswith('a-')]
  with open(entry, 'wb') as f:
    f.write(b'half a file')
  calls = _count_decodes(monkeypatch)
  record = folder_sources.build_folder_source(cfg)[0]
  assert calls == ['a.png']
  np.testing.assert_array_equal(record['image'], expected['image'])
  assert os.path.getsize(entry) > 100  # Rewritten whole.


def test_images_and_masks_in_one_folder(tmp_path):
  root = tmp_path / 'data'
  for stem in ('p1', 'p2'):
    save(noise(20, 30), str(root / 'all' / f'{stem}.jpg'))
    save(lesion_mask(20, 30), str(root / 'all' / f'{stem}_seg.png'))
  cfg = data_cfg(root, folder__images='all', folder__masks='all',
                 folder__mask_suffix='_seg')
  source = folder_sources.build_folder_source(cfg)
  assert source.case_ids == ['p1', 'p2']
  assert [os.path.basename(p.mask) for p in source.pairs] == [
      'p1_seg.png', 'p2_seg.png']
  with pytest.raises(ValueError, match='mask_suffix'):
    folder_sources.build_folder_source(data_cfg(
        root, folder__images='all', folder__masks='all',
        folder__mask_suffix=''))


def test_nested_isic_folder_is_pointed_at(tmp_path):
  make_isic(tmp_path / 'download' / 'isic2018')
  with pytest.raises(check.DataCheckError,
                     match='set config.data.root to .*isic2018'):
    folder_sources.build_isic_source(data_cfg(tmp_path / 'download',
                                              'isic2018'))
