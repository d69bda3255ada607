"""What the JAX and the PyTorch benchmarks share, so that neither imports the other: the
random batch both frameworks time, and the statistics of a list of step times."""

from __future__ import annotations

import numpy as np

from cmtdp_jax import data as data_lib
from cmtdp_jax import tasks as tasks_lib


def synthetic_batch(config, batch_size: int, image_size, seed: int = 0):
  """Random images and labels in the pipeline's dtypes and label conventions."""
  rng = np.random.default_rng(seed)
  shape = (batch_size, *image_size)
  num_classes = data_lib.get_dataset_spec(config.data.name).num_classes
  batch = {'image': rng.standard_normal(shape + (3,), np.float32)}
  for name in config.tasks:
    task = tasks_lib.get_task(name)
    if task.label_kind == tasks_lib.DEPTH:
      batch[name] = rng.uniform(0.5, 10.0, shape).astype(np.float32)
    elif task.label_kind == tasks_lib.NORMALS:
      normals = rng.standard_normal(shape + (3,)).astype(np.float32)
      batch[name] = normals / np.linalg.norm(normals, axis=-1, keepdims=True)
    else:  # binary tasks (one output channel) have labels 0 / 1
      batch[name] = rng.integers(0, max(task.num_outputs(num_classes), 2), shape, np.int32)
  return batch


def step_stats(seconds) -> dict[str, float]:
  p10, median, p90 = np.percentile(seconds, [10, 50, 90])
  return {'median': float(median), 'p10': float(p10), 'p90': float(p90),
          'mean': float(np.mean(seconds)), 'count': len(seconds)}
