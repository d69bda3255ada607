"""TFDS builder for PASCAL-Context multi-task (PASCAL_MT) from a local folder.

Folder layout (SPEC section 2; Multi-Task-Learning-PyTorch, ATRC, InvPT):

  JPEGImages/<id>.jpg
  ImageSets/Context/{train,val}.txt       4998 / 5105 ids
  ImageSets/Context/test_new.txt          optional: SEISM boundary subset
  semseg/VOC12/<id>.png, else semseg/pascal-context/<id>.png   21 classes
  pascal-context/trainval/<id>.mat        'LabelMap', 459 context classes
  human_parts/<id>.mat                    PASCAL-Part 'anno' struct
  normals_distill/<id>.png                2x/255 - 1
  sal_distill/<id>.png                    x/255 > 0.5
  json/{nyu,context}_classes.json         optional (InvPT ships them)

Labels follow the peers exactly: edges where the Laplacian of the context
label map is non-zero, thinned; normals kept only on context classes that
NYUD also has; human parts merged into 6 parts, with the whole map ignored
(255) when the image has no annotated person part.

'edge_seism' is the boundary map SEISM scores against instead
(`config.eval.edge_ground_truth='seism'`): BSDS's seg2bmap of the LabelMap,
thinned with bwmorph 'thin' as SEISM's fb.m does (jponttuset/seism
src/measures/fb.m, src/piotr_edges/edgesEvalImg.m).
"""

from __future__ import annotations

import json
import os

import numpy as np
import scipy.ndimage
import skimage.morphology
import tensorflow_datasets as tfds

from cmtdp_jax import data as data_lib
from cmtdp_jax import tasks as tasks_lib
from cmtdp_jax.data import folder_io
from cmtdp_jax.data import generation

LAYOUT = ('a PASCAL_MT folder with JPEGImages/, ImageSets/Context/, semseg/, '
          'pascal-context/trainval/, human_parts/, normals_distill/, sal_distill/')
SPLIT_LISTS = {'train': 'train.txt', 'validation': 'val.txt', 'test_new': 'test_new.txt'}
OPTIONAL_SPLITS = ('test_new',)

# PASCAL-Part: class index of 'person' and the 6-part merge of its parts.
PERSON_CLASS = 15
HUMAN_PARTS = {
    'head': 1, 'hair': 1, 'lear': 1, 'rear': 1, 'lebrow': 1, 'rebrow': 1, 'leye': 1, 'reye': 1,
    'mouth': 1, 'nose': 1,
    'torso': 2, 'neck': 2,
    'luarm': 3, 'ruarm': 3,
    'llarm': 4, 'rlarm': 4, 'lhand': 4, 'rhand': 4,
    'luleg': 5, 'ruleg': 5,
    'llleg': 6, 'rlleg': 6, 'lfoot': 6, 'rfoot': 6,
}

# Context classes (ids of json/context_classes.json) whose names NYUD also
# labels (json/nyu_classes.json, 'unknown' excluded), plus 'tvmonitor': the
# peers' list of where the distilled normals are valid, used when the folder
# has no json/ class lists.
NORMALS_CLASSES = (
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49,
    50, 51, 53, 55, 56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101,
    104, 105, 107, 111, 113, 115, 122, 124, 135, 141, 142, 143, 146, 150, 154, 157, 158, 159, 165,
    172, 174, 181, 183, 184, 191, 193, 195, 197, 199, 202, 213, 215, 216, 219, 220, 223, 225, 228,
    230, 232, 233, 238, 239, 242, 243, 246, 250, 251, 252, 255, 260, 261, 263, 269, 272, 273, 275,
    281, 283, 284, 285, 286, 287, 288, 290, 291, 292, 293, 295, 304, 307, 309, 310, 314, 315, 319,
    323, 329, 330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357, 368, 370, 371, 374, 379, 380,
    383, 384, 397, 401, 403, 405, 407, 408, 411, 412, 413, 414, 417, 419, 421, 423, 427, 429, 430,
    432, 440, 441, 442, 443, 444, 446, 454, 457)

