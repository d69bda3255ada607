"""Evaluation: streaming metrics per task, SEISM boundary F, delta_m and tables.

`make_metric(task, **options)` returns a metric with `update(pred, gt)`,
`result() -> {'<task>/<metric>': value}`, `state` / `from_state` (dicts of
numpy arrays that merge by summation, for gathering across hosts) and
`merge(other)`. Defaults follow the NYUD protocol. Keys and units:
  semseg/mIoU, semseg/pixel_accuracy, human_parts/mIoU,
  human_parts/pixel_accuracy, sal/maxF, sal/mIoU, edge/odsF, edge/oisF,
  edge/AP, normals/11.25, normals/22.5, normals/30: percent;
  depth/rmse, depth/abs_err: metres; depth/log_rmse, depth/abs_rel: plain;
  depth/delta1: fraction; normals/mean, normals/median, normals/rmse: degrees;
  edge/ods_threshold: the threshold of the ODS point.
A run with `config.eval.delta_m_reference` also writes delta_m (percent)
against that named single-task reference (`DELTA_M_REFERENCES`).
"""

from cmtdp_jax import tasks as tasks_lib
from cmtdp_jax.evaluation.boundary import BoundaryMetric
from cmtdp_jax.evaluation.boundary import evaluate_boundaries
from cmtdp_jax.evaluation.boundary import export_edge_pngs
from cmtdp_jax.evaluation.metrics import DepthMetric
from cmtdp_jax.evaluation.metrics import Metric
from cmtdp_jax.evaluation.metrics import NormalsMetric
from cmtdp_jax.evaluation.metrics import SaliencyMetric
from cmtdp_jax.evaluation.metrics import SegmentationMetric
from cmtdp_jax.evaluation.report import DELTA_M_REFERENCES
from cmtdp_jax.evaluation.report import DeltaM
from cmtdp_jax.evaluation.report import delta_m
from cmtdp_jax.evaluation.report import delta_m_against
from cmtdp_jax.evaluation.report import DeltaMReference
from cmtdp_jax.evaluation.report import format_table
from cmtdp_jax.evaluation.report import load_single_task_results
from cmtdp_jax.evaluation.report import LOWER_IS_BETTER
from cmtdp_jax.evaluation.report import PRIMARY_METRICS

# The metric each task names (`tasks.Task.metric`); a segmentation metric needs the task
# and its dataset's number of classes (`metric_options`).
METRICS = {
    'segmentation': SegmentationMetric,
    'depth': DepthMetric,
    'normals': NormalsMetric,
    'saliency': SaliencyMetric,
    'boundary': BoundaryMetric,
}


def metric_options(config, task: str) -> dict:
  """`make_metric` options of `task` for a run: `config.eval.metric_options` plus
  the dataset's number of classes."""
  from cmtdp_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  options = dict(config.eval.metric_options.get(task, {}))
  num_classes = data_lib.get_dataset_spec(config.data.name).num_classes
  if task in num_classes:
    options['num_classes'] = num_classes[task]
  return options


def make_metric(task: str, **options) -> Metric:
  """Streaming metric for `task`; options as the metric class takes them.

  e.g. make_metric('semseg', num_classes=40), make_metric('edge',
  max_dist=0.0075, image_ids=test_new_ids). Every metric accepts image_ids.
  """
  metric = METRICS[tasks_lib.get_task(task).metric]  # an unknown task: one line there
  if metric is SegmentationMetric:
    return metric(task, **options)
  return metric(**options)
