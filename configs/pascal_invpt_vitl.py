"""PASCAL-Context, InvPT on ViT-L/16 with InvPT's recipe (protocol.py, `INVPT`).

Train (ImageNet weights: timm's `vit_large_patch16_384` converted by `python -m
cmtdp_jax.tools.convert_weights --arch vit_l16`; its 24x24 position grid is resized once
to 32x32, as InvPT does):

  python -m cmtdp_jax.main --config configs/pascal_invpt_vitl.py \
      --workdir /tmp/pascal_invpt --config.data.manual_dir=/data/PASCAL_MT \
      --config.model.pretrained=vit_l16_384.npz

Evaluate InvPT's released PASCAL-Context checkpoint (InvPT/README.md), converted once:

  python -m cmtdp_jax.tools.convert_weights --framework invpt --arch vit_l16 \
      --src InvPT_pascal_vitLp16.pth --dst invpt_pascal.npz
  python -m cmtdp_jax.main --config configs/pascal_invpt_vitl.py --mode=eval \
      --workdir /tmp/pascal_invpt_published --config.data.manual_dir=/data/PASCAL_MT \
      --config.model.weights=invpt_pascal.npz

InvPT reports for it (README, last iteration): semseg mIoU 79.91, human parts mIoU 68.54,
saliency maxF 84.38, normals mean error 13.90, odsF 72.90. Our saliency maxF thresholds the
predicted probability (ATRC's); InvPT's evaluation applies a sigmoid to its softmax
probability again (docs/models.md), so the two maxF may differ slightly. 40k iterations of batch
6, Adam lr 2e-5, weight decay 1e-6, poly decay, drop path 0.15, 512x512 train and test;
the ATRC protocol's tasks (in InvPT's order), augmentation, loss weights and evaluation.

Variants after ':' (see cmtdp_jax/protocol.py): contrastive, single_task=<task>.
"""

from cmtdp_jax import protocol


def get_config(variant: str = ''):
  return protocol.protocol_config('pascal_context', 'vit_l16', 'invpt', variant,
                                  recipe='invpt')
