"""ViT backbones: timm layout and parameter counts, weight import, parity, resizing, sharding.

Parity against timm runs without torch through golden files (regenerate them
with tests/golden/make_vit_golden.py); the live comparison at full size is
`python -m cmtdp_jax.tools.check_backbone`.
"""

import functools
import importlib.util
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cmtdp_jax import models, steps, train
from cmtdp_jax.benchmarks import benchmark
from cmtdp_jax.models import backbones, convert
from cmtdp_jax.models.backbones import vit
from cmtdp_jax.tools import check_backbone, convert_weights
from tests import same_training
from tests.conftest import tiny_config
from tests.test_train_step import trained_run

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), 'golden')
sys.path.insert(0, GOLDEN_DIR)
import make_golden  # noqa: E402  pylint: disable=wrong-import-position
import make_invpt_golden  # noqa: E402  pylint: disable=wrong-import-position
import make_vit_golden  # noqa: E402  pylint: disable=wrong-import-position

# sum(p.numel() for p in timm.create_model(name).parameters()), timm 1.0.31, with
# the 1000-class head; (arch, img_size) -> (timm name, count). Only the position
# embedding differs between 224 and 384.
TIMM_PARAM_COUNTS = {
    ('vit_s16', 224): ('vit_small_patch16_224', 22_050_664),
    ('vit_s16', 384): ('vit_small_patch16_384', 22_196_584),
    ('vit_b16', 224): ('vit_base_patch16_224', 86_567_656),
    ('vit_b16', 384): ('vit_base_patch16_384', 86_859_496),
    ('vit_l16', 224): ('vit_large_patch16_224', 304_326_632),
    ('vit_l16', 384): ('vit_large_patch16_384', 304_715_752),
}
# The simple feature pyramid (256 channels) on top of the trunk.
PYRAMID_PARAM_COUNTS = {'vit_s16': 3_298_144, 'vit_b16': 5_560_000, 'vit_l16': 7_805_184}
TINY = {'depth': 2, 'dim': 32, 'num_heads': 2, 'pyramid_channels': 16}


def _relative_error(got, want) -> float:
  return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def _key_shapes(arch):
  return make_golden.load_key_shapes(arch, make_vit_golden.KEY_SHAPES_FILE)


def _lazy_state_dict(arch):
  """timm's key layout with zero tensors that take no memory."""
  return {k: np.broadcast_to(np.zeros((), np.float32), s) for k, s in _key_shapes(arch).items()}


@functools.cache
def _abstract_init(name, shape=(2, 64, 64, 3), dtype=jnp.float32, **kwargs):
  module = backbones.get_backbone(name, dtype=dtype, **kwargs)
  init = functools.partial(module.init_with_output, train=False)
  return module, jax.eval_shape(init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))


@pytest.mark.parametrize('arch,img_size', list(TIMM_PARAM_COUNTS))
def test_param_counts_equal_timm(arch, img_size):
  """Trunk + timm's head == timm's model; trunk + pyramid == the backbone."""
  trunk = sum(int(np.prod(s)) for p, s in convert.expected_shapes(arch, img_size=img_size).items()
              if p[0] == 'params')
  dim = vit.SIZES[arch]['dim']
  assert trunk + dim * 1000 + 1000 == TIMM_PARAM_COUNTS[arch, img_size][1]
  if img_size == 224:
    assert backbones.count_params(arch) == trunk + PYRAMID_PARAM_COUNTS[arch]


@pytest.mark.parametrize('arch', list(vit.SIZES))
def test_key_layout_is_timms(arch):
  """Every timm key but the head maps to exactly one trunk variable, shapes included."""
  state = _lazy_state_dict(arch)
  converted = traverse_util.flatten_dict(convert.convert_torch_state_dict(arch, state))
  assert {p: v.shape for p, v in converted.items()} == convert.expected_shapes(arch)
  assert sorted(convert.flax_to_torch_key(p) for p in converted) == sorted(
      k for k in state if not k.startswith('head.'))


