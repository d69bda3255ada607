"""InvPT's released checkpoints: conversion of the whole model, its evaluation path, and the
ViT-L configs' parameter count.

tests/golden/invpt_checkpoint.pth was saved by torch.save from the PyTorch transcription
(tests/golden/torch_invpt.py, TransformerNet: InvPT's ViT and decoder) in InvPT's format:
{'optimizer', 'scheduler', 'model', 'epoch', 'iter_count'} with DataParallel's 'module.'
keys, at a tiny width, tasks semseg, sal (InvPT's 2-class softmax) and normals, on a
non-square 64x128 position grid. invpt_checkpoint.npz holds the transcription's float64
outputs (make_invpt_golden.py). Neither needs torch here: the file is read by
`cmtdp_jax.pickled`.
"""

import functools
import json
import os
import pickle
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from cmtdp_jax import config_lib, models, pickled, sharding, steps, train
from cmtdp_jax import data as data_lib
from cmtdp_jax.data import pipeline
from cmtdp_jax import tasks as tasks_lib
from cmtdp_jax.models import convert
from cmtdp_jax.tools import convert_weights
from tests.conftest import tiny_config

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), 'golden')
sys.path.insert(0, GOLDEN_DIR)
import make_invpt_golden as golden_lib  # noqa: E402  pylint: disable=wrong-import-position

CASE = golden_lib.CHECKPOINT_CASE
TINY_BACKBONE = {'dim': CASE['dim'], 'depth': CASE['depth'], 'num_heads': CASE['num_heads'],
                 'mlp_ratio': CASE['mlp_ratio']}
IMAGE_SIZE = [str(n) for n in CASE['image_size']]
# Max relative error against the transcription's float64 outputs. Measured float32 noise on
# this case: torch's float32 forward 1.3e-6 at worst, ours (XLA CPU) 1.2e-6; 2e-5 as in
# test_invpt.py, far below a structural mistake (there: 3e-2 and more).
TOLERANCE = 2e-5


def convert_cli(tmp_path, *extra, src=golden_lib.CHECKPOINT_FILE):
  dst = str(tmp_path / 'invpt.npz')
  convert_weights.main(['--framework', 'invpt', '--arch', 'vit_s16', '--src', str(src),
                        '--dst', dst, '--backbone-kwargs', json.dumps(TINY_BACKBONE), *extra])
  return dst


def read_state():
  state = convert_weights.read_model_state_dict(golden_lib.CHECKPOINT_FILE)
  assert all(not k.startswith('module.') for k in state)
  return state


def model_config(tasks=CASE['tasks'], img_size=tuple(CASE['image_size'])):
  return ml_collections.ConfigDict(dict(
      framework='invpt', backbone='vit_s16', dtype='float32', head_channels=CASE['embed_dim'],
      backbone_kwargs={**TINY_BACKBONE, 'img_size': img_size}))


def predict(variables, config, tasks=CASE['tasks']):
  model = models.get_model(config, tasks, {'semseg': CASE['outputs'][0]})
  apply = functools.partial(model.apply, train=False, mutable=['intermediates'])
  (predictions, features), updates = jax.jit(apply)(variables, golden_lib.checkpoint_images())
  out = dict(predictions)
  out.update(steps.aux_predictions(updates['intermediates']))
  out.update({f'{t}/feature': f for t, f in features.items()})
  return {k: np.asarray(v) for k, v in out.items()}


def abstract_variables(config, tasks=CASE['tasks'], image_size=CASE['image_size']):
  model = models.get_model(config, tasks, {'semseg': CASE['outputs'][0]})
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                        jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32))


def relative_error(got, want):
  return float(np.abs(got - want).max() / np.abs(want).max())


