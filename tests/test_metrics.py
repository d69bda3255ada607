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
  assert metric.result() == {f'{task}/mIoU': pytest.approx(expected)}


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
