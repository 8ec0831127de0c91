"""The rows of `scripts/benchmark.py`'s suites (plain data, no imports of JAX).

A case is a dict: `name`, `kind` ('train', 'sliding_window', 'hd95',
'pipeline'), `setting` (one line for the table), the kind's shapes,
`subjects` (the first is the one the others are compared with),
`repeats` x `units_per_block` timed units per subject, `items_per_unit`
and `item` (what a unit delivers: images, patches, volumes, calls).
"""

SUITES = ('cpu', 'gpu')

# The recipes' models (configs/unet.py, unetpp.py, unet3d.py).
UNET = dict(model='unet', features=[64, 128, 256, 512, 1024], norm='batch',
            in_channels=3, num_classes=1)
UNETPP = dict(model='unetpp', features=[32, 64, 128, 256, 512], norm='batch',
              in_channels=3, num_classes=1)
UNET3D = dict(model='unet', features=[32, 64, 128, 256, 320], norm='instance',
              in_channels=4, num_classes=4)
# The CPU sliding-window model: configs/unet3d.py:cpu's widths, plus the
# fifth level MONAI's BasicUNet always has.
UNET3D_SMALL = dict(UNET3D, features=[8, 16, 32, 64, 128])


def _subjects(suite: str, kind: str) -> list[dict]:
  """Returns the subjects of a row: medseg_jax first, then MONAI variants."""
  jax_dtype = 'bfloat16' if suite == 'gpu' and kind != 'hd95' else 'float32'
  ours = {'framework': 'jax', 'dtype': jax_dtype,
          'label': f'medseg_jax ({"bf16" if jax_dtype == "bfloat16" else "f32"})'}
  if kind == 'hd95':
    return [dict(ours, label='medseg_jax (NumPy/SciPy)'),
            {'framework': 'torch', 'variant': 'eager', 'label': 'MONAI'}]
  variants = [('eager', 'MONAI eager f32')]
  if suite == 'gpu':
    variants.append(('amp_bf16', 'MONAI AMP bf16'))
    if kind == 'train':
      variants.append(('compile', 'MONAI torch.compile + AMP bf16'))
  return [ours] + [{'framework': 'torch', 'variant': v, 'label': label}
                   for v, label in variants]


def _train(suite, name, model, spatial, batch, repeats, units) -> dict:
  item = 'images' if len(spatial) == 2 else 'patches'
  return dict(model, name=name, kind='train', spatial=list(spatial),
              batch=batch, repeats=repeats, units_per_block=units,
              items_per_unit=batch, item=item,
              subjects=_subjects(suite, 'train'))


def _pipeline(name, pipeline, batch, repeats, units, **shapes) -> dict:
  subjects = [{'framework': 'jax', 'augment_on': 'host',
               'label': 'host augmentation'},
              {'framework': 'jax', 'augment_on': 'device',
               'label': 'device augmentation (host part)'}]
  return dict(shapes, name=name, kind='pipeline', pipeline=pipeline,
              batch=batch, repeats=repeats, units_per_block=units,
              items_per_unit=batch,
              item='images' if pipeline == 'photo2d' else 'patches',
              subjects=subjects)


def _sliding(suite, model, volume, patch, sw_batch, repeats) -> dict:
  return dict(model, name='sliding_window_3d', kind='sliding_window',
              volume=list(volume), patch=list(patch), overlap=0.5,
              sw_batch=sw_batch, repeats=repeats, units_per_block=1,
              items_per_unit=1, item='volumes',
              subjects=_subjects(suite, 'sliding_window'))


def _hd95(suite, pair, shape, repeats) -> dict:
  return dict(name=f'hd95_{pair}', kind='hd95', pair=pair, shape=list(shape),
              repeats=repeats, units_per_block=1, items_per_unit=1,
              item='calls', subjects=_subjects(suite, 'hd95'))


