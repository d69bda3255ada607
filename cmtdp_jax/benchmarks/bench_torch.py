"""The PyTorch train step of the same model and batch, for JAX / PyTorch throughput.

  python -m cmtdp_jax.benchmarks.benchmark --config configs/nyud_hrnet18_baseline.py --compare_torch
  python -m cmtdp_jax.benchmarks.benchmark --config configs/nyud_vitb_mt.py --compare_torch  # + timm
  python -m cmtdp_jax.benchmarks.benchmark --config configs/nyud_invpt_vitl.py --compare_torch
  python -m cmtdp_jax.benchmarks.bench_torch --config configs/nyud_invpt_vitl.py --steps 3 \
      --json torch.json    # PyTorch's step alone, in its own process (no JAX state beside it)

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

InvPT (`invpt` on vit_b16 / vit_l16) is the whole-model transcription
`tests/golden/torch_invpt.py` (`TransformerNet`: InvPT's ViT and decoder, its
state_dict keys), with the widths of `models/invpt.py`: D = head_channels or
dim // 2, P = dim // 16. Its intermediate predictions are supervised with
their tasks' losses and weights, as `steps.compute_losses` supervises the
sown '<task>/intermediate' predictions. Two differences from the JAX model,
neither a change of InvPT: the transcription builds (and keeps in its
optimizer) modules InvPT's forward never reads (`convert.invpt_unused_keys`,
which the JAX model does not build: `params` is the transcription's count
without them, `params_with_unused` InvPT's own), and its forward still runs
the third `scale_embed` conv whose output nothing reads (~1% of ViT-L's
forward FLOPs). It is an inference transcription: no stochastic depth and no
dropout, while the InvPT configs train with drop_path_rate 0.15; set
`--config.model.backbone_kwargs.drop_path_rate=0.0` for the same computation
on both sides.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import sys
import time

import jax
import torch
import torch.nn.functional as F
from torch import nn

from cmtdp_jax import data as data_lib
from cmtdp_jax import tasks as tasks_lib
from cmtdp_jax.benchmarks import common
from cmtdp_jax.models import convert
from cmtdp_jax.models import frameworks
from cmtdp_jax.models.backbones import vit
from tests.golden import torch_invpt
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


class InvPTNet(torch_invpt.TransformerNet):
  """InvPT's `TransformerNet` on `vit.SIZES[backbone]`, with `models/invpt.py`'s widths.

  `forward(images)` returns {task: prediction, '<task>/intermediate': intermediate
  prediction}, both at the input size (the keys of the JAX model's outputs and sown
  auxiliary predictions). `img_size` is the input size: the transcription adds its
  position embedding without resizing it. `jax_img_size` is the JAX ViT's `img_size`
  (its position grid), for `params`.
  """

  def __init__(self, backbone, task_channels, img_size, head_channels=None,
               jax_img_size=None):
    size = vit.SIZES[backbone]
    dim = size['dim']
    channels = dict(task_channels)
    super().__init__(list(channels), channels, tuple(img_size), dim, size['depth'],
                     size['num_heads'], vit.VisionTransformer.mlp_ratio,
                     head_channels or dim // 2, dim // 16)
    state = dict(self.named_parameters())
    unused = [k for k in convert.invpt_unused_keys(self.state_dict()) if k in state]
    self.params_with_unused = sum(p.numel() for p in self.parameters())
    # The JAX ViT stores its position embedding for its own img_size (1 + grid tokens).
    grid = lambda s: (s, s) if isinstance(s, int) else tuple(s)
    rows, cols = (x // 16 for x in grid(jax_img_size or img_size))
    pos_embed = (1 + rows * cols) * dim - state['backbone.pos_embed'].numel()
    self.params_ours = (self.params_with_unused - sum(state[k].numel() for k in unused) +
                        pos_embed)

  def forward(self, images):
    predictions, intermediates, _ = super().forward(images)
    return {**predictions, **{f'{t}/intermediate': p for t, p in intermediates.items()}}


def build_model(model_config, task_channels, image_size=None):
  """The PyTorch model of `model_config`; ValueError when there is no reference of it.
  `image_size` (height, width), the input's, is needed by InvPT's transcription."""
  options = {}
  if model_config.get('backbone_kwargs_for', '') in ('', model_config.backbone):
    options = dict(model_config.get('backbone_kwargs', {}))
  head_channels = model_config.get('head_channels')
  if model_config.framework == 'invpt' and model_config.backbone in ('vit_b16', 'vit_l16'):
    jax_img_size = options.get('img_size', vit.VisionTransformer.img_size)
    if image_size is None:
      if 'img_size' not in options:
        raise ValueError('InvPT\'s transcription needs the input size (image_size)')
      image_size = options['img_size']
    return InvPTNet(model_config.backbone, task_channels, tuple(image_size), head_channels,
                    jax_img_size)
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
    model = build_model(config.model, task_channels, tuple(config.data.crop_size)).train()
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
    with autocast:
      outputs = model(images)
    # Every output, InvPT's '<task>/intermediate' predictions included (as the JAX step's
    # deep supervision), gets its task's loss and weight.
    loss = sum(weights[t] * task_loss(t, raw, batch[t], options[t])
               for t, raw in ((key.split('/', 1)[0], raw) for key, raw in outputs.items()))
    loss.backward()
    if config.optim.grad_clip:
      torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
    optimizer.step()
    # Gradients freed now rather than at the next step: between steps PyTorch holds only
    # the parameters and the optimizer state, next to JAX's state in the interleaved run.
    optimizer.zero_grad(set_to_none=True)
    if device == 'cuda':
      torch.cuda.synchronize()

  return step, {
      'torch': torch.__version__, 'device': device, 'threads': torch.get_num_threads(),
      'memory_format': 'channels_last' if device == 'cuda' else 'contiguous',
      # The parameters the JAX model has: InvPT's transcription without its unused modules.
      'params': getattr(model, 'params_ours', sum(p.numel() for p in model.parameters())),
      **({'params_with_unused': model.params_with_unused}
         if hasattr(model, 'params_with_unused') else {}),
      # PyTorch's peak allocated memory so far (CUDA only), read after the timed steps.
      'peak_memory': torch.cuda.max_memory_allocated if device == 'cuda' else lambda: None}


def time_alone(config, num_steps: int, warmup: int) -> dict:
  """PyTorch's train step of `config` timed alone: the first call, `warmup` untimed steps,
  then `num_steps` timed ones (each waited for), on `common.synthetic_batch`. For models
  whose two frameworks' states do not fit in memory together (InvPT ViT-L at 448x576 beside
  a 24 GB machine's other work), where `benchmark --compare_torch` cannot interleave them."""
  step, info = train_step(config, common.synthetic_batch(config, config.batch_size,
                                                         config.data.crop_size))
  if step is None:
    raise ValueError(info['skipped'])
  peak_memory = info.pop('peak_memory')
  results = {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
             'load_average_start': list(os.getloadavg()),
             'model': {'framework': config.model.framework, 'backbone': config.model.backbone,
                       'dtype': config.model.dtype, 'tasks': list(config.tasks)},
             'batch_size': config.batch_size, 'image_shape': [*config.data.crop_size, 3],
             'steps': num_steps, 'warmup': warmup, **info}
  start = time.perf_counter()
  step()
  results['first_call_s'] = time.perf_counter() - start
  for _ in range(warmup):
    step()
  seconds = []
  for _ in range(num_steps):
    start = time.perf_counter()
    step()
    seconds.append(time.perf_counter() - start)
  results['step_time_s'] = common.step_stats(seconds)
  results['seconds'] = seconds
  results['images_per_s'] = config.batch_size / results['step_time_s']['median']
  results['peak_memory_bytes'] = peak_memory()
  results['load_average_end'] = list(os.getloadavg())
  return results


