"""Cross-task contrastive regularizer (Yang, Ye, Xu, AAAI 2023).

At every step each target task t draws one source task s != t (with partially
annotated batches, one per image among the tasks labelled on it). The source's
ground truth decides which pixel pairs are positive or negative; a projector
Proj_{t,s} maps t's decoder features to unit embeddings; sampled (anchor,
positive, negative) pixels feed a triplet loss. The regularizer only exists at
training time: its parameters live outside the inference model, and it only
sees a dict of feature maps, so it plugs into any encoder-decoder model.
Defaults follow SPEC section 1.

Everything has static shapes and no Python branching on traced values, so a
training step that calls it compiles once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cmtdp_jax import tasks

STRATEGIES = ('random', 'hard')
DISTANCES = ('euclidean', 'cosine')
SOURCE_CHOICES = ('uniform', 'pairs')


def _check_choice(kind: str, value: Any, valid: Sequence[str]):
  if value not in valid:
    raise ValueError(f"unknown contrastive {kind} '{value}'; valid: {', '.join(valid)}")


def pair_name(target: str, source: str) -> str:
  """Key of a (target, source) pair in the params and the diagnostics."""
  return f'{target}<-{source}'


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
  """Settings of the regularizer; defaults from SPEC section 1.

  `enable` and `weight` (lambda) are read by the training loop, the rest by
  this module. `source_choice` 'uniform' lets every target draw among all
  other tasks with labels; 'pairs' restricts each target to the sources listed
  for it in `pairs` ((target, source) tuples), drawn uniformly; targets not
  listed get no regularizer.
  """
  enable: bool = False
  weight: float = 0.1
  margin: float = 0.5
  distance: str = 'euclidean'
  embed_dim: int = 128
  num_anchors: int = 256
  pool_size: int = 1024
  strategy: str = 'random'
  depth_pos: float = 0.05
  depth_neg: float = 0.2
  normals_pos_deg: float = 10.0
  normals_neg_deg: float = 30.0
  source_choice: str = 'uniform'
  pairs: tuple[tuple[str, str], ...] = ()

  def __post_init__(self):
    object.__setattr__(self, 'pairs', tuple(tuple(pair) for pair in self.pairs))
    _check_choice('distance', self.distance, DISTANCES)
    _check_choice('strategy', self.strategy, STRATEGIES)
    _check_choice('source_choice', self.source_choice, SOURCE_CHOICES)
    for name in ('embed_dim', 'num_anchors', 'pool_size'):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f'contrastive {name} must be a positive integer, got {value!r}')
    for name in ('weight', 'margin'):
      if getattr(self, name) < 0:
        raise ValueError(f'contrastive {name} must be >= 0, got {getattr(self, name)}')
    if not 0 <= self.depth_pos <= self.depth_neg:
      raise ValueError('contrastive thresholds need 0 <= depth_pos <= depth_neg, got '
                       f'{self.depth_pos}, {self.depth_neg}')
    if not 0 <= self.normals_pos_deg <= self.normals_neg_deg <= 180:
      raise ValueError('contrastive thresholds need 0 <= normals_pos_deg <= normals_neg_deg'
                       f' <= 180, got {self.normals_pos_deg}, {self.normals_neg_deg}')
    for pair in self.pairs:
      if len(pair) != 2:
        raise ValueError(f'contrastive pair {pair!r} is not a (target, source) pair')
      for task in pair:
        if task not in tasks.TASKS:
          raise ValueError(f"contrastive pair {pair!r}: unknown task '{task}'; valid: "
                           f"{', '.join(tasks.TASKS)}")
      if pair[0] == pair[1]:
        raise ValueError(f"contrastive pair {pair!r}: a task cannot be its own source")
    if (self.source_choice == 'pairs') != bool(self.pairs):
      raise ValueError("contrastive pairs must be given exactly when source_choice is 'pairs'")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> ContrastiveConfig:
    """Builds the config from a plain dict or an ml_collections ConfigDict."""
    values = dict(values.to_dict() if hasattr(values, 'to_dict') else values)
    fields = [field.name for field in dataclasses.fields(cls)]
    for name in values:
      if name not in fields:
        raise ValueError(f"unknown contrastive config field '{name}'; valid: {', '.join(fields)}")
    return cls(**values)

  @property
  def thresholds(self) -> dict[str, float]:
    """Keyword arguments of `pair_masks`."""
    return dict(depth_pos=self.depth_pos, depth_neg=self.depth_neg,
                normals_pos_deg=self.normals_pos_deg, normals_neg_deg=self.normals_neg_deg)


def pair_masks(source_task: str, anchor_labels, candidate_labels, *, depth_pos=0.05,
               depth_neg=0.2, normals_pos_deg=10.0, normals_neg_deg=30.0):
  """Which (anchor, candidate) pixel pairs the source task calls positive / negative.

  Args:
    source_task: registry name; its `label_kind` picks the rule: categorical
      same / different label; depth |log d_a - log d_c| below `depth_pos` /
      above `depth_neg`; normals angle below `normals_pos_deg` / above
      `normals_neg_deg`. Pairs between the thresholds are neither.
    anchor_labels: [K] (normals [K, 3]) labels of the anchors.
    candidate_labels: [M] (normals [M, 3]).
  Returns:
    (pos, neg) boolean [K, M]; pairs touching an invalid label are neither.
  """
  task = tasks.get_task(source_task)
  valid_a, valid_c = task.valid(anchor_labels), task.valid(candidate_labels)
  both_valid = valid_a[:, None] & valid_c[None, :]
  if task.label_kind == tasks.CATEGORICAL:
    same = anchor_labels[:, None] == candidate_labels[None, :]
    pos, neg = same, ~same
  elif task.label_kind == tasks.DEPTH:
    log_a = jnp.log(jnp.where(valid_a, anchor_labels, 1.0))
    log_c = jnp.log(jnp.where(valid_c, candidate_labels, 1.0))
    gap = jnp.abs(log_a[:, None] - log_c[None, :])
    pos, neg = gap < depth_pos, gap > depth_neg
  elif task.label_kind == tasks.NORMALS:
    # Comparing cosines avoids arccos; full precision keeps threshold decisions
    # exact on accelerators whose default float32 matmul is reduced precision.
    cos = jnp.matmul(tasks.unit_vectors(anchor_labels),
                     tasks.unit_vectors(candidate_labels).T,
                     precision=jax.lax.Precision.HIGHEST)
    pos = cos > np.cos(np.deg2rad(normals_pos_deg))
    neg = cos < np.cos(np.deg2rad(normals_neg_deg))
  else:
    raise ValueError(f"task '{source_task}' has unsupported label kind '{task.label_kind}'")
  return pos & both_valid, neg & both_valid


def sample_pixels(rng, valid, *, num_anchors: int, pool_size: int):
  """Anchor [K] and pool [M] pixel indices, uniform with replacement over `valid` [N].

  Indexing the list of valid pixels keeps memory at O(N + K + M), where a
  categorical draw over N logits would need O(N * K). Without any valid pixel
  every index is pixel 0, itself invalid, so `pair_masks` rules out its pairs.
  """
  valid_pixels = jnp.flatnonzero(valid, size=valid.shape[0], fill_value=0)
  count = jnp.maximum(jnp.sum(valid), 1)
  pixels = valid_pixels[jax.random.randint(rng, (num_anchors + pool_size,), 0, count)]
  return pixels[:num_anchors], pixels[num_anchors:]


def _candidate_masks(source_task, flat_labels, anchors, pool, thresholds):
  """`pair_masks` between the sampled anchors and pool of one flattened label map."""
  pos, neg = pair_masks(source_task, flat_labels[anchors], flat_labels[pool], **thresholds)
  # A pixel drawn both as an anchor and into the pool is not its own positive.
  return pos & (anchors[:, None] != pool[None, :]), neg


def rowwise_distance(x, y, distance: str = 'euclidean'):
  """Row-wise distance between [..., D] arrays."""
  _check_choice('distance', distance, DISTANCES)
  if distance == 'euclidean':
    # Clamped so the gradient stays finite when x == y.
    return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x - y), axis=-1), 1e-12))
  return 1.0 - jnp.sum(tasks.unit_vectors(x) * tasks.unit_vectors(y), axis=-1)


def pairwise_distance(x, y, distance: str = 'euclidean'):
  """[..., K, D] x [..., M, D] -> [..., K, M] distances, via a matmul (no [K, M, D] array)."""
  _check_choice('distance', distance, DISTANCES)
  transpose = lambda v: jnp.swapaxes(v, -1, -2)
  if distance == 'cosine':
    return 1.0 - jnp.matmul(tasks.unit_vectors(x), transpose(tasks.unit_vectors(y)),
                            precision=jax.lax.Precision.HIGHEST)
  dot = jnp.matmul(x, transpose(y), precision=jax.lax.Precision.HIGHEST)
  square = jnp.sum(x * x, -1)[..., :, None] + jnp.sum(y * y, -1)[..., None, :] - 2.0 * dot
  return jnp.sqrt(jnp.maximum(square, 0.0))


def first_argmax(scores):
  """`jnp.argmax(scores, -1)` (first index of the maximum) as two plain reductions,
  which XLA:CPU runs ~2.7x faster than argmax's variadic (value, index) reduce."""
  best = jnp.max(scores, axis=-1, keepdims=True)
  slots = jnp.arange(scores.shape[-1], dtype=jnp.int32)
  return jnp.min(jnp.where(scores == best, slots, scores.shape[-1]), axis=-1)


