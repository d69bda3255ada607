"""Building blocks shared by every backbone and head.

BatchNorm follows PyTorch's defaults (momentum 0.1 there is 0.9 here, eps 1e-5)
so that converted ImageNet checkpoints behave identically. Under a global-view
`jax.jit` the batch statistics reduce over the whole sharded batch, i.e. the
normalisation is synchronised across devices without any extra code.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def batch_norm(train: bool, dtype: Dtype, name: str | None = None,
               zero_init: bool = False) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                      epsilon=BN_EPSILON, dtype=dtype, name=name,
                      scale_init=nn.initializers.zeros if zero_init
                      else nn.initializers.ones)


def maybe_remat(block_class, remat: bool):
  """`block_class`, or its rematerialised version when `remat`.

  A rematerialised block keeps only its input for the backward pass and
  recomputes its activations there: about one more forward pass of compute
  for much less activation memory (HRNet-48 at large batches). The block must
  be called as `block(x, train)`, `train` positional.
  """
  return nn.remat(block_class, static_argnums=(2,)) if remat else block_class


class ConvBN(nn.Module):
  """Conv (no bias) -> BatchNorm -> optional ReLU, NHWC."""
  features: int
  kernel: int = 3
  stride: int = 1
  relu: bool = True
  zero_init_bn: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    pad = self.kernel // 2
    x = nn.Conv(self.features, (self.kernel, self.kernel), (self.stride, self.stride),
                padding=[(pad, pad), (pad, pad)], use_bias=False, dtype=self.dtype,
                kernel_init=nn.initializers.kaiming_normal(), name='conv')(x)
    x = batch_norm(train, self.dtype, 'bn', self.zero_init_bn)(x)
    return nn.relu(x) if self.relu else x


def resize_to(x, height: int, width: int, method: str = 'bilinear'):
  """Resizes NHWC `x` spatially (align_corners=False, like F.interpolate)."""
  if x.shape[1:3] == (height, width):
    return x
  return jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), method=method)
