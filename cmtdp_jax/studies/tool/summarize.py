"""The summary goes to `<workdir>/study.md` and `study.json` (per cell: mean +- std of every task's
primary metric over its seeds, the latest record of each seed; delta_m against lambda 0 with a
paired 95% confidence interval over the seeds whose records share a fingerprint, and which seeds
were dropped for not sharing one; the regularizer's loss share; for the partial-label regimes,
every task's primary metric on the training images split by whether the task's own label was
kept or dropped on the image, and its paired difference to lambda 0; with `--arms`, the
comparison's endpoints at their Bonferroni levels, `endpoint_table`), `delta_m.png`,
`split.png` (the partial regimes' differences by kept/dropped label), and the same files into
`results_dir`. `--analyze` also measures the paper's Figure 1 premise on seed 0
of the lambda-0 and the best-lambda model of the largest training set, side by side in
`consistency.png`. `--summarize_only` writes the same files from the runs finished so far;
`--readme=README.md` also puts the summary between the README's `<!-- study table -->` markers
(`--readme_marker`).
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
from scipy import stats as scipy_stats

from cmtdp_jax import evaluation
from cmtdp_jax.studies.tool import design
from cmtdp_jax.studies.tool import numerics


def load_records(results_dir: str) -> list[dict]:
  """Every run record under `results_dir`: `<key>/*.json` and the unkeyed ones at the top."""
  records = []
  for path in sorted(glob.glob(os.path.join(results_dir, '*.json')) +
                     glob.glob(os.path.join(results_dir, '*', '*.json'))):
    if os.path.basename(path) in ('study.json', 'consistency.json', 'fingerprint.json'):
      continue
    with open(path) as f:
      record = json.load(f)
    if 'cell' in record and 'seed' in record:
      records.append(record)
  return records


def record_cell(record: dict) -> design.Cell:
  return design.Cell(record['train_size'], float(record['weight']), record.get('extra', ''),
              record.get('regime', 'full'), record.get('pilot', False))


def latest(records: list[dict]) -> dict:
  """The newest of one seed's records (a fingerprinted one over one made before them)."""
  return max(records, key=lambda r: ('fingerprint' in r, r.get('finished', '')))


def _half_width(n: int, se: float, confidence: float) -> float:
  """Half the two-sided t-interval at `confidence` of a mean over n paired differences."""
  return float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1) * se)


def _t_interval(values) -> dict:
  """Mean and 95% t-interval of paired differences."""
  if not values:
    return {'n': 0, 'mean': None, 'low': None, 'high': None, 'se': None}
  mean = float(np.mean(values))
  if len(values) < 2:
    return {'n': 1, 'mean': mean, 'low': None, 'high': None, 'se': None}
  se = float(np.std(values, ddof=1) / np.sqrt(len(values)))
  half = _half_width(len(values), se, 0.95)
  return {'n': len(values), 'mean': mean, 'low': mean - half, 'high': mean + half, 'se': se}


def pairs(runs, reference) -> tuple[list[tuple[dict, dict]], list[str]]:
  """(run, reference) of the same seed and pairing key; why each other seed of `runs` has none.

  A seed with several records pairs through the newest key that both sides have."""
  by_seed = {}
  for r in reference:
    by_seed.setdefault(r['seed'], {})[numerics.pairing_key(r)] = r
  runs_by_seed = {}
  for r in runs:
    runs_by_seed.setdefault(r['seed'], []).append(r)
  paired, dropped = [], []
  for seed in sorted(runs_by_seed):
    references = by_seed.get(seed, {})
    candidates = [r for r in runs_by_seed[seed] if numerics.pairing_key(r) in references]
    if candidates:
      run = latest(candidates)
      paired.append((run, references[numerics.pairing_key(run)]))
    elif references:
      dropped.append(f"seed {seed}: numerics {', '.join(sorted({numerics.pairing_key(r) for r in runs_by_seed[seed]}))}"
                     f" vs reference {', '.join(sorted(references))}")
  return paired, dropped


