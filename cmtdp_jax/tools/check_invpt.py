"""Checks the `invpt` framework against the PyTorch transcription of InvPT, end to end.

  python -m cmtdp_jax.tools.check_invpt                    # ViT-S widths, 128x192, NYUD's tasks
  python -m cmtdp_jax.tools.check_invpt --backbone vit_l16 --depth 4 --image-size 448 576

Builds `tests/golden/torch_invpt.TransformerNet` (InvPT's ViT and decoder, so run it from
the repository root: tests/ is not installed) with deterministic random weights
(`make_invpt_golden.invpt_state_dict`: no parameter or BatchNorm statistic at its trivial
init), saves it with torch.save in InvPT's released format ({'model': ...} with
'module.' keys), converts that file as `convert_weights --framework invpt` does, runs
both models on one random image in float32 and prints, per task, the max relative error
(max |ours - torch| / max |torch|) of the prediction, the intermediate prediction and the
feature. Exits 1 when one exceeds --tolerance. Needs torch and jax in one environment.
`tests/test_invpt_checkpoint.py` checks the same against committed outputs without torch.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile

import jax
import ml_collections
import numpy as np

from cmtdp_jax import models, steps
from cmtdp_jax.models import convert
from cmtdp_jax.models.backbones import vit
from cmtdp_jax.tools import convert_weights

TOLERANCE = 1e-4
TASKS = {'semseg': 40, 'depth': 1, 'normals': 3, 'edge': 1}  # InvPT's NYUD, in its order


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--backbone', default='vit_s16', choices=sorted(vit.SIZES))
  parser.add_argument('--depth', type=int, help="the ViT's depth (a multiple of 4; default "
                      "the backbone's): fewer blocks check the same code faster")
  parser.add_argument('--image-size', type=int, nargs=2, default=(128, 192), metavar=('H', 'W'),
                      help='input and position-grid size, multiples of 64')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--tolerance', type=float, default=TOLERANCE)
  args = parser.parse_args(argv)
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from tests.golden import make_invpt_golden, torch_invpt  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit(f'error: check_invpt needs torch, run from the repository root ({e})') \
        from None
  shape = dict(vit.SIZES[args.backbone])
  if args.depth:
    shape['depth'] = args.depth
  if shape['depth'] % 4:
    raise SystemExit(f"error: --depth {shape['depth']} is not a multiple of 4")
  size = tuple(args.image_size)
  model = torch_invpt.TransformerNet(tuple(TASKS), TASKS, size, shape['dim'], shape['depth'],
                                     shape['num_heads'], 4.0, shape['dim'] // 2,
                                     shape['dim'] // 16).eval()
  key_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  state = make_invpt_golden.invpt_state_dict(key_shapes, args.seed)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
  images = np.random.default_rng(args.seed + 1).standard_normal(
      (args.batch, *size, 3)).astype(np.float32)
  with torch.no_grad():
    outputs = model(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  theirs = {}
  for suffix, maps in zip(('', '/intermediate', '/feature'), outputs):
    theirs.update({f'{t}{suffix}': m.permute(0, 2, 3, 1).numpy() for t, m in maps.items()})

  with tempfile.NamedTemporaryFile(suffix='.pth') as file:
    torch.save({'model': {f'module.{k}': torch.from_numpy(state[k]) for k in key_shapes},
                'iter_count': 0}, file.name)  # in the model's key order, as InvPT's files
    variables, options = convert.convert_invpt_state_dict(
        convert_weights.read_model_state_dict(file.name), args.backbone, img_size=size,
        **({'depth': shape['depth']} if args.depth else {}))
  config = ml_collections.ConfigDict(dict(
      framework='invpt', backbone=args.backbone, dtype='float32', head_channels=None,
      backbone_kwargs=options['backbone_kwargs']))
  ours_model = models.get_model(config, tuple(TASKS), {'semseg': TASKS['semseg']})
  apply = functools.partial(ours_model.apply, train=False, mutable=['intermediates'])
  (predictions, features), updates = jax.jit(apply)(variables, images)
  ours = dict(predictions)
  ours.update(steps.aux_predictions(updates['intermediates']))
  ours.update({f'{t}/feature': f for t, f in features.items()})

  count = sum(p.numel() for p in model.parameters())
  print(f'invpt on {args.backbone} (depth {shape["depth"]}) vs the PyTorch transcription '
        f'({count:,} parameters with InvPT\'s unused modules), image {args.batch}x{size[0]}x'
        f'{size[1]}:')
  worst = 0.0
  for name, want in theirs.items():
    got = np.asarray(ours[name], np.float64)
    error = float(np.abs(got - want).max() / np.abs(want).max())
    worst = max(worst, error)
    print(f'  {name:24s} {tuple(want.shape)}: max relative error {error:.2e}')
  verdict = 'ok' if worst <= args.tolerance else 'FAIL'
  print(f'{verdict}: worst {worst:.2e} (tolerance {args.tolerance:.0e})')
  return 0 if worst <= args.tolerance else 1


if __name__ == '__main__':
  sys.exit(main())
