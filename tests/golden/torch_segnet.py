"""PyTorch reference of MTAN's split SegNet for the parity tests (needs torch).

A transcription of `SegNet` (type 'standard') in VICO-UoE/MTPSL
`model/segnet_mtl.py` (= lorenmt/mtan's split SegNet) with the same module
names, so its state_dict keys are MTPSL's: encoder_block.0.0.weight,
conv_block_enc.2.1.0.weight, pred_task1.0.weight, ..., logsigma. Only the
forward pass is kept (no losses or metrics); `widths` and `outputs` may be
changed for small tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WIDTHS = (64, 128, 256, 512, 512)
NYUV2_OUTPUTS = (13, 1, 3)  # semantic classes, depth, surface normals


def conv_layer(cin: int, cout: int) -> nn.Sequential:
  """3x3 conv with bias, BatchNorm, ReLU: keys `.0.*` and `.1.*`."""
  return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


def conv_block(channels: int, stage: int) -> nn.Module:
  """One conv_layer for the two finest stages, a Sequential of two for the others."""
  if stage < 2:
    return conv_layer(channels, channels)
  return nn.Sequential(conv_layer(channels, channels), conv_layer(channels, channels))


class SplitSegNet(nn.Module):
  """Forward returns (predictions, logsigma, [bottleneck, decoder output]) as MTPSL's:
  predictions[0] is a log-softmax, predictions[2] unit normals (NCHW)."""

  def __init__(self, widths=WIDTHS, outputs=NYUV2_OUTPUTS):
    super().__init__()
    stages = range(len(widths))
    below = [widths[max(s - 1, 0)] for s in stages]  # decoder width of stage s
    self.encoder_block = nn.ModuleList(
        conv_layer(3 if s == 0 else widths[s - 1], widths[s]) for s in stages)
    self.decoder_block = nn.ModuleList(conv_layer(widths[s], below[s]) for s in stages)
    self.conv_block_enc = nn.ModuleList(conv_block(widths[s], s) for s in stages)
    self.conv_block_dec = nn.ModuleList(conv_block(below[s], s) for s in stages)
    for k, channels in enumerate(outputs, start=1):
      setattr(self, f'pred_task{k}', nn.Sequential(
          nn.Conv2d(widths[0], widths[0], 3, padding=1), nn.Conv2d(widths[0], channels, 1)))
    self.num_tasks = len(outputs)
    self.logsigma = nn.Parameter(torch.full((len(outputs),), -0.5))

  def forward(self, x):
    indices = []
    for encoder, block in zip(self.encoder_block, self.conv_block_enc):
      x, index = F.max_pool2d(block(encoder(x)), 2, 2, return_indices=True)
      indices.append(index)
    bottleneck = x
    for stage in reversed(range(len(indices))):
      x = F.max_unpool2d(x, indices[stage], 2, 2)
      x = self.conv_block_dec[stage](self.decoder_block[stage](x))
    raws = [getattr(self, f'pred_task{k}')(x) for k in range(1, self.num_tasks + 1)]
    predictions = list(raws)
    predictions[0] = F.log_softmax(raws[0], dim=1)
    if len(raws) > 2:
      predictions[2] = raws[2] / torch.norm(raws[2], p=2, dim=1, keepdim=True)
    return predictions, self.logsigma, [bottleneck, x]


def forward_nhwc(model: nn.Module, state_dict: dict, images_nhwc, dtype=torch.float32):
  """Loads numpy `state_dict` strictly, runs eval mode in `dtype`; returns
  (predictions, [bottleneck, decoder output]) as NHWC numpy arrays."""
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  model = model.to(dtype).eval()
  with torch.no_grad():
    predictions, _, features = model(
        torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous().to(dtype))
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  return [nhwc(p) for p in predictions], [nhwc(f) for f in features]
