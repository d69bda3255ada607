"""Backbones selected by name.

Every backbone is a linen Module called as `module(images_nhwc, train=...)`
that returns a list of NHWC feature maps, finest first, and exposes their
channel counts as `module.feature_channels`.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmtdp_jax.models.backbones import compact, hrnet, resnet, segnet, vit

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    'compact': compact.CompactBackbone,
    'hrnet_w18_small_v2': hrnet.hrnet_w18_small_v2,
    'hrnet_w48': hrnet.hrnet_w48,
    'resnet50': resnet.resnet50,
    'resnet101': resnet.resnet101,
    'segnet': segnet.segnet,
    'vit_s16': vit.vit_s16,
    'vit_b16': vit.vit_b16,
    'vit_l16': vit.vit_l16,
}


def register_backbone(name: str, constructor: Callable[..., nn.Module] | None = None):
  """Adds `constructor(dtype=..., **kwargs) -> Module` as `name`.

  Usable as `register_backbone(name, fn)` or as the decorator
  `@register_backbone(name)`.
  """
  def add(fn):
    if name in BACKBONES:
      raise ValueError(f"backbone '{name}' is already registered")
    BACKBONES[name] = fn
    return fn
  return add if constructor is None else add(constructor)


def get_backbone(name: str, dtype=jnp.float32, **kwargs) -> nn.Module:
  """Builds backbone `name` computing in `dtype` (parameters stay float32)."""
  if name not in BACKBONES:
    raise ValueError(f"unknown backbone '{name}'; valid: {', '.join(sorted(BACKBONES))}")
  try:
    return BACKBONES[name](dtype=dtype, **kwargs)
  except TypeError as e:
    raise ValueError(f"backbone '{name}' does not take the options {kwargs}: {e}") from e


def count_params(name: str, **kwargs) -> int:
  """Number of trainable parameters of backbone `name`, without running it."""
  module = get_backbone(name, **kwargs)
  shapes = jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  return sum(leaf.size for leaf in jax.tree.leaves(shapes['params']))
