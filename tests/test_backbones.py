"""Backbones: registry, output shapes, parameter counts, ImageNet weight import.

Parity against PyTorch runs without torch through the golden files in
tests/golden (regenerate them with tests/golden/make_golden.py); the tests
that build the PyTorch reference themselves skip when torch is missing.
"""

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cmtdp_jax.benchmarks import benchmark
from cmtdp_jax.models import backbones, convert, layers
from cmtdp_jax.tools import convert_weights

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), 'golden')
sys.path.insert(0, GOLDEN_DIR)
import make_golden  # noqa: E402  pylint: disable=wrong-import-position

# Backbone parameters without the classification head. ResNet: torchvision's
# 25,557,032 / 44,549,160 minus fc (2,049,000). HRNet: the PyTorch reference
# (whose full models have timm's published 15,597,464 / 77,469,864).
PARAM_COUNTS = {
    'hrnet_w18_small_v2': 3_860_720,
    'hrnet_w48': 65_325_120,
    'resnet50': 23_508_032,
    'resnet101': 42_500_160,
}
FULL_MODEL_PARAM_COUNTS = {
    'hrnet_w18_small_v2': 15_597_464,
    'hrnet_w48': 77_469_864,
    'resnet50': 25_557_032,
    'resnet101': 44_549_160,
}


def _relative_error(got, want) -> float:
  return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def _flax_forward(arch, kwargs, state_dict, images):
  variables, images = convert.convert_torch_state_dict(arch, state_dict), jnp.asarray(images)
  apply = functools.partial(backbones.get_backbone(arch, **kwargs).apply, train=False)
  # Compiling HRNet dominates; XLA's cheapest backend optimisation halves it.
  compiled = jax.jit(apply).lower(variables, images).compile(
      compiler_options={'xla_backend_optimization_level': 0})
  return compiled(variables, images)


def _lazy_state_dict(arch):
  """The official key layout with zero tensors that take no memory."""
  return {k: np.broadcast_to(np.zeros((), np.float32), s)
          for k, s in make_golden.load_key_shapes(arch).items()}


@functools.cache
def _abstract_init(name, dtype=jnp.float32, shape=(2, 64, 64, 3), **kwargs):
  module = backbones.get_backbone(name, dtype=dtype, **kwargs)
  init = functools.partial(module.init_with_output, train=False)
  return module, jax.eval_shape(init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))


def test_unknown_backbone_lists_valid_names():
  with pytest.raises(ValueError, match='hrnet_w18_small_v2, hrnet_w48, resnet101, resnet50'):
    backbones.get_backbone('hrnet_w32')


def test_register_backbone():
  @backbones.register_backbone('tiny_test')
  def tiny(dtype=jnp.float32, width=4):
    return backbones.compact.CompactBackbone(width=width, dtype=dtype)
  try:
    assert backbones.get_backbone('tiny_test', width=8).feature_channels == (8, 16, 32, 64)
    with pytest.raises(ValueError, match='already registered'):
      backbones.register_backbone('tiny_test', tiny)
  finally:
    del backbones.BACKBONES['tiny_test']


@pytest.mark.parametrize('name,kwargs,shape', [
    ('hrnet_w18_small_v2', {}, (2, 64, 64, 3)),
    ('hrnet_w18_small_v2', {}, (1, 425, 560, 3)),  # NYUD crop: odd sizes at every stride
    ('hrnet_w48', {}, (2, 64, 64, 3)),
    ('resnet50', {}, (2, 64, 64, 3)),
    ('resnet50', {'dilated': True}, (2, 64, 64, 3)),
    ('resnet101', {}, (2, 64, 64, 3)),
    ('resnet101', {'dilated': True}, (2, 64, 64, 3)),
])
def test_output_shapes(name, kwargs, shape):
  module, (outputs, _) = _abstract_init(name, shape=shape, **kwargs)
  assert len(outputs) == len(module.feature_channels) == 4
  for out, channels, stride in zip(outputs, module.feature_channels, module.feature_strides):
    assert out.shape == (shape[0], -(-shape[1] // stride), -(-shape[2] // stride), channels)
  assert module.feature_strides == ((4, 8, 8, 8) if kwargs.get('dilated') else (4, 8, 16, 32))


@pytest.mark.parametrize('name', ['hrnet_w18_small_v2', 'resnet50'])
def test_bfloat16_compute_float32_params(name):
  _, (outputs, variables) = _abstract_init(name, dtype=jnp.bfloat16, shape=(2, 64, 64, 3))
  assert all(o.dtype == jnp.bfloat16 for o in outputs)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))


