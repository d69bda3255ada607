"""The PyTorch train step of the same model and batch, for JAX / PyTorch throughput.

  python -m cmtdp_jax.benchmark --config configs/nyud_hrnet18_baseline.py --compare_torch

The backbone is `tests/golden/torch_reference.py` (state_dict-compatible with
the official checkpoints), which is not installed with the package: run from
the repository root. The FCN head and the losses follow SPEC section 3 as
`models.frameworks.MultiTaskBaseline` and `tasks` do; the optimizer is the
config's (SGD with momentum and coupled weight decay, or AdamW) at a constant
learning rate. Eager PyTorch in its usual fast setup: channels_last on CUDA,
bf16 autocast when the config computes in bfloat16. JAX's step also checks
for non-finite updates; this one does not.
"""

from __future__ import annotations

import time

import jax
import torch
import torch.nn.functional as F
from torch import nn

from cmtdp_jax import data as data_lib
from cmtdp_jax import tasks as tasks_lib
from tests.golden import torch_reference

FRAMEWORKS = ('baseline', 'single_task')  # the FCN head


class MultiTaskFCN(nn.Module):
  """Backbone scales upsampled to 1/4 and concatenated; per task ConvBN-ReLU + 1x1 conv."""

  def __init__(self, backbone, task_channels, head_channels=None):
    super().__init__()
    self.backbone = backbone
    with torch.no_grad():
      concat = sum(x.shape[1] for x in backbone.eval()(torch.zeros(1, 3, 64, 64)))
    head_channels = head_channels or max(concat // 4, 1)
    self.heads = nn.ModuleDict({
        task: nn.Sequential(torch_reference.conv_bn(concat, head_channels, 3),
                            nn.Conv2d(head_channels, channels, 1))
        for task, channels in task_channels})

  def forward(self, images):
    scales = self.backbone(images)
    size = scales[0].shape[2:]
    shared = torch.cat([scales[0]] + [
        F.interpolate(x, size=size, mode='bilinear', align_corners=False) for x in scales[1:]],
                       dim=1)
    return {task: F.interpolate(head(shared), size=images.shape[2:], mode='bilinear',
                                align_corners=False)
            for task, head in self.heads.items()}


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
  return torch.optim.AdamW(params, lr=optim_config.lr, weight_decay=optim_config.weight_decay)


def _device() -> str | None:
  platform = jax.devices()[0].platform
  if platform == 'gpu' and torch.cuda.is_available():
    return 'cuda'
  return 'cpu' if platform == 'cpu' else None


def run(config, numpy_batch, num_steps: int, warmup: int) -> dict:
  """Seconds of `num_steps` PyTorch train steps of `config`'s model on `numpy_batch`
  (the JAX benchmark's batch: NHWC images, labels in the pipeline's conventions)."""
  if config.model.framework not in FRAMEWORKS:
    return {'skipped': f'no PyTorch reference for framework {config.model.framework}'}
  device = _device()
  if device is None:
    return {'skipped': f'PyTorch cannot run on {jax.devices()[0].platform}'}
  try:
    backbone = torch_reference.build(config.model.backbone,
                                     **dict(config.model.get('backbone_kwargs', {})))
  except ValueError as e:
    return {'skipped': str(e)}
  num_classes = data_lib.get_dataset_spec(config.data.name).num_classes
  task_channels = [(t, tasks_lib.get_task(t).num_outputs(num_classes)) for t in config.tasks]
  model = MultiTaskFCN(backbone, task_channels, config.model.get('head_channels')).train()
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
    optimizer.step()
    if device == 'cuda':
      torch.cuda.synchronize()

  for _ in range(warmup + 1):
    step()
  seconds = []
  for _ in range(num_steps):
    start = time.perf_counter()
    step()
    seconds.append(time.perf_counter() - start)
  return {'torch': torch.__version__, 'device': device, 'threads': torch.get_num_threads(),
          'memory_format': 'channels_last' if device == 'cuda' else 'contiguous',
          'step_seconds': seconds, 'params': sum(p.numel() for p in model.parameters()),
          'peak_memory_bytes': (torch.cuda.max_memory_allocated() if device == 'cuda'
                                else None)}
