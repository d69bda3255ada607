"""The regularizer comparison's setting (README.md): the partial-label study's synthetic world
at 96x96, unchanged, so that its lambda-0 and lambda-1 records pair with this study's runs.

  python -m cmtdp_jax.studies.tool \
      --config cmtdp_jax/studies/regularizer_comparison/config.py ...

MTPSL's and JTR's networks take 'scaled' widths (regularizers.network_widths): SegNet's ratios
ending at the compact backbone's bottleneck, 16-32-64-128-128.
"""

from cmtdp_jax.studies.partial_labels import config as partial_labels_config


def get_config(variant: str = ''):
  return partial_labels_config.get_config(variant)
