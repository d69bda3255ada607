"""Scores of trivial predictors on a config's eval split: the floor a model must beat.

  python -m cmtdp_jax.tools.trivial_baselines --config configs/synthetic.py

Per task: a uniformly random class (semseg, human_parts), the training set's mean depth, its
mean normal direction, and its positive rate as a constant probability (sal, edge). They are
scored with the same metrics and the same eval pipeline as the models.
"""

from __future__ import annotations

import numpy as np
from absl import flags
from ml_collections import config_flags

from cmtdp_jax import config_lib
from cmtdp_jax import data as data_lib
from cmtdp_jax import evaluation
from cmtdp_jax import tasks as tasks_lib
from cmtdp_jax.data import pipeline
from cmtdp_jax.evaluation import scoring

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (optionally file.py:variant).')
flags.DEFINE_integer('train_examples', 200, 'Training examples used for the means.')
flags.mark_flags_as_required(['config'])


def training_statistics(source, task_names, count: int) -> dict[str, np.ndarray]:
  """Mean depth, mean unit normal and positive rates over `count` training examples."""
  sums = {t: [] for t in task_names}
  for example in pipeline.decoded_examples(source).take(count).as_numpy_iterator():
    for task in task_names:
      label = example[task]
      valid = np.asarray(tasks_lib.get_task(task).valid(label))
      sums[task].append(label[valid])
  stats = {}
  for task, values in sums.items():
    values = np.concatenate(values)
    kind = tasks_lib.get_task(task).label_kind
    if kind == tasks_lib.NORMALS:
      mean = values.mean(axis=0)
      stats[task] = mean / np.linalg.norm(mean)
    elif kind == tasks_lib.CATEGORICAL:  # binary maps (sal, edge): the positive rate
      stats[task] = np.float32((values == 1).mean())
    else:
      stats[task] = np.float32(values.mean())
  return stats


def trivial_prediction(task, stats, label, num_classes, rng):
  """A uniformly random class where the dataset has classes, else the training mean."""
  shape = label.shape[:3]
  if task in num_classes:
    return rng.integers(0, num_classes[task], shape)
  if tasks_lib.get_task(task).label_kind == tasks_lib.NORMALS:
    return np.broadcast_to(stats[task], shape + (3,))
  return np.full(shape, stats[task], np.float32)


def main(argv):
  del argv
  config = FLAGS.config
  spec = data_lib.get_dataset_spec(config.data.name)
  train_source = pipeline.open_split(config.data, spec.train_split, config.tasks)
  eval_source = pipeline.open_eval_split(config)
  stats = training_statistics(train_source, config.tasks, FLAGS.train_examples)
  metrics = scoring.eval_metrics(config, eval_source)
  rng = np.random.default_rng(0)
  for batch in pipeline.eval_dataset(eval_source, config).as_numpy_iterator():
    predictions = {task: np.asarray(trivial_prediction(task, stats, batch[task], spec.num_classes,
                                                       rng)) for task in metrics}
    scoring.update_metrics(metrics, batch, predictions)
  results = {}
  for metric in metrics.values():
    results.update(metric.result())
  print(evaluation.format_table(results))


if __name__ == '__main__':
  config_lib.run(main)
