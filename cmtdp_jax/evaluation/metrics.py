"""Streaming dense-prediction metrics, pooled over the whole evaluation set.

Each metric keeps its state as a dict of numpy arrays that merge by summation,
so hosts can all-gather `metric.state`, sum over the host axis and rebuild the
metric with `from_state`. Conventions follow the public peers (ATRC,
Multi-Task-Learning-PyTorch); each class says which one and why.

Label conventions mirror `cmtdp_jax.tasks` (not imported, to keep evaluation
free of JAX): 255 marks ignored pixels of categorical maps (semseg,
human_parts, sal, edge), depth 0 is invalid, zero-norm normals are invalid.
"""

from __future__ import annotations

import copy

import numpy as np

IGNORE_LABEL = 255  # tasks.IGNORE_LABEL


class Metric:
  """Base class: batching, the optional image subset, state and merging.

  Subclasses define `_zero_state()`, `_update(pred, gt)` on a batch and
  `result()`; everything they accumulate lives in `self._state`, beside the
  base's 'images' (how many images were scored: those in `image_ids`), which
  merges across hosts with the rest.
  """

  task: str
  image_ndim = 2  # dims of one label map; normals use 3
  # The result names (after '<task>/') of error metrics, for delta_m's sign
  # (report.LOWER_IS_BETTER); the others are higher-is-better or not scores.
  lower_is_better: tuple[str, ...] = ()

  def __init__(self, image_ids=None):
    self.image_ids = None if image_ids is None else frozenset(image_ids)
    self._reset()

  def _reset(self) -> None:
    self._state = {**self._zero_state(), 'images': np.zeros((), np.int64)}

  def _zero_state(self) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def _update(self, pred: np.ndarray, gt: np.ndarray) -> None:
    raise NotImplementedError

  def result(self) -> dict[str, float]:
    raise NotImplementedError

  def update(self, pred, gt, ids=None) -> None:
    """Adds one image [H, W(, 3)] or a batch [B, H, W(, 3)].

    `ids` (one per image; bytes from tf.data are decoded) are needed only
    when the metric was built with `image_ids`: images whose id is not in
    that set are skipped.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if gt.ndim == self.image_ndim:
      pred, gt = pred[None], gt[None]
      ids = None if ids is None else [ids]
    if pred.shape != gt.shape or gt.ndim != self.image_ndim + 1:
      raise ValueError(f'{self.task}: prediction {pred.shape} and label {gt.shape} must '
                       f'both be one image or a batch of {self.image_ndim}-d maps')
    if self.image_ids is not None:
      if ids is None:
        raise ValueError(f'{self.task}: this metric is restricted to image_ids; '
                         'pass ids= to update')
      keep = np.array([(i.decode() if isinstance(i, bytes) else i) in self.image_ids
                       for i in ids], bool)
      pred, gt = pred[keep], gt[keep]
    if len(gt):
      self._update(pred, gt)
      self._state['images'] += len(gt)

  @property
  def num_images(self) -> int:
    """Images scored so far (reported as '<task>/images' by the train loop)."""
    return int(self._state['images'])

  @property
  def state(self) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in self._state.items()}

  @classmethod
  def from_state(cls, state, like: Metric) -> Metric:
    """A metric with the options of `like` and the given (e.g. summed) state."""
    metric = copy.copy(like)
    metric._reset()
    metric._state = {k: np.asarray(state[k]).astype(v.dtype).reshape(v.shape)
                     for k, v in metric._state.items()}
    return metric

  def merge(self, other: Metric) -> Metric:
    """Adds `other`'s counts to this metric (same task and options) and returns it."""
    if type(other) is not type(self):
      raise ValueError(f'cannot merge {type(other).__name__} into {type(self).__name__}')
    for key, value in other.state.items():
      self._state[key] = self._state[key] + value
    return self


