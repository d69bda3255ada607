"""Scoring the eval pipeline's batches: which metric scores which images, and each real
image of a padded batch cropped back to its original size before it is scored.

The evaluation loops (train.run_evaluation, tools) call these; the data layer knows
nothing of metrics. Imports TensorFlow (through `data`); `cmtdp_jax.evaluation` does
not import this module, so the metrics stay TF-free.
"""

from __future__ import annotations

import numpy as np

from cmtdp_jax import evaluation
from cmtdp_jax.data import augment
from cmtdp_jax.data import pipeline


def eval_metrics(config, source: pipeline.Source) -> dict:
  """{task: Metric} of a run; `config.eval.subset_tasks` only on `source.subset_ids`."""
  metrics = {}
  for task in config.tasks:
    options = evaluation.metric_options(config, task)
    if source.subset_ids is not None and task in config.eval.subset_tasks:
      options['image_ids'] = source.subset_ids
    metrics[task] = evaluation.make_metric(task, **options)
  return metrics


def update_metrics(metrics, batch, predictions) -> None:
  """Adds every real example of a host-local eval batch to `metrics` ({name:
  Metric}, each scoring its `task`, keeping only the images in its `image_ids`),
  prediction and label cropped back to the original image."""
  for i in np.flatnonzero(batch['mask']):
    offset, size = batch['offset'][i], batch['size'][i]
    image_id = batch['id'][i].decode() if 'id' in batch else None
    for metric in metrics.values():
      metric.update(augment.crop_to_original(predictions[metric.task][i], offset, size),
                    augment.crop_to_original(batch[metric.task][i], offset, size), ids=image_id)
