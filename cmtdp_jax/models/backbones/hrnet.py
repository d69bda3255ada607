"""HRNetV2 backbones (stem, layer1, transitions, stage2..4) as in the official
ImageNet models (HRNet-Image-Classification / timm), without the classification
head, returning the four branch outputs at strides 4/8/16/32.

Submodule names are the official module paths with every numeric index glued
to its parent by '_' ('stage3.1.fuse_layers.2.0.1.0' -> 'stage3_1/
fuse_layers_2_0_1_0'), so the official checkpoints convert mechanically.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from cmtdp_jax.models.backbones.resnet import BasicBlock, Bottleneck, conv
from cmtdp_jax.models.layers import Dtype, batch_norm, maybe_remat, resize_to

UPSAMPLE_METHODS = ('bilinear', 'nearest')


class HighResolutionModule(nn.Module):
  """Parallel branches (two or more) of BasicBlocks, then each fuses all others.

  Coarser inputs are 1x1-projected and upsampled, finer ones are reduced by
  chains of stride-2 3x3 convs.
  """
  channels: tuple[int, ...]
  num_blocks: int
  upsample: str = 'bilinear'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, xs: Sequence, train: bool):
    ys = []
    for i, (x, ch) in enumerate(zip(xs, self.channels)):
      for b in range(self.num_blocks):
        x = BasicBlock(ch, dtype=self.dtype, name=f'branches_{i}_{b}')(x, train)
      ys.append(x)
    outputs = []
    for i, ch in enumerate(self.channels):
      total = None
      for j, y in enumerate(ys):
        if j > i:
          y = conv(ch, 1, dtype=self.dtype, name=f'fuse_layers_{i}_{j}_0')(y)
          y = batch_norm(train, self.dtype, f'fuse_layers_{i}_{j}_1')(y)
          y = resize_to(y, *ys[i].shape[1:3], method=self.upsample)
        elif j < i:
          for k in range(i - j):
            last = k == i - j - 1
            y = conv(ch if last else self.channels[j], 3, 2, dtype=self.dtype,
                     name=f'fuse_layers_{i}_{j}_{k}_0')(y)
            y = batch_norm(train, self.dtype, f'fuse_layers_{i}_{j}_{k}_1')(y)
            if not last:
              y = nn.relu(y)
        total = y if total is None else total + y
      outputs.append(nn.relu(total))
    return outputs


class HRNet(nn.Module):
  """HRNetV2 backbone (BOTTLENECK layer1, BASIC blocks in stages 2-4).

  Attributes:
    widths: channels of the four branches, e.g. (18, 36, 72, 144).
    stage1_blocks: bottlenecks in layer1 (64 planes, 256 output channels).
    num_modules: HighResolutionModules in stages 2, 3 and 4.
    num_blocks: BasicBlocks per branch in every module.
    upsample: how the fuse layers upsample coarser branches. 'bilinear'
      (default) resizes to the finer branch's exact size, as the dense
      prediction codebases (HRNet-Semantic-Segmentation, ATRC, MTL-PyTorch) do,
      so any input size works; 'nearest' is the classification model's
      nn.Upsample and is exact only for inputs divisible by 32.
    remat: recompute every layer1 bottleneck and HighResolutionModule in the
      backward pass instead of storing its activations (`layers.maybe_remat`).
  """
  widths: tuple[int, ...]
  stage1_blocks: int
  num_modules: tuple[int, ...]
  num_blocks: int
  upsample: str = 'bilinear'
  dtype: Dtype = jnp.float32
  remat: bool = False

  @property
  def feature_channels(self) -> tuple[int, ...]:
    return tuple(self.widths)

  @property
  def feature_strides(self) -> tuple[int, ...]:
    return (4, 8, 16, 32)

  def _transition(self, xs, in_channels, channels, name: str, train: bool):
    """Adapts the existing branches' channels and spawns the new branches.

    A new branch is made from the previous stage's coarsest output by a chain
    of stride-2 3x3 convs (the official code's `_make_transition_layer`).
    """
    outputs = []
    for i, ch in enumerate(channels):
      if i < len(in_channels):
        x = xs[i]
        if ch != in_channels[i]:
          x = conv(ch, 3, dtype=self.dtype, name=f'{name}_{i}_0')(x)
          x = nn.relu(batch_norm(train, self.dtype, f'{name}_{i}_1')(x))
      else:
        x = xs[-1]
        for k in range(i + 1 - len(in_channels)):
          out = ch if k == i - len(in_channels) else in_channels[-1]
          x = conv(out, 3, 2, dtype=self.dtype, name=f'{name}_{i}_{k}_0')(x)
          x = nn.relu(batch_norm(train, self.dtype, f'{name}_{i}_{k}_1')(x))
      outputs.append(x)
    return outputs

  @nn.compact
  def __call__(self, images, train: bool):
    if self.upsample not in UPSAMPLE_METHODS:
      raise ValueError(f"HRNet upsample='{self.upsample}' is not one of {UPSAMPLE_METHODS}")
    x = conv(64, 3, 2, dtype=self.dtype, name='conv1')(images)
    x = nn.relu(batch_norm(train, self.dtype, 'bn1')(x))
    x = conv(64, 3, 2, dtype=self.dtype, name='conv2')(x)
    x = nn.relu(batch_norm(train, self.dtype, 'bn2')(x))
    bottleneck = maybe_remat(Bottleneck, self.remat)
    module = maybe_remat(HighResolutionModule, self.remat)
    for b in range(self.stage1_blocks):
      x = bottleneck(64, downsample=b == 0, dtype=self.dtype, name=f'layer1_{b}')(x, train)
    xs, in_channels = [x], (64 * Bottleneck.expansion,)
    for stage, modules in enumerate(self.num_modules, start=2):
      channels = tuple(self.widths[:stage])
      xs = self._transition(xs, in_channels, channels, f'transition{stage - 1}', train)
      for m in range(modules):
        xs = module(channels, self.num_blocks, self.upsample, self.dtype,
                    name=f'stage{stage}_{m}')(xs, train)
      in_channels = channels
    return xs


def hrnet_w18_small_v2(dtype: Dtype = jnp.float32, upsample: str = 'bilinear',
                       remat: bool = False) -> HRNet:
  return HRNet((18, 36, 72, 144), stage1_blocks=2, num_modules=(1, 3, 2), num_blocks=2,
               upsample=upsample, dtype=dtype, remat=remat)


def hrnet_w48(dtype: Dtype = jnp.float32, upsample: str = 'bilinear',
              remat: bool = False) -> HRNet:
  return HRNet((48, 96, 192, 384), stage1_blocks=4, num_modules=(1, 4, 3), num_blocks=4,
               upsample=upsample, dtype=dtype, remat=remat)
