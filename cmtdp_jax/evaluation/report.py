"""Multi-task performance delta_m, single-task baselines and result tables.

delta_m = mean over tasks of s_t (M_mt - M_st) / M_st x 100 (SPEC section 4;
Multi-Task-Learning-PyTorch's calculate_multi_task_performance), with
s_t = -1 for lower-is-better metrics. A missing baseline makes delta_m
unavailable (None) and the table says which, instead of crashing or
averaging over fewer tasks.

Benchmarks whose papers measure delta_m against fixed single-task numbers have
them here by name (`DELTA_M_REFERENCES`, `delta_m_against`; a run writes it
with `config.eval.delta_m_reference`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
from typing import Iterable, Mapping

from cmtdp_jax import tasks as tasks_lib
from cmtdp_jax.evaluation import metrics as metrics_lib

PRIMARY_METRICS = {name: task.primary_metric for name, task in tasks_lib.TASKS.items()}
# The keys whose lower values are better: the tasks' primary metrics marked so, and every
# error metric that the metrics of a fixed task declare (`Metric.lower_is_better`), so
# that delta_m on a non-primary metric (e.g. a reference's 'depth/abs_err') has its sign.
LOWER_IS_BETTER = frozenset(
    [task.primary_metric for task in tasks_lib.TASKS.values() if task.lower_is_better] +
    [f'{metric.task}/{name}' for metric in (metrics_lib.DepthMetric, metrics_lib.NormalsMetric)
     for name in metric.lower_is_better])


@dataclasses.dataclass(frozen=True)
class DeltaM:
  """delta_m in percent (None when unavailable) and the per-task numbers behind it."""
  value: float | None
  rows: tuple[tuple[str, str, float | None, float | None, float | None], ...]
  missing: tuple[str, ...]

  def __str__(self) -> str:
    table = [('task', 'metric', 'multi-task', 'single-task', 'delta (%)')]
    for task, metric, mt, st, delta in self.rows:
      table.append((task, metric, format_value(mt), format_value(st),
                    'n/a' if delta is None else f'{delta:+.2f}'))
    summary = ('delta_m: n/a (' + '; '.join(self.missing) + ')' if self.value is None
               else f'delta_m: {self.value:+.2f}%')
    return aligned_table(table) + '\n' + summary


def delta_m(multi_task: Mapping[str, float], single_task: Mapping[str, float] | None,
            tasks: Iterable[str] | None = None,
            primary: Mapping[str, str] = PRIMARY_METRICS) -> DeltaM:
  """delta_m of flat result dicts ('<task>/<metric>' -> value).

  Args:
    multi_task: results of the multi-task model.
    single_task: results of the single-task baselines (e.g. from
      `load_single_task_results`), or None when there are none.
    tasks: tasks to average over; default: those whose primary metric the
      multi-task results contain.
    primary: task -> metric used for that task.
  """
  single_task = single_task or {}
  if tasks is None:
    tasks = [t for t, key in primary.items() if key in multi_task]
  rows, missing, deltas = [], [], []
  for task in tasks:
    if task not in primary:
      raise ValueError(f"no primary metric for task '{task}'; known: {', '.join(primary)}")
    key = primary[task]
    mt, st = multi_task.get(key), single_task.get(key)
    delta = None
    if mt is None:
      missing.append(f'no multi-task {key}')
    elif st is None:
      missing.append(f'no single-task {key}')
    elif st == 0:
      missing.append(f'single-task {key} is 0')
    else:
      sign = -1.0 if key in LOWER_IS_BETTER else 1.0
      delta = sign * (mt - st) / st * 100.0
      deltas.append(delta)
    rows.append((task, key, mt, st, delta))
  if not rows:
    missing.append('no task with a primary metric in the results')
  value = sum(deltas) / len(deltas) if rows and not missing else None
  return DeltaM(value, tuple(rows), tuple(missing))


@dataclasses.dataclass(frozen=True)
class DeltaMReference:
  """Fixed single-task results that a benchmark measures delta_m against.

  values: '<task>/<metric>' -> the single-task value, one key per task (the
    metric delta_m uses for that task, in our units); source: where the numbers
    are written.
  """
  values: Mapping[str, float]
  source: str

  @property
  def tasks(self) -> tuple[str, ...]:
    return tuple(key.partition('/')[0] for key in self.values)

  @property
  def primary(self) -> dict[str, str]:
    """task -> metric key, as `delta_m`'s `primary`."""
    return {key.partition('/')[0]: key for key in self.values}


def _reference(source: str, semseg: float, depth: float,
               normals: float | None = None) -> DeltaMReference:
  """Single-task numbers of the partial-label benchmark: mIoU in percent, depth abs_err
  (MTPSL's DepthMeter 'l1', metres), normals mean angle (degrees)."""
  values = {'semseg/mIoU': semseg, 'depth/abs_err': depth}
  if normals is not None:
    values['normals/mean'] = normals
  return DeltaMReference(values, source)


def _mtpsl(script: str, setting: str, semseg: float, depth: float,
           normals: float | None = None) -> DeltaMReference:
  """MTPSL's (CVPR 2022) single-task numbers."""
  return _reference(f"VICO-UoE/MTPSL {script}, stl_performance['{setting}']", semseg, depth,
                    normals)


