"""Partially annotated training (issue 21): label mappings, masked task losses, the
regularizer's per-image sources, the pipeline's 'labelled' masks and a run end to end."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmtdp_jax import config_lib, contrastive, sharding, steps, tasks, train
from cmtdp_jax import data as data_lib
from cmtdp_jax import label_mapping
from cmtdp_jax import workdir as workdir_lib
from tests import same_training
from tests.conftest import tiny_config
from tests.test_cli import run_main
from tests.test_contrastive import module_inputs, relation, small_config
from tests.test_train_step import build, make_batch, trained_run

IDS = [f'img{i:03d}' for i in range(103)]
SIX = tasks.ALL


# ------------------------------------------------------------------ drawing


def test_one_label_keeps_one_task_per_image_balanced_and_seeded():
  mapping = label_mapping.draw(IDS, SIX, 'one_label', seed=3)
  assert sorted(mapping) == IDS and all(len(t) == 1 for t in mapping.values())
  counts = np.bincount([SIX.index(t[0]) for t in mapping.values()], minlength=len(SIX))
  assert counts.max() - counts.min() <= 1 and counts.sum() == len(IDS)
  assert label_mapping.draw(IDS[::-1], SIX[::-1], 'one_label', seed=3) == mapping
  assert label_mapping.draw(IDS, SIX, 'one_label', seed=4) != mapping


def test_random_keeps_each_task_at_the_fraction_and_at_least_one():
  ids = [str(i) for i in range(3000)]
  mapping = label_mapping.draw(ids, ('depth', 'semseg', 'sal'), 'random', 0.3, seed=0)
  assert all(1 <= len(t) <= 3 and list(t) == sorted(t) for t in mapping.values())
  kept = {t: np.mean([t in image for image in mapping.values()]) for t in ('depth', 'semseg')}
  expected = 0.3 + 0.7 ** 3 / 3  # independent draws, plus one task for the empty images
  for fraction in kept.values():
    assert abs(fraction - expected) < 0.03
  assert label_mapping.draw(ids, ('depth', 'semseg', 'sal'), 'random', 0.3, seed=0) == mapping
  assert label_mapping.draw(ids, ('depth', 'semseg', 'sal'), 'random', 0.3, seed=1) != mapping
  full = label_mapping.draw(ids, SIX, 'random', 1.0, seed=0)
  assert set(full.values()) == {tuple(sorted(SIX))}


@pytest.mark.parametrize('content, message', [
    ('{"a": ["depth"],', 'not valid JSON'),
    ('["a"]', 'JSON object'),
    ('{"a": ["depth"], "b": ["depth"], "zz": ["depth"]}',
     "image id 'zz' is not in the train split \\(2 images, ids like 'a'\\)"),
    ('{"a": ["depth"], "b": ["depth"], "a": ["semseg"]}', "image id 'a' is given twice"),
    ('{"a": ["depth"], "b": ["flow"]}', "image 'b' names task 'flow'"),
    ('{"a": ["depth"], "b": ["sal"]}', "task 'sal', which is not in config.tasks"),
    ('{"a": ["depth"], "b": []}', "image 'b' has no task"),
    ('{"a": "depth", "b": ["depth"]}', "image 'a' maps to 'depth'"),
    ('{"b": ["depth"]}', "1 of the 2 training images are missing \\(the first: 'a'\\)"),
])
def test_user_mapping_errors_are_one_line_naming_the_file(tmp_path, content, message):
  path = tmp_path / 'mine.json'
  path.write_text(content)
  with pytest.raises(ValueError, match=message) as error:
    label_mapping.read(str(path), ['a', 'b'], ('semseg', 'depth'))
  assert str(error.value).startswith(f'{path}: ') and '\n' not in str(error.value)


def test_a_split_with_a_repeated_id_gets_no_mapping(tmp_path):
  config = tiny_config(**{'data.partial_labels': 'one_label'})
  with pytest.raises(ValueError, match="image id 'b' more than once"):
    label_mapping.for_run(config.data, config.tasks, ['a', 'b', 'c', 'b'], str(tmp_path),
                          resuming=False)


def test_log_line_counts_every_task_including_unlabelled_ones():
  mapping = label_mapping.draw(['a', 'b'], ('semseg', 'depth', 'sal'), 'one_label', seed=0)
  assert label_mapping.describe(mapping, ('semseg', 'depth', 'sal')) == (
      '2 images; labelled per task: depth 1, sal 1, semseg 0')


def test_user_mapping_is_read_sorted(tmp_path):
  path = tmp_path / 'mine.json'
  path.write_text('{"b": ["semseg", "depth"], "a": ["depth", "depth"]}')
  assert label_mapping.read(str(path), ['a', 'b'], ('semseg', 'depth')) == {
      'a': ('depth',), 'b': ('depth', 'semseg')}


@pytest.mark.parametrize('overrides, message', [
    ({'data.partial_labels': 'half'}, "config.data.partial_labels: unknown mode 'half'"),
    ({'data.partial_labels': 'random', 'data.label_fraction': 0.0},
     'config.data.label_fraction=0.0'),
    ({'data.partial_labels': 'random', 'data.label_mapping': __file__}, 'set only one'),
    ({'data.label_mapping': '/nonexistent.json'}, 'config.data.label_mapping: no such file'),
    ({'data.partial_labels': 'one_label', 'data.partial_labels_seed': -1},
     'config.data.partial_labels_seed=-1 must be an integer >= 0'),
])
def test_config_errors_name_the_field(overrides, message):
  with pytest.raises(ValueError, match=message) as error:
    config_lib.validate(tiny_config(**overrides), 8)
  assert '\n' not in str(error.value)


def test_partial_label_fields_are_fixed_on_resume():
  for field in ('partial_labels', 'label_fraction', 'partial_labels_seed', 'label_mapping'):
    assert field in config_lib.base_config().data
    assert config_lib.fixed_on_resume(f'data.{field}')


def test_resuming_a_run_older_than_the_fields_compares_with_their_defaults(tmp_path):
  """A checkpoint written before partial labels existed trained on all labels: resuming it
  with them on would change the experiment (refused); with the default it is no change."""
  config = tiny_config()
  older = json.loads(config.to_json_best_effort())
  for field in ('partial_labels', 'label_fraction', 'partial_labels_seed', 'label_mapping'):
    del older['data'][field]
  (tmp_path / 'config.json').write_text(json.dumps(older))
  workdir_lib.check_config_change(config, str(tmp_path), 10)
  config.data.partial_labels = 'one_label'
  with pytest.raises(ValueError, match=r'^config.data.partial_labels changed since'):
    workdir_lib.check_config_change(config, str(tmp_path), 10)


def _resume_check(tmp_path, before: dict, after: dict):
  """Runs the resume check of a run configured with `before` resumed with `after`."""
  (tmp_path / 'config.json').write_text(tiny_config(**before).to_json_best_effort())
  workdir_lib.check_config_change(tiny_config(**after), str(tmp_path), 10)


def test_resume_lets_fields_change_that_leave_the_saved_mapping(tmp_path):
  """A resume trains on its saved mapping: a field neither config reads, or a user's file
  moved with the same mapping, changes nothing (before: refused); anything else is refused."""
  one_label = {'data.partial_labels': 'one_label'}
  _resume_check(tmp_path, dict(one_label, **{'data.label_fraction': 0.5}),
                dict(one_label, **{'data.label_fraction': 0.3}))
  _resume_check(tmp_path, {'data.partial_labels_seed': 0}, {'data.partial_labels_seed': 4})
  random = {'data.partial_labels': 'random'}
  with pytest.raises(ValueError, match=r'^config.data.label_fraction changed since'):
    _resume_check(tmp_path, dict(random, **{'data.label_fraction': 0.5}),
                  dict(random, **{'data.label_fraction': 0.3}))
  with pytest.raises(ValueError, match=r'^config.data.label_fraction, config.data.partial_l'):
    _resume_check(tmp_path, dict(one_label, **{'data.label_fraction': 0.5}),
                  dict(random, **{'data.label_fraction': 0.3}))
  saved = {'a': ('depth', 'semseg'), 'b': ('sal',)}
  label_mapping.save(str(tmp_path), saved)
  old, moved, other = (tmp_path / name for name in ('old.json', 'moved.json', 'other.json'))
  old.write_text(json.dumps({'a': ['depth', 'semseg'], 'b': ['sal']}))
  moved.write_text(json.dumps({'b': ['sal', 'sal'], 'a': ['semseg', 'depth']}))
  other.write_text(json.dumps({'a': ['depth'], 'b': ['sal']}))
  _resume_check(tmp_path, {'data.label_mapping': str(old)}, {'data.label_mapping': str(moved)})
  for changed in (other, tmp_path / 'missing.json'):
    with pytest.raises(ValueError, match=r'^config.data.label_mapping changed since'):
      _resume_check(tmp_path, {'data.label_mapping': str(old)},
                    {'data.label_mapping': str(changed)})


# ------------------------------------------------------------------- losses


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def reference_loss(task, raw, labels, labelled, options):
  """NumPy: the loss over the valid pixels of the labelled images only."""
  raw, labels = np.asarray(raw, np.float64)[labelled], np.asarray(labels)[labelled]
  if task in ('semseg', 'human_parts'):
    valid = labels != 255
    logp = raw - np.log(np.sum(np.exp(raw), -1, keepdims=True))
    per_pixel = -np.take_along_axis(logp, np.where(valid, labels, 0)[..., None], -1)[..., 0]
  elif task in ('sal', 'edge'):
    valid = labels != 255
    positive = (labels == 1) & valid
    weight = options.get('pos_weight', 1.0 - positive.sum() / max(valid.sum(), 1))
    x = raw[..., 0]
    per_pixel = -(weight * positive * _log_sigmoid(x) + (1 - weight) * (labels == 0) *
                  _log_sigmoid(-x))
  elif task == 'depth':
    valid = labels > 0
    per_pixel = np.abs(raw[..., 0] - labels)
  else:
    valid = np.sum(labels * labels, -1) > 1e-6
    unit = raw / np.linalg.norm(raw, axis=-1, keepdims=True)
    per_pixel = np.sum(np.abs(unit - labels), -1)
  return np.sum(per_pixel * valid) / max(valid.sum(), 1)


def random_task_batch(task, rs, batch=4, size=6):
  if task in ('semseg', 'human_parts'):
    labels = np.where(rs.rand(batch, size, size) < 0.2, 255, rs.randint(0, 5, (batch, size, size)))
    raw = rs.randn(batch, size, size, 5)
  elif task in ('sal', 'edge'):
    labels = np.where(rs.rand(batch, size, size) < 0.2, 255, rs.rand(batch, size, size) < 0.3)
    labels[0] = 1  # images with different class balances: the batch weight depends on which
    raw = rs.randn(batch, size, size, 1)
  elif task == 'depth':
    labels = np.where(rs.rand(batch, size, size) < 0.2, 0.0, rs.uniform(1, 5, (batch, size, size)))
    raw = rs.uniform(0, 5, (batch, size, size, 1))
  else:
    labels = rs.randn(batch, size, size, 3)
    labels /= np.linalg.norm(labels, axis=-1, keepdims=True)
    labels[rs.rand(batch, size, size) < 0.2] = 0.0
    raw = rs.randn(batch, size, size, 3)
  dtype = np.float32 if task in ('depth', 'normals') else np.int32
  return jnp.asarray(raw, jnp.float32), jnp.asarray(labels.astype(dtype))


@pytest.mark.parametrize('task', SIX)
def test_task_losses_pool_only_labelled_images(task):
  rs = np.random.RandomState(SIX.index(task))
  raw, labels = random_task_batch(task, rs)
  spec = tasks.get_task(task)
  for options in ({}, {'pos_weight': 0.8}) if task in ('sal', 'edge') else ({},):
    loss = jax.jit(lambda r, l, m, o=options: spec.compute_loss(r, labels, o, m))
    for labelled in ([True, False, True, False], [False, True, True, True]):
      labelled = np.array(labelled)
      np.testing.assert_allclose(loss(raw, labels, labelled),
                                 reference_loss(task, raw, labels, labelled, options),
                                 rtol=2e-5)
    # A batch without any labelled image: exactly 0, and no gradient.
    none = np.zeros(4, bool)
    value, grad = jax.value_and_grad(loss)(raw, labels, none)
    assert value == 0.0 and np.all(np.asarray(grad) == 0.0)
    assert float(loss(raw, labels, none)) != float(spec.compute_loss(raw, labels, options))


# -------------------------------------------------------------- regularizer


def test_source_draws_are_per_image_among_labelled_tasks():
  allowed = ('depth', 'normals', 'sal')
  labelled = {'depth': np.array([1, 1, 0, 0, 1, 0, 1], bool),
              'normals': np.array([1, 0, 1, 0, 1, 0, 1], bool),
              'sal': np.array([0, 0, 0, 0, 1, 0, 0], bool)}
  available = np.stack([labelled[s] for s in allowed], -1)
  draw = jax.jit(lambda key: contrastive._draw_sources(key, allowed, labelled))
  draws = np.stack([draw(jax.random.key(seed))[0] for seed in range(600)])
  np.testing.assert_array_equal(draw(jax.random.key(0))[1], available.any(-1))
  for image in np.flatnonzero(available.any(-1)):
    counts = np.bincount(draws[:, image], minlength=3)
    assert np.all(counts[~available[image]] == 0)  # only labelled sources
    expected = 600 / available[image].sum()
    assert np.all(np.abs(counts[available[image]] - expected) < 5 * np.sqrt(expected))
  assert 200 < np.sum(draws[:, 0] != draws[:, 6]) < 400  # images 0 and 6 draw independently


@pytest.fixture(scope='module')
def three_task_module():
  module = contrastive.CrossTaskContrastive(('semseg', 'depth', 'normals'),
                                            ('semseg', 'depth', 'normals'), small_config())
  features, labels = module_inputs(batch=4)
  params = jax.jit(module.init)(jax.random.key(0), features, labels, jax.random.key(1))
  step = jax.jit(lambda features, labelled, rng: jax.value_and_grad(
      lambda p, f: module.apply(p, f, labels, rng, labelled), argnums=(0, 1), has_aux=True)(
          params, features))
  return module, features, labels, params, step


def test_image_without_another_labelled_task_contributes_nothing(three_task_module):
  _, features, _, _, step = three_task_module
  # Image 0 keeps only semseg, image 1 nothing; 2 and 3 keep depth and normals.
  labelled = {'semseg': np.array([1, 0, 0, 0], bool), 'depth': np.array([0, 0, 1, 1], bool),
              'normals': np.array([0, 0, 1, 1], bool)}
  for seed in range(3):
    (loss, diagnostics), (param_grads, feature_grads) = step(features, labelled,
                                                             jax.random.key(seed))
    assert np.isfinite(loss) and loss > 0
    # semseg's features: only images 2 and 3 have a labelled source for it.
    semseg_grad = np.asarray(feature_grads['semseg'], np.float32)
    assert np.all(semseg_grad[:2] == 0) and np.any(semseg_grad[2:] != 0)
    # depth's: images 2, 3 draw normals (their only other task), image 0 semseg, 1 nothing.
    assert np.all(np.asarray(feature_grads['depth'])[1] == 0)
    np.testing.assert_allclose(diagnostics['depth<-normals/drawn'], 0.5)
    np.testing.assert_allclose(diagnostics['depth<-semseg/drawn'], 0.25)
    semseg_drawn = diagnostics['semseg<-depth/drawn'] + diagnostics['semseg<-normals/drawn']
    np.testing.assert_allclose(semseg_drawn, 0.5)


def test_no_labelled_source_anywhere_gives_zero_without_nan(three_task_module):
  _, features, _, _, step = three_task_module
  one_task = {'semseg': np.ones(4, bool), 'depth': np.zeros(4, bool),
              'normals': np.zeros(4, bool)}
  (loss, diagnostics), (param_grads, feature_grads) = step(features, one_task,
                                                           jax.random.key(0))
  # Only depth and normals (targets) have a source, semseg; semseg itself has none.
  assert np.all(np.asarray(feature_grads['semseg'], np.float32) == 0)
  assert all(np.all(np.isfinite(np.asarray(g, np.float32)))
             for g in jax.tree.leaves((param_grads, feature_grads)))
  assert diagnostics['semseg<-depth/drawn'] == 0 and diagnostics['semseg<-depth/loss'] == 0
  nothing = {t: np.zeros(4, bool) for t in one_task}
  (loss, _), (param_grads, _) = step(features, nothing, jax.random.key(0))
  assert loss == 0.0
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(param_grads))


def test_per_image_sources_equal_the_batch_draw_when_every_image_has_the_same_one(
    three_task_module):
  """Every image keeping exactly one other source: the per-image path computes the loss
  of the batch-wide path restricted to that source (same sampling and matching keys)."""
  _, features, labels, params, _ = three_task_module
  only = contrastive.CrossTaskContrastive(('semseg',), ('semseg', 'depth', 'normals'),
                                          small_config(source_choice='pairs',
                                                       pairs=(('semseg', 'depth'),)))
  only_params = {'params': {'semseg<-depth': params['params']['semseg<-depth']}}
  labelled = {'semseg': np.ones(4, bool), 'depth': np.ones(4, bool),
              'normals': np.zeros(4, bool)}
  single = contrastive.CrossTaskContrastive(('semseg',), ('semseg', 'depth', 'normals'),
                                            small_config())
  single_params = {'params': {k: v for k, v in params['params'].items()
                              if k.startswith('semseg<-')}}
  batch_wide = jax.jit(lambda r: only.apply(only_params, features, labels, r)[0])
  per_image = jax.jit(lambda r: single.apply(single_params, features, labels, r, labelled))
  for seed in range(3):
    rng = jax.random.key(seed)
    expected = batch_wide(rng)
    got, diagnostics = per_image(rng)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert diagnostics['semseg<-depth/drawn'] == 1.0
    np.testing.assert_allclose(diagnostics['semseg<-depth/loss'], got, rtol=1e-6)


def _reference_regularizer(module, params, features, labels, labelled, rng):
  """NumPy: the regularizer's loss and each pair's loss from the module's own random numbers.

  The keys are split as the module does (per target `fold_in(rng, index)`, then draw /
  sample / match) and the draws come from the same calls (`_draw_sources`, `sample_pixels`,
  the ranks of `random_allowed_slot`); the rest is recomputed here: the pair rule, the
  projection, the matching, the hinge, and the means over the valid triplets of the images
  with a labelled source (not over every anchor), then over the targets. Also returns, per
  target, the number of valid triplets and of anchors in the images with a source.
  """
  cfg = module.config
  target_losses, pair_losses, counts = [], {}, []
  for target, allowed in module.source_options().items():
    draw_key, sample_key, match_key = jax.random.split(
        jax.random.fold_in(rng, list(module.targets).index(target)), 3)
    drawn, has_source = map(np.asarray, contrastive._draw_sources(draw_key, allowed, labelled))
    feats = np.asarray(features[target], np.float64)
    batch, height, width, channels = feats.shape
    # Nearest resize with half-pixel centres: 32 -> 8 keeps rows 2, 6, ...; 32 -> 4 rows 4, 12, ...
    step = labels[allowed[0]].shape[1] // height
    resized = {s: np.asarray(labels[s])[:, step // 2::step, step // 2::step] for s in allowed}
    flat = {s: r.reshape(batch, height * width, *r.shape[3:]) for s, r in resized.items()}
    pos = np.zeros((batch, cfg.num_anchors, cfg.pool_size), bool)
    neg = np.zeros_like(pos)
    sampled = []
    for image, key in enumerate(jax.random.split(sample_key, batch)):
      source = allowed[drawn[image]]
      valid = np.array([relation(source, x, x) is not None for x in flat[source][image]])
      anchors, pool = map(np.asarray, contrastive.sample_pixels(
          key, jnp.asarray(valid), num_anchors=cfg.num_anchors, pool_size=cfg.pool_size))
      sampled.append((anchors, pool))
      for k, a in enumerate(anchors):
        for m, c in enumerate(pool):
          rule = relation(source, flat[source][image][a], flat[source][image][c])
          pos[image, k, m] = rule == 'pos' and a != c
          neg[image, k, m] = rule == 'neg'
    pos_key, neg_key = jax.random.split(match_key)
    ranks = [np.asarray(jax.random.randint(key, pos.shape[:2], 0,
                                           np.maximum(mask.sum(-1), 1)))
             for key, mask in ((pos_key, pos), (neg_key, neg))]
    hinges = {s: [] for s in allowed}
    for image, (anchors, pool) in enumerate(sampled):
      if not has_source[image]:
        continue  # an image without another labelled task: no triplet
      source = allowed[drawn[image]]
      projector = jax.tree.map(lambda p: np.asarray(p, np.float64),
                               params['params'][contrastive.pair_name(target, source)])
      x = feats[image].reshape(height * width, channels)
      hidden = np.maximum(x @ projector['hidden']['kernel'] + projector['hidden']['bias'], 0)
      embedded = hidden @ projector['output']['kernel'] + projector['output']['bias']
      # Unit length; a pixel whose hidden layer is all zero stays a zero vector.
      embedded /= np.sqrt(np.maximum(np.sum(embedded**2, -1, keepdims=True), 1e-12))
      distance = lambda a, b: np.sqrt(max(np.sum((a - b)**2), 1e-12))  # clamped as the module
      for k, a in enumerate(anchors):
        if not (pos[image, k].any() and neg[image, k].any()):
          continue
        positive = pool[np.flatnonzero(pos[image, k])[ranks[0][image, k]]]
        negative = pool[np.flatnonzero(neg[image, k])[ranks[1][image, k]]]
        hinges[source].append(max(distance(embedded[a], embedded[positive]) -
                                  distance(embedded[a], embedded[negative]) + cfg.margin, 0.0))
    every = sum(hinges.values(), [])
    counts.append((len(every), np.sum(has_source) * cfg.num_anchors))
    target_losses.append(np.mean(every) if every else 0.0)
    for source, values in hinges.items():
      pair_losses[contrastive.pair_name(target, source)] = np.mean(values) if values else 0.0
  return np.mean(target_losses), pair_losses, counts


def test_regularizer_matches_a_numpy_reference_with_images_without_a_source(
    three_task_module):
  module, features, labels, params, _ = three_task_module
  apply = jax.jit(lambda labelled, rng: module.apply(params, features, labels, rng, labelled))
  batches = [
      # semseg: image 1 has no source; depth: images 1 and 3; normals: image 1.
      {'semseg': [1, 0, 0, 0], 'depth': [0, 0, 1, 1], 'normals': [1, 0, 1, 0]},
      # normals has no label in the batch; image 1 none at all.
      {'semseg': [1, 0, 1, 0], 'depth': [0, 0, 1, 1], 'normals': [0, 0, 0, 0]}]
  for labelled in batches:
    labelled = {t: np.array(v, bool) for t, v in labelled.items()}
    for seed in range(2):
      rng = jax.random.key(seed)
      loss, diagnostics = apply(labelled, rng)
      expected, pair_losses, counts = _reference_regularizer(module, params, features, labels,
                                                             labelled, rng)
      # Every target has triplets, but fewer than the anchors of its images with a source
      # (some anchors lack a positive or a negative): a mean over anchors would differ.
      assert all(0 < triplets for triplets, _ in counts)
      assert any(triplets < anchors for triplets, anchors in counts)
      np.testing.assert_allclose(loss, expected, rtol=1e-5)
      for pair, value in pair_losses.items():
        np.testing.assert_allclose(diagnostics[f'{pair}/loss'], value, rtol=1e-5, atol=1e-7,
                                   err_msg=pair)


# ------------------------------------------------------------- train step


LABELLED = {'semseg': np.array([1, 0, 1, 0, 0, 1, 0, 0], bool),
            'depth': np.array([0, 1, 1, 0, 1, 0, 0, 1], bool),
            'normals': np.zeros(8, bool)}


def test_eight_devices_match_one_device_with_partial_labels():
  config = tiny_config(**{'contrastive.enable': True, 'optim.name': 'sgd',
                          'tasks': ('semseg', 'depth', 'normals')})
  mesh8 = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  mesh1 = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  with_labels = lambda batch: dict(batch, labelled=LABELLED)  # noqa: E731
  run8, _, history8 = trained_run(config, mesh8, 3, with_labels)
  run1, _, history1 = trained_run(config, mesh1, 3, with_labels)
  same_training.assert_same_training(run8, run1)  # tolerances derived there
  for key in ('loss/semseg', 'loss/depth', 'loss/contrastive'):
    np.testing.assert_allclose(history8[0][key], history1[0][key],
                               rtol=same_training.EARLY_LOSS_RTOL)
  assert history8[0]['loss/normals'] == 0.0 and history8[0]['loss/contrastive'] > 0


def _changed(before, after) -> set[str]:
  """The top-level entries (modules) of two trees in which some leaf differs."""
  return {name for name in before if any(
      not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[name]),
                                               jax.tree.leaves(after[name])))}


def _step_twice(config):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  _, state, step = build(config, mesh)
  start = jax.device_get(state)
  batch = dict(make_batch(config), labelled=LABELLED)  # normals: no image labelled
  with jax.set_mesh(mesh):
    for _ in range(2):
      state, _ = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
  end = jax.device_get(state)
  moments = lambda s: [t for t in jax.tree.leaves(s.opt_state, is_leaf=lambda x: isinstance(
      x, dict) and 'model' in x) if isinstance(t, dict)]
  opt_changed = set().union(*(_changed(a['model'], b['model'])
                              for a, b in zip(moments(start), moments(end))))
  return (_changed(start.params['model'], end.params['model']),
          _changed(start.batch_stats, end.batch_stats), opt_changed)


@pytest.mark.parametrize('optim,contrastive_on,mode', [
    ('sgd', False, 'update'), ('sgd', False, 'hold'), ('adamw', True, 'hold')])
def test_zero_gradient_params_hold_a_head_without_labels(optim, contrastive_on, mode):
  """config.optim.zero_gradient_params: with 'update' a head without labels in the batch
  still moves (weight decay, momentum); with 'hold' its parameters, optimizer state and
  BatchNorm statistics stay, unless the regularizer reaches its features."""
  config = tiny_config(**{'tasks': ('semseg', 'depth', 'normals'), 'optim.name': optim,
                          'contrastive.enable': contrastive_on,
                          'optim.zero_gradient_params': mode})
  params, stats, opt = _step_twice(config)
  assert {'semseg_head', 'semseg_pred', 'depth_pred', 'backbone'} <= params & opt
  assert {'semseg_head', 'depth_head'} <= stats
  if mode == 'update':
    assert {'normals_head', 'normals_pred'} <= params & opt and 'normals_head' in stats
  elif contrastive_on:  # the regularizer teaches normals' head from the other labels
    assert 'normals_head' in params & opt & stats and 'normals_pred' not in params | opt
  else:
    assert not {'normals_head', 'normals_pred'} & (params | opt | stats)


def test_unknown_zero_gradient_params_is_one_line():
  with pytest.raises(ValueError, match=r"^config.optim.zero_gradient_params='keep' is not one"):
    steps.make_trainer(tiny_config(**{'optim.zero_gradient_params': 'keep'}), None, 10)


# ----------------------------------------------------------------- pipeline


def _batches(source, config, mapping, count):
  from cmtdp_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  batches = pipeline.train_dataset(source, config, 0, mapping).as_numpy_iterator()
  return [next(batches) for _ in range(count)]


def test_synthetic_batches_carry_the_mapping_without_changing_data_or_augmentation(data_dir):
  from cmtdp_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  config = tiny_config(data_dir)
  source = pipeline.open_split(config.data, 'train', config.tasks)
  ids = pipeline.split_ids(source)
  assert ids == [f'{i:05d}' for i in range(32)]
  mapping = label_mapping.draw(ids, config.tasks, 'random', 0.5, seed=0)
  full, partial = _batches(source, config, None, 5), _batches(source, config, mapping, 5)
  for a, b in zip(full, partial):  # 5 batches of 8: into the second epoch
    assert 'labelled' not in a and set(b['labelled']) == set(config.tasks)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # Without augmentation each row is a stored image: its id is its position in the split.
  config.data.augment.update(min_scale=1.0, max_scale=1.0, flip=False, photometric=False)
  stored = [x['depth'] for x in pipeline.decoded_examples(source).as_numpy_iterator()]
  for batch in _batches(source, config, mapping, 5):
    for row in range(config.batch_size):
      position = next(i for i, d in enumerate(stored) if np.array_equal(d, batch['depth'][row]))
      kept = {t for t in config.tasks if batch['labelled'][t][row]}
      assert kept == set(mapping[ids[position]])


def test_crops_of_images_without_their_semseg_label_ignore_the_class_ratio(data_dir):
  """With cat_max_ratio 0.01 no crop passes the check, so an image keeping its semseg label
  takes the last try; one that dropped it takes the first, as with no check at all."""
  from cmtdp_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  config = tiny_config(data_dir, **{'data.crop_size': (16, 16)})
  config.data.augment.update(min_scale=1.0, max_scale=1.0, flip=False, photometric=False)
  source = pipeline.open_split(config.data, 'train', config.tasks)
  mapping = label_mapping.draw(pipeline.split_ids(source), config.tasks, 'random', 0.5, seed=0)
  unchecked = _batches(source, config, None, 4)
  config.data.augment.cat_max_ratio = 0.01
  kept_rows_moved = 0
  for free, checked in zip(unchecked, _batches(source, config, mapping, 4)):
    for row, kept in enumerate(checked['labelled']['semseg']):
      same = np.array_equal(free['image'][row], checked['image'][row])
      assert same or kept
      kept_rows_moved += kept and not same
  assert kept_rows_moved > 0


@pytest.mark.parametrize('num_processes', [1, 3])
def test_eval_batches_of_a_split_without_ids_name_images_by_position(data_dir, monkeypatch,
                                                                     num_processes):
  """Evaluating the train split (the study's kept/dropped split) scores images by the ids of
  the label mapping: for synthetic, their positions, also when each process reads a part."""
  from cmtdp_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  config = tiny_config(data_dir)
  config.eval_batch_size = 6
  source = pipeline.open_split(config.data, 'train', config.tasks)
  seen = []
  monkeypatch.setattr(jax, 'process_count', lambda: num_processes)
  for process in range(num_processes):
    monkeypatch.setattr(jax, 'process_index', lambda process=process: process)
    for batch in pipeline.eval_dataset(source, config).as_numpy_iterator():
      seen += [i.decode() for i in batch['id'][batch['mask']]]
  assert seen == pipeline.split_ids(source)


@pytest.mark.parametrize('name', ['nyud', 'pascal_context'])
def test_real_dataset_train_split_gets_a_mapping_and_labelled_batches(tmp_path, name):
  from cmtdp_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from tests import test_datasets  # pylint: disable=import-outside-toplevel
  src = tmp_path / 'src'
  if name == 'nyud':
    test_datasets._write_nyud(src, 'nyud_mt')
    expected_ids = list(test_datasets.NYUD_IDS['train'])
  else:
    test_datasets._write_pascal(src)
    expected_ids = list(test_datasets.PASCAL_IDS['train'])
  config = config_lib.base_config()
  config.data = test_datasets._data_config(tmp_path, name, src)
  config.tasks = data_lib.get_dataset_spec(name).tasks
  config.data.partial_labels = 'one_label'
  # Without augmentation, at the stored size, each row is a stored image.
  config.data.crop_size = (test_datasets.HEIGHT, test_datasets.WIDTH)
  config.data.augment.update(min_scale=1.0, max_scale=1.0, flip=False, photometric=False)
  config.batch_size = 6
  source = pipeline.open_split(config.data, 'train', config.tasks)
  assert pipeline.split_ids(source) == expected_ids
  mapping = label_mapping.for_run(config.data, config.tasks, expected_ids, str(tmp_path),
                                  resuming=False)
  assert sorted(mapping) == sorted(expected_ids)
  batch = _batches(source, config, mapping, 1)[0]
  stored = [x['semseg'] for x in pipeline.decoded_examples(source).as_numpy_iterator()]
  seen = []
  for row in range(6):
    [position] = [i for i, s in enumerate(stored) if np.array_equal(s, batch['semseg'][row])]
    seen.append(expected_ids[position])
    assert {t for t in config.tasks if batch['labelled'][t][row]} == set(mapping[seen[-1]])
  # Six rows of an epoch-wrapped split: each image twice (NYUD) or six times (PASCAL).
  assert sorted(seen) == sorted(expected_ids * (6 // len(expected_ids)))


# ---------------------------------------------------------- runs and resume


def test_mapping_is_written_once_and_read_back_by_a_resume(tmp_path, data_dir, caplog,
                                                           monkeypatch):
  from cmtdp_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  config = tiny_config(data_dir, **{'data.partial_labels': 'random', 'data.label_fraction': 0.4,
                                    'data.partial_labels_seed': 5})
  source = pipeline.open_split(config.data, 'train', config.tasks)
  workdir = str(tmp_path)
  caplog.set_level('INFO', logger='absl')  # test_cli's in-process flag parsing sets WARNING
  ids = lambda: pipeline.split_ids(source)  # noqa: E731
  mapping = workdir_lib.label_mapping_at_start(config, workdir, ids, is_chief=True,
                                              resuming=False)
  path = tmp_path / label_mapping.FILENAME
  written = path.read_bytes()
  assert mapping == label_mapping.draw(pipeline.split_ids(source), config.tasks, 'random', 0.4, 5)
  assert json.loads(written) == {i: list(t) for i, t in mapping.items()}
  assert label_mapping.load(workdir) == mapping
  digest = label_mapping.sha256(mapping)
  assert f'written (sha256 {digest})' in caplog.text
  # A resume reads the file back (here edited, to tell it from a redraw) and leaves it.
  edited = dict(mapping, **{'00000': ('depth', 'sal')})
  label_mapping.save(workdir, edited)
  edited_bytes = path.read_bytes()
  assert workdir_lib.label_mapping_at_start(config, workdir, ids, is_chief=True,
                                            resuming=True) == edited
  assert path.read_bytes() == edited_bytes
  assert f'read back (sha256 {label_mapping.sha256(edited)})' in caplog.text
  # A start with no checkpoint to resume draws what it is asked for: the file a start that
  # saved none left (here the edited one) is replaced, with a warning.
  assert workdir_lib.label_mapping_at_start(config, workdir, ids, is_chief=True,
                                            resuming=False) == mapping
  assert path.read_bytes() == written and 'replaced: the start that wrote it' in caplog.text
  # Without partial labels nothing is written, and no ids are read (a pass over NYUD's or
  # PASCAL's whole train split).
  monkeypatch.setattr(pipeline, 'split_ids', lambda source: pytest.fail('read the ids'))
  assert workdir_lib.label_mapping_at_start(tiny_config(data_dir), str(tmp_path / 'full'),
                                            ids, is_chief=True, resuming=False) is None
  assert not os.path.exists(tmp_path / 'full' / label_mapping.FILENAME)


def test_a_resume_refuses_a_saved_mapping_over_one_label(tmp_path, data_dir):
  """MTPSL's pair slots trust `label_mapping.most_labels`: a saved mapping that gives an
  image more tasks than 'one_label' does (another config's, kept through
  config.allow_config_change, or a hand edit) stops the start with one line."""
  from cmtdp_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  config = tiny_config(data_dir, **{'data.partial_labels': 'one_label'})
  ids = pipeline.split_ids(pipeline.open_split(config.data, 'train', config.tasks))
  workdir = str(tmp_path)
  label_mapping.save(workdir, label_mapping.draw(ids, config.tasks, 'random', 0.9))
  with pytest.raises(ValueError, match=r"label_mapping.json: image '\d+' keeps [2-6] tasks "
                                       r".*partial_labels='one_label' keeps 1: this mapping"):
    workdir_lib.label_mapping_at_start(config, workdir, lambda: ids, is_chief=True,
                                       resuming=True)
  one_label = label_mapping.draw(ids, config.tasks, 'one_label')
  label_mapping.save(workdir, one_label)
  config.data.derive_labels = 'sal_from_semseg'  # adds its label later, in the pipeline
  assert workdir_lib.label_mapping_at_start(config, workdir, lambda: ids, is_chief=True,
                                            resuming=True) == one_label


def test_cli_trains_and_evaluates_one_label_end_to_end(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  proc = run_main(workdir, '--config.num_steps=2', '--config.log_every=1',
                  '--config.tasks=("semseg","depth","sal")',
                  '--config.data.partial_labels=one_label', '--config.contrastive.enable=True',
                  data_dir=data_dir)
  with open(os.path.join(workdir, 'eval', 'step_2.json')) as f:
    results = json.load(f)
  assert results['semseg/images'] == 16 and np.isfinite(results['depth/rmse'])
  mapping = label_mapping.load(workdir)
  assert sorted(mapping) == [f'{i:05d}' for i in range(32)]
  assert all(len(t) == 1 for t in mapping.values())
  assert f'sha256 {label_mapping.sha256(mapping)}' in proc.stderr
  assert 'step 2/2' in proc.stdout
  # A resume with another draw would train on another dataset: refused.
  other_draw = tiny_config(data_dir, **{'tasks': ('semseg', 'depth', 'sal'),
                                        'data.partial_labels': 'one_label',
                                        'data.partial_labels_seed': 1})
  with pytest.raises(ValueError, match=r'^config.data.partial_labels_seed changed since'):
    workdir_lib.check_config_change(other_draw, workdir, 2)


@pytest.mark.parametrize('name', ['nyud', 'pascal_context'])
def test_real_dataset_fixture_trains_and_evaluates_with_partial_labels(tmp_path, name):
  """Training and evaluation end to end on the NYUD fixture with a user's mapping file and on
  the PASCAL fixture with a random draw; evaluation scores every image on every task."""
  from tests import test_datasets  # pylint: disable=import-outside-toplevel
  src = tmp_path / 'src'
  config = tiny_config(**{'num_steps': 2, 'eval_batch_size': 8,
                          'eval.metric_options.edge.thresholds': 3})
  if name == 'nyud':
    test_datasets._write_nyud(src, 'nyud_mt')
    user_mapping = {'a1': ['semseg'], 'a2': ['depth', 'normals'], 'a3': ['edge']}
    (tmp_path / 'mine.json').write_text(json.dumps(user_mapping))
    data_overrides = {'label_mapping': str(tmp_path / 'mine.json')}
    eval_ids = test_datasets.NYUD_IDS['val']
  else:
    test_datasets._write_pascal(src)
    data_overrides = {'partial_labels': 'random', 'label_fraction': 0.5}
    eval_ids = test_datasets.PASCAL_IDS['val']
  config.data = test_datasets._data_config(tmp_path, name, src)
  config.data.update(crop_size=(32, 32), **data_overrides)
  config.tasks = data_lib.get_dataset_spec(name).tasks
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(config, workdir)
  mapping = label_mapping.load(workdir)
  if name == 'nyud':
    assert mapping == {i: tuple(t) for i, t in user_mapping.items()}
  else:
    assert mapping == label_mapping.draw(sorted(mapping), config.tasks, 'random', 0.5, seed=0)
  for task in config.tasks:
    assert results[f'{task}/images'] == len(eval_ids), task
  assert all(np.isfinite(v) for v in results.values())


def test_deep_supervision_losses_are_masked_too():
  """PAD-Net's initial predictions: a task without labelled images adds 0 there too."""
  from cmtdp_jax import steps  # pylint: disable=import-outside-toplevel
  config = tiny_config(**{'model.framework': 'padnet', 'tasks': ('semseg', 'depth', 'normals')})
  components = steps.build(config)
  state = jax.jit(components.init)(steps.init_key(0))
  metrics = jax.jit(lambda b: steps.compute_losses(
      components.trainer, state.params, state.batch_stats, b, jax.random.key(0))[1][1])(
          dict(make_batch(config), labelled=LABELLED))
  assert metrics['aux_loss/normals/initial'] == 0.0 and metrics['loss/normals'] == 0.0
  assert metrics['aux_loss/depth/initial'] > 0 and metrics['aux_loss/semseg/initial'] > 0