@pytest.mark.parametrize('arch', list(PARAM_COUNTS))  # ViTs: test_vit.py
def test_param_counts(arch):
  """Flax == PyTorch reference (from the official key layout) == known totals."""
  flax_count = sum(int(np.prod(s)) for p, s in convert.expected_shapes(arch).items()
                   if p[0] == 'params')
  torch_count = sum(int(np.prod(s)) for k, s in make_golden.load_key_shapes(arch).items()
                    if k.endswith(('.weight', '.bias')))
  assert flax_count == torch_count == PARAM_COUNTS[arch]


def test_count_params():
  assert backbones.count_params('resnet50') == PARAM_COUNTS['resnet50']
  assert backbones.count_params('resnet50', dilated=True) == PARAM_COUNTS['resnet50']


@pytest.mark.parametrize('arch', list(PARAM_COUNTS))  # ViTs: test_vit.py
def test_key_mapping_round_trip(arch):
  """Every official backbone key maps to exactly one Flax variable and back."""
  state = _lazy_state_dict(arch)
  head = {'hrnet_w18_small_v2': 'classifier.weight', 'hrnet_w48': 'final_layer.0.weight',
          'resnet50': 'fc.weight', 'resnet101': 'fc.bias'}[arch]
  state[head] = np.zeros((10, 2), np.float32)
  converted = traverse_util.flatten_dict(convert.convert_torch_state_dict(arch, state))
  expected = convert.expected_shapes(arch)
  assert {p: v.shape for p, v in converted.items()} == expected
  backbone_keys = sorted(k for k in state if k != head and not k.endswith('num_batches_tracked'))
  assert sorted(convert.flax_to_torch_key(p) for p in expected) == backbone_keys
  for path, shape in expected.items():
    assert convert.torch_to_flax_path(convert.flax_to_torch_key(path), len(shape)) == path


def test_convert_names_every_bad_key():
  state = _lazy_state_dict('hrnet_w18_small_v2')
  del state['stage3.1.fuse_layers.2.0.1.0.weight']
  state['stage2.0.branches.0.0.conv3.weight'] = np.zeros((18, 18, 1, 1), np.float32)
  state['layer1.0.bn1.running_var'] = np.zeros((65,), np.float32)
  state['transition1.0.0.weight'] = np.zeros((18, 256, 1, 1), np.float32)
  with pytest.raises(convert.CheckpointMismatchError) as info:
    convert.convert_torch_state_dict('hrnet_w18_small_v2', state)
  message = str(info.value)
  assert '1 missing, 1 unexpected, 2 mis-shaped' in message
  for key in ('missing: stage3.1.fuse_layers.2.0.1.0.weight',
              'unexpected: stage2.0.branches.0.0.conv3.weight',
              'mis-shaped: layer1.0.bn1.running_var (65,), backbone wants (64,)',
              'mis-shaped: transition1.0.0.weight (18, 256, 1, 1), backbone wants (18, 256, 3, 3)'):
    assert key in message
  with pytest.raises(ValueError, match='valid: hrnet_w18_small_v2, hrnet_w48, resnet50'):
    convert.convert_torch_state_dict('compact', state)


@pytest.fixture(scope='module')
def golden_cases():
  cases = {}
  for name in make_golden.CASES:
    with np.load(os.path.join(GOLDEN_DIR, f'{name}.npz')) as data:
      cases[name] = {k: data[k] for k in data.files}
  return cases


@pytest.mark.parametrize('name', list(make_golden.CASES))
def test_golden_parity(name, golden_cases):
  """Flax on converted weights reproduces the stored PyTorch eval outputs."""
  case = golden_cases[name]
  arch = str(case['arch'])
  state = make_golden.random_state_dict(make_golden.load_key_shapes(arch),
                                        int(case['weight_seed']))
  images = make_golden.random_input(tuple(case['input_shape']), int(case['input_seed']))
  outputs = _flax_forward(arch, json.loads(str(case['kwargs'])), state, images)
  for i, out in enumerate(outputs):
    assert out.shape == case[f'out{i}'].shape
    assert _relative_error(out, case[f'out{i}']) < 1e-4, (name, i)


def test_nearest_fuse_upsampling_is_repeat():
  """upsample='nearest' differs from the golden-tested default only here."""
  x = jnp.asarray(make_golden.random_input((1, 3, 5, 2)))
  for factor in (2, 4, 8):
    np.testing.assert_array_equal(
        layers.resize_to(x, 3 * factor, 5 * factor, 'nearest'),
        np.repeat(np.repeat(x, factor, 1), factor, 2))


