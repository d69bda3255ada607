"""InvPT's decoder (framework 'invpt'), its weight import, and the ViT's raw taps.

Parity against PyTorch runs without torch through tests/golden/invpt.npz
(regenerate it with tests/golden/make_invpt_golden.py, which runs the
transcription tests/golden/torch_invpt.py); the test that runs the PyTorch
reference itself skips when torch is missing. The framework is not in
test_frameworks.py's compact-backbone fixture (it needs a ViT's four
stride-16 taps): its training-mode checks are here.
"""

import functools
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cmtdp_jax import models, steps
from cmtdp_jax.models import convert
from cmtdp_jax.models.backbones import vit
from cmtdp_jax.models.invpt import InvPT

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), 'golden')
sys.path.insert(0, GOLDEN_DIR)
import make_invpt_golden as golden_lib  # noqa: E402  pylint: disable=wrong-import-position

TASK_CHANNELS = tuple(zip(golden_lib.TASKS, golden_lib.OUTPUTS))
NUM_CLASSES = {'semseg': golden_lib.OUTPUTS[0]}
# Max relative error (max |ours - reference| / max |reference|) allowed against the golden
# outputs (torch's float64 values rounded to float32). Measured float32 noise floor on this
# case: torch's own float32 forward is off by 2.4e-6 at worst (a feature; 1.6e-6 for the
# predictions), ours (XLA CPU) by 8.7e-7. 2e-5 is about 8x above both, and far below the
# error of a structural mistake, measured: shrinking the last tap to stride 32 with
# antialiasing (jax.image.resize's default) gives 9e-2 to 6e-1; dropping the attention
# message passing (stages 2-3 without the previous logits) 3e-2 to 8e-2 on the final
# predictions and features.
TOLERANCE = 2e-5
FAST = {'xla_backend_optimization_level': 0}
TINY_VIT = {'dim': 128, 'depth': 4, 'num_heads': 2}  # decoder widths 72 / 36 / 18


class GoldenTaps(nn.Module):
  """Stands in for the ViT: returns the golden case's four stride-16 taps."""
  taps: np.ndarray

  @nn.compact
  def __call__(self, images, train=False):
    del images, train
    return [jnp.asarray(t) for t in self.taps]


@pytest.fixture(scope='module')
def golden():
  return golden_lib.load()


@pytest.fixture(scope='module')
def golden_state(golden):
  return golden_lib.invpt_state_dict(golden_lib.stored_key_shapes(golden),
                                     int(golden['weight_seed']))


def run_port(state, taps):
  """Our framework on `taps` with the converted `state`: {name: NHWC} as the golden names."""
  variables = convert.convert_invpt_decoder_state_dict(state, TASK_CHANNELS, golden_lib.DIM)
  model = InvPT(GoldenTaps(taps), TASK_CHANNELS)
  images = jnp.zeros((golden_lib.BATCH, *golden_lib.IMAGE_SIZE, 3))
  apply = functools.partial(model.apply, train=False, mutable=['intermediates'])
  (predictions, features), updates = jax.jit(apply, compiler_options=FAST)(variables, images)
  out = dict(predictions)
  out.update(steps.aux_predictions(updates['intermediates']))
  out.update({f'{t}/feature': f for t, f in features.items()})
  return {k: np.asarray(v) for k, v in out.items()}


def relative_error(got, want):
  return float(np.abs(got - want).max() / np.abs(want).max())


def test_matches_pytorch_golden(golden, golden_state):
  """Every task's prediction, intermediate prediction and feature."""
  ours = run_port(golden_state, golden_lib.random_taps(int(golden['input_seed'])))
  names = [f'{t}{suffix}' for t in golden_lib.TASKS for suffix in ('', '/intermediate', '/feature')]
  assert set(ours) == set(names)
  errors = {n: relative_error(golden_lib.stored(n, ours[n]), golden[n]) for n in names}
  assert max(errors.values()) < TOLERANCE, errors


def test_golden_outputs_are_not_degenerate(golden):
  for task in golden_lib.TASKS:
    for name in (task, f'{task}/intermediate', f'{task}/feature'):
      assert np.std(golden[name]) > 0.05 * np.abs(golden[name]).max(), name


def test_converter_skips_exactly_invpts_unused_modules(golden):
  keys = golden_lib.stored_key_shapes(golden)
  for prefix in convert.INVPT_UNUSED_PREFIXES:
    assert any(k.startswith(prefix) for k in keys), prefix


def test_converter_names_bad_keys_on_one_line(golden_state):
  state = dict(golden_state)
  del state['multi_task_decoder.invpt.mix_proj.depth.0.bias']
  state['multi_task_decoder.extra.weight'] = np.zeros(3, np.float32)
  state['heads.semseg.linear_pred.weight'] = np.zeros((5, 216, 3, 3), np.float32)
  with pytest.raises(convert.CheckpointMismatchError) as error:
    convert.convert_invpt_decoder_state_dict(state, TASK_CHANNELS, golden_lib.DIM)
  message = str(error.value)
  assert '\n' not in message
  assert "missing ['multi_task_decoder.invpt.mix_proj.depth.0.bias']" in message
  assert "unexpected ['multi_task_decoder.extra.weight']" in message
  assert 'heads.semseg.linear_pred.weight (5, 216, 3, 3)' in message


def test_converter_rejects_another_task_list(golden_state):
  with pytest.raises(convert.CheckpointMismatchError, match='unexpected'):
    convert.convert_invpt_decoder_state_dict(golden_state, TASK_CHANNELS[:2], golden_lib.DIM)


