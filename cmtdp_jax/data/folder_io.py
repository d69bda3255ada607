"""Reading real datasets from local folders into TFDS (nothing is downloaded).

The builders of `nyud` and `pascal_context` share this module: file readers
that fail with one line naming the file (`FolderError`, a ValueError, so
`prepare` and `main` print it without a traceback), the feature types that
`pipeline._decoder` reads, and `make_builder`, which finds or prepares the
dataset for a `config.data`.

Preparation goes through `generation.build_once` (safe when runs race) and
TFDS's `download_and_prepare`, which writes into a temporary folder and
renames it only when every split is complete, so a failed preparation never
leaves a dataset that looks finished.
"""

from __future__ import annotations

import collections
import os

import numpy as np
import scipy.io
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from cmtdp_jax.data import generation


class FolderError(ValueError):
  """A dataset folder or file is missing, unreadable or inconsistent."""


def fail(path, problem):
  """FolderError whose one-line message starts with the offending path."""
  return FolderError(f'{path}: {" ".join(str(problem).split())}')


def require_dir(path):
  if not os.path.isdir(path):
    raise fail(path, 'folder not found')
  return path


def require_file(path):
  if not os.path.isfile(path):
    raise fail(path, 'file not found')
  return path


def read_ids(path):
  """Non-empty lines of a split list."""
  with open(require_file(path)) as f:
    ids = [line.strip() for line in f if line.strip()]
  if not ids:
    raise fail(path, 'split list is empty')
  return ids


def _open_image(path):
  try:
    image = Image.open(require_file(path))
    image.load()
    return image
  except (OSError, ValueError) as e:
    raise fail(path, f'unreadable image ({e})') from e


def read_rgb(path):
  """RGB pixels as PIL decodes them, as the peers read images.

  Stored as lossless PNG rather than the original JPEG bytes: TensorFlow's
  JPEG decoder (fast integer IDCT) differs from PIL's by up to a few levels.
  """
  return np.asarray(_open_image(path).convert('RGB'))


def read_png(path):
  """Pixel values as stored (palette PNGs give their indices)."""
  return np.asarray(_open_image(path))


def read_npy(path):
  with open(require_file(path), 'rb') as f:
    start = f.read(6)
  if start != b'\x93NUMPY':  # np.load would call it pickled data
    raise fail(path, f'not a NumPy .npy file (it starts with {start!r})')
  try:
    return np.load(path)
  except (OSError, ValueError) as e:
    raise fail(path, f'unreadable .npy ({e})') from e


def read_mat(path, key):
  """Variable `key` of a MATLAB file."""
  try:
    contents = scipy.io.loadmat(require_file(path))
  except (OSError, ValueError, NotImplementedError) as e:
    raise fail(path, f'unreadable .mat ({e})') from e
  if key not in contents:
    raise fail(path, f"has no variable '{key}'")
  return contents[key]


def check_shape(path, label, size, channels=None):
  """Labels must have their image's (height, width) and `channels` (None: 2-D)."""
  want = tuple(size) + ((channels,) if channels else ())
  if label.shape != want:
    raise fail(path, f'label shape {label.shape} differs from the expected {want} '
                     f'(image {size[0]}x{size[1]})')
  return label


def check_values(path, label, valid, meaning=''):
  bad = np.setdiff1d(np.unique(label), valid)
  if bad.size:
    raise fail(path, f'unexpected label values {bad[:10].tolist()}{meaning}')
  return label


def check_depth(path, depth):
  """Depth with 0 where invalid; a map without one valid value is refused, not
  trained on as an all-ignored image."""
  valid = np.isfinite(depth) & (depth > 0)
  if not valid.any():
    raise fail(path, 'no valid depth value (all are NaN, infinite, zero or negative)')
  return np.where(valid, depth, 0.0).astype(np.float32)


def read_depth_npy(path, size):
  """A depth .npy of H x W or H x W x 1, checked (`check_depth`) and of the image's size."""
  depth = read_npy(path).astype(np.float32)
  if depth.ndim == 3 and depth.shape[-1] == 1:
    depth = depth[..., 0]
  return check_depth(path, check_shape(path, depth, size))


def check_disjoint(split_lists):
  """Every split list after the first (train) shares no id with the first."""
  (train_path, train_ids), *others = split_lists.items()
  for path, ids in others:
    shared = sorted(set(ids) & set(train_ids))
    if shared:
      raise fail(path, f'shares {len(shared)} ids with {train_path} (e.g. {shared[0]}): '
                       'evaluating on training images')


