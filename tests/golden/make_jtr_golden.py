"""Writes jtr.npz, which lets the JTR parity test run without PyTorch.

The reference is `torch_jtr`, a transcription of KentoNishi/JTR-CVPR-2024's
regularizer (`code/models/nyuv2_segnet_jtr.py`, `code/utils/process.py`,
`code/utils/gumbel.py`, the per-image loop of `code/train_nyuv2.py`). One small
case: 2 images of 32x64, NYUv2's tasks with 5 classes (semseg, depth, normals),
network widths (4, 4, 8, 8, 8), random weights (biases and BN affine too), random
raw predictions and labels (about 20% of pixels invalid per task) of views 1 and
2, and fixed Gumbel noise for the five hard Gumbel-softmax calls. Two labelled
sets per image, so that every task is labelled on one image and not on the other,
with one and with two labelled tasks:

  a  image 0 {semseg},  image 1 {depth, normals}
  b  image 0 {depth},   image 1 {semseg, normals}

jtr.npz holds (NHWC; semseg ignore 255 as `tasks.py`):
  widths, num_classes, seed
  margins                            JSON: the margins below, per kind
  view{1,2}.{semseg,depth,normals}   raw predictions (normals unnormalised)
  label{1,2}.{semseg,depth,normals}  labels
  noise.semseg                       [5, B, H, W, 5] in `jtr.GUMBEL_DRAWS` order
  w.<state_dict key>                 the network's parameters (the reference's names;
                                     its unused `batchnorm` and BN running stats left out)
  <case>.labelled                    bool [B, 3]
  <case>.loss, <case>.{dist,recon,dist_view1,dist_view2}   the loss, per-image parts
  <case>.grad.view{1,2}.<task>       d loss / d raw predictions
  <case>.grad.w.<key>                d loss / d network parameters
  torch32_error                      JSON: torch's float32 error against the golden, per
                                     value (`relative_errors`)

The values are torch's float64 values rounded to float32. The seed (the first from
0) is chosen so that float32 implementations take the decisions the golden takes:
in every max-pool window and every hard Gumbel sample the top two values, and every
masked-in depth L1 difference and zero, are at least `MARGIN` times torch's float32
error in them apart. ReLU inputs are too many for that (about 3e5 a case; in every seed
tried some lie within a few float32 errors of 0): their margin is only reported, and
float32 gradients can differ from the golden in a few elements there.

Rerun (needs torch) from the repository root:

  python tests/golden/make_jtr_golden.py
"""

from __future__ import annotations

import json
import os

import numpy as np

GOLDEN_DIR = os.path.dirname(os.path.abspath(__file__))
FILE = os.path.join(GOLDEN_DIR, 'jtr.npz')
TASKS = ('semseg', 'depth', 'normals')
NUM_CLASSES = 5
CHANNELS = (NUM_CLASSES, 1, 3)
WIDTHS = (4, 4, 8, 8, 8)
BATCH, HEIGHT, WIDTH = 2, 32, 64
CASES = {'a': ((0,), (1, 2)), 'b': ((1,), (0, 2))}
NUM_DRAWS = 5
INVALID = 0.2
MARGIN = 30.0
# The decisions that must not flip between precisions (they change values, not only
# gradients); 'relu' (ReLU inputs within float32 error of 0) is only reported.
DECISIONS = ('pools', 'gumbel', 'l1')
ZERO = 1e-6  # an array below this fraction of its group's largest is zero (float64 noise)
SKIPPED = ('batchnorm.', 'running_mean', 'running_var', 'num_batches_tracked')


def load(path: str = FILE) -> dict[str, np.ndarray]:
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def flax_params(state: dict[str, np.ndarray], prefix: str = '') -> dict:
  """The reference network's parameters (key -> array, under `prefix`) as `jtr.JTR`'s
  {'network': ...}: conv weights OIHW -> HWIO 'kernel', BN weight -> 'scale'."""
  flat: dict[str, dict[str, np.ndarray]] = {}
  for key, value in state.items():
    if not key.startswith(prefix):
      continue
    key = key[len(prefix):]
    if any(s in key for s in SKIPPED):
      continue
    *path, leaf = key.split('.')
    value = np.asarray(value, np.float32)
    if value.ndim == 4:
      leaf, value = 'kernel', value.transpose(2, 3, 1, 0)
    elif leaf == 'weight':
      leaf = 'scale'
    flat.setdefault('_'.join(path), {})[leaf] = value
  return {'network': flat}


