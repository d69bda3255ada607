"""MTAN's split SegNet: the `segnet` backbone and framework, and MTPSL weight import.

Parity against PyTorch runs without torch through tests/golden/segnet.npz
(regenerate it with tests/golden/make_segnet_golden.py); the test that runs the
PyTorch reference itself skips when torch is missing.
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from cmtdp_jax import models, tasks
from cmtdp_jax.models import backbones, convert
from cmtdp_jax.models.backbones import segnet

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), 'golden')
sys.path.insert(0, GOLDEN_DIR)
import make_segnet_golden  # noqa: E402  pylint: disable=wrong-import-position

NYUV2 = tuple(zip(make_segnet_golden.TASKS, make_segnet_golden.OUTPUTS))
# MTPSL's SegNet for NYUv2 (13 classes, depth, normals) has 25,055,185 parameters
# without `logsigma`, the 3 log-variances of uncertainty weighting
# (VICO-UoE/MTPSL model/segnet_mtl.py, `SegNet.__init__`), which is not ported;
# counted with it, as `count_parameters` of MTPSL's nyu_mtl_*.py does, 25,055,188.
PARAM_COUNT = 25_055_185
LOGSIGMA = 3
HEADS = 3 * (64 * 64 * 9 + 64) + sum(64 * c + c for c in make_segnet_golden.OUTPUTS)
# Max relative error (max |ours - reference| / max |reference|) allowed against the
# golden outputs, which are torch's float64 values rounded to float32. Measured float32
# noise floor on this case: torch's float32 forward is off by 5.3e-7 at worst (the
# bottleneck; 2e-7 to 3e-7 for the predictions), ours (XLA CPU) by 4.2e-7 at worst;
# 2e-5 is about 40x above both, and far below the error of a structural mistake:
# unpooling with dy and dx swapped gives 1e-1 to 4e-1, the last of equal maxima winning
# instead of the first 5e-2 to 1.5e-1 (the decoder unpools its own values to the
# positions of the encoder's ties, windows of ReLU zeros: 648 in the first pool here).
TOLERANCE = 2e-5
FAST = {'xla_backend_optimization_level': 0}


def model_config(widths=None, backbone='segnet', head_channels=None, dtype='float32'):
  return ml_collections.ConfigDict(dict(
      framework='segnet', backbone=backbone, dtype=dtype, head_channels=head_channels,
      backbone_kwargs={} if widths is None else {'widths': widths}))


def build(task_channels=NYUV2, **kwargs):
  return models.get_model(model_config(**kwargs), [t for t, _ in task_channels],
                          {'semseg': dict(task_channels)['semseg']})


def abstract_init(model, shape):
  return jax.eval_shape(functools.partial(model.init_with_output, train=False),
                        jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))


def lazy_state_dict(key_shapes):
  """A state_dict layout of zero tensors that take no memory."""
  return {k: np.broadcast_to(np.zeros((), np.float32), s) for k, s in key_shapes.items()}


@pytest.fixture(scope='module')
def golden():
  return make_segnet_golden.load()


def test_param_count(golden):
  """25,055,185 for NYUv2's tasks: Flax, and the MTPSL layout without logsigma."""
  _, variables = abstract_init(build(), (1, 64, 64, 3))
  assert sum(leaf.size for leaf in jax.tree.leaves(variables['params'])) == PARAM_COUNT
  assert backbones.count_params('segnet') == PARAM_COUNT - HEADS
  layout = make_segnet_golden.stored_key_shapes(golden, 'full.')
  assert layout['logsigma'] == (LOGSIGMA,)
  assert sum(int(np.prod(s)) for k, s in layout.items()
             if k.endswith(('.weight', '.bias'))) == PARAM_COUNT
  assert sum(int(np.prod(s)) for k, s in layout.items()
             if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))) == (
                 PARAM_COUNT + LOGSIGMA)


