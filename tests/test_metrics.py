"""Streaming metrics against brute-force versions of the peers' formulas."""

import numpy as np
import pytest

from cmtdp_jax import evaluation
from cmtdp_jax.evaluation import metrics

IGNORE = 255


def _labels(rng, shape, num_classes, ignore_fraction=0.2):
  labels = rng.integers(0, num_classes, shape)
  labels[rng.random(shape) < ignore_fraction] = IGNORE
  return labels


def _brute_miou(preds, labels, num_classes):
  ious = []
  for c in range(num_classes):
    tp = fp = fn = 0
    for p, g in zip(preds.ravel(), labels.ravel()):
      if g == IGNORE:
        continue
      tp += (p == c) and (g == c)
      fp += (p == c) and (g != c)
      fn += (p != c) and (g == c)
    ious.append(tp / (tp + fp + fn) if tp + fp + fn else 0.0)
  return 100.0 * np.mean(ious)


@pytest.mark.parametrize('task,num_classes', [('semseg', 6), ('human_parts', 7)])
def test_miou_matches_brute_force_with_ignore_and_absent_classes(task, num_classes):
  rng = np.random.default_rng(0)
  labels = _labels(rng, (3, 12, 10), 4)  # classes 4.. never labelled
  preds = rng.integers(0, 5, labels.shape)  # class 5 (and 6) never predicted
  metric = evaluation.make_metric(task, num_classes=num_classes)
  metric.update(preds[:2], labels[:2])
  metric.update(preds[2], labels[2])  # a single image
  expected = _brute_miou(preds, labels, num_classes)
  valid = labels != IGNORE
  accuracy = 100.0 * np.sum(preds[valid] == labels[valid]) / np.sum(valid)
  assert metric.result() == {f'{task}/mIoU': pytest.approx(expected),
                             f'{task}/pixel_accuracy': pytest.approx(accuracy)}


def test_miou_rejects_out_of_range_class_ids():
  metric = evaluation.make_metric('semseg', num_classes=3)
  with pytest.raises(ValueError, match='class ids'):
    metric.update(np.full((2, 2), 3), np.zeros((2, 2), int))


def test_depth_matches_brute_force():
  rng = np.random.default_rng(1)
  labels = rng.uniform(0.5, 10.0, (2, 9, 7))
  labels[rng.random(labels.shape) < 0.3] = 0.0  # invalid
  preds = labels + rng.normal(0, 1.0, labels.shape)
  preds[0, 0, :3] = -1.0  # negative predictions are clamped
  metric = evaluation.make_metric('depth')
  metric.update(preds, labels)
  valid = labels > 0
  gt, depth = labels[valid], np.clip(preds[valid], 0, None)
  positive = np.clip(depth, 1e-9, None)
  result = metric.result()
  assert result['depth/rmse'] == pytest.approx(np.sqrt(np.mean((depth - gt) ** 2)))
  assert result['depth/abs_err'] == pytest.approx(np.mean(np.abs(depth - gt)))
  assert result['depth/log_rmse'] == pytest.approx(
      np.sqrt(np.mean((np.log(positive) - np.log(gt)) ** 2)))
  assert result['depth/abs_rel'] == pytest.approx(np.mean(np.abs(depth - gt) / gt))
  assert result['depth/delta1'] == pytest.approx(
      np.mean(np.maximum(positive / gt, gt / positive) < 1.25))


def test_normals_match_brute_force():
  rng = np.random.default_rng(2)
  labels = rng.normal(size=(2, 20, 25, 3))
  labels /= np.linalg.norm(labels, axis=-1, keepdims=True)
  labels[rng.random(labels.shape[:-1]) < 0.2] = 0.0  # invalid
  preds = 3.0 * (labels + rng.normal(0, 0.4, labels.shape))  # not unit length
  preds[0, 0, 0] = 0.0  # a zero prediction is 90 degrees off
  metric = evaluation.make_metric('normals')
  metric.update(preds, labels)
  valid = np.linalg.norm(labels, axis=-1) > 0
  p = preds[valid] / (np.linalg.norm(preds[valid], axis=-1, keepdims=True) + 1e-12)
  degrees = np.degrees(np.arccos(np.clip(np.sum(p * labels[valid], axis=-1), -1, 1)))
  result = metric.result()
  one_pixel = 100.0 / degrees.size
  assert result['normals/mean'] == pytest.approx(degrees.mean(), abs=1e-5)
  assert result['normals/rmse'] == pytest.approx(np.sqrt(np.mean(degrees ** 2)), abs=1e-5)
  assert result['normals/median'] == pytest.approx(np.median(degrees), abs=0.011)
  for key, threshold in (('11.25', 11.25), ('22.5', 22.5), ('30', 30.0)):
    assert result[f'normals/{key}'] == pytest.approx(100 * np.mean(degrees < threshold),
                                                     abs=one_pixel)


