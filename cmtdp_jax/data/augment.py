"""Label-consistent augmentation in tf.data (the ATRC protocol, SPEC section 3).

An example is a dict with 'image' (float32 [H, W, 3], 0..255) and one entry
per task in the label conventions of `cmtdp_jax.tasks`. Every random op is
stateless and takes an explicit seed, so the same (seed, sample counter)
always gives the same crop: resumed runs see exactly the same data.

Geometric ops treat labels by kind: categorical maps and normals are resized
with nearest neighbour, depth too but divided by the scale factor (an object
scaled up by s looks s times closer); a horizontal flip negates the normals'
x component. Padding is centred (delta // 2 before, the rest after, ATRC's
`PadImage`) with 0 in the normalised image (the mean colour) and each label's
invalid value (255 / 0); `crop_to_original` undoes it.

Training augmentations are chosen by name (`config.data.augment.name`,
`AUGMENTATIONS`):
  'atrc'             ATRC's training transforms (brdav/atrc src/data/pl_data.py), in
                     order: random scale, random crop (class-ratio limited), flip,
                     photometric distortion, normalisation, centred padding to the crop.
  'mtan_scale_crop'  the partial-label benchmark's (MTPSL dataset/nyuv2ssl.py and
                     cityscapesssl.py `RandomScaleCrop`): optional flip, then a crop of
                     1/s of each side, s drawn from `scales`, resized back to the
                     image's size; normalisation.
Images are normalised as `config.data.image_normalization` names
(`IMAGE_NORMALIZATIONS`): ImageNet's mean and std, or MTAN's [0, 1].
"""

from __future__ import annotations

import tensorflow as tf

from cmtdp_jax import tasks as tasks_lib

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# name -> (mean, std) of the 0..255 image: normalised = (image - mean) / std.
IMAGE_NORMALIZATIONS = {
    'imagenet': (IMAGENET_MEAN, IMAGENET_STD),
    'unit_range': ((0.0, 0.0, 0.0), (255.0, 255.0, 255.0)),  # MTAN's images in [0, 1]
}


def _label_keys(example):
  return [k for k in example if k in tasks_lib.TASKS]


def _pad_value(key):
  """A label's invalid value (255 categorical, 0 depth and normals); 0 otherwise."""
  if key not in tasks_lib.TASKS:
    return 0
  return tasks_lib.IGNORE_LABEL if tasks_lib.get_task(key).label_kind == tasks_lib.CATEGORICAL else 0


def random_scale(example, seed, min_scale, max_scale):
  """Rescales image (bilinear) and labels (nearest) by s ~ U(min, max) to
  int(size * s), truncated as ATRC's RandomScaling does."""
  scale = tf.random.stateless_uniform([], seed, min_scale, max_scale)
  shape = tf.cast(tf.shape(example['image'])[:2], tf.float32)
  size = tf.cast(shape * scale, tf.int32)
  out = dict(example)
  out['image'] = tf.image.resize(example['image'], size, method='bilinear')
  for task in _label_keys(example):
    label = example[task]
    expanded = label[..., None] if label.shape.rank == 2 else label
    resized = tf.image.resize(expanded, size, method='nearest')
    out[task] = resized[..., 0] if label.shape.rank == 2 else resized
    if tasks_lib.get_task(task).label_kind == tasks_lib.DEPTH:  # metres seen from closer
      out[task] = out[task] / scale
  return out


def centring_offsets(size, target):
  """(top, left) of images of `size` ([..., 2]) centred in `target` (height, width):
  delta // 2 before, the rest after (ATRC's PadImage)."""
  size = tf.convert_to_tensor(size)
  return tf.maximum(tf.cast(tf.stack(target), size.dtype) - size, 0) // 2


