"""MTAN's NYUv2 (13 classes, 288x384), split SegNet: the partial-label benchmark, MTPSL's protocol.

  python -m cmtdp_jax.main --config configs/nyuv2_segnet.py --workdir /tmp/nyuv2_full \
      --config.data.manual_dir=/data/nyuv2
  python -m cmtdp_jax.main --config configs/nyuv2_segnet.py:onelabel --workdir /tmp/nyuv2_one \
      --config.data.manual_dir=/data/nyuv2 \
      --config.data.label_mapping=MTPSL/data/nyuv2_settings/onelabel.pth
  python -m cmtdp_jax.main --config configs/nyuv2_segnet.py:randomlabels \
      --workdir /tmp/nyuv2_random --config.data.manual_dir=/data/nyuv2 \
      --config.data.label_mapping=MTPSL/data/nyuv2_settings/randomlabels.pth
  python -m cmtdp_jax.tools.benchmark_report /tmp/nyuv2_one

The split files are read as published (MTPSL, JTR and DiffusionMTL ship the same
bytes; docs/partial_label_benchmark.md). Variants after ':' (comma-separated,
cmtdp_jax/protocol.py): full (default), onelabel, randomlabels; a regularizer: contrastive
(ours), mtpsl or jtr; balanced (DiffusionMTL's loss normalisation instead of MTPSL's).
"""

from cmtdp_jax import protocol


def get_config(variant: str = ''):
  return protocol.partial_label_config('nyuv2_mtan', variant)
