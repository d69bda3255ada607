"""DESIGN.md's decision rule, applied to the tool's summaries (prints a Markdown table).

  python cmtdp_jax/studies/partial_labels/decision.py cmtdp_jax/studies/partial_labels/results/study.json \
      [cmtdp_jax/studies/partial_labels/results_64/study.json]

Primary: delta_m of lambda vs lambda 0 in one_label, 95% t-interval. Secondary families, with
Bonferroni: delta_m of random0.5, full and 64x64 full (3 comparisons); the paired differences on
the training images whose own label was dropped, 6 tasks x 2 partial regimes (12). The kept-label
differences are listed at 95%, descriptive only. Intervals: mean +- t(1 - alpha/2, n - 1) * se
from the recorded mean, standard error and number of pairs.
"""

import json
import sys

from scipy import stats


def row(name, d, level):
  t = stats.t.ppf(1 - (1 - level) / 2, d['n'] - 1)
  low, high = d['mean'] - t * d['se'], d['mean'] + t * d['se']
  verdict = 'excludes 0' if low > 0 or high < 0 else 'includes 0'
  return f"| {name} | {d['n']} | {d['mean']:+.3f} | {level:.2%} | [{low:+.3f}, {high:+.3f}] | {verdict} |"


def main(path, path_64=None):
  cells = json.load(open(path))['cells']
  treated = {c['regime']: name for name, c in cells.items()
             if not c['pilot'] and c.get('delta_m')}
  print('| comparison | pairs | mean | level | interval | |\n|---|---|---|---|---|---|')
  print(row(f"primary: {treated['one_label']} delta_m %", cells[treated['one_label']]['delta_m'],
            0.95))
  family = [(f'{treated[r]} delta_m %', cells[treated[r]]['delta_m']) for r in ('random0.5', 'full')]
  if path_64:
    family += [(f'64x64 {name} delta_m %', c['delta_m'])
               for name, c in json.load(open(path_64))['cells'].items()
               if not c['pilot'] and c.get('delta_m')]
  for name, d in family:
    print(row(name, d, 1 - 0.05 / 3))
  for part, level in (('dropped', 1 - 0.05 / 12), ('kept', 0.95)):
    for regime in ('one_label', 'random0.5'):
      for metric, d in sorted(cells[treated[regime]]['split'].items()):
        if metric.endswith('@' + part):
          print(row(f'{treated[regime]} {metric} (difference, + = better)', d['difference'],
                    level))


if __name__ == '__main__':
  main(*sys.argv[1:])
