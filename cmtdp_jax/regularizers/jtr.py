"""JTR: the joint-task regularizer of Nishi et al. (CVPR 2024), as a Flax module.

Ported from KentoNishi/JTR-CVPR-2024: `code/models/nyuv2_segnet_jtr.py`
(`SegNet_JTR`, its network and `compute_losses`), `code/utils/process.py` (the
map transforms, masks and reconstruction losses), `code/utils/gumbel.py` (the
straight-through Gumbel-softmax), `code/train_nyuv2.py` (the per-image loop and
how the terms are weighted), `code/utils/cli.py` (dist_mtl_weight 4,
recon_weight 2) and `code/datasets/nyuv2.py` (views 1 and 2 are random
scale-crops of view 0). The reference is written for NYUv2's three tasks; here
any task set of `tasks.py` is accepted: a categorical task plays semseg's part
(a binary one, with its single logit x, as the two classes [0, x]), depth
depth's and normals normals'.

The network g is MTAN's SegNet layout over the concatenation of every task's
maps: encoder and decoder stages of 3x3 conv (with bias) - BN - ReLU, 2x2
max-pools keeping the argmax and max-unpools to it, then a 3x3 conv and a 1x1
conv back to the concatenated channels (the reconstruction). The last max-pool's
output is the joint latent space. The reference's unused `self.batchnorm` is
not ported. Its BN runs in train mode on one image at a time (the training loop
calls `compute_losses` per image), so each image is normalised with its own
statistics (biased variance, eps 1e-5) and the running statistics are never
read: `ImageNorm` does exactly that, with a learnable scale and bias, and keeps
no batch_stats.

Per image, on the two extra views (views[1], views[2]), with the image's
labelled tasks:
  * the labelled tasks' predictions are detached; the mask is the intersection
    of the labelled tasks' valid masks;
  * Y-hat: every task's prediction, masked: a categorical task as a hard
    (straight-through) Gumbel sample on view 1 and a softmax on view 2, depth
    as Phi(depth * mask) with Phi the N(2.3618, 1.5876) CDF, normals (the
    unit prediction) as (n * mask + 1) / 2;
  * Y: the label where the task is labelled (one-hot with ignored pixels zero,
    Phi(depth), (n + 1) / 2; unmasked), else the prediction as in Y-hat (a
    categorical task as a new hard Gumbel sample on both views);
  * L_dist = (1 - cos(g(Y1), g(Y-hat1))) + recon_weight * (1 - cos(g(Y2), g(Y-hat2))),
    cosine over channels (eps 1e-12, each norm clamped as torch does), mean
    over latent positions. View 1 goes through a frozen copy of the network
    (the reference's `copy.deepcopy(self)`; here its parameters under
    `stop_gradient`), so that term trains the model only; view 2's maps are
    detached, so that term trains the network only;
  * L_recon: the reconstructions of Y2 and Y-hat2 against detached targets,
    summed over tasks: BCE-with-logits (categorical), L1 between
    (sigmoid(r) - 0.5) * (1 - 1e-5) + 0.5 and Phi(target) (depth), and
    1 - sum(unit(r) * target) (normals), each summed over the masked pixels
    and divided by the number of NONZERO elements of the target (over all its
    channels; at least 1), as `_get_detached_and_size` does. The targets are
    the reference's: for Y2 the one-hot label or a new hard Gumbel sample, the
    raw depth label or prediction (Phi applied once, in the loss), the raw
    label or unit prediction; for Y-hat2 a new hard Gumbel sample, the
    already transformed Phi(depth * mask) (Phi applied again in the loss) and
    (n * mask + 1) / 2;
  * loss = sum over images of (dist_weight * L_dist + recon_weight * L_recon) / B.

Gumbel noise: each categorical task takes five independent Gumbel(0, 1) draws
per view pair, in the reference's call order (`GUMBEL_DRAWS`); they are drawn
from `rng`, or passed in as `gumbel_noise` (the parity tests do).

The reference loops over the images; here the batch is processed at once, which
changes nothing (masks, normalisation and Gumbel draws are per image), and the
maps of Y and Y-hat of a view go through the network as one batch. Everything is
computed in float32 (float64 when the predictions are float64, as in the parity
tests). Where this port differs from the reference, only off its normal inputs:
valid masks are `tasks.get_task(t).valid` (the reference tests label != -1 and a
nonzero channel sum: depth > 0 and a normal of squared length > 1e-6 here); unit
vectors floor the norm at 1e-6 (the reference divides by the bare norm).

Parity: tests/test_regularizer_jtr.py against tests/golden/jtr.npz, torch's values
of a transcription of the reference (tests/golden/torch_jtr.py).
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmtdp_jax import tasks as tasks_lib
from cmtdp_jax.models.backbones.segnet import CONV_INIT, max_pool_with_argmax, max_unpool
from cmtdp_jax.regularizers.layers import ImageNorm, cosine_similarity, gumbel_hard

# The normal distribution whose CDF maps depth to [0, 1] (`process.py` `_avg`, `_std`).
DEPTH_MEAN, DEPTH_STD = 2.3618, 1.5876
DEPTH_SQUASH = 1e-5  # (sigmoid(x) - 0.5) * (1 - 1e-5) + 0.5 in get_recon_loss_depth
# A categorical task's Gumbel draws, in the order the reference makes them per image.
GUMBEL_DRAWS = (
    'yhat_view1',         # Y-hat1 (always)
    'y_view1',            # Y1 where the task is unlabelled
    'y_view2',            # Y2 where the task is unlabelled
    'recon_target_y2',    # the target of Y2's reconstruction where unlabelled
    'recon_target_yhat2',  # the target of Y-hat2's reconstruction (always)
)


class JointNetwork(nn.Module):
  """`SegNet_JTR`'s network, NHWC: returns (latent, reconstruction); with
  `encode_only`, (latent, None). One 2x2 pool per entry of `widths`.

  Submodules carry the reference's module paths with '.' as '_'
  ('conv_block_enc.2.1.0' -> 'conv_block_enc_2_1_0', 'pred_layer.1' -> 'pred_layer_1').
  """
  widths: Sequence[int]
  out_channels: int

  def _conv_layer(self, x, features: int, name: str):
    x = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), kernel_init=CONV_INIT,
                name=f'{name}_0')(x)
    return nn.relu(ImageNorm(name=f'{name}_1')(x))

  def _conv_block(self, x, features: int, name: str, stage: int):
    if stage < 2:
      return self._conv_layer(x, features, name)
    for i in range(2):
      x = self._conv_layer(x, features, f'{name}_{i}')
    return x

  @nn.compact
  def __call__(self, x, encode_only: bool = False):
    argmaxes = []
    for stage, features in enumerate(self.widths):
      x = self._conv_layer(x, features, f'encoder_block_{stage}')
      x = self._conv_block(x, features, f'conv_block_enc_{stage}', stage)
      x, argmax = max_pool_with_argmax(x)
      argmaxes.append(argmax)
    latent = x
    if encode_only:
      return latent, None
    for stage in reversed(range(len(self.widths))):
      features = self.widths[max(stage - 1, 0)]
      x = max_unpool(x, argmaxes[stage])
      x = self._conv_layer(x, features, f'decoder_block_{stage}')
      x = self._conv_block(x, features, f'conv_block_dec_{stage}', stage)
    x = nn.Conv(self.widths[0], (3, 3), padding=((1, 1), (1, 1)), kernel_init=CONV_INIT,
                name='pred_layer_0')(x)
    x = nn.Conv(self.out_channels, (1, 1), kernel_init=CONV_INIT, name='pred_layer_1')(x)
    return latent, x


def depth_cdf(x):
  """`process._transform`: the N(2.3618, 1.5876) CDF, written as torch's Normal.cdf."""
  return 0.5 * (1.0 + jax.scipy.special.erf(
      (x - DEPTH_MEAN) * (1.0 / DEPTH_STD) / math.sqrt(2.0)))


