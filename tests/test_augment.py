"""Augmentation invariants: labels stay consistent with the image and each other."""

import ml_collections
import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')

from cmtdp_jax.data import augment  # noqa: E402


def _example(height=24, width=32, seed=0):
  rng = np.random.default_rng(seed)
  normals = rng.normal(size=(height, width, 3)).astype(np.float32)
  normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
  semseg = np.zeros((height, width), np.int32)
  semseg[:, width // 2:] = 1
  semseg[: height // 3] = 2
  return {
      'image': tf.constant(rng.uniform(0, 255, (height, width, 3)).astype(np.float32)),
      'semseg': tf.constant(semseg),
      'edge': tf.constant((rng.random((height, width)) < 0.1).astype(np.int32)),
      'depth': tf.constant(rng.uniform(1, 4, (height, width)).astype(np.float32)),
      'normals': tf.constant(normals),
  }


def _aug_config(**kw):
  base = dict(min_scale=0.5, max_scale=2.0, cat_max_ratio=0.75, flip=True, photometric=True,
              parts_need_person=False)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def test_flip_twice_is_identity_and_negates_normals_x():
  ex = _example()
  seed = tf.constant([0, 0], tf.int64)
  # Find a seed that flips, so the test cannot pass by never flipping.
  for i in range(20):
    seed = tf.constant([i, 1], tf.int64)
    once = augment.random_flip(ex, seed)
    if not np.allclose(once['image'], ex['image']):
      break
  np.testing.assert_allclose(once['normals'][..., 0], -ex['normals'][:, ::-1, 0])
  np.testing.assert_allclose(once['normals'][..., 1:], ex['normals'][:, ::-1, 1:])
  np.testing.assert_array_equal(once['semseg'], ex['semseg'][:, ::-1])
  twice = augment.random_flip(once, seed)
  for key in ex:
    np.testing.assert_allclose(twice[key], ex[key])


def test_scale_divides_depth_by_the_scale():
  ex = _example()
  ex['depth'] = tf.fill([24, 32], 2.0)
  out = augment.random_scale(ex, tf.constant([3, 4], tf.int64), 0.5, 2.0)
  new_height = out['image'].shape[0]
  scale_estimate = new_height / 24
  assert new_height != 24
  assert out['semseg'].shape[:2] == out['image'].shape[:2] == out['normals'].shape[:2]
  np.testing.assert_allclose(np.unique(out['depth']), [2.0 / scale_estimate],
                             rtol=1.0 / 24)
  assert set(np.unique(out['semseg'])) <= {0, 1, 2}  # nearest: no blended classes


def test_scale_truncates_the_new_size_like_atrc():
  """ATRC's RandomScaling: new size int(x * scale) (brdav/atrc src/data/transforms.py)."""
  ex = _example(23, 31)
  for i in range(6):
    seed = tf.constant([i, 11], tf.int64)
    scale = float(tf.random.stateless_uniform([], seed, 0.5, 2.0))
    out = augment.random_scale(ex, seed, 0.5, 2.0)
    assert out['image'].shape[:2] == (int(23 * np.float32(scale)), int(31 * np.float32(scale)))


def test_train_transform_shapes_padding_and_unit_normals():
  ex = _example()
  crop = (40, 48)  # larger than the image: forces padding
  config = _aug_config(min_scale=1.0, max_scale=1.0)
  out = augment.train_transform(ex, tf.constant([5, 6], tf.int64), config, crop)
  assert out['image'].shape == (40, 48, 3)
  normals = out['normals'].numpy()
  norms = np.linalg.norm(normals, axis=-1)
  valid = norms > 0
  np.testing.assert_allclose(norms[valid], 1.0, rtol=1e-5)
  # Padding is invalid in every label at the same pixels.
  depth_valid = out['depth'].numpy() > 0
  np.testing.assert_array_equal(depth_valid, valid)
  np.testing.assert_array_equal(out['semseg'].numpy() != 255, valid)
  assert (~valid).any()


def test_same_seed_same_output_and_different_seed_differs():
  ex = _example(48, 64)
  config = _aug_config()
  a = augment.train_transform(ex, tf.constant([1, 2], tf.int64), config, (32, 32))
  b = augment.train_transform(ex, tf.constant([1, 2], tf.int64), config, (32, 32))
  c = augment.train_transform(ex, tf.constant([1, 3], tf.int64), config, (32, 32))
  for key in ex:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a['image'], c['image'])


def test_crop_limits_the_dominant_class_when_possible():
  ex = _example(64, 64)
  semseg = np.zeros((64, 64), np.int32)
  semseg[:, 32:] = 1  # a crop must straddle column 32 to see both classes
  ex['semseg'] = tf.constant(semseg)

  def dominant_fraction(ratio, i):
    out = augment.random_crop(ex, tf.constant([i, 7], tf.int64), 32, 32, cat_max_ratio=ratio)
    counts = np.bincount(out['semseg'].numpy().ravel(), minlength=2)
    return counts.max() / counts.sum()

  assert max(dominant_fraction(1.0, i) for i in range(10)) >= 0.75  # unconstrained
  assert all(dominant_fraction(0.75, i) < 0.75 for i in range(10))


def test_a_dropped_semseg_label_does_not_steer_the_crop():
  """Partial labels: the class-ratio check reads the semseg label, so an image that does not
  keep it takes the first crop, as with no check at all."""
  ex = _example(64, 64)
  semseg = np.zeros((64, 64), np.int32)
  semseg[:, 32:] = 1
  ex['semseg'] = tf.constant(semseg)
  crops = {}
  for i in range(10):
    seed = tf.constant([i, 7], tf.int64)
    unchecked, checked, dropped = (
        augment.random_crop(ex, seed, 32, 32, cat_max_ratio=ratio, semseg_kept=kept)['image']
        for ratio, kept in ((1.0, True), (0.75, True), (0.75, False)))
    np.testing.assert_array_equal(dropped, unchecked)
    crops[i] = not np.array_equal(checked, unchecked)
  assert any(crops.values())  # the check moved some crops: the comparison can fail


def test_crop_without_a_person_ignores_human_parts():
  parts = np.zeros((8, 8), np.int32)
  parts[6:, 6:] = 3
  with_person = augment.ignore_parts_without_person({'human_parts': tf.constant(parts)})
  np.testing.assert_array_equal(with_person['human_parts'], parts)
  without = augment.ignore_parts_without_person({'human_parts': tf.constant(parts[:4, :4])})
  assert (np.asarray(without['human_parts']) == 255).all()


def _mmseg_photometric(image, draws):
  """NumPy + OpenCV re-statement of mmseg's PhotoMetricDistortion as ATRC calls it
  (brdav/atrc src/data/transforms.py), with the random choices given."""
  cv2 = pytest.importorskip('cv2')

  def convert(x, alpha=1.0, beta=0.0):
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

  def contrast(x):
    return convert(x, alpha=draws['contrast']) if draws['contrast_on'] else x

  img = image.astype(np.uint8)
  if draws['brightness_on']:
    img = convert(img, beta=draws['brightness'])
  if draws['contrast_first']:
    img = contrast(img)
  if draws['saturation_on']:
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=draws['saturation'])
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if draws['hue_on']:
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + draws['hue']) % 180
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if not draws['contrast_first']:
    img = contrast(img)
  return img