def pad_centred(example, height, width):
  """Pads to at least (height, width), centred: image with 0 (the mean after
  normalisation), labels with their invalid value."""
  shape = tf.shape(example['image'])
  pad_h = tf.maximum(height - shape[0], 0)
  pad_w = tf.maximum(width - shape[1], 0)
  top, left = tf.unstack(centring_offsets(shape[:2], (height, width)))
  spatial = [[top, pad_h - top], [left, pad_w - left]]
  out = dict(example)
  out['image'] = tf.pad(example['image'], spatial + [[0, 0]])
  for task in _label_keys(example):
    label = example[task]
    paddings = spatial + [[0, 0]] * (label.shape.rank - 2)
    out[task] = tf.pad(label, paddings, constant_values=tf.cast(_pad_value(task), label.dtype))
  return out


def crop_to_original(array, offset, size):
  """The (height, width) = `size` region at (top, left) = `offset` of a centred-padded map."""
  (top, left), (height, width) = offset, size
  return array[top:top + height, left:left + width]


def _crop(example, top, left, height, width):
  out = dict(example)
  for key in ['image'] + _label_keys(example):
    out[key] = example[key][top:top + height, left:left + width]
  return out


def random_crop(example, seed, height, width, cat_max_ratio=1.0, tries=11, semseg_kept=True):
  """Random crop of at most (height, width): a smaller side is kept whole
  (ATRC's RandomCrop, padding comes after).

  With cat_max_ratio < 1 (ATRC: 0.75), up to `tries` crops are drawn and the
  first whose most frequent semseg class covers less than that fraction of the
  labelled pixels is kept, the last one unchecked: ATRC checks 10 and keeps
  the 11th otherwise. An image whose semseg label is dropped (`semseg_kept`
  false, partial labels) keeps the first crop: its label must not steer it.
  """
  shape = tf.shape(example['image'])
  height, width = tf.minimum(height, shape[0]), tf.minimum(width, shape[1])
  seeds = tf.random.experimental.stateless_split(seed, tries)
  use_ratio = cat_max_ratio < 1.0 and 'semseg' in example

  def offsets(i):
    top_seed, left_seed = tf.unstack(tf.random.experimental.stateless_split(seeds[i], 2))
    top = tf.random.stateless_uniform([], top_seed, 0, shape[0] - height + 1, tf.int32)
    left = tf.random.stateless_uniform([], left_seed, 0, shape[1] - width + 1, tf.int32)
    return top, left

  top, left = offsets(0)
  if use_ratio:
    def acceptable(t, l):
      crop = example['semseg'][t:t + height, l:l + width]
      labels = tf.boolean_mask(crop, crop != tasks_lib.IGNORE_LABEL)
      _, _, counts = tf.unique_with_counts(tf.reshape(labels, [-1]))
      total = tf.maximum(tf.reduce_sum(counts), 1)
      return tf.logical_and(tf.size(counts) > 1,
                            tf.cast(tf.reduce_max(counts), tf.float32) <
                            cat_max_ratio * tf.cast(total, tf.float32))

    def cond(i, t, l):
      return tf.logical_and(tf.logical_and(i < tries, semseg_kept),
                            tf.logical_not(acceptable(t, l)))

    def body(i, t, l):
      t, l = offsets(tf.minimum(i, tries - 1))
      return i + 1, t, l

    _, top, left = tf.while_loop(cond, body, (tf.constant(1), top, left))
  return _crop(example, top, left, height, width)


def random_flip(example, seed):
  """Horizontal flip with p=0.5; the normals' x component changes sign."""
  flip = tf.random.stateless_uniform([], seed) < 0.5
  out = dict(example)
  for key in ['image'] + _label_keys(example):
    out[key] = tf.cond(flip, lambda v=example[key]: tf.reverse(v, [1]), lambda v=example[key]: v)
  for task in _label_keys(example):
    if tasks_lib.get_task(task).label_kind == tasks_lib.NORMALS:
      x, yz = out[task][..., :1], out[task][..., 1:]
      out[task] = tf.concat([tf.where(flip, -x, x), yz], axis=-1)
  return out