def test_released_format_converts_and_predicts_as_the_transcription(tmp_path, capsys):
  """The CLI reads the torch.save file without torch, reports exactly InvPT's unused
  modules, and the model built from the .npz gives the transcription's outputs: every
  task's prediction, intermediate prediction and feature. InvPT's 2-class saliency is
  compared as its logit difference, which our one-logit head computes."""
  dst = convert_cli(tmp_path, '--img-size', *IMAGE_SIZE)
  printed = capsys.readouterr().out
  unused = printed.split('never reads): ')[1].strip().split(', ')
  state = read_state()
  assert unused == convert.invpt_unused_keys(state)
  for prefix in convert.INVPT_UNUSED_PREFIXES:  # the dead block-18 conv and three more
    assert any(k.startswith(prefix) for k in unused), prefix
  assert 'tasks in order semseg (5), sal (1), normals (3)' in printed
  config = model_config()
  variables = convert.load_model_weights(abstract_variables(config), dst, 'invpt', 'vit_s16',
                                         CASE['tasks'], tuple(CASE['image_size']))
  ours = predict(variables, config)
  golden = golden_lib.load(golden_lib.CHECKPOINT_GOLDEN)
  assert set(golden) == set(ours)
  errors = {}
  for name, want in golden.items():
    if name in ('sal', 'sal/intermediate'):
      want = want[..., 1:] - want[..., :1]
    errors[name] = relative_error(golden_lib.stored(name, ours[name]), want)
  assert max(errors.values()) < TOLERANCE, errors


def test_two_class_fold_is_needed():
  """Without the fold, the 2-class saliency heads do not fit the one-logit model."""
  state = read_state()
  folded = convert.fold_invpt_two_class_head(state, 'sal')
  assert folded['heads.sal.linear_pred.weight'].shape[0] == 1
  mix = 'multi_task_decoder.invpt.mix_proj.sal.0.weight'
  assert folded[mix].shape[1] == state[mix].shape[1] - 1
  with pytest.raises(convert.CheckpointMismatchError, match='mis-shaped'):
    convert.convert_invpt_decoder_state_dict(
        state, (('semseg', 5), ('sal', 1), ('normals', 3)), CASE['dim'], CASE['embed_dim'])


def test_task_order_is_read_from_the_file_or_asked_for(tmp_path, capsys):
  state = read_state()
  assert convert.invpt_task_order(state) == CASE['tasks']
  resorted = {k: state[k] for k in sorted(state)}
  with pytest.raises(convert.CheckpointMismatchError, match='sorted alphabetically'):
    convert.invpt_task_order(resorted)
  shuffled = dict(state)  # one task dict listing the tasks in another order
  for key in [k for k in state if k.startswith('heads.semseg.')]:
    shuffled[key] = shuffled.pop(key)
  with pytest.raises(convert.CheckpointMismatchError, match='different orders'):
    convert.invpt_task_order(shuffled)
  # The CLI asks for --tasks in one line; given, the sorted file converts as the original.
  sorted_file = tmp_path / 'sorted.pth'
  sorted_file.write_bytes(b'')
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(convert_weights, 'read_model_state_dict', lambda path: resorted)
    with pytest.raises(SystemExit) as error:
      convert_cli(tmp_path, '--img-size', *IMAGE_SIZE, src=sorted_file)
    message = str(error.value)
    assert '\n' not in message and 'give --tasks in its order' in message
    given = convert_cli(tmp_path, '--img-size', *IMAGE_SIZE, '--tasks',
                        ','.join(CASE['tasks']), src=sorted_file)
  capsys.readouterr()
  with pytest.raises(convert.CheckpointMismatchError, match="not the checkpoint's"):
    convert.convert_invpt_state_dict(state, 'vit_s16', ('semseg', 'depth', 'normals'),
                                     img_size=tuple(CASE['image_size']), **TINY_BACKBONE)
  want, _ = convert.convert_invpt_state_dict(state, 'vit_s16',
                                             img_size=tuple(CASE['image_size']), **TINY_BACKBONE)
  with np.load(given) as data:
    for path, value in traverse_util.flatten_dict(want).items():
      np.testing.assert_array_equal(data['/'.join(path)], value)


def test_a_backbone_other_than_a_vit_is_one_line(tmp_path):
  with pytest.raises(SystemExit) as error:
    convert_weights.main(['--framework', 'invpt', '--arch', 'hrnet_w48', '--src',
                          golden_lib.CHECKPOINT_FILE, '--dst', str(tmp_path / 'x.npz')])
  assert '\n' not in str(error.value) and "not 'hrnet_w48'" in str(error.value)


@pytest.mark.parametrize('kwargs,message', [('{"dim": 64,', 'is not JSON'),
                                            ('{"width": 3}', "unknown: ['width']")])
def test_bad_backbone_kwargs_are_one_line(tmp_path, kwargs, message):
  with pytest.raises(SystemExit) as error:
    convert_weights.main(['--framework', 'invpt', '--arch', 'vit_s16', '--src',
                          golden_lib.CHECKPOINT_FILE, '--dst', str(tmp_path / 'x.npz'),
                          '--backbone-kwargs', kwargs])
  assert '\n' not in str(error.value) and message in str(error.value)


