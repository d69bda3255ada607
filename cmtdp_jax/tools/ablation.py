"""The regularizer's effect as a designed study: lambda x training-set size x seeds.

  python -m cmtdp_jax.tools.ablation --config configs/synthetic.py --workdir runs/study \
      --results_dir docs/regularizer_study --config.num_steps=1000

The design is fixed by the flags before anything runs:
- the grid: every `--weights` (lambda; 0 = no regularizer at all, the reference) x every
  `--train_sizes` (config.data.num_train) x every `--seeds`; the same seeds in every cell, so
  each cell's difference to lambda 0 is paired by seed;
- `--extras` at the best lambda of the largest training set (the highest mean delta_m, decided
  once every one of `--seeds` of that column has finished; extra seeds do not move it):
  `hard` (strategy=hard),
  `categorical_sources` / `continuous_sources` (source_choice=pairs with only categorical, or
  only depth/normals, sources for every target);
- `--more_seeds` are added, seed by seed, to every cell, extras included (and its lambda-0
  reference), whose paired delta_m after `--seeds` is within twice its standard error.

Every run trains in `<workdir>/<cell>_seed<seed>`; its result (eval metrics, the regularizer's
share of the total loss, wall time) is written to `<results_dir>/<cell>_seed<seed>.json`. A run
whose result file exists is not rerun, so committing `results_dir` makes the study resumable
from the repository. The summary goes to `<workdir>/study.md` (per cell: mean +- std of every
task's primary metric, delta_m against lambda 0 with a paired 95% confidence interval over
seeds, the regularizer's loss share), `study.json` and `delta_m.png`, and the same three files
into `results_dir`. `--analyze` also measures the paper's Figure 1 premise on seed 0 of the
lambda-0 and the best-lambda model of the largest training set, side by side in
`consistency.png`. `--summarize_only` writes the same files from the runs finished so far.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import subprocess
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags
from scipy import stats as scipy_stats

from cmtdp_jax import config_lib
from cmtdp_jax import evaluation
from cmtdp_jax import tasks as tasks_lib
from cmtdp_jax import train

FLAGS = flags.FLAGS


def define_flags():
  """The command's flags; defined when it runs, so that importing this module (tests, other
  tools) does not claim flag names such as --config."""
  config_flags.DEFINE_config_file('config', None, 'Config file (optionally file.py:variant).',
                                  lock_config=False)
  flags.DEFINE_string('workdir', None, 'Directory for all runs and the summary.')
  flags.DEFINE_string('results_dir', '', "Per-run result files and the summary ('' = workdir).")
  flags.DEFINE_list('weights', ['0', '0.3', '1', '3'],
                    'Regularizer weights; 0 = regularizer off.')
  flags.DEFINE_list('train_sizes', ['200', '1000'], 'config.data.num_train values.')
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Training seeds, the same in every cell.')
  flags.DEFINE_list('extras', ['hard', 'categorical_sources', 'continuous_sources'],
                    'Variants run at the best weight of the largest training set.')
  flags.DEFINE_list('more_seeds', [], 'Seeds added where a paired difference is < 2 SE.')
  flags.DEFINE_bool('analyze', True, 'Figure 1 premise: lambda 0 vs the best lambda.')
  flags.DEFINE_bool('summarize_only', False, 'Summarize the finished runs, train nothing.')
  flags.mark_flags_as_required(['config', 'workdir'])


CONTINUOUS_KINDS = (tasks_lib.DEPTH, tasks_lib.NORMALS)


def source_pairs(task_names, continuous: bool) -> tuple[tuple[str, str], ...]:
  """Every (target, source) pair whose source is continuous (depth, normals) or categorical."""
  return tuple((t, s) for t in task_names for s in task_names if s != t and
               (tasks_lib.get_task(s).label_kind in CONTINUOUS_KINDS) == continuous)


def extra_overrides(name: str, task_names) -> dict:
  if name == 'hard':
    return {'strategy': 'hard'}
  if name in ('categorical_sources', 'continuous_sources'):
    return {'source_choice': 'pairs',
            'pairs': source_pairs(task_names, name == 'continuous_sources')}
  raise ValueError(f"--extras: unknown extra '{name}' "
                   '(valid: hard, categorical_sources, continuous_sources)')


def cell_name(train_size: int, weight: float, extra: str = '') -> str:
  return f'n{train_size}_w{weight:g}' + (f'_{extra}' if extra else '')


def cell_config(config, train_size: int, weight: float, extra: str, seed: int):
  config = config.copy_and_resolve_references()
  config.seed = seed
  config.data.num_train = train_size
  config.contrastive.enable = weight > 0
  config.contrastive.weight = weight
  if extra:
    config.contrastive.update(extra_overrides(extra, config.tasks))
  return config


def regularizer_share(workdir: str) -> float | None:
  """Mean over the logged train steps of lambda * regularizer / total loss (TensorBoard)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  values = {}
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag in ('train/loss/contrastive', 'train/loss/total'):
          values.setdefault(event.step, {})[value.tag] = float(tf.make_ndarray(value.tensor))
  shares = [v['train/loss/contrastive'] / v['train/loss/total'] for v in values.values()
            if len(v) == 2 and v['train/loss/total']]
  return float(np.mean(shares)) if shares else None


