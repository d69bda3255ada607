"""PyTorch reference of JTR's regularizer (Nishi et al., CVPR 2024) for the parity tests.

A transcription of KentoNishi/JTR-CVPR-2024 `code/models/nyuv2_segnet_jtr.py`
(`SegNet_JTR`: network and `compute_losses`), `code/utils/process.py`,
`code/utils/gumbel.py` and the per-image loop of `code/train_nyuv2.py`, for
NYUv2's layout (semseg, depth, normals; ignore label -1, invalid depth and
normals 0). Changes, none of which alters a value: the Gumbel(0, 1) noise of
each hard Gumbel-softmax call is passed in (`noise[site]`, sites named as
`GUMBEL_SITES`) instead of drawn; tensors live on the CPU and take the
predictions' dtype (float64 for the golden values); the network's `widths` may
be changed for small tests; NYUv2's number of network stages (5) follows
`len(widths)`. `RECORD` collects what the golden generator needs to check that
no argmax (max-pool, hard Gumbel) is close to a tie and no ReLU or L1 input close
to its kink.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

WIDTHS = (64, 128, 256, 512, 512)
DEPTH_MEAN, DEPTH_STD = 2.3618, 1.5876
# The hard Gumbel-softmax calls of compute_losses, in call order; those marked
# 'unlabelled' happen only when semseg is not labelled.
GUMBEL_SITES = ('yhat_view1', 'y_view1',  # unlabelled
                'y_view2', 'recon_target_y2',  # unlabelled
                'recon_target_yhat2')

# While recording, lists of: max-pool inputs, Gumbel soft samples, ReLU inputs (BN
# outputs) and the depth L1 differences on masked-in pixels; else None.
RECORD = {'pools': None, 'gumbel': None, 'relu': None, 'l1': None}


def _record(kind, tensor):
  if RECORD[kind] is not None:
    RECORD[kind].append(tensor.detach().clone())


def _transform(x):
  """torch.distributions.Normal(2.3618, 1.5876).cdf, as Normal.cdf writes it."""
  return 0.5 * (1 + torch.erf((x - DEPTH_MEAN) * (1.0 / DEPTH_STD) / math.sqrt(2)))


def gumbel_softmax_hard(logits, gumbels, dim=1):
  """gumbel.gumbel_softmax(tau=1, hard=True) with the given Gumbel(0, 1) draws."""
  y_soft = (logits + gumbels).softmax(dim)
  _record('gumbel', y_soft)
  index = y_soft.max(dim, keepdim=True)[1]
  y_hard = torch.zeros_like(logits).scatter_(dim, index, 1.0)
  return y_hard - y_soft.detach() + y_soft


def preprocess_seg_pred(pred, mask, noise=None):
  """hard=True when the noise of a Gumbel call is given, else the softmax."""
  return (gumbel_softmax_hard(pred, noise) if noise is not None
          else F.softmax(pred, dim=1)) * mask


def preprocess_depth_pred(pred, mask):
  return _transform(pred * mask)


def preprocess_normal_pred(pred, mask):
  return (pred * mask + 1.0) / 2.0


def get_mask_seg_gt(y):
  return (y != -1).long().unsqueeze(0).detach()


def get_mask_depth_gt(y):
  return (torch.sum(y, dim=1) != 0).long().unsqueeze(1).detach()


def get_mask_normal_gt(y):
  return (torch.sum(y, dim=1) != 0).long().unsqueeze(1).detach()


def get_jtr_mask_intersection_nyuv2(seg_gt, depth_gt, normal_gt, labeled_tasks):
  mask = torch.ones_like(seg_gt.unsqueeze(0))
  if 0 in labeled_tasks:
    mask *= get_mask_seg_gt(seg_gt)
  if 1 in labeled_tasks:
    mask *= get_mask_depth_gt(depth_gt)
  if 2 in labeled_tasks:
    mask *= get_mask_normal_gt(normal_gt)
  return mask.detach()


def preprocess_seg_gt(y, num_classes, dtype):
  y = y.unsqueeze(0)
  binary_mask = (y == -1).to(dtype)
  y_1 = y.to(dtype) * (1 - binary_mask)
  y_2 = torch.zeros(y.size(0), num_classes, y.size(2), y.size(3), dtype=dtype).scatter_(
      1, y_1.long(), 1).detach() * (1 - binary_mask)
  return y_2


def preprocess_depth_gt(y):
  return _transform(y * get_mask_depth_gt(y))


def preprocess_normal_gt(y):
  return (y + 1.0) / 2.0


def _get_detached_and_size(x):
  size = x.nonzero().size(0)
  return x.detach(), size if size != 0 else 1


def get_recon_loss_seg(x_pred, x_output, mask):
  x_output, mask_size = _get_detached_and_size(x_output)
  return (F.binary_cross_entropy_with_logits(x_pred, x_output, reduction='none')
          * mask).sum() / mask_size


def get_recon_loss_depth(x_pred, x_output, mask):
  x_output, mask_size = _get_detached_and_size(x_output)
  x_pred = (torch.sigmoid(x_pred) - 0.5) * (1 - 1e-5) + 0.5
  x_output = _transform(x_output)
  _record('l1', (x_pred - x_output)[mask.expand_as(x_pred) != 0])
  return (F.l1_loss(x_pred, x_output, reduction='none') * mask).sum() / mask_size


def get_recon_loss_normal(x_pred, x_output, mask):
  x_output, mask_size = _get_detached_and_size(x_output)
  return 1 - torch.sum(
      (x_pred / torch.norm(x_pred, p=2, dim=1, keepdim=True)) * x_output * mask) / mask_size


def conv_layer(cin, cout):
  return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True))


class SegNetJTR(nn.Module):
  """`SegNet_JTR` with the same state_dict keys (its unused `batchnorm` included)."""

  def __init__(self, channel_dims, widths=WIDTHS):
    super().__init__()
    self.channel_dims = list(channel_dims)
    in_channels = sum(channel_dims)
    f = list(widths)
    n = len(f)
    self.encoder_block = nn.ModuleList([conv_layer(in_channels, f[0])])
    self.decoder_block = nn.ModuleList([conv_layer(f[0], f[0])])
    for i in range(n - 1):
      self.encoder_block.append(conv_layer(f[i], f[i + 1]))
      self.decoder_block.append(conv_layer(f[i + 1], f[i]))
    self.conv_block_enc = nn.ModuleList([conv_layer(f[0], f[0])])
    self.conv_block_dec = nn.ModuleList([conv_layer(f[0], f[0])])
    for i in range(n - 1):
      if i == 0:
        self.conv_block_enc.append(conv_layer(f[i + 1], f[i + 1]))
        self.conv_block_dec.append(conv_layer(f[i], f[i]))
      else:
        self.conv_block_enc.append(nn.Sequential(conv_layer(f[i + 1], f[i + 1]),
                                                 conv_layer(f[i + 1], f[i + 1])))
        self.conv_block_dec.append(nn.Sequential(conv_layer(f[i], f[i]),
                                                 conv_layer(f[i], f[i])))
    self.pred_layer = nn.Sequential(nn.Conv2d(f[0], f[0], 3, padding=1),
                                    nn.Conv2d(f[0], in_channels, 1))
    self.batchnorm = nn.BatchNorm2d(in_channels)  # never used, as in the reference
    for name, module in self.named_modules():
      if isinstance(module, nn.BatchNorm2d) and name != 'batchnorm':
        module.register_forward_hook(lambda module, inputs, out: _record('relu', out))

  def _pool(self, x):
    _record('pools', x)
    return F.max_pool2d(x, 2, 2, return_indices=True)

  def forward(self, x, return_feat_only=False):
    indices = []
    for encoder, block in zip(self.encoder_block, self.conv_block_enc):
      x, index = self._pool(block(encoder(x)))
      indices.append(index)
    feat = x
    if return_feat_only:
      return feat
    for stage in reversed(range(len(indices))):
      x = F.max_unpool2d(x, indices[stage], 2, 2)
      x = self.conv_block_dec[stage](self.decoder_block[stage](x))
    return feat, self.pred_layer(x)

  def compute_losses(self, items_1, items_2, labeled_tasks, num_classes, recon_dist_weight,
                     noise):
    """As the reference; `noise[site]`: [1, classes, H, W] Gumbel draws of one image."""
    (pred_seg_1, pred_depth_1, pred_normal_1, seg_1, depth_1, normal_1) = [
        items_1[i].detach() if i in labeled_tasks else items_1[i] for i in range(6)]
    (pred_seg_2, pred_depth_2, pred_normal_2, seg_2, depth_2, normal_2) = [
        items_2[i].detach() if i in labeled_tasks else items_2[i] for i in range(6)]
    dtype = pred_seg_1.dtype
    mask_1 = get_jtr_mask_intersection_nyuv2(seg_1, depth_1, normal_1, labeled_tasks)
    mask_2 = get_jtr_mask_intersection_nyuv2(seg_2, depth_2, normal_2, labeled_tasks)

    y_hat_1 = torch.cat([preprocess_seg_pred(pred_seg_1, mask_1, noise['yhat_view1']),
                         preprocess_depth_pred(pred_depth_1, mask_1),
                         preprocess_normal_pred(pred_normal_1, mask_1)], dim=1)
    y_1 = torch.cat([
        preprocess_seg_gt(seg_1, num_classes, dtype) if 0 in labeled_tasks
        else preprocess_seg_pred(pred_seg_1, mask_1, noise['y_view1']),
        preprocess_depth_gt(depth_1) if 1 in labeled_tasks
        else preprocess_depth_pred(pred_depth_1, mask_1),
        preprocess_normal_gt(normal_1) if 2 in labeled_tasks
        else preprocess_normal_pred(pred_normal_1, mask_1)], dim=1)
    y_hat_2 = torch.cat([preprocess_seg_pred(pred_seg_2, mask_2),
                         preprocess_depth_pred(pred_depth_2, mask_2),
                         preprocess_normal_pred(pred_normal_2, mask_2)], dim=1)
    y_2 = torch.cat([
        preprocess_seg_gt(seg_2, num_classes, dtype) if 0 in labeled_tasks
        else preprocess_seg_pred(pred_seg_2, mask_2, noise['y_view2']),
        preprocess_depth_gt(depth_2) if 1 in labeled_tasks
        else preprocess_depth_pred(pred_depth_2, mask_2),
        preprocess_normal_gt(normal_2) if 2 in labeled_tasks
        else preprocess_normal_pred(pred_normal_2, mask_2)], dim=1)

    copied = copy.deepcopy(self)
    feat_y_1 = copied(y_1, return_feat_only=True)
    feat_y_hat_1 = copied(y_hat_1, return_feat_only=True)
    feat_y_2, recon_y_2 = self(y_2.detach())
    feat_y_hat_2, recon_y_hat_2 = self(y_hat_2.detach())
    recon_y_2_seg, recon_y_2_depth, recon_y_2_normal = torch.split(
        recon_y_2, self.channel_dims, dim=1)
    recon_y_hat_2_seg, recon_y_hat_2_depth, recon_y_hat_2_normal = torch.split(
        recon_y_hat_2, self.channel_dims, dim=1)

    dist_1 = 1 - F.cosine_similarity(feat_y_1, feat_y_hat_1, dim=1, eps=1e-12).mean()
    dist_2 = 1 - F.cosine_similarity(feat_y_2, feat_y_hat_2, dim=1, eps=1e-12).mean()
    l_dist = dist_1 + recon_dist_weight * dist_2
    l_recon = (
        get_recon_loss_seg(
            recon_y_2_seg,
            preprocess_seg_gt(seg_2, num_classes, dtype) if 0 in labeled_tasks
            else preprocess_seg_pred(pred_seg_2, mask_2, noise['recon_target_y2']),
            mask_2)
        + get_recon_loss_depth(recon_y_2_depth,
                               depth_2 if 1 in labeled_tasks else pred_depth_2, mask_2)
        + get_recon_loss_normal(recon_y_2_normal,
                                normal_2 if 2 in labeled_tasks else pred_normal_2, mask_2)
        + get_recon_loss_seg(
            recon_y_hat_2_seg,
            preprocess_seg_pred(pred_seg_2, mask_2, noise['recon_target_yhat2']), mask_2)
        + get_recon_loss_depth(recon_y_hat_2_depth, preprocess_depth_pred(pred_depth_2, mask_2),
                               mask_2)
        + get_recon_loss_normal(recon_y_hat_2_normal,
                                preprocess_normal_pred(pred_normal_2, mask_2), mask_2))
    return l_dist, l_recon, dist_1, dist_2


def jtr_loss(jtr, preds_1, preds_2, labels_1, labels_2, labelled_sets, noise, num_classes,
             dist_mtl_weight=4.0, recon_weight=2.0):
  """The JTR part of train_nyuv2.py's per-image loop, NCHW.

  preds_v: [B, classes + 1 + 3, H, W] raw outputs of view v (normals unnormalised: the
    MTL model's last op, dividing them by their norm, is applied here);
  labels_v: (seg [B, H, W] long with -1 ignored, depth [B, 1, H, W], normals [B, 3, H, W]);
  labelled_sets: per image the labelled task indices (0 semseg, 1 depth, 2 normals);
  noise: site -> [B, classes, H, W] Gumbel draws.
  Returns (loss, per-image [L_dist], [L_recon], [view-1 distance], [view-2 distance]).
  """
  batch = preds_1.shape[0]
  dims = [num_classes, 1, 3]

  def split(preds, ind):
    seg, depth, normal = torch.split(preds[ind].unsqueeze(0), dims, dim=1)
    return seg, depth, normal / torch.norm(normal, p=2, dim=1, keepdim=True)

  loss = 0.0
  parts = ([], [], [], [])
  for ind in range(batch):
    items = [(*split(preds, ind), *(label[ind].unsqueeze(0) for label in labels))
             for preds, labels in ((preds_1, labels_1), (preds_2, labels_2))]
    out = jtr.compute_losses(items[0], items[1], list(labelled_sets[ind]), num_classes,
                             recon_weight, {k: v[ind:ind + 1] for k, v in noise.items()})
    l_dist, l_recon = out[:2]
    loss = loss + (dist_mtl_weight * l_dist + recon_weight * l_recon) / batch
    for part, value in zip(parts, out):
      part.append(value)
  return (loss, *(torch.stack(p) for p in parts))
