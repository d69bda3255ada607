"""Tests of the multi-task frameworks (cmtdp_jax/models/frameworks.py).

Every framework is built once on the tiny `compact` backbone; one jitted
training-mode gradient per framework feeds most checks. The checks are about
structure, so to stay fast on a shared 2-core machine, compiles use XLA's
lowest CPU optimisation level and variables are filled from `eval_shape` of
the init (He-normal kernels, identity BatchNorm) rather than by compiling it.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cmtdp_jax import contrastive, models, steps

TASKS = ('semseg', 'depth', 'normals')
NUM_CLASSES = {'semseg': 5}
OUT_CHANNELS = {'semseg': 5, 'depth': 1, 'normals': 3}
SHAPE = (2, 32, 48, 3)  # odd coarse sizes (1x2 at stride 32) exercise the resizes
FAST = {'xla_backend_optimization_level': 0}
CONCAT = sum(8 * 2 ** i for i in range(4))  # compact width 8: all four scales
# Task feature widths by default: the baseline's C/4, hrnet_head's and
# mtinet's full concatenation (HighResolutionHead), padnet's 256, segnet's the finest map's.
FEATURE_WIDTHS = {'baseline': CONCAT // 4, 'single_task': CONCAT // 4, 'hrnet_head': CONCAT,
                  'padnet': 256, 'mtinet': CONCAT, 'vit_mt': CONCAT // 4, 'segnet': 8}
AUX_NAMES = {'baseline': (), 'hrnet_head': (), 'single_task': (), 'padnet': ('initial',),
             'mtinet': ('scale0', 'scale1', 'scale2', 'scale3'), 'vit_mt': (), 'segnet': ()}


def model_config(framework, dtype='float32', head_channels=None):
  return ml_collections.ConfigDict(dict(
      framework=framework, backbone='compact', backbone_kwargs={'width': 8, 'blocks': 1},
      head_channels=head_channels, dtype=dtype))


def tasks_of(framework):
  return TASKS[:1] if framework == 'single_task' else TASKS


def build(framework, **kwargs):
  return models.get_model(model_config(framework, **kwargs), tasks_of(framework), NUM_CLASSES)


def images():
  return jax.random.normal(jax.random.key(1), SHAPE)


def fill_like(shapes):
  """Values for `init`'s shapes without compiling the init's RNG graph."""
  rs = np.random.RandomState(0)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      std = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
      return rs.normal(0.0, std, leaf.shape).astype(leaf.dtype)
    return (np.ones if name in ('scale', 'var') else np.zeros)(leaf.shape, leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def init_variables(model, x):
  return fill_like(jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x))


# Frameworks that cannot run on the compact backbone, with the file that tests them.
TESTED_ELSEWHERE = {'invpt': 'tests/test_invpt.py'}  # needs a ViT's four stride-16 taps


def test_every_framework_is_tested():
  assert set(AUX_NAMES) | set(TESTED_ELSEWHERE) == set(models.FRAMEWORKS)


@pytest.fixture(scope='module', params=sorted(AUX_NAMES))
def trained(request):
  """One training-mode forward + gradient of a loss over final and sown outputs."""
  framework = request.param
  model, x = build(framework), images()
  variables = init_variables(model, x)

  def loss_fn(params):
    (predictions, features), updates = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']}, x, train=True,
        mutable=['batch_stats', 'intermediates'])
    aux = steps.aux_predictions(updates.get('intermediates', {}))
    loss = sum(jnp.mean(p ** 2) for p in (*predictions.values(), *aux.values()))
    return loss, (predictions, features, aux, updates['batch_stats'])

  (loss, outputs), grads = jax.device_get(jax.jit(
      jax.value_and_grad(loss_fn, has_aux=True), compiler_options=FAST)(variables['params']))
  return framework, model, variables, loss, outputs, grads


def test_predictions_at_input_resolution_and_features_per_task(trained):
  framework, _, _, loss, (predictions, features, _, _), _ = trained
  assert np.isfinite(loss)
  assert set(predictions) == set(features) == set(tasks_of(framework))
  for task in tasks_of(framework):
    assert predictions[task].shape == SHAPE[:3] + (OUT_CHANNELS[task],)
    assert predictions[task].dtype == jnp.float32
    assert features[task].shape == (SHAPE[0], 8, 12, FEATURE_WIDTHS[framework])


def test_aux_predictions_sown_where_expected(trained):
  framework, _, _, _, (_, _, aux, _), _ = trained
  want = {f'{t}/{name}' for t in tasks_of(framework) for name in AUX_NAMES[framework]}
  assert set(aux) == want
  for key, raw in aux.items():
    assert raw.shape == SHAPE[:3] + (OUT_CHANNELS[key.split('/')[0]],)
    assert raw.dtype == jnp.float32


def test_train_mode_updates_batch_stats(trained):
  _, _, variables, _, (_, _, _, batch_stats), _ = trained
  old = jax.tree.leaves(variables['batch_stats'])
  new = jax.tree.leaves(batch_stats)
  assert len(old) == len(new)
  assert all(not np.allclose(n, o) for n, o in zip(new, old))


def test_gradient_reaches_backbone_and_every_head_parameter(trained):
  """Also catches layers only deep supervision trains. SE gates are exempt: at
  these widths they have one or two hidden ReLUs, which may start dead."""
  _, _, _, _, _, grads = trained
  assert any(np.any(g) for g in jax.tree.leaves(grads['backbone']))
  heads = {k: v for k, v in grads.items() if k != 'backbone'}
  dead = [jax.tree_util.keystr(path) for path, g in jax.tree_util.tree_leaves_with_path(heads)
          if not np.any(g) and 'squeeze' not in str(path) and 'excite' not in str(path)]
  assert not dead


def test_eval_mode_in_bfloat16(trained):
  """bf16 compute on float32 params; eval mode keeps batch_stats (the predict path)."""
  framework, _, variables, _, _, _ = trained
  model, x = build(framework, dtype='bfloat16'), images()
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  assert jax.tree.structure(shapes) == jax.tree.structure(variables)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
  apply = functools.partial(model.apply, train=False, mutable=['batch_stats'])
  (predictions, features), updates = jax.jit(apply, compiler_options=FAST)(variables, x)
  for new, old in zip(jax.tree.leaves(updates['batch_stats']),
                      jax.tree.leaves(variables['batch_stats'])):
    np.testing.assert_array_equal(new, old)
  for task in tasks_of(framework):
    assert predictions[task].dtype == jnp.float32
    assert features[task].dtype == jnp.bfloat16
    assert np.all(np.isfinite(predictions[task]))
    assert np.all(np.isfinite(np.asarray(features[task], np.float32)))


def random_labels(rs):
  batch, height, width = SHAPE[:3]
  normals = rs.randn(batch, height, width, 3).astype(np.float32)
  return {'semseg': rs.randint(0, NUM_CLASSES['semseg'], (batch, height, width)),
          'depth': rs.uniform(0.5, 5.0, (batch, height, width)).astype(np.float32),
          'normals': normals / np.linalg.norm(normals, axis=-1, keepdims=True)}


def test_contrastive_regularizer_plugs_in(trained):
  framework, _, _, _, (_, features, _, _), _ = trained
  if framework == 'single_task':
    pytest.skip('the regularizer needs a second task as source')
  config = contrastive.ContrastiveConfig(embed_dim=8, num_anchors=16, pool_size=32)
  regularizer = contrastive.CrossTaskContrastive(targets=TASKS, sources=TASKS, config=config)
  labels = random_labels(np.random.RandomState(0))
  rng = jax.random.key(2)
  params = fill_like(jax.eval_shape(regularizer.init, jax.random.key(3), features, labels, rng))
  loss, _ = jax.jit(regularizer.apply, compiler_options=FAST)(params, features, labels, rng)
  assert np.isfinite(loss)


def test_single_task_rejects_two_tasks():
  with pytest.raises(ValueError, match=r"single_task.*config\.tasks"):
    models.get_model(model_config('single_task'), ('semseg', 'depth'), NUM_CLASSES)


def test_single_task_matches_baseline_head():
  shapes = {}
  for framework in ('baseline', 'single_task'):
    model = models.get_model(model_config(framework), ('depth',), NUM_CLASSES)
    shapes[framework] = jax.eval_shape(functools.partial(model.init, train=False),
                                       jax.random.key(0), jax.ShapeDtypeStruct(SHAPE, jnp.float32))
  assert shapes['baseline'] == shapes['single_task']


def test_unknown_framework_lists_valid_ones():
  with pytest.raises(ValueError, match='valid: baseline, hrnet_head, padnet, mtinet, single_task, vit_mt'):
    models.get_model(model_config('cross_stitch'), TASKS, NUM_CLASSES)


def test_padnet_rejects_width_not_divisible_by_four():
  model = build('padnet', head_channels=18)
  with pytest.raises(ValueError, match='divisible by 4'):
    jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                   jax.ShapeDtypeStruct(SHAPE, jnp.float32))


def test_vit_mt_tasks_attend_to_each_other():
  """The cross-task stage is what links the heads: one task's token projection
  changes the other tasks' predictions (the baseline's heads are independent)."""
  model, x = build('vit_mt'), images()
  variables = init_variables(model, x)

  def depth_output(semseg_tokens):
    params = dict(variables['params'])
    params['cross_task'] = {**params['cross_task'], 'semseg_tokens': semseg_tokens}
    predictions, _ = model.apply({**variables, 'params': params}, x, train=False)
    return jnp.sum(predictions['depth'] ** 2)

  grads = jax.jit(jax.grad(depth_output), compiler_options=FAST)(
      variables['params']['cross_task']['semseg_tokens'])
  assert all(np.any(g) for g in jax.tree.leaves(grads))