def photometric_draws(seed, brightness=32.0, contrast=(0.5, 1.5), saturation=(0.5, 1.5),
                      hue=18):
  """The random choices of one `photometric_distortion`, as mmseg draws them
  (brdav/atrc src/data/transforms.py PhotoMetricDistortion): each op with
  p=0.5, contrast either before or after the saturation/hue block, the hue
  shift an integer in [-hue, hue - 1] of OpenCV's 0-180 hue units."""
  s = tf.random.experimental.stateless_split(seed, 9)

  def coin(i):
    return tf.random.stateless_uniform([], s[i]) < 0.5

  def uniform(i, low, high):
    return tf.random.stateless_uniform([], s[i], low, high)

  return {
      'brightness_on': coin(0), 'brightness': uniform(1, -brightness, brightness),
      'contrast_first': coin(2),
      'contrast_on': coin(3), 'contrast': uniform(4, *contrast),
      'saturation_on': coin(5), 'saturation': uniform(6, *saturation),
      'hue_on': coin(7),
      'hue': tf.random.stateless_uniform([], s[8], -hue, hue, dtype=tf.int32),
  }


def _uint8(x):
  """mmseg's clip to [0, 255] and astype(uint8) (truncation), kept as float32."""
  return tf.floor(tf.clip_by_value(x, 0.0, 255.0))


def rgb_to_hsv_uint8(rgb):
  """OpenCV's 8-bit RGB2HSV (H 0-179, S and V 0-255) in its fixed-point arithmetic
  (imgproc color_hsv: 12-bit division tables, rounding by + 2048 >> 12)."""
  r, g, b = tf.unstack(tf.cast(rgb, tf.int32), axis=-1)
  v = tf.maximum(tf.maximum(r, g), b)
  diff = v - tf.minimum(tf.minimum(r, g), b)
  shift = 12

  def division_table(numerator, d):
    safe = tf.cast(tf.maximum(d, 1), tf.float64)
    table = tf.cast(tf.round((numerator << shift) / safe), tf.int32)
    return tf.where(d > 0, table, 0)

  def rounded(x):
    return tf.bitwise.right_shift(x + (1 << (shift - 1)), shift)  # floors negative x too

  s = rounded(diff * division_table(255, v))
  h = tf.where(v == r, g - b, tf.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
  h = rounded(h * division_table(30, diff))  # 180 / 6 hue units per sector
  h = tf.where(h < 0, h + 180, h)
  return tf.cast(tf.stack([h, s, v], axis=-1), tf.float32)


# OpenCV's HSV2RGB sector table, as indices into (v, p, q, t) for r, g and b.
_SECTOR_SOURCES = ((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2))


def hsv_to_rgb_uint8(hsv):
  """OpenCV's 8-bit HSV2RGB: float computation, rounded to the nearest level."""
  h, s, v = tf.unstack(hsv, axis=-1)
  h = h * (6.0 / 180.0)
  s = s * (1.0 / 255.0)
  v = v * (1.0 / 255.0)
  sector = tf.math.floormod(tf.floor(h), 6.0)
  f = h - tf.floor(h)
  values = tf.stack([v, v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))], axis=-1)
  sector = tf.cast(sector, tf.int32)
  channels = [tf.gather(values, tf.gather(tf.constant(sources), sector), batch_dims=sector.shape.rank)
              for sources in _SECTOR_SOURCES]
  return tf.round(tf.stack(channels, axis=-1) * 255.0)


def photometric_distortion(image, draws):
  """mmseg's PhotoMetricDistortion as ATRC uses it, on an RGB image of uint8
  values (float32 0..255 in, float32 integer levels out); every op clips and
  truncates to uint8, like mmseg's."""

  def maybe(on, fn, x):
    return tf.cond(on, lambda: fn(x), lambda: x)

  def contrast(x):
    return maybe(draws['contrast_on'], lambda y: _uint8(y * draws['contrast']), x)

  def in_hsv(fn):
    return lambda x: hsv_to_rgb_uint8(fn(rgb_to_hsv_uint8(x)))

  def saturate(hsv):
    return tf.stack([hsv[..., 0], _uint8(hsv[..., 1] * draws['saturation']), hsv[..., 2]], -1)

  def shift_hue(hsv):
    hue = tf.math.floormod(hsv[..., 0] + tf.cast(draws['hue'], tf.float32), 180.0)
    return tf.concat([hue[..., None], hsv[..., 1:]], -1)

  image = _uint8(image)
  image = maybe(draws['brightness_on'], lambda x: _uint8(x + draws['brightness']), image)
  image = maybe(draws['contrast_first'], contrast, image)
  image = maybe(draws['saturation_on'], in_hsv(saturate), image)
  image = maybe(draws['hue_on'], in_hsv(shift_hue), image)
  return maybe(tf.logical_not(draws['contrast_first']), contrast, image)


