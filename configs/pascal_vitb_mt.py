"""PASCAL-Context, ViT-B/16, vit_mt decoder; TaskPrompter's schedule (protocol.py).

  python -m cmtdp_jax.main --config configs/pascal_vitb_mt.py \
      --workdir /tmp/pascal_vitb_mt --config.data.manual_dir=/data/PASCAL_MT \
      --config.model.pretrained=vit_b16_384.npz

`vit_b16_384.npz`: timm's `vit_base_patch16_384` converted by `python -m
cmtdp_jax.tools.convert_weights` (README, "Models"). 40k iterations of batch 8
(TaskPrompter: 2 per GPU on 4), Adam lr 2e-5, weight decay 1e-6, poly decay,
gradients clipped to global norm 10; the ATRC protocol's tasks, augmentation,
loss weights and evaluation.

Variants after ':' (see cmtdp_jax/protocol.py): contrastive, single_task=<task>.
"""

from cmtdp_jax import protocol


def get_config(variant: str = ''):
  return protocol.protocol_config('pascal_context', 'vit_b16', 'vit_mt', variant,
                                  recipe='taskprompter')