def paired_delta_m(runs, reference, tasks) -> dict:
  """delta_m of each seed against the same seed's reference of the same numerics (pairing
  key); mean and 95% t-interval, and the seeds dropped for differing numerics."""
  paired, dropped = pairs(runs, reference)
  deltas = [evaluation.delta_m(r['metrics'], ref['metrics'], tasks=tasks).value
            for r, ref in paired]
  return dict(_t_interval(deltas), dropped=dropped)


def _better(key: str) -> float:
  return -1.0 if key in evaluation.LOWER_IS_BETTER else 1.0


def split_summary(runs, reference, tasks) -> dict | None:
  """Per task: the primary metric on the training images whose label for it was kept /
  dropped, mean and sample std over seeds, and (against `reference`) the paired difference,
  signed so that positive is better."""
  runs = [r for r in runs if r.get('split_metrics')]
  if not runs:
    return None
  paired, _ = pairs(runs, [r for r in reference or [] if r.get('split_metrics')])
  out = {}
  for task in tasks:
    primary = evaluation.PRIMARY_METRICS.get(task)
    for part in ('kept', 'dropped'):
      key = f'{primary}@{part}'
      values = [r['split_metrics'][key] for r in runs if key in r['split_metrics']]
      if not values:
        continue
      entry = {'mean': float(np.mean(values)),
               'std': float(np.std(values, ddof=1)) if len(values) > 1 else None}
      if reference is not None:
        both = [(r['split_metrics'][key], ref['split_metrics'][key]) for r, ref in paired
                if key in r['split_metrics'] and key in ref['split_metrics']]
        entry['difference'] = _t_interval([_better(primary) * (v - w) for v, w in both])
        entry['relative'] = _t_interval([_better(primary) * 100.0 * (v - w) / w
                                         for v, w in both if w])  # %, as delta_m's terms
      out[key] = entry
  return out


def summarize_cell(runs, reference, tasks) -> dict:
  """Mean +- std of the primary metrics over seeds (the newest record of each); delta_m
  against `reference` (None: this is it)."""
  by_seed = {}
  for r in runs:
    by_seed.setdefault(r['seed'], []).append(r)
  newest = [latest(records) for _, records in sorted(by_seed.items())]
  primary = {t: evaluation.PRIMARY_METRICS[t] for t in tasks if t in evaluation.PRIMARY_METRICS}
  values = {key: [r['metrics'][key] for r in newest] for key in primary.values()}
  # Sample standard deviation over seeds (None for one seed).
  metrics = {key: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else None)
             for key, v in values.items()}
  shares = [r['regularizer_share'] for r in newest if r.get('regularizer_share') is not None]
  return {'seeds': sorted(by_seed), 'metrics': metrics,
          'delta_m': None if reference is None else paired_delta_m(runs, reference, tasks),
          'regularizer_share': float(np.mean(shares)) if shares else None,
          'split': split_summary(runs, reference, tasks),
          'numerics': sorted({numerics.pairing_key(r) for r in runs})}


def _interval_text(d: dict, unit: str = '') -> str:
  if d['mean'] is None:
    return 'n/a'
  if d['low'] is None:
    return f'{d["mean"]:+.2f}{unit} (1 seed)'
  return f'{d["mean"]:+.2f} [{d["low"]:+.2f}, {d["high"]:+.2f}]{unit}'


