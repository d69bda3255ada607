"""TFDS builders for MTAN's preprocessed NYUv2 and Cityscapes, from a local folder.

The partial-label benchmark (MTPSL, JTR, DiffusionMTL) trains on the files of
lorenmt/mtan `create_dataset.py`, read as MTPSL's `dataset/nyuv2ssl.py` and
`dataset/cityscapesssl.py` and JTR's `code/datasets/nyuv2.py` read them:

  ROOT/{train,val}/image/{i}.npy   H x W x 3 floats in [0, 1], not normalised
  ROOT/{train,val}/label/{i}.npy   H x W class ids, -1 = ignore   (NYUv2: 13 classes)
  ROOT/{train,val}/label_7/{i}.npy                                (Cityscapes: 7 classes)
  ROOT/{train,val}/depth/{i}.npy   H x W x 1, 0 = invalid (NYUv2 metres, Cityscapes inverse depth)
  ROOT/{train,val}/normal/{i}.npy  H x W x 3 unit vectors, all-zero = invalid (NYUv2 only)

`i` counts from 0 and the number of files in image/ is the split's size
(NYUv2 795 / 654 at 288x384; Cityscapes 2975 / 500 at 128x256). Example `i`
keeps the id 'i', so row i of a published split file is its image. Stored in
the conventions of `cmtdp_jax.tasks`: class -1 becomes 255; the image is kept
as float32 times 255 (the pipeline's 0..255 scale; `augment.IMAGE_NORMALIZATIONS`
'unit_range' divides it back, exact to one float32 rounding).
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from cmtdp_jax import data as data_lib
from cmtdp_jax import tasks as tasks_lib
from cmtdp_jax.data import folder_io
from cmtdp_jax.data import generation

SPLITS = {'train': 'train', 'validation': 'val'}


def _layout(label_folder, folders):
  return (f'MTAN\'s folder with train/ and val/, each with image/, {label_folder}/, '
          f"{', '.join(folders)} of 0.npy, 1.npy, ...")


def _check_range(path, values, low, high, what):
  if values.size and (values.min() < low or values.max() > high):
    raise folder_io.fail(path, f'{what} values lie in [{values.min():.4g}, {values.max():.4g}], '
                               f'not [{low}, {high}]')
  return values


def _image(path):
  image = folder_io.read_npy(path).astype(np.float64)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise folder_io.fail(path, f'image shape {image.shape}, not H x W x 3')
  return (_check_range(path, image, 0.0, 1.0, 'image') * 255.0).astype(np.float32)


def _semseg(path, size, num_classes):
  label = folder_io.check_shape(path, folder_io.read_npy(path), size)
  folder_io.check_values(path, label, np.arange(-1, num_classes),
                         f' (class ids 0..{num_classes - 1}, -1 = ignore)')
  return folder_io.categorical(np.where(label < 0, tasks_lib.IGNORE_LABEL, label))


def _normals(path, size):
  normals = folder_io.read_npy(path).astype(np.float32)
  return folder_io.check_shape(path, normals, size, channels=3)


class _MtanBuilder(generation.Builder, skip_registration=True):
  """One of MTAN's datasets, from the folder given as the manual dir."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name='mtan', description="MTAN's .npy files")]
  label_folder: str  # the semseg folder
  folders: dict[str, str]  # task -> folder, besides semseg

  @classmethod
  def layout(cls):
    return _layout(cls.label_folder, cls.folders.values())

  def _info(self):
    features = {'id': tfds.features.Text(), 'image': tfds.features.Tensor(
        shape=(None, None, 3), dtype=np.float32, encoding='zlib'),
                'semseg': folder_io.categorical_feature(), 'depth': folder_io.depth_feature()}
    if 'normals' in self.folders:
      features['normals'] = folder_io.normals_feature()
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(features), disable_shuffling=True,
        description=f'{self.name}: MTAN\'s preprocessed files; see cmtdp_jax/data/mtan.py.')

  def _split_generators(self, dl_manager):
    src = os.fspath(dl_manager.manual_dir)
    files = {split: self.split_files(src, folder) for split, folder in SPLITS.items()}
    return {split: self._generate_examples(split, examples) for split, examples in files.items()}

  @classmethod
  def split_files(cls, src, split_folder):
    """Every example's files, checked to exist before anything is written."""
    root = folder_io.require_dir(os.path.join(src, split_folder))
    images = folder_io.require_dir(os.path.join(root, 'image'))
    count = len([n for n in os.listdir(images) if n.endswith('.npy')])
    if not count:
      raise folder_io.fail(images, f'no .npy files; expected {cls.layout()}')
    folders = {'image': 'image', 'semseg': cls.label_folder, **cls.folders}
    return [{'id': str(i), **{key: folder_io.require_file(os.path.join(root, folder, f'{i}.npy'))
                              for key, folder in folders.items()}} for i in range(count)]

  def _generate_examples(self, split, examples):
    num_classes = data_lib.DATASETS[self.name].num_classes['semseg']
    normals_check = folder_io.NormalsCheck()
    for files in generation.examples(examples, split, len(examples)):
      image = _image(files['image'])
      size = image.shape[:2]
      example = {'id': files['id'], 'image': image,
                 'semseg': _semseg(files['semseg'], size, num_classes),
                 'depth': folder_io.read_depth_npy(files['depth'], size)}
      if 'normals' in files:
        example['normals'] = normals_check(files['normals'], _normals(files['normals'], size))
      yield int(files['id']), example
    normals_check.warn(split)


class Nyuv2Mtan(_MtanBuilder):
  name = 'nyuv2_mtan'
  label_folder = 'label'
  folders = {'depth': 'depth', 'normals': 'normal'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'Pass MTAN\'s NYUv2 folder as the manual dir.'


class CityscapesMtan(_MtanBuilder):
  name = 'cityscapes_mtan'
  label_folder = 'label_7'
  folders = {'depth': 'depth'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'Pass MTAN\'s Cityscapes folder as the manual dir.'


BUILDERS = {cls.name: cls for cls in (Nyuv2Mtan, CityscapesMtan)}


def make_builder(data_config):
  """Prepared builder for `data_config` (see `folder_io.make_builder`)."""
  builder_cls = BUILDERS[data_config.name]

  def detect_packaging(src):
    builder_cls.split_files(src, SPLITS['train'])  # the layout, in one line if it is not
    return 'mtan'
  return folder_io.make_builder(builder_cls, data_config, detect_packaging, builder_cls.layout())
