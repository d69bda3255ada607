"""Tests of the cross-task contrastive regularizer (cmtdp_jax/contrastive.py)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cmtdp_jax import contrastive
from cmtdp_jax.contrastive import ContrastiveConfig, CrossTaskContrastive

K, M = 16, 32
TASKS = ('semseg', 'depth', 'normals')
DEFAULT_THRESHOLDS = dict(depth_pos=0.05, depth_neg=0.2, normals_pos_deg=10.0,
                          normals_neg_deg=30.0)


def random_labels(task, rs, shape, invalid_fraction=0.2):
  """Labels with a mix of positive, in-between and negative pairs, some invalid."""
  invalid = rs.rand(*shape) < invalid_fraction
  if task == 'semseg':
    return np.where(invalid, 255, rs.randint(0, 3, shape)).astype(np.int32)
  if task == 'depth':
    return np.where(invalid, 0.0, np.exp(rs.uniform(0.0, 0.4, shape))).astype(np.float32)
  normals = np.array([0.0, 0.0, 1.0]) + 0.3 * rs.randn(*shape, 3)
  normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
  return np.where(invalid[..., None], 0.0, normals).astype(np.float32)


def relation(task, a, c, thresholds=DEFAULT_THRESHOLDS):
  """Slow reference rule: 'pos', 'neg' or None for one label pair."""
  if task == 'semseg':
    if a == 255 or c == 255:
      return None
    return 'pos' if a == c else 'neg'
  if task == 'depth':
    if a <= 0 or c <= 0:
      return None
    gap = abs(np.log(np.float64(a)) - np.log(np.float64(c)))
    lo, hi = thresholds['depth_pos'], thresholds['depth_neg']
  else:
    a, c = np.float64(a), np.float64(c)
    if np.sum(a * a) <= 1e-6 or np.sum(c * c) <= 1e-6:
      return None
    cos = np.dot(a, c) / (np.linalg.norm(a) * np.linalg.norm(c))
    gap = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    lo, hi = thresholds['normals_pos_deg'], thresholds['normals_neg_deg']
  return 'pos' if gap < lo else 'neg' if gap > hi else None


# ---------------------------------------------------------------- pair masks


@pytest.mark.parametrize('task', TASKS)
@pytest.mark.parametrize('thresholds', [
    DEFAULT_THRESHOLDS,
    dict(depth_pos=0.1, depth_neg=0.15, normals_pos_deg=20.0, normals_neg_deg=25.0)])
def test_pair_masks_match_reference(task, thresholds):
  rs = np.random.RandomState(0)
  anchors, candidates = random_labels(task, rs, (K,)), random_labels(task, rs, (M,))
  pos, neg = contrastive.pair_masks(task, jnp.asarray(anchors), jnp.asarray(candidates),
                                    **thresholds)
  expected = [[relation(task, a, c, thresholds) for c in candidates] for a in anchors]
  np.testing.assert_array_equal(pos, np.array(expected) == 'pos')
  np.testing.assert_array_equal(neg, np.array(expected) == 'neg')
  assert 0 < np.sum(pos) and 0 < np.sum(neg) and np.sum(pos | neg) < K * M


# -------------------------------------------------------------- triplet loss


@pytest.mark.parametrize('distance', contrastive.DISTANCES)
def test_triplet_loss_matches_reference(distance):
  rs = np.random.RandomState(1)
  a, p, n = (rs.randn(2, K, 8).astype(np.float32) for _ in range(3))
  valid = rs.rand(2, K) < 0.7

  def dist(x, y):
    if distance == 'euclidean':
      return np.linalg.norm(x - y, axis=-1)
    return 1 - np.sum(x * y, -1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))

  hinge = np.maximum(dist(a, p) - dist(a, n) + 0.3, 0.0)
  loss = contrastive.triplet_loss(a, p, n, valid, margin=0.3, distance=distance)
  np.testing.assert_allclose(loss, hinge[valid].mean(), rtol=1e-5)


def test_triplet_loss_without_valid_triplet_is_zero_with_finite_gradient():
  x = jnp.ones((K, 8)) / np.sqrt(8)

  def loss(anchor, valid):
    return contrastive.triplet_loss(anchor, x, x, valid)

  for valid in (jnp.zeros(K, bool), jnp.ones(K, bool)):
    value, grad = jax.value_and_grad(loss)(x, valid)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
  assert loss(x, jnp.zeros(K, bool)) == 0.0


def test_unknown_distance_names_valid_ones():
  x = jnp.ones((K, 8))
  with pytest.raises(ValueError, match='euclidean, cosine'):
    contrastive.triplet_loss(x, x, x, jnp.ones(K, bool), distance='l1')


# ------------------------------------------------------------------ sampling


@pytest.mark.parametrize('task', TASKS)
def test_sampled_triplets_follow_source_labels(task):
  rs = np.random.RandomState(2)
  labels = random_labels(task, rs, (8, 8), invalid_fraction=0.3)
  sample = jax.jit(jax.vmap(lambda key: contrastive.sample_triplets(
      key, task, jnp.asarray(labels), num_anchors=K, pool_size=M)))
  triplets = jax.tree.map(np.asarray, sample(jax.random.split(jax.random.key(0), 8)))
  flat = labels.reshape(64, *labels.shape[2:])
  is_valid = [relation(task, label, label) is not None for label in flat]
  assert all(is_valid[i] for i in triplets.anchor.ravel())
  assert triplets.valid.mean() > 0.5
  for anchor, positive, negative in zip(triplets.anchor[triplets.valid],
                                        triplets.positive[triplets.valid],
                                        triplets.negative[triplets.valid]):
    assert positive != anchor
    assert relation(task, flat[anchor], flat[positive]) == 'pos'
    assert relation(task, flat[anchor], flat[negative]) == 'neg'


def test_image_without_valid_pixel_gives_no_triplet():
  labels = jnp.full((8, 8), 255, jnp.int32)
  sample = jax.jit(lambda key: contrastive.sample_triplets(key, 'semseg', labels,
                                                          num_anchors=K, pool_size=M))
  assert not np.any(sample(jax.random.key(0)).valid)


def test_random_match_is_uniform_over_allowed_slots():
  allowed = np.zeros((1, M), bool)
  allowed[0, [3, 7, 8, 30]] = True
  draws = 2000
  match = jax.jit(jax.vmap(lambda key: contrastive.match_triplets(key, allowed, allowed)))
  positive, negative, valid = match(jax.random.split(jax.random.key(0), draws))
  assert np.all(valid)
  for chosen in (positive, negative):
    counts = np.bincount(np.asarray(chosen).ravel(), minlength=M)
    assert counts[~allowed[0]].sum() == 0
    expected = draws / 4
    chi2 = np.sum((counts[allowed[0]] - expected) ** 2 / expected)
    assert chi2 < 16.3  # p = 0.001 at 3 degrees of freedom


def test_random_allowed_slot_picks_allowed_slots_of_batched_masks():
  rs = np.random.RandomState(5)
  allowed = rs.rand(3, 5, M) < 0.2
  allowed[0, 0] = False  # a row without any allowed slot
  allowed[1, 1] = False
  allowed[1, 1, M - 1] = True  # a single allowed slot, the last one
  for seed in range(5):
    slot = np.asarray(jax.jit(contrastive.random_allowed_slot)(jax.random.key(seed), allowed))
    assert slot.shape == (3, 5) and slot[0, 0] == M - 1 and slot[1, 1] == M - 1
    rows = allowed.any(-1)
    assert np.take_along_axis(allowed, slot[..., None], -1)[..., 0][rows].all()


def test_first_argmax_equals_argmax_with_ties_and_empty_rows():
  rs = np.random.RandomState(0)
  scores = rs.randint(0, 4, (3, 5, 7)).astype(np.float32)  # many ties
  scores[0, 0] = -np.inf  # a row without any allowed slot
  scores[1, 2, 3] = np.inf
  np.testing.assert_array_equal(jax.jit(contrastive.first_argmax)(scores),
                                np.argmax(scores, axis=-1))


def test_hard_match_of_a_batch_equals_per_image_matches():
  rs = np.random.RandomState(4)
  pos, neg = rs.rand(3, K, M) < 0.3, rs.rand(3, K, M) < 0.3
  anchor_emb = rs.randn(3, K, 8).astype(np.float32)
  pool_emb = rs.randn(3, M, 8).astype(np.float32)
  match = jax.jit(lambda pos, neg, a, p: contrastive.match_triplets(
      None, pos, neg, strategy='hard', anchor_embeddings=a, pool_embeddings=p))
  batched = match(pos, neg, anchor_emb, pool_emb)
  for image in range(3):
    single = match(pos[image], neg[image], anchor_emb[image], pool_emb[image])
    for got, want in zip(batched, single):
      np.testing.assert_array_equal(got[image], want)


@pytest.mark.parametrize('distance', contrastive.DISTANCES)
def test_hard_match_picks_farthest_positive_and_closest_negative(distance):
  rs = np.random.RandomState(3)
  pos, neg = rs.rand(K, M) < 0.3, rs.rand(K, M) < 0.3
  pos[0], neg[1] = False, False
  anchor_emb, pool_emb = rs.randn(K, 8).astype(np.float32), rs.randn(M, 8).astype(np.float32)
  positive, negative, valid = jax.jit(lambda a, p: contrastive.match_triplets(
      None, pos, neg, strategy='hard', anchor_embeddings=a, pool_embeddings=p,
      distance=distance))(anchor_emb, pool_emb)
  if distance == 'euclidean':
    dist = np.linalg.norm(anchor_emb[:, None] - pool_emb[None], axis=-1)
  else:
    unit_a = anchor_emb / np.linalg.norm(anchor_emb, axis=-1, keepdims=True)
    unit_p = pool_emb / np.linalg.norm(pool_emb, axis=-1, keepdims=True)
    dist = 1 - unit_a @ unit_p.T
  np.testing.assert_array_equal(valid, pos.any(1) & neg.any(1))
  for k in np.flatnonzero(valid):
    assert positive[k] == np.argmax(np.where(pos[k], dist[k], -np.inf))
    assert negative[k] == np.argmin(np.where(neg[k], dist[k], np.inf))


def test_loss_is_zero_once_classes_are_separated_by_the_margin():
  rs = np.random.RandomState(4)
  labels = random_labels('semseg', rs, (8, 8))
  embeddings = np.eye(4, dtype=np.float32)[np.minimum(labels, 3).ravel()]
  triplets = jax.jit(lambda key: contrastive.sample_triplets(
      key, 'semseg', jnp.asarray(labels), num_anchors=K, pool_size=M))(jax.random.key(0))
  a, p, n = (embeddings[i] for i in triplets[:3])
  assert np.any(triplets.valid)
  for distance in contrastive.DISTANCES:
    assert contrastive.triplet_loss(a, p, n, triplets.valid, distance=distance) == 0.0
    assert contrastive.triplet_loss(a, p, n, triplets.valid, margin=2.0, distance=distance) > 0


def test_nearest_resize_matches_jax_image_resize():
  labels = jnp.asarray(np.random.RandomState(5).rand(2, 30, 37, 3), jnp.float32)
  for height, width in ((7, 12), (60, 40)):
    np.testing.assert_array_equal(
        contrastive.resize_labels_nearest(labels, height, width),
        jax.image.resize(labels, (2, height, width, 3), 'nearest'))
  ids = jnp.zeros((1, 32, 32), jnp.int32)
  assert contrastive.resize_labels_nearest(ids, 8, 8).dtype == jnp.int32


# -------------------------------------------------------------------- config


def test_config_defaults_follow_spec():
  config = ContrastiveConfig()
  assert (config.enable, config.weight, config.margin, config.distance, config.embed_dim,
          config.num_anchors, config.pool_size, config.strategy, config.source_choice,
          config.pairs) == (False, 0.1, 0.5, 'euclidean', 128, 256, 1024, 'random',
                            'uniform', ())
  assert config.thresholds == DEFAULT_THRESHOLDS


def test_config_from_config_dict():
  config = ContrastiveConfig.from_dict(ml_collections.ConfigDict(
      {'enable': True, 'strategy': 'hard', 'source_choice': 'pairs',
       'pairs': [['semseg', 'depth'], ('depth', 'semseg')]}))
  assert config.enable and config.strategy == 'hard'
  assert config.pairs == (('semseg', 'depth'), ('depth', 'semseg'))
  hash(config)


@pytest.mark.parametrize('values, message', [
    ({'lambda': 0.1}, "field 'lambda'"),
    ({'strategy': 'easy'}, "strategy 'easy'"),
    ({'distance': 'l1'}, "distance 'l1'"),
    ({'source_choice': 'all'}, "source_choice 'all'"),
    ({'source_choice': 'pairs', 'pairs': [('semseg', 'sky')]}, "unknown task 'sky'"),
    ({'source_choice': 'pairs', 'pairs': [('depth', 'depth')]}, 'own source'),
    ({'source_choice': 'pairs'}, 'exactly when'),
    ({'pairs': [('semseg', 'depth')]}, 'exactly when'),
    ({'num_anchors': 0}, 'num_anchors'),
    ({'depth_pos': 0.3}, 'depth_pos'),
])
def test_config_errors_are_one_line(values, message):
  with pytest.raises(ValueError, match=message) as error:
    ContrastiveConfig.from_dict(values)
  assert '\n' not in str(error.value)


# -------------------------------------------------------------------- module


def module_inputs(batch=2):
  """Per-target features at different resolutions and widths; labels at 4x/8x."""
  rs = np.random.RandomState(6)
  features = {
      'semseg': jnp.asarray(rs.randn(batch, 8, 8, 8), jnp.bfloat16),
      'depth': jnp.asarray(rs.randn(batch, 8, 8, 6), jnp.float32),
      'normals': jnp.asarray(rs.randn(batch, 4, 4, 4), jnp.float32),
  }
  labels = {task: jnp.asarray(random_labels(task, rs, (batch, 32, 32))) for task in TASKS}
  return features, labels


def small_config(**overrides):
  return ContrastiveConfig(embed_dim=8, num_anchors=K, pool_size=M, **overrides)


@pytest.fixture(scope='module')
def three_tasks():
  """The module over 3 tasks, its params and a jitted step returning the loss,
  the diagnostics and the gradients for params and features."""
  module = CrossTaskContrastive(TASKS, TASKS, small_config())
  features, labels = module_inputs()
  params = jax.jit(module.init)(jax.random.key(0), features, labels, jax.random.key(1))
  traces = []

  @jax.jit
  def step(params, features, rng):
    traces.append(None)
    return jax.value_and_grad(lambda p, f: module.apply(p, f, labels, rng), argnums=(0, 1),
                              has_aux=True)(params, features)

  return dict(module=module, features=features, labels=labels, params=params,
              step=lambda rng: step(params, features, rng), traces=traces)


def test_init_creates_every_pair_projector_in_float32(three_tasks):
  params = three_tasks['params']['params']
  assert set(params) == {f'{t}<-{s}' for t in TASKS for s in TASKS if t != s}
  channels = {'semseg': 8, 'depth': 6, 'normals': 4}
  for name, projector in params.items():
    c = channels[name.split('<-')[0]]
    assert jax.tree.map(lambda x: (x.shape, x.dtype), projector) == {
        'hidden': {'kernel': ((c, c), jnp.float32), 'bias': ((c,), jnp.float32)},
        'output': {'kernel': ((c, 8), jnp.float32), 'bias': ((8,), jnp.float32)}}


def run_steps(step, seeds):
  """Loss and diagnostics of `step` over seeds, stacked on a leading axis."""
  outputs = [step(jax.random.key(seed))[0] for seed in seeds]
  return jax.tree.map(lambda *x: np.stack(x), *outputs)


def test_targets_draw_other_sources_uniformly(three_tasks):
  draws = 300
  loss, diagnostics = run_steps(three_tasks['step'], range(draws))
  assert {name.split('/')[0] for name in diagnostics} == set(three_tasks['params']['params'])
  per_target = []
  for target in TASKS:
    sources = [s for s in TASKS if s != target]
    drawn = np.stack([diagnostics[f'{target}<-{s}/drawn'] for s in sources])
    np.testing.assert_array_equal(drawn.sum(0), 1.0)
    chi2 = np.sum((drawn.sum(1) - draws / 2) ** 2 / (draws / 2))
    assert chi2 < 10.8  # p = 0.001 at 1 degree of freedom
    for s in sources:
      for stat in ('loss', 'd_ap', 'd_an', 'active', 'valid'):
        assert np.all(diagnostics[f'{target}<-{s}/{stat}'][drawn[sources.index(s)] == 0] == 0)
    per_target.append(sum(diagnostics[f'{target}<-{s}/loss'] for s in sources))
  np.testing.assert_allclose(loss, np.mean(per_target, axis=0), rtol=1e-6)
  assert np.all(np.isfinite(loss)) and np.all(loss > 0)


def test_gradient_reaches_only_drawn_projector(three_tasks):
  for seed in range(3):
    (loss, diagnostics), (param_grads, _) = three_tasks['step'](jax.random.key(seed))
    assert np.isfinite(loss) and loss > 0
    for name, grad in param_grads['params'].items():
      leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(grad)]
      assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
      if diagnostics[f'{name}/drawn'] == 1.0:
        assert any(np.any(leaf != 0) for leaf in leaves), name
      else:
        assert all(np.all(leaf == 0) for leaf in leaves), name


def test_feature_gradient_is_finite_for_bf16_features(three_tasks):
  _, (_, feature_grads) = three_tasks['step'](jax.random.key(0))
  assert feature_grads['semseg'].dtype == jnp.bfloat16
  for value in feature_grads.values():
    value = np.asarray(value, np.float32)
    assert np.all(np.isfinite(value)) and np.any(value != 0)


def test_step_compiles_once_for_new_rngs(three_tasks):
  for seed in range(10, 14):
    three_tasks['step'](jax.random.key(seed))
  assert len(three_tasks['traces']) == 1


def test_fixed_pairs_are_respected(three_tasks):
  pairs = (('semseg', 'depth'), ('semseg', 'normals'), ('depth', 'semseg'))
  module = CrossTaskContrastive(TASKS, TASKS, small_config(source_choice='pairs', pairs=pairs))
  features, labels = three_tasks['features'], three_tasks['labels']
  assert module.source_options() == {'semseg': ('depth', 'normals'), 'depth': ('semseg',)}
  shapes = jax.eval_shape(module.init, jax.random.key(0), features, labels, jax.random.key(1))
  names = {f'{t}<-{s}' for t, s in pairs}
  assert set(shapes['params']) == names
  params = {'params': {n: p for n, p in three_tasks['params']['params'].items() if n in names}}
  apply = jax.jit(lambda rng: (module.apply(params, features, labels, rng),))
  _, diagnostics = run_steps(apply, range(200))
  assert {name.split('/')[0] for name in diagnostics} == names
  np.testing.assert_array_equal(diagnostics['depth<-semseg/drawn'], 1.0)
  semseg_draws = diagnostics['semseg<-depth/drawn'] + diagnostics['semseg<-normals/drawn']
  np.testing.assert_array_equal(semseg_draws, 1.0)
  assert 70 < diagnostics['semseg<-depth/drawn'].sum() < 130


def test_hard_cosine_module_has_finite_loss_and_gradients():
  module = CrossTaskContrastive(('semseg',), ('semseg', 'depth'),
                                small_config(strategy='hard', distance='cosine'))
  features, labels = module_inputs()
  features = {t: features[t] for t in ('semseg', 'depth')}
  labels = {t: labels[t] for t in ('semseg', 'depth')}

  def init_and_grad(rng):
    params = module.init(jax.random.key(0), features, labels, rng)
    return jax.value_and_grad(lambda p: module.apply(p, features, labels, rng)[0])(params)

  loss, grads = jax.jit(init_and_grad)(jax.random.key(1))
  assert np.isfinite(loss) and loss > 0
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_module_rejects_missing_inputs_and_lone_tasks():
  features, labels = module_inputs()
  lone = CrossTaskContrastive(('semseg',), ('semseg',), small_config())
  with pytest.raises(ValueError, match='no \\(target, source\\) pair'):
    jax.eval_shape(lone.init, jax.random.key(0), features, labels, jax.random.key(1))
  module = CrossTaskContrastive(TASKS, TASKS, small_config())
  with pytest.raises(ValueError, match="no labels for sources \\['normals'\\]"):
    jax.eval_shape(module.init, jax.random.key(0), features,
                   {t: labels[t] for t in ('semseg', 'depth')}, jax.random.key(1))
