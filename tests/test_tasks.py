"""Task registry: losses against slow NumPy references, decoding, validity."""

import jax.numpy as jnp
import numpy as np
import pytest

from cmtdp_jax import tasks


def _log_sigmoid(x):
  return -np.log1p(np.exp(-x))


def test_cross_entropy_ignores_255():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 6, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=(2, 5, 6)).astype(np.int32)
  labels[0, :2] = 255
  expected = []
  for idx in np.ndindex(labels.shape):
    if labels[idx] == 255:
      continue
    z = logits[idx] - logits[idx].max()
    expected.append(-(z[labels[idx]] - np.log(np.exp(z).sum())))
  got = tasks.get_task('semseg').compute_loss(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(got, np.mean(expected), rtol=1e-5)


@pytest.mark.parametrize('task,pos_weight', [('edge', 0.95), ('sal', None)])
def test_balanced_bce(task, pos_weight):
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 6, 1)).astype(np.float32)
  labels = (rng.random((2, 5, 6)) < 0.3).astype(np.int32)
  labels[1, 0] = 255
  valid = labels != 255
  w = pos_weight if pos_weight is not None else 1 - (labels[valid] == 1).mean()
  x, y = logits[..., 0][valid], labels[valid]
  expected = np.mean(w * y * -_log_sigmoid(x) + (1 - w) * (1 - y) * -_log_sigmoid(-x))
  options = {} if pos_weight is None else {'pos_weight': pos_weight}
  got = tasks.get_task(task).compute_loss(jnp.asarray(logits), jnp.asarray(labels), options)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_depth_and_normals_l1_skip_invalid_pixels():
  rng = np.random.default_rng(2)
  pred = rng.normal(size=(1, 4, 4, 1)).astype(np.float32)
  depth = rng.uniform(0.5, 5, size=(1, 4, 4)).astype(np.float32)
  depth[0, 0] = 0
  expected = np.abs(pred[..., 0] - depth)[depth > 0].mean()
  np.testing.assert_allclose(tasks.get_task('depth').compute_loss(pred, depth), expected,
                             rtol=1e-6)



def _normals_inputs(seed=4):
  rng = np.random.default_rng(seed)
  raw = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
  normals = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
  normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
  normals[0, 1] = 0
  normals[1, :, 2:4] = 0
  return raw, normals


def test_normals_loss_is_atrc_per_pixel_sum_times_weight():
  """ATRC / InvPT L1Loss(normalize=True): mask [N,1,H,W] of valid pixels, masked_select over the
  3 channels, sum / valid pixels (brdav/atrc src/model/criterion.py,
  prismformore/Multi-Task-Transformer InvPT/losses/loss_functions.py); weight 10."""
  raw, normals = _normals_inputs()
  unit = raw / np.linalg.norm(raw, axis=-1, keepdims=True)
  valid = np.linalg.norm(normals, axis=-1) > 0
  reference = 10.0 * np.abs(unit - normals)[valid].sum() / valid.sum()
  task = tasks.get_task('normals')
  np.testing.assert_allclose(task.loss_weight * task.compute_loss(raw, normals), reference,
                             rtol=1e-5)


def test_normals_loss_element_mean_option_is_multi_task_learning_pytorch():
  """NormalsLoss of SimonVandenhende/Multi-Task-Learning-PyTorch losses/loss_functions.py: the
  same sum divided by the valid elements (3 per pixel)."""
  raw, normals = _normals_inputs()
  unit = raw / np.linalg.norm(raw, axis=-1, keepdims=True)
  valid = np.linalg.norm(normals, axis=-1) > 0
  reference = np.abs(unit - normals)[valid].mean()
  got = tasks.get_task('normals').compute_loss(raw, normals, {'reduction': 'element_mean'})
  np.testing.assert_allclose(got, reference, rtol=1e-5)
  with pytest.raises(ValueError, match='loss_options.normals.reduction'):
    tasks.get_task('normals').compute_loss(raw, normals, {'reduction': 'mean'})


def test_decode_shapes_and_ranges():
  raw = jnp.asarray(np.random.default_rng(3).normal(size=(2, 3, 3, 5)), jnp.float32)
  assert tasks.get_task('semseg').decode(raw).shape == (2, 3, 3)
  p = tasks.get_task('sal').decode(raw[..., :1])
  assert p.shape == (2, 3, 3) and float(p.min()) >= 0 and float(p.max()) <= 1
  assert float(tasks.get_task('depth').decode(raw[..., :1]).min()) >= 0
  n = tasks.get_task('normals').decode(raw[..., :3])
  np.testing.assert_allclose(np.linalg.norm(n, axis=-1), 1.0, rtol=1e-5)


def test_colourize_gives_rgb():
  for name, value in [('semseg', np.array([[0, 3], [255, 1]])),
                      ('depth', np.array([[0.0, 2.0], [1.0, 3.0]])),
                      ('normals', np.zeros((2, 2, 3))), ('edge', np.ones((2, 2)))]:
    rgb = tasks.get_task(name).colourize(value)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8


def test_unknown_task_lists_valid_ones():
  with pytest.raises(ValueError, match='valid tasks: semseg'):
    tasks.get_task('optical_flow')
