"""PyTorch reference of MTPSL's cross-task consistency loss (needs torch).

A transcription of `Mapfns`, `SegNet_enc` and `conv_task` in VICO-UoE/MTPSL
`model/mapfns.py` with the same state_dict keys (mapfns.pred_encoder_source.0.0.weight,
mapfns.encoder_block.1.gamma, mapfns.conv_block_enc.2.1.bn.weight, ...) and the
same arithmetic, except:

  * the pair code is an argument of the forward pass, not the global
    `config_task.A_taskpair` (built by the same flatten trick);
  * `widths` (MTPSL: 64-128-256-512-512) may be changed, one max-pool each;
  * the Gumbel draws are passed in (`gumbel_noise`) instead of sampled inside
    `F.gumbel_softmax`: `gumbel_softmax` below is torch's function with its
    `-log(Exponential(1))` sample replaced by the given one;
  * task kinds are those of cmtdp_jax's registry: 'categorical' (MTPSL's
    'semantic'), 'binary' (edge / sal: one logit x, as 2 classes [0, x]),
    'depth', 'normals'; the ignore label is 255 (MTPSL: -1);
  * no `.cuda()`, and no resampling while the sample has NaNs.

`model_normals` stands in for the last line of MTPSL's model (normals output
divided by its L2 norm), which the parity case applies to raw predictions;
`batch_loss` is the training loop's per-image call (nyu_mtl_xtc.py), without
con_weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WIDTHS = (64, 128, 256, 512, 512)
IGNORE = 255


def pair_code(source: int, target: int, num_tasks: int, like: torch.Tensor) -> torch.Tensor:
  """MTPSL's A_taskpair: [1, T(T-1)], the one-hot (s, t) matrix flattened without its diagonal."""
  a = torch.zeros(num_tasks, num_tasks, dtype=like.dtype)
  a[source, target] = 1.0
  n, _ = a.size()
  return a.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten().view(1, -1)


def gumbel_softmax(logits, gumbels, tau=1.0, hard=True, dim=1):
  """torch.nn.functional.gumbel_softmax with its Gumbel sample given."""
  gumbels = (logits + gumbels) / tau
  y_soft = gumbels.softmax(dim)
  if hard:
    index = y_soft.max(dim, keepdim=True)[1]
    y_hard = torch.zeros_like(logits).scatter_(dim, index, 1.0)
    return y_hard - y_soft.detach() + y_soft
  return y_soft


def model_normals(raw, eps=1e-12):
  """MTPSL's model divides its normals by their L2 norm; cmtdp_jax's `tasks.unit_vectors`
  (the same, with the squared norm clamped at 1e-12, so zero vectors stay finite)."""
  return raw / torch.sqrt(torch.clamp(torch.sum(raw * raw, dim=1, keepdim=True), min=eps))


class ConvTask(nn.Module):

  def __init__(self, in_planes, planes, num_tasks):
    super().__init__()
    self.conv = nn.Conv2d(in_planes, planes, kernel_size=3, padding=1)
    self.gamma = nn.Parameter(torch.ones(planes, num_tasks * (num_tasks - 1)))
    self.beta = nn.Parameter(torch.zeros(planes, num_tasks * (num_tasks - 1)))
    self.bn = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)

  def forward(self, x, a_taskpair):
    x = self.conv(x)
    gamma = torch.mm(a_taskpair, self.gamma.t()).view(1, x.size(1), 1, 1)
    beta = torch.mm(a_taskpair, self.beta.t()).view(1, x.size(1), 1, 1)
    x = self.bn(x)
    return self.relu(x * gamma + beta)