def test_golden_files_match_pytorch_reference(golden_cases):
  """The stored outputs are what the PyTorch reference computes today."""
  pytest.importorskip('torch', reason='rerunning the PyTorch reference needs torch')
  import torch_reference  # pylint: disable=import-outside-toplevel
  for name, (arch, kwargs, shape) in make_golden.CASES.items():
    model = torch_reference.build(arch, **kwargs)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(s) for k, s in make_golden.load_key_shapes(arch).items()}
    state = make_golden.random_state_dict(make_golden.load_key_shapes(arch),
                                          make_golden.WEIGHT_SEED)
    outputs = torch_reference.forward_nhwc(model, state, make_golden.random_input(shape))
    for i, out in enumerate(outputs):
      np.testing.assert_allclose(out, golden_cases[name][f'out{i}'], rtol=1e-5, atol=1e-5)


def test_full_model_param_counts():
  """The PyTorch references with their heads have the published sizes."""
  pytest.importorskip('torch', reason='building the PyTorch reference needs torch')
  import torch_reference  # pylint: disable=import-outside-toplevel
  for arch, count in FULL_MODEL_PARAM_COUNTS.items():
    full = torch_reference.build(arch, with_head=True)
    assert sum(p.numel() for p in full.parameters()) == count
    converted = convert.convert_torch_state_dict(
        arch, {k: np.broadcast_to(np.zeros((), np.float32), v.shape)
               for k, v in full.state_dict().items()})
    assert sum(v.size for v in jax.tree.leaves(converted['params'])) == PARAM_COUNTS[arch]