# MTPSL's delta_m (nyu_mtl_xtc.py, cityscapes_mtl_xtc.py: `mtl_performance`) is this module's
# delta_m on these keys: +(mIoU - ref)/ref, -(abs_err - ref)/ref, -(mean - ref)/ref, averaged
# over the tasks, x 100. It picks its reference by the label setting (--ssl-type) and computes
# it from float32 copies of the metrics (`avg_cost`): < 1e-5 percentage points away. JTR
# (CVPR 2024) uses the same metrics (code/utils/deltas.py, code/train_nyuv2.py: mIoU, DepthMeter
# 'l1', NormalsMeter 'mean') with its own single-task numbers, passed on the command lines of
# its README (`--seg-baseline` ...), and reports the fraction, not percent: the 'jtr_' entries.
DELTA_M_REFERENCES: dict[str, DeltaMReference] = {
    'mtpsl_nyuv2_full': _mtpsl('nyu_mtl_xtc.py', 'full', 37.447399999999995, 0.607902,
                               25.938105),
    'mtpsl_nyuv2_onelabel': _mtpsl('nyu_mtl_xtc.py', 'onelabel', 26.1113, 0.771502,
                                   30.073763),
    'mtpsl_nyuv2_randomlabels': _mtpsl('nyu_mtl_xtc.py', 'randomlabels', 28.7153, 0.754012,
                                       28.946388),
    'mtpsl_cityscapes_full': _mtpsl('cityscapes_mtl_xtc.py', 'full', 74.07, 0.0124),
    'mtpsl_cityscapes_onelabel': _mtpsl('cityscapes_mtl_xtc.py', 'onelabel', 70.04, 0.0140),
    'jtr_nyuv2_onelabel': _reference('KentoNishi/JTR-CVPR-2024 README.md, NYUv2 onelabel',
                                     25.75, 0.6511, 33.73),
    'jtr_nyuv2_randomlabels': _reference(
        'KentoNishi/JTR-CVPR-2024 README.md, NYUv2 randomlabels', 27.05, 0.6626, 33.58),
    'jtr_cityscapes_onelabel': _reference(
        'KentoNishi/JTR-CVPR-2024 README.md, Cityscapes onelabel', 69.50, 0.0186),
}


def delta_m_reference(name: str) -> DeltaMReference:
  """The named reference; an unknown name is a one-line ValueError listing the valid ones."""
  if name not in DELTA_M_REFERENCES:
    raise ValueError(f"unknown delta_m reference '{name}'; valid: "
                     f"{', '.join(DELTA_M_REFERENCES)}")
  return DELTA_M_REFERENCES[name]


def delta_m_against(results: Mapping[str, float], reference: str) -> DeltaM:
  """delta_m of flat results against the named reference (`DELTA_M_REFERENCES`), over
  its tasks and on its metrics."""
  ref = delta_m_reference(reference)
  return delta_m(results, ref.values, tasks=ref.tasks, primary=ref.primary)


def eval_files(workdir: str) -> dict[int, str]:
  """Every `<workdir>/eval/step_<N>.json`, by N."""
  steps = {}
  for path in glob.glob(os.path.join(workdir, 'eval', 'step_*.json')):
    match = re.fullmatch(r'step_(\d+)\.json', os.path.basename(path))
    if match:
      steps[int(match.group(1))] = path
  return steps


def latest_eval_file(workdir: str) -> str | None:
  """`<workdir>/eval/step_<N>.json` with the largest N, or None."""
  steps = eval_files(workdir)
  return steps[max(steps)] if steps else None


def load_single_task_results(source: str | Mapping[str, str]) -> dict[str, float]:
  """Single-task results as one flat dict.

  Args:
    source: a JSON file holding a flat dict of results or a workdir (its
      latest `eval/step_<N>.json` is read), or a mapping task -> such a file
      or workdir, of which only the '<task>/' keys are kept. Unreadable
      entries are logged and left out, so that `delta_m` reports them as
      missing.
  """
  if isinstance(source, str):
    return read_results(source) or {}
  results = {}
  for task, path in source.items():
    values = read_results(path)
    if values is None:
      logging.warning('No single-task results for %s under %s', task, path)
      continue
    results.update({k: v for k, v in values.items() if k.startswith(f'{task}/')})
  return results


def read_results(path: str) -> dict[str, float] | None:
  """The flat dict in a JSON file, or in a workdir's latest eval file."""
  if os.path.isdir(path):
    path = latest_eval_file(path)
    if path is None:
      return None
  try:
    with open(path) as f:
      return {k: float(v) for k, v in json.load(f).items()}
  except (OSError, ValueError, TypeError, AttributeError) as error:
    logging.warning('Cannot read results from %s: %s', path, error)
    return None


def format_table(results: Mapping[str, float]) -> str:
  """Aligned 'task  metric  value' table of flat '<task>/<metric>' results."""
  rows = [('task', 'metric', 'value')]
  for key, value in results.items():
    task, _, metric = key.rpartition('/')
    rows.append((task, metric, f'{value:.0f}' if metric == 'images' else format_value(value)))
  return aligned_table(rows)


def format_value(value: float | None) -> str:
  """A metric value for tables; None prints as '(missing)'."""
  return '(missing)' if value is None else f'{value:.4f}'


def aligned_table(rows) -> str:
  """Rows of strings as columns: the first two left-aligned, the rest right-aligned."""
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = []
  for row in rows:
    cells = [cell.ljust(w) if i < 2 else cell.rjust(w)
             for i, (cell, w) in enumerate(zip(row, widths))]
    lines.append('  '.join(cells).rstrip())
  return '\n'.join(lines)