def test_outputs_strides_and_dtypes():
  module = backbones.get_backbone('segnet', dtype=jnp.bfloat16, widths=(4, 4, 8, 8, 8))
  outputs, variables = abstract_init(module, (2, 64, 96, 3))
  assert module.feature_channels == (4, 8) and module.feature_strides == (1, 32)
  assert [o.shape for o in outputs] == [(2, 64, 96, 4), (2, 2, 3, 8)]
  assert all(o.dtype == jnp.bfloat16 for o in outputs)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))


def test_framework_outputs_and_head_channels():
  """Predictions at the input size, one feature per task of width head_channels
  (default: the finest map's); on a stride-4 backbone the outputs are upsampled."""
  (predictions, features), _ = abstract_init(build(widths=(4, 4, 8, 8, 8)), (2, 32, 64, 3))
  for task, channels in NYUV2:
    assert predictions[task].shape == (2, 32, 64, channels)
    assert predictions[task].dtype == jnp.float32
    assert features[task].shape == (2, 32, 64, 4)
  model = models.get_model(model_config(backbone='compact', head_channels=6),
                           ('depth', 'normals'), {})
  (predictions, features), _ = abstract_init(model, (2, 32, 48, 3))
  assert predictions['normals'].shape == (2, 32, 48, 3)
  assert features['depth'].shape == (2, 8, 12, 6)


