"""Writes the golden files that let the ViT parity tests run without torch/timm.

  vit_key_shapes.npz  timm's state_dict layout (head included) of
                      vit_{small,base,large}_patch16_224, as make_golden's key_shapes.npz.
  vit_s16.npz         timm's tokens of the tapped blocks (the last through the final
                      norm) for weights regenerated from a seed (`random_vit_state_dict`)
                      on one 32x48 image: the 14x14 position grid is resized to 2x3.
  vit_resize.npz      torch's F.interpolate(bicubic, antialias=True), what timm's
                      resample_abs_pos_embed runs, on small random grids.

Rerun (needs torch and timm, e.g. the separate venv of cmtdp_jax.tools.check_backbone)
from the repository root:

  PYTHONPATH=. python tests/golden/make_vit_golden.py
"""

from __future__ import annotations

import json
import os

import numpy as np

from make_golden import GOLDEN_DIR, INPUT_SEED, WEIGHT_SEED, random_input

TIMM_NAMES = {'vit_s16': 'vit_small_patch16_224', 'vit_b16': 'vit_base_patch16_224',
              'vit_l16': 'vit_large_patch16_224'}
KEY_SHAPES_FILE = 'vit_key_shapes.npz'
CASE = ('vit_s16', (1, 32, 48, 3))
# (input grid, output size) pairs: upsampling, downsampling, mixed, odd and tiny sizes.
RESIZES = (((14, 14), (28, 36)), ((14, 14), (2, 3)), ((14, 14), (13, 17)), ((3, 4), (5, 7)),
           ((5, 3), (2, 9)), ((2, 2), (1, 1)))
RESIZE_CHANNELS = 3


def random_vit_state_dict(key_shapes: dict[str, tuple[int, ...]],
                          seed: int) -> dict[str, np.ndarray]:
  """Deterministic weights in timm's layout, keys drawn in sorted order.

  Linear/conv weights have variance 1/fan_in, LayerNorm scales lie in
  [0.5, 1.5], biases, class token and position embedding are O(0.1-0.5), so
  every tensor matters and the tokens stay O(1-10) through the blocks.
  """
  rng = np.random.default_rng(seed)
  state = {}
  for key in sorted(key_shapes):
    shape = tuple(key_shapes[key])
    if key.endswith('weight') and len(shape) in (2, 4):
      value = rng.standard_normal(shape) * np.sqrt(1.0 / np.prod(shape[1:]))
    elif key.endswith('weight'):
      value = rng.uniform(0.5, 1.5, shape)
    elif key in ('cls_token', 'pos_embed'):
      value = rng.normal(0.0, 0.5, shape)
    else:
      value = rng.normal(0.0, 0.1, shape)
    state[key] = value.astype(np.float32)
  return state


def resize_input(grid, channels: int = RESIZE_CHANNELS, seed: int = INPUT_SEED) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((*grid, channels)).astype(np.float32)


def main() -> None:
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

  from make_golden import load_key_shapes  # pylint: disable=import-outside-toplevel
  from cmtdp_jax.models.backbones import get_backbone  # pylint: disable=import-outside-toplevel
  from cmtdp_jax.tools.check_backbone import timm_tokens  # pylint: disable=import-outside-toplevel

  tables = {}
  for arch, name in TIMM_NAMES.items():
    state = timm.create_model(name, pretrained=False).state_dict()
    tables[f'{arch}.keys'] = np.array(list(state))
    tables[f'{arch}.shapes'] = np.array(json.dumps([list(v.shape) for v in state.values()]))
  np.savez_compressed(os.path.join(GOLDEN_DIR, KEY_SHAPES_FILE), **tables)

  arch, input_shape = CASE
  model = timm.create_model(TIMM_NAMES[arch], pretrained=False, dynamic_img_size=True).eval()
  state = random_vit_state_dict(load_key_shapes(arch, KEY_SHAPES_FILE), WEIGHT_SEED)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
  taps = get_backbone(arch).block_indices
  tokens = timm_tokens(model, random_input(input_shape), taps)
  np.savez_compressed(os.path.join(GOLDEN_DIR, f'{arch}.npz'), arch=arch, taps=np.array(taps),
                      weight_seed=WEIGHT_SEED, input_seed=INPUT_SEED, input_shape=input_shape,
                      **{f'tokens{i}': t for i, t in enumerate(tokens)})
  print(arch, taps, [t.shape for t in tokens])

  resized = {}
  for i, (grid, size) in enumerate(RESIZES):
    nchw = torch.from_numpy(resize_input(grid).transpose(2, 0, 1)[None])
    out = F.interpolate(nchw, size=size, mode='bicubic', antialias=True, align_corners=False)
    resized[f'resize{i}'] = out[0].numpy().transpose(1, 2, 0)
  np.savez_compressed(os.path.join(GOLDEN_DIR, 'vit_resize.npz'), **resized)


if __name__ == '__main__':
  main()
