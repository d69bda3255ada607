"""Converts an ImageNet checkpoint to a backbone .npz, once, before training.

  python -m cmtdp_jax.tools.convert_weights --arch hrnet_w18_small_v2 \
      --src hrnet_w18_small_model_v2.pth --dst hrnet_w18_small_v2.npz

  python -m cmtdp_jax.tools.convert_weights --arch vit_b16 --dst vit_b16.npz --src \
      B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz

.safetensors files and the original Google ViT .npz checkpoints (vit_jax /
AugReg, as timm's `_load_weights` reads them) are read without PyTorch;
.pth/.pt files need it. A ViT's trunk is converted; its feature pyramid is in
no checkpoint and trains from scratch. Load the result with
`--config.model.pretrained`.

A whole model, with `--framework`: InvPT's released checkpoints
(prismformore/Multi-Task-Transformer, {'model': state_dict} with 'module.' keys)

  python -m cmtdp_jax.tools.convert_weights --framework invpt --arch vit_l16 \
      --src InvPT_nyud_vitLp16.pth --dst invpt_nyud.npz --img-size 448 576

are read without PyTorch and without running anything in the file
(`cmtdp_jax.pickled`). The task order is read from the file's key order; give
`--tasks` where it cannot be. Every key InvPT builds but never uses is listed.
Load the result with `--config.model.weights` (the configs' docstrings show
the evaluation command).
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np

from cmtdp_jax import pickled
from cmtdp_jax.models import convert
from cmtdp_jax.models.backbones import vit

FRAMEWORKS = ('invpt',)


def unwrap_state_dict(state):
  """The state_dict inside a checkpoint dict ({'state_dict': ...} or {'model': ...})."""
  for wrapper in ('state_dict', 'model'):
    if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
      state = state[wrapper]
  return state


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{key: numpy array} from a .safetensors, PyTorch or original ViT .npz checkpoint file.

  Unwraps {'state_dict': ...} / {'model': ...} and DataParallel's 'module.';
  renames a ViT .npz's keys to timm's (`convert.vit_npz_to_timm`).
  """
  if path.endswith('.npz'):
    with np.load(path) as data:
      return convert.vit_npz_to_timm({k: data[k] for k in data.files})
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    state = load_file(path)
  else:
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise SystemExit(f'error: reading {path} needs PyTorch (pip install torch); '
                       '.safetensors files do not') from None
    state = unwrap_state_dict(torch.load(path, map_location='cpu', weights_only=True))
    state = {k: v.float().numpy() for k, v in state.items() if hasattr(v, 'numpy')}
  return {k.removeprefix('module.'): np.asarray(v) for k, v in state.items()}


def read_model_state_dict(path: str) -> dict[str, np.ndarray]:
  """A whole model's state_dict from a torch.save file, read by `pickled.load` (no torch,
  nothing in the file runs); unwraps {'model': ...} / {'state_dict': ...} and 'module.'."""
  try:
    state = pickled.load(path)
  except (pickled.RefusedPickle, ValueError) as e:
    raise SystemExit(f'error: {e}') from None
  state = unwrap_state_dict(state)
  if not isinstance(state, dict) or not state:
    raise SystemExit(f'error: {path} holds no state_dict (no dict of tensors under '
                     "'model' or 'state_dict')")
  return {k.removeprefix('module.'): np.asarray(v) for k, v in state.items()
          if isinstance(v, np.ndarray)}