def match_triplets(rng, pos, neg, *, strategy: str = 'random', anchor_embeddings=None,
                   pool_embeddings=None, distance: str = 'euclidean'):
  """Pool slot of one positive and one negative per anchor.

  Works on one image or a batch: every array may carry leading batch axes.

  Args:
    rng: used by 'random' only.
    pos, neg: [..., K, M] boolean masks (from `pair_masks`).
    strategy: 'random' draws uniformly and independently per anchor among its
      positives / negatives in the pool (`random_allowed_slot`); 'hard' takes
      the farthest positive and the closest negative in embedding space, which
      needs `anchor_embeddings` [..., K, D] and `pool_embeddings` [..., M, D].
      The choice carries no gradient.
    distance: embedding distance for 'hard'.
  Returns:
    (positive, negative, valid), each [..., K]: valid is False where the pool
    holds no positive or no negative for the anchor; slots there are arbitrary.
  """
  _check_choice('strategy', strategy, STRATEGIES)
  valid = jnp.any(pos, axis=-1) & jnp.any(neg, axis=-1)
  if strategy == 'random':
    pos_key, neg_key = jax.random.split(rng)
    return random_allowed_slot(pos_key, pos), random_allowed_slot(neg_key, neg), valid
  if anchor_embeddings is None or pool_embeddings is None:
    raise ValueError("contrastive strategy 'hard' needs anchor and pool embeddings")
  dist = jax.lax.stop_gradient(pairwise_distance(anchor_embeddings, pool_embeddings, distance))
  positive = first_argmax(jnp.where(pos, dist, -jnp.inf))
  negative = first_argmax(jnp.where(neg, -dist, -jnp.inf))
  return positive, negative, valid


