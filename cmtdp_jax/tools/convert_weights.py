"""Converts an ImageNet checkpoint to a backbone .npz, once, before training.

  python -m cmtdp_jax.tools.convert_weights --arch hrnet_w18_small_v2 \
      --src hrnet_w18_small_model_v2.pth --dst hrnet_w18_small_v2.npz

  python -m cmtdp_jax.tools.convert_weights --arch vit_b16 --dst vit_b16.npz --src \
      B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz

.safetensors files and the original Google ViT .npz checkpoints (vit_jax /
AugReg, as timm's `_load_weights` reads them) are read without PyTorch;
.pth/.pt files need it. A ViT's trunk is converted; its feature pyramid is in
no checkpoint and trains from scratch. Load the result with
`cmtdp_jax.models.convert.load_pretrained`.
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from cmtdp_jax.models import convert


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
    state = torch.load(path, map_location='cpu', weights_only=True)
    for wrapper in ('state_dict', 'model'):
      if isinstance(state.get(wrapper), dict):
        state = state[wrapper]
    state = {k: v.float().numpy() for k, v in state.items() if hasattr(v, 'numpy')}
  return {k.removeprefix('module.'): np.asarray(v) for k, v in state.items()}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--arch', required=True, help=f"one of {', '.join(convert.ARCHS)}")
  parser.add_argument('--src', required=True,
                      help='.pth, .pt, .safetensors or (ViT) original .npz checkpoint')
  parser.add_argument('--dst', required=True, help='output .npz')
  args = parser.parse_args(argv)
  if args.arch not in convert.ARCHS:
    raise SystemExit(f"error: unknown --arch '{args.arch}'; valid: {', '.join(convert.ARCHS)}")
  if not os.path.isfile(args.src):
    raise SystemExit(f'error: --src file not found: {args.src}')
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