def convert_model(args) -> None:
  """--framework: a whole model's checkpoint -> .npz for --config.model.weights."""
  if args.arch not in vit.SIZES:
    raise SystemExit(f"error: --framework {args.framework} runs on a ViT: --arch must be one of "
                     f"{', '.join(vit.SIZES)}, not '{args.arch}'")
  state = read_model_state_dict(args.src)
  try:
    backbone_kwargs = json.loads(args.backbone_kwargs) if args.backbone_kwargs else {}
  except json.JSONDecodeError as e:
    raise SystemExit(f'error: --backbone-kwargs is not JSON ({e})') from None
  if not isinstance(backbone_kwargs, dict):
    backbone_kwargs = {'': backbone_kwargs}  # reported below as an unknown option
  unknown = sorted(set(backbone_kwargs) - set(vit.VisionTransformer.__dataclass_fields__))
  if unknown:
    raise SystemExit(f'error: --backbone-kwargs must be a JSON object of ViT options; '
                     f'unknown: {unknown}')
  if args.img_size:
    backbone_kwargs['img_size'] = tuple(args.img_size)
  tasks = tuple(t for t in args.tasks.split(',') if t) if args.tasks else None
  try:
    variables, options = convert.convert_invpt_state_dict(state, args.arch, tasks,
                                                          **backbone_kwargs)
  except convert.CheckpointMismatchError as e:
    hint = '; give --tasks in its order' if 'task order' in str(e) else ''
    hint = '; give --img-size H W' if 'img_size must be given' in str(e) else hint
    raise SystemExit(f'error: {args.src}: {e}{hint}') from None
  dst = convert.save_npz(args.dst, variables, convert.model_arch(args.framework, args.arch),
                         options)
  count = sum(np.size(v) for v in jax.tree.leaves(variables['params']))
  unused = convert.invpt_unused_keys(state)
  tasks = [f'{t} ({c})' for t, c in options['task_channels']]
  print(f'wrote {dst}: {args.framework} on {args.arch}, tasks in order {", ".join(tasks)}; '
        f'{count:,} parameters from {len(state)} source tensors; '
        f"head_channels={options['head_channels']}, "
        f"backbone_kwargs {options['backbone_kwargs']}")
  print(f'unused ({len(unused)} keys of modules InvPT builds but its forward never reads): '
        f'{", ".join(unused) or "none"}')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--arch', required=True, help=f"one of {', '.join(convert.ARCHS)}")
  parser.add_argument('--src', required=True,
                      help='.pth, .pt, .safetensors or (ViT) original .npz checkpoint')
  parser.add_argument('--dst', required=True, help='output .npz')
  parser.add_argument('--framework', choices=FRAMEWORKS,
                      help="convert a whole model of this framework (InvPT's checkpoints)")
  parser.add_argument('--tasks', help='with --framework: the task order, comma-separated, '
                      'where the file cannot tell it')
  parser.add_argument('--img-size', type=int, nargs=2, metavar=('H', 'W'),
                      help="with --framework: the ViT's training size (its position grid), "
                      'where the grid is not square')
  parser.add_argument('--backbone-kwargs', help="with --framework: the backbone's options "
                      "where they differ from --arch's, as JSON")
  args = parser.parse_args(argv)
  if args.arch not in convert.ARCHS:
    raise SystemExit(f"error: unknown --arch '{args.arch}'; valid: {', '.join(convert.ARCHS)}")
  if not os.path.isfile(args.src):
    raise SystemExit(f'error: --src file not found: {args.src}')
  if args.framework:
    convert_model(args)
    return
  state = read_state_dict(args.src)
  try:
    variables = convert.convert_torch_state_dict(args.arch, state)
  except convert.CheckpointMismatchError as e:
    raise SystemExit(f'error: {e}') from None
  dst = convert.save_npz(args.dst, variables, args.arch)
  count = sum(v.size for v in jax.tree.leaves(variables['params']))
  notes = ['classification head dropped']
  notes += [f'the {layer} is not in the checkpoint and stays as initialised'
            for layer in convert.NEW_LAYERS.get(args.arch, ())]
  notes += [f'backbone_kwargs.{k}={v}' for k, v in
            convert.checkpoint_options(args.arch, state).items()]
  print(f'wrote {dst}: {args.arch} backbone, {count:,} parameters '
        f'(from {len(state)} source tensors; {"; ".join(notes)})')


if __name__ == '__main__':
  main()