class Interrupted(Exception):
  """A run returned before its last step (preemption): nothing is recorded for it."""


def run_cell(config, workdir, results_dir, train_size, weight, extra, seed,
             train_missing: bool = True) -> dict | None:
  """The result record of one run, training it unless its result file exists
  (or returning None for a missing one, without `train_missing`)."""
  name = f'{cell_name(train_size, weight, extra)}_seed{seed}'
  result_path = os.path.join(results_dir, f'{name}.json')
  if os.path.exists(result_path):
    with open(result_path) as f:
      return json.load(f)
  if not train_missing:
    return None
  run_config = cell_config(config, train_size, weight, extra, seed)
  run_dir = os.path.join(workdir, name)
  start = time.time()
  metrics = train.train_and_evaluate(run_config, run_dir)
  if not os.path.exists(os.path.join(run_dir, 'eval', f'step_{run_config.num_steps}.json')):
    raise Interrupted(f'{name} stopped before step {run_config.num_steps} (SIGTERM); its '
                      'checkpoint is kept: rerun the same command to resume the study')
  share = regularizer_share(run_dir)
  record = {'cell': cell_name(train_size, weight, extra), 'seed': seed, 'weight': weight,
            'train_size': train_size, 'extra': extra, 'num_steps': run_config.num_steps,
            'metrics': metrics, 'edge_options': evaluation.metric_options(run_config, 'edge'),
            'regularizer_share': None if share is None else weight * share,
            'wall_seconds': round(time.time() - start, 1),
            'machine': f'{platform.node()} {platform.machine()} {os.cpu_count()} cores',
            'commit': _commit()}
  os.makedirs(results_dir, exist_ok=True)
  with open(result_path, 'w') as f:
    json.dump(record, f, indent=2, sort_keys=True)
  return record


def _commit() -> str:
  """The code a run trained with: the repository's HEAD (+ '-dirty' with local changes)."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    head = subprocess.run(['git', '-C', root, 'rev-parse', '--short', 'HEAD'], check=True,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(['git', '-C', root, 'status', '--porcelain', '--untracked-files=no',
                            'cmtdp_jax'], check=True, capture_output=True, text=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'
  return head + ('-dirty' if dirty.strip() else '')


def paired_delta_m(runs, reference, tasks) -> dict:
  """delta_m of each seed against the same seed's reference; mean and 95% t-interval."""
  by_seed = {r['seed']: r for r in reference}
  deltas = [evaluation.delta_m(r['metrics'], by_seed[r['seed']]['metrics'], tasks=tasks).value
            for r in runs if r['seed'] in by_seed]
  if not deltas:
    return {'n': 0, 'mean': None, 'low': None, 'high': None, 'se': None}
  mean = float(np.mean(deltas))
  if len(deltas) < 2:
    return {'n': 1, 'mean': mean, 'low': None, 'high': None, 'se': None}
  se = float(np.std(deltas, ddof=1) / np.sqrt(len(deltas)))
  half = float(scipy_stats.t.ppf(0.975, len(deltas) - 1) * se)
  return {'n': len(deltas), 'mean': mean, 'low': mean - half, 'high': mean + half, 'se': se}