def random_allowed_slot(rng, allowed):
  """Index of a uniformly drawn True entry along the last axis of `allowed`.

  The r-th allowed slot for r uniform below the row's count, located with a
  running count: one random number per row instead of one score per slot
  (random bits dominated the regularizer's cost on CPU). Rows without any
  allowed slot give the last slot.
  """
  counts = jnp.sum(allowed, axis=-1, dtype=jnp.int32)
  rank = jax.random.randint(rng, counts.shape, 0, jnp.maximum(counts, 1))
  running = jnp.cumsum(allowed, axis=-1, dtype=jnp.int32)
  slot = jnp.sum(running <= rank[..., None], axis=-1, dtype=jnp.int32)
  return jnp.minimum(slot, allowed.shape[-1] - 1)


class Triplets(NamedTuple):
  """Pixel indices into a flattened [h * w] map, and which triplets count."""
  anchor: jax.Array
  positive: jax.Array
  negative: jax.Array
  valid: jax.Array


def sample_triplets(rng, source_task: str, labels, *, num_anchors: int, pool_size: int,
                    strategy: str = 'random', embeddings=None, distance: str = 'euclidean',
                    **thresholds) -> Triplets:
  """Samples K triplets for one image from the source task's labels.

  Args:
    rng: PRNG key.
    source_task: registry name of the task whose labels define the pairs.
    labels: [h, w] (normals [h, w, 3]) at feature resolution.
    num_anchors: K, drawn uniformly over valid pixels.
    pool_size: M candidates, drawn uniformly over valid pixels; each anchor's
      positive and negative come from this pool.
    strategy: 'random' or 'hard' (see `match_triplets`).
    embeddings: [h * w, D], needed by 'hard'.
    distance: embedding distance for 'hard'.
    **thresholds: `pair_masks` thresholds.
  Returns:
    Triplets of [K] arrays; `valid` is False for anchors without a positive or
    a negative in the pool, and everywhere when the image has no valid pixel.
  """
  flat = labels.reshape(-1, *labels.shape[2:])
  pixel_key, match_key = jax.random.split(rng)
  anchors, pool = sample_pixels(pixel_key, tasks.get_task(source_task).valid(flat),
                                num_anchors=num_anchors, pool_size=pool_size)
  pos, neg = _candidate_masks(source_task, flat, anchors, pool, thresholds)
  anchor_embeddings = pool_embeddings = None
  if embeddings is not None:
    anchor_embeddings, pool_embeddings = embeddings[anchors], embeddings[pool]
  positive, negative, valid = match_triplets(
      match_key, pos, neg, strategy=strategy, anchor_embeddings=anchor_embeddings,
      pool_embeddings=pool_embeddings, distance=distance)
  return Triplets(anchors, pool[positive], pool[negative], valid)


