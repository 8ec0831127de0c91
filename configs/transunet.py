"""TransUNet (R50-ViT-B/16) on 256x256 skin-lesion images and its CPU variant.

Full recipe (GPU/TPU; seed 002: bf16, batch 16, 20 epochs, AdamW 1e-4,
Dice+BCE 0.5/0.5); the model is the paper's R50-ViT-B/16, ~105M parameters,
a 16x16 token grid at 256x256:

    python -m medseg_jax.main --config=configs/transunet.py --workdir=runs/transunet

CPU variant, the same recipe shrunk to finish in minutes on a laptop: a
ResNet of basic units at widths 8..64 and a 2-layer ViT (hidden 64, 4 heads)
on the 4x4 bottleneck of 64x64 images:

    python -m medseg_jax.main --config=configs/transunet.py:cpu --workdir=runs/transunet_cpu
"""

from configs import default


def get_config(arg=None):
  """Returns the TransUNet config; `arg='cpu'` gives the laptop variant."""
  config = default.get_config()
  model = config.model
  model.name = 'transunet'
  # R50 root + stages 1-3 (3, 4, 9 bottleneck units), GroupNorm as in the
  # paper's ResNet; decoder channels derive from `features` (16, 64, 128, 256).
  model.features = (64, 256, 512, 1024)
  model.stage_blocks = (3, 4, 9)
  model.block = 'bottleneck'
  model.norm = 'group'
  model.upsample = 'linear'
  # ViT-B on 1x1 patches of the 1/16 map ("/16" in R50-ViT-B/16).
  model.hidden_size = 768
  model.num_layers = 12
  model.num_heads = 12
  model.mlp_dim = 3072
  model.vit_patch_size = 1
  model.vit_dropout_rate = 0.1
  model.attention_dropout_rate = 0.0
  # Derived when left neutral: decoder channels from `features`, the token-map
  # conv at twice the deepest decoder channels, position embeddings for the
  # token grid of the training image size (interpolated for other sizes).
  model.decoder_features = ()
  model.head_channels = 0
  model.pos_embed_grid = ()
  if arg == 'cpu':
    default.shrink_for_cpu(config)  # 64x64 images, features (8, 16, 32, 64).
    model.stage_blocks = (1, 1, 1)
    model.block = 'basic'
    model.hidden_size = 64
    model.num_layers = 2
    model.num_heads = 4
    model.mlp_dim = 256
  elif arg not in (None, ''):
    raise ValueError(f"Unknown config variant {arg!r}; use ':cpu' or nothing.")
  return config