def main(argv, flag_values):
  if len(argv) > 1:
    sys.exit(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    results = time_alone(flag_values.config, flag_values.steps, flag_values.warmup)
  except ValueError as e:
    sys.exit(f'error: {e}')
  stats = results['step_time_s']
  print(f"PyTorch {results['model']['framework']}/{results['model']['backbone']} "
        f"{results['model']['dtype']}, batch {results['batch_size']} x "
        f"{results['image_shape'][0]}x{results['image_shape'][1]}, {results['device']}, torch "
        f"{results['torch']}, {results['threads']} threads, {results['params']:,} parameters: "
        f"step {stats['median']:.3f} s [{stats['p10']:.3f}, {stats['p90']:.3f}] over "
        f"{stats['count']} steps, {results['images_per_s']:.3f} images/s, load average "
        f"{results['load_average_start'][0]:.2f} -> {results['load_average_end'][0]:.2f}")
  if flag_values.json:
    with open(flag_values.json, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  # pylint: disable=import-outside-toplevel
  from absl import flags
  from ml_collections import config_flags

  from cmtdp_jax import config_lib
  config_flags.DEFINE_config_file('config', None, 'Config file (optionally file.py:variant).',
                                  lock_config=True)
  flags.DEFINE_integer('steps', 3, 'Timed train steps.')
  flags.DEFINE_integer('warmup', 1, 'Untimed steps after the first call.')
  flags.DEFINE_string('json', None, 'Where to write the results as JSON.')
  flags.mark_flags_as_required(['config'])
  config_lib.run(lambda argv: main(argv, flags.FLAGS))