def _triplet_terms(anchor, positive, negative, valid, margin, distance):
  """Triplet loss and its statistics, each a mean over valid triplets."""
  d_ap = rowwise_distance(anchor, positive, distance)
  d_an = rowwise_distance(anchor, negative, distance)
  hinge = jnp.maximum(d_ap - d_an + margin, 0.0)
  count = jnp.maximum(jnp.sum(valid), 1)

  def mean(values):
    return jnp.sum(jnp.where(valid, values, 0.0)) / count

  stats = {'d_ap': mean(d_ap), 'd_an': mean(d_an), 'active': mean(hinge > 0),
           'valid': jnp.mean(valid.astype(jnp.float32))}
  return mean(hinge), stats


def triplet_loss(anchor, positive, negative, valid, *, margin: float = 0.5,
                 distance: str = 'euclidean'):
  """Mean over valid triplets of max(0, d(a, p) - d(a, n) + margin).

  Embeddings [..., D], `valid` [...]. 'euclidean' is the plain distance (the
  projector emits unit vectors), 'cosine' is 1 - cos. Returns 0, not NaN, when
  no triplet is valid.
  """
  return _triplet_terms(anchor, positive, negative, valid, margin, distance)[0]


def source_options(targets: Sequence[str], sources: Sequence[str],
                   config: ContrastiveConfig) -> dict[str, tuple[str, ...]]:
  """Sources each target may draw, in draw-index order; targets without any are dropped."""
  if config.source_choice == 'uniform':
    options = {t: tuple(s for s in sources if s != t) for t in targets}
  else:
    for target, source in config.pairs:
      if target not in targets or source not in sources:
        raise ValueError(f'contrastive pair ({target}, {source}) needs target in '
                         f'{tuple(targets)} and source in {tuple(sources)}')
    options = {t: tuple(dict.fromkeys(s for pt, s in config.pairs if pt == t))
               for t in targets}
  options = {t: allowed for t, allowed in options.items() if allowed}
  if not options:
    raise ValueError('contrastive regularizer has no (target, source) pair: it needs at '
                     'least two tasks with labels')
  return options