class SegmentationMetric(Metric):
  """mIoU and pixel accuracy from one confusion matrix pooled over all valid pixels.

  Absent classes (in neither the labels nor the predictions) count as IoU 0
  and stay in the mean over `num_classes`, as in both peers (ATRC's MeanIoU
  turns the 0/0 into 0; Multi-Task-Learning-PyTorch divides by max(union,
  1e-8)). MTPSL's `ConfMatrix` (VICO-UoE/MTPSL utils/evaluation.py) divides
  0 by 0 there and its torch.mean turns the whole mIoU into NaN; that only
  happens on tiny evaluation sets, otherwise the two agree. pixel_accuracy is
  the diagonal over all valid pixels, as `ConfMatrix.get_metrics`'s acc. Both
  in percent (MTPSL logs fractions: 'V. mIoU', 'V. Pix').
  """

  def __init__(self, task: str, num_classes: int, image_ids=None):
    self.task = task
    self.num_classes = int(num_classes)
    super().__init__(image_ids)

  def _zero_state(self):
    return {'confusion': np.zeros((self.num_classes, self.num_classes), np.int64)}

  def _update(self, pred, gt):
    valid = gt != IGNORE_LABEL
    labels, predicted = gt[valid].astype(np.int64), pred[valid].astype(np.int64)
    n = self.num_classes
    for name, ids in (('label', labels), ('prediction', predicted)):
      if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise ValueError(f'{self.task}: {name} class ids must lie in [0, {n}) or be '
                         f'{IGNORE_LABEL}; got range [{ids.min()}, {ids.max()}]')
    self._state['confusion'] += np.bincount(labels * n + predicted,
                                            minlength=n * n).reshape(n, n)

  def result(self):
    confusion = self._state['confusion']
    hits = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - hits
    iou = np.divide(hits, union, out=np.zeros_like(hits), where=union > 0)
    pixels = max(float(confusion.sum()), 1.0)
    return {f'{self.task}/mIoU': 100.0 * float(iou.mean()),
            f'{self.task}/pixel_accuracy': 100.0 * float(hits.sum()) / pixels}


class DepthMetric(Metric):
  """Depth errors pooled over all valid pixels (label > 0).

  Predictions are clamped at 0 (ATRC) and at 1e-9 where a log or a ratio needs
  them positive (Multi-Task-Learning-PyTorch). rmse and abs_err (the mean
  absolute error) in metres; log_rmse (natural log) and abs_rel as plain
  numbers; delta1 as the fraction of pixels with max(pred/label, label/pred)
  < 1.25, the depth literature's unit.

  abs_err and rmse are MTPSL's `DepthMeter` 'l1' and 'rmse' (VICO-UoE/MTPSL
  utils/evaluation.py; its logs call them 'V.abs' and 'V.rel': that 'rel' is
  the RMSE). DepthMeter clamps predictions at 1e-9 where we clamp at 0, so the
  two differ by at most 1e-9 per pixel, only where a prediction is below 1e-9.
  """

  task = 'depth'
  _keys = ('pixels', 'squared_error', 'absolute_error', 'squared_log_error', 'relative_error',
           'within_1.25')
  lower_is_better = ('rmse', 'abs_err', 'log_rmse', 'abs_rel')

  def _zero_state(self):
    return {k: np.zeros((), np.float64) for k in self._keys}

  def _update(self, pred, gt):
    valid = gt > 0
    label = gt[valid].astype(np.float64)
    depth = np.maximum(pred[valid].astype(np.float64), 0.0)
    positive = np.maximum(depth, 1e-9)
    ratio = np.maximum(positive / label, label / positive)
    state = self._state
    state['pixels'] += label.size
    state['squared_error'] += np.sum((depth - label) ** 2)
    state['absolute_error'] += np.sum(np.abs(depth - label))
    state['squared_log_error'] += np.sum((np.log(positive) - np.log(label)) ** 2)
    state['relative_error'] += np.sum(np.abs(depth - label) / label)
    state['within_1.25'] += np.count_nonzero(ratio < 1.25)

  def result(self):
    state = self._state
    pixels = max(float(state['pixels']), 1.0)
    return {
        'depth/rmse': float(np.sqrt(state['squared_error'] / pixels)),
        'depth/abs_err': float(state['absolute_error'] / pixels),
        'depth/log_rmse': float(np.sqrt(state['squared_log_error'] / pixels)),
        'depth/abs_rel': float(state['relative_error'] / pixels),
        'depth/delta1': float(state['within_1.25'] / pixels),
    }