def summarize_cell(runs, reference, tasks) -> dict:
  """Mean +- std of the primary metrics; delta_m against `reference` (None: this is it)."""
  primary = {t: evaluation.PRIMARY_METRICS[t] for t in tasks if t in evaluation.PRIMARY_METRICS}
  values = {key: [r['metrics'][key] for r in runs] for key in primary.values()}
  # Sample standard deviation over seeds (None for one seed).
  metrics = {key: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else None)
             for key, v in values.items()}
  shares = [r['regularizer_share'] for r in runs if r.get('regularizer_share') is not None]
  return {'seeds': sorted(r['seed'] for r in runs), 'metrics': metrics,
          'delta_m': None if reference is None else paired_delta_m(runs, reference, tasks),
          'regularizer_share': float(np.mean(shares)) if shares else None}


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
    elif d['low'] is None:
      delta = 'n/a' if d['mean'] is None else f'{d["mean"]:+.2f} (1 seed)'
    else:
      delta = f'{d["mean"]:+.2f} [{d["low"]:+.2f}, {d["high"]:+.2f}]'
    share = '-' if s['regularizer_share'] is None else f'{s["regularizer_share"]:.3f}'
    lines.append(f'| {name} | {len(s["seeds"])} | ' + ' | '.join(cells) +
                 f' | {delta} | {share} |')
  return '\n'.join(lines)


def plot_delta_m(summaries: dict, path: str) -> None:
  """delta_m (paired 95% CI) against lambda, one line per training-set size; the extras
  as unconnected markers at their lambda. Series are shifted a little apart in lambda so
  that their intervals do not hide each other."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  figure = Figure(figsize=(5.6, 3.6), dpi=120)
  FigureCanvasAgg(figure)
  ax = figure.add_subplot()
  scored = [s for s in summaries.values() if s['delta_m'] and s['delta_m']['mean'] is not None]
  series = sorted({(s['train_size'], s['extra']) for s in scored}, key=lambda k: (k[1], k[0]))
  for index, (size, extra) in enumerate(series):
    points = sorted((s['weight'], s['delta_m']) for s in scored
                    if s['train_size'] == size and s['extra'] == extra)
    shift = 1.0 + 0.05 * (index - (len(series) - 1) / 2)
    x = [w * shift for w, _ in points]
    y = [d['mean'] for _, d in points]
    err = [[d['mean'] - (d['low'] if d['low'] is not None else d['mean']) for _, d in points],
           [(d['high'] if d['high'] is not None else d['mean']) - d['mean'] for _, d in points]]
    ax.errorbar(x, y, yerr=err, marker='o' if not extra else 's', capsize=3,
                linestyle='-' if not extra else 'none',
                label=f'{size} training scenes' + (f', {extra}' if extra else ''))
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
  ax.legend(fontsize=7)
  figure.tight_layout()
  figure.savefig(path)


def plot_consistency(before: dict, after: dict, path: str, labels) -> None:
  """Fraction of triplets with d(a,p) < d(a,n) per (target, source) pair, two models."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  pairs = list(before['pairs'])
  figure = Figure(figsize=(max(6.0, 0.32 * len(pairs)), 3.8), dpi=120)
  FigureCanvasAgg(figure)
  ax = figure.add_subplot()
  x = np.arange(len(pairs))
  for offset, results, label in ((-0.2, before, labels[0]), (0.2, after, labels[1])):
    fractions = [results['pairs'][p]['fraction_closer'] or 0.0 for p in pairs]
    ax.bar(x + offset, fractions, width=0.4, label=label)
  ax.axhline(0.5, color='grey', lw=0.8, ls='--')
  ax.set_xticks(x, pairs, rotation=90, fontsize=6)
  ax.set_ylabel('triplets with d(a,p) < d(a,n)')
  ax.set_ylim(0, 1)
  ax.legend(fontsize=7, loc='lower right')
  figure.tight_layout()
  figure.savefig(path)


def best_weight(summaries: dict, train_size: int) -> float | None:
  candidates = [(s['delta_m']['mean'], s['weight']) for s in summaries.values()
                if s['train_size'] == train_size and not s['extra'] and s['weight'] > 0
                and s['delta_m'] and s['delta_m']['mean'] is not None]
  return max(candidates)[1] if candidates else None


