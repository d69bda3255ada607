"""InvPT's decoder (Ye and Xu, ECCV 2022) on a plain ViT: framework 'invpt'.

Follows prismformore/Multi-Task-Transformer, InvPT/models/transformer_net.py,
transformers/transformer_decoder.py and transformers/invpt.py (TransformerNet
with its 'mlp' heads), NHWC. The backbone must return four stride-16 maps:
the ViT with `pyramid='none'` (`backbone_kwargs` below), i.e. the tokens after
the blocks ending the first three quarters of the depth (6/12/18 of ViT-L's
24, as InvPT's `select_list`; 3/6/9 of 12) and the normed output of the last.

  1. Backbone skips: tap 1 -> 3x3 stride-2 transposed conv to C/4 channels
     (stride 8), tap 2 -> 3x3 conv to C/2 (stride 16). InvPT's third
     `scale_embed` (tap 3 -> C) feeds nothing and is not built.
  2. The last tap, bilinearly resized to stride 32 (no antialiasing, as
     F.interpolate), goes through each task's preliminary decoder (two 3x3
     conv-BN-ReLU, dim -> dim -> D) and a 1x1 intermediate head; `mix_proj`
     (1x1 conv) maps [feature, intermediate prediction] to C = D + P channels.
  3. Three UP-Transformer stages at strides 32, 16, 8 with C, C/2, C/4
     channels per task. Stages 2-3 first apply each task's UpEmbed (x2
     bilinear, two 3x3 dilation-2 conv-BN-ReLU) and add the skip of step 1.
     Each stage is one pre-norm block over all tasks' tokens (LayerNorm and
     q/k/v Linears shared by the tasks): queries from each task's depthwise
     3x3 stride-2 conv + BN, keys/values from each task's average pool (kernel
     = stride 2, 4, 8, so every stage has tasks x H/64 x W/64 keys), logits
     scaled by C ** -0.5 (the full width, not the head width), and from stage
     2 on the previous stage's logits, upsampled x2 per task, concatenated on
     the head axis and fused by a 1x1 conv (`fuse_attn`). The attention output
     is upsampled back to the stage's resolution; MLP ratio 4, exact GELU.
  4. Each stage's tokens are normed (LayerNorm over all tasks' channels), each
     task's slice is mapped to C by a 1x1 conv (stages 2-3), upsampled to
     stride 4 and the three are summed; per task a 3x3 conv-BN-ReLU (the
     task's feature) and a 1x1 conv head, upsampled to the input.

The intermediate predictions are sown as '<task>/intermediate' auxiliary
predictions (InvPT supervises them with the tasks' losses).

Widths: InvPT's ViT-L (dim 1024) uses D = 512 (`embed_dim`) and P = 64
(`PRED_OUT_NUM_CONSTANT`). Other backbones keep the ratios: D = dim / 2 and
P = dim / 16 (ViT-B: 384 + 48 = 432, ViT-S: 192 + 24 = 216). The input size,
after the ViT's padding to a multiple of 16, must be a multiple of 64, as in
InvPT (its attention reshapes assume it).

LayerNorm eps is 1e-5 here (torch's default) and 1e-6 in the ViT. Every
module is named after InvPT's, so `convert.convert_invpt_decoder_state_dict`
maps a state_dict onto it.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmtdp_jax.models.backbones import vit
from cmtdp_jax.models.frameworks import sow_aux_predictions, to_input_resolution
from cmtdp_jax.models.layers import Dtype, batch_norm, resize_to

LAYER_NORM_EPSILON = 1e-5
NUM_STAGES = 3
NUM_HEADS = 2
MLP_RATIO = 4.0
KV_STRIDES = (2, 4, 8)
_DENSE_INIT = nn.initializers.truncated_normal(0.02)


def resize_bilinear(x, height: int, width: int):
  """F.interpolate(bilinear, align_corners=False) without antialiasing, also when shrinking."""
  if x.shape[1:3] == (height, width):
    return x
  return jax.image.resize(x, (x.shape[0], height, width, *x.shape[3:]), 'bilinear',
                          antialias=False)


def layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=dtype, name=name)


def conv(features: int, kernel: int, dtype: Dtype, name: str, bias: bool = True,
         dilation: int = 1) -> nn.Conv:
  pad = dilation * (kernel // 2)
  return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)),
                 kernel_dilation=dilation, use_bias=bias, dtype=dtype, name=name)


class ConvBlock(nn.Module):
  """`transformer_decoder.ConvBlock`: 3x3 conv (no bias) `conv`, BN `bn1`, ReLU."""
  features: int
  dilation: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = conv(self.features, 3, self.dtype, 'conv', bias=False, dilation=self.dilation)(x)
    return nn.relu(batch_norm(train, self.dtype, 'bn1')(x))


class UpEmbed(nn.Module):
  """`invpt.UpEmbed`: x2 bilinear, then two 3x3 dilation-2 conv-BN-ReLU (`proj_1/2`,
  `proj_4/5` in InvPT's Sequential numbering)."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = resize_to(x, 2 * x.shape[1], 2 * x.shape[2])
    for conv_index in (1, 4):
      x = conv(self.features, 3, self.dtype, f'proj_{conv_index}', bias=False, dilation=2)(x)
      x = nn.relu(batch_norm(train, self.dtype, f'proj_{conv_index + 1}')(x))
    return x


class SelfAttention(nn.Module):
  """`invpt.SelfAttention` with InvPT's settings ('dw_bn' queries, 'avg' keys/values).

  Takes the tasks' normed maps, returns the attention output at the query
  resolution (half the input's) per task, and the fused logits (the message
  for the next stage).
  """
  num_heads: int
  kv_stride: int
  fuse: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, maps: Sequence, message, train: bool):
    batch, height, width, dim = maps[0].shape
    tasks = len(maps)
    queries, keys = [], []
    for i, x in enumerate(maps):
      q = nn.Conv(dim, (3, 3), (2, 2), padding=((1, 1), (1, 1)), feature_group_count=dim,
                  use_bias=False, dtype=self.dtype, name=f'conv_proj_q_{i}_conv')(x)
      queries.append(batch_norm(train, self.dtype, f'conv_proj_q_{i}_bn')(q))
      s = self.kv_stride  # AvgPool2d(kernel=stride): the input size is a multiple of it
      keys.append(x.reshape(batch, height // s, s, width // s, s, dim).mean(axis=(2, 4)))
    qh, qw = queries[0].shape[1:3]
    flat = lambda xs: jnp.concatenate([x.reshape(batch, -1, dim) for x in xs], axis=1)
    heads = lambda t: t.reshape(*t.shape[:2], self.num_heads, dim // self.num_heads)
    dense = lambda name: nn.Dense(dim, dtype=self.dtype, kernel_init=_DENSE_INIT, name=name)
    q = heads(dense('proj_q')(flat(queries)))
    kv = flat(keys)
    k, v = heads(dense('proj_k')(kv)), heads(dense('proj_v')(kv))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    logits = logits * dim ** -0.5
    if self.fuse:
      # The previous stage's logits: per task (qh/2, qw/2) queries, upsampled x2.
      previous = message.reshape(batch, self.num_heads, tasks, qh // 2, qw // 2, -1)
      previous = jax.image.resize(previous, (*previous.shape[:3], qh, qw, previous.shape[-1]),
                                  'bilinear', antialias=False)
      both = jnp.concatenate([logits, previous.reshape(logits.shape)], axis=1)
      # fuse_attn: a 1x1 Conv2d over the 2 x heads channels.
      logits = nn.Dense(self.num_heads, param_dtype=jnp.float32, dtype=jnp.float32,
                        name='fuse_attn')(jnp.moveaxis(both, 1, -1))
      logits = jnp.moveaxis(logits, -1, 1)
    weights = nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(batch, -1, dim)
    out = dense('proj')(out)
    return [out[:, i * qh * qw:(i + 1) * qh * qw].reshape(batch, qh, qw, dim)
            for i in range(tasks)], logits


class InvPTBlock(nn.Module):
  """`invpt.InvPTBlock`: x + up(attn(norm1(x))), then x + mlp(norm2(x)), all tasks at once."""
  num_heads: int
  kv_stride: int
  fuse: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, maps: Sequence, message, train: bool):
    height, width, dim = maps[0].shape[1:]
    norm1 = layer_norm(self.dtype, 'norm1')  # one LayerNorm for every task's tokens
    normed = [norm1(x) for x in maps]
    attended, message = SelfAttention(self.num_heads, self.kv_stride, self.fuse, self.dtype,
                                      name='attn')(normed, message, train)
    norm2 = layer_norm(self.dtype, 'norm2')
    mlp = vit.Mlp(int(dim * MLP_RATIO), self.dtype, name='mlp')
    out = []
    for x, a in zip(maps, attended):
      x = x + resize_to(a, height, width)
      out.append(x + mlp(norm2(x)))
    return out, message


class InvPT(nn.Module):
  """InvPT (Ye and Xu, ECCV 2022): ViT taps + the multi-task UP-Transformer decoder.

  Attributes:
    backbone: returns four stride-16 maps (a ViT with pyramid='none').
    task_channels: ((task, output channels), ...) in a fixed order.
    head_channels: InvPT's `embed_dim` D (the preliminary decoders' width);
      None = backbone dim // 2 (InvPT's 512 for ViT-L).
    prediction_channels: InvPT's `PRED_OUT_NUM_CONSTANT` P; None = dim // 16.
  """
  backbone: nn.Module
  task_channels: Sequence[tuple[str, int]]
  head_channels: int | None = None
  prediction_channels: int | None = None
  dtype: Dtype = jnp.float32

  backbone_kwargs: ClassVar[dict] = {'pyramid': 'none'}

  @nn.compact
  def __call__(self, images, train: bool = False):
    taps = self.backbone(images, train=train)
    if len(taps) != 4 or len({t.shape for t in taps}) != 1:
      raise ValueError('invpt needs four maps of one shape (a ViT backbone with '
                       f"pyramid='none'); got {[t.shape for t in taps]}")
    dim = taps[0].shape[-1]
    h16, w16 = taps[0].shape[1:3]
    if h16 % 4 or w16 % 4:
      raise ValueError(f'invpt needs an input size that is a multiple of 64; got '
                       f'{images.shape[1:3]} (stride-16 maps {h16}x{w16})')
    embed = self.head_channels or dim // 2
    width = embed + (self.prediction_channels or dim // 16)
    if width % (NUM_HEADS * 2 ** (NUM_STAGES - 1)):
      raise ValueError(f'invpt decoder width D + P = {width} must be a multiple of '
                       f'{NUM_HEADS * 2 ** (NUM_STAGES - 1)} (heads x 2 ** (stages - 1))')
    widths = tuple(width // 2 ** i for i in range(NUM_STAGES))
    skips = {
        2: nn.ConvTranspose(widths[2], (3, 3), (2, 2), padding=((1, 2), (1, 2)),
                            dtype=self.dtype, name='scale_embed_0')(taps[0]),
        1: conv(widths[1], 3, self.dtype, 'scale_embed_1')(taps[1]),
    }
    x = resize_bilinear(taps[3], h16 // 2, w16 // 2)

    tasks = [t for t, _ in self.task_channels]
    maps, intermediate = [], {}
    for task, channels in self.task_channels:
      f = ConvBlock(dim, dtype=self.dtype, name=f'preliminary_decoder_{task}_0')(x, train)
      f = ConvBlock(embed, dtype=self.dtype, name=f'preliminary_decoder_{task}_1')(f, train)
      intermediate[task] = conv(channels, 1, self.dtype, f'intermediate_head_{task}')(f)
      maps.append(conv(width, 1, self.dtype, f'mix_proj_{task}')(
          jnp.concatenate([f, intermediate[task].astype(f.dtype)], axis=-1)))
    sow_aux_predictions(self, {f'{t}/intermediate': p for t, p in intermediate.items()}, images)

    message, summed = None, [0.0] * len(tasks)
    for stage in range(NUM_STAGES):
      if stage > 0:
        maps = [UpEmbed(widths[stage], self.dtype, name=f'stage{stage}_patch_embed_{i}')(m, train)
                + skips[stage] for i, m in enumerate(maps)]
      maps, message = InvPTBlock(NUM_HEADS, KV_STRIDES[stage], stage > 0, self.dtype,
                                 name=f'stage{stage}_block')(maps, message, train)
      normed = layer_norm(self.dtype, f'norm_mts_{stage}')(jnp.concatenate(maps, axis=-1))
      for i, task in enumerate(tasks):
        y = normed[..., i * widths[stage]:(i + 1) * widths[stage]]
        if stage > 0:
          y = conv(width, 1, self.dtype, f'redu_chan_{stage}_{i}')(y)
        summed[i] = summed[i] + resize_to(y, 4 * h16, 4 * w16)

    predictions, features = {}, {}
    for i, (task, channels) in enumerate(self.task_channels):
      y = conv(width, 3, self.dtype, f'mt_proj_{task}_0')(summed[i])
      features[task] = nn.relu(batch_norm(train, self.dtype, f'mt_proj_{task}_1')(y))
      raw = conv(channels, 1, self.dtype, f'heads_{task}_linear_pred')(features[task])
      predictions[task] = to_input_resolution(raw, images)
    return predictions, features