@pytest.mark.parametrize('dropped', ['multi_task_decoder.intermediate_head.semseg.weight',
                                     'multi_task_decoder.intermediate_head.sal.bias'])
def test_a_missing_key_the_converter_reads_is_named(dropped):
  state = read_state()
  del state[dropped]
  with pytest.raises(convert.CheckpointMismatchError, match=f'missing {dropped}'):
    convert.convert_invpt_state_dict(state, 'vit_s16', img_size=tuple(CASE['image_size']),
                                     **TINY_BACKBONE)


def test_non_square_grid_needs_img_size(tmp_path):
  with pytest.raises(SystemExit) as error:
    convert_cli(tmp_path)
  message = str(error.value)
  assert '\n' not in message and '32 positions, not a square grid' in message
  assert message.endswith('give --img-size H W')


def test_loading_names_task_order_and_grid_mismatches(tmp_path):
  dst = convert_cli(tmp_path, '--img-size', *IMAGE_SIZE)
  reordered = ('sal', 'semseg', 'normals')
  with pytest.raises(convert.CheckpointMismatchError) as error:
    convert.load_model_weights(abstract_variables(model_config(), reordered), dst, 'invpt',
                               'vit_s16', reordered, tuple(CASE['image_size']))
  assert "order ['semseg', 'sal', 'normals']" in str(error.value)
  transposed = tuple(CASE['image_size'][::-1])  # as many positions, another grid
  with pytest.raises(convert.CheckpointMismatchError, match=r'img_size \(64, 128\)'):
    convert.load_model_weights(abstract_variables(model_config(img_size=transposed)), dst,
                               'invpt', 'vit_s16', CASE['tasks'], transposed)
  with pytest.raises(convert.CheckpointMismatchError, match='holds invpt/vit_s16 weights'):
    convert.load_model_weights(abstract_variables(model_config()), dst, 'invpt', 'vit_b16',
                               CASE['tasks'])


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
  """A legacy torch.save file whose object is os.system('touch ...') (GLOBAL, REDUCE)."""
  sentinel = tmp_path / 'ran'
  evil = tmp_path / 'evil.pth'
  head = b''.join(pickle.dumps(v, protocol=2) for v in (pickled.LEGACY_MAGIC, 1001, {}))
  payload = b'cos\nsystem\n(V' + f'touch {sentinel}'.encode() + b'\ntR.'
  evil.write_bytes(head + payload + pickle.dumps([], protocol=2))
  with pytest.raises(SystemExit) as error:
    convert_cli(tmp_path, src=evil)
  assert 'refused' in str(error.value) and 'os.system' in str(error.value)
  assert not sentinel.exists()


def _official_layout(case):
  tables = golden_lib.load(golden_lib.VITL_KEY_SHAPES_FILE)
  keys = tables[f'{case}.keys'].tolist()
  shapes = [tuple(s) for s in json.loads(str(tables[f'{case}.shapes']))]
  return dict(zip(keys, shapes)), dict(zip(keys, tables[f'{case}.parameters'].tolist()))


@pytest.mark.parametrize('config_name', ['nyud_invpt_vitl', 'pascal_invpt_vitl'])
def test_vitl_configs_match_the_released_models(config_name):
  """The configs build InvPT's released ViT-L models: every parameter of InvPT's layout
  (from the transcription, tests/golden/invpt_vitl_key_shapes.npz) converts onto the
  config's model, whose parameter count is InvPT's minus its unused modules and, on PASCAL,
  minus saliency's second class (folded). Shapes only (zero-stride arrays): no weights."""
  config = __import__(f'configs.{config_name}', fromlist=['get_config']).get_config()
  shapes, is_parameter = _official_layout(config.data.name)
  state = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
  size = lambda key: int(np.prod(shapes[key]))
  official = sum(size(k) for k in shapes if is_parameter[k])
  unused = sum(size(k) for k in convert.invpt_unused_keys(state) if is_parameter[k])
  folded = 0
  if 'sal' in config.tasks:  # one row of each head, one input column of mix_proj
    folded = sum(size(f'{head}.weight') // 2 + 1 for head in (
        'heads.sal.linear_pred', 'multi_task_decoder.intermediate_head.sal'))
    folded += shapes['multi_task_decoder.invpt.mix_proj.sal.0.weight'][0]
  variables, options = convert.convert_invpt_state_dict(state, 'vit_l16',
                                                        img_size=config.data.crop_size)
  assert tuple(t for t, _ in options['task_channels']) == tuple(config.tasks)
  spec = data_lib.get_dataset_spec(config.data.name)
  model = models.get_model(config.model, config.tasks, spec.num_classes)
  ours = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                        jax.ShapeDtypeStruct((1, *config.data.crop_size, 3), jnp.float32))
  assert jax.tree.map(np.shape, ours) == jax.tree.map(np.shape, variables)
  count = sum(np.size(leaf) for leaf in jax.tree.leaves(ours['params']))
  assert count == official - unused - folded
  print(f'{config_name}: {count:,} parameters = InvPT {official:,} - unused {unused:,} '
        f'- folded {folded:,}')


