"""Multi-task performance delta_m, single-task baselines and result tables.

delta_m = mean over tasks of s_t (M_mt - M_st) / M_st x 100 (SPEC section 4;
Multi-Task-Learning-PyTorch's calculate_multi_task_performance), with
s_t = -1 for lower-is-better metrics. A missing baseline makes delta_m
unavailable (None) and the table says which, instead of crashing or
averaging over fewer tasks.
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

PRIMARY_METRICS = {name: task.primary_metric for name, task in tasks_lib.TASKS.items()}
LOWER_IS_BETTER = frozenset(task.primary_metric for task in tasks_lib.TASKS.values()
                            if task.lower_is_better)


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


def latest_eval_file(workdir: str) -> str | None:
  """`<workdir>/eval/step_<N>.json` with the largest N, or None."""
  steps = {}
  for path in glob.glob(os.path.join(workdir, 'eval', 'step_*.json')):
    match = re.fullmatch(r'step_(\d+)\.json', os.path.basename(path))
    if match:
      steps[int(match.group(1))] = path
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
    return _read_results(source) or {}
  results = {}
  for task, path in source.items():
    values = _read_results(path)
    if values is None:
      logging.warning('No single-task results for %s under %s', task, path)
      continue
    results.update({k: v for k, v in values.items() if k.startswith(f'{task}/')})
  return results


def _read_results(path: str) -> dict[str, float] | None:
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