class NormalsMetric(Metric):
  """Angular error of surface normals over valid pixels (label norm > 0).

  Both vectors are L2-normalised; a zero prediction scores 90 degrees. The
  angle is 2*atan2(|p - g|, |p + g|) (ATRC; equal to Multi-Task-Learning-
  PyTorch's arccos of the dot product but exact near 0). mean, median and rmse
  in degrees; 11.25 / 22.5 / 30 in percent of pixels strictly below
  (Multi-Task-Learning-PyTorch). The median comes from a 0.01-degree
  histogram so that it merges across hosts; it is within 0.01 degrees of the
  exact median.

  mean, rmse and the three shares are MTPSL's `NormalsMeter` (VICO-UoE/MTPSL
  utils/evaluation.py; its logs call the rmse 'V.Med', it reports no median):
  the same pooled sums for unit-length predictions (its model normalises them;
  the meter does not) and unit or zero labels (it takes a pixel as valid where
  the label's components do not sum to 0, we where its norm is not 0).
  """

  task = 'normals'
  lower_is_better = ('mean', 'median', 'rmse')
  image_ndim = 3
  bin_degrees = 0.01
  thresholds = (11.25, 22.5, 30.0)

  def _zero_state(self):
    state = {k: np.zeros((), np.float64) for k in ('pixels', 'degrees', 'squared_degrees')}
    state['within'] = np.zeros(len(self.thresholds), np.int64)
    state['histogram'] = np.zeros(int(round(180 / self.bin_degrees)), np.int64)
    return state

  def _update(self, pred, gt):
    valid = np.sum(gt.astype(np.float64) ** 2, axis=-1) > 1e-6  # tasks._valid_normals
    angles = _angles_degrees(pred[valid], gt[valid])
    state = self._state
    state['pixels'] += angles.size
    state['degrees'] += angles.sum()
    state['squared_degrees'] += np.sum(angles ** 2)
    state['within'] += np.array([np.count_nonzero(angles < t) for t in self.thresholds])
    bins = np.minimum((angles / self.bin_degrees).astype(np.int64), len(state['histogram']) - 1)
    state['histogram'] += np.bincount(bins, minlength=len(state['histogram']))

  def result(self):
    state = self._state
    pixels = max(float(state['pixels']), 1.0)
    results = {
        'normals/mean': float(state['degrees'] / pixels),
        'normals/median': _histogram_median(state['histogram'], self.bin_degrees),
        'normals/rmse': float(np.sqrt(state['squared_degrees'] / pixels)),
    }
    for threshold, count in zip(self.thresholds, state['within']):
      results[f'normals/{threshold:g}'] = 100.0 * float(count) / pixels
    return results


def _unit(vectors):
  norm = np.linalg.norm(vectors, axis=-1, keepdims=True)
  return np.divide(vectors, norm, out=np.zeros_like(vectors), where=norm > 0)


def _angles_degrees(pred, gt):
  p, g = _unit(pred.astype(np.float64)), _unit(gt.astype(np.float64))
  return np.degrees(2.0 * np.arctan2(np.linalg.norm(p - g, axis=-1),
                                     np.linalg.norm(p + g, axis=-1)))


def _histogram_median(histogram, bin_width):
  """Median of histogrammed values, spreading each bin's mass uniformly."""
  total = histogram.sum()
  if total == 0:
    return 0.0
  cumulative = np.cumsum(histogram)
  half = total / 2.0
  b = int(np.searchsorted(cumulative, half))
  below = cumulative[b] - histogram[b]
  return float((b + (half - below) / histogram[b]) * bin_width)


