"""Prints parameter counts (and optionally forward FLOPs) of the model zoo.

  python scripts/count_params.py [--size 256] [--channels 3] [--flops]

Shapes come from jax.eval_shape, so nothing is allocated; `--flops` also
compiles each eval-mode forward (XLA cost analysis, a multiply-add = 2 FLOPs).
Reference points: the classic U-Net (64..1024) has ~31M parameters, UNet++ at
(32..512) ~9M, TransUNet R50-ViT-B/16 ~105M (seed 002; 105.28M in Chen et al.
2021 at 224x224, whose 14x14 position embeddings are 46k fewer than at 256).
"""

import argparse

import ml_collections

from medseg_jax import models

# (label, config.model overrides); the rest is the base config's model.
ZOO = (
    ('unet 64..1024 (classic)', dict(name='unet',
                                     features=(64, 128, 256, 512, 1024))),
    ('unet 32..512', dict(name='unet', features=(32, 64, 128, 256, 512))),
    ('unetpp 32..512 (seed 002)', dict(name='unetpp',
                                       features=(32, 64, 128, 256, 512))),
    ('unetpp 32..512 deep sup.', dict(name='unetpp',
                                      features=(32, 64, 128, 256, 512),
                                      deep_supervision=True)),
    ('unetpp 64..1024', dict(name='unetpp',
                             features=(64, 128, 256, 512, 1024))),
    # The module defaults are the paper's R50-ViT-B/16 (stages 3, 4, 9;
    # ViT-B: hidden 768, 12 layers, 12 heads, MLP 3072, 1x1 patches).
    ('transunet R50-ViT-B/16', dict(name='transunet',
                                    features=(64, 256, 512, 1024),
                                    norm='group', upsample='linear')),
)


def model_config(**overrides) -> ml_collections.ConfigDict:
  """Returns a config.model with the base defaults and `overrides`."""
  cfg = ml_collections.ConfigDict(dict(
      name='unetpp', features=(32, 64, 128, 256, 512), norm='batch',
      dtype='float32', upsample='transpose', residual=False,
      deep_supervision=False, dropout_rate=0.0))
  cfg.update(overrides)
  return cfg


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', type=int, default=256)
  parser.add_argument('--channels', type=int, default=3)
  parser.add_argument('--num_classes', type=int, default=1)
  parser.add_argument('--flops', action='store_true',
                      help='also compile the forward and report GFLOPs')
  args = parser.parse_args()
  shape = (1, args.size, args.size, args.channels)
  print(f'input {shape[1:]}, {args.num_classes} class(es)')
  for label, overrides in ZOO:
    model = models.create_model(model_config(**overrides), args.num_classes)
    if args.flops:
      summary = models.model_summary(model, shape)
      params = summary['params']
      extra = f'  {summary["flops_per_example"] / 1e9:8.2f} GFLOPs/example'
    else:
      params = models.count_params(
          models.abstract_variables(model, shape)['params'])
      extra = ''
    print(f'{label:28s} {params:>12,d} params ({params / 1e6:6.2f}M){extra}')


if __name__ == '__main__':
  main()
