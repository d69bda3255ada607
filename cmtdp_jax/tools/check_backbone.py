"""Checks a ViT backbone against timm: same random weights, same image, same tokens.

  python -m cmtdp_jax.tools.check_backbone --backbone vit_s16 --timm vit_small_patch16_224
  python -m cmtdp_jax.tools.check_backbone --backbone vit_l16 --timm vit_large_patch16_384 \
      --size 384
  python -m cmtdp_jax.tools.check_backbone --backbone vit_b16 --timm vit_base_patch16_224 \\
      --image-size 448 576   # exercises the position embedding resize (timm dynamic_img_size)

Builds timm's model with random weights (no download; every parameter is also
perturbed so that biases and LayerNorm scales are not their trivial init),
converts its state_dict with `convert.convert_torch_state_dict` (what
`convert_weights` runs), runs both on one random image and prints, for every
block the backbone taps, max|ours - timm| / max|timm| over its tokens (the
last tap after the final norm, i.e. timm's `forward_features`). Exits 1 when
any error exceeds --tolerance. Needs torch and timm (not in the main venv).
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np

from cmtdp_jax.models import backbones, convert
from cmtdp_jax.models.backbones import vit

TOLERANCE = 1e-4


def timm_tokens(model, images_nhwc: np.ndarray, taps) -> list[np.ndarray]:
  """timm's outputs of the tapped blocks (the last one through the final norm)."""
  import torch  # pylint: disable=import-outside-toplevel
  captured = {}
  hooks = [model.blocks[i].register_forward_hook(
      lambda _, __, out, i=i: captured.__setitem__(i, out.numpy())) for i in set(taps)]
  with torch.no_grad():
    final = model.forward_features(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2))).numpy()
  for hook in hooks:
    hook.remove()
  return [captured[i] for i in taps[:-1]] + [final]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--backbone', required=True, choices=sorted(vit.SIZES))
  parser.add_argument('--timm', required=True, help='timm model name, e.g. vit_small_patch16_224')
  parser.add_argument('--size', type=int, default=224, help='img_size of both models')
  parser.add_argument('--image-size', type=int, nargs=2, metavar=('H', 'W'),
                      help='input size (default: --size square); another size makes timm '
                      'resize its position embedding (dynamic_img_size), and ours too')
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--tolerance', type=float, default=TOLERANCE)
  args = parser.parse_args(argv)
  try:
    import timm  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise SystemExit('error: check_backbone needs torch and timm (a separate venv: '
                     'pip install torch timm)') from None
  height, width = args.image_size or (args.size, args.size)
  torch.manual_seed(args.seed)
  model = timm.create_model(args.timm, pretrained=False, img_size=args.size,
                            dynamic_img_size=(height, width) != (args.size, args.size)).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(torch.randn_like(param) * 0.02)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  try:
    variables = convert.convert_torch_state_dict(args.backbone, state)
  except convert.CheckpointMismatchError as e:
    raise SystemExit(f'error: {e}') from None
  module = backbones.get_backbone(args.backbone,
                                  **convert.checkpoint_options(args.backbone, state))
  images = np.random.default_rng(args.seed).standard_normal(
      (args.batch, height, width, 3)).astype(np.float32)
  ours, _ = jax.jit(lambda v, x: module.apply(v, x, method=vit.VisionTransformer.tokens))(
      variables, images)
  taps = module.block_indices
  theirs = timm_tokens(model, images, taps)
  count = sum(p.numel() for p in model.parameters())
  print(f'{args.backbone} vs timm {args.timm} ({count:,} parameters with head), '
        f'image {args.batch}x{height}x{width}:')
  worst = 0.0
  for position, (index, got, want) in enumerate(zip(taps, ours, theirs)):
    error = float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())
    worst = max(worst, error)
    final = ' + final norm' if position == len(taps) - 1 else ''
    print(f'  block {index + 1:2d}{final:13s} tokens {tuple(want.shape)}: '
          f'max relative error {error:.2e}')
  verdict = 'ok' if worst <= args.tolerance else 'FAIL'
  print(f'{verdict}: worst {worst:.2e} (tolerance {args.tolerance:.0e})')
  return 0 if worst <= args.tolerance else 1


if __name__ == '__main__':
  sys.exit(main())