# cv2.Laplacian(ksize=1), the peers' edge detector on the context label map.
_LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float64)


def normals_classes(src):
  """Context class ids with valid normals, from `src`/json/ if it has the lists."""
  nyu_path = os.path.join(src, 'json', 'nyu_classes.json')
  context_path = os.path.join(src, 'json', 'context_classes.json')
  if not (os.path.isfile(nyu_path) and os.path.isfile(context_path)):
    return NORMALS_CLASSES
  try:
    with open(nyu_path) as f:
      nyu = json.load(f)
    with open(context_path) as f:
      context = json.load(f)
    shared = [context[name] for name in nyu if name in context and name != 'unknown']
    return tuple(sorted(set(shared + [context['tvmonitor']])))
  except (OSError, ValueError, KeyError) as e:
    raise folder_io.fail(context_path, f'unreadable class lists ({e!r})') from e


def context_edges(label_map):
  """Thinned pixels where the Laplacian of the context label map is non-zero."""
  laplacian = scipy.ndimage.convolve(label_map.astype(np.float64), _LAPLACIAN, mode='mirror')
  return skimage.morphology.thin(laplacian != 0)


def seg2bmap(label_map):
  """BSDS's seg2bmap: a pixel is boundary where it differs from its east, south or
  south-east neighbour (the last row only east, the last column only south, the
  corner never): one-pixel boundaries half a pixel towards the origin."""
  seg = np.asarray(label_map)
  east = seg[:, :-1] != seg[:, 1:]
  south = seg[:-1] != seg[1:]
  bmap = np.zeros(seg.shape, bool)
  bmap[:-1, :-1] = east[:-1] | south[:, :-1] | (seg[:-1, :-1] != seg[1:, 1:])
  bmap[-1, :-1] = east[-1]
  bmap[:-1, -1] = south[:, -1]
  return bmap


def seism_edges(label_map):
  """SEISM's ground-truth boundaries of a context label map."""
  return skimage.morphology.thin(seg2bmap(label_map))


def human_parts(path, size):
  """6-part map of the people in a PASCAL-Part annotation; all 255 without parts.

  The struct is read by position, as the peers do: anno = (imname, objects),
  object = (class, class_ind, mask, parts), part = (part_name, mask).
  """
  parts_map = np.zeros(size, np.uint8)
  try:
    objects = folder_io.read_mat(path, 'anno')[0][0][1][0]
    people = [obj[3][0] for obj in objects if obj[1][0][0] == PERSON_CLASS and len(obj[3])]
  except (IndexError, TypeError) as e:
    raise folder_io.fail(path, f'not a PASCAL-Part annotation ({e})') from e
  for parts in people:
    for part in parts:
      name = str(part[0][0])
      if name not in HUMAN_PARTS:
        raise folder_io.fail(path, f"unknown human part '{name}'")
      mask = folder_io.check_shape(path, np.asarray(part[1]), size).astype(bool)
      parts_map[mask] = HUMAN_PARTS[name]
  if not parts_map.any():
    parts_map[:] = tasks_lib.IGNORE_LABEL
  return parts_map


def semseg_path(src, example_id):
  voc = os.path.join(src, 'semseg', 'VOC12', f'{example_id}.png')
  if os.path.isfile(voc):
    return voc
  context = os.path.join(src, 'semseg', 'pascal-context', f'{example_id}.png')
  if not os.path.isfile(context):
    raise folder_io.fail(context, 'file not found (nor in semseg/VOC12/)')
  return context


def _files(src, example_id):
  """Every file of one example, checked to exist."""
  join = lambda *parts: folder_io.require_file(os.path.join(src, *parts))
  return {
      'id': example_id,
      'image': join('JPEGImages', f'{example_id}.jpg'),
      'semseg': semseg_path(src, example_id),
      'context': join('pascal-context', 'trainval', f'{example_id}.mat'),
      'human_parts': join('human_parts', f'{example_id}.mat'),
      'normals': join('normals_distill', f'{example_id}.png'),
      'sal': join('sal_distill', f'{example_id}.png'),
  }