class NormalsCheck:
  """Normals must be unit vectors, or near zero where invalid.

  The peers' files are close to, not exactly, unit length: 8-bit PNGs (NYUDv2,
  PASCAL normals_distill) decode as 2x/255 - 1, whose length is off by up to
  sqrt(3)/255 < 0.007 (and a zero vector becomes one of length <= 0.007), and
  PASCAL's are zero outside the classes NYUD shares (checked after that mask).
  So a length within `TOLERANCE` of 1 is unit and one below it invalid. A file
  with more than `MAX_OFF_SHARE` of other lengths has another encoding (raw
  0..255 values, x/255 instead of 2x/255 - 1) and is refused; a few such
  pixels are made invalid and counted, with one warning per split.
  """

  TOLERANCE = 0.1
  MAX_OFF_SHARE = 0.01

  def __init__(self):
    self.off_unit = collections.Counter()

  def __call__(self, path, normals):
    length = np.linalg.norm(normals, axis=-1)
    off = (length >= self.TOLERANCE) & (np.abs(length - 1.0) > self.TOLERANCE)
    if off.mean() > self.MAX_OFF_SHARE:
      raise fail(path, f'normals are not unit vectors: {off.mean():.0%} of the pixels have '
                       f'lengths other than 1 (median {np.median(length[off]):.3g}); expected '
                       'unit vectors, zero where invalid')
    if off.any():
      self.off_unit[path] += int(off.sum())
    return np.where(off[..., None], 0.0, normals).astype(np.float32)

  def warn(self, split):
    if self.off_unit:
      logging.warning('%s: %d normals pixels in %d files were not unit length and count as '
                      'invalid (most in %s)', split, sum(self.off_unit.values()),
                      len(self.off_unit), self.off_unit.most_common(1)[0][0])


def image_feature():
  return tfds.features.Image(shape=(None, None, 3))


def categorical_feature():
  """uint8 class map with 255 = ignore, stored as a lossless PNG."""
  return tfds.features.Image(shape=(None, None, 1), use_colormap=False)


def depth_feature():
  return tfds.features.Tensor(shape=(None, None), dtype=np.float32, encoding='zlib')


def normals_feature():
  return tfds.features.Tensor(shape=(None, None, 3), dtype=np.float32, encoding='zlib')


def categorical(label):
  """A class map as `categorical_feature` stores it."""
  return np.asarray(label, np.uint8)[..., None]


def make_builder(builder_cls, data_config, detect_packaging, layout):
  """The prepared builder for `data_config`, preparing it from a folder if needed.

  The packaging (builder config) is `data_config.packaging`, else detected
  from `data_config.manual_dir`, else the only one already prepared in
  `data_config.data_dir`. Without a prepared dataset and a folder, fails with
  the prepare command to run; `layout` says which folder it expects.
  """
  data_dir = data_config.data_dir or None
  src = data_config.manual_dir
  if src:
    require_dir(src)
  packaging = data_config.packaging
  names = [c.name for c in builder_cls.BUILDER_CONFIGS]
  if packaging and packaging not in names:
    raise FolderError(f"config.data.packaging='{packaging}' is not a packaging of "
                      f"'{builder_cls.name}' (valid: {', '.join(names)})")
  if not packaging and src:
    packaging = detect_packaging(src)
  if not packaging:
    packaging = _prepared_packaging(builder_cls, data_dir, layout)
  builder = builder_cls(config=packaging, data_dir=data_dir)
  if not builder.is_prepared():
    if not src:
      raise _not_prepared(builder_cls.name, data_dir, layout)
    builder = generation.build_once(
        lambda: builder_cls(config=packaging, data_dir=data_dir),
        tfds.download.DownloadConfig(manual_dir=src, try_download_gcs=False))
  return builder


def _prepared_packaging(builder_cls, data_dir, layout):
  names = [c.name for c in builder_cls.BUILDER_CONFIGS]
  prepared = [n for n in names if builder_cls(config=n, data_dir=data_dir).is_prepared()]
  if not prepared:
    raise _not_prepared(builder_cls.name, data_dir, layout)
  if len(prepared) > 1:
    raise FolderError(f"several packagings of '{builder_cls.name}' are prepared "
                      f"({', '.join(prepared)}); choose one with config.data.packaging")
  return prepared[0]


def _not_prepared(name, data_dir, layout):
  return FolderError(
      f"dataset '{name}' is not prepared in {data_dir or tfds.core.constants.DATA_DIR}; run "
      f'python -m cmtdp_jax.data.prepare --dataset {name} --src DIR (DIR: {layout}) '
      'or set config.data.manual_dir')
