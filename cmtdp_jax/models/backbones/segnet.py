"""MTAN's split SegNet: the shared encoder-decoder of MTPSL's NYUv2 model.

After `SegNet` (type 'standard') of VICO-UoE/MTPSL `model/segnet_mtl.py`, which
is lorenmt/mtan's split SegNet: five encoder stages (a 3x3 conv-BN-ReLU
`encoder_block`, then one, or from the third stage on two, more in
`conv_block_enc`; 2x2 max-pool keeping the argmax), and five decoder stages in
reverse (2x2 max-unpool to the stored argmax positions, `decoder_block`,
`conv_block_dec`). Every conv has a bias, as in the reference.

Returns `[decoder output (stride 1, widths[0] channels), bottleneck (the last
max-pool output, stride 32, widths[-1] channels)]`; MTPSL's cross-task
regularizer reads the bottleneck (its `feat[0]`). The task heads are the
`segnet` framework's (`frameworks.SegNetHeads`).

Submodules carry the PyTorch module paths with every index glued by '_'
('conv_block_enc.2.1.0' -> 'conv_block_enc_2_1_0'), so MTPSL/MTAN state_dicts
convert mechanically (`convert.convert_segnet_state_dict`).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from cmtdp_jax.models.layers import Dtype, batch_norm

# The reference initialises every conv with xavier_normal_ (untruncated) and zero bias.
CONV_INIT = nn.initializers.variance_scaling(1.0, 'fan_avg', 'normal')
NUM_POOLS = 5


def max_pool_with_argmax(x):
  """2x2 stride-2 max-pool of NHWC `x` (even H, W) and where each maximum was.

  The position is the window index 0..3 in row-major order (dy * 2 + dx).
  PyTorch's rule (MaxPool2d(return_indices=True)): the window is scanned in
  that order and a value replaces the current maximum only when it is greater
  (or NaN), so the first of equal maxima wins. This matters: windows of ReLU
  zeros are common, and the decoder unpools its own values to these positions.
  The pooled value is selected from that element only, so its gradient
  reaches that element only.
  """
  batch, height, width, channels = x.shape
  windows = x.reshape(batch, height // 2, 2, width // 2, 2, channels)
  pooled = windows[:, :, 0, :, 0]
  argmax = jnp.zeros(pooled.shape, jnp.int32)
  for position in range(1, 4):
    value = windows[:, :, position // 2, :, position % 2]
    greater = (value > pooled) | jnp.isnan(value)
    pooled = jnp.where(greater, value, pooled)
    argmax = jnp.where(greater, position, argmax)
  return pooled, argmax


def max_unpool(x, argmax):
  """Inverse of `max_pool_with_argmax` (PyTorch's MaxUnpool2d(2, 2)): each value
  goes back to its window position, zeros elsewhere."""
  batch, height, width, channels = x.shape
  zero = jnp.zeros((), x.dtype)
  windows = jnp.stack([jnp.where(argmax == position, x, zero) for position in range(4)], axis=3)
  windows = windows.reshape(batch, height, width, 2, 2, channels).transpose(0, 1, 3, 2, 4, 5)
  return windows.reshape(batch, 2 * height, 2 * width, channels)


class SegNet(nn.Module):
  """The split SegNet trunk, NHWC. H and W must be multiples of 32.

  Attributes:
    widths: channels of the five stages (MTAN's 'standard': 64-128-256-512-512).
  """
  widths: Sequence[int] = (64, 128, 256, 512, 512)
  dtype: Dtype = jnp.float32

  @property
  def feature_channels(self) -> tuple[int, ...]:
    return (self.widths[0], self.widths[-1])

  @property
  def feature_strides(self) -> tuple[int, ...]:
    return (1, 2 ** NUM_POOLS)

  def _conv_layer(self, x, features: int, name: str, train: bool):
    """The reference's `conv_layer`: Sequential(Conv2d 3x3 with bias, BN, ReLU) at `name`."""
    x = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                kernel_init=CONV_INIT, name=f'{name}_0')(x)
    return nn.relu(batch_norm(train, self.dtype, f'{name}_1')(x))

  def _conv_block(self, x, features: int, name: str, stage: int, train: bool):
    """`conv_block_enc/dec[stage]`: one conv_layer for stages 0 and 1, two after."""
    if stage < 2:
      return self._conv_layer(x, features, name, train)
    for i in range(2):
      x = self._conv_layer(x, features, f'{name}_{i}', train)
    return x

  def __post_init__(self):
    if len(self.widths) != NUM_POOLS:
      raise ValueError(f'segnet widths must have {NUM_POOLS} entries, got {tuple(self.widths)}')
    super().__post_init__()

  @nn.compact
  def __call__(self, images, train: bool):
    height, width = images.shape[1:3]
    if height % 2 ** NUM_POOLS or width % 2 ** NUM_POOLS:
      raise ValueError(f'segnet input size {height}x{width} must be divisible by '
                       f'{2 ** NUM_POOLS} in height and width (for its {NUM_POOLS} '
                       '2x2 max-poolings)')
    x = images.astype(self.dtype)
    argmaxes = []
    for stage, features in enumerate(self.widths):
      x = self._conv_layer(x, features, f'encoder_block_{stage}', train)
      x = self._conv_block(x, features, f'conv_block_enc_{stage}', stage, train)
      x, argmax = max_pool_with_argmax(x)
      argmaxes.append(argmax)
    bottleneck = x
    # decoder_block[s] maps widths[s] -> widths[s - 1] (stage 0: widths[0] -> widths[0]);
    # conv_block_dec[s] keeps that width.
    for stage in reversed(range(NUM_POOLS)):
      features = self.widths[max(stage - 1, 0)]
      x = max_unpool(x, argmaxes[stage])
      x = self._conv_layer(x, features, f'decoder_block_{stage}', train)
      x = self._conv_block(x, features, f'conv_block_dec_{stage}', stage, train)
    return [x, bottleneck]


def segnet(dtype: Dtype = jnp.float32, widths: Sequence[int] = (64, 128, 256, 512, 512)) -> SegNet:
  return SegNet(widths=tuple(widths), dtype=dtype)

