"""PyTorch reference for the `invpt` framework's decoder: a transcription of InvPT.

Source: prismformore/Multi-Task-Transformer, InvPT/models/transformer_net.py
(TransformerNet without its backbone), InvPT/models/transformers/
transformer_decoder.py (TransformerDecoder, ConvBlock, MLPHead) and
InvPT/models/transformers/invpt.py (InvPT, InvPTStage, InvPTBlock,
SelfAttention, UpEmbed, Mlp). Module names, and so state_dict keys, are
InvPT's: `InvPTHeads(...).state_dict()` is TransformerNet's state_dict minus
its 'backbone.' keys. Differences, none numerical: BatchNorm2d for
SyncBatchNorm, no einops, no dropout/drop-path (inference), the backbone
taps are arguments, and the configuration `p` is explicit arguments.

Only used to write tests/golden/invpt.npz (make_invpt_golden.py) and by the
live parity check in tests/test_invpt.py.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

SPEC = {  # TransformerDecoder.__init__'s spec, minus what depends on the widths
    'NUM_STAGES': 3,
    'PATCH_SIZE': [0, 3, 3],
    'PATCH_STRIDE': [0, 1, 1],
    'PATCH_PADDING': [0, 2, 2],
    'NUM_HEADS': [2, 2, 2],
    'MLP_RATIO': [4., 4., 4.],
    'QKV_BIAS': [True, True, True],
    'KERNEL_KV': [2, 4, 8],
    'STRIDE_KV': [2, 4, 8],
    'KERNEL_Q': [3, 3, 3],
    'PADDING_Q': [1, 1, 1],
    'STRIDE_Q': [2, 2, 2],
}


def to_map(tokens, h, w):
  """'b (h w) c -> b c h w'."""
  return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


def to_tokens(x):
  """'b c h w -> b (h w) c'."""
  return x.flatten(2).transpose(1, 2)


class UpEmbed(nn.Module):

  def __init__(self, in_chans, embed_dim, patch_size=3, padding=2):
    super().__init__()
    self.proj = nn.Sequential(
        nn.Upsample(scale_factor=2, mode='bilinear', align_corners=False),
        nn.Conv2d(in_chans, embed_dim, patch_size, padding=padding, bias=False, dilation=padding),
        nn.BatchNorm2d(embed_dim), nn.ReLU(),
        nn.Conv2d(embed_dim, embed_dim, patch_size, padding=padding, bias=False,
                  dilation=padding),
        nn.BatchNorm2d(embed_dim), nn.ReLU())

  def forward(self, x):
    return self.proj(x)


class Mlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
  """q_method 'dw_bn', kv_method 'avg' (AvgPool2d, ceil_mode=True), as InvPT configures it."""

  def __init__(self, fea_no, dim, num_heads, qkv_bias, kernel_q, padding_q, stride_q,
               kernel_kv, stride_kv):
    super().__init__()
    self.num_heads, self.fea_no, self.scale = num_heads, fea_no, dim ** -0.5
    self.conv_proj_q = nn.ModuleList([nn.Sequential(OrderedDict([
        ('conv', nn.Conv2d(dim, dim, kernel_q, padding=padding_q, stride=stride_q, bias=False,
                           groups=dim)),
        ('bn', nn.BatchNorm2d(dim))])) for _ in range(fea_no)])
    # Parameter-free average pools: keys and values are the same pooled tokens.
    self.conv_proj_k = nn.ModuleList([nn.Sequential(OrderedDict([
        ('avg', nn.AvgPool2d(kernel_kv, stride_kv, 0, ceil_mode=True))])) for _ in range(fea_no)])
    self.conv_proj_v = nn.ModuleList([nn.Sequential(OrderedDict([
        ('avg', nn.AvgPool2d(kernel_kv, stride_kv, 0, ceil_mode=True))])) for _ in range(fea_no)])
    self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
    self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
    self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
    self.proj = nn.Linear(dim, dim)
    self.fuse_attn = nn.Conv2d(num_heads * 2, num_heads, 1)

  def split_heads(self, x):
    """'b t (h d) -> b h t d'."""
    return x.reshape(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

  def forward(self, x, h, w, messages):
    res = h * w
    maps = [to_map(x[:, res * i:res * (i + 1)], h, w) for i in range(self.fea_no)]
    q = torch.cat([to_tokens(self.conv_proj_q[i](m)) for i, m in enumerate(maps)], dim=1)
    k = torch.cat([to_tokens(self.conv_proj_k[i](m)) for i, m in enumerate(maps)], dim=1)
    v = torch.cat([to_tokens(self.conv_proj_v[i](m)) for i, m in enumerate(maps)], dim=1)
    q, k, v = (self.split_heads(p(t)) for p, t in
               ((self.proj_q, q), (self.proj_k, k), (self.proj_v, v)))
    score = torch.einsum('bhlk,bhtk->bhlt', q, k) * self.scale
    if messages['attn'] is not None:
      previous = messages['attn']
      sh, sw = h // 4, w // 4
      batch, heads, _, keys = previous.shape
      upsampled = []
      for i in range(self.fea_no):
        part = previous[:, :, sh * sw * i:sh * sw * (i + 1)]
        # 'b h (m n) a -> (b h) a m n'
        part = part.reshape(batch * heads, sh, sw, keys).permute(0, 3, 1, 2)
        part = F.interpolate(part, scale_factor=2, mode='bilinear', align_corners=False)
        # '(b h) a m n -> b h (m n) a'
        upsampled.append(part.permute(0, 2, 3, 1).reshape(batch, heads, -1, keys))
      score = self.fuse_attn(torch.cat([score, torch.cat(upsampled, dim=2)], dim=1))
    messages['attn'] = score
    out = torch.einsum('bhlt,bhtv->bhlv', F.softmax(score, dim=-1), v)
    return self.proj(out.transpose(1, 2).flatten(2))


class InvPTBlock(nn.Module):

  def __init__(self, task_no, dim, num_heads, mlp_ratio, qkv_bias, **kwargs):
    super().__init__()
    self.task_no, self.stride_q = task_no, kwargs['stride_q']
    self.norm1 = nn.LayerNorm(dim)
    self.norm2 = nn.LayerNorm(dim)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))
    self.attn = SelfAttention(task_no, dim, num_heads, qkv_bias, **kwargs)

  def forward(self, x_list, messages):
    h, w = x_list[0].shape[2:]
    x = torch.cat([to_tokens(m) for m in x_list], dim=1)
    attn = self.attn(self.norm1(x), h, w, messages)
    sh, sw = h // self.stride_q, w // self.stride_q
    attn = torch.cat([to_tokens(F.interpolate(
        to_map(attn[:, sh * sw * i:sh * sw * (i + 1)], sh, sw), size=(h, w), mode='bilinear',
        align_corners=False)) for i in range(self.task_no)], dim=1)
    x = x + attn
    x = x + self.mlp(self.norm2(x))
    return [to_map(x[:, h * w * i:h * w * (i + 1)], h, w) for i in range(self.task_no)]


class InvPTStage(nn.Module):

  def __init__(self, stage_idx, task_no, in_chans, embed_dim, patch_size, patch_padding,
               num_heads, mlp_ratio, qkv_bias, **kwargs):
    super().__init__()
    self.stage_idx, self.task_no = stage_idx, task_no
    self.patch_embed = None if patch_size == 0 else nn.ModuleList(
        [UpEmbed(in_chans, embed_dim, patch_size, patch_padding) for _ in range(task_no)])
    self.blocks = nn.ModuleList([InvPTBlock(task_no, embed_dim, num_heads, mlp_ratio, qkv_bias,
                                            **kwargs)])

  def forward(self, x_list, messages, back_fea):
    if self.patch_embed is not None:
      skip = back_fea[{0: 2, 1: 1, 2: 0}[self.stage_idx]]
      x_list = [self.patch_embed[i](x) + skip for i, x in enumerate(x_list)]
    for blk in self.blocks:
      x_list = blk(x_list, messages)
    return x_list


class InvPT(nn.Module):

  def __init__(self, tasks, num_output, in_chans, ori_embed_dim, mtt_resolution):
    super().__init__()
    self.all_tasks, self.mtt_resolution = list(tasks), mtt_resolution
    task_no = len(self.all_tasks)
    dims = [in_chans, in_chans // 2, in_chans // 4]
    self.mt_embed_dims = dims
    self.norm_mts = nn.ModuleList()
    self.redu_chan = nn.ModuleList()
    self.invpt_stages = nn.ModuleList()
    previous = in_chans
    for i in range(SPEC['NUM_STAGES']):
      self.invpt_stages.append(InvPTStage(
          i, task_no, previous, dims[i], SPEC['PATCH_SIZE'][i], SPEC['PATCH_PADDING'][i],
          SPEC['NUM_HEADS'][i], SPEC['MLP_RATIO'][i], SPEC['QKV_BIAS'][i],
          kernel_q=SPEC['KERNEL_Q'][i], padding_q=SPEC['PADDING_Q'][i],
          stride_q=SPEC['STRIDE_Q'][i], kernel_kv=SPEC['KERNEL_KV'][i],
          stride_kv=SPEC['STRIDE_KV'][i]))
      previous = dims[i]
      self.norm_mts.append(nn.LayerNorm(dims[i] * task_no))
      self.redu_chan.append(nn.ModuleList([nn.Conv2d(dims[i], in_chans, 1)
                                           for _ in range(task_no)]))
    self.norm_mt = nn.LayerNorm(task_no * dims[-1])  # unused by InvPT's forward
    self.mt_proj = nn.ModuleDict({t: nn.Sequential(
        nn.Conv2d(in_chans, in_chans, 3, padding=1), nn.BatchNorm2d(in_chans), nn.ReLU())
                                  for t in self.all_tasks})
    self.mix_proj = nn.ModuleDict({t: nn.Sequential(
        nn.Conv2d(ori_embed_dim + num_output[t], in_chans, 1)) for t in self.all_tasks})

  def forward(self, x_dict, inter_pred, back_fea):
    x_list = [self.mix_proj[t](torch.cat([x_dict[t], inter_pred[t]], dim=1))
              for t in self.all_tasks]
    messages = {'attn': None}
    h, w = self.mtt_resolution
    stages = SPEC['NUM_STAGES']
    th, tw = h * 2 ** (stages - 1) * 2, w * 2 ** (stages - 1) * 2
    summed = {t: 0 for t in self.all_tasks}
    for i in range(stages):
      x_list = self.invpt_stages[i](x_list, messages, back_fea)
      x = self.norm_mts[i](torch.cat([to_tokens(m) for m in x_list], dim=2))
      x = to_map(x, h * 2 ** i, w * 2 ** i)
      dim = self.mt_embed_dims[i]
      for ii, task in enumerate(self.all_tasks):
        task_x = x[:, dim * ii:dim * (ii + 1)]
        if i > 0:
          task_x = self.redu_chan[i][ii](task_x)
        summed[task] = summed[task] + F.interpolate(task_x, size=(th, tw), mode='bilinear',
                                                    align_corners=False)
    return {t: self.mt_proj[t](summed[t]) for t in self.all_tasks}


class ConvBlock(nn.Module):

  def __init__(self, inplanes, planes):
    super().__init__()
    self.conv = nn.Conv2d(inplanes, planes, 3, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU()

  def forward(self, x):
    return self.relu(self.bn1(self.conv(x)))


class TransformerDecoder(nn.Module):
  """InvPT's decoder; `spatial_dim` = the taps' (h, w) at stride 16."""

  def __init__(self, tasks, num_output, backbone_channels, spatial_dim, embed_dim=512,
               pred_out_num_constant=64, mtt_resolution_downsample_rate=2):
    super().__init__()
    self.tasks, self.spatial_dim = list(tasks), spatial_dim
    self.mtt_resolution = [s // mtt_resolution_downsample_rate for s in spatial_dim]
    width = embed_dim + pred_out_num_constant
    dims = [width, width // 2, width // 4]
    self.intermediate_head = nn.ModuleDict()
    self.invpt = InvPT(tasks, num_output, width, embed_dim, self.mtt_resolution)
    self.preliminary_decoder = nn.ModuleDict()
    for t in self.tasks:
      self.intermediate_head[t] = nn.Conv2d(embed_dim, num_output[t], 1)
      self.preliminary_decoder[t] = nn.Sequential(
          ConvBlock(backbone_channels[-1], backbone_channels[-1]),
          ConvBlock(backbone_channels[-1], embed_dim))
    self.scale_embed = nn.ModuleList([
        nn.ConvTranspose2d(backbone_channels[0], dims[2], 3, stride=2, padding=1,
                           output_padding=1),
        nn.Conv2d(backbone_channels[1], dims[1], 3, padding=1),
        nn.Conv2d(backbone_channels[2], dims[0], 3, padding=1),  # its output is never used
        None])

  def forward(self, x_list):
    back_fea = []
    for sca, tokens in enumerate(x_list):
      fea = to_map(tokens, *self.spatial_dim)
      if sca == 3:
        x = fea
      if self.scale_embed[sca] is not None:
        fea = self.scale_embed[sca](fea)
      back_fea.append(fea)
    x = F.interpolate(x, size=tuple(self.mtt_resolution), mode='bilinear', align_corners=False)
    features, inter_pred = {}, {}
    for task in self.tasks:
      features[task] = self.preliminary_decoder[task](x)
      inter_pred[task] = self.intermediate_head[task](features[task])
    return self.invpt(features, inter_pred, back_fea), inter_pred


class MLPHead(nn.Module):

  def __init__(self, in_channels, num_classes):
    super().__init__()
    self.linear_pred = nn.Conv2d(in_channels, num_classes, 1)

  def forward(self, x):
    return self.linear_pred(x)


class InvPTHeads(nn.Module):
  """TransformerNet after the backbone: `forward(taps, img_size)` with the four taps as
  (batch, h * w, dim) tokens; returns (predictions, intermediate predictions, features),
  {task: NCHW}, the predictions at `img_size` as TransformerNet returns them."""

  def __init__(self, tasks, num_output, backbone_dim, spatial_dim, embed_dim=512,
               pred_out_num_constant=64):
    super().__init__()
    self.tasks = list(tasks)
    self.multi_task_decoder = TransformerDecoder(tasks, num_output, [backbone_dim] * 4,
                                                 spatial_dim, embed_dim, pred_out_num_constant)
    width = embed_dim + pred_out_num_constant
    self.heads = nn.ModuleDict({t: MLPHead(width, num_output[t]) for t in self.tasks})

  def forward(self, taps, img_size):
    features, inter_preds = self.multi_task_decoder(taps)
    up = lambda x: F.interpolate(x, img_size, mode='bilinear')
    predictions = {t: up(self.heads[t](features[t])) for t in self.tasks}
    return predictions, {t: up(v) for t, v in inter_preds.items()}, features


class ViTBlock(nn.Module):
  """InvPT/models/transformers/vit.py Block (Attention, Mlp), at inference."""

  def __init__(self, dim, num_heads, mlp_ratio):
    super().__init__()
    self.num_heads = num_heads
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = nn.Module()
    self.attn.qkv = nn.Linear(dim, 3 * dim)
    self.attn.proj = nn.Linear(dim, dim)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = nn.Module()
    self.mlp.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
    self.mlp.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.attn.qkv(self.norm1(x)).reshape(b, n, 3, self.num_heads, c // self.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (c // self.num_heads) ** -0.5).softmax(dim=-1)
    x = x + self.attn.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
    return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class InvPTViT(nn.Module):
  """InvPT/models/transformers/vit.py VisionTransformer.forward_features at inference:
  `img_size` (h, w) is the training size (the position embedding's grid, no resize), and
  the tokens after the blocks numbered in `select_list` (1-based, class token dropped) plus
  the final normed tokens are returned."""

  def __init__(self, img_size, dim, depth, num_heads, mlp_ratio, select_list, patch_size=16):
    super().__init__()
    self.select_list = list(select_list)
    grid = (img_size[0] // patch_size) * (img_size[1] // patch_size)
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, grid + 1, dim))
    self.blocks = nn.Sequential(*[ViTBlock(dim, num_heads, mlp_ratio) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)

  def forward(self, x):
    x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
    selected = []
    for idx, block in enumerate(self.blocks):
      x = block(x)
      if idx + 1 in self.select_list:
        selected.append(x[:, 1:])
    selected.append(self.norm(x)[:, 1:])
    return selected


class TransformerNet(nn.Module):
  """InvPT/models/transformer_net.py TransformerNet with its ViT: the whole model, whose
  state_dict has the released checkpoints' keys (without DataParallel's 'module.').
  `forward(images)` returns (predictions, intermediate predictions, features)."""

  def __init__(self, tasks, num_output, img_size, dim, depth, num_heads, mlp_ratio,
               embed_dim, pred_out_num_constant):
    super().__init__()
    select_list = [round(depth * k / 4) for k in (1, 2, 3)]  # ViT-L: [6, 12, 18]
    self.backbone = InvPTViT(img_size, dim, depth, num_heads, mlp_ratio, select_list)
    heads = InvPTHeads(tasks, num_output, dim, [s // 16 for s in img_size], embed_dim,
                       pred_out_num_constant)
    self.multi_task_decoder, self.heads, self._heads = heads.multi_task_decoder, heads.heads, [heads]

  def forward(self, images):
    return self._heads[0](self.backbone(images), images.shape[-2:])


def resize_pos_embed(posemb, grid_new):
  """InvPT/models/transformers/vit.py resize_pos_embed (one class token): the square grid of
  a checkpoint's position embedding resized to `grid_new` when the weights are loaded."""
  tokens, grid = posemb[:, :1], posemb[0, 1:]
  old = int(len(grid) ** 0.5)
  grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
  grid = F.interpolate(grid, size=grid_new, mode='bicubic', align_corners=False)
  grid = grid.permute(0, 2, 3, 1).reshape(1, grid_new[0] * grid_new[1], -1)
  return torch.cat([tokens, grid], dim=1)
