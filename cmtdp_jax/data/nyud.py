"""TFDS builder for NYUD-v2 (semseg, depth, normals, edge) from a local folder.

Two packagings are in circulation (SPEC section 2); each is a builder config,
told apart by the file types in the folder (`detect_packaging`):

  nyud_mt (Multi-Task-Learning-PyTorch, ATRC; 480x640 or 425x560):
    images/<id>.jpg, segmentation/<id>.png, depth/<id>.npy,
    normals/<id>.npy, edge/<id>.npy
  nyudv2 (InvPT; 425x560):
    images/<id>.png, segmentation/<id>.png, depth/<id>.npy,
    normals/<id>.png (2x/255 - 1), edge/<id>.png (x/255)

both with gt_sets/train.txt (795 ids) and gt_sets/val.txt (654 ids). Labels
are stored in the conventions of `cmtdp_jax.tasks`: semseg PNG 0 (unlabeled)
becomes 255 and every other value drops by one (40 classes); depth in metres
with 0 invalid; normals with zero vectors invalid; edge 0/1.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from cmtdp_jax import data as data_lib
from cmtdp_jax import tasks as tasks_lib
from cmtdp_jax.data import folder_io
from cmtdp_jax.data import generation

LAYOUT = ('a NYUD_MT or NYUDv2 folder with images/, segmentation/, depth/, normals/, edge/ '
          'and gt_sets/{train,val}.txt')
SPLIT_LISTS = {'train': 'train.txt', 'validation': 'val.txt'}
FOLDERS = {'image': 'images', 'semseg': 'segmentation', 'depth': 'depth', 'normals': 'normals',
           'edge': 'edge'}


@dataclasses.dataclass
class NyudConfig(tfds.core.BuilderConfig):
  """A packaging: the file extension in each of `FOLDERS`."""
  extensions: dict[str, str] = dataclasses.field(default_factory=dict)


PACKAGINGS = {
    'nyud_mt': NyudConfig(
        name='nyud_mt', description='NYUD_MT: JPEG images, NumPy depth/normals/edge.',
        extensions={'image': 'jpg', 'semseg': 'png', 'depth': 'npy', 'normals': 'npy',
                    'edge': 'npy'}),
    'nyudv2': NyudConfig(
        name='nyudv2', description='NYUDv2: PNG images/normals/edge, NumPy depth.',
        extensions={'image': 'png', 'semseg': 'png', 'depth': 'npy', 'normals': 'png',
                    'edge': 'png'}),
}


def detect_packaging(src):
  """'nyud_mt' or 'nyudv2', from the image type of the first training id."""
  split_list = os.path.join(folder_io.require_dir(src), 'gt_sets', SPLIT_LISTS['train'])
  if not os.path.isfile(split_list):
    raise folder_io.fail(split_list, f'file not found; expected {LAYOUT}')
  first_id = folder_io.read_ids(split_list)[0]
  for name, config in PACKAGINGS.items():
    if os.path.isfile(os.path.join(src, 'images', f"{first_id}.{config.extensions['image']}")):
      return name
  raise folder_io.fail(os.path.join(src, 'images', f'{first_id}.jpg'),
                       f'not found (nor .png); expected {LAYOUT}')


def _semseg(path, size):
  raw = folder_io.check_shape(path, folder_io.read_png(path), size)
  folder_io.check_values(path, raw, np.arange(data_lib.DATASETS['nyud'].num_classes['semseg'] + 1))
  return folder_io.categorical(np.where(raw == 0, tasks_lib.IGNORE_LABEL, raw.astype(np.int64) - 1))


def _normals(path, size):
  if path.endswith('.png'):
    normals = 2.0 * folder_io.read_png(path).astype(np.float32) / 255.0 - 1.0
  else:
    normals = folder_io.read_npy(path).astype(np.float32)
  folder_io.check_shape(path, normals, size, channels=3)
  return np.where(np.isfinite(normals), normals, 0.0).astype(np.float32)


def _edge(path, size):
  """0/1 edges: NYUD_MT's .npy hold 0/1 floats, NYUDv2's PNGs 0/255 (read as x/255)."""
  if path.endswith('.png'):
    edge = folder_io.check_values(path, folder_io.read_png(path), [0, 255],
                                  ' (edge PNGs hold 0 and 255)') / 255
  else:
    edge = folder_io.check_values(path, folder_io.read_npy(path), [0, 1],
                                  ' (edge .npy files hold 0 and 1)')
  return folder_io.categorical(folder_io.check_shape(path, edge, size) > 0.5)


# Each task's label file -> its stored feature value.
_READERS = {'semseg': _semseg, 'depth': folder_io.read_depth_npy, 'normals': _normals,
            'edge': _edge}


class Nyud(generation.Builder):
  """NYUD-v2 multi-task labels, from the folder given as the manual dir."""

  name = 'nyud'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = list(PACKAGINGS.values())
  MANUAL_DOWNLOAD_INSTRUCTIONS = f'Pass {LAYOUT} as the manual dir; nothing is downloaded.'

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'id': tfds.features.Text(),
            'image': folder_io.image_feature(),
            'semseg': folder_io.categorical_feature(),
            'edge': folder_io.categorical_feature(),
            'depth': folder_io.depth_feature(),
            'normals': folder_io.normals_feature(),
        }),
        disable_shuffling=True,  # examples keep the order of the split lists
        description='NYUD-v2 for multi-task dense prediction; see cmtdp_jax/data/nyud.py.')

  def _split_generators(self, dl_manager):
    src = os.fspath(dl_manager.manual_dir)
    lists = {split: os.path.join(src, 'gt_sets', name) for split, name in SPLIT_LISTS.items()}
    ids = {split: folder_io.read_ids(path) for split, path in lists.items()}
    folder_io.check_disjoint({lists[split]: ids[split] for split in lists})
    # Every file is checked before anything is written.
    return {split: self._generate_examples(split, [self._files(src, i) for i in ids[split]])
            for split in lists}

  def _files(self, src, example_id):
    extensions = self.builder_config.extensions
    files = {key: os.path.join(src, folder, f'{example_id}.{extensions[key]}')
             for key, folder in FOLDERS.items()}
    for path in files.values():
      folder_io.require_file(path)
    return dict(files, id=example_id)

  def _generate_examples(self, split, examples):
    normals_check = folder_io.NormalsCheck()
    for index, files in enumerate(generation.examples(examples, split, len(examples))):
      image = folder_io.read_rgb(files['image'])
      size = image.shape[:2]
      labels = {task: read(files[task], size) for task, read in _READERS.items()}
      labels['normals'] = normals_check(files['normals'], labels['normals'])
      yield index, dict(labels, id=files['id'], image=image)
    normals_check.warn(split)


def make_builder(data_config):
  """Prepared builder for `data_config` (see `folder_io.make_builder`)."""
  return folder_io.make_builder(Nyud, data_config, detect_packaging, LAYOUT)