class SaliencyMetric(Metric):
  """Saliency maxF (ATRC) and the mIoU-style variant (Multi-Task-Learning-PyTorch).

  maxF: for each threshold t in `maxf_thresholds` (0.05..0.95, as ATRC's
  MaxF), prediction >= t; true/predicted/actual positives pooled over all
  valid pixels of all images; F_beta with beta^2 = 0.3 (0/0 -> 0); the best
  threshold is reported. mIoU: for each t in `miou_thresholds` (15 values in
  0.2..0.9), prediction > t; Jaccard per image over valid pixels (1 when both
  masks are empty), averaged over images; the best threshold is reported.
  Images without any valid pixel are skipped. Both in percent.

  Predictions are probabilities: no sigmoid is applied here (one peer applies
  it twice).
  """

  task = 'sal'

  def __init__(self, beta_squared=0.3, maxf_thresholds=None, miou_thresholds=None,
               image_ids=None):
    self.beta_squared = float(beta_squared)
    self.maxf_thresholds = np.asarray(
        np.arange(1, 20) * 0.05 if maxf_thresholds is None else maxf_thresholds, np.float64)
    self.miou_thresholds = np.asarray(
        np.linspace(0.2, 0.9, 15) if miou_thresholds is None else miou_thresholds, np.float64)
    super().__init__(image_ids)

  def _zero_state(self):
    n, m = len(self.maxf_thresholds), len(self.miou_thresholds)
    return {'true_positives': np.zeros(n, np.int64),
            'predicted_positives': np.zeros(n, np.int64),
            'actual_positives': np.zeros((), np.int64),
            'jaccard_sum': np.zeros(m, np.float64),
            'jaccard_images': np.zeros((), np.int64)}

  def _update(self, pred, gt):
    state = self._state
    num_maxf, num_miou = len(self.maxf_thresholds), len(self.miou_thresholds)
    for prob, label in zip(pred, gt):
      valid = label != IGNORE_LABEL
      if not valid.any():
        continue
      prob, positive = prob[valid].astype(np.float64), label[valid] == 1
      # How many thresholds each pixel passes: prob >= t for maxF, prob > t for mIoU.
      passes = np.searchsorted(self.maxf_thresholds, prob, side='right')
      state['true_positives'] += _count_passing(passes[positive], num_maxf)
      state['predicted_positives'] += _count_passing(passes, num_maxf)
      state['actual_positives'] += np.count_nonzero(positive)
      passes = np.searchsorted(self.miou_thresholds, prob, side='left')
      intersection = _count_passing(passes[positive], num_miou)
      union = _count_passing(passes[~positive], num_miou) + np.count_nonzero(positive)
      state['jaccard_sum'] += np.where(union > 0, intersection / np.maximum(union, 1), 1.0)
      state['jaccard_images'] += 1

  def result(self):
    state = self._state
    tp = state['true_positives'].astype(np.float64)
    precision = np.divide(tp, state['predicted_positives'], out=np.zeros_like(tp),
                          where=state['predicted_positives'] > 0)
    recall = tp / max(float(state['actual_positives']), 1.0)
    denominator = self.beta_squared * precision + recall
    f_score = np.divide((1 + self.beta_squared) * precision * recall, denominator,
                        out=np.zeros_like(tp), where=denominator > 0)
    mean_jaccard = state['jaccard_sum'] / max(float(state['jaccard_images']), 1.0)
    return {'sal/maxF': 100.0 * float(f_score.max()),
            'sal/mIoU': 100.0 * float(mean_jaccard.max())}


def _count_passing(passes, num_thresholds):
  """counts[k] = number of pixels passing threshold k, i.e. with passes > k."""
  histogram = np.bincount(passes, minlength=num_thresholds + 1)
  return np.cumsum(histogram[::-1])[::-1][1:]