def _brute_saliency(preds, labels):
  """ATRC's MaxF (pooled, >=, beta^2 0.3) and MTL-PyTorch's per-image mIoU (>)."""
  keep = [(p, g) for p, g in zip(preds, labels) if (g != IGNORE).any()]
  best_f = 0.0
  for t in np.arange(0.05, 1.0, 0.05):
    tp = predicted = actual = 0
    for p, g in keep:
      valid = g != IGNORE
      hit, positive = (p >= t) & valid, (g == 1) & valid
      tp += np.sum(hit & positive)
      predicted += np.sum(hit)
      actual += np.sum(positive)
    precision = tp / predicted if predicted else 0.0
    recall = tp / actual if actual else 0.0
    if precision + recall:
      best_f = max(best_f, 1.3 * precision * recall / (0.3 * precision + recall))
  best_iou = 0.0
  for t in np.linspace(0.2, 0.9, 15):
    jaccards = []
    for p, g in keep:
      valid = g != IGNORE
      mask, positive = (p > t) & valid, (g == 1) & valid
      union = np.sum(mask | positive)
      jaccards.append(np.sum(mask & positive) / union if union else 1.0)
    best_iou = max(best_iou, np.mean(jaccards))
  return 100 * best_f, 100 * best_iou


def test_saliency_max_f_and_miou_match_brute_force():
  rng = np.random.default_rng(3)
  labels = _labels(rng, (4, 15, 12), 2)
  labels[1] = 0  # no salient pixel
  labels[1, 0, 0] = IGNORE
  labels[2] = IGNORE  # no valid pixel: skipped
  preds = np.clip(0.6 * labels.clip(0, 1) + rng.uniform(0, 0.5, labels.shape), 0, 1)
  metric = evaluation.make_metric('sal')
  metric.update(preds, labels)
  max_f, miou = _brute_saliency(preds, labels)
  assert metric.result() == {'sal/maxF': pytest.approx(max_f), 'sal/mIoU': pytest.approx(miou)}


def test_saliency_variants_differ_in_pooling():
  # One large image predicted perfectly and one tiny image predicted wrongly:
  # pixel pooling (maxF) barely notices, the per-image mean (mIoU) halves.
  big = np.zeros((20, 20), int)
  big[:10] = 1
  small = np.full((20, 20), IGNORE)
  small[0, 0] = 1
  metric = evaluation.make_metric('sal')
  metric.update(np.stack([big.astype(float), np.zeros((20, 20))]), np.stack([big, small]))
  result = metric.result()
  assert result['sal/maxF'] > 99.0
  assert result['sal/mIoU'] == pytest.approx(50.0)


# The classes `_random_batch` draws from: a dataset's count, which `make_metric` is given.
CLASSES = {'semseg': {'num_classes': 5}, 'human_parts': {'num_classes': 5}}


def _random_batch(task, rng):
  shape = (2, 8, 9)
  if task in CLASSES:
    return rng.integers(0, 5, shape), _labels(rng, shape, 5)
  if task == 'depth':
    return rng.uniform(0, 5, shape), rng.uniform(0, 5, shape) * (rng.random(shape) > 0.2)
  if task == 'normals':
    return rng.normal(size=shape + (3,)), rng.normal(size=shape + (3,))
  return rng.random(shape), _labels(rng, shape, 2)


@pytest.mark.parametrize('task', ['semseg', 'human_parts', 'depth', 'normals', 'sal'])
def test_merge_and_from_state_equal_one_stream(task):
  rng = np.random.default_rng(4)
  batches = [_random_batch(task, rng) for _ in range(3)]
  single, first, second = (evaluation.make_metric(task, **CLASSES.get(task, {}))
                           for _ in range(3))
  for pred, gt in batches:
    single.update(pred, gt)
  first.update(*batches[0])
  for pred, gt in batches[1:]:
    second.update(pred, gt)
  summed = {k: first.state[k] + second.state[k] for k in first.state}
  rebuilt = type(first).from_state(summed, first)
  expected = single.result()
  assert rebuilt.num_images == single.num_images == sum(len(gt) for _, gt in batches)
  assert first.merge(second).result() == pytest.approx(expected)
  assert rebuilt.result() == pytest.approx(expected)


def test_image_subset():
  rng = np.random.default_rng(5)
  pred, gt = _random_batch('semseg', rng)
  subset = evaluation.make_metric('semseg', image_ids=['b'], num_classes=5)
  subset.update(pred, gt, ids=['a', 'b'])
  only_b = evaluation.make_metric('semseg', num_classes=5)
  only_b.update(pred[1], gt[1])
  assert subset.result() == only_b.result()
  assert subset.num_images == only_b.num_images == 1
  with pytest.raises(ValueError, match='ids='):
    subset.update(pred, gt)