def run_study(config, workdir: str, results_dir: str, weights, train_sizes, seeds, extras,
              more_seeds, analyze: bool, train_missing: bool = True) -> dict:
  """Runs (or, without `train_missing`, only summarizes) the study; returns the summary."""
  tasks = tuple(config.tasks)
  runs = {}

  def run(train_size, weight, extra, cell_seeds):
    for seed in cell_seeds:
      record = run_cell(config, workdir, results_dir, train_size, weight, extra, seed,
                        train_missing)
      if record is not None:
        runs.setdefault((train_size, weight, extra), {})[seed] = record

  def summaries():
    out = {}
    for (train_size, weight, extra), by_seed in runs.items():
      reference = list(runs.get((train_size, 0.0, ''), {}).values()) if weight > 0 else None
      summary = summarize_cell(list(by_seed.values()), reference, tasks)
      out[cell_name(train_size, weight, extra)] = dict(
          summary, train_size=train_size, weight=weight, extra=extra)
    return out

  # Seed by seed, so an interrupted study has every cell at the same number of seeds.
  for seed in seeds:
    for train_size in train_sizes:
      for weight in weights:
        run(train_size, weight, '', [seed])
  # The extras' lambda is decided on `seeds` alone: extra seeds refine the cells, they do
  # not move the extras to another lambda (which would rerun all of them).
  largest = max(train_sizes)
  best = best_weight(summaries(), largest)
  if best is not None:
    for extra in extras:
      run(largest, best, extra, seeds)
  undecided = [s for s in summaries().values() if s['delta_m'] and s['delta_m']['se'] is not None
               and abs(s['delta_m']['mean']) < 2 * s['delta_m']['se']]
  for seed in more_seeds:  # seed by seed here too
    for s in undecided:
      run(s['train_size'], 0.0, '', [seed])
      run(s['train_size'], s['weight'], s['extra'], [seed])

  final = summaries()
  table = markdown_table(final, tasks)
  wall = sum(r['wall_seconds'] for by_seed in runs.values() for r in by_seed.values())
  added = ({(s['train_size'], s['weight'], s['extra']) for s in undecided}
           | {(s['train_size'], 0.0, '') for s in undecided})
  planned = (len(weights) * len(train_sizes) + len(extras)) * len(seeds) + len(added) * len(
      more_seeds)
  finished = sum(len(by_seed) for by_seed in runs.values())
  so_far = ' so far' if finished < planned else ''
  header = (f'{config.num_steps} steps per run, seeds {",".join(map(str, seeds))}'
            f'{"; more seeds " + ",".join(map(str, more_seeds)) if more_seeds else ""}; '
            f'best lambda of {largest} scenes at seeds {",".join(map(str, seeds))} (the extras\' '
            f'lambda){so_far}: {best}; {finished} of {planned} planned '
            f'runs finished, {wall / 3600:.2f} h of training and evaluation; mean ± sample std '
            'over seeds')
  summary = {'design': {'weights': weights, 'train_sizes': train_sizes, 'seeds': seeds,
                        'extras': extras, 'more_seeds': more_seeds,
                        'num_steps': config.num_steps},
             'best_weight': best, 'cells': final, 'wall_seconds': wall}
  for folder in {workdir, results_dir}:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'study.md'), 'w') as f:
      f.write(header + '\n\n' + table + '\n')
    with open(os.path.join(folder, 'study.json'), 'w') as f:
      json.dump(summary, f, indent=2, sort_keys=True)
    plot_delta_m(final, os.path.join(folder, 'delta_m.png'))
  print(f'\n{header}\n{table}', flush=True)
  if analyze and best is not None and all(
      os.path.isdir(os.path.join(workdir, f'{cell_name(largest, w)}_seed{seeds[0]}'))
      for w in (0.0, best)):
    _analyze_premise(config, workdir, results_dir, largest, best, seeds[0])
  return summary


def _analyze_premise(config, workdir, results_dir, train_size, weight, seed):
  from cmtdp_jax import analysis  # pylint: disable=import-outside-toplevel
  measured = []
  for w in (0.0, weight):
    name = f'{cell_name(train_size, w)}_seed{seed}'
    # Triplets from every other task's labels, also for the model trained without them.
    run_config = cell_config(config, train_size, w, '', seed)
    measured.append(analysis.analyze(run_config, os.path.join(workdir, name)))
  for folder in {workdir, results_dir}:
    plot_consistency(*measured, os.path.join(folder, 'consistency.png'),
                     ('lambda 0 (raw features, no regularizer)',
                      f'lambda {weight:g} (trained projectors)'))
    with open(os.path.join(folder, 'consistency.json'), 'w') as f:
      json.dump({'lambda_0': measured[0], f'lambda_{weight:g}': measured[1]}, f, indent=2)


def main(argv):
  del argv
  try:
    _run_from_flags()
  except Interrupted as e:
    print(e, flush=True)


def _run_from_flags():
  run_study(FLAGS.config, FLAGS.workdir, FLAGS.results_dir or FLAGS.workdir,
            [float(w) for w in FLAGS.weights], [int(n) for n in FLAGS.train_sizes],
            [int(s) for s in FLAGS.seeds], list(FLAGS.extras),
            [int(s) for s in FLAGS.more_seeds], FLAGS.analyze,
            train_missing=not FLAGS.summarize_only)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=config_lib.parse_flags)