def normalize(image, normalization='imagenet'):
  mean, std = IMAGE_NORMALIZATIONS[normalization]
  return (image - tf.constant(mean)) / tf.constant(std)


def train_transform(example, seed, aug_config, crop_size, semseg_kept=True,
                    normalization='imagenet'):
  """The augmentation `aug_config.name` names (default 'atrc')."""
  transform = AUGMENTATIONS[aug_config.get('name', 'atrc')]
  return transform(example, seed, aug_config, crop_size, semseg_kept, normalization)


def _resize_aligned(x, size, method):
  """F.interpolate(mode='bilinear', align_corners=True), or mode='nearest' (floor of
  dst * in / out), on [H, W, C]."""
  resize = tf.raw_ops.ResizeBilinear if method == 'bilinear' else tf.raw_ops.ResizeNearestNeighbor
  out = resize(images=x[None], size=size, align_corners=method == 'bilinear',
               half_pixel_centers=False)[0]
  return tf.cast(out, x.dtype)


def scale_crop(example, seed, scales):
  """MTPSL's RandomScaleCrop: s from `scales`, a crop of int(H / s) x int(W / s) at a
  uniform position, resized back to H x W: image and normals bilinear with aligned
  corners (normals not renormalised, as theirs), class maps and depth nearest, depth
  divided by s."""
  seeds = tf.random.experimental.stateless_split(seed, 3)
  scale = tf.gather(tf.constant(scales, tf.float64), tf.random.stateless_uniform(
      [], seeds[0], 0, len(scales), dtype=tf.int32))
  size = tf.shape(example['image'])[:2]
  crop = tf.cast(tf.cast(size, tf.float64) / scale, tf.int32)  # Python's int(height / sc)
  top = tf.random.stateless_uniform([], seeds[1], 0, size[0] - crop[0] + 1, dtype=tf.int32)
  left = tf.random.stateless_uniform([], seeds[2], 0, size[1] - crop[1] + 1, dtype=tf.int32)
  out = _crop(example, top, left, crop[0], crop[1])
  out['image'] = _resize_aligned(out['image'], size, 'bilinear')
  for task in _label_keys(example):
    kind = tasks_lib.get_task(task).label_kind
    label = out[task][..., None] if out[task].shape.rank == 2 else out[task]
    label = _resize_aligned(label, size, 'bilinear' if kind == tasks_lib.NORMALS else 'nearest')
    out[task] = label[..., 0] if example[task].shape.rank == 2 else label
    if kind == tasks_lib.DEPTH:
      out[task] = out[task] / tf.cast(scale, out[task].dtype)
  return out


def mtan_scale_crop(example, seed, aug_config, crop_size, semseg_kept=True,
                    normalization='unit_range'):
  """The benchmark's training view (MTPSL dataset/nyuv2ssl.py, cityscapesssl.py):
  `scale_crop` with `aug_config.scales`, Cityscapes flipping first (`flip`)."""
  del semseg_kept
  flip_seed, crop_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if aug_config.flip:
    example = random_flip(example, flip_seed)
  out = scale_crop(example, crop_seed, aug_config.scales)
  out['image'] = normalize(out['image'], normalization)
  return pad_centred(out, *crop_size)


