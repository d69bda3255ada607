"""What an evaluation saves besides its metrics (`config.eval`).

Under `<workdir>/eval/step_<N>/`: `predictions/<name>.npz` (task-space
predictions, one array per task), `vis/<name>.png` (image, ground truth and
prediction per task, also logged to TensorBoard) and `edges/<name>.png` (edge
probabilities for SEISM, see `export_edge_pngs`). Every output is cropped back
to the image's size before padding.

`<name>` is the image id: the dataset's (NYUD, PASCAL) or, for datasets without
one, the image's position in the eval split (`pipeline.eval_dataset`); the
original size comes with every eval batch.

Imports TensorFlow (through `data.augment`); `cmtdp_jax.evaluation` does not
import this module, so the metrics stay TF-free.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from flax.metrics import tensorboard
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from cmtdp_jax import tasks as tasks_lib
from cmtdp_jax.data import augment
from cmtdp_jax.evaluation.boundary import export_edge_pngs


def denormalize(image: np.ndarray, normalization: str = 'imagenet') -> np.ndarray:
  """Normalised [H, W, 3] float image -> uint8 RGB (inverse of `augment.normalize`)."""
  mean, std = augment.IMAGE_NORMALIZATIONS[normalization]
  rgb = np.asarray(image) * np.array(std) + np.array(mean)
  return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def render_grid(image: np.ndarray, labels: dict[str, np.ndarray],
                predictions: dict[str, np.ndarray], title: str = '') -> np.ndarray:
  """uint8 RGB picture: the image, then ground truth (top) over prediction per task."""
  task_names = list(predictions)
  height, width = image.shape[:2]
  columns = 1 + len(task_names)
  panel = 2.0
  figure = Figure(figsize=(panel * columns, 2 * (panel * height / width + 0.3) + 0.4), dpi=100)
  canvas = FigureCanvasAgg(figure)
  axes = figure.subplots(2, columns, squeeze=False)
  for ax in axes.flat:
    ax.set_axis_off()
  axes[0, 0].imshow(image)
  axes[0, 0].set_title('image', fontsize=8)
  for column, task in enumerate(task_names, start=1):
    colourize = tasks_lib.get_task(task).colourize
    axes[0, column].imshow(colourize(labels[task]))
    axes[0, column].set_title(f'{task} GT', fontsize=8)
    axes[1, column].imshow(colourize(predictions[task]))
    axes[1, column].set_title(f'{task} pred', fontsize=8)
  if title:
    figure.suptitle(title, fontsize=9)
  figure.tight_layout()
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class EvalOutputs:
  """Saves predictions, grids and edge PNGs of each real eval example, batch by batch.

  Nothing is kept in memory across batches. Grids go to the first
  `num_visualize` images of process 0, which are the first of the eval split.
  """

  def __init__(self, folder: str, task_names, *, save_predictions: bool = False,
               num_visualize: int = 0, export_edges: bool = False, writer=None,
               step: int = 0, normalization: str = 'imagenet'):
    self.folder = folder
    self.normalization = normalization
    self.task_names = tuple(task_names)
    self.save_predictions = save_predictions
    self.num_visualize = num_visualize if jax.process_index() == 0 else 0
    self.export_edges = export_edges and 'edge' in self.task_names
    if export_edges and not self.export_edges:
      logging.warning('config.eval.export_edges: no edge task, no edge PNGs to write')
    self.writer = writer
    self.step = step
    self.count = 0

  @classmethod
  def from_config(cls, config, workdir: str, step: int, writer=None) -> EvalOutputs | None:
    """The outputs `config.eval` asks for at `step`, or None when it asks for none.

    Without a `writer` (--mode=eval) the grids get their own TensorBoard
    writer in `workdir`.
    """
    options = config.eval
    if not (options.save_predictions or options.num_visualize or options.export_edges):
      return None
    if options.num_visualize and writer is None and jax.process_index() == 0:
      writer = tensorboard.SummaryWriter(workdir)
    return cls(os.path.join(workdir, 'eval', f'step_{step}'), config.tasks,
               save_predictions=options.save_predictions,
               num_visualize=options.num_visualize, export_edges=options.export_edges,
               writer=writer, step=step, normalization=config.data.image_normalization)

  def add(self, batch: dict[str, np.ndarray], predictions: dict[str, np.ndarray]):
    """One host-local eval batch (with its 'mask' of real examples) and its predictions."""
    predictions = {t: np.asarray(predictions[t]) for t in self.task_names}
    edges = {}
    for i in np.flatnonzero(batch['mask']):
      def original(x, i=i):
        return augment.crop_to_original(np.asarray(x[i]), batch['offset'][i], batch['size'][i])
      example = {k: original(batch[k]) for k in ('image',) + self.task_names}
      predicted = {t: original(predictions[t]) for t in self.task_names}
      name = batch['id'][i].decode()
      if self.save_predictions:
        os.makedirs(os.path.join(self.folder, 'predictions'), exist_ok=True)
        np.savez_compressed(os.path.join(self.folder, 'predictions', f'{name}.npz'), **predicted)
      if self.count < self.num_visualize:
        self._visualize(name, example, predicted)
      if self.export_edges:
        edges[name] = predicted['edge']
      self.count += 1
    if edges:
      export_edge_pngs(edges, os.path.join(self.folder, 'edges'))

  def _visualize(self, name, example, predicted):
    grid = render_grid(denormalize(example['image'], self.normalization), example, predicted,
                       title=f'step {self.step}, eval image {name}')
    os.makedirs(os.path.join(self.folder, 'vis'), exist_ok=True)
    Image.fromarray(grid).save(os.path.join(self.folder, 'vis', f'{name}.png'))
    if self.writer:
      self.writer.image(f'eval_vis/{name}', grid, self.step)

  def close(self):
    if self.writer:
      self.writer.flush()