class SegNetEnc(nn.Module):

  def __init__(self, input_channels, widths=WIDTHS):
    super().__init__()
    self.filter = list(widths)
    self.num_tasks = len(input_channels)
    self.pred_encoder_source = nn.ModuleList(
        nn.Sequential(nn.Conv2d(c, widths[0], kernel_size=3, padding=1),
                      nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        for c in input_channels)
    self.encoder_block = nn.ModuleList([self.conv_layer(widths[0], widths[0])])
    self.conv_block_enc = nn.ModuleList([self.conv_layer(widths[0], widths[0])])
    for i in range(len(widths) - 1):
      self.encoder_block.append(self.conv_layer(widths[i], widths[i + 1]))
      if i == 0:
        self.conv_block_enc.append(self.conv_layer(widths[i + 1], widths[i + 1]))
      else:
        self.conv_block_enc.append(nn.Sequential(self.conv_layer(widths[i + 1], widths[i + 1]),
                                                 self.conv_layer(widths[i + 1], widths[i + 1])))

  def conv_layer(self, cin, cout):
    return ConvTask(cin, cout, self.num_tasks)

  def forward(self, x, input_task, a_taskpair):
    x = self.pred_encoder_source[input_task](x)
    for encoder, block in zip(self.encoder_block, self.conv_block_enc):
      x = encoder(x, a_taskpair)
      for layer in (block if isinstance(block, nn.Sequential) else [block]):
        x = layer(x, a_taskpair)
      x, _ = F.max_pool2d(x, kernel_size=2, stride=2, return_indices=True)
    return x


class Mapfns(nn.Module):
  """forward(x_pred, gt, feat, w, ssl_type, gumbel_noise) on ONE image, as MTPSL's.

  x_pred: per task [1, C, H, W] (logits, depth, unit normals); gt: per task the
  label as the loop gives it ([1, H, W] long class ids, [1, 1, H, W] depth,
  [1, 3, H, W] normals); feat [1, C', h, w]; w: [T] 1 = labelled;
  gumbel_noise: per task None or [T-1, C, H, W], slot j for the j-th other task.
  """

  def __init__(self, tasks, kinds, input_channels, widths=WIDTHS):
    super().__init__()
    assert len(tasks) == len(input_channels) == len(kinds)
    self.tasks, self.kinds = list(tasks), dict(zip(tasks, kinds))
    self.input_channels = dict(zip(tasks, input_channels))
    self.mapfns = SegNetEnc(input_channels, widths)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.xavier_normal_(m.weight)
        nn.init.constant_(m.bias, 0)
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)

  def forward(self, x_pred, gt, feat, w, ssl_type, gumbel_noise, reg_weight=0.5):
    if ssl_type == 'full':
      target_task_index = torch.arange(len(self.tasks))
      source_task_index = torch.arange(len(self.tasks))
    else:
      target_task_index = (w.data == 1).nonzero(as_tuple=False).view(-1)
      source_task_index = (w.data == 0).nonzero(as_tuple=False).view(-1)
    loss = 0
    if len(source_task_index) > 0:
      for source_task in source_task_index.tolist():
        for target_task in target_task_index.tolist():
          if source_task != target_task:
            slot = target_task - int(target_task > source_task)
            noise = gumbel_noise[source_task]
            source_pred = self.pre_process_pred(
                x_pred[source_task], self.tasks[source_task],
                None if noise is None else noise[slot:slot + 1])
            target_gt = self.pre_process_gt(gt[target_task], self.tasks[target_task])
            a_taskpair = pair_code(source_task, target_task, len(self.tasks), source_pred)
            mapout_source = self.mapfns(source_pred, source_task, a_taskpair)
            mapout_target = self.mapfns(target_gt, target_task, a_taskpair)
            loss = loss + self.compute_loss(mapout_source, mapout_target, feat, reg_weight)
    return loss

  def pre_process_pred(self, pred, task, noise):
    kind = self.kinds[task]
    if kind in ('categorical', 'binary'):
      if kind == 'binary':
        pred = torch.cat([torch.zeros_like(pred), pred], dim=1)
      return gumbel_softmax(pred, noise, tau=1, hard=True, dim=1)
    if kind == 'depth':
      return pred / (pred.max() + 1e-12)
    return (pred + 1.0) / 2.0

  def pre_process_gt(self, gt, task):
    kind = self.kinds[task]
    if kind in ('categorical', 'binary'):
      gt = gt.unsqueeze(0)
      binary_mask = (gt == IGNORE).type(torch.get_default_dtype())
      num_classes = self.input_channels[task]
      gt_ = gt.float() * (1 - binary_mask)
      return torch.zeros(gt.size(0), num_classes, gt.size(2), gt.size(3)).scatter_(
          1, gt_.type(torch.LongTensor), 1).detach() * (1 - binary_mask)
    if kind == 'depth':
      return gt / (gt.max() + 1e-12)
    return (gt + 1.0) / 2.0

  def compute_loss(self, mapout_source, mapout_target, feat, reg_weight=0.5):
    l_s_t = 1 - F.cosine_similarity(mapout_source, mapout_target, dim=1, eps=1e-12).mean()
    l_s_f = 1 - F.cosine_similarity(mapout_source, feat.detach(), dim=1, eps=1e-12).mean()
    l_t_f = 1 - F.cosine_similarity(mapout_target, feat.detach(), dim=1, eps=1e-12).mean()
    if reg_weight > 0:
      return l_s_t + reg_weight * (l_s_f + l_t_f)
    return l_s_t


def batch_loss(mapfns, raw_predictions, labels, feat, labelled, gumbel_noise, reg_weight=0.5):
  """The training loop's sum over images of `mapfns(...)`, over the batch size.

  raw_predictions: per task [B, C, H, W] raw outputs (normals not yet unit);
  labels: per task [B, H, W] class ids / [B, 1, H, W] depth / [B, 3, H, W] normals;
  feat: [B, C', h, w]; labelled: [B, T] 0/1 or None ('full');
  gumbel_noise: per task None or [B, T-1, C, H, W].
  """
  batch = feat.shape[0]
  total = 0
  for b in range(batch):
    preds = [model_normals(p[b:b + 1]) if mapfns.kinds[t] == 'normals' else p[b:b + 1]
             for t, p in zip(mapfns.tasks, raw_predictions)]
    gts = [g[b:b + 1] for g in labels]
    if labelled is None:
      w, ssl_type = torch.ones(len(mapfns.tasks)), 'full'
    else:
      w, ssl_type = torch.as_tensor(labelled[b]).float(), 'partial'
    noise = [None if n is None else n[b] for n in gumbel_noise]
    total = total + mapfns(preds, gts, feat[b:b + 1], w, ssl_type, noise,
                           reg_weight=reg_weight) / batch
  return total
