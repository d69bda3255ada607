"""Writes the golden files that let backbone parity run without PyTorch.

No weights are stored: `random_state_dict` regenerates them from a seed and
the official key layout (key_shapes.npz, taken from `torch_reference`); each
case file holds the seeds, the input shape and the PyTorch outputs (NHWC).

Rerun (needs torch) from the repository root:

  python tests/golden/make_golden.py

`--parity` instead compares every backbone (HRNet-W48 and ResNet-101
included, too slow for the unit tests) against a live PyTorch reference:

  PYTHONPATH=. python tests/golden/make_golden.py --parity
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

GOLDEN_DIR = os.path.dirname(os.path.abspath(__file__))
ARCHS = ('hrnet_w18_small_v2', 'hrnet_w48', 'resnet50', 'resnet101')
# name -> (arch, backbone kwargs, input NHWC shape). Odd sizes exercise the
# stride-2 padding and HRNet's bilinear fuse to non-doubled sizes.
CASES = {
    'hrnet_w18_small_v2': ('hrnet_w18_small_v2', {}, (1, 72, 88, 3)),
    'resnet50': ('resnet50', {}, (1, 48, 48, 3)),
    'resnet50_dilated': ('resnet50', {'dilated': True}, (1, 48, 48, 3)),
}
WEIGHT_SEED = 0
INPUT_SEED = 1


def random_state_dict(key_shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
  """Deterministic weights in the official layout, keys drawn in sorted order.

  Conv weights have variance 1/fan_in and BatchNorm is near identity (positive
  running variance), so activations stay O(1-10) through the network.
  """
  rng = np.random.default_rng(seed)
  state = {}
  for key in sorted(key_shapes):
    shape = tuple(key_shapes[key])
    if key.endswith('num_batches_tracked'):
      state[key] = np.zeros(shape, np.int64)
      continue
    if key.endswith('running_var'):
      value = rng.uniform(0.5, 1.5, shape)
    elif key.endswith('weight') and len(shape) == 4:
      value = rng.standard_normal(shape) * np.sqrt(1.0 / np.prod(shape[1:]))
    elif key.endswith('weight'):
      value = rng.uniform(0.5, 1.0, shape)
    else:  # bias, running_mean
      value = rng.normal(0.0, 0.1, shape)
    state[key] = value.astype(np.float32)
  return state


def random_input(shape, seed: int = INPUT_SEED) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def load_key_shapes(arch: str, filename: str = 'key_shapes.npz') -> dict[str, tuple[int, ...]]:
  with np.load(os.path.join(GOLDEN_DIR, filename)) as data:
    return dict(zip(data[f'{arch}.keys'].tolist(), json.loads(str(data[f'{arch}.shapes']))))


def write_golden() -> None:
  import torch_reference  # pylint: disable=import-outside-toplevel

  tables = {}
  for arch in ARCHS:
    state = torch_reference.build(arch).state_dict()
    tables[f'{arch}.keys'] = np.array(list(state))
    tables[f'{arch}.shapes'] = np.array(json.dumps([list(v.shape) for v in state.values()]))
  np.savez_compressed(os.path.join(GOLDEN_DIR, 'key_shapes.npz'), **tables)
  for name, (arch, kwargs, input_shape) in CASES.items():
    model = torch_reference.build(arch, **kwargs)
    state = random_state_dict(load_key_shapes(arch), WEIGHT_SEED)
    outputs = torch_reference.forward_nhwc(model, state, random_input(input_shape))
    np.savez_compressed(
        os.path.join(GOLDEN_DIR, f'{name}.npz'), arch=arch, kwargs=json.dumps(kwargs),
        weight_seed=WEIGHT_SEED, input_seed=INPUT_SEED, input_shape=input_shape,
        **{f'out{i}': o for i, o in enumerate(outputs)})
    print(name, [o.shape for o in outputs])


def parity() -> None:
  """Prints max|flax - torch| / max|torch| per output map for every backbone."""
  import jax  # pylint: disable=import-outside-toplevel
  import torch_reference  # pylint: disable=import-outside-toplevel

  from cmtdp_jax.models import backbones, convert  # pylint: disable=import-outside-toplevel

  for arch, kwargs in [('hrnet_w18_small_v2', {}), ('hrnet_w18_small_v2', {'upsample': 'nearest'}),
                       ('hrnet_w48', {}), ('hrnet_w48', {'upsample': 'nearest'}),
                       ('resnet50', {}), ('resnet50', {'dilated': True}),
                       ('resnet101', {}), ('resnet101', {'dilated': True})]:
    model = torch_reference.build(arch, **kwargs)
    state = random_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()}, 7)
    images = random_input((2, 64, 64, 3), 8)
    want = torch_reference.forward_nhwc(model, state, images)
    module = backbones.get_backbone(arch, **kwargs)
    got = jax.jit(module.apply, static_argnames='train')(
        convert.convert_torch_state_dict(arch, state), images, train=False)
    errors = [float(np.abs(g - w).max() / np.abs(w).max()) for g, w in zip(got, want)]
    print(f"{arch} {kwargs}: {' '.join(f'{e:.1e}' for e in errors)}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--parity', action='store_true', help='compare against live PyTorch')
  if parser.parse_args().parity:
    parity()
  else:
    write_golden()


if __name__ == '__main__':
  main()