def _init_projector(rng, channels: int, embed_dim: int):
  hidden_key, output_key = jax.random.split(rng)
  kernel_init = nn.initializers.lecun_normal()
  return {
      'hidden': {'kernel': kernel_init(hidden_key, (channels, channels), jnp.float32),
                 'bias': jnp.zeros((channels,), jnp.float32)},
      'output': {'kernel': kernel_init(output_key, (channels, embed_dim), jnp.float32),
                 'bias': jnp.zeros((embed_dim,), jnp.float32)},
  }


def project(params, pixels):
  """Projector on gathered pixels: 1x1 conv + ReLU + 1x1 conv, L2-normalised."""
  hidden = nn.relu(pixels @ params['hidden']['kernel'] + params['hidden']['bias'])
  return tasks.unit_vectors(hidden @ params['output']['kernel'] + params['output']['bias'])


def resize_labels_nearest(labels, height: int, width: int):
  """Nearest-neighbour resize of [B, H, W(, 3)] labels (half-pixel centres).

  A gather at static indices: keeps the dtype and never mixes label values.
  """
  rows = np.minimum(((np.arange(height) + 0.5) * labels.shape[1] / height).astype(np.int32),
                    labels.shape[1] - 1)
  cols = np.minimum(((np.arange(width) + 0.5) * labels.shape[2] / width).astype(np.int32),
                    labels.shape[2] - 1)
  return labels[:, rows][:, :, cols]


def _draw_sources(draw_key, allowed, labelled):
  """Which of `allowed` each image takes its pairs from.

  Without `labelled` one index (a scalar) for the whole batch, uniform over
  `allowed`. With it ({task: bool [B]}), one index per image [B], uniform over
  the sources labelled on that image, and `has_source` [B]: False where the
  image keeps none of them (its index is then arbitrary and its triplets
  never count).
  """
  if labelled is None:
    return jax.random.randint(draw_key, (), 0, len(allowed)), None
  available = jnp.stack([labelled[s] for s in allowed], axis=-1)
  return random_allowed_slot(draw_key, available), jnp.any(available, axis=-1)