@pytest.fixture(scope='module')
def w18_weights(tmp_path_factory):
  """Random official-layout weights for hrnet_w18_small_v2, as safetensors and npz."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  state = make_golden.random_state_dict(make_golden.load_key_shapes('hrnet_w18_small_v2'), 5)
  state['classifier.weight'] = np.ones((1000, 2048), np.float32)
  directory = tmp_path_factory.mktemp('weights')
  src, dst = str(directory / 'w18.safetensors'), str(directory / 'w18.npz')
  save_file(state, src)
  convert_weights.main(['--arch', 'hrnet_w18_small_v2', '--src', src, '--dst', dst])
  return state, src, dst


def test_convert_weights_cli(w18_weights):
  state, _, dst = w18_weights
  want = traverse_util.flatten_dict(convert.convert_torch_state_dict('hrnet_w18_small_v2', state))
  with np.load(dst) as data:
    assert str(data['__arch__']) == 'hrnet_w18_small_v2'
    assert sorted(data.files) == sorted(['__arch__'] + ['/'.join(p) for p in want])
    for path, value in want.items():
      np.testing.assert_array_equal(data['/'.join(path)], value)


def test_convert_weights_cli_reads_pth(w18_weights, tmp_path):
  """A DataParallel checkpoint wrapped in {'state_dict': ...} converts the same."""
  torch = pytest.importorskip('torch', reason='reading .pth files needs torch')
  state, _, dst = w18_weights
  src = str(tmp_path / 'w18.pth')
  torch.save({'state_dict': {f'module.{k}': torch.from_numpy(v) for k, v in state.items()}}, src)
  convert_weights.main(['--arch', 'hrnet_w18_small_v2', '--src', src, '--dst', str(tmp_path / 'w')])
  with np.load(tmp_path / 'w.npz') as got, np.load(dst) as want:
    assert sorted(got.files) == sorted(want.files)
    for key in want.files:
      np.testing.assert_array_equal(got[key], want[key])


def test_convert_weights_cli_errors(w18_weights, tmp_path):
  _, src, _ = w18_weights
  with pytest.raises(SystemExit, match='--src file not found: nowhere.pth'):
    convert_weights.main(['--arch', 'resnet50', '--src', 'nowhere.pth', '--dst', 'x.npz'])
  with pytest.raises(SystemExit, match="unknown --arch 'hrnet_w18'; valid: hrnet_w18_small_v2,"):
    convert_weights.main(['--arch', 'hrnet_w18', '--src', src, '--dst', 'x.npz'])
  wrong_arch = r'does not match resnet50 \(a checkpoint of another arch\?\): \d+ missing'
  with pytest.raises(SystemExit, match=wrong_arch):
    convert_weights.main(['--arch', 'resnet50', '--src', src, '--dst', str(tmp_path / 'x')])


def _backbone_variables(arch):
  """What a model passes to load_pretrained: its backbone sub-trees (abstract here)."""
  _, (_, variables) = _abstract_init(arch, shape=(2, 64, 64, 3))
  return {'params': variables['params'], 'batch_stats': variables['batch_stats']}


def test_load_pretrained_fills_backbone(w18_weights):
  state, _, dst = w18_weights
  backbone = _backbone_variables('hrnet_w18_small_v2')
  loaded = convert.load_pretrained(backbone, dst, 'hrnet_w18_small_v2')
  assert jax.tree.structure(loaded) == jax.tree.structure(backbone)
  want = convert.convert_torch_state_dict('hrnet_w18_small_v2', state)
  jax.tree.map(np.testing.assert_array_equal, loaded, want)


def test_load_pretrained_names_every_bad_key(w18_weights, tmp_path):
  _, _, dst = w18_weights
  backbone = _backbone_variables('hrnet_w18_small_v2')
  with pytest.raises(convert.CheckpointMismatchError, match='holds hrnet_w18_small_v2 weights'):
    convert.load_pretrained(backbone, dst, 'hrnet_w48')
  with np.load(dst) as data:
    stored = {k: data[k] for k in data.files}
  del stored['params/stage4_1/branches_3_1/conv2/kernel']
  stored['params/extra/kernel'] = np.zeros(3)
  stored['batch_stats/bn1/mean'] = np.zeros(65)
  np.savez(tmp_path / 'bad.npz', **stored)
  with pytest.raises(convert.CheckpointMismatchError) as info:
    convert.load_pretrained(backbone, str(tmp_path / 'bad.npz'))
  message = str(info.value)
  assert '1 missing, 1 unexpected, 1 mis-shaped' in message
  for key in ('missing: params/stage4_1/branches_3_1/conv2/kernel',
              'unexpected: params/extra/kernel',
              'mis-shaped: batch_stats/bn1/mean (65,), model wants (64,)'):
    assert key in message


@pytest.mark.parametrize('name', ['hrnet_w18_small_v2', 'resnet50'])
def test_train_mode_updates_every_batch_norm(name):
  """No BatchNorm passes its running stats through unchanged when training."""
  module, (_, variables) = _abstract_init(name, shape=(2, 64, 64, 3))
  updates = jax.make_jaxpr(
      lambda v, x: module.apply(v, x, train=True, mutable=['batch_stats'])[1])(
          variables, jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
  assert len(updates.jaxpr.outvars) == len(jax.tree.leaves(variables['batch_stats']))
  assert not set(updates.jaxpr.outvars) & set(updates.jaxpr.invars)


def _activation_bytes(module, variables, shape):
  """Bytes the backward pass keeps from the forward for one image (VJP residuals at
  two batch sizes: the difference leaves out the parameters)."""
  def loss(variables, x):
    outputs, _ = module.apply(variables, x, train=True, mutable=['batch_stats'])
    return sum(jnp.sum(o) for o in outputs)

  return (benchmark.residual_bytes(loss, variables, jax.ShapeDtypeStruct((2, *shape[1:]),
                                                                          jnp.float32)) -
          benchmark.residual_bytes(loss, variables, jax.ShapeDtypeStruct((1, *shape[1:]),
                                                                          jnp.float32)))


@pytest.mark.parametrize('name,reduction', [
    ('hrnet_w18_small_v2', 3.0), ('resnet50', 3.0), ('compact', 1.4)])
def test_remat_keeps_variables_and_stores_fewer_activations(name, reduction):
  shape = (2, 64, 64, 3)
  module, (outputs, variables) = _abstract_init(name, shape=shape)
  remat_module, (remat_outputs, remat_variables) = _abstract_init(name, shape=shape, remat=True)
  # Same names and shapes: checkpoints and converted ImageNet weights load either way.
  assert jax.tree.map(lambda v: v.shape, variables) == jax.tree.map(
      lambda v: v.shape, remat_variables)
  assert [o.shape for o in outputs] == [o.shape for o in remat_outputs]
  stored = _activation_bytes(module, variables, shape)
  assert _activation_bytes(remat_module, variables, shape) * reduction < stored


def test_remat_gives_the_same_gradients():
  images = jax.random.normal(jax.random.key(1), (4, 64, 64, 3))
  grads = []
  for remat in (False, True):
    module = backbones.get_backbone('compact', width=8, blocks=2, remat=remat)
    variables = module.init(jax.random.key(0), images, train=False)

    def loss(params, x):
      outputs, _ = module.apply({**variables, 'params': params}, x, train=True,
                                mutable=['batch_stats'])
      return sum(jnp.sum(o ** 2) for o in outputs)

    grads.append(jax.jit(jax.grad(loss), compiler_options={'xla_backend_optimization_level': 0})(
        variables['params'], images))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), *grads)


def test_backbone_rejects_unknown_options_in_one_line():
  with pytest.raises(ValueError, match="backbone 'compact' does not take the options"):
    backbones.get_backbone('compact', depth=3)