def test_train_mode_updates_every_batch_norm():
  module = backbones.get_backbone('segnet', widths=(4, 4, 8, 8, 8))
  _, variables = abstract_init(module, (2, 32, 32, 3))
  updates = jax.make_jaxpr(
      lambda v, x: module.apply(v, x, train=True, mutable=['batch_stats'])[1])(
          variables, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert len(updates.jaxpr.outvars) == len(jax.tree.leaves(variables['batch_stats'])) == 2 * 26
  assert not set(updates.jaxpr.outvars) & set(updates.jaxpr.invars)


def test_rejects_input_not_divisible_by_32():
  with pytest.raises(ValueError, match=r'segnet input size 48x64 must be divisible by 32'):
    abstract_init(backbones.get_backbone('segnet'), (1, 48, 64, 3))
  with pytest.raises(ValueError, match='widths must have 5 entries'):
    backbones.get_backbone('segnet', widths=(4, 8))


def reference_pool(x):
  """NumPy 2x2 max-pool with PyTorch's rule: scan each window in row-major order and
  keep the first maximum (a later value replaces it only when strictly greater)."""
  n, h, w, c = x.shape
  pooled = np.zeros((n, h // 2, w // 2, c), x.dtype)
  argmax = np.zeros(pooled.shape, np.int32)
  for index in np.ndindex(*pooled.shape):
    b, i, j, k = index
    best = 0
    for position in range(1, 4):
      if x[b, 2 * i + position // 2, 2 * j + position % 2, k] > (
          x[b, 2 * i + best // 2, 2 * j + best % 2, k]):
        best = position
    argmax[index] = best
    pooled[index] = x[b, 2 * i + best // 2, 2 * j + best % 2, k]
  return pooled, argmax


def reference_unpool(pooled, argmax):
  n, h, w, c = pooled.shape
  out = np.zeros((n, 2 * h, 2 * w, c), pooled.dtype)
  for index in np.ndindex(*pooled.shape):
    b, i, j, k = index
    out[b, 2 * i + argmax[index] // 2, 2 * j + argmax[index] % 2, k] = pooled[index]
  return out


def gather(x, argmax):
  """x[b, 2i + dy, 2j + dx, k] at the window positions dy * 2 + dx = argmax[b, i, j, k]."""
  b, i, j, k = np.indices(argmax.shape)
  return x[b, 2 * i + argmax // 2, 2 * j + argmax % 2, k]


def tie_heavy_input(shape=(2, 4, 6, 3), seed=0):
  """Small integers: most 2x2 windows hold their maximum more than once."""
  return np.random.default_rng(seed).integers(0, 3, shape).astype(np.float32)


def test_pool_and_unpool_match_pytorch_rule():
  x = tie_heavy_input()
  pooled, argmax = segnet.max_pool_with_argmax(jnp.asarray(x))
  want_pooled, want_argmax = reference_pool(x)
  windows = x.reshape(2, 2, 2, 3, 2, 3).transpose(0, 1, 3, 5, 2, 4).reshape(-1, 4)
  assert np.mean(np.sum(windows == windows.max(-1, keepdims=True), -1) > 1) > 0.3  # ties
  np.testing.assert_array_equal(pooled, want_pooled)
  np.testing.assert_array_equal(argmax, want_argmax)
  np.testing.assert_array_equal(segnet.max_unpool(pooled, argmax),
                                reference_unpool(want_pooled, want_argmax))


def test_pool_gradient_reaches_the_chosen_maximum_only():
  """Also in tie windows: all of it to the first maximum, none to equal ones after it."""
  x = tie_heavy_input()
  weights = np.random.default_rng(1).uniform(1.0, 2.0, (2, 2, 3, 3)).astype(np.float32)
  grad = jax.grad(lambda v: jnp.sum(segnet.max_pool_with_argmax(v)[0] * weights))(
      jnp.asarray(x))
  _, argmax = reference_pool(x)
  np.testing.assert_array_equal(grad, reference_unpool(weights, argmax))
  # Through unpooling the gradient comes back from the stored positions only.
  upstream = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
  grad = jax.grad(lambda v: jnp.sum(segnet.max_unpool(v, jnp.asarray(argmax)) * upstream))(
      jnp.zeros(weights.shape))
  np.testing.assert_array_equal(grad, gather(upstream, argmax))


def flax_outputs(case):
  """The golden case's state_dict, converted, through the segnet framework and backbone."""
  widths = tuple(int(w) for w in case['widths'])
  state = make_segnet_golden.segnet_state_dict(make_segnet_golden.stored_key_shapes(case),
                                               int(case['weight_seed']))
  variables = convert.convert_segnet_state_dict(state, NYUV2, widths)
  model = build(widths=widths)
  images = make_segnet_golden.random_input(tuple(case['input_shape']), int(case['input_seed']))

  def forward(variables, images):
    predictions, _ = model.apply(variables, images, train=False)
    trunk = model.backbone.apply({c: v['backbone'] for c, v in variables.items()}, images,
                                 train=False)
    return {'semseg': jax.nn.log_softmax(predictions['semseg'], axis=-1),
            'depth': predictions['depth'],
            'normals': tasks.get_task('normals').decode(predictions['normals']),
            'decoder': trunk[0], 'bottleneck': trunk[1]}

  return jax.jit(forward, compiler_options=FAST)(variables, jnp.asarray(images))


def test_golden_parity(golden):
  """Converted MTPSL weights reproduce PyTorch's eval outputs (log-softmax, depth,
  unit normals, the decoder output and the bottleneck)."""
  assert float(golden['margin']) >= make_segnet_golden.MARGIN
  for name, got in flax_outputs(golden).items():
    want = golden[name]
    assert got.shape == want.shape, name
    error = float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())
    assert error < TOLERANCE, (name, error)


def test_convert_full_layout_and_name_every_bad_key(golden):
  """MTPSL's full key layout maps onto the model exactly (logsigma skipped); a bad
  state_dict is refused with every missing, unexpected and mis-shaped key named."""
  layout = make_segnet_golden.stored_key_shapes(golden, 'full.')
  converted = convert.convert_segnet_state_dict(lazy_state_dict(layout), NYUV2)
  _, variables = abstract_init(build(), (1, 32, 32, 3))
  assert jax.tree.map(np.shape, converted) == jax.tree.map(lambda v: v.shape, variables)
  flat = traverse_util.flatten_dict(converted)
  assert flat[('params', 'backbone', 'conv_block_enc_2_1_0', 'kernel')].shape == (3, 3, 256, 256)
  assert flat[('batch_stats', 'backbone', 'encoder_block_0_1', 'var')].shape == (64,)
  assert flat[('params', 'normals_pred', 'kernel')].shape == (1, 1, 64, 3)
  state = lazy_state_dict(layout)
  del state['conv_block_dec.3.1.1.running_var']
  state['pred_task4.0.weight'] = np.zeros((64, 64, 3, 3), np.float32)
  state['conv_block_enc.1.0.weight'] = np.zeros((128, 128, 1, 1), np.float32)
  state['pred_task2.1.bias'] = np.zeros((2,), np.float32)
  with pytest.raises(convert.CheckpointMismatchError) as info:
    convert.convert_segnet_state_dict(state, NYUV2)
  message = str(info.value)
  assert '1 missing, 1 unexpected, 2 mis-shaped' in message
  for line in ('missing: conv_block_dec.3.1.1.running_var',
               'unexpected: pred_task4.0.weight',
               'mis-shaped: conv_block_enc.1.0.weight (128, 128, 1, 1), model wants '
               '(128, 128, 3, 3)',
               'mis-shaped: pred_task2.1.bias (2,), model wants (1,)'):
    assert line in message
  with pytest.raises(convert.CheckpointMismatchError, match='missing: pred_task3.1.weight'):
    convert.convert_segnet_state_dict(
        {k: v for k, v in lazy_state_dict(layout).items() if k != 'pred_task3.1.weight'}, NYUV2)


def test_pytorch_reference_live(golden):
  """The transcription has MTPSL's layout and count, recomputes the stored outputs,
  and torch's max-pool picks the same positions as ours, ties and NaNs included."""
  torch = pytest.importorskip('torch', reason='running the PyTorch reference needs torch')
  import torch_segnet  # pylint: disable=import-outside-toplevel
  full = torch_segnet.SplitSegNet()
  assert {k: tuple(v.shape) for k, v in full.state_dict().items()} == (
      make_segnet_golden.stored_key_shapes(golden, 'full.'))
  assert sum(p.numel() for p in full.parameters()) == PARAM_COUNT + LOGSIGMA
  widths, outputs = (tuple(int(v) for v in golden[k]) for k in ('widths', 'outputs'))
  small, _, (predictions, features, _), _, _ = make_segnet_golden.compute_case(
      widths, outputs, int(golden['weight_seed']), int(golden['input_seed']),
      tuple(golden['input_shape']))
  assert {k: tuple(v.shape) for k, v in small.state_dict().items()} == (
      make_segnet_golden.stored_key_shapes(golden))
  for name, value in zip((*make_segnet_golden.TASKS, 'bottleneck', 'decoder'),
                         (*predictions, *features)):
    np.testing.assert_allclose(value, golden[name], rtol=1e-6, atol=1e-6)
  x = tie_heavy_input((2, 6, 8, 5), seed=3)
  x[0, 0, :2, 0] = x[0, 1, 0, 0] = x[1, 3, 3, 4] = np.nan  # NaN wins, the last one
  _, flat = torch.nn.functional.max_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), 2, 2,
                                           return_indices=True)
  flat = flat.permute(0, 2, 3, 1).numpy()  # row * 8 + column in the 6x8 input
  rows, cols = np.meshgrid(np.arange(3), np.arange(4), indexing='ij')
  window = (flat // 8 - 2 * rows[..., None]) * 2 + flat % 8 - 2 * cols[..., None]
  pooled, argmax = segnet.max_pool_with_argmax(jnp.asarray(x))
  np.testing.assert_array_equal(argmax, window)
  np.testing.assert_array_equal(pooled, torch.nn.functional.max_pool2d(
      torch.from_numpy(x).permute(0, 3, 1, 2), 2, 2).permute(0, 2, 3, 1).numpy())