def test_eval_mode_evaluates_converted_weights_without_a_checkpoint(tmp_path, data_dir):
  """--mode=eval with config.model.weights and no checkpoint in the workdir: a model's
  variables, saved as a whole-model .npz, score exactly as those variables do."""
  config = tiny_config(data_dir)
  mesh = sharding.make_mesh(config.mesh)
  built = steps.setup(config, mesh)
  state = built.init(steps.init_key(7))  # not the seed the config initialises with
  with jax.set_mesh(mesh):
    want = train.run_evaluation(config, built.model, state, pipeline.open_eval_split(config),
                                mesh)
  num_classes = data_lib.get_dataset_spec(config.data.name).num_classes
  config.model.weights = convert.save_npz(
      str(tmp_path / 'exported'), jax.device_get({'params': state.params['model'],
                                                  'batch_stats': state.batch_stats}),
      convert.model_arch(config.model.framework, config.model.backbone),
      {'task_channels': [[t, tasks_lib.get_task(t).num_outputs(num_classes)]
                         for t in config.tasks]})
  evaluated = train.evaluate(config, str(tmp_path / 'published'))
  assert os.path.exists(tmp_path / 'published' / 'eval' / 'step_0.json')
  assert evaluated == want
  config.tasks = tuple(reversed(config.tasks))
  with pytest.raises(convert.CheckpointMismatchError, match='holds the tasks in the order'):
    train.evaluate(config, str(tmp_path / 'reordered'))


@pytest.mark.parametrize('name,dataset,size,edge_pos_weight', [
    ('nyud_invpt_vitl', 'nyud', (448, 576), 0.95),
    ('pascal_invpt_vitl', 'pascal_context', (512, 512), 0.95)])
def test_vitl_configs_have_invpts_recipe(name, dataset, size, edge_pos_weight):
  module = __import__(f'configs.{name}', fromlist=['get_config'])
  for command in (f'--config configs/{name}.py', '--framework invpt', '--mode=eval',
                  '--config.model.weights='):
    assert command in module.__doc__
  config, regularized = module.get_config(), module.get_config('contrastive')
  assert (config.data.name, config.model.backbone, config.model.framework) == (
      dataset, 'vit_l16', 'invpt')
  assert tuple(config.data.crop_size) == tuple(config.data.eval_crop_size) == size
  assert (config.num_steps, config.batch_size, config.eval_batch_size) == (40_000, 6, 6)
  assert (config.optim.name, config.optim.lr, config.optim.weight_decay, config.optim.schedule,
          config.optim.poly_power, config.optim.warmup_steps, config.optim.grad_clip) == (
              'adam', 2e-5, 1e-6, 'poly', 0.9, 0, 0.0)
  assert dict(config.model.backbone_kwargs) == {'img_size': size, 'drop_path_rate': 0.15}
  assert config.loss_options.edge.pos_weight == edge_pos_weight
  assert not config.contrastive.enable and regularized.contrastive.enable
  config_lib.validate(config, 6)


def test_check_invpt_command_agrees_with_the_transcription(capsys):
  """The command a user with torch runs (ViT-S widths, 4 blocks, NYUD's tasks)."""
  pytest.importorskip('torch', reason='check_invpt runs the PyTorch transcription: needs torch')
  from cmtdp_jax.tools import check_invpt  # pylint: disable=import-outside-toplevel
  assert check_invpt.main(['--depth', '4', '--image-size', '64', '128']) == 0
  assert 'ok: worst' in capsys.readouterr().out