def markdown_table(summaries: dict, tasks) -> str:
  keys = [evaluation.PRIMARY_METRICS[t] for t in tasks if t in evaluation.PRIMARY_METRICS]
  header = ['cell', 'seeds'] + keys + ['delta_m % (95% CI)', 'reg. share']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for name, s in summaries.items():
    cells = [f'{mean:.3f}' if std is None else f'{mean:.3f} ± {std:.3f}'
             for mean, std in (s['metrics'][k] for k in keys)]
    d = s['delta_m']
    if d is None:
      delta = 'reference'
    else:
      delta = _interval_text(d)
      if d['n'] < len(s['seeds']) and d['mean'] is not None:
        delta += f' ({d["n"]} of {len(s["seeds"])} seeds paired)'
    share = '-' if s['regularizer_share'] is None else f'{s["regularizer_share"]:.3f}'
    lines.append(f'| {name} | {len(s["seeds"])} | ' + ' | '.join(cells) +
                 f' | {delta} | {share} |')
  return '\n'.join(lines)


def split_table(summaries: dict, tasks) -> str:
  """The partial-label cells' kept/dropped split, one row per cell and task."""
  rows = []
  for name, s in summaries.items():
    if not s.get('split'):
      continue
    for task in tasks:
      primary = evaluation.PRIMARY_METRICS.get(task)
      parts = [s['split'].get(f'{primary}@{part}') for part in ('kept', 'dropped')]
      values = ['-' if p is None else f'{p["mean"]:.3f}' + (
          '' if p['std'] is None else f' ± {p["std"]:.3f}') for p in parts]
      changes = ['reference' if s['delta_m'] is None else
                 '-' if p is None or 'difference' not in p else _interval_text(p['difference'])
                 for p in parts]
      rows.append(f'| {name} | {primary} | ' + ' | '.join(values + changes) + ' |')
  if not rows:
    return ''
  return '\n'.join(['| cell | metric | label kept | label dropped | vs λ 0, kept (95% CI) | '
                    'vs λ 0, dropped (95% CI) |', '|---|---|---|---|---|---|'] + rows)


def _at_level(d: dict, level: float) -> tuple[str, str, str]:
  """(interval, half-width, shown) of a paired difference at a confidence `level`."""
  if d['se'] is None:
    return _interval_text(d), '-', 'too few seeds'
  half = _half_width(d['n'], d['se'], level)
  return (_interval_text(dict(d, low=d['mean'] - half, high=d['mean'] + half)), f'{half:.2f}',
          'yes' if abs(d['mean']) > half else 'no')


def endpoint_table(summaries: dict, tasks, methods: int) -> str:
  """A comparison's pre-registered endpoints (design.endpoint_role), per cell:
  - a method's delta_m against lambda 0, Bonferroni over the `methods` compared in each
    regime and training size (level 1 - 0.05 / methods); the control's at 95%;
  - a method's tasks whose difference on the training images with their label dropped is
    shown, Bonferroni over the tasks (level 1 - 0.05 / tasks); for the control, the difference
    of the task whose labels it fills (design.CONTROL_TASK) at 95%, shown or not.
  Shown: the interval excludes 0."""
  keys = [evaluation.PRIMARY_METRICS[t] for t in tasks if t in evaluation.PRIMARY_METRICS]
  task_level = 1.0 - 0.05 / max(len(keys), 1)
  rows = []
  for name, s in summaries.items():
    role = design.endpoint_role(design.Cell(s['train_size'], s['weight'], s['extra'],
                                            s['regime'], s['pilot']))
    if role is None or s['delta_m'] is None:
      continue
    level = 1.0 - 0.05 / methods if role == design.METHOD else 0.95
    dropped = {key: ((s.get('split') or {}).get(f'{key}@dropped') or {}).get('difference')
               for key in keys}
    if role == design.METHOD:
      at_level = {key: _at_level(d, task_level) for key, d in dropped.items() if d}
      tasks_text = '; '.join(f'{key} {interval}' for key, (interval, _, verdict)
                             in at_level.items() if verdict == 'yes') or 'none'
    else:
      key = evaluation.PRIMARY_METRICS[design.CONTROL_TASK]
      if dropped.get(key):
        interval, _, verdict = _at_level(dropped[key], 0.95)
        tasks_text = f'{key} {interval} at 95%: {verdict}'
      else:
        tasks_text = f'{key}: not split'
    interval, width, verdict = _at_level(s['delta_m'], level)
    rows.append(f'| {name} | {role} | {s["delta_m"]["n"]} | {interval} | {level:.1%} | {width} '
                f'| {verdict} | {tasks_text} |')
  if not rows:
    return ''
  return '\n'.join([f'| cell | role | seeds paired | delta_m % (interval) | level | half-width | '
                    f'shown | dropped-label differences shown ({task_level:.1%}; the control: '
                    'the task it fills) |', '|---|---|---|---|---|---|---|---|'] + rows)


