"""A small four-scale residual backbone for the synthetic world and tests.

It has the same output contract as HRNet (NHWC maps at strides 4/8/16/32), so
every head and framework runs on it unchanged, but it trains in minutes on a
CPU. Width doubles at every scale, like ResNet.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from cmtdp_jax.models.layers import ConvBN, Dtype, maybe_remat


class BasicBlock(nn.Module):
  """Two 3x3 ConvBN with an identity (or 1x1 projection) shortcut."""
  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = ConvBN(self.features, 1, self.stride, relu=False, dtype=self.dtype,
                        name='downsample')(x, train)
    y = ConvBN(self.features, 3, self.stride, dtype=self.dtype, name='conv1')(x, train)
    y = ConvBN(self.features, 3, relu=False, zero_init_bn=True, dtype=self.dtype,
               name='conv2')(y, train)
    return nn.relu(y + shortcut)


class CompactBackbone(nn.Module):
  """Stem to stride 4, then one stage per scale with `blocks` BasicBlocks."""
  width: int = 16
  blocks: int = 1
  dtype: Dtype = jnp.float32
  remat: bool = False  # recompute each BasicBlock in the backward pass

  @property
  def feature_channels(self) -> tuple[int, ...]:
    return tuple(self.width * 2 ** i for i in range(4))

  @nn.compact
  def __call__(self, images, train: bool):
    x = ConvBN(self.width, 3, 2, dtype=self.dtype, name='stem1')(images, train)
    x = ConvBN(self.width, 3, 2, dtype=self.dtype, name='stem2')(x, train)
    outputs = []
    block_class = maybe_remat(BasicBlock, self.remat)
    for scale, channels in enumerate(self.feature_channels):
      for block in range(self.blocks):
        stride = 2 if scale > 0 and block == 0 else 1
        x = block_class(channels, stride, self.dtype,
                       name=f'stage{scale + 1}_block{block + 1}')(x, train)
      outputs.append(x)
    return outputs