def _target_loss(rng, feats, labels, allowed, projectors, cfg, labelled=None):
  """Draws the sources of one target; returns (loss, diagnostics per allowed source).

  A source's diagnostics: 'drawn' (the fraction of images that drew it; 0 or 1
  without `labelled`), and 'loss', 'd_ap', 'd_an', 'active', 'valid' over the
  triplets of those images (0 where none did).
  """
  batch, height, width, channels = feats.shape
  draw_key, sample_key, match_key = jax.random.split(rng, 3)
  drawn, has_source = _draw_sources(draw_key, allowed, labelled)
  per_image = drawn.ndim == 1

  flat_labels = {}
  for source in allowed:
    resized = resize_labels_nearest(labels[source], height, width)
    flat_labels[source] = resized.reshape(batch, height * width, *resized.shape[3:])
  # Validity masks are cheap, so pixels are sampled outside the per-source
  # branches, from the drawn source's mask picked by index.
  valid = jnp.stack([tasks.get_task(s).valid(flat_labels[s]) for s in allowed])
  valid = valid[drawn, jnp.arange(batch)] if per_image else valid[drawn]
  anchors, pool = jax.vmap(lambda key, image_valid: sample_pixels(
      key, image_valid, num_anchors=cfg.num_anchors, pool_size=cfg.pool_size))(
          jax.random.split(sample_key, batch), valid)

  def masks_from(source):
    def masks(anchors, pool):
      return jax.vmap(lambda image_labels, image_anchors, image_pool: _candidate_masks(
          source, image_labels, image_anchors, image_pool, cfg.thresholds))(
              flat_labels[source], anchors, pool)
    return masks

  if per_image:  # a switch per image: batched, it computes every source's masks
    branches = [lambda image_labels, a, p, s=s: _candidate_masks(
        s, image_labels[s], a, p, cfg.thresholds) for s in allowed]
    pos, neg = jax.vmap(lambda index, *image: jax.lax.switch(index, branches, *image))(
        drawn, flat_labels, anchors, pool)
  else:
    pos, neg = jax.lax.switch(drawn, [masks_from(s) for s in allowed], anchors, pool)

  stacked = jax.tree.map(lambda *p: jnp.stack(p), *projectors)
  projector = jax.tree.map(lambda p: p[drawn], stacked)
  if per_image:  # per-image weights [B, C, D]; biases [B, 1, D] broadcast over pixels
    projector = jax.tree.map(lambda p: p[:, None] if p.ndim == 2 else p, projector)
  pixels = jnp.concatenate([anchors, pool], axis=1)
  gathered = jnp.take_along_axis(feats.reshape(batch, height * width, channels),
                                 pixels[..., None], axis=1)
  embeddings = project(projector, gathered)
  anchor_emb, pool_emb = jnp.split(embeddings, [cfg.num_anchors], axis=1)

  # One draw of scores for the whole batch: a vmap over per-image keys makes
  # XLA:CPU generate them in a loop.
  positive, negative, valid = match_triplets(
      match_key, pos, neg, strategy=cfg.strategy, anchor_embeddings=anchor_emb,
      pool_embeddings=pool_emb, distance=cfg.distance)
  positive_emb = jnp.take_along_axis(pool_emb, positive[..., None], axis=1)
  negative_emb = jnp.take_along_axis(pool_emb, negative[..., None], axis=1)
  terms = lambda counted: _triplet_terms(anchor_emb, positive_emb, negative_emb, counted,
                                         cfg.margin, cfg.distance)
  if not per_image:
    loss, stats = terms(valid)
    diagnostics = []
    for index in range(len(allowed)):
      is_drawn = drawn == index
      diagnostics.append({'drawn': is_drawn.astype(jnp.float32),
                          'loss': jnp.where(is_drawn, loss, 0.0),
                          **{k: jnp.where(is_drawn, v, 0.0) for k, v in stats.items()}})
    return loss, diagnostics
  valid = valid & has_source[:, None]  # an image without a labelled source has no triplet
  loss, _ = terms(valid)
  diagnostics = []
  for index in range(len(allowed)):
    drew = (drawn == index) & has_source
    counted = valid & drew[:, None]
    source_loss, stats = terms(counted)
    stats['valid'] = jnp.sum(counted) / jnp.maximum(jnp.sum(drew) * cfg.num_anchors, 1)
    diagnostics.append({'drawn': jnp.mean(drew.astype(jnp.float32)), 'loss': source_loss,
                        **stats})
  return loss, diagnostics