def test_photometric_distortion_matches_mmseg_within_one_level():
  rng = np.random.default_rng(0)
  image = rng.uniform(0, 256, (23, 29, 3)).astype(np.float32)
  image[0, :8] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255],
                  [255, 255, 0], [7, 7, 8], [200, 100, 100]]
  seen = set()
  for i in range(24):
    draws = {k: v.numpy().item() for k, v in
             augment.photometric_draws(tf.constant([i, 3], tf.int64)).items()}
    seen.update(k for k, v in draws.items() if v is True)
    ours = augment.photometric_distortion(tf.constant(image), draws).numpy()
    reference = _mmseg_photometric(image, draws)
    assert np.abs(ours - reference.astype(np.float32)).max() <= 1.0, draws
    assert ours.dtype == np.float32 and (ours == np.floor(ours)).all()
  assert {'brightness_on', 'contrast_first', 'contrast_on', 'saturation_on', 'hue_on'} <= seen


def test_photometric_draws_are_mmsegs_ranges():
  draws = [augment.photometric_draws(tf.constant([i, 9], tf.int64)) for i in range(150)]
  hues = np.array([d['hue'].numpy() for d in draws])
  assert hues.dtype == np.int32 and hues.min() == -18 and hues.max() == 17
  brightness = np.array([d['brightness'].numpy() for d in draws])
  assert -32 <= brightness.min() < -28 and 28 < brightness.max() <= 32
  contrast = np.array([d['contrast'].numpy() for d in draws])
  assert 0.5 <= contrast.min() < 0.55 and 1.45 < contrast.max() <= 1.5
  assert 0.4 < np.mean([d['contrast_first'].numpy() for d in draws]) < 0.6


def test_centred_padding_and_crop_back_are_inverse():
  ex = _example(9, 14)
  padded = augment.pad_centred(ex, 16, 17)
  assert padded['image'].shape == (16, 17, 3)
  # ATRC's PadImage: delta // 2 before, the rest after.
  assert (padded['semseg'].numpy()[:3] == 255).all() and (padded['semseg'].numpy()[12:] == 255).all()
  assert (padded['semseg'].numpy()[3:12, 1:15] != 255).all()
  assert (padded['semseg'].numpy()[:, :1] == 255).all() and (padded['semseg'].numpy()[:, 15:] == 255).all()
  offset = [int(o) for o in augment.centring_offsets(tf.constant([9, 14]), (16, 17))]
  assert offset == [3, 1]
  for key in ex:
    np.testing.assert_array_equal(augment.crop_to_original(padded[key].numpy(), offset, (9, 14)),
                                  ex[key].numpy())


def test_eval_batch_is_centred_per_example_and_only_as_large_as_needed():
  small, large = _example(6, 8, seed=1), _example(10, 12, seed=2)
  ds = tf.data.Dataset.from_generator(
      lambda: iter([augment.eval_transform(small), augment.eval_transform(large)]),
      output_signature={k: tf.TensorSpec(v.shape[:0].concatenate([None, None]) +
                                         v.shape[2:], v.dtype) for k, v in small.items()} |
      {'size': tf.TensorSpec([2], tf.int32)})
  ds = ds.padded_batch(2, padding_values=augment.padding_values(ds.element_spec))
  for min_size, shape in [((4, 4), (10, 12)), ((11, 16), (11, 16))]:
    batch = augment.centre_in_batch(next(iter(ds)), min_size)
    assert batch['image'].shape[1:3] == shape
    for i, original in enumerate([small, large]):
      offset, size = batch['offset'][i].numpy(), batch['size'][i].numpy()
      np.testing.assert_array_equal(offset, (np.array(shape) - size) // 2)
      for key in ('semseg', 'depth', 'normals'):
        np.testing.assert_array_equal(augment.crop_to_original(batch[key][i].numpy(), offset, size),
                                      original[key].numpy())
      outside = np.ones(shape, bool)
      outside[offset[0]:offset[0] + size[0], offset[1]:offset[1] + size[1]] = False
      assert (batch['semseg'][i].numpy()[outside] == 255).all()
      assert (batch['depth'][i].numpy()[outside] == 0).all()
      assert (batch['image'][i].numpy()[outside] == 0).all()
