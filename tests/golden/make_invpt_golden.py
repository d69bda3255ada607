"""Writes invpt.npz, which lets the InvPT parity test run without PyTorch.

The reference is `torch_invpt.InvPTHeads`, a transcription of InvPT's
TransformerNet after its backbone. The case is ViT-S sized (dim 384, so the
framework's widths D = 192, P = 24), three tasks, a 128x192 input, i.e. four
8x12 stride-16 taps, random (no ViT is run). No weights are stored: they are
regenerated from a seed and the stored key layout (`invpt_state_dict`, numpy
only). invpt.npz holds

  keys, shapes        the state_dict layout of the case
  tasks, outputs, dim, embed_dim, pred_channels, image_size
  weight_seed, input_seed              the taps are `random_taps(input_seed)`
  <task>, <task>/intermediate          the predictions at the input size, NHWC,
                                       every STRIDE-th row and column (size)
  <task>/feature                       the task's feature (mt_proj's output,
                                       stride 4), every FEATURE_STEP-th channel

The outputs are computed in float64 and stored as float32. Rerun (needs torch)
from the repository root:

  python tests/golden/make_invpt_golden.py
"""

from __future__ import annotations

import json
import os

import numpy as np

GOLDEN_DIR = os.path.dirname(os.path.abspath(__file__))
FILE = os.path.join(GOLDEN_DIR, 'invpt.npz')
TASKS = ('semseg', 'depth', 'normals')
OUTPUTS = (5, 1, 3)
DIM = 384
EMBED_DIM, PRED_CHANNELS = DIM // 2, DIM // 16
IMAGE_SIZE = (128, 192)
BATCH = 2
WEIGHT_SEED, INPUT_SEED = 0, 1
STRIDE, FEATURE_STEP = 4, 54


def stored(name: str, value: np.ndarray) -> np.ndarray:
  """The part of an output that invpt.npz keeps."""
  return value[..., ::FEATURE_STEP] if name.endswith('/feature') else value[:, ::STRIDE, ::STRIDE]


def invpt_state_dict(key_shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
  """Deterministic weights, keys drawn in sorted order: conv and Linear weights of variance
  1/fan_in, norm scales in [0.5, 1.5], biases and running means N(0, 0.1), running
  variances in [0.5, 1.5]."""
  rng = np.random.default_rng(seed)
  state = {}
  for key in sorted(key_shapes):
    shape = tuple(key_shapes[key])
    if key.endswith('num_batches_tracked'):
      state[key] = np.zeros(shape, np.int64)
      continue
    if key.endswith('running_var') or (key.endswith('weight') and len(shape) == 1):
      value = rng.uniform(0.5, 1.5, shape)
    elif key.endswith('weight'):
      value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
    else:  # bias, running_mean
      value = rng.normal(0.0, 0.1, shape)
    state[key] = value.astype(np.float32)
  return state


def random_taps(seed: int = INPUT_SEED) -> np.ndarray:
  h, w = IMAGE_SIZE[0] // 16, IMAGE_SIZE[1] // 16
  return np.random.default_rng(seed).standard_normal((4, BATCH, h, w, DIM)).astype(np.float32)


def load(path: str = FILE) -> dict[str, np.ndarray]:
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def stored_key_shapes(case: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
  return dict(zip(case['keys'].tolist(), map(tuple, json.loads(str(case['shapes'])))))


def build_reference():
  import torch_invpt  # pylint: disable=import-outside-toplevel
  return torch_invpt.InvPTHeads(TASKS, dict(zip(TASKS, OUTPUTS)), DIM,
                                [s // 16 for s in IMAGE_SIZE], EMBED_DIM, PRED_CHANNELS)


def run_reference(model, state, taps, dtype):
  """{name: NHWC numpy} of the reference in `dtype` ('<task>', '<task>/intermediate',
  '<task>/feature')."""
  import torch  # pylint: disable=import-outside-toplevel
  model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
  model = model.to(dtype).eval()
  tokens = [torch.from_numpy(t).to(dtype).flatten(1, 2) for t in taps]
  with torch.no_grad():
    predictions, intermediates, features = model(tokens, IMAGE_SIZE)
  nhwc = lambda x: x.permute(0, 2, 3, 1).double().numpy()
  out = {t: nhwc(p) for t, p in predictions.items()}
  out.update({f'{t}/intermediate': nhwc(p) for t, p in intermediates.items()})
  out.update({f'{t}/feature': nhwc(p) for t, p in features.items()})
  return out


def write_golden() -> None:
  import torch  # pylint: disable=import-outside-toplevel
  model = build_reference()
  key_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  state = invpt_state_dict(key_shapes, WEIGHT_SEED)
  taps = random_taps()
  exact = run_reference(model, state, taps, torch.float64)
  rounded = run_reference(model, state, taps, torch.float32)
  np.savez_compressed(
      FILE, keys=np.array(list(key_shapes)),
      shapes=np.array(json.dumps([list(s) for s in key_shapes.values()])),
      tasks=np.array(TASKS), outputs=np.array(OUTPUTS), dim=DIM, embed_dim=EMBED_DIM,
      pred_channels=PRED_CHANNELS, image_size=np.array(IMAGE_SIZE), weight_seed=WEIGHT_SEED,
      input_seed=INPUT_SEED, **{k: stored(k, v).astype(np.float32) for k, v in exact.items()})
  for name, want in exact.items():
    error = np.abs(rounded[name] - want).max() / np.abs(want).max()
    print(f'{name} {want.shape}: max |.| {np.abs(want).max():.2f}, '
          f'torch float32 max relative error {error:.1e}')


if __name__ == '__main__':
  write_golden()
