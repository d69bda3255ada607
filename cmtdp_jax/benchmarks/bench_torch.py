"""The PyTorch train step of the same model and batch, for JAX / PyTorch throughput.

  python -m cmtdp_jax.benchmarks.benchmark --config configs/nyud_hrnet18_baseline.py --compare_torch
  python -m cmtdp_jax.benchmarks.benchmark --config configs/nyud_vitb_mt.py --compare_torch  # + timm

The HRNet / ResNet backbones are `tests/golden/torch_reference.py`
(state_dict-compatible with the official checkpoints), which is not installed
with the package: run from the repository root. The ViT backbones are timm's
`vit_*_patch16_<img_size>` trunks, tapped as `backbones/vit.py` taps them,
plus the same simple feature pyramid (`ViTFeaturePyramid`). Heads: the FCN
head of `models.frameworks.MultiTaskBaseline` (`baseline`, `single_task`) and
`ViTMultiTask`'s cross-task attention and heads (`vit_mt`); losses as `tasks`;
the optimizer is the config's (SGD with momentum or Adam, both with coupled
weight decay, or AdamW; `grad_clip` as torch's `clip_grad_norm_`) at a constant
learning rate. Eager PyTorch in its usual fast setup: channels_last on CUDA,
bf16 autocast when the config computes in bfloat16. JAX's step also checks
for non-finite updates; this one does not.
"""

from __future__ import annotations

import functools

import jax
import torch
import torch.nn.functional as F
from torch import nn

from cmtdp_jax import data as data_lib
from cmtdp_jax import tasks as tasks_lib
from cmtdp_jax.models import frameworks
from cmtdp_jax.models.backbones import vit
from tests.golden import torch_reference

TIMM_VITS = {'vit_s16': 'vit_small_patch16', 'vit_b16': 'vit_base_patch16',
             'vit_l16': 'vit_large_patch16'}


def concat_scales(scales):
  """`frameworks.concat_scales` on NCHW maps."""
  size = scales[0].shape[2:]
  return torch.cat([scales[0]] + [
      F.interpolate(x, size=size, mode='bilinear', align_corners=False) for x in scales[1:]],
                   dim=1)


def fcn_heads(task_channels, concat, head_channels):
  """`frameworks.prediction_head` per task: 3x3 ConvBN-ReLU + 1x1 conv."""
  return nn.ModuleDict({task: nn.Sequential(torch_reference.conv_bn(concat, head_channels, 3),
                                            nn.Conv2d(head_channels, channels, 1))
                        for task, channels in task_channels})


def upsample_to(x, images):
  return F.interpolate(x, size=images.shape[2:], mode='bilinear', align_corners=False)


