"""Model registry: `get_model(model_config, tasks, num_classes)` builds a framework.

ImageNet weights are imported by `models.convert`.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from cmtdp_jax import tasks as tasks_lib
from cmtdp_jax.models import frameworks, invpt
from cmtdp_jax.models.backbones import get_backbone

FRAMEWORKS = {
    'baseline': frameworks.MultiTaskBaseline,
    'hrnet_head': frameworks.HRNetHead,
    'padnet': frameworks.PADNet,
    'mtinet': frameworks.MTINet,
    'single_task': frameworks.SingleTask,
    'vit_mt': frameworks.ViTMultiTask,
    'segnet': frameworks.SegNetHeads,
    'invpt': invpt.InvPT,
}

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"config.model.dtype='{name}' is not one of {', '.join(DTYPES)}")
  return DTYPES[name]


def rng_streams(model: nn.Module) -> tuple[str, ...]:
  """The rng streams `model` draws from when training: 'dropout' where its backbone has
  stochastic depth (a ViT's drop_path_rate)."""
  return ('dropout',) if getattr(getattr(model, 'backbone', None), 'drop_path_rate', 0) else ()


def get_model(model_config, task_names: Sequence[str], num_classes: dict[str, int]):
  """Builds the framework named by `model_config.framework` for `task_names`."""
  if model_config.framework not in FRAMEWORKS:
    raise ValueError(f"unknown config.model.framework '{model_config.framework}'; "
                     f"valid: {', '.join(FRAMEWORKS)}")
  dtype = compute_dtype(model_config.dtype)
  options = {}
  if model_config.get('backbone_kwargs_for', '') in ('', model_config.backbone):
    options.update(model_config.get('backbone_kwargs', {}))
  # A framework may need a backbone option (InvPT: the ViT's raw taps, pyramid='none').
  options.update(getattr(FRAMEWORKS[model_config.framework], 'backbone_kwargs', {}))
  if model_config.get('remat'):  # only then: registered backbones need not know the option
    options['remat'] = True
  backbone = get_backbone(model_config.backbone, dtype=dtype, **options)
  task_channels = tuple((t, tasks_lib.get_task(t).num_outputs(num_classes))
                        for t in task_names)
  return FRAMEWORKS[model_config.framework](
      backbone=backbone, task_channels=task_channels,
      head_channels=model_config.get('head_channels'), dtype=dtype)