def _semseg(path, size):
  num_classes = data_lib.DATASETS['pascal_context'].num_classes['semseg']
  semseg = folder_io.check_shape(path, folder_io.read_png(path), size)
  return folder_io.check_values(path, semseg,
                                np.append(np.arange(num_classes), tasks_lib.IGNORE_LABEL))


def _normals(path, size, label_map, valid_classes):
  distilled = folder_io.check_shape(path, folder_io.read_png(path), size, channels=3)
  normals = 2.0 * distilled.astype(np.float32) / 255.0 - 1.0
  return np.where(np.isin(label_map, valid_classes)[..., None], normals, 0.0).astype(np.float32)


def _saliency(path, size):
  sal = folder_io.check_shape(path, folder_io.read_png(path), size)
  return sal.astype(np.float32) / 255.0 > 0.5


def _example(files, normals_valid):
  image = folder_io.read_rgb(files['image'])
  size = image.shape[:2]
  label_map = folder_io.check_shape(
      files['context'], folder_io.read_mat(files['context'], 'LabelMap'), size)
  return {
      'id': files['id'],
      'image': image,
      'semseg': folder_io.categorical(_semseg(files['semseg'], size)),
      'human_parts': folder_io.categorical(human_parts(files['human_parts'], size)),
      'sal': folder_io.categorical(_saliency(files['sal'], size)),
      'edge': folder_io.categorical(context_edges(label_map)),
      'edge_seism': folder_io.categorical(seism_edges(label_map)),
      'normals': _normals(files['normals'], size, label_map, normals_valid),
  }


class PascalContext(generation.Builder):
  """PASCAL-Context multi-task labels, from the folder given as the manual dir."""

  name = 'pascal_context'
  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'First release.', '1.1.0': "SEISM's boundary ground truth."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name='pascal_mt', description='PASCAL_MT folder.')]
  MANUAL_DOWNLOAD_INSTRUCTIONS = f'Pass {LAYOUT} as the manual dir; nothing is downloaded.'

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'id': tfds.features.Text(),
            'image': folder_io.image_feature(),
            'semseg': folder_io.categorical_feature(),
            'human_parts': folder_io.categorical_feature(),
            'sal': folder_io.categorical_feature(),
            'edge': folder_io.categorical_feature(),
            'edge_seism': folder_io.categorical_feature(),
            'normals': folder_io.normals_feature(),
        }),
        disable_shuffling=True,  # examples keep the order of the split lists
        description='PASCAL-Context multi-task; see cmtdp_jax/data/pascal_context.py.')

  def _split_generators(self, dl_manager):
    src = os.fspath(dl_manager.manual_dir)
    normals_valid = np.asarray(normals_classes(src))
    lists = {split: os.path.join(src, 'ImageSets', 'Context', name)
             for split, name in SPLIT_LISTS.items()}
    ids = {split: folder_io.read_ids(path) for split, path in lists.items()
           if split not in OPTIONAL_SPLITS or os.path.isfile(path)}
    folder_io.check_disjoint({lists[split]: ids[split] for split in ids})  # test_new is in val
    # Every file is checked before anything is written.
    return {split: self._generate_examples(split, [_files(src, i) for i in split_ids],
                                           normals_valid)
            for split, split_ids in ids.items()}

  def _generate_examples(self, split, examples, normals_valid):
    normals_check = folder_io.NormalsCheck()
    for index, files in enumerate(generation.examples(examples, split, len(examples))):
      example = _example(files, normals_valid)
      example['normals'] = normals_check(files['normals'], example['normals'])
      yield index, example
    normals_check.warn(split)


def detect_packaging(src):
  """The only packaging, once the folder looks like PASCAL_MT."""
  folder_io.require_dir(os.path.join(src, 'JPEGImages'))
  folder_io.require_file(os.path.join(src, 'ImageSets', 'Context', SPLIT_LISTS['train']))
  return 'pascal_mt'


def make_builder(data_config):
  """Prepared builder for `data_config` (see `folder_io.make_builder`)."""
  return folder_io.make_builder(PascalContext, data_config, detect_packaging, LAYOUT)
