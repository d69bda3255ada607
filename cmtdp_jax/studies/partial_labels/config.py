"""The partial-label study's setting (cmtdp_jax/studies/partial_labels/DESIGN.md): the synthetic
world at 96x96, where the regularizer's sampled pixels are a minority of the decoder map.

  python -m cmtdp_jax.studies.tool --config cmtdp_jax/studies/partial_labels/config.py ...

The model, optimiser and data are those of configs/synthetic.py; only the image size and the
regularizer's sampling change. The compact backbone's decoder features are at stride 4:
24x24 = 576 pixels per image, of which the regularizer samples 32 anchors + 112 candidates,
a quarter (at 64x64 the default samples 64 + 256 of 256 pixels, more than the map has).
"""

from configs import synthetic


def get_config(variant: str = ''):
  config = synthetic.get_config(variant)
  if variant:
    return config  # the smoke variant stays the synthetic smoke test
  config.data.image_size = (96, 96)
  config.data.crop_size = (96, 96)
  config.contrastive.num_anchors = 32
  config.contrastive.pool_size = 112
  return config