def test_output_shapes_strides_and_dtypes():
  for shape in [(2, 64, 96, 3), (1, 50, 70, 3)]:  # 50x70 is padded to 64x80
    module, (outputs, variables) = _abstract_init('vit_s16', shape=shape, **TINY)
    assert module.feature_strides == (4, 8, 16, 32) and module.feature_channels == (16,) * 4
    grid = (-(-shape[1] // 16), -(-shape[2] // 16))
    assert [o.shape for o in outputs] == [
        (shape[0], grid[0] * 4, grid[1] * 4, 16), (shape[0], grid[0] * 2, grid[1] * 2, 16),
        (shape[0], *grid, 16), (shape[0], -(-grid[0] // 2), -(-grid[1] // 2), 16)]
  assert backbones.get_backbone('vit_l16').block_indices == (5, 11, 17, 23)
  assert backbones.get_backbone('vit_b16').block_indices == (2, 5, 8, 11)
  _, (outputs, variables) = _abstract_init('vit_s16', dtype=jnp.bfloat16, **TINY)
  assert all(o.dtype == jnp.bfloat16 for o in outputs)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
  for taps in [(0, 1, 1), (1, 0, 1, 1), (0, 0, 1, 2)]:
    with pytest.raises(ValueError, match=r'must be 4 ascending block indices in \[0, 2\)'):
      _abstract_init('vit_s16', **TINY, taps=taps)


def test_remat_stores_fewer_activations():
  """nn.remat per block: same variables, a third of the blocks' activations kept for backward."""
  params = _abstract_init('vit_s16', **TINY)[1][1]['params']
  assert params == _abstract_init('vit_s16', remat=True, **TINY)[1][1]['params']
  stored = []
  for remat in (False, True):
    module = backbones.get_backbone('vit_s16', remat=remat, **TINY)
    # The blocks' activations for two more images (the pyramid is not rematerialised).
    trunk = lambda p, x, module=module: sum(
        jnp.sum(t) for t in module.apply({'params': p}, x, method=vit.VisionTransformer.tokens)[0])
    stored.append(benchmark.residual_bytes(trunk, params, jax.ShapeDtypeStruct((4, 64, 64, 3),
                                                                               jnp.float32)) -
                  benchmark.residual_bytes(trunk, params, jax.ShapeDtypeStruct((2, 64, 64, 3),
                                                                               jnp.float32)))
  assert stored[1] * 2.5 < stored[0]


@pytest.mark.parametrize('index', range(len(make_vit_golden.RESIZES)))
def test_position_embedding_resize_matches_torch(index):
  """resize_grid == torch's bicubic antialias=True interpolate (timm's resample_abs_pos_embed)."""
  grid, size = make_vit_golden.RESIZES[index]
  with np.load(os.path.join(GOLDEN_DIR, 'vit_resize.npz')) as data:
    want = data[f'resize{index}']
  got = vit.resize_grid(jnp.asarray(make_vit_golden.resize_input(grid)), *size)
  assert got.shape == want.shape
  assert _relative_error(got, want) < 1e-5


def test_resize_matrix_is_not_plain_keys_bicubic():
  """Upsampling rows hold Keys a=-0.5 weights renormalised at the border, not a=-0.75 clamped."""
  weights = vit.resize_matrix(2, 4)
  np.testing.assert_allclose(weights.sum(axis=1), 1.0)
  # Output 0 sits at input coordinate -0.25: taps at 0 and 1 only (distance 0.25, 1.25).
  taps = vit._keys_cubic(np.array([0.25, 1.25]))  # pylint: disable=protected-access
  np.testing.assert_allclose(weights[0], taps / taps.sum())


def test_golden_parity():
  """Converted timm weights reproduce timm's tokens (golden, position grid resized 14x14 -> 2x3)."""
  with np.load(os.path.join(GOLDEN_DIR, 'vit_s16.npz')) as data:
    case = {k: data[k] for k in data.files}
  arch = str(case['arch'])
  state = make_vit_golden.random_vit_state_dict(_key_shapes(arch), int(case['weight_seed']))
  images = make_golden.random_input(tuple(case['input_shape']), int(case['input_seed']))
  module = backbones.get_backbone(arch)
  assert module.block_indices == tuple(case['taps'])
  tokens, _ = jax.jit(lambda v, x: module.apply(v, x, method=vit.VisionTransformer.tokens))(
      convert.convert_torch_state_dict(arch, state), images)
  for i, got in enumerate(tokens):
    assert got.shape == case[f'tokens{i}'].shape
    assert _relative_error(got, case[f'tokens{i}']) < 1e-4, i


def test_convert_names_every_bad_key():
  state = _lazy_state_dict('vit_s16')
  del state['blocks.7.mlp.fc2.bias']
  state['blocks.3.ls1.gamma'] = np.zeros((384,), np.float32)
  state['blocks.0.attn.qkv.weight'] = np.zeros((384, 1152), np.float32)  # transposed
  state['patch_embed.proj.weight'] = np.zeros((384, 3, 14, 14), np.float32)
  with pytest.raises(convert.CheckpointMismatchError) as info:
    convert.convert_torch_state_dict('vit_s16', state)
  message = str(info.value)
  assert '1 missing, 1 unexpected, 2 mis-shaped' in message
  for line in ('missing: blocks.7.mlp.fc2.bias', 'unexpected: blocks.3.ls1.gamma',
               'mis-shaped: blocks.0.attn.qkv.weight (384, 1152), backbone wants (1152, 384)',
               'mis-shaped: patch_embed.proj.weight (384, 3, 14, 14), backbone wants '
               '(384, 3, 16, 16)'):
    assert line in message
  with pytest.raises(convert.CheckpointMismatchError, match=r'a checkpoint of another arch\?'):
    convert.convert_torch_state_dict('vit_b16', _lazy_state_dict('vit_s16'))


def test_convert_reads_384_checkpoints():
  """The position grid sets img_size; the head is dropped."""
  state = _lazy_state_dict('vit_s16')
  state['pos_embed'] = np.zeros((1, 577, 384), np.float32)
  assert convert.checkpoint_options('vit_s16', state) == {'img_size': 384}
  converted = convert.convert_torch_state_dict('vit_s16', state)
  assert converted['params']['pos_embed'].shape == (1, 577, 384)
  assert 'head' not in converted['params'] and 'batch_stats' not in converted


def _to_vit_npz(state):
  """timm state_dict -> the original ViT .npz layout (the inverse of timm's _load_weights)."""
  arrays = {'embedding/kernel': state['patch_embed.proj.weight'].transpose(2, 3, 1, 0),
            'embedding/bias': state['patch_embed.proj.bias'], 'cls': state['cls_token'],
            'Transformer/posembed_input/pos_embedding': state['pos_embed'],
            'Transformer/encoder_norm/scale': state['norm.weight'],
            'Transformer/encoder_norm/bias': state['norm.bias'],
            'head/kernel': state['head.weight'].T, 'head/bias': state['head.bias']}
  dim = state['cls_token'].shape[-1]
  heads = vit.SIZES['vit_s16']['num_heads']
  index = 0
  while f'blocks.{index}.norm1.weight' in state:
    block, out = f'blocks.{index}.', f'Transformer/encoderblock_{index}/'
    for torch_norm, npz_norm in (('norm1', 'LayerNorm_0'), ('norm2', 'LayerNorm_2')):
      arrays[f'{out}{npz_norm}/scale'] = state[f'{block}{torch_norm}.weight']
      arrays[f'{out}{npz_norm}/bias'] = state[f'{block}{torch_norm}.bias']
    for r in range(2):
      arrays[f'{out}MlpBlock_3/Dense_{r}/kernel'] = state[f'{block}mlp.fc{r + 1}.weight'].T
      arrays[f'{out}MlpBlock_3/Dense_{r}/bias'] = state[f'{block}mlp.fc{r + 1}.bias']
    qkv_w = state[f'{block}attn.qkv.weight'].reshape(3, heads, dim // heads, dim)
    qkv_b = state[f'{block}attn.qkv.bias'].reshape(3, heads, dim // heads)
    for i, name in enumerate(('query', 'key', 'value')):
      arrays[f'{out}MultiHeadDotProductAttention_1/{name}/kernel'] = qkv_w[i].transpose(2, 0, 1)
      arrays[f'{out}MultiHeadDotProductAttention_1/{name}/bias'] = qkv_b[i]
    arrays[f'{out}MultiHeadDotProductAttention_1/out/kernel'] = (
        state[f'{block}attn.proj.weight'].T.reshape(heads, dim // heads, dim))
    arrays[f'{out}MultiHeadDotProductAttention_1/out/bias'] = state[f'{block}attn.proj.bias']
    index += 1
  return arrays


@pytest.fixture(scope='module')
def vit_s16_state():
  return make_vit_golden.random_vit_state_dict(_key_shapes('vit_s16'), 3)


def test_vit_npz_to_timm(vit_s16_state):
  arrays = _to_vit_npz(vit_s16_state)
  got = convert.vit_npz_to_timm({f'opt/target/{k}': v for k, v in arrays.items()})
  assert sorted(got) == sorted(k for k in vit_s16_state if not k.startswith('head.'))
  for key, value in got.items():
    np.testing.assert_array_equal(value, vit_s16_state[key], err_msg=key)
  del arrays['Transformer/encoderblock_4/MultiHeadDotProductAttention_1/key/bias']
  arrays['Transformer/encoderblock_2/LayerNorm_1/scale'] = np.ones(384, np.float32)
  with pytest.raises(convert.CheckpointMismatchError) as info:
    convert.convert_torch_state_dict('vit_s16', convert.vit_npz_to_timm(arrays))
  message = str(info.value)
  assert '1 missing, 3 unexpected, 0 mis-shaped' in message
  for line in ('missing: blocks.4.attn.qkv.bias',
               'unexpected: Transformer/encoderblock_2/LayerNorm_1/scale',
               'unexpected: Transformer/encoderblock_4/MultiHeadDotProductAttention_1/query/bias',
               'unexpected: Transformer/encoderblock_4/MultiHeadDotProductAttention_1/value/bias'):
    assert line in message


@pytest.mark.parametrize('suffix', ['.safetensors', '.npz'])
def test_convert_weights_cli(vit_s16_state, tmp_path, suffix, capsys):
  """Both checkpoint formats give the same .npz, which loads into the trunk only."""
  src = str(tmp_path / f'src{suffix}')
  if suffix == '.npz':
    np.savez(src, **_to_vit_npz(vit_s16_state))
  else:
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    save_file(vit_s16_state, src)
  dst = str(tmp_path / 'dst.npz')
  convert_weights.main(['--arch', 'vit_s16', '--src', src, '--dst', dst])
  assert 'the pyramid is not in the checkpoint' in capsys.readouterr().out
  want = traverse_util.flatten_dict(convert.convert_torch_state_dict('vit_s16', vit_s16_state))
  with np.load(dst) as data:
    assert sorted(data.files) == sorted(['__arch__'] + ['/'.join(p) for p in want])
    for path, value in want.items():
      np.testing.assert_array_equal(data['/'.join(path)], value)
  _, (_, variables) = _abstract_init('vit_s16')
  fresh = jax.tree.map(lambda s: np.full(s.shape, 7.0, s.dtype), variables)
  loaded = convert.load_pretrained(fresh, dst, 'vit_s16')
  assert jax.tree.structure(loaded) == jax.tree.structure(fresh)
  np.testing.assert_array_equal(loaded['params']['blocks_3']['attn']['qkv']['kernel'],
                                vit_s16_state['blocks.3.attn.qkv.weight'].T)
  assert all(np.all(leaf == 7.0) for leaf in jax.tree.leaves(loaded['params']['pyramid']))


def test_training_loads_pretrained_vit(tmp_path):
  """train.py's pretrained path works for a backbone without batch statistics."""
  config = tiny_config(**{'model.backbone': 'vit_s16', 'model.backbone_kwargs': dict(TINY),
                          'model.backbone_kwargs_for': 'vit_s16', 'tasks': ('semseg',)})
  model = models.get_model(config.model, ('semseg',), {'semseg': 3})
  initial = jax.jit(model.init, static_argnames='train')(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  state = steps.TrainState(step=0, params={'model': initial['params']},
                           batch_stats=initial['batch_stats'], opt_state=None,
                           nonfinite_steps=0, nonfinite_streak=0)
  flat = {('params', *p): np.asarray(v) + 1.0
          for p, v in traverse_util.flatten_dict(initial['params']['backbone']).items()
          if p[0] not in convert.NEW_LAYERS['vit_s16']}
  config.model.pretrained = convert.save_npz(
      str(tmp_path / 'tiny'), traverse_util.unflatten_dict(flat), 'vit_s16')
  built = types.SimpleNamespace(model=model,
                                state_sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  loaded = train._load_pretrained_backbone(state, config.model, built)  # pylint: disable=protected-access
  backbone = loaded.params['model']['backbone']
  np.testing.assert_array_equal(backbone['pos_embed'], flat['params', 'pos_embed'])
  jax.tree.map(np.testing.assert_array_equal, backbone['pyramid'],
               state.params['model']['backbone']['pyramid'])
  assert jax.tree.structure(loaded.batch_stats) == jax.tree.structure(state.batch_stats)

  # A backbone built for another grid (InvPT: img_size = the training size) gets the
  # checkpoint's grid resized once, as InvPT's resize_pos_embed (14x14 -> 3x5 here).
  config.model.backbone_kwargs.img_size = (48, 80)
  wide = models.get_model(config.model, ('semseg',), {'semseg': 3})
  initial = jax.jit(wide.init, static_argnames='train')(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  state = state.replace(params={'model': initial['params']})
  loaded = train._load_pretrained_backbone(  # pylint: disable=protected-access
      state, config.model, types.SimpleNamespace(model=wide,
                                                 state_sharding=built.state_sharding))
  np.testing.assert_allclose(loaded.params['model']['backbone']['pos_embed'],
                             vit.resize_position_embedding(flat['params', 'pos_embed'], 3, 5),
                             rtol=0, atol=0)


def test_fsdp_shards_vit_params_and_matches_one_device():
  """A tiny ViT trains identically on 1 device and on a (data 4, fsdp 2) mesh."""
  assert jax.device_count() == 8, 'run with JAX_NUM_CPU_DEVICES=8'
  config = tiny_config(**{'model.backbone': 'vit_s16', 'model.backbone_kwargs': dict(TINY),
                          'model.backbone_kwargs_for': 'vit_s16', 'optim.name': 'sgd',
                          'tasks': ('semseg',), 'mesh.fsdp_min_size': 256})
  fsdp = jax.make_mesh((4, 2), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  one = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  run_fsdp, state_fsdp, _ = trained_run(config, fsdp, 3)
  same_training.assert_same_training(trained_run(config, one, 3)[0], run_fsdp)  # tolerances there
  backbone = traverse_util.flatten_dict(state_fsdp.params['model']['backbone'])
  for path in [('blocks_0', 'attn', 'qkv', 'kernel'), ('blocks_1', 'mlp', 'fc1', 'kernel'),
               ('pos_embed',)]:
    leaf = backbone[path]
    assert 'fsdp' in str(leaf.sharding.spec), path
    assert leaf.addressable_shards[0].data.size * 2 == leaf.size


def test_check_backbone_without_torch_says_so():
  """The parity tool needs torch and timm (CI has neither): without them, one error line."""
  if importlib.util.find_spec('torch') and importlib.util.find_spec('timm'):
    pytest.skip('torch and timm are installed: check_backbone would run')
  with pytest.raises(SystemExit, match='error: check_backbone needs torch and timm'):
    check_backbone.main(['--backbone', 'vit_s16', '--timm', 'vit_small_patch16_224'])


@pytest.mark.parametrize('index', range(len(make_invpt_golden.POS_EMBED_RESIZES)))
def test_position_embedding_resized_at_load_as_invpt(index):
  """resize_position_embedding == InvPT's resize_pos_embed (torch bicubic, no antialiasing:
  Keys a=-0.75, border clamped), which the antialiased resize_grid is not."""
  grid, new = make_invpt_golden.POS_EMBED_RESIZES[index]
  with np.load(make_invpt_golden.POS_EMBED_FILE) as data:
    want = data[f'resize{index}']
  embedding = make_invpt_golden.pos_embed_input(grid)
  got = vit.resize_position_embedding(embedding, *new)
  assert got.shape == want.shape and got.dtype == np.float32
  assert _relative_error(got, want) < 1e-6  # float32 rounding of a float64 result
  np.testing.assert_array_equal(got[:, 0], embedding[:, 0])
  antialiased = vit.resize_grid(jnp.asarray(embedding[0, 1:].reshape(*grid, -1)), *new)
  assert _relative_error(np.asarray(antialiased).reshape(1, -1, want.shape[-1]),
                         want[:, 1:]) > 1e-3


def test_drop_path_drops_whole_branches_per_image():
  """timm's DropPath: each image's residual branch is kept with probability 1 - rate and
  scaled by 1 / (1 - rate); evaluation and rate 0 are the identity."""
  block = vit.Block(2, 1.0, jnp.float32, 0.25)
  x = jax.random.normal(jax.random.key(0), (4000, 3, 8))
  variables = block.init(jax.random.key(1), x)
  plain = vit.Block(2, 1.0, jnp.float32, 0.0)
  np.testing.assert_array_equal(block.apply(variables, x), plain.apply(variables, x))
  dropped = np.asarray(block.apply(variables, x, True, rngs={'dropout': jax.random.key(2)}))
  both_dropped = np.all(dropped == np.asarray(x), axis=(1, 2))
  assert abs(both_dropped.mean() - 0.25 ** 2) < 0.02  # binomial sd 0.004 at n=4000
  unscaled = np.all(np.isclose(dropped, plain.apply(variables, x)), axis=(1, 2))
  assert not unscaled.any()  # a kept branch is scaled by 1 / 0.75
  model = vit.vit_s16(**TINY, drop_path_rate=0.3)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert [round(b.drop_path, 6) for b in model.bind(shapes).blocks] == [0.0, 0.3]


def test_stochastic_depth_draws_from_the_step_rng():
  """A ViT with drop_path_rate asks the train step for a 'dropout' stream, folded from the
  step's rng: the same state at two step numbers then gives two losses. Without it the
  step has no stream."""
  config = tiny_config(**{'model.backbone': 'vit_s16', 'model.backbone_kwargs': dict(TINY),
                          'model.backbone_kwargs_for': 'vit_s16', 'tasks': ('semseg',)})
  assert models.rng_streams(models.get_model(config.model, ('semseg',), {'semseg': 3})) == ()
  config.model.backbone_kwargs.drop_path_rate = 0.5
  mesh = jax.make_mesh((1,), ('data',), axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=jax.devices()[:1])
  built = steps.setup(config, mesh)
  assert built.trainer.model_rng_streams == ('dropout',)
  batch = {'image': jax.random.normal(jax.random.key(3), (config.batch_size, 32, 32, 3)),
           'semseg': jnp.ones((config.batch_size, 32, 32), jnp.int32)}
  losses = []
  for step in (0, 1):  # a fresh state each time: the step donates its input
    state = built.init(steps.init_key(0))
    state = state.replace(step=jnp.full_like(state.step, step))
    losses.append(float(built.train_step(state, batch)[1]['loss/total']))
  assert losses[0] != losses[1]
