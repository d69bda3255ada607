"""MTAN's Cityscapes (7 classes, 128x256), split SegNet: the partial-label benchmark, MTPSL's protocol.

  python -m cmtdp_jax.main --config configs/cityscapes_segnet.py --workdir /tmp/cs_full \
      --config.data.manual_dir=/data/cityscapes
  python -m cmtdp_jax.main --config configs/cityscapes_segnet.py:onelabel --workdir /tmp/cs_one \
      --config.data.manual_dir=/data/cityscapes \
      --config.data.label_mapping=MTPSL/data/cityscapes_settings/onelabel.pth
  python -m cmtdp_jax.tools.benchmark_report /tmp/cs_one

MTPSL publishes no random-label file for Cityscapes (docs/partial_label_benchmark.md).
Variants after ':' (comma-separated, cmtdp_jax/protocol.py): full (default), onelabel; a
regularizer: contrastive (ours), mtpsl or jtr; balanced (DiffusionMTL's loss normalisation
instead of MTPSL's).
"""

from cmtdp_jax import protocol


def get_config(variant: str = ''):
  return protocol.partial_label_config('cityscapes_mtan', variant)