def test_unknown_task_names_the_valid_ones():
  with pytest.raises(ValueError, match='semseg, depth, normals, edge, sal, human_parts'):
    evaluation.make_metric('segmentation')


def test_shape_mismatch_is_an_error():
  with pytest.raises(ValueError, match='must'):
    evaluation.make_metric('depth').update(np.zeros((4, 4)), np.zeros((4, 5)))


def test_ignore_label_matches_tasks():
  from cmtdp_jax import tasks  # pylint: disable=import-outside-toplevel
  assert metrics.IGNORE_LABEL == tasks.IGNORE_LABEL


# MTPSL's meters (VICO-UoE/MTPSL utils/evaluation.py: ConfMatrix, DepthMeter, NormalsMeter),
# transcribed from torch to NumPy line by line, in float64, with their layouts: class ids
# flattened, depth [B, 1, H, W], normals [B, 3, H, W]. The partial-label benchmark (MTPSL,
# JTR) reports what these compute.


class _MtpslConfMatrix:

  def __init__(self, num_classes):
    self.num_classes = num_classes
    self.mat = None

  def update(self, pred, target):
    n = self.num_classes
    if self.mat is None:
      self.mat = np.zeros((n, n), np.int64)
    k = (target >= 0) & (target < n)  # their ignore label is -1; ours (255) is >= n
    inds = n * target[k].astype(np.int64) + pred[k]
    self.mat += np.bincount(inds, minlength=n ** 2).reshape(n, n)

  def get_metrics(self):
    h = self.mat.astype(np.float64)
    acc = np.diag(h).sum() / h.sum()
    with np.errstate(invalid='ignore'):
      iu = np.diag(h) / (h.sum(1) + h.sum(0) - np.diag(h))
    return np.mean(iu), acc


class _MtpslDepthMeter:

  def __init__(self):
    self.total_rmses = self.total_l1 = self.total_log_rmses = self.n_valid = 0.0

  def update(self, pred, gt):
    pred, gt = pred.squeeze(), gt.squeeze()
    mask = gt != 0
    self.n_valid += mask.sum()
    pred = np.maximum(pred, 1e-9)  # torch.clamp(pred, min=1e-9)
    with np.errstate(divide='ignore'):  # log(0) of invalid pixels, masked next
      log_rmse_tmp = (np.log(gt) - np.log(pred)) ** 2
    self.total_log_rmses += log_rmse_tmp[mask].sum()
    pred, gt = pred[mask], gt[mask]
    self.total_rmses += (np.abs(gt - pred) ** 2).sum()
    self.total_l1 += np.abs(gt - pred).sum()

  def get_score(self):
    return {'rmse': np.sqrt(self.total_rmses / self.n_valid),
            'l1': self.total_l1 / self.n_valid,
            'log_rmse': np.sqrt(self.total_log_rmses / self.n_valid)}


class _MtpslNormalsMeter:

  def __init__(self):
    self.eval_dict = {'mean': 0., 'rmse': 0., '11.25': 0., '22.5': 0., '30': 0., 'n': 0}

  def update(self, pred, gt):
    valid_mask = np.sum(gt, axis=1) != 0
    deg_diff_tmp = (180 / np.pi) * np.arccos(np.clip(np.sum(pred * gt, 1)[valid_mask], -1, 1))
    self.eval_dict['mean'] += np.sum(deg_diff_tmp)
    self.eval_dict['rmse'] += np.sum(deg_diff_tmp ** 2)
    for key, threshold in (('11.25', 11.25), ('22.5', 22.5), ('30', 30)):
      self.eval_dict[key] += np.sum(deg_diff_tmp < threshold) * 100
    self.eval_dict['n'] += deg_diff_tmp.size

  def get_score(self):
    n = self.eval_dict['n']
    return {'mean': self.eval_dict['mean'] / n, 'rmse': np.sqrt(self.eval_dict['rmse'] / n),
            **{key: self.eval_dict[key] / n for key in ('11.25', '22.5', '30')}}


