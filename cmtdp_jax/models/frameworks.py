"""Multi-task frameworks: a shared backbone plus task-specific decoders.

Every framework is called as `model.apply(variables, images, train=...)` and
returns `(predictions, features)`, both `{task: array}`: predictions are raw
float32 outputs at the input resolution (what `tasks.Task.compute_loss` and
`tasks.Task.decode` take), features are each task's last decoder feature map
before its prediction layer, the input of the contrastive regularizer.

The baseline and SegNet frameworks sow the backbone's coarsest map as
'shared'/'bottleneck' when that collection is mutable (`sow_bottleneck`; MTPSL's
regularizer reads it). Frameworks with deep supervision (PAD-Net, MTI-Net) also
sow their auxiliary predictions, raw, float32 and at the input resolution, in
one call per forward:
`sow('intermediates', 'aux_predictions', {'<task>/<name>': array, ...})`.
`steps.compute_losses` gives each entry its task's loss and weight. Nothing is
sown unless 'intermediates' is mutable, so inference is unaffected.

Structures follow Multi-Task-Learning-PyTorch (Vandenhende et al., TPAMI 2021),
with the auxiliary tasks equal to the tasks.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cmtdp_jax.models.backbones import segnet, vit
from cmtdp_jax.models.backbones.resnet import BasicBlock, Bottleneck
from cmtdp_jax.models.layers import ConvBN, Dtype, resize_to


def concat_scales(scales: Sequence[Any]):
  """HRNetV2 representation: every map upsampled to the finest one, concatenated."""
  height, width = scales[0].shape[1:3]
  return jnp.concatenate([resize_to(s, height, width) for s in scales], axis=-1)


def to_input_resolution(raw, images):
  """Raw outputs in float32 before the bilinear upsampling, so bf16 adds no error there."""
  return resize_to(raw.astype(jnp.float32), *images.shape[1:3])


def prediction_head(x, task: str, features: int, channels: int, kernel: int, dtype: Dtype,
                    train: bool):
  """ConvBN-ReLU `{task}_head` (the task's feature), then the 1x1 conv `{task}_pred`.

  Called inside a compact method, so both layers belong to the calling module.
  Returns (raw prediction, feature).
  """
  feature = ConvBN(features, kernel, dtype=dtype, name=f'{task}_head')(x, train)
  return nn.Conv(channels, (1, 1), dtype=dtype, name=f'{task}_pred')(feature), feature


def sow_bottleneck(module: nn.Module, coarsest):
  """Sows the backbone's coarsest map as 'shared'/'bottleneck' for a regularizer that
  reads it (MTPSL's f), only when a step asks for that collection (`steps.SHARED`):
  not at init, whose variables stay params and batch_stats."""
  if module.is_mutable_collection('shared') and not module.is_initializing():
    module.sow('shared', 'bottleneck', coarsest)


def sow_aux_predictions(module: nn.Module, raws: Mapping[str, Any], images):
  """Sows deep-supervision outputs `{'<task>/<name>': raw}` at the input resolution."""
  if module.is_mutable_collection('intermediates'):
    module.sow('intermediates', 'aux_predictions',
               {key: to_input_resolution(raw, images) for key, raw in raws.items()})


class MultiTaskBaseline(nn.Module):
  """Shared backbone + one FCN head per task (SPEC section 3, 'baseline').

  All backbone scales are upsampled to the finest one (stride 4) and
  concatenated; each task then has a 3x3 ConvBN-ReLU (its feature) and a 1x1
  prediction conv, upsampled bilinearly to the input size.

  Attributes:
    backbone: module returning a list of NHWC maps, finest first.
    task_channels: ((task, output channels), ...) in a fixed order.
    head_channels: width of each task's feature; None = concat width // 4.
  """
  backbone: nn.Module
  task_channels: Sequence[tuple[str, int]]
  head_channels: int | None = None
  dtype: Dtype = jnp.float32

  kernel: ClassVar[int] = 3
  width_divisor: ClassVar[int] = 4

  @nn.compact
  def __call__(self, images, train: bool = False):
    scales = self.backbone(images, train=train)
    sow_bottleneck(self, scales[-1])
    shared = concat_scales(scales)
    head_channels = self.head_channels or max(shared.shape[-1] // self.width_divisor, 1)
    predictions, features = {}, {}
    for task, channels in self.task_channels:
      raw, features[task] = prediction_head(shared, task, head_channels, channels, self.kernel,
                                            self.dtype, train)
      predictions[task] = to_input_resolution(raw, images)
    return predictions, features


class HRNetHead(MultiTaskBaseline):
  """The baseline with Multi-Task-Learning-PyTorch's lighter `HighResolutionHead`.

  Same concatenated representation, but each task's feature comes from a 1x1
  ConvBN-ReLU as wide as the concatenation (head_channels None = concat width).
  """
  kernel: ClassVar[int] = 1
  width_divisor: ClassVar[int] = 1


class SingleTask(MultiTaskBaseline):
  """The baseline head for exactly one task: the single-task reference of delta_m."""

  def __post_init__(self):
    if len(self.task_channels) != 1:
      raise ValueError("framework 'single_task' needs exactly one task in config.tasks, got "
                       f'{[task for task, _ in self.task_channels]}')
    super().__post_init__()


class TaskBlocks(nn.Module):
  """Per task: two residual blocks (the task's feature) and a 1x1 prediction conv.

  The first block projects to `features` channels when its input differs.
  `block` is resnet's Bottleneck (PAD-Net) or BasicBlock (MTI-Net).
  Returns ({task: feature}, {task: raw}).
  """
  task_channels: Sequence[tuple[str, int]]
  features: int
  block: Any = BasicBlock
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: Mapping[str, Any], train: bool):
    planes = self.features // self.block.expansion
    features, raws = {}, {}
    for task, channels in self.task_channels:
      x = inputs[task]
      x = self.block(planes, downsample=x.shape[-1] != self.features, dtype=self.dtype,
                     name=f'{task}_block1')(x, train)
      features[task] = self.block(planes, dtype=self.dtype, name=f'{task}_block2')(x, train)
      raws[task] = nn.Conv(channels, (1, 1), dtype=self.dtype,
                           name=f'{task}_pred')(features[task])
    return features, raws


class SpatialAttention(nn.Module):
  """SABlock: conv3x3(x) * sigmoid(conv3x3(x)), the message one task sends another."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda name: nn.Conv(self.features, (3, 3), padding=1, use_bias=False,
                                dtype=self.dtype, name=name)
    return conv('conv')(x) * nn.sigmoid(conv('attention')(x))


class Distillation(nn.Module):
  """Multi-modal distillation: feature[t] + sum over s != t of SABlock_{t<-s}(feature[s])."""
  tasks: Sequence[str]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Mapping[str, Any]):
    out = {}
    for target in self.tasks:
      out[target] = features[target]
      for source in self.tasks:
        if source != target:
          out[target] = out[target] + SpatialAttention(
              features[target].shape[-1], self.dtype,
              name=f'{target}_from_{source}')(features[source])
    return out


class SqueezeExcitation(nn.Module):
  """Channel gating by a bottleneck MLP on the global average (reduction 16)."""
  reduction: int = 16
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    gate = jnp.mean(x, axis=(1, 2))
    gate = nn.relu(nn.Dense(max(channels // self.reduction, 1), dtype=self.dtype,
                            name='squeeze')(gate))
    gate = nn.sigmoid(nn.Dense(channels, dtype=self.dtype, name='excite')(gate))
    return x * gate[:, None, None, :]


class FeaturePropagation(nn.Module):
  """MTI-Net's FPM: a shared summary of all task features, added to each task's.

  The concatenated task features go through a non-linear f (two BasicBlocks at
  a quarter width, 1x1 conv back) that yields a softmax mask over groups of
  N = #tasks consecutive channels, exactly the reference's `view(B, C//N, N,
  H, W)`; the masked concatenation is reduced to one task's width by a
  BasicBlock and added to each task's feature through a per-task SE block.
  """
  tasks: Sequence[str]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Mapping[str, Any], train: bool):
    concat = jnp.concatenate([features[t] for t in self.tasks], axis=-1)
    num_tasks, channels = len(self.tasks), concat.shape[-1]
    shared = BasicBlock(channels // 4, downsample=True, dtype=self.dtype,
                        name='nonlinear1')(concat, train)
    shared = BasicBlock(channels // 4, dtype=self.dtype, name='nonlinear2')(shared, train)
    shared = nn.Conv(channels, (1, 1), dtype=self.dtype, name='nonlinear_out')(shared)
    groups = concat.shape[:-1] + (channels // num_tasks, num_tasks)
    mask = nn.softmax(shared.reshape(groups), axis=-1)
    shared = (mask * concat.reshape(groups)).reshape(concat.shape)
    shared = BasicBlock(channels // num_tasks, downsample=True, dtype=self.dtype,
                        name='reduce')(shared, train)
    return {t: SqueezeExcitation(dtype=self.dtype, name=f'se_{t}')(shared) + features[t]
            for t in self.tasks}


class PADNet(nn.Module):
  """PAD-Net (Xu et al., CVPR 2018) as in Multi-Task-Learning-PyTorch with HRNet.

  The backbone scales are concatenated and fused by a 1x1 ConvBN-ReLU (the
  reference's `HighResolutionFuse`); per task two Bottlenecks and a 1x1 conv
  make the initial prediction (sown as '<task>/initial'); multi-modal
  distillation adds every other task's initial feature through spatial
  attention; two more Bottlenecks per task give the task's feature and a 1x1
  conv the final prediction.

  Attributes:
    head_channels: width of the task features, a multiple of 4; None = 256.
  """
  backbone: nn.Module
  task_channels: Sequence[tuple[str, int]]
  head_channels: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    width = self.head_channels or 256
    if width % Bottleneck.expansion:
      raise ValueError(f'padnet needs config.model.head_channels divisible by '
                       f'{Bottleneck.expansion}, got {width}')
    tasks = [t for t, _ in self.task_channels]
    shared = concat_scales(self.backbone(images, train=train))
    shared = ConvBN(shared.shape[-1], 1, dtype=self.dtype, name='fuse')(shared, train)
    initial, initial_raws = TaskBlocks(self.task_channels, width, Bottleneck, self.dtype,
                                       name='initial')({t: shared for t in tasks}, train)
    sow_aux_predictions(self, {f'{t}/initial': initial_raws[t] for t in tasks}, images)
    distilled = Distillation(tasks, self.dtype, name='distillation')(initial)
    features, raws = TaskBlocks(self.task_channels, width, Bottleneck, self.dtype,
                                name='final')(distilled, train)
    return {t: to_input_resolution(raws[t], images) for t in tasks}, features


class MTINet(nn.Module):
  """MTI-Net (Vandenhende et al., ECCV 2020) as in Multi-Task-Learning-PyTorch.

  From the coarsest scale to the finest, each scale s makes initial per-task
  predictions (two BasicBlocks at the scale's width and a 1x1 conv, sown as
  '<task>/scale<s>', s = 0 the finest) from the backbone map concatenated with
  the task's feature propagated from scale s+1 by an FPM. At every scale,
  multi-modal distillation refines the initial features; per task, a
  HighResolutionHead aggregates the four distilled scales (concat at stride 4,
  1x1 ConvBN-ReLU = the task's feature, 1x1 conv).

  Differences from the reference: the propagated features are resized to the
  next scale's exact size instead of by a factor 2 (odd input sizes work).

  Attributes:
    head_channels: width of the aggregation heads' features; None = the
      concatenation width (sum of the backbone widths), as in the reference.
  """
  backbone: nn.Module
  task_channels: Sequence[tuple[str, int]]
  head_channels: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    tasks = [t for t, _ in self.task_channels]
    scales = self.backbone(images, train=train)
    initial, aux, propagated = [None] * len(scales), {}, None
    for s in reversed(range(len(scales))):
      x = scales[s]
      if propagated is None:
        inputs = {t: x for t in tasks}
      else:
        inputs = {t: jnp.concatenate([x, resize_to(propagated[t], *x.shape[1:3])], axis=-1)
                  for t in tasks}
      initial[s], raws = TaskBlocks(self.task_channels, x.shape[-1], BasicBlock, self.dtype,
                                    name=f'scale{s}')(inputs, train)
      aux.update({f'{t}/scale{s}': raws[t] for t in tasks})
      if s > 0:
        propagated = FeaturePropagation(tasks, self.dtype, name=f'fpm{s}')(initial[s], train)
    sow_aux_predictions(self, aux, images)
    distilled = [Distillation(tasks, self.dtype, name=f'distillation{s}')(initial[s])
                 for s in range(len(scales))]
    predictions, features = {}, {}
    for task, channels in self.task_channels:
      shared = concat_scales([d[task] for d in distilled])
      raw, features[task] = prediction_head(shared, task, self.head_channels or shared.shape[-1],
                                            channels, 1, self.dtype, train)
      predictions[task] = to_input_resolution(raw, images)
    return predictions, features


class CrossTaskAttention(nn.Module):
  """One transformer block over the tokens of every task's coarsest map.

  Each task projects the shared coarsest map to its own tokens (a per-task
  linear layer plus a learned task embedding, so a token says which task it
  belongs to); one pre-norm block (ViT's: multi-head self-attention and MLP,
  each with a residual) runs on the concatenation of all tasks' tokens, so
  every task's queries attend to every task's keys and values; a final
  LayerNorm, and each task's tokens are reshaped back to its map.
  """
  tasks: Sequence[str]
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, coarse):
    batch, height, width, channels = coarse.shape
    embedding = self.param('task_embedding', nn.initializers.truncated_normal(0.02),
                           (len(self.tasks), 1, channels))
    tokens = [nn.Dense(channels, dtype=self.dtype, name=f'{task}_tokens')(coarse)
              .reshape(batch, height * width, channels) + embedding[i].astype(self.dtype)
              for i, task in enumerate(self.tasks)]
    x = vit.Block(self.num_heads, dtype=self.dtype, name='block')(jnp.concatenate(tokens, 1))
    x = vit.layer_norm(self.dtype, 'norm')(x)
    return {task: x[:, i * height * width:(i + 1) * height * width].reshape(coarse.shape)
            for i, task in enumerate(self.tasks)}


class ViTMultiTask(nn.Module):
  """Per-task baseline heads on the pyramid plus one cross-task attention stage.

  Made for the ViT backbones (any backbone's pyramid works). After InvPT (Ye
  and Xu, ECCV 2022; prismformore/Multi-Task-Transformer,
  InvPT/models/transformers/invpt.py), whose decoder lets task queries attend
  across all tasks' feature maps, here reduced to one stage at the coarsest
  scale, where the token count (tasks x H/32 x W/32) keeps attention cheap:
  `CrossTaskAttention` turns the coarsest map into one refined map per task.
  Each task's head is then the baseline's (`concat_scales` to stride 4, 3x3
  ConvBN-ReLU = the task's feature, 1x1 conv) on the pyramid whose coarsest
  level is that task's refined map, so every head sees the other tasks
  through it and its input width is the baseline's.

  Attributes:
    head_channels: width of each task's feature; None = concat width // 4, as
      the baseline.
  """
  backbone: nn.Module
  task_channels: Sequence[tuple[str, int]]
  head_channels: int | None = None
  dtype: Dtype = jnp.float32

  head_dim: ClassVar[int] = 64

  @classmethod
  def attention_heads(cls, channels: int) -> int:
    """The most heads of at least `head_dim` channels that divide `channels` (1 if none)."""
    return next(h for h in range(max(channels // cls.head_dim, 1), 0, -1) if channels % h == 0)

  @nn.compact
  def __call__(self, images, train: bool = False):
    tasks = [t for t, _ in self.task_channels]
    scales = self.backbone(images, train=train)
    refined = CrossTaskAttention(tasks, self.attention_heads(scales[-1].shape[-1]), self.dtype,
                                 name='cross_task')(scales[-1])
    predictions, features = {}, {}
    for task, out_channels in self.task_channels:
      shared = concat_scales([*scales[:-1], refined[task]])
      width = self.head_channels or max(shared.shape[-1] // MultiTaskBaseline.width_divisor, 1)
      raw, features[task] = prediction_head(shared, task, width, out_channels,
                                            MultiTaskBaseline.kernel, self.dtype, train)
      predictions[task] = to_input_resolution(raw, images)
    return predictions, features


class SegNetHeads(nn.Module):
  """MTAN's task heads (lorenmt/mtan; VICO-UoE/MTPSL model/segnet_mtl.py, `pred_task*`).

  Made for the `segnet` backbone (any backbone works): on its finest map, per
  task a 3x3 conv with bias (`{task}_head`, its output is the task's feature,
  no normalisation or activation) and a 1x1 conv with bias (`{task}_pred`),
  upsampled to the input size when the map is coarser. The outputs are raw:
  the reference's log_softmax and normal normalisation are the tasks' losses
  and `decode` here.

  Attributes:
    head_channels: width of each task's feature; None = the finest map's width.
  """
  backbone: nn.Module
  task_channels: Sequence[tuple[str, int]]
  head_channels: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    maps = self.backbone(images, train=train)
    shared = maps[0]
    sow_bottleneck(self, maps[-1])
    width = self.head_channels or shared.shape[-1]
    predictions, features = {}, {}
    for task, channels in self.task_channels:
      features[task] = nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                               kernel_init=segnet.CONV_INIT, name=f'{task}_head')(shared)
      raw = nn.Conv(channels, (1, 1), dtype=self.dtype, kernel_init=segnet.CONV_INIT,
                    name=f'{task}_pred')(features[task])
      predictions[task] = to_input_resolution(raw, images)
    return predictions, features