def cases(suite: str) -> list[dict]:
  """Returns the rows of `suite` ('cpu' or 'gpu').

  The CPU suite keeps the recipes' models and sizes but batch 1 and two
  repeats, and a smaller 3D sliding-window model, so that it ends in about
  a quarter of an hour on 2 idle cores.
  """
  if suite not in SUITES:
    raise ValueError(f'Unknown suite {suite!r}; use one of {SUITES}.')
  gpu = suite == 'gpu'
  b2d, b3d = (16, 2) if gpu else (1, 1)
  rep, units = (5, 10) if gpu else (2, 1)
  # Cheap rows first: a run stopped early has the most rows.
  rows = [_hd95(suite, 'compact', (256, 256, 128), 3),
          _hd95(suite, 'stray', (256, 256, 128), 3),
          _pipeline('pipeline_photo2d', 'photo2d', 16, 3, 2, num_images=48,
                    photo_size=[1024, 768], size=256),
          _pipeline('pipeline_patches3d', 'patches3d', 2, 3, 2, num_images=4,
                    volume=[80, 128, 128], patch=[64, 96, 96])]
  if gpu:
    rows.append(_sliding(suite, UNET3D, (128, 256, 256), (64, 96, 96), 4, 3))
  else:
    rows.append(_sliding(suite, UNET3D_SMALL, (64, 128, 128), (32, 64, 64), 4,
                         2))
  rows += [
      _train(suite, 'train_unetpp_256', UNETPP, (256, 256), b2d, rep, units),
      _train(suite, 'train_unet_256', UNET, (256, 256), b2d, rep, units),
      _train(suite, 'train_unet3d_patch', UNET3D, (64, 96, 96), b3d, rep,
             units)]
  return [dict(r, setting=describe(r)) for r in rows]


def _x(values) -> str:
  return 'x'.join(map(str, values))


def describe(case: dict) -> str:
  """Returns the one-line description of a case's shapes for the table."""
  kind = case['kind']
  if kind in ('train', 'sliding_window'):
    model = (f'{case["model"]} {case["features"][0]}..{case["features"][-1]}'
             f' {case["norm"]} norm, {case["in_channels"]}->'
             f'{case["num_classes"]} ch')
    if kind == 'train':
      return f'{model}, {_x(case["spatial"])}, batch {case["batch"]}'
    return (f'{model}, volume {_x(case["volume"])}, window '
            f'{_x(case["patch"])}, overlap {case["overlap"]}, Gaussian, '
            f'{case["sw_batch"]} windows per call')
  if kind == 'hd95':
    return (f'{_x(case["shape"])} pair "{case["pair"]}" '
            '(bench_surface_metrics.py), spacing 0.8x0.8x2.5 mm')
  if case['pipeline'] == 'photo2d':
    return (f'{case["num_images"]} JPEGs {_x(case["photo_size"])} -> '
            f'{case["size"]}², batch {case["batch"]}, unetpp recipe '
            'augmentation')
  return (f'synthetic3d, {case["num_images"]} volumes {_x(case["volume"])}x4'
          f' held in memory -> patches {_x(case["patch"])}, batch {case["batch"]}, unet3d '
          'recipe augmentation')


def _small(values, divisor: int, floor: int) -> list[int]:
  return [max(floor, int(v) // divisor) for v in values]


def shrink(case: dict) -> dict:
  """Returns `case` at toy size (a dry run: same code paths, seconds each)."""
  c = dict(case, repeats=2, units_per_block=1)
  if 'features' in c:
    c['features'] = _small(c['features'], 8, 2)
  if c['kind'] == 'train':
    c['spatial'] = [32] * len(c['spatial'])  # 5 levels: 2 at the bottom.
    c['batch'] = c['items_per_unit'] = 1
  elif c['kind'] == 'sliding_window':
    c['volume'], c['patch'] = [40, 48, 48], [32, 32, 32]
  elif c['kind'] == 'hd95':
    c['shape'] = [32, 32, 16]
  elif c['pipeline'] == 'photo2d':
    c.update(num_images=8, photo_size=[96, 64], size=32, batch=4,
             items_per_unit=4)
  else:
    c.update(num_images=2, volume=[16, 32, 32], patch=[16, 16, 16], batch=2)
  return dict(c, setting='[dry run] ' + describe(c))
