"""MTPSL's cross-task consistency regularizer (Li, Liu, Bilen, CVPR 2022).

Ported from VICO-UoE/MTPSL: `model/mapfns.py` (`Mapfns`, `SegNet_enc`,
`conv_task`), its call in the training loop `nyu_mtl_xtc.py` and the pair code
global of `model/config_task.py`.

On the second augmented view of each image (`views[1]`), every ordered task
pair (s, t), s != t, with s unlabelled and t labelled on that image (with
`labelled=None`, MTPSL's 'full' setting: every ordered pair) maps s's
prediction and t's label through one mapping network conditioned on the pair;
the two maps must agree (cosine), and each must stay close to the model's
bottleneck f of that image, which receives no gradient:

  pair loss = (1 - cos(map_s, map_t)) + reg_weight [(1 - cos(map_s, f)) + (1 - cos(map_t, f))]

cosines over channels, averaged over positions. The loss of a batch is the sum
over its images of the sum over their pairs, over the batch size (the training
loop adds `con_loss * con_weight / len(image_index)` per image, con_weight 2.0
outside this module).

Maps given to the network (`Mapfns.pre_process_pred` / `pre_process_gt`):
  categorical  prediction: a hard Gumbel-softmax sample of the logits (tau 1,
               straight-through: the forward value is one-hot, the gradient
               the soft sample's), drawn anew for every pair; label: one-hot,
               all zeros where ignored (255 here, -1 in MTPSL). A binary task
               (edge, sal: one logit x) is the 2-class case with logits [0, x].
  depth        prediction and label each divided by their maximum over the
               image + 1e-12.
  normals      (n + 1) / 2. MTPSL's model L2-normalises its normals output
               itself; ours returns raw normals, so the prediction is first
               made unit length (`tasks.unit_vectors`).

The mapping network (`SegNet_enc`) is a per-task input conv3x3-BN-ReLU to
widths[0], then SegNet's encoder (per stage an `encoder_block` conv and one
(first two stages) or two (later stages) `conv_block_enc` convs, then a 2x2
max-pool) where every conv is a `conv_task`: conv3x3 with bias, BN, FiLM with
the pair's row of a [T(T-1), C] gamma / beta table, ReLU. The output is the
last max-pool, so its size and width must be the bottleneck's. Its convolutions are
`layers.Conv3x3`: nn.Conv's value and parameters, with a cheaper kernel gradient on CPU.

BatchNorm: MTPSL only runs the network in train mode, one image at a time, so
every BN normalises with the statistics of the one image it sees (biased
variance, eps 1e-5) and its running statistics are never read. Here it is that
normalisation with a learnable scale and bias (`ImageNorm`) and no batch_stats.

Pair code: `A_taskpair`, a one-hot over the T(T-1) ordered pairs, is built by
flattening the T x T one-hot of (s, t) minus its diagonal, row by row, so the
pair (s, t) has index s (T - 1) + t - [t > s] (`pair_index`).

Static shapes: an image with l of its T labels has l (T - l) active pairs, at
most floor(T^2 / 4), so with `labelled` given each image sends its active pairs
(in pair order) and fills the rest of floor(T^2 / 4) slots with inactive ones,
which are masked out: B * 2 * floor(T^2 / 4) network inputs in one batch, 9
rather than 30 pairs with six tasks (`pair_slots`). When no image keeps more
than `max_labels` labels (one-label training: 1), the slots shrink to the most
active pairs such an image has, T - 1 for one label: MTPSL's own cost, which
runs an image's active pairs only. With `labelled=None` every pair is active and
all T (T - 1) run. The Gumbel noise is drawn from `rng` unless given
(`gumbel_noise`, for parity tests), per source task and target, so which slots
run changes no draw. A categorical prediction goes through its input layer once
per pair it can be the source of in an image (`source_draws`): T - 1 times, or
`max_labels` times (the pairs' targets are labelled), so once in one-label
training. An image with more than `max_labels` labels makes the loss NaN (the
train step skips a non-finite step and counts it), never a loss over fewer
pairs or reused draws.

Parameters follow MTPSL's module paths with indices glued by '_'
('mapfns.conv_block_enc.2.1.bn.weight' -> conv_block_enc_2_1/bn/scale,
'mapfns.encoder_block.0.gamma' [C, P] -> encoder_block_0/film/gamma [P, C]).
The FiLM tables have their own optimizer in MTPSL (Adam, lr 1e-3):
`film_params` tells them apart.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmtdp_jax import tasks as tasks_lib
from cmtdp_jax.models.backbones.segnet import CONV_INIT, max_pool_with_argmax
from cmtdp_jax.regularizers.layers import Conv3x3, ImageNorm, cosine_similarity, gumbel_hard
DEPTH_EPSILON = 1e-12  # pre_process_pred / pre_process_gt: x / (x.max() + 1e-12)
FILM = 'film'  # the submodule holding a conv_task's gamma and beta tables

# How a task's maps enter the network (registry kinds, a binary categorical split out).
CATEGORICAL, BINARY, DEPTH, NORMALS = 'categorical', 'binary', 'depth', 'normals'


def input_kind(task: str) -> str:
  """'categorical', 'binary' (a categorical task with one logit), 'depth' or 'normals'."""
  spec = tasks_lib.get_task(task)
  if spec.label_kind == tasks_lib.CATEGORICAL:
    return BINARY if spec.channels == 1 else CATEGORICAL
  if spec.label_kind in (tasks_lib.DEPTH, tasks_lib.NORMALS):
    return spec.label_kind
  raise ValueError(f"mtpsl: task '{task}' has label kind '{spec.label_kind}', which it cannot map")


def num_pairs(num_tasks: int) -> int:
  return num_tasks * (num_tasks - 1)


def pair_index(source: int, target: int, num_tasks: int) -> int:
  """Row of the ordered pair (source, target) in the FiLM tables: where MTPSL's
  `A_taskpair.flatten()[:-1].view(n-1, n+1)[:, 1:].flatten()` puts the one of
  the one-hot (s, t) matrix (row-major order with the diagonal left out)."""
  if source == target or not (0 <= source < num_tasks and 0 <= target < num_tasks):
    raise ValueError(f'no pair ({source}, {target}) among {num_tasks} tasks')
  return source * (num_tasks - 1) + target - int(target > source)


def ordered_pairs(num_tasks: int) -> tuple[tuple[int, int], ...]:
  """All (source, target) pairs, source != target, in pair-index order."""
  return tuple((s, t) for s in range(num_tasks) for t in range(num_tasks) if s != t)


def pair_slots(num_tasks: int, partial: bool, max_labels: int | None = None) -> int:
  """Pairs each image sends through the network: l (T - l) are active when it keeps l of
  its T labels (`partial`), the most over l <= `max_labels` (None: any l, floor(T^2 / 4));
  all T (T - 1) otherwise."""
  if not partial:
    return num_pairs(num_tasks)
  most = num_tasks if max_labels is None else min(max_labels, num_tasks)
  return max(kept * (num_tasks - kept) for kept in range(most + 1))


def source_draws(num_tasks: int, partial: bool, max_labels: int | None = None) -> int:
  """Gumbel draws of a categorical prediction that each image maps: one per active pair the
  task is the source of, so at most one per other task, and at most `max_labels` when no
  image keeps more labels (a pair's target is labelled)."""
  if partial and max_labels is not None:
    return min(max_labels, num_tasks - 1)
  return num_tasks - 1


def take_per_image(x, index):
  """x[b, index[b, k]] as [B, K, ...] from x [B, N, ...] and index [B, K]."""
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def film_params(path) -> bool:
  """Whether a parameter path under params['mtpsl'] (a tuple of names, or of JAX
  tree path entries) is a FiLM gamma / beta table: MTPSL trains those with their
  own Adam (lr 1e-3), the rest of the mapping network with the model's optimizer."""
  names = tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)
  return len(names) >= 2 and names[-2] == FILM and names[-1] in ('gamma', 'beta')