def dropped_lines(summaries: dict) -> list[str]:
  return [f'- {name} {reason}' for name, s in summaries.items() if s['delta_m']
          for reason in s['delta_m'].get('dropped', [])]


def plot_delta_m(summaries: dict, path: str) -> None:
  """delta_m (paired 95% CI) against lambda, one line per training-set size and label
  regime; the extras as unconnected markers at their lambda. Series are shifted a little
  apart in lambda so that their intervals do not hide each other."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  figure = Figure(figsize=(5.6, 3.6), dpi=120)
  FigureCanvasAgg(figure)
  ax = figure.add_subplot()
  scored = [s for s in summaries.values() if s['delta_m'] and s['delta_m']['mean'] is not None
            and not s.get('pilot')]
  series = sorted({(s['train_size'], s['extra'], s.get('regime', 'full')) for s in scored},
                  key=lambda k: (k[1], k[2] != 'full', k[2], k[0]))
  for index, (size, extra, regime) in enumerate(series):
    points = sorted((s['weight'], s['delta_m']) for s in scored
                    if s['train_size'] == size and s['extra'] == extra
                    and s.get('regime', 'full') == regime)
    shift = 1.0 + 0.05 * (index - (len(series) - 1) / 2)
    x = [w * shift for w, _ in points]
    y = [d['mean'] for _, d in points]
    err = [[d['mean'] - (d['low'] if d['low'] is not None else d['mean']) for _, d in points],
           [(d['high'] if d['high'] is not None else d['mean']) - d['mean'] for _, d in points]]
    label = f'{size} training scenes' + ('' if regime == 'full' else f', {regime}') + (
        f', {extra}' if extra else '')
    ax.errorbar(x, y, yerr=err, marker='o' if not extra else 's', capsize=3,
                linestyle='-' if not extra else 'none', label=label)
  ax.axhline(0.0, color='grey', lw=0.8)
  weights = sorted({s['weight'] for s in scored})
  ax.set_xscale('log')
  if weights:
    ax.set_xticks(weights, [f'{w:g}' for w in weights])
    ax.minorticks_off()
    ax.set_xlim(min(weights) / 1.6, max(weights) * 1.6)
  ax.set_xlabel('lambda (regularizer weight)')
  ax.set_ylabel('delta_m vs lambda 0 (%)')
  ax.set_title('Regularizer effect, paired 95% CI over seeds', fontsize=9)
  if series:
    ax.legend(fontsize=7)
  figure.tight_layout()
  figure.savefig(path)


def plot_split(summaries: dict, tasks, path: str) -> bool:
  """Per partial-label regime and task: the paired relative difference (%, positive =
  better) of lambda vs lambda 0 on the training images whose label for the task was dropped,
  and on those where it was kept, with 95% CIs. False when there is nothing to plot."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  cells = [(name, s) for name, s in summaries.items() if s.get('split') and s['delta_m']]
  if not cells:
    return False
  figure = Figure(figsize=(6.4, 1.0 + 1.6 * len(cells)), dpi=120)
  FigureCanvasAgg(figure)
  for row, (name, s) in enumerate(cells):
    ax = figure.add_subplot(len(cells), 1, row + 1)
    for offset, part, marker in ((-0.12, 'dropped', 'o'), (0.12, 'kept', 's')):
      x, y, err = [], [], [[], []]
      for index, task in enumerate(tasks):
        d = (s['split'].get(f'{evaluation.PRIMARY_METRICS.get(task)}@{part}') or {}).get(
            'relative')
        if d and d['mean'] is not None:
          x.append(index + offset)
          y.append(d['mean'])
          err[0].append(d['mean'] - (d['low'] if d['low'] is not None else d['mean']))
          err[1].append((d['high'] if d['high'] is not None else d['mean']) - d['mean'])
      ax.errorbar(x, y, yerr=err, marker=marker, linestyle='none', capsize=3,
                  label=f"task's label {part}")
    ax.axhline(0.0, color='grey', lw=0.8)
    ax.set_xticks(range(len(tasks)), tasks, fontsize=7)
    ax.set_ylabel('vs λ 0 (%)', fontsize=7)
    ax.set_title(f'{name}: training images by whether the task\'s label was kept', fontsize=8)
    ax.legend(fontsize=6)
  figure.tight_layout()
  figure.savefig(path)
  return True


