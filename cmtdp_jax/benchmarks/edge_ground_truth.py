"""How far PASCAL-Context's training edge label is from SEISM's ground truth.

  python -m cmtdp_jax.benchmarks.edge_ground_truth [--src PASCAL_MT --split val --images 200]

The training label (`pascal_context.context_edges`: thinned non-zero Laplacian of the
LabelMap, the peers' convention) and SEISM's ground truth (`pascal_context.seism_edges`:
thinned seg2bmap) mark different pixels of the same region borders. Scored against SEISM's
ground truth, a prediction equal to the training label gets the F-score printed here: the
most that `config.eval.edge_ground_truth='label'` and `'seism'` can disagree by for a
perfect model. Without `--src` the label maps are felzenszwalb segmentations of
scikit-image's sample photographs (no download).
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from cmtdp_jax import evaluation
from cmtdp_jax.data import folder_io
from cmtdp_jax.data import pascal_context
from cmtdp_jax.benchmarks import bench_boundary

FLAGS = flags.FLAGS


def define_flags():
  """Defined when the command runs, so that importing this module defines no flags."""
  flags.DEFINE_string('src', '', "PASCAL_MT folder ('' = sample photographs)")
  flags.DEFINE_string('split', 'val', 'ImageSets/Context list to read with --src.')
  flags.DEFINE_integer('images', 200, 'Label maps to compare with --src.')
  flags.DEFINE_float('max_dist', 0.0075, 'Match tolerance (fraction of the diagonal).')

def sample_label_maps():
  """Region label maps of the sample photographs of the boundary benchmark."""
  import skimage.color  # pylint: disable=import-outside-toplevel
  import skimage.data  # pylint: disable=import-outside-toplevel
  import skimage.segmentation  # pylint: disable=import-outside-toplevel
  for name in bench_boundary.PHOTOGRAPHS:
    image = getattr(skimage.data, name)()
    if image.ndim == 3:
      image = skimage.color.rgb2gray(image[..., :3])
    yield name, skimage.segmentation.felzenszwalb(image, scale=300, sigma=0.8, min_size=200)


def folder_label_maps(src: str, split: str, count: int):
  ids = folder_io.read_ids(os.path.join(src, 'ImageSets', 'Context', f'{split}.txt'))[:count]
  for example_id in ids:
    path = os.path.join(src, 'pascal-context', 'trainval', f'{example_id}.mat')
    yield example_id, folder_io.read_mat(path, 'LabelMap')


def compare(label_maps, max_dist: float) -> dict[str, float]:
  """Pixel counts of both ground truths and the training label's scores against SEISM's."""
  # The label as a binary prediction, read as it is (no NMS) and thresholded once.
  metric = evaluation.make_metric('edge', max_dist=max_dist, thresholds=(0.5,),
                                  protocol='mtl_pytorch')
  label_pixels = seism_pixels = shared = 0
  for _, label_map in label_maps:
    label = pascal_context.context_edges(label_map)
    seism = pascal_context.seism_edges(label_map)
    label_pixels += int(label.sum())
    seism_pixels += int(seism.sum())
    shared += int((label & seism).sum())
    metric.update(label.astype(np.float32), seism.astype(np.uint8))
  result = metric.result()
  return {'training label pixels': label_pixels, 'SEISM pixels': seism_pixels,
          'pixels in both (% of SEISM)': 100.0 * shared / max(seism_pixels, 1),
          'F of the training label against SEISM': result['edge/odsF']}


def main(argv):
  del argv
  if FLAGS.src:
    maps = folder_label_maps(FLAGS.src, FLAGS.split, FLAGS.images)
  else:
    maps = sample_label_maps()
  for key, value in compare(maps, FLAGS.max_dist).items():
    print(f'{key:<40} {value:.3f}' if isinstance(value, float) else f'{key:<40} {value}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