def random_inputs(seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  shape = (BATCH, HEIGHT, WIDTH)
  out = {}
  for v in (1, 2):
    out[f'view{v}.semseg'] = rng.normal(0.0, 2.0, shape + (NUM_CLASSES,))
    out[f'view{v}.depth'] = rng.normal(2.4, 1.5, shape + (1,))
    out[f'view{v}.normals'] = rng.normal(0.0, 1.0, shape + (3,))
    semseg = rng.integers(0, NUM_CLASSES, shape)
    out[f'label{v}.semseg'] = np.where(rng.random(shape) < INVALID, 255, semseg).astype(np.int32)
    depth = rng.uniform(0.5, 6.0, shape)
    out[f'label{v}.depth'] = np.where(rng.random(shape) < INVALID, 0.0, depth)
    normals = rng.normal(0.0, 1.0, shape + (3,))
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    out[f'label{v}.normals'] = np.where(rng.random(shape)[..., None] < INVALID, 0.0, normals)
  out['noise.semseg'] = rng.gumbel(size=(NUM_DRAWS,) + shape + (NUM_CLASSES,))
  return {k: v if v.dtype == np.int32 else v.astype(np.float32) for k, v in out.items()}


def random_state(model, seed: int) -> dict[str, np.ndarray]:
  """xavier_normal conv weights, and random (not the init's zero / one) conv biases and BN
  affine parameters, so that each has to land in its place."""
  rng = np.random.default_rng(seed + 1000)
  state = {}
  for key, value in model.state_dict().items():
    shape = tuple(value.shape)
    if len(shape) == 4:
      fan_in, fan_out = shape[1] * shape[2] * shape[3], shape[0] * shape[2] * shape[3]
      state[key] = rng.normal(0.0, (2.0 / (fan_in + fan_out)) ** 0.5, shape)
    elif key.endswith('running_var'):
      state[key] = np.ones(shape)
    elif key.endswith('num_batches_tracked'):
      state[key] = np.zeros(shape, np.int64)
    elif key.endswith('running_mean'):
      state[key] = np.zeros(shape)
    elif '.1.weight' in key or key.startswith('batchnorm.weight'):  # BN scale
      state[key] = rng.uniform(0.5, 1.5, shape)
    elif '.1.bias' in key or key.startswith(('pred_layer.', 'batchnorm.')):  # BN, heads
      state[key] = rng.normal(0.0, 0.2, shape)
    else:  # the bias of a conv that BN follows: no effect, but float32 cancellation in BN
      state[key] = rng.normal(0.0, 0.01, shape)
  return {k: v if v.dtype == np.int64 else v.astype(np.float32) for k, v in state.items()}


def run(inputs, state, labelled_sets, dtype, record=False):
  """The reference in `dtype`: (values, grads) as NHWC numpy, and the recorded
  max-pool inputs and Gumbel soft samples."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch_jtr  # pylint: disable=import-outside-toplevel
  model = torch_jtr.SegNetJTR(CHANNELS, WIDTHS)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  model = model.to(dtype).train()
  nchw = lambda a: torch.from_numpy(np.moveaxis(a, -1, 1).copy()).to(dtype)
  preds = [nchw(np.concatenate([inputs[f'view{v}.{t}'] for t in TASKS], axis=-1))
           .requires_grad_(True) for v in (1, 2)]
  labels = []
  for v in (1, 2):
    semseg = inputs[f'label{v}.semseg'].astype(np.int64)
    labels.append((torch.from_numpy(np.where(semseg == 255, -1, semseg)),
                   nchw(inputs[f'label{v}.depth'][..., None]),
                   nchw(inputs[f'label{v}.normals'])))
  noise = {site: nchw(inputs['noise.semseg'][i]) for i, site in enumerate(torch_jtr.GUMBEL_SITES)}
  torch_jtr.RECORD.update({k: [] if record else None for k in torch_jtr.RECORD})
  try:
    loss, dist, recon, dist_1, dist_2 = torch_jtr.jtr_loss(
        model, preds[0], preds[1], labels[0], labels[1], labelled_sets, noise, NUM_CLASSES)
    loss.backward()
    recorded = {k: [t.double().numpy() for t in v] if v is not None else None
                for k, v in torch_jtr.RECORD.items()}
  finally:
    torch_jtr.RECORD.update({k: None for k in torch_jtr.RECORD})
  values = {'loss': loss.detach().double().numpy(), 'dist': dist.detach().double().numpy(),
            'recon': recon.detach().double().numpy(),
            'dist_view1': dist_1.detach().double().numpy(),
            'dist_view2': dist_2.detach().double().numpy()}
  for v, pred in zip((1, 2), preds):
    # None: nothing reached the predictions (view 2's terms detach them).
    grad = np.zeros(pred.shape) if pred.grad is None else pred.grad.double().numpy()
    grad = np.moveaxis(grad, 1, -1)
    for task, part in zip(TASKS, np.split(grad, np.cumsum(CHANNELS)[:-1], axis=-1)):
      values[f'grad.view{v}.{task}'] = part
  for key, param in model.named_parameters():
    if not key.startswith('batchnorm.'):
      assert param.grad is not None, key
      values[f'grad.w.{key}'] = param.grad.double().numpy()
  return values, recorded


def argmax_margin(exact, rounded, axis, windows=False) -> float:
  """min over every argmax (a max-pool window, a Gumbel sample's classes) of the recorded
  inputs of (gap between its two largest candidates in `exact`) / (the sum of
  |rounded - exact| of those two); exact ties (windows of ReLU zeros) are skipped: they
  are ties in any precision."""
  ratios = []
  for x, y in zip(exact, rounded):
    if windows:  # NCHW max-pool input -> [..., 4] candidates
      n, c, h, w = x.shape
      to_candidates = lambda a: a.reshape(n, c, h // 2, 2, w // 2, 2).transpose(
          0, 1, 2, 4, 3, 5).reshape(-1, 4)
    else:
      to_candidates = lambda a: np.moveaxis(a, axis, -1).reshape(-1, a.shape[axis])
    x_, y_ = to_candidates(x), to_candidates(y)
    order = np.argsort(x_, axis=-1)[:, -2:]
    top = np.take_along_axis(x_, order, -1)
    error = np.abs(np.take_along_axis(y_, order, -1) - top).sum(-1)
    gaps = top[:, 1] - top[:, 0]
    tied = gaps == 0
    ratios.append(np.min(gaps[~tied] / np.maximum(error[~tied], 1e-300)))
  return float(min(ratios))


def kink_margin(exact, rounded) -> float:
  """min over the recorded ReLU / |.| inputs of |exact| / |rounded - exact| (exact zeros
  skipped: zero in any precision)."""
  ratios = []
  for x, y in zip(exact, rounded):
    x, y = x.ravel(), y.ravel()
    keep = x != 0
    ratios.append(np.min(np.abs(x[keep]) / np.maximum(np.abs(y[keep] - x[keep]), 1e-300)))
  return float(min(ratios))


def margins(exact_rec, rounded_rec) -> dict[str, float]:
  return {'pools': argmax_margin(exact_rec['pools'], rounded_rec['pools'], 1, windows=True),
          'gumbel': argmax_margin(exact_rec['gumbel'], rounded_rec['gumbel'], 1),
          'relu': kink_margin(exact_rec['relu'], rounded_rec['relu']),
          'l1': kink_margin(exact_rec['l1'], rounded_rec['l1'])}


def relative_errors(got: dict, want: dict) -> dict[str, float]:
  """name -> max |got - want| / max |want|; where want is zero up to float64 noise
  (below ZERO of the largest of its group: values, prediction or parameter gradients),
  / the group's largest instead."""
  group = lambda name: '.'.join(name.split('.')[:2]) if name.startswith('grad.') else 'values'
  largest = {}
  for name, value in want.items():
    largest[group(name)] = max(largest.get(group(name), 0.0), float(np.abs(value).max()))
  errors = {}
  for name, value in want.items():
    scale = largest[group(name)]
    own = float(np.abs(value).max())
    denominator = own if own > ZERO * scale else scale
    errors[name] = float(np.abs(got[name] - value).max() / denominator) if denominator else 0.0
  return errors


def write_golden() -> None:
  import torch  # pylint: disable=import-outside-toplevel
  import torch_jtr  # pylint: disable=import-outside-toplevel
  seed = 0
  while True:
    inputs = random_inputs(seed)
    state = random_state(torch_jtr.SegNetJTR(CHANNELS, WIDTHS), seed)
    results, case_margins = {}, []
    for case, labelled_sets in CASES.items():
      exact, exact_rec = run(inputs, state, labelled_sets, torch.float64, record=True)
      rounded, rounded_rec = run(inputs, state, labelled_sets, torch.float32, record=True)
      case_margins.append(margins(exact_rec, rounded_rec))
      results[case] = exact, rounded
    margin = {k: min(m[k] for m in case_margins) for k in case_margins[0]}
    print(f'seed {seed}: margins ' + ', '.join(f'{k} {v:.1f}' for k, v in margin.items()))
    if min(margin[k] for k in DECISIONS) >= MARGIN:
      break
    seed += 1
  out = dict(inputs, widths=np.array(WIDTHS), num_classes=NUM_CLASSES, seed=seed,
             margins=np.array(json.dumps(margin)))
  out.update({f'w.{k}': v for k, v in state.items() if not any(s in k for s in SKIPPED)})
  errors = {}
  for case, (exact, rounded) in results.items():
    out[f'{case}.labelled'] = np.array([[i in s for i in range(3)] for s in CASES[case]])
    for name, value in exact.items():
      out[f'{case}.{name}'] = value.astype(np.float32)
    errors.update({f'{case}.{k}': v for k, v in relative_errors(rounded, exact).items()})
  out['torch32_error'] = np.array(json.dumps(errors))
  np.savez_compressed(FILE, **out)
  for case in CASES:
    print(case, 'loss', out[f'{case}.loss'], 'dist', out[f'{case}.dist'],
          'recon', out[f'{case}.recon'])
  worst = sorted(errors.items(), key=lambda kv: -kv[1])[:8]
  print('torch float32 error (relative_errors), worst:',
        ', '.join(f'{k} {v:.1e}' for k, v in worst))


if __name__ == '__main__':
  write_golden()