class CrossTaskContrastive(nn.Module):
  """The regularizer over a set of target tasks, as a standalone Flax module.

  Params: one projector per allowed (target, source) pair, float32, keyed
  `pair_name(t, s)` = 't<-s', each {'hidden': {'kernel' [C_t, C_t], 'bias'
  [C_t]}, 'output': {'kernel' [C_t, embed_dim], 'bias' [embed_dim]}}. `init`
  creates all of them whatever the draw.

  Only the drawn projector runs. Projectors are 1x1 convs, i.e. per-pixel
  MLPs, so the module gathers the K anchor + M pool pixels first and projects
  only those (B * (K + M) rows instead of B * h * w). The drawn projector's
  weights are picked by index from the target's projectors stacked on a
  leading axis: a single traced program, no per-source branch of the network,
  and the gradient reaches only the drawn projector by construction (the
  others get exactly zero). The positive / negative rule differs per source
  label kind, so it runs under `lax.switch`, which executes only the drawn
  branch.

  Attributes:
    targets: tasks whose decoder features are regularized.
    sources: tasks with labels that may define pairs.
    config: ContrastiveConfig.
  """
  targets: Sequence[str]
  sources: Sequence[str]
  config: ContrastiveConfig = ContrastiveConfig()

  def source_options(self) -> dict[str, tuple[str, ...]]:
    return source_options(self.targets, self.sources, self.config)

  def __call__(self, features: Mapping[str, jax.Array], labels: Mapping[str, jax.Array], rng,
               labelled: Mapping[str, jax.Array] | None = None):
    """`regularize`: the call of a model's own training loop (docs/regularizer.md)."""
    return self.regularize(features, labels, rng, labelled)

  @nn.compact
  def regularize(self, features: Mapping[str, jax.Array], labels: Mapping[str, jax.Array], rng,
                 labelled: Mapping[str, jax.Array] | None = None):
    """Regularizer loss and diagnostics for one training step.

    Args:
      features: target -> decoder features [B, h_t, w_t, C_t] (any float dtype).
      labels: source -> labels per `tasks` conventions, at any resolution
        (resized here by nearest neighbour to each target's h_t, w_t).
      rng: PRNG key of this step; drives the source draws and the sampling.
      labelled: partially annotated batches, source -> bool [B], whether the
        image keeps that task's label. Each image then draws its own source
        among the sources labelled on it (the target's own label is never
        needed), and an image without any contributes no triplet. None (every
        label present): one source per target for the whole batch.
    Returns:
      (loss, diagnostics). loss: mean over targets of the triplet loss (the
      caller multiplies by `config.weight`). diagnostics: flat dict of scalars
      per allowed pair, 't<-s/drawn' (1.0 if t drew s this step, else 0.0;
      with `labelled` the fraction of the images that drew s),
      't<-s/loss', 't<-s/d_ap', 't<-s/d_an' (means over valid triplets),
      't<-s/active' (fraction of valid triplets with a non-zero loss) and
      't<-s/valid' (fraction of anchors that formed a triplet), all over the
      images that drew s. Undrawn pairs report 0 for all but 'drawn'; average
      over steps with 'drawn' as weight.
    """
    for task in (*self.targets, *self.sources):
      tasks.get_task(task)
    losses, diagnostics = [], {}
    for target, allowed in self.source_options().items():
      if target not in features:
        raise ValueError(f"contrastive regularizer: no features for target '{target}'")
      missing = [s for s in allowed if s not in labels]
      if missing:
        raise ValueError(f'contrastive regularizer: no labels for sources {missing}')
      missing = [s for s in allowed if labelled is not None and s not in labelled]
      if missing:
        raise ValueError(f'contrastive regularizer: no labelled masks for sources {missing}')
      feats = features[target].astype(jnp.float32)
      projectors = [self.param(pair_name(target, s), _init_projector, feats.shape[-1],
                               self.config.embed_dim) for s in allowed]
      target_rng = jax.random.fold_in(rng, list(self.targets).index(target))
      loss, per_source = _target_loss(target_rng, feats, labels, allowed, projectors,
                                      self.config, labelled)
      losses.append(loss)
      for source, values in zip(allowed, per_source):
        for key, value in values.items():
          diagnostics[f'{pair_name(target, source)}/{key}'] = value
    return jnp.mean(jnp.stack(losses)), jax.lax.stop_gradient(diagnostics)


class Cmtdp(CrossTaskContrastive):
  """The regularizer behind the registry's common call (`cmtdp_jax.regularizers`):
  it reads the supervised view's features and labels; its parameters are the same."""
  extra_views: ClassVar[int] = 0
  param_key: ClassVar[str] = 'contrastive'  # as before the registry: checkpoints resume

  def __call__(self, views, labelled, rng):  # pylint: disable=arguments-renamed
    return self.regularize(views[0].features, views[0].labels, rng, labelled)