def plot_consistency(before: dict, after: dict, path: str, labels) -> None:
  """Fraction of triplets with d(a,p) < d(a,n) per (target, source) pair, two models."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  pairs_shown = list(before['pairs'])
  figure = Figure(figsize=(max(6.0, 0.32 * len(pairs_shown)), 3.8), dpi=120)
  FigureCanvasAgg(figure)
  ax = figure.add_subplot()
  x = np.arange(len(pairs_shown))
  for offset, results, label in ((-0.2, before, labels[0]), (0.2, after, labels[1])):
    fractions = [results['pairs'][p]['fraction_closer'] or 0.0 for p in pairs_shown]
    ax.bar(x + offset, fractions, width=0.4, label=label)
  ax.axhline(0.5, color='grey', lw=0.8, ls='--')
  ax.set_xticks(x, pairs_shown, rotation=90, fontsize=6)
  ax.set_ylabel('triplets with d(a,p) < d(a,n)')
  ax.set_ylim(0, 1)
  ax.legend(fontsize=7, loc='lower right')
  figure.tight_layout()
  figure.savefig(path)


def best_weight(summaries: dict, train_size: int, pilot: bool = False) -> float | None:
  """The weight with the highest mean delta_m in the full-label column of `train_size`."""
  candidates = [(s['delta_m']['mean'], -s['weight'], s['weight']) for s in summaries.values()
                if s['train_size'] == train_size and not s['extra'] and s['weight'] > 0
                and s.get('regime', 'full') == 'full' and s.get('pilot', False) == pilot
                and s['delta_m'] and s['delta_m']['mean'] is not None]
  return max(candidates)[2] if candidates else None


def write_readme_section(path: str, marker: str, text: str, plots) -> None:
  """Replaces what lies between `<!-- marker -->` and `<!-- /marker -->` in `path` by
  `text` and the `plots` (linked relative to `path`)."""
  begin, end = f'<!-- {marker} -->', f'<!-- /{marker} -->'
  with open(path) as f:
    content = f.read()
  if content.count(begin) != 1 or content.count(end) != 1 or (
      content.index(begin) > content.index(end)):
    raise ValueError(f"--readme {path}: needs one '{begin}' line and one '{end}' after it")
  titles = {'delta_m.png': 'delta_m against lambda',
            'split.png': 'lambda vs lambda 0 by whether the task label was kept'}
  links = ''.join(f'![{titles[os.path.basename(plot)]}]('
                  f'{os.path.relpath(os.path.abspath(plot), os.path.dirname(os.path.abspath(path)))})\n'
                  for plot in plots)
  section = f'{begin}\n{text}\n{links}{end}'
  head, rest = content.split(begin)
  with open(path, 'w') as f:
    f.write(head + section + rest.split(end, 1)[1])