def _unit_vectors(rng, shape):
  vectors = rng.normal(size=shape)
  return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def test_metrics_equal_mtpsl_meters_over_several_batches():
  """Our pooled metrics are MTPSL's numbers, under our names: mIoU and pixel accuracy in
  percent (theirs are fractions), depth abs_err = their 'l1', rmse; normals mean, rmse and
  the three shares. Relative 1e-6: float64 sums in another order agree to ~1e-15; depth
  differs where a prediction is negative (we clamp at 0, they at 1e-9: <= 1e-9 per pixel,
  on values of order 1); our angle is 2*atan2(|p - g|, |p + g|), theirs arccos(p . g), which
  in float64 loses at most sqrt(2 * 1.1e-16) rad = 1e-6 degrees, near 0 degrees only, against
  a mean angle of tens of degrees."""
  rng = np.random.default_rng(7)
  ours = {'semseg': evaluation.make_metric('semseg', num_classes=13),
          'depth': evaluation.make_metric('depth'), 'normals': evaluation.make_metric('normals')}
  conf_mat, depth_mat, normal_mat = _MtpslConfMatrix(13), _MtpslDepthMeter(), _MtpslNormalsMeter()
  for batch in (3, 1, 2):
    shape = (batch, 12, 16)
    labels = _labels(rng, shape, 13)
    preds = np.where(rng.random(shape) < 0.4, labels % 13, rng.integers(0, 13, shape))
    ours['semseg'].update(preds, labels)
    conf_mat.update(preds.ravel(), labels.ravel())

    depth = rng.uniform(0.5, 10.0, shape) * (rng.random(shape) > 0.2)  # 0: invalid
    depth_pred = depth + rng.normal(0, 1.0, shape)
    depth_pred[0, 0, :4] = -0.5  # clamped: at 0 by us, at 1e-9 by MTPSL
    ours['depth'].update(depth_pred, depth)
    depth_mat.update(depth_pred[:, None], depth[:, None])

    normals = _unit_vectors(rng, shape + (3,)) * (rng.random(shape) > 0.2)[..., None]
    normals_pred = _unit_vectors(rng, shape + (3,)) * 0.8 + normals  # up to 53 degrees off
    normals_pred /= np.linalg.norm(normals_pred, axis=-1, keepdims=True)  # their model's output
    normals_pred[0, 0, 0] = 0.0  # a zero prediction: 90 degrees for both
    normals[0, 0, 0] = _unit_vectors(rng, (3,))
    ours['normals'].update(normals_pred, normals)
    normal_mat.update(normals_pred.transpose(0, 3, 1, 2), normals.transpose(0, 3, 1, 2))
  results = {k: v for metric in ours.values() for k, v in metric.result().items()}
  miou, accuracy = conf_mat.get_metrics()
  depth_score, normal_score = depth_mat.get_score(), normal_mat.get_score()
  expected = {
      'semseg/mIoU': 100 * miou, 'semseg/pixel_accuracy': 100 * accuracy,
      'depth/abs_err': depth_score['l1'], 'depth/rmse': depth_score['rmse'],
      'depth/log_rmse': depth_score['log_rmse'],
      **{f'normals/{key}': normal_score[key] for key in ('mean', 'rmse', '11.25', '22.5', '30')}}
  assert {k: results[k] for k in expected} == pytest.approx(expected, rel=1e-6, abs=0)
  assert 0 < normal_score['11.25'] < normal_score['22.5'] < normal_score['30'] < 100


def test_a_class_absent_from_labels_and_predictions_is_0_for_us_nan_for_mtpsl():
  """The one documented difference from MTPSL's ConfMatrix (SegmentationMetric's docstring):
  a class neither labelled nor predicted is an IoU of 0 in our mean, NaN in theirs."""
  labels = np.array([[0, 1], [1, IGNORE]])
  preds = np.array([[0, 1], [0, 2]])  # class 2 only on the ignored pixel: absent, as is 3
  metric = evaluation.make_metric('semseg', num_classes=4)
  metric.update(preds, labels)
  conf_mat = _MtpslConfMatrix(4)
  conf_mat.update(preds.ravel(), labels.ravel())
  miou, accuracy = conf_mat.get_metrics()
  assert np.isnan(miou) and accuracy == pytest.approx(2 / 3)
  assert metric.result() == {'semseg/mIoU': pytest.approx(100 * (0.5 + 0.5 + 0 + 0) / 4),
                             'semseg/pixel_accuracy': pytest.approx(100 * 2 / 3)}


def test_lower_is_better_follows_the_metric_keys():
  """delta_m's sign: every error metric the depth and normals metrics report is
  lower-is-better (e.g. 'depth/abs_err', a reference's key that is no primary metric), the
  tasks' lower-is-better primary metrics are among them, scores are not."""
  depth = evaluation.make_metric('depth').result()
  normals = evaluation.make_metric('normals').result()
  errors = {'depth/rmse', 'depth/abs_err', 'depth/log_rmse', 'depth/abs_rel',
            'normals/mean', 'normals/median', 'normals/rmse'}
  assert evaluation.LOWER_IS_BETTER == errors
  assert errors <= set(depth) | set(normals)
  assert {'depth/delta1', 'normals/11.25', 'semseg/mIoU', 'semseg/pixel_accuracy'}.isdisjoint(
      evaluation.LOWER_IS_BETTER)