def model_config(backbone, backbone_kwargs=None, head_channels=None, dtype='float32'):
  return ml_collections.ConfigDict(dict(
      framework='invpt', backbone=backbone, dtype=dtype, head_channels=head_channels,
      backbone_kwargs=backbone_kwargs or {}))


def build(backbone, **kwargs):
  return models.get_model(model_config(backbone, **kwargs), golden_lib.TASKS, NUM_CLASSES)


@pytest.mark.parametrize('backbone,width,dtype', [('vit_s16', 216, 'float32'),
                                                  ('vit_b16', 432, 'float32'),
                                                  ('vit_s16', 216, 'bfloat16')])
def test_shapes_and_widths(backbone, width, dtype):
  """Widths D + P = dim / 2 + dim / 16; float32 outputs and parameters in bf16 compute too;
  abstract evaluation only."""
  model = build(backbone, dtype=dtype)
  shape = (2, 128, 192, 3)
  ((predictions, features), variables) = jax.eval_shape(
      functools.partial(model.init_with_output, train=False,
                        mutable=['params', 'batch_stats', 'intermediates']),
      jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))
  aux = steps.aux_predictions(variables['intermediates'])
  assert set(aux) == {f'{t}/intermediate' for t in golden_lib.TASKS}
  for task, channels in TASK_CHANNELS:
    assert predictions[task].shape == aux[f'{task}/intermediate'].shape == shape[:3] + (channels,)
    assert predictions[task].dtype == aux[f'{task}/intermediate'].dtype == jnp.float32
    assert features[task].shape == (2, 32, 48, width)
  assert 'pyramid' not in variables['params']['backbone']
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables['params']))
  assert variables['params']['stage0_block']['attn']['proj_q']['kernel'].shape == (width, width)
  assert 'fuse_attn' not in variables['params']['stage0_block']['attn']


def test_rejects_input_not_multiple_of_64():
  model = build('vit_s16', backbone_kwargs=TINY_VIT)
  with pytest.raises(ValueError, match='multiple of 64'):
    jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                   jax.ShapeDtypeStruct((1, 96, 128, 3), jnp.float32))


def test_rejects_widths_the_heads_do_not_divide():
  model = build('vit_s16', backbone_kwargs={**TINY_VIT, 'dim': 32})
  with pytest.raises(ValueError, match='multiple of 8'):
    jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                   jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))


def test_vit_raw_taps():
  """pyramid='none': the tapped tokens at stride 16, the last one normed, no new layers."""
  backbone = vit.vit_s16(pyramid='none', **TINY_VIT)
  assert backbone.feature_strides == (16,) * 4 and backbone.feature_channels == (128,) * 4
  images = jax.random.normal(jax.random.key(0), (1, 64, 80, 3))
  variables = backbone.init(jax.random.key(1), images)
  maps = backbone.apply(variables, images)
  tokens, _ = backbone.apply(variables, images, method=vit.VisionTransformer.tokens)
  for tap, token in zip(maps, tokens):
    np.testing.assert_array_equal(tap, np.asarray(token[:, 1:]).reshape(1, 4, 5, 128))
  assert set(variables['params']) == {'blocks_0', 'blocks_1', 'blocks_2', 'blocks_3',
                                      'cls_token', 'norm', 'patch_embed', 'pos_embed'}
  with pytest.raises(ValueError, match="pyramid='fpn'"):
    vit.vit_s16(pyramid='fpn', **TINY_VIT).init(jax.random.key(1), images)


def test_training_step_reaches_every_parameter():
  """Train mode on a tiny ViT: finite loss over final and intermediate predictions, a
  gradient for every parameter, every BatchNorm's statistics updated. Decoder widths
  32 / 16 / 8 (D = 28 and P = 64 / 16)."""
  model = build('vit_s16', backbone_kwargs={**TINY_VIT, 'dim': 64}, head_channels=28)
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  rs = np.random.RandomState(0)  # filled without compiling the init's RNG graph
  variables = jax.tree.map(lambda leaf: np.abs(rs.normal(1.0, 0.2, leaf.shape)).astype(np.float32)
                           if leaf.ndim == 1 else rs.normal(0.0, 0.2, leaf.shape).astype(np.float32),
                           shapes)

  def loss_fn(params):
    (predictions, _), updates = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']}, x, train=True,
        mutable=['batch_stats', 'intermediates'])
    aux = steps.aux_predictions(updates['intermediates'])
    assert set(aux) == {f'{t}/intermediate' for t in golden_lib.TASKS}
    loss = sum(jnp.mean(p ** 2) for p in (*predictions.values(), *aux.values()))
    return loss, updates['batch_stats']

  (loss, stats), grads = jax.device_get(jax.jit(
      jax.value_and_grad(loss_fn, has_aux=True), compiler_options=FAST)(variables['params']))
  assert np.isfinite(loss)
  dead = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_leaves_with_path(grads)
          if not np.any(g)]
  assert not dead
  assert all(not np.allclose(n, o) for n, o in zip(jax.tree.leaves(stats),
                                                   jax.tree.leaves(variables['batch_stats'])))


def test_pytorch_reference_reproduces_golden(golden, golden_state):
  """The transcription, run live in float32, gives the stored outputs (needs torch)."""
  torch = pytest.importorskip('torch', reason='running the PyTorch reference needs torch')
  model = golden_lib.build_reference()
  assert golden_lib.stored_key_shapes(golden) == {k: tuple(v.shape)
                                                  for k, v in model.state_dict().items()}
  out = golden_lib.run_reference(model, golden_state,
                                 golden_lib.random_taps(int(golden['input_seed'])), torch.float32)
  for name, value in out.items():
    assert relative_error(golden_lib.stored(name, value), golden[name]) < TOLERANCE, name