def extra_views(example, seed, count: int, scales=(1.0, 1.2, 1.5)):
  """`count` further views of a training view for MTPSL's and JTR's regularizers: each
  an independent `scale_crop` of it (MTPSL nyuv2ssl.py aug_twice; JTR
  code/datasets/nyuv2.py), image and labels."""
  view = {k: v for k, v in example.items() if k == 'image' or k in tasks_lib.TASKS}
  return tuple(scale_crop(view, tf.random.experimental.stateless_fold_in(seed, 1 + i), scales)
               for i in range(count))


def atrc_transform(example, seed, aug_config, crop_size, semseg_kept=True,
                   normalization='imagenet'):
  """Full training augmentation, in ATRC's order: scale, crop, flip,
  photometric, normalise, centred padding to `crop_size`. `semseg_kept`: whether
  the image keeps its semseg label (`random_crop`)."""
  seeds = tf.random.experimental.stateless_split(seed, 4)
  height, width = crop_size
  if aug_config.max_scale > aug_config.min_scale or aug_config.min_scale != 1.0:
    example = random_scale(example, seeds[0], aug_config.min_scale, aug_config.max_scale)
  example = random_crop(example, seeds[2], height, width, aug_config.cat_max_ratio,
                        semseg_kept=semseg_kept)
  if aug_config.flip:
    example = random_flip(example, seeds[3])
  if aug_config.photometric:
    example = dict(example, image=photometric_distortion(example['image'],
                                                         photometric_draws(seeds[1])))
  example = dict(example, image=normalize(example['image'], normalization))
  example = pad_centred(example, height, width)
  if aug_config.parts_need_person and 'human_parts' in example:
    example = ignore_parts_without_person(example)
  return example


def ignore_parts_without_person(example):
  """PASCAL annotates parts only on some people: a crop showing no part pixel
  says nothing about parts, so all its human_parts labels become ignore (ATRC)."""
  parts = example['human_parts']
  has_person = tf.reduce_any((parts > 0) & (parts != tasks_lib.IGNORE_LABEL))
  return dict(example, human_parts=tf.where(
      has_person, parts, tf.fill(tf.shape(parts), tf.cast(tasks_lib.IGNORE_LABEL, parts.dtype))))


AUGMENTATIONS = {'atrc': atrc_transform, 'mtan_scale_crop': mtan_scale_crop}


def eval_transform(example, normalization='imagenet'):
  """Normalises; 'size' keeps the original (height, width) so predictions can be
  cropped back before scoring (boundary tolerances scale with the true diagonal).
  Padding is per batch (`centre_in_batch`)."""
  size = tf.shape(example['image'])[:2]
  return dict(example, image=normalize(example['image'], normalization), size=size)


def padding_values(element_spec):
  """`padded_batch` fill values: 0 for the image, each label's invalid value."""
  def fill(key, spec):
    if spec.dtype == tf.string:
      return tf.constant(b'')
    return tf.cast(_pad_value(key), spec.dtype)
  return {key: fill(key, spec) for key, spec in element_spec.items()}


def centre_in_batch(batch, min_size):
  """Re-pads a `padded_batch` batch (filled bottom/right) to at least `min_size`,
  every example centred (ATRC's PadImage at evaluation), and adds its 'offset'.

  The batch is only as large as its largest image needs (ATRC pads NYUD only up
  to its crop size, so same-size 480x640 or 425x560 images get no padding).
  """
  shape = tf.shape(batch['image'])
  target = [tf.maximum(shape[1], min_size[0]), tf.maximum(shape[2], min_size[1])]
  offsets = centring_offsets(batch['size'], target)
  out = dict(batch, offset=offsets)
  for key in ['image'] + _label_keys(batch):
    x = batch[key]
    extra = [[0, 0], [0, target[0] - shape[1]], [0, target[1] - shape[2]]]
    x = tf.pad(x, extra + [[0, 0]] * (x.shape.rank - 3),
               constant_values=tf.cast(_pad_value(key), x.dtype))
    # The fill sits after each image, and at least `offset` of it: rolling moves it in front.
    out[key] = tf.map_fn(lambda args: tf.roll(args[0], args[1], axis=[0, 1]), (x, offsets),
                         fn_output_signature=x.dtype)
  return out