class FiLM(nn.Module):
  """x * gamma[pair] + beta[pair], one row of each [num_pairs, C] table per image."""
  num_pairs: int

  @nn.compact
  def __call__(self, x, pair):
    channels = x.shape[-1]
    gamma = self.param('gamma', nn.initializers.ones, (self.num_pairs, channels), jnp.float32)
    beta = self.param('beta', nn.initializers.zeros, (self.num_pairs, channels), jnp.float32)
    return x * gamma[pair][:, None, None, :] + beta[pair][:, None, None, :]


class ConvTask(nn.Module):
  """MTPSL's `conv_task`: conv3x3 (bias) -> per-image BN -> pair FiLM -> ReLU."""
  features: int
  num_pairs: int

  @nn.compact
  def __call__(self, x, pair):
    x = Conv3x3(self.features, kernel_init=CONV_INIT, name='conv')(x)
    x = ImageNorm(name='bn')(x)
    return nn.relu(FiLM(self.num_pairs, name=FILM)(x, pair))


class MTPSL(nn.Module):
  """MTPSL's mapping network and consistency loss (module docstring).

  Attributes:
    tasks: the task order; it fixes the pair code and the input convs' indices.
    input_channels: per task, the channels of its maps: classes (2 for a binary
      categorical task), 1 for depth, 3 for normals.
    widths: the encoder's stage widths, one 2x2 max-pool each; the last is the
      bottleneck's width (MTAN's SegNet: 64-128-256-512-512).
    reg_weight: weight of the two terms tying the maps to the bottleneck.
    max_labels: the most labels any image of a partially labelled batch keeps
      (`label_mapping.most_labels`), which bounds the pair slots; None: any number.
  """
  tasks: tuple[str, ...]
  input_channels: tuple[int, ...]
  widths: tuple[int, ...] = (64, 128, 256, 512, 512)
  reg_weight: float = 0.5
  max_labels: int | None = None
  extra_views: ClassVar[int] = 1
  param_key: ClassVar[str] = 'mtpsl'

  def __post_init__(self):
    if len(self.tasks) < 2:
      raise ValueError(f'mtpsl needs at least two tasks, got {tuple(self.tasks)}')
    if len(self.input_channels) != len(self.tasks):
      raise ValueError(f'mtpsl: {len(self.input_channels)} input_channels for '
                       f'{len(self.tasks)} tasks {tuple(self.tasks)}')
    if not self.widths:
      raise ValueError('mtpsl widths must not be empty')
    if self.max_labels is not None and self.max_labels < 1:
      raise ValueError(f'mtpsl max_labels must be >= 1 or None, got {self.max_labels}')
    fixed = {BINARY: 2, DEPTH: 1, NORMALS: 3}
    for task, channels in zip(self.tasks, self.input_channels):
      kind = input_kind(task)
      if kind in fixed and channels != fixed[kind]:
        raise ValueError(f"mtpsl: task '{task}' ({kind}) has {fixed[kind]} input channels, "
                         f'not {channels}')
    super().__post_init__()

  @property
  def num_pairs(self) -> int:
    return num_pairs(len(self.tasks))

  def gumbel_noise_shapes(self, batch: int, height: int, width: int) -> dict[str, tuple]:
    """Shapes of the Gumbel draws `__call__` takes: one [B, T-1, H, W, classes] per
    categorical task, slot j of axis 1 for its j-th target (the j-th other task in
    task order, i.e. pair index s (T - 1) + j)."""
    others = len(self.tasks) - 1
    return {task: (batch, others, height, width, channels)
            for task, channels in zip(self.tasks, self.input_channels)
            if input_kind(task) in (CATEGORICAL, BINARY)}

  def _source_maps(self, task: str, prediction, noise):
    """[B, n, H, W, C] maps of a prediction: one per draw in `noise` [B, n, H, W, C] for a
    categorical task, else n = 1."""
    kind = input_kind(task)
    if kind in (CATEGORICAL, BINARY):
      logits = prediction
      if kind == BINARY:
        logits = jnp.concatenate([jnp.zeros_like(prediction), prediction], axis=-1)
      return gumbel_hard(logits[:, None], noise)
    if kind == DEPTH:
      top = jnp.max(prediction, axis=(1, 2, 3), keepdims=True)
      return (prediction / (top + DEPTH_EPSILON))[:, None]
    return ((tasks_lib.unit_vectors(prediction) + 1.0) / 2.0)[:, None]

  def _target_maps(self, task: str, labels, channels: int, dtype):
    """[B, H, W, C] maps of labels (no gradient reaches anything through them)."""
    kind = input_kind(task)
    if kind in (CATEGORICAL, BINARY):  # 255 (and anything out of range): all zeros
      return jax.nn.one_hot(labels, channels, dtype=dtype)
    labels = jnp.asarray(labels).astype(dtype)
    if kind == DEPTH:
      labels = labels[..., None]
      return labels / (jnp.max(labels, axis=(1, 2, 3), keepdims=True) + DEPTH_EPSILON)
    return (labels + 1.0) / 2.0

  def _check(self, view, batch, height, width):
    for task, channels in zip(self.tasks, self.input_channels):
      got = view.predictions[task].shape
      want = 1 if input_kind(task) == BINARY else channels
      if got[:3] != (batch, height, width) or got[3] != want:
        raise ValueError(f"mtpsl: prediction of '{task}' has shape {got}, expected "
                         f'({batch}, {height}, {width}, {want})')
    stride = 2 ** len(self.widths)
    if height % stride or width % stride:
      raise ValueError(f'mtpsl: input {height}x{width} must be divisible by {stride} '
                       f'({len(self.widths)} 2x2 max-pools, one per width)')
    if view.bottleneck is None:
      raise ValueError("mtpsl needs the model's bottleneck (View.bottleneck is None)")
    want = (batch, height // stride, width // stride, self.widths[-1])
    if tuple(view.bottleneck.shape) != want:
      raise ValueError(f'mtpsl: the mapping network ends at {want[1:]} (widths '
                       f'{tuple(self.widths)}), the bottleneck is '
                       f'{tuple(view.bottleneck.shape)[1:]}')

  @nn.compact
  def __call__(self, views, labelled, rng, gumbel_noise: Mapping[str, Any] | None = None):
    """(loss, diagnostics) of the second view, `views[1]`.

    Args:
      views: tuple of `views.View`; only views[1] is read.
      labelled: {task: bool [B]}, which images keep each task's label, or None
        (every label: all ordered pairs, MTPSL's 'full').
      rng: PRNG key of the Gumbel draws (unused when `gumbel_noise` is given).
      gumbel_noise: optional fixed draws, {task: array of `gumbel_noise_shapes`}.

    Returns:
      loss: sum over images and their active pairs of the pair loss, over B; NaN when
        an image keeps more than `max_labels` labels.
      diagnostics: float32 scalars 'pairs' (active pairs per image), 'consistency'
        (mean 1 - cos(map_s, map_t) over active pairs) and 'regularization' (mean
        of (1 - cos(map_s, f)) + (1 - cos(map_t, f)) over them).
    """
    view = views[1]
    num_tasks, num_p = len(self.tasks), self.num_pairs
    pairs = ordered_pairs(num_tasks)
    batch, height, width = view.predictions[self.tasks[0]].shape[:3]
    self._check(view, batch, height, width)
    # float32, or float64 where the predictions are (under jax_enable_x64: parity checks).
    dtype = jnp.promote_types(
        jnp.result_type(*(view.predictions[task] for task in self.tasks)), jnp.float32)
    if gumbel_noise is None:
      gumbel_noise = {
          task: jax.random.gumbel(jax.random.fold_in(rng, index), shape, dtype)
          for index, (task, shape) in enumerate(
              self.gumbel_noise_shapes(batch, height, width).items())}

    # Per-task input layers, shared by a task's predictions (as source) and labels (as target).
    first = self.widths[0]
    input_layers = [
        (Conv3x3(first, kernel_init=CONV_INIT, name=f'pred_encoder_source_{i}_0'),
         ImageNorm(name=f'pred_encoder_source_{i}_1'))
        for i in range(num_tasks)]

    def input_layer(index, maps):
      conv, norm = input_layers[index]
      lead = maps.shape[:-3]
      x = maps.reshape((-1,) + maps.shape[-3:])
      x = nn.relu(norm(conv(x)))
      return x.reshape(lead + x.shape[1:])

    pair_source = jnp.array([s for s, _ in pairs], jnp.int32)
    pair_target = jnp.array([t for _, t in pairs], jnp.int32)
    overflow = False  # an image over `max_labels`: too few slots and draws for its pairs
    if labelled is None:  # MTPSL's 'full': every pair of every image
      active = jnp.ones((batch, num_p), bool)
    else:
      kept = jnp.stack([jnp.asarray(labelled[task]).astype(bool) for task in self.tasks], axis=1)
      active = ~kept[:, pair_source] & kept[:, pair_target]  # [B, P]
      if self.max_labels is not None:
        overflow = jnp.any(jnp.sum(kept, axis=1) > self.max_labels)
    # A source task's prediction needs one draw per active pair it is in: its first `draws`
    # active targets' draws (in target order) are the only ones mapped.
    draws = source_draws(num_tasks, labelled is not None, self.max_labels)
    by_source = active.reshape(batch, num_tasks, num_tasks - 1)  # [B, s, j]
    drawn = jnp.argsort(~by_source, axis=2, stable=True)[..., :draws]  # [B, T, draws]: the j's
    rank = jnp.clip(jnp.cumsum(by_source, axis=2) - 1, 0, draws - 1)  # [B, s, j]: its draw

    sources = []  # [B, draws (categorical) or 1, H, W, C0] per source task
    targets = []  # [B, H, W, C0] per target task
    rows = []  # [B, T-1] per source task: its pairs' rows in the concatenated sources
    for index, (task, channels) in enumerate(zip(self.tasks, self.input_channels)):
      prediction = jnp.asarray(view.predictions[task], dtype)
      offset = sum(mapped.shape[1] for mapped in sources)  # rows before this task
      noise = None
      if input_kind(task) in (CATEGORICAL, BINARY):
        noise = take_per_image(gumbel_noise[task], drawn[:, index])
        rows.append(offset + rank[:, index])
      else:  # one map, whatever the target
        rows.append(jnp.full_like(rank[:, index], offset))
      sources.append(input_layer(index, self._source_maps(task, prediction, noise)))
      targets.append(input_layer(index, self._target_maps(task, view.labels[task], channels,
                                                          dtype)))
    source = jnp.concatenate(sources, axis=1)  # [B, R, H, W, C0]
    target = jnp.stack(targets, axis=1)  # [B, T, H, W, C0]
    source_row = jnp.concatenate(rows, axis=1)  # [B, P], pair order

    # Each image's active pairs first, in pair order, then inactive ones to fill its slots.
    slots = pair_slots(num_tasks, labelled is not None, self.max_labels)
    pair = jnp.argsort(~active, axis=1, stable=True)[:, :slots].astype(jnp.int32)  # [B, K]
    active = jnp.take_along_axis(active, pair, axis=1)

    # The shared, pair-conditioned encoder on all B * 2 * K inputs at once; BN per input.
    x = jnp.stack([take_per_image(source, jnp.take_along_axis(source_row, pair, axis=1)),
                   take_per_image(target, pair_target[pair])], axis=1)  # [B, 2, K, H, W, C0]
    x = x.reshape((batch * 2 * slots,) + x.shape[3:])
    codes = jnp.broadcast_to(pair[:, None], (batch, 2, slots)).reshape(-1)
    for stage, features in enumerate(self.widths):
      x = ConvTask(features, num_p, name=f'encoder_block_{stage}')(x, codes)
      if stage < 2:
        x = ConvTask(features, num_p, name=f'conv_block_enc_{stage}')(x, codes)
      else:
        for j in range(2):
          x = ConvTask(features, num_p, name=f'conv_block_enc_{stage}_{j}')(x, codes)
      x = max_pool_with_argmax(x)[0]
    maps = x.reshape((batch, 2, slots) + x.shape[1:])
    map_s, map_t = maps[:, 0], maps[:, 1]  # [B, K, h, w, C]
    feature = jax.lax.stop_gradient(jnp.asarray(view.bottleneck, dtype))[:, None]

    def distance(a, b):  # 1 - the mean over positions of the cosine: [B, K]
      return 1.0 - jnp.mean(cosine_similarity(a, b), axis=(2, 3))

    consistency = distance(map_s, map_t)
    regularization = distance(map_s, feature) + distance(map_t, feature)
    pair_loss = consistency + self.reg_weight * regularization if self.reg_weight > 0 \
        else consistency
    loss = jnp.sum(jnp.where(active, pair_loss, 0.0)) / batch
    loss = jnp.where(overflow, jnp.nan, loss)
    count = jnp.sum(active.astype(dtype))
    per_pair = jnp.maximum(count, 1.0)
    diagnostics = {
        'pairs': count / batch,
        'consistency': jnp.sum(jnp.where(active, consistency, 0.0)) / per_pair,
        'regularization': jnp.sum(jnp.where(active, regularization, 0.0)) / per_pair,
    }
    return loss, {k: jax.lax.stop_gradient(v).astype(jnp.float32) for k, v in diagnostics.items()}
