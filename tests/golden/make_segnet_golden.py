"""Writes segnet.npz, which lets the SegNet parity test run without PyTorch.

The reference is `torch_segnet.SplitSegNet`, a transcription of MTPSL's
SegNet (`model/segnet_mtl.py`). No weights are stored: they are regenerated
from a seed and the stored key layout. segnet.npz holds

  full.keys, full.shapes  the full model's state_dict layout (widths 64-512,
                          NYUv2's 13/1/3 outputs, logsigma included)
  keys, shapes            the layout of the small model of the parity case
  widths, outputs, weight_seed, input_seed, input_shape, margin
  semseg, depth, normals  its outputs as MTPSL returns them (log-softmax, raw,
                          unit normals), NHWC
  bottleneck, decoder     the last max-pool output and the decoder output

The outputs are computed in float64 and stored as float32, so they are the
exact values to float32 rounding. The case uses small widths: where a
max-pool window's two largest values are closer than the float32 rounding of
the compared implementation, it may pick the other position, and the decoder
then unpools its value there: an O(1) difference. With few windows the weight
seed can be chosen (the first from 0) so that in every window the two largest
distinct values differ by at least `MARGIN` times torch's float32 error in
that pool's input (windows of equal values, ReLU zeros, are exact ties in
any precision).

Rerun (needs torch) from the repository root:

  python tests/golden/make_segnet_golden.py
"""

from __future__ import annotations

import json
import os

import numpy as np

from make_golden import GOLDEN_DIR, INPUT_SEED, random_input, random_state_dict

FILE = os.path.join(GOLDEN_DIR, 'segnet.npz')
TASKS = ('semseg', 'depth', 'normals')  # pred_task1..3
OUTPUTS = (13, 1, 3)
WIDTHS = (4, 4, 8, 8, 8)
INPUT_SHAPE = (2, 32, 64, 3)
MARGIN = 100.0
# make_golden's weights (convs of variance 1/fan_in, BatchNorm scales in [0.5, 1]) suit
# residual networks; through SegNet's plain stack of conv-BN-ReLU layers the activations
# shrink about 3x in variance per layer and the bottleneck barely depends on the input
# (7e-4 relative between two inputs). With this gain on every conv they stay O(1-10).
CONV_GAIN = 3.0 ** 0.5


def segnet_state_dict(key_shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
  """make_golden's random weights with the conv weights scaled by CONV_GAIN."""
  state = random_state_dict(key_shapes, seed)
  return {k: (v * CONV_GAIN).astype(np.float32) if v.ndim == 4 else v for k, v in state.items()}


def key_layout(model) -> dict[str, np.ndarray]:
  state = model.state_dict()
  return {'keys': np.array(list(state)),
          'shapes': np.array(json.dumps([list(v.shape) for v in state.values()]))}


def load(path: str = FILE) -> dict[str, np.ndarray]:
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def stored_key_shapes(case: dict[str, np.ndarray], prefix: str = '') -> dict[str, tuple[int, ...]]:
  """The state_dict layout stored under `prefix` ('' for the parity case, 'full.')."""
  return dict(zip(case[f'{prefix}keys'].tolist(),
                  map(tuple, json.loads(str(case[f'{prefix}shapes'])))))


def _run(model, state, images, dtype):
  """Outputs and the inputs of the five max-pools (NHWC numpy) in `dtype`."""
  import torch_segnet  # pylint: disable=import-outside-toplevel
  pooled = {}
  hooks = [block.register_forward_hook(
      lambda module, inputs, out, stage=stage: pooled.__setitem__(
          stage, out.permute(0, 2, 3, 1).double().numpy()))
           for stage, block in enumerate(model.conv_block_enc)]
  try:
    predictions, features = torch_segnet.forward_nhwc(model, state, images, dtype)
  finally:
    for hook in hooks:
      hook.remove()
  return predictions, features, [pooled[s] for s in range(len(pooled))]


def pool_margin(exact, rounded) -> float:
  """min over the max-pools of (smallest nonzero gap between a 2x2 window's two largest
  values in `exact`) / (largest |rounded - exact| of that pool's input)."""
  ratios = []
  for x, y in zip(exact, rounded):
    n, h, w, c = x.shape
    windows = np.sort(x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
                      .reshape(-1, 4), axis=-1)
    gaps = windows[:, -1] - windows[:, -2]
    ratios.append(gaps[gaps > 0].min() / max(np.abs(y - x).max(), 1e-30))
  return float(min(ratios))


def compute_case(widths, outputs, weight_seed, input_seed, input_shape):
  """(model, state, float64 outputs, float32 outputs, margin) of one case."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch_segnet  # pylint: disable=import-outside-toplevel
  model = torch_segnet.SplitSegNet(widths, outputs)
  state = segnet_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()},
                            weight_seed)
  images = random_input(input_shape, input_seed)
  exact = _run(model, state, images, torch.float64)
  rounded = _run(model, state, images, torch.float32)
  return model, state, exact, rounded, pool_margin(exact[2], rounded[2])


def write_golden() -> None:
  import torch_segnet  # pylint: disable=import-outside-toplevel
  seed = 0
  while True:
    model, _, exact, rounded, margin = compute_case(WIDTHS, OUTPUTS, seed, INPUT_SEED,
                                                    INPUT_SHAPE)
    print(f'weight seed {seed}: pool margin {margin:.0f}')
    if margin >= MARGIN:
      break
    seed += 1
  (predictions, features, _), (predictions32, features32, _) = exact, rounded
  full = key_layout(torch_segnet.SplitSegNet())
  np.savez_compressed(
      FILE, **{f'full.{k}': v for k, v in full.items()}, **key_layout(model),
      widths=WIDTHS, outputs=OUTPUTS, weight_seed=seed, input_seed=INPUT_SEED,
      input_shape=INPUT_SHAPE, margin=margin,
      **{task: p.astype(np.float32) for task, p in zip(TASKS, predictions)},
      bottleneck=features[0].astype(np.float32), decoder=features[1].astype(np.float32))
  for name, want, got in zip((*TASKS, 'bottleneck', 'decoder'), (*predictions, *features),
                             (*predictions32, *features32)):
    error = np.abs(got - want).max() / np.abs(want).max()
    print(f'{name} {want.shape}: torch float32 max relative error {error:.1e}')


if __name__ == '__main__':
  write_golden()
