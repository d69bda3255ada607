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

The outputs are computed in float64 and stored as float32.

A second case is a whole model as InvPT releases it: `torch_invpt.TransformerNet`
(InvPT's ViT and decoder) at a tiny width (`CHECKPOINT_CASE`: ViT dim 64, depth 4,
MLP ratio 1; D = 60, P = 4; a 64x128 input, so a non-square position-embedding
grid), saved by torch.save in InvPT's format (train_utils.py: {'optimizer',
'scheduler', 'model', 'epoch', 'iter_count'}, the model's keys prefixed by
DataParallel's 'module.') to invpt_checkpoint.pth. Its weights are stored in
float16 to keep the file small (1.5 MB; InvPT's are float32, which the converter
reads the same way). invpt_checkpoint.npz holds the transcription's float64
predictions, intermediate predictions and features of `checkpoint_images()`,
stored as above.

invpt_vitl_key_shapes.npz holds the state_dict layout of InvPT's released models,
TransformerNet with ViT-L/16 (`VITL_CASES`: NYUD's 4 tasks at 448x576, PASCAL's 5 at
512x512; built on torch's meta device, no weights): '<case>.keys', '<case>.shapes' and
'<case>.parameters' (which keys are parameters, not buffers).

invpt_pos_embed.npz holds InvPT's one-time resize of a checkpoint's square
position grid (`torch_invpt.resize_pos_embed`: bicubic, no antialiasing) on the
grids of `POS_EMBED_RESIZES`, inputs `pos_embed_input(grid)`.

Rerun (needs torch) from the repository root:

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
CHECKPOINT_FILE = os.path.join(GOLDEN_DIR, 'invpt_checkpoint.pth')
CHECKPOINT_GOLDEN = os.path.join(GOLDEN_DIR, 'invpt_checkpoint.npz')
VITL_KEY_SHAPES_FILE = os.path.join(GOLDEN_DIR, 'invpt_vitl_key_shapes.npz')
VITL_CASES = {  # InvPT's p.TASKS.NAMES, NUM_OUTPUT and TRAIN.SCALE
    'nyud': (('semseg', 'depth', 'normals', 'edge'), (40, 1, 3, 1), (448, 576)),
    'pascal_context': (('semseg', 'human_parts', 'sal', 'normals', 'edge'), (21, 7, 2, 3, 1),
                       (512, 512)),
}
POS_EMBED_FILE = os.path.join(GOLDEN_DIR, 'invpt_pos_embed.npz')
# (square grid, new grid): ViT-L/16-384 to NYUD's 448x576 and PASCAL's 512x512, and small
# up, down and mixed cases.
POS_EMBED_RESIZES = (((24, 24), (28, 36)), ((24, 24), (32, 32)), ((6, 6), (7, 9)),
                     ((6, 6), (3, 5)), ((5, 5), (2, 8)))
# InvPT's saliency is a 2-class softmax (its NUM_OUTPUT['sal'] = 2), which the converter folds.
CHECKPOINT_CASE = dict(tasks=('semseg', 'sal', 'normals'), outputs=(5, 2, 3),
                       image_size=(64, 128), dim=64, depth=4,
                       num_heads=2, mlp_ratio=1.0, embed_dim=60, pred_channels=4)


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


def build_checkpoint_reference():
  import torch_invpt  # pylint: disable=import-outside-toplevel
  c = CHECKPOINT_CASE
  return torch_invpt.TransformerNet(c['tasks'], dict(zip(c['tasks'], c['outputs'])),
                                    c['image_size'], c['dim'], c['depth'], c['num_heads'],
                                    c['mlp_ratio'], c['embed_dim'], c['pred_channels'])


def checkpoint_images(seed: int = INPUT_SEED) -> np.ndarray:
  """NHWC float32 input of the checkpoint case."""
  return np.random.default_rng(seed).standard_normal(
      (BATCH, *CHECKPOINT_CASE['image_size'], 3)).astype(np.float32)


def run_checkpoint_reference(model, state, images, dtype):
  """The whole TransformerNet on NHWC `images`: {name: NHWC numpy} as `run_reference`."""
  import torch  # pylint: disable=import-outside-toplevel
  model.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items()})
  model = model.to(dtype).eval()
  with torch.no_grad():
    predictions, intermediates, features = model(
        torch.from_numpy(images.transpose(0, 3, 1, 2)).to(dtype))
  nhwc = lambda x: x.permute(0, 2, 3, 1).double().numpy()
  out = {t: nhwc(p) for t, p in predictions.items()}
  out.update({f'{t}/intermediate': nhwc(p) for t, p in intermediates.items()})
  out.update({f'{t}/feature': nhwc(p) for t, p in features.items()})
  return out


def write_checkpoint_golden() -> None:
  import torch  # pylint: disable=import-outside-toplevel
  model = build_checkpoint_reference()
  key_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  state = {k: v.astype(np.float16) if v.dtype == np.float32 else v
           for k, v in invpt_state_dict(key_shapes, WEIGHT_SEED).items()}
  optimizer = torch.optim.Adam(model.parameters(), lr=2e-5, weight_decay=1e-6)
  scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=40000, power=0.9)
  torch.save({'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
              'model': {f'module.{k}': torch.from_numpy(state[k]) for k in key_shapes},  # model order
              'epoch': 3, 'iter_count': 39999}, CHECKPOINT_FILE)
  images = checkpoint_images()
  exact = run_checkpoint_reference(model, state, images, torch.float64)
  rounded = run_checkpoint_reference(model, state, images, torch.float32)
  np.savez_compressed(CHECKPOINT_GOLDEN, **{k: stored(k, v).astype(np.float32)
                                            for k, v in exact.items()})
  for name, want in exact.items():
    error = np.abs(rounded[name] - want).max() / np.abs(want).max()
    print(f'checkpoint case {name} {want.shape}: max |.| {np.abs(want).max():.2f}, '
          f'torch float32 max relative error {error:.1e}')


def pos_embed_input(grid, channels: int = 4, seed: int = INPUT_SEED) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(
      (1, 1 + grid[0] * grid[1], channels)).astype(np.float32)


def write_pos_embed_golden() -> None:
  import torch  # pylint: disable=import-outside-toplevel
  import torch_invpt  # pylint: disable=import-outside-toplevel
  resized = {f'resize{i}': torch_invpt.resize_pos_embed(
      torch.from_numpy(pos_embed_input(grid)).double(), new).numpy()
             for i, (grid, new) in enumerate(POS_EMBED_RESIZES)}
  np.savez_compressed(POS_EMBED_FILE, **resized)


def write_vitl_key_shapes() -> None:
  import torch  # pylint: disable=import-outside-toplevel
  import torch_invpt  # pylint: disable=import-outside-toplevel
  tables = {}
  for case, (tasks, outputs, image_size) in VITL_CASES.items():
    with torch.device('meta'):
      model = torch_invpt.TransformerNet(tasks, dict(zip(tasks, outputs)), image_size,
                                         1024, 24, 16, 4.0, 512, 64)
    state = model.state_dict()
    parameters = {name for name, _ in model.named_parameters()}
    tables[f'{case}.keys'] = np.array(list(state))
    tables[f'{case}.shapes'] = np.array(json.dumps([list(v.shape) for v in state.values()]))
    tables[f'{case}.parameters'] = np.array([k in parameters for k in state])
    print(case, f'{sum(p.numel() for p in model.parameters()):,} parameters')
  np.savez_compressed(VITL_KEY_SHAPES_FILE, **tables)


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
  write_checkpoint_golden()
  write_pos_embed_golden()
  write_vitl_key_shapes()