def _per_image(x, labelled_b):
  """`labelled_b` [B] broadcast against `x` [B, ...]."""
  return labelled_b.reshape(labelled_b.shape + (1,) * (x.ndim - 1))


def _detach_where(labelled_b, x):
  """x detached on the images where the task is labelled."""
  return jnp.where(_per_image(x, labelled_b), jax.lax.stop_gradient(x), x)


def _nonzero_count(target):
  """Per image: nonzero elements of the target over all its channels, at least 1."""
  return jnp.maximum(jnp.sum((target != 0).astype(target.dtype), axis=(1, 2, 3)), 1.0)


def _binary_cross_entropy_with_logits(logits, targets):
  return (jnp.maximum(logits, 0.0) - logits * targets
          + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def recon_loss_categorical(recon, target, mask):
  """`get_recon_loss_seg` per image ([B]); `target` is detached here."""
  target = jax.lax.stop_gradient(target)
  loss = _binary_cross_entropy_with_logits(recon, target) * mask
  return jnp.sum(loss, axis=(1, 2, 3)) / _nonzero_count(target)


def recon_loss_depth(recon, target, mask):
  """`get_recon_loss_depth` per image: the target goes through Phi here."""
  target = jax.lax.stop_gradient(target)
  squashed = (jax.nn.sigmoid(recon) - 0.5) * (1.0 - DEPTH_SQUASH) + 0.5
  loss = jnp.abs(squashed - depth_cdf(target)) * mask
  return jnp.sum(loss, axis=(1, 2, 3)) / _nonzero_count(target)


def recon_loss_normals(recon, target, mask):
  """`get_recon_loss_normal` per image."""
  target = jax.lax.stop_gradient(target)
  dot = tasks_lib.unit_vectors(recon) * target * mask
  return 1.0 - jnp.sum(dot, axis=(1, 2, 3)) / _nonzero_count(target)


RECON_LOSSES = {tasks_lib.CATEGORICAL: recon_loss_categorical,
                tasks_lib.DEPTH: recon_loss_depth,
                tasks_lib.NORMALS: recon_loss_normals}


def task_maps(kind: str, raw, label, dtype):
  """(prediction map, label map) of one task, NHWC in `dtype`: categorical: logits and
  one-hot labels, ignored pixels all zero ([0, x] and 2 classes for a binary task);
  depth: metres [.., 1]; normals: the unit prediction and the label."""
  raw = raw.astype(dtype)
  if kind == tasks_lib.CATEGORICAL:
    if raw.shape[-1] == 1:
      raw = jnp.concatenate([jnp.zeros_like(raw), raw], axis=-1)
    # jax.nn.one_hot maps the ignore label (out of range) to all zeros.
    return raw, jax.nn.one_hot(label, raw.shape[-1], dtype=dtype)
  if kind == tasks_lib.DEPTH:
    return raw[..., :1], label.astype(dtype)[..., None]
  if kind == tasks_lib.NORMALS:
    return tasks_lib.unit_vectors(raw), label.astype(dtype)
  raise ValueError(f"JTR: unknown label kind '{kind}'")


class JTR(nn.Module):
  """JTR's joint-task regularizer (module docstring).

  Attributes:
    tasks: the tasks' names, in the order their maps are concatenated.
    input_channels: each task's channels in the joint space: a categorical task's
      classes (2 for a binary one), 1 for depth, 3 for normals.
    widths: the network's stage widths (SegNet's by default; one 2x2 pool each, so
      the views' height and width must be multiples of 2 ** len(widths)).
    dist_weight: dist_mtl_weight, the weight of L_dist.
    recon_weight: the weight of L_recon, and of view 2's distance inside L_dist
      (the reference passes its recon_weight as `recon_dist_weight`).
  """
  tasks: tuple[str, ...]
  input_channels: tuple[int, ...]
  widths: tuple[int, ...] = (64, 128, 256, 512, 512)
  dist_weight: float = 4.0
  recon_weight: float = 2.0
  extra_views: ClassVar[int] = 2
  param_key: ClassVar[str] = 'jtr'

  def _check(self, views):
    if len(self.tasks) != len(self.input_channels):
      raise ValueError(f'JTR: {len(self.tasks)} tasks {self.tasks} but '
                       f'{len(self.input_channels)} input_channels {self.input_channels}')
    if len(views) < 1 + self.extra_views:
      raise ValueError(f'JTR needs {1 + self.extra_views} views (the supervised one and '
                       f'{self.extra_views} extra), got {len(views)}')
    height, width = views[1].predictions[self.tasks[0]].shape[1:3]
    size = 2 ** len(self.widths)
    if height % size or width % size:
      raise ValueError(f'JTR: view size {height}x{width} must be divisible by {size} '
                       f'(its network has {len(self.widths)} 2x2 max-pools)')

  def _noise(self, rng, gumbel_noise, task, index, shape, dtype):
    """[len(GUMBEL_DRAWS), B, H, W, C] Gumbel(0, 1) draws of a categorical task."""
    shape = (len(GUMBEL_DRAWS),) + tuple(shape)
    if gumbel_noise is not None:
      noise = jnp.asarray(gumbel_noise[task], dtype)
      if noise.shape != shape:
        raise ValueError(f"JTR: gumbel_noise['{task}'] has shape {noise.shape}, "
                         f'want {shape}')
      return noise
    return jax.random.gumbel(jax.random.fold_in(rng, index), shape, dtype)

  @nn.compact
  def __call__(self, views, labelled, rng, gumbel_noise: Mapping[str, Any] | None = None):
    """(loss, diagnostics) of views[1] and views[2].

    labelled: {task: bool [B]}, which images keep each task's label, or None (all).
    rng: key of the Gumbel draws (unused when `gumbel_noise` gives them:
      {categorical task: [5, B, H, W, C]} in `GUMBEL_DRAWS` order).
    diagnostics: batch means of L_dist and L_recon ('dist', 'recon') and of the two
      view distances inside L_dist, unweighted ('dist_view1', 'dist_view2').
    """
    self._check(views)
    batch = views[1].predictions[self.tasks[0]].shape[0]
    # float32, or float64 when the predictions are (the parity tests run both).
    dtype = functools.reduce(jnp.promote_types, [
        views[v].predictions[t].dtype for v in (1, 2) for t in self.tasks], jnp.float32)
    y1, yhat1, y2, yhat2 = [], [], [], []
    recon_terms = []  # (kind, Y2 target, Y-hat2 target) per task
    prepared = []  # (task, kind, labelled [B], ((prediction, label map) per view))
    masks = [jnp.ones(views[v].predictions[self.tasks[0]].shape[:3] + (1,), dtype)
             for v in (1, 2)]
    for task, channels in zip(self.tasks, self.input_channels):
      spec = tasks_lib.get_task(task)
      kept = (jnp.ones((batch,), bool) if labelled is None
              else jnp.asarray(labelled[task]).astype(bool))
      maps = []
      for v, view in enumerate((views[1], views[2])):
        pred, label_map = task_maps(spec.label_kind, view.predictions[task], view.labels[task],
                                    dtype)
        if pred.shape[-1] != channels:
          raise ValueError(f"JTR: task '{task}' has {pred.shape[-1]} channels in the joint "
                           f'space, input_channels says {channels}')
        maps.append((_detach_where(kept, pred), label_map))
        # The mask: the intersection of the labelled tasks' valid masks.
        valid = spec.valid(view.labels[task])[..., None]
        masks[v] = masks[v] * jnp.where(_per_image(valid, kept), valid, True)
      prepared.append((task, spec.label_kind, kept, maps))
    mask1, mask2 = masks

    for index, (task, kind, kept, maps) in enumerate(prepared):
      (pred1, label1), (pred2, label2) = maps
      lab1, lab2 = _per_image(pred1, kept), _per_image(pred2, kept)
      if kind == tasks_lib.CATEGORICAL:
        noise = self._noise(rng, gumbel_noise, task, index, pred1.shape, dtype)
        yhat1.append(gumbel_hard(pred1, noise[0]) * mask1)
        y1.append(jnp.where(lab1, label1, gumbel_hard(pred1, noise[1]) * mask1))
        yhat2.append(jax.nn.softmax(pred2, axis=-1) * mask2)
        y2.append(jnp.where(lab2, label2, gumbel_hard(pred2, noise[2]) * mask2))
        recon_terms.append((kind,
                            jnp.where(lab2, label2, gumbel_hard(pred2, noise[3]) * mask2),
                            gumbel_hard(pred2, noise[4]) * mask2))
      elif kind == tasks_lib.DEPTH:
        yhat1.append(depth_cdf(pred1 * mask1))
        y1.append(jnp.where(lab1, depth_cdf(label1), depth_cdf(pred1 * mask1)))
        yhat2.append(depth_cdf(pred2 * mask2))
        y2.append(jnp.where(lab2, depth_cdf(label2), depth_cdf(pred2 * mask2)))
        recon_terms.append((kind, jnp.where(lab2, label2, pred2), depth_cdf(pred2 * mask2)))
      else:
        yhat1.append((pred1 * mask1 + 1.0) / 2.0)
        y1.append(jnp.where(lab1, (label1 + 1.0) / 2.0, (pred1 * mask1 + 1.0) / 2.0))
        yhat2.append((pred2 * mask2 + 1.0) / 2.0)
        y2.append(jnp.where(lab2, (label2 + 1.0) / 2.0, (pred2 * mask2 + 1.0) / 2.0))
        recon_terms.append((kind, jnp.where(lab2, label2, pred2), (pred2 * mask2 + 1.0) / 2.0))

    cat = lambda maps: jnp.concatenate(maps, axis=-1)
    network = JointNetwork(tuple(self.widths), sum(self.input_channels), name='network')
    # View 2 trains the network only: its maps are detached. Y2 and Y-hat2 go through
    # it as one batch (its normalisation is per image, so this changes nothing).
    latent2, recon = network(jax.lax.stop_gradient(
        jnp.concatenate([cat(y2), cat(yhat2)], axis=0)))
    # View 1 trains the model only: the network's parameters under stop_gradient
    # stand for the reference's frozen deep copy.
    frozen = jax.lax.stop_gradient(network.variables['params'])
    latent1, _ = JointNetwork(tuple(self.widths), sum(self.input_channels), parent=None).apply(
        {'params': frozen}, jnp.concatenate([cat(y1), cat(yhat1)], axis=0), encode_only=True)

    def distance(latent):
      cos = cosine_similarity(latent[:batch], latent[batch:])
      return 1.0 - jnp.mean(cos, axis=(1, 2))
    dist_view1, dist_view2 = distance(latent1), distance(latent2)
    dist = dist_view1 + self.recon_weight * dist_view2

    recon_y2, recon_yhat2 = recon[:batch], recon[batch:]
    recon_loss = jnp.zeros((batch,), dtype)
    start = 0
    for (kind, target_y2, target_yhat2), channels in zip(recon_terms, self.input_channels):
      part = slice(start, start + channels)
      start += channels
      loss_fn = RECON_LOSSES[kind]
      recon_loss = (recon_loss + loss_fn(recon_y2[..., part], target_y2, mask2)
                    + loss_fn(recon_yhat2[..., part], target_yhat2, mask2))

    loss = jnp.sum(self.dist_weight * dist + self.recon_weight * recon_loss) / batch
    diagnostics = {'dist': jnp.mean(dist), 'recon': jnp.mean(recon_loss),
                   'dist_view1': jnp.mean(dist_view1), 'dist_view2': jnp.mean(dist_view2)}
    return loss, {k: v.astype(jnp.float32) for k, v in diagnostics.items()}
