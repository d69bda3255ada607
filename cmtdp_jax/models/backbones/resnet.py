"""ResNet-50/101 in torchvision's layout, returning the four stage outputs.

Submodule names are torchvision's module paths with every numeric index glued
to its parent by '_' ('layer3.2.conv2' -> 'layer3_2/conv2'), so ImageNet
checkpoints convert mechanically (see `cmtdp_jax.models.convert`). The blocks
are shared with HRNet, which uses the same BasicBlock/Bottleneck.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from cmtdp_jax.models.layers import Dtype, batch_norm, maybe_remat

# torchvision and HRNet initialise convs with kaiming_normal_(mode='fan_out').
_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def conv(features: int, kernel: int, stride: int = 1, dilation: int = 1,
         dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Conv:
  """Bias-free conv padded like PyTorch's `padding=dilation * (kernel // 2)`."""
  pad = dilation * (kernel // 2)
  return nn.Conv(features, (kernel, kernel), (stride, stride),
                 padding=[(pad, pad), (pad, pad)], kernel_dilation=(dilation, dilation),
                 use_bias=False, dtype=dtype, kernel_init=_CONV_INIT, name=name)


class BasicBlock(nn.Module):
  """Two 3x3 convs with a residual; `downsample` adds the 1x1 projection."""
  planes: int
  stride: int = 1
  downsample: bool = False
  dtype: Dtype = jnp.float32

  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x, train: bool):
    y = conv(self.planes, 3, self.stride, dtype=self.dtype, name='conv1')(x)
    y = nn.relu(batch_norm(train, self.dtype, 'bn1')(y))
    y = conv(self.planes, 3, dtype=self.dtype, name='conv2')(y)
    y = batch_norm(train, self.dtype, 'bn2')(y)
    return nn.relu(y + _shortcut(self, x, train))


class Bottleneck(nn.Module):
  """1x1-3x3-1x1 block, stride and dilation on the 3x3 (ResNet v1.5)."""
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: Dtype = jnp.float32

  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x, train: bool):
    y = conv(self.planes, 1, dtype=self.dtype, name='conv1')(x)
    y = nn.relu(batch_norm(train, self.dtype, 'bn1')(y))
    y = conv(self.planes, 3, self.stride, self.dilation, dtype=self.dtype, name='conv2')(y)
    y = nn.relu(batch_norm(train, self.dtype, 'bn2')(y))
    y = conv(self.planes * self.expansion, 1, dtype=self.dtype, name='conv3')(y)
    y = batch_norm(train, self.dtype, 'bn3')(y)
    return nn.relu(y + _shortcut(self, x, train))


def _shortcut(block, x, train: bool):
  """Identity, or torchvision's `downsample` = Sequential(conv1x1, BN)."""
  if not block.downsample:
    return x
  x = conv(block.planes * block.expansion, 1, block.stride, dtype=block.dtype,
           name='downsample_0')(x)
  return batch_norm(train, block.dtype, 'downsample_1')(x)


class ResNet(nn.Module):
  """torchvision ResNet without `fc`; outputs of layer1..layer4 (NHWC).

  `dilated=True` is torchvision's replace_stride_with_dilation=[False, True,
  True]: layer3/layer4 keep stride 8 and dilate instead (output stride 8).
  `remat=True` recomputes every bottleneck in the backward pass
  (`layers.maybe_remat`).
  """
  layers: tuple[int, ...]
  dilated: bool = False
  dtype: Dtype = jnp.float32
  remat: bool = False

  @property
  def feature_channels(self) -> tuple[int, ...]:
    return tuple(64 * 2 ** i * Bottleneck.expansion for i in range(4))

  @property
  def feature_strides(self) -> tuple[int, ...]:
    return (4, 8, 8, 8) if self.dilated else (4, 8, 16, 32)

  @nn.compact
  def __call__(self, images, train: bool):
    x = conv(64, 7, 2, dtype=self.dtype, name='conv1')(images)
    x = nn.relu(batch_norm(train, self.dtype, 'bn1')(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    bottleneck = maybe_remat(Bottleneck, self.remat)
    inplanes, dilation, outputs = 64, 1, []
    for index, blocks in enumerate(self.layers):
      planes, stride = 64 * 2 ** index, 1 if index == 0 else 2
      first_dilation = dilation
      if self.dilated and index >= 2:
        dilation, stride = dilation * stride, 1
      for block in range(blocks):
        x = bottleneck(
            planes, stride if block == 0 else 1,
            first_dilation if block == 0 else dilation,
            downsample=block == 0 and (stride != 1 or inplanes != planes * Bottleneck.expansion),
            dtype=self.dtype, name=f'layer{index + 1}_{block}')(x, train)
        inplanes = planes * Bottleneck.expansion
      outputs.append(x)
    return outputs


def resnet50(dtype: Dtype = jnp.float32, dilated: bool = False, remat: bool = False) -> ResNet:
  return ResNet((3, 4, 6, 3), dilated=dilated, dtype=dtype, remat=remat)


def resnet101(dtype: Dtype = jnp.float32, dilated: bool = False, remat: bool = False) -> ResNet:
  return ResNet((3, 4, 23, 3), dilated=dilated, dtype=dtype, remat=remat)
