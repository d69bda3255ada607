"""Registry of dense prediction tasks.

One entry per task says everything the rest of the code needs to know about it:
how many output channels the model predicts, its labels' dtype and which label
pixels are valid, the training loss (SPEC section 3), how raw outputs decode into
task space, which metric scores it (and its primary key, and whether lower is
better), and how to colour a map for visualisation. The task list is written
once, here (`ALL`). Models, losses, the data pipeline, the contrastive
regularizer and the evaluators look tasks up here instead of branching on task
names; a dataset says how many classes its categorical tasks have.

Label conventions (one image: drop the leading batch axis):
  semseg, human_parts, sal, edge: int32 [B, H, W], 255 = ignore.
  depth:                          float32 [B, H, W] metres, 0 = invalid.
  normals:                        float32 [B, H, W, 3] unit vectors, 0 = invalid.
Raw model outputs are [B, H, W, channels]; `decode` maps them to task space:
class ids [B, H, W], metres [B, H, W], unit normals [B, H, W, 3], or
probabilities in [0, 1] [B, H, W] for sal and edge.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_LABEL = 255

CATEGORICAL, DEPTH, NORMALS = 'categorical', 'depth', 'normals'


def _masked_mean(values, mask):
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _cross_entropy(logits, labels, valid, options):
  del options
  logits = logits.astype(jnp.float32)
  safe = jnp.where(valid, labels, 0)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return _masked_mean(nll, valid)


def _weighted_bce(logits, labels, valid, pos_weight):
  """Mean over valid pixels of w*y*-log(p) + (1-w)*(1-y)*-log(1-p)."""
  x = logits[..., 0].astype(jnp.float32)
  y = (labels == 1).astype(jnp.float32)
  per_pixel = (pos_weight * y * -jax.nn.log_sigmoid(x) +
               (1.0 - pos_weight) * (1.0 - y) * -jax.nn.log_sigmoid(-x))
  return _masked_mean(per_pixel, valid)


def _balanced_bce(logits, labels, valid, options):
  """Class-balanced BCE: positives weighted by the batch's negative fraction.

  With `pos_weight` set in the options (edge: 0.95 PASCAL, 0.8 NYUD) the
  weight is that constant instead, as in ATRC.
  """
  pos_weight = options.get('pos_weight')
  if pos_weight is None:
    validf = valid.astype(jnp.float32)
    positives = jnp.sum((labels == 1) * validf)
    pos_weight = 1.0 - positives / jnp.maximum(jnp.sum(validf), 1.0)
    pos_weight = jax.lax.stop_gradient(pos_weight)
  return _weighted_bce(logits, labels, valid, pos_weight)


def _depth_l1(pred, labels, valid, options):
  del options
  return _masked_mean(jnp.abs(pred[..., 0].astype(jnp.float32) - labels), valid)


# How the normals L1 is reduced (`loss_options.normals.reduction`):
#   'pixel_sum'    sum of |unit(pred) - label| over the 3 channels, averaged over valid pixels:
#                  ATRC's and InvPT's L1Loss(normalize=True) (brdav/atrc src/model/criterion.py,
#                  prismformore/Multi-Task-Transformer InvPT/losses/loss_functions.py: an [N,1,H,W] mask
#                  of valid pixels broadcast over the channels by masked_select, divided by its sum).
#   'element_mean' the same sum divided by 3 valid elements per pixel: Multi-Task-Learning-PyTorch's
#                  NormalsLoss (SimonVandenhende/Multi-Task-Learning-PyTorch losses/loss_functions.py).
NORMALS_REDUCTIONS = {'pixel_sum': 1.0, 'element_mean': 1.0 / 3.0}


def _normals_l1(pred, labels, valid, options):
  """L1 between the L2-normalised prediction and the label, reduced as
  `options['reduction']` says (default 'pixel_sum', the ATRC protocol)."""
  reduction = options.get('reduction', 'pixel_sum')
  if reduction not in NORMALS_REDUCTIONS:
    raise ValueError(f"config.loss_options.normals.reduction: unknown reduction '{reduction}' "
                     f"(valid: {', '.join(NORMALS_REDUCTIONS)})")
  unit = unit_vectors(pred.astype(jnp.float32))
  per_pixel = jnp.sum(jnp.abs(unit - labels), axis=-1) * NORMALS_REDUCTIONS[reduction]
  return _masked_mean(per_pixel, valid)


def _normals_cosine(pred, labels, valid, options):
  """1 - the mean over valid pixels of the dot product of the L2-normalised prediction
  and the label: MTAN's and MTPSL's normals loss (MTPSL model/segnet_mtl.py model_fit)."""
  del options
  unit = unit_vectors(pred.astype(jnp.float32))
  return 1.0 - _masked_mean(jnp.sum(unit * labels, axis=-1), valid)


# `loss_options.normals.loss`: 'l1' (ATRC, InvPT, Multi-Task-Learning-PyTorch; default) or
# 'cosine' (the partial-label benchmark: MTAN, MTPSL, JTR).
NORMALS_LOSSES = {'l1': _normals_l1, 'cosine': _normals_cosine}


def _normals_loss(pred, labels, valid, options):
  name = options.get('loss', 'l1')
  if name not in NORMALS_LOSSES:
    raise ValueError(f"config.loss_options.normals.loss: unknown loss '{name}' "
                     f"(valid: {', '.join(NORMALS_LOSSES)})")
  return NORMALS_LOSSES[name](pred, labels, valid, options)


def unit_vectors(v, eps=1e-12):
  """`v` scaled to unit length along the last axis (zero vectors stay finite)."""
  return v / jnp.sqrt(jnp.maximum(jnp.sum(v * v, axis=-1, keepdims=True), eps))


def _valid_categorical(labels):
  return labels != IGNORE_LABEL


def _valid_depth(labels):
  return labels > 0


def _valid_normals(labels):
  return jnp.sum(labels * labels, axis=-1) > 1e-6


def _palette(n):
  """Deterministic, well separated colours (the PASCAL VOC bit-interleaving)."""
  colours = np.zeros((n, 3), np.uint8)
  for i in range(n):
    c, r, g, b = i, 0, 0, 0
    for shift in range(7, -1, -1):
      r |= ((c >> 0) & 1) << shift
      g |= ((c >> 1) & 1) << shift
      b |= ((c >> 2) & 1) << shift
      c >>= 3
    colours[i] = (r, g, b)
  return colours


def _colour_classes(ids):
  ids = np.asarray(ids)
  palette = _palette(256)
  palette[IGNORE_LABEL] = (255, 255, 255)
  return palette[np.clip(ids, 0, 255).astype(np.int64)]


def _colour_scalar(values, vmax=None):
  """Grey-blue ramp for depth and probabilities; invalid (0) stays black."""
  values = np.asarray(values, np.float32)
  top = vmax if vmax is not None else max(float(values.max(initial=0.0)), 1e-6)
  t = np.clip(values / top, 0.0, 1.0)
  rgb = np.stack([t, t ** 0.5, 1.0 - 0.5 * t], axis=-1) * (values > 0)[..., None]
  return (rgb * 255).astype(np.uint8)


def _colour_normals(normals):
  normals = np.asarray(normals, np.float32)
  return ((normals + 1.0) * 127.5).clip(0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Task:
  """Static description of one dense prediction task.

  Attributes:
    name: registry key.
    label_kind: 'categorical', 'depth' or 'normals': how labels compare
      (used by the contrastive regularizer's positive/negative definition).
    channels: fixed output channels, or None when the dataset sets the number
      of classes (semseg, human_parts).
    loss_weight: default weight of the loss in the total (SPEC section 3).
    loss: (raw, labels, valid, options) -> scalar mean loss over `valid` pixels.
    decode: raw output -> task-space prediction.
    valid: labels -> boolean validity mask [B, H, W].
    colourize: task-space map (numpy) -> uint8 RGB.
  """
  name: str
  label_kind: str
  channels: int | None
  loss_weight: float
  loss: Callable
  decode: Callable
  valid: Callable
  colourize: Callable
  metric: str  # the evaluation metric that scores it (`evaluation.METRICS`)
  primary_metric: str  # its key for tables and delta_m, e.g. 'semseg/mIoU'
  lower_is_better: bool = False

  @property
  def label_dtype(self) -> str:
    """Class ids are int32, depth and normals float32 (module docstring)."""
    return 'int32' if self.label_kind == CATEGORICAL else 'float32'

  def num_outputs(self, num_classes: dict[str, int]) -> int:
    if self.channels is not None:
      return self.channels
    if self.name not in num_classes:
      raise ValueError(f"dataset does not define num_classes for task '{self.name}'")
    return num_classes[self.name]

  def compute_loss(self, raw, labels, options=None, labelled=None, image_weights=None):
    """The task's loss over its valid pixels; with `labelled` (bool [B], partially
    annotated training) only over the images that keep this task's label, so the
    mean (and a batch-balanced weight) pools those images alone, and a batch
    without any gives exactly 0 with a zero gradient.

    With `image_weights` ([B], `image_loss_weights`) each image's loss is the mean
    over its own valid pixels instead, and the result their weighted sum."""
    valid = self.valid(labels)
    options = dict(options or {})
    if image_weights is not None:
      per_image = jax.vmap(lambda r, l, v: self.loss(r[None], l[None], v[None], options))(
          raw, labels, valid)
      return jnp.sum(image_weights * per_image)
    if labelled is not None:
      valid = valid & labelled.reshape(labelled.shape + (1,) * (valid.ndim - 1))
    return self.loss(raw, labels, valid, options)


# How the batch's task losses are normalised (`config.loss_normalization`):
#   'pooled'              each task's loss pools the valid pixels of every image that keeps
#                         its label (ATRC's batch mean with all labels; the default).
#   'per_image'           each image's loss is the mean over its own valid pixels; a task's loss
#                         is their sum over the images that keep its label, over the batch
#                         size (MTPSL nyu_mtl_xtc.py, JTR code/train_nyuv2.py).
#   'per_image_balanced'  as 'per_image', each image's terms times T / its number of labelled
#                         tasks (DiffusionMTL losses/loss_schemes.py).
LOSS_NORMALIZATIONS = ('pooled', 'per_image', 'per_image_balanced')


def image_loss_weights(normalization: str, task: str, labelled, batch_size: int):
  """[B] weights of each image's loss of `task` (None for 'pooled'); `labelled` is
  {task: bool [B]} of partially annotated training, or None (every label kept)."""
  if normalization == 'pooled':
    return None
  if normalization not in LOSS_NORMALIZATIONS:
    raise ValueError(f"config.loss_normalization: unknown '{normalization}' "
                     f"(valid: {', '.join(LOSS_NORMALIZATIONS)})")
  if labelled is None:
    return jnp.full((batch_size,), 1.0 / batch_size, jnp.float32)
  weights = labelled[task].astype(jnp.float32) / batch_size
  if normalization == 'per_image_balanced':
    count = sum(kept.astype(jnp.float32) for kept in labelled.values())
    weights = weights * len(labelled) / jnp.maximum(count, 1.0)
  return weights


def _argmax(raw):
  return jnp.argmax(raw, axis=-1).astype(jnp.int32)


def _probability(raw):
  return jax.nn.sigmoid(raw[..., 0].astype(jnp.float32))


def _metres(raw):
  return jnp.maximum(raw[..., 0].astype(jnp.float32), 0.0)


def _categorical(name, weight, metric, primary, channels=None, loss=_cross_entropy,
                 decode=_argmax, colourize=_colour_classes):
  return Task(name, CATEGORICAL, channels, weight, loss, decode,
              _valid_categorical, colourize, metric, f'{name}/{primary}')


# In this order everywhere a run lists all tasks (the default config, the synthetic world).
TASKS: dict[str, Task] = {
    'semseg': _categorical('semseg', 1.0, 'segmentation', 'mIoU'),
    'depth': Task('depth', DEPTH, 1, 1.0, _depth_l1, _metres, _valid_depth,
                  _colour_scalar, 'depth', 'depth/rmse', lower_is_better=True),
    'normals': Task('normals', NORMALS, 3, 10.0, _normals_loss,
                    lambda raw: unit_vectors(raw.astype(jnp.float32)), _valid_normals,
                    _colour_normals, 'normals', 'normals/mean', lower_is_better=True),
    'edge': _categorical('edge', 50.0, 'boundary', 'odsF', 1, _balanced_bce, _probability,
                         lambda p: _colour_scalar(p, 1.0)),
    'sal': _categorical('sal', 5.0, 'saliency', 'maxF', 1, _balanced_bce, _probability,
                        lambda p: _colour_scalar(p, 1.0)),
    'human_parts': _categorical('human_parts', 2.0, 'segmentation', 'mIoU'),
}
ALL = tuple(TASKS)


def get_task(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"unknown task '{name}'; valid tasks: {', '.join(TASKS)}")
  return TASKS[name]
