"""The partial-label benchmark's report of a run: its last step, and MTPSL's selection.

 python -m cmtdp_jax.tools.benchmark_report WORKDIR [--reference NAME]

Reads every `<WORKDIR>/eval/step_<N>.json` and prints two tables of the metrics the
benchmark's papers report (MTPSL, CVPR 2022; JTR, CVPR 2024), each with delta_m against the
named single-task reference (`evaluation.DELTA_M_REFERENCES`; default: the run's
`config.eval.delta_m_reference`, read from its latest `config*.json`):

- the last step: what we report;
- the step with the best delta_m, which is how MTPSL's scripts (nyu_mtl_xtc.py,
 cityscapes_mtl_xtc.py: `isbest`) pick the epoch they report. They evaluate on the
 validation set, so this selects on the evaluation set and is optimistic. Ties go to the
 earliest step, as their strict `>` does.

delta_m is computed here from each file's metrics, so it needs no delta_m in the files and
follows --reference. Each metric is printed under its true name, beside the column of
MTPSL's log that holds the same number (their logger's names differ: see COLUMNS).
"""

from __future__ import annotations

import argparse
import json
import sys

from cmtdp_jax import workdir as workdir_lib
from cmtdp_jax.evaluation import report

# The metrics reported, in order, each with the column of MTPSL's log (`logger.set_names` in
# nyu_mtl_xtc.py, cityscapes_mtl_xtc.py) that holds it: their 'V.rel' and 'V.Med' are RMSEs.
COLUMNS = (
    ('semseg/mIoU', 'V. mIoU (as a fraction)'),
    ('semseg/pixel_accuracy', 'V. Pix (as a fraction)'),
    ('depth/abs_err', 'V.abs'),
    ('depth/rmse', 'V.rel (it is the RMSE)'),
    ('normals/mean', 'V.Mean'),
    ('normals/rmse', 'V.Med (it is the RMSE)'),
    ('normals/11.25', 'V.11'),
    ('normals/22.5', 'V.22'),
    ('normals/30', 'V.30'),
)
SELECTION = "MTPSL's selection: best delta_m on the validation set (optimistic)"


def configured_reference(workdir: str) -> str:
  """`config.eval.delta_m_reference` of the run's latest start, '' if none is readable."""
  configs = workdir_lib.config_files(workdir)
  if not configs:
    return ''
  try:
    config = json.loads(configs[max(configs)].read_text())
    return str(config.get('eval', {}).get('delta_m_reference', '') or '')
  except (OSError, ValueError, AttributeError):
    return ''


def load_steps(workdir: str) -> dict[int, dict[str, float]]:
  """The results of every readable eval file, by step (unreadable ones are logged)."""
  steps = {}
  for step, path in sorted(report.eval_files(workdir).items()):
    results = report.read_results(path)
    if results is not None:
      steps[step] = results
  return steps


def best_step(deltas: dict[int, float | None]) -> int | None:
  """The step with the largest delta_m, the earliest of equals; None if none has one."""
  scored = [(value, -step) for step, value in deltas.items() if value is not None]
  return -max(scored)[1] if scored else None


def step_table(results: dict[str, float], delta: report.DeltaM) -> str:
  """Rows 'metric, MTPSL's log column, value' of the COLUMNS present, then delta_m."""
  rows = [('metric', "MTPSL's log column", 'value')]
  rows += [(key, column, report.format_value(results[key]))
           for key, column in COLUMNS if key in results]
  rows.append(('delta_m (%)', "printed as 'current performance'",
               'n/a (' + '; '.join(delta.missing) + ')' if delta.value is None
               else f'{delta.value:+.4f}'))
  return report.aligned_table(rows)


def benchmark_report(workdir: str, reference: str = '') -> str:
  """The two tables as text; a one-line ValueError when there is nothing to report."""
  steps = load_steps(workdir)
  if not steps:
    raise ValueError(f'{workdir}: no readable eval/step_<N>.json: nothing evaluated yet')
  reference = reference or configured_reference(workdir)
  if not reference:
    raise ValueError(f'{workdir}: its config names no delta_m reference '
                     '(config.eval.delta_m_reference); pass --reference NAME, one of '
                     f"{', '.join(report.DELTA_M_REFERENCES)}")
  source = report.delta_m_reference(reference).source  # unknown: one line
  deltas = {step: report.delta_m_against(results, reference) for step, results in steps.items()}
  last = max(steps)
  best = best_step({step: delta.value for step, delta in deltas.items()})
  lines = [f'delta_m against {reference}: {source}', '',
           f'Last step (what we report): step {last}', step_table(steps[last], deltas[last]),
           '']
  if best is None:
    lines.append(f'{SELECTION}: unavailable, no step has every metric of {reference}')
  else:
    lines += [f'{SELECTION}: step {best} of {len(steps)} evaluated',
              step_table(steps[best], deltas[best])]
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m cmtdp_jax.tools.benchmark_report',
      description="A run's last step and MTPSL's best-delta_m selection, with delta_m.")
  parser.add_argument('workdir', help='the run folder (its eval/step_<N>.json are read)')
  parser.add_argument('--reference', default='',
                      help=f"delta_m reference ({', '.join(report.DELTA_M_REFERENCES)}); "
                           "default: the run's config.eval.delta_m_reference")
  args = parser.parse_args(argv)
  try:
    print(benchmark_report(args.workdir, args.reference))
  except ValueError as e:
    print(f'benchmark_report: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
