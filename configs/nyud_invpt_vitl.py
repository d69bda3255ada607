"""NYUD-v2, InvPT on ViT-L/16 with InvPT's recipe (protocol.py, `INVPT`).

Train (ImageNet weights: timm's `vit_large_patch16_384` converted by `python -m
cmtdp_jax.tools.convert_weights --arch vit_l16`; its 24x24 position grid is resized once
to 28x36, as InvPT does):

  python -m cmtdp_jax.main --config configs/nyud_invpt_vitl.py \
      --workdir /tmp/nyud_invpt --config.data.manual_dir=/data/NYUD_MT \
      --config.model.pretrained=vit_l16_384.npz

Evaluate InvPT's released NYUD checkpoint (InvPT/README.md), converted once:

  python -m cmtdp_jax.tools.convert_weights --framework invpt --arch vit_l16 \
      --src InvPT_nyud_vitLp16.pth --dst invpt_nyud.npz --img-size 448 576
  python -m cmtdp_jax.main --config configs/nyud_invpt_vitl.py --mode=eval \
      --workdir /tmp/nyud_invpt_published --config.data.manual_dir=/data/NYUD_MT \
      --config.model.weights=invpt_nyud.npz

InvPT reports for it (README, last iteration): semseg mIoU 53.65, depth RMSE 0.5083,
normals mean error 18.68, odsF 77.80 (one user measured 76.8 from the checkpoint,
InvPT issue #6). 40k iterations of batch 6, Adam lr 2e-5, weight decay 1e-6, poly decay,
drop path 0.15, 448x576 train and test (test images padded to it); the ATRC protocol's
tasks (in InvPT's order), augmentation, loss weights and evaluation; edge pos_weight 0.95.

Variants after ':' (see cmtdp_jax/protocol.py): contrastive, single_task=<task>.
"""

from cmtdp_jax import protocol


def get_config(variant: str = ''):
  return protocol.protocol_config('nyud', 'vit_l16', 'invpt', variant, recipe='invpt')