class MultiTaskFCN(nn.Module):
  """Backbone scales upsampled to 1/4 and concatenated; per task ConvBN-ReLU + 1x1 conv."""

  def __init__(self, backbone, task_channels, head_channels=None):
    super().__init__()
    self.backbone = backbone
    with torch.no_grad():
      concat = sum(x.shape[1] for x in backbone.eval()(torch.zeros(1, 3, 64, 64)))
    self.heads = fcn_heads(task_channels, concat, head_channels or max(concat // 4, 1))

  def forward(self, images):
    shared = concat_scales(self.backbone(images))
    return {task: upsample_to(head(shared), images) for task, head in self.heads.items()}


class ChannelNorm(nn.LayerNorm):
  """LayerNorm over the channels of an NCHW map (flax's LayerNorm on NHWC)."""

  def forward(self, x):
    return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ViTFeaturePyramid(nn.Module):
  """timm's ViT trunk with `backbones/vit.py`'s taps and simple feature pyramid, NCHW."""

  def __init__(self, backbone: str, img_size: int = 224, pyramid_channels: int = 256):
    super().__init__()
    import timm  # pylint: disable=import-outside-toplevel
    self.trunk = timm.create_model(f'{TIMM_VITS[backbone]}_{img_size}', pretrained=False,
                                   num_classes=0, dynamic_img_size=True, dynamic_img_pad=True)
    dim = self.trunk.embed_dim
    self.taps = vit.default_taps(len(self.trunk.blocks))
    norm = functools.partial(ChannelNorm, eps=vit.LAYER_NORM_EPSILON)
    self.stride4 = nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, 2), norm(dim // 2),
                                 nn.GELU(), nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2))
    self.stride8 = nn.ConvTranspose2d(dim, dim // 2, 2, 2)
    self.levels = nn.ModuleList(
        nn.Sequential(nn.Conv2d(width, pyramid_channels, 1, bias=False), norm(pyramid_channels),
                      nn.Conv2d(pyramid_channels, pyramid_channels, 3, padding=1, bias=False),
                      norm(pyramid_channels))
        for width in (dim // 4, dim // 2, dim, dim))

  def forward(self, images):
    trunk = self.trunk
    x = trunk.patch_embed(images)  # NHWC, padded to a multiple of 16
    batch, height, width, _ = x.shape
    x = trunk.norm_pre(trunk._pos_embed(x))  # pylint: disable=protected-access
    tapped = []
    for index in range(max(self.taps) + 1):
      x = trunk.blocks[index](x)
      tapped += [x] * self.taps.count(index)
    tapped[-1] = trunk.norm(tapped[-1])
    maps = [t[:, trunk.num_prefix_tokens:].reshape(batch, height, width, -1).permute(0, 3, 1, 2)
            for t in tapped]
    x32 = F.max_pool2d(maps[3], 2, 2, ceil_mode=True)
    return [level(x) for level, x in zip(
        self.levels, (self.stride4(maps[0]), self.stride8(maps[1]), maps[2], x32))]


class ViTMultiTask(nn.Module):
  """`frameworks.ViTMultiTask`: one cross-task attention block over every task's tokens of
  the coarsest map, then per task the FCN head on the pyramid with that task's refined map."""

  def __init__(self, backbone, task_channels, head_channels=None):
    super().__init__()
    from timm.models.vision_transformer import Block  # pylint: disable=import-outside-toplevel
    self.backbone = backbone
    with torch.no_grad():
      widths = [x.shape[1] for x in backbone.eval()(torch.zeros(1, 3, 64, 64))]
    channels, concat = widths[-1], sum(widths)
    self.tasks = [task for task, _ in task_channels]
    self.tokens = nn.ModuleDict({task: nn.Linear(channels, channels) for task in self.tasks})
    self.task_embedding = nn.Parameter(torch.zeros(len(self.tasks), 1, channels))
    norm = functools.partial(nn.LayerNorm, eps=vit.LAYER_NORM_EPSILON)
    self.block = Block(channels, frameworks.ViTMultiTask.attention_heads(channels),
                       qkv_bias=True, norm_layer=norm)
    self.norm = norm(channels)
    self.heads = fcn_heads(task_channels, concat, head_channels or max(concat // 4, 1))

  def forward(self, images):
    scales = self.backbone(images)
    coarse = scales[-1]
    batch, channels, height, width = coarse.shape
    x = coarse.flatten(2).transpose(1, 2)
    x = torch.cat([self.tokens[task](x) + self.task_embedding[i]
                   for i, task in enumerate(self.tasks)], dim=1)
    x = self.norm(self.block(x))
    outputs, size = {}, height * width
    for i, task in enumerate(self.tasks):
      refined = x[:, i * size:(i + 1) * size].transpose(1, 2).reshape(
          batch, channels, height, width)
      shared = concat_scales([*scales[:-1], refined])
      outputs[task] = upsample_to(self.heads[task](shared), images)
    return outputs


def build_model(model_config, task_channels):
  """The PyTorch model of `model_config`; ValueError when there is no reference of it."""
  options = {}
  if model_config.get('backbone_kwargs_for', '') in ('', model_config.backbone):
    options = dict(model_config.get('backbone_kwargs', {}))
  head_channels = model_config.get('head_channels')
  if model_config.framework in ('baseline', 'single_task'):
    return MultiTaskFCN(torch_reference.build(model_config.backbone, **options), task_channels,
                        head_channels)
  if model_config.framework == 'vit_mt' and model_config.backbone in TIMM_VITS:
    return ViTMultiTask(ViTFeaturePyramid(model_config.backbone, **options), task_channels,
                        head_channels)
  raise ValueError(f'no PyTorch reference for framework {model_config.framework} on '
                   f'{model_config.backbone}')


def _masked_mean(values, mask):
  mask = mask.to(values.dtype)
  return (values * mask).sum() / mask.sum().clamp(min=1.0)


def task_loss(name: str, raw, label, options):
  """`tasks.Task.compute_loss` on NCHW outputs (labels in the pipeline's layout)."""
  task = tasks_lib.get_task(name)
  raw = raw.float()
  if task.label_kind == tasks_lib.DEPTH:
    return _masked_mean((raw[:, 0] - label).abs(), label > 0)
  if task.label_kind == tasks_lib.NORMALS:
    label = label.permute(0, 3, 1, 2)
    unit = F.normalize(raw, dim=1, eps=1e-6)
    scale = tasks_lib.NORMALS_REDUCTIONS[options.get('reduction', 'pixel_sum')]
    return _masked_mean((unit - label).abs().sum(1) * scale, (label * label).sum(1) > 1e-6)
  if task.channels != 1:
    return F.cross_entropy(raw, label.long(), ignore_index=tasks_lib.IGNORE_LABEL)
  valid = label != tasks_lib.IGNORE_LABEL
  positive = (label == 1).float()
  pos_weight = options.get('pos_weight')
  if pos_weight is None:
    pos_weight = 1.0 - _masked_mean(positive, valid).detach()
  x = raw[:, 0]
  per_pixel = (pos_weight * positive * -F.logsigmoid(x) +
               (1.0 - pos_weight) * (1.0 - positive) * -F.logsigmoid(-x))
  return _masked_mean(per_pixel, valid)


def _optimizer(optim_config, params):
  if optim_config.name == 'sgd':
    return torch.optim.SGD(params, lr=optim_config.lr, momentum=optim_config.momentum,
                           weight_decay=optim_config.weight_decay)
  if optim_config.name == 'adam':
    return torch.optim.Adam(params, lr=optim_config.lr, weight_decay=optim_config.weight_decay)
  return torch.optim.AdamW(params, lr=optim_config.lr, weight_decay=optim_config.weight_decay)


def _device() -> str | None:
  platform = jax.devices()[0].platform
  if platform == 'gpu' and torch.cuda.is_available():
    return 'cuda'
  return 'cpu' if platform == 'cpu' else None


def train_step(config, numpy_batch):
  """`(step, info)`: `step()` runs one PyTorch train step of `config`'s model on
  `numpy_batch` (the JAX benchmark's batch: NHWC images, labels in the pipeline's
  conventions) and waits for it; `info` says what runs (and holds `peak_memory()`,
  not JSON). `(None, {'skipped': why})`
  when there is no reference of the model or PyTorch cannot run on JAX's device."""
  device = _device()
  if device is None:
    return None, {'skipped': f'PyTorch cannot run on {jax.devices()[0].platform}'}
  num_classes = data_lib.get_dataset_spec(config.data.name).num_classes
  task_channels = [(t, tasks_lib.get_task(t).num_outputs(num_classes)) for t in config.tasks]
  try:
    model = build_model(config.model, task_channels).train()
  except ValueError as e:
    return None, {'skipped': str(e)}
  memory_format = torch.channels_last if device == 'cuda' else torch.contiguous_format
  model = model.to(device=device, memory_format=memory_format)
  optimizer = _optimizer(config.optim, model.parameters())
  weights = dict(config.loss_weights)
  weights = {t: weights.get(t, tasks_lib.get_task(t).loss_weight) for t in config.tasks}
  options = {t: dict(config.loss_options.get(t, {})) for t in config.tasks}

  batch = {k: torch.from_numpy(v).to(device) for k, v in numpy_batch.items()}
  images = batch['image'].permute(0, 3, 1, 2).contiguous(memory_format=memory_format)
  autocast = torch.autocast(device, dtype=torch.bfloat16,
                            enabled=config.model.dtype == 'bfloat16')

  def step():
    optimizer.zero_grad(set_to_none=True)
    with autocast:
      outputs = model(images)
    loss = sum(weights[t] * task_loss(t, outputs[t], batch[t], options[t])
               for t in config.tasks)
    loss.backward()
    if config.optim.grad_clip:
      torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
    optimizer.step()
    if device == 'cuda':
      torch.cuda.synchronize()

  return step, {
      'torch': torch.__version__, 'device': device, 'threads': torch.get_num_threads(),
      'memory_format': 'channels_last' if device == 'cuda' else 'contiguous',
      'params': sum(p.numel() for p in model.parameters()),
      # PyTorch's peak allocated memory so far (CUDA only), read after the timed steps.
      'peak_memory': torch.cuda.max_memory_allocated if device == 'cuda' else lambda: None}
