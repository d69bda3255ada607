"""Results: every run trains in `<workdir>/<key>/<cell>_seed<seed>` and writes its record (eval
metrics, the regularizer's share of the total loss, wall time, commit, fingerprint) to
`<results_dir>/<key>/<cell>_seed<seed>.json`, next to `<results_dir>/<key>/fingerprint.json`;
runs of other numerics coexist in their own folders. A (cell, seed) is done when it has a
record that pairs: a reference (lambda 0) record of any numerics, a treatment record with a
reference record of the same key. Otherwise the study trains, under the current fingerprint,
what is missing: the treatment, and the reference of the same cell and seed when there is none
under the current key (a study resumed on another machine or after a change to the compiled
step reruns the references it needs instead of pairing across). Committing `results_dir` makes
the study resumable from the repository. Records of before fingerprints (`<results_dir>/*.json`,
the regularizer study of 2026-12-01/02) are keyed by the numerics era of their commit
(`NUMERICS_CHANGES`, commits known to change the compiled step's rounding) and machine: they pair
only within one era.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time

from cmtdp_jax import atomic_json
from cmtdp_jax import evaluation
from cmtdp_jax import label_mapping
from cmtdp_jax import train
from cmtdp_jax.studies.tool import design
from cmtdp_jax.studies.tool import numerics
from cmtdp_jax.studies.tool import summarize


def split_by_label(config, run_dir: str, mapping: dict) -> dict[str, float]:
  """The trained model of `run_dir` on the training images (every label, no augmentation):
  each task's metrics on the images whose label for it was kept ('<key>@kept') and on those
  whose label was dropped ('<key>@dropped')."""
  import jax  # pylint: disable=import-outside-toplevel
  from cmtdp_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from cmtdp_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  mesh, model, _, state = train.restore(config, run_dir)
  spec = data_lib.get_dataset_spec(config.data.name)
  source = pipeline.open_split(config.data, spec.train_split, config.tasks)
  with jax.set_mesh(mesh):
    return train.run_evaluation(config, model, state, source, mesh,
                                metrics=split_metrics(config, mapping))


def split_metrics(config, mapping: dict) -> dict:
  """{'<task>@kept' / '<task>@dropped': the task's metric on those images} (none for a part
  without images)."""
  metrics = {}
  for task in config.tasks:
    kept = {image for image, tasks in mapping.items() if task in tasks}
    for part, ids in (('kept', kept), ('dropped', set(mapping) - kept)):
      if ids:
        metrics[f'{task}@{part}'] = evaluation.make_metric(
            task, **evaluation.metric_options(config, task), image_ids=ids)
  return metrics


class Interrupted(Exception):
  """A run returned before its last step (preemption): nothing is recorded for it."""


def train_run(config, workdir: str, results_dir: str, cell: design.Cell, seed: int,
              fingerprint: dict, num_steps: int = 0, code_commit: str = '') -> dict:
  """Trains one run under `fingerprint` (resuming its checkpoint) and writes its record.

  `code_commit`: the commit whose code this process loaded (default: HEAD now, before
  training). HEAD can move while a run trains; the record names the code that ran."""
  code_commit = code_commit or numerics.commit()
  key = fingerprint['key']
  name = f'{cell.name}_seed{seed}'
  run_config = design.cell_config(config, cell.train_size, cell.weight, cell.extra, seed, cell.regime,
                           num_steps)
  run_dir = os.path.join(workdir, key, name)
  start = time.time()
  metrics = train.train_and_evaluate(run_config, run_dir)
  if not os.path.exists(os.path.join(run_dir, 'eval', f'step_{run_config.num_steps}.json')):
    raise Interrupted(f'{name} stopped before step {run_config.num_steps} (SIGTERM); its '
                      'checkpoint is kept: rerun the same command to resume the study')
  share = numerics.regularizer_share(run_dir)
  record = {'cell': cell.name, 'seed': seed, 'weight': cell.weight,
            'train_size': cell.train_size, 'extra': cell.extra, 'regime': cell.regime,
            'pilot': cell.pilot, 'num_steps': run_config.num_steps,
            'metrics': metrics, 'edge_options': evaluation.metric_options(run_config, 'edge'),
            'regularizer_share': None if share is None else cell.weight * share,
            'wall_seconds': round(time.time() - start, 1),
            'machine': f'{platform.node()} {platform.machine()} {os.cpu_count()} cores',
            'commit': code_commit, 'fingerprint': fingerprint,
            'first_step_losses': numerics.first_step_losses(run_dir),
            'run_dir': os.path.join(key, name),
            'finished': datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec='seconds')}
  if design.regime_labels(cell.regime)[0]:
    mapping = label_mapping.load(run_dir)
    record['split_metrics'] = split_by_label(run_config, run_dir, mapping)
    # Both runs of a pair must have trained on the same labels: this says whether they did.
    record['label_mapping_sha256'] = label_mapping.sha256(mapping)
  folder = os.path.join(results_dir, key)
  os.makedirs(folder, exist_ok=True)
  # Whole or not at all: a record's file says that the run finished.
  atomic_json.write_json(os.path.join(folder, 'fingerprint.json'), fingerprint, indent=2,
                           sort_keys=True)
  atomic_json.write_json(os.path.join(folder, f'{name}.json'), record, indent=2,
                           sort_keys=True)
  return record


class Study:
  """The records found and made so far, and how to get a missing one."""

  def __init__(self, config, workdir, results_dir, train_missing, pilot_steps=0):
    self.config, self.workdir, self.results_dir = config, workdir, results_dir
    self.train_missing, self.pilot_steps = train_missing, pilot_steps
    self.found = {}  # (Cell, seed) -> [records], everything in results_dir
    for record in summarize.load_records(results_dir):
      self.found.setdefault((summarize.record_cell(record), record['seed']), []).append(record)
    self.used = {}  # Cell -> {(seed, key): record}: the cells this design asked for
    self._fingerprint = None
    self.code_commit = numerics.commit()  # before any run: the code this process loaded

  def fingerprint(self) -> dict:
    """The current numerics; measured once, when the first run must train."""
    if self._fingerprint is None:
      self._fingerprint = numerics.numerics_fingerprint(self.config)
      print(f"numerics fingerprint {self._fingerprint['key']}: jax {self._fingerprint['jax']}, "
            f"{self._fingerprint['cpu']}, {self._fingerprint['devices']} devices", flush=True)
    return self._fingerprint

  def _records(self, cell, seed) -> list[dict]:
    return self.found.get((cell, seed), [])

  def _train(self, cell, seed) -> None:
    record = train_run(self.config, self.workdir, self.results_dir, cell, seed,
                       self.fingerprint(), self.pilot_steps if cell.pilot else 0,
                       self.code_commit)
    self.found.setdefault((cell, seed), []).append(record)

  def run(self, cell: design.Cell, seed: int) -> None:
    """Makes sure (cell, seed) has a record that pairs (module docstring), training what is
    missing under the current fingerprint."""
    if cell.weight == 0:
      if not self._records(cell, seed) and self.train_missing:
        self._train(cell, seed)
    else:
      reference = cell.reference
      keys = {numerics.pairing_key(r) for r in self._records(reference, seed)}
      if not any(numerics.pairing_key(r) in keys for r in self._records(cell, seed)) and (
          self.train_missing):
        current = self.fingerprint()['key']
        if current not in keys:
          self._train(reference, seed)
        if current not in {numerics.pairing_key(r) for r in self._records(cell, seed)}:
          self._train(cell, seed)
      self._use(reference, seed)
    self._use(cell, seed)

  def _use(self, cell, seed) -> None:
    for record in self._records(cell, seed):
      self.used.setdefault(cell, {})[(seed, numerics.pairing_key(record))] = record

  def summaries(self, tasks, every_seed: bool = False) -> dict:
    """The cells the design asked for, from the records it asked for; `every_seed`: from
    every record of those cells (the final summary: also seeds that an earlier decision,
    under another pairing, added)."""
    if every_seed:
      for (cell, seed), records in self.found.items():
        if cell in self.used:
          for record in records:
            self.used[cell].setdefault((seed, numerics.pairing_key(record)), record)
    out = {}
    for cell, records in self.used.items():
      reference = (list(self.used.get(cell.reference, {}).values()) if cell.weight > 0
                   else None)
      summary = summarize.summarize_cell(list(records.values()), reference, tasks)
      out[cell.name] = dict(summary, train_size=cell.train_size, weight=cell.weight,
                            extra=cell.extra, regime=cell.regime, pilot=cell.pilot)
    return out

  def finished(self) -> int:
    return len({(cell, seed) for cell, records in self.used.items() for seed, _ in records})

  def wall_seconds(self) -> float:
    return sum(r['wall_seconds'] for records in self.used.values() for r in records.values())


def run_study(config, workdir: str, results_dir: str, weights, train_sizes, seeds, extras,
              more_seeds, analyze: bool, train_missing: bool = True, regimes=('full',),
              pilot_weights=(), pilot_seeds=(100,), pilot_steps: int = 0, readme: str = '',
              readme_marker: str = 'study table', arms=()) -> dict:
  """Runs (or, without `train_missing`, only summarizes) the study; returns the summary.

  `weights` are floats, or 'pilot' for the best of `pilot_weights`; `arms` are
  (name, weight) of `design.ARMS`, run in every regime and size after the grid."""
  tasks = tuple(config.tasks)
  regimes = list(regimes)
  for regime in regimes:
    design.regime_labels(regime)  # a bad name fails before anything trains
  study = Study(config, workdir, results_dir, train_missing, pilot_steps)
  largest = max(train_sizes)

  pilot_best = None
  if pilot_weights:
    for seed in pilot_seeds:
      for weight in pilot_weights:
        if weight > 0:
          study.run(design.Cell(largest, weight, pilot=True), seed)
    pilot_best = summarize.best_weight(study.summaries(tasks), largest, pilot=True)
  grid_weights = []
  for weight in weights:
    if weight == 'pilot':
      if not pilot_weights:
        raise ValueError("--weights: 'pilot' needs --pilot_weights")
      weight = pilot_best
    if weight is not None and weight not in grid_weights:
      grid_weights.append(float(weight))

  # Seed by seed, so an interrupted study has every cell at the same number of seeds.
  for seed in seeds:
    for regime in regimes:
      for train_size in train_sizes:
        for weight in grid_weights:
          study.run(design.Cell(train_size, weight, '', regime), seed)
        for name, weight in arms:
          study.run(design.Cell(train_size, weight, name, regime), seed)
  # The extras' lambda is decided on `seeds` alone: extra seeds refine the cells, they do
  # not move the extras to another lambda (which would rerun all of them).
  best = summarize.best_weight(study.summaries(tasks), largest)
  if best is not None:
    for extra in extras:
      for seed in seeds:
        study.run(design.Cell(largest, best, extra), seed)
  undecided = [s for s in study.summaries(tasks).values()
               if not s['pilot'] and s['delta_m'] and s['delta_m']['se'] is not None
               and abs(s['delta_m']['mean']) < 2 * s['delta_m']['se']]
  for seed in more_seeds:  # seed by seed here too
    for s in undecided:
      study.run(design.Cell(s['train_size'], s['weight'], s['extra'], s['regime']), seed)

  final = study.summaries(tasks, every_seed=True)
  grid = {name: s for name, s in final.items() if not s['pilot']}
  table = summarize.markdown_table(grid, tasks)
  split = summarize.split_table(grid, tasks)
  dropped = summarize.dropped_lines(final)
  wall = study.wall_seconds()
  added = ({(s['train_size'], s['weight'], s['extra'], s['regime']) for s in undecided}
           | {(s['train_size'], 0.0, '', s['regime']) for s in undecided})
  pilot_runs = len([w for w in pilot_weights if w > 0]) + (1 if pilot_weights else 0)
  planned = (((len(weights) + len(arms)) * len(train_sizes) * len(regimes) + len(extras))
             * len(seeds)
             + len(added) * len(more_seeds) + pilot_runs * len(pilot_seeds))
  finished = study.finished()
  so_far = ' so far' if finished < planned else ''
  header = (f'{config.num_steps} steps per run, seeds {",".join(map(str, seeds))}'
            f'{"; more seeds " + ",".join(map(str, more_seeds)) if more_seeds else ""}; '
            f'best lambda of {largest} scenes at seeds {",".join(map(str, seeds))} (the extras\' '
            f'lambda){so_far}: {best}; ' +
            (f'{finished} of {planned} planned runs finished, ' if finished <= planned else
             f'{finished} runs finished ({planned} planned by the rules under today\'s pairing),'
             ' ') + f'{wall / 3600:.2f} h of training and evaluation; mean ± sample std '
            'over seeds')
  if regimes != ['full']:
    header += f'; label regimes {", ".join(regimes)}'
  if pilot_weights:
    header += (f'; pilot: lambda {", ".join(f"{w:g}" for w in pilot_weights if w > 0)} at '
               f'{pilot_steps or config.num_steps} steps, seeds '
               f'{",".join(map(str, pilot_seeds))}, best {pilot_best}')
  text = header + '\n\n' + table + '\n'
  methods = design.compared_methods(grid_weights, arms)
  endpoints = summarize.endpoint_table(grid, tasks, methods) if arms else ''
  if endpoints:
    text += ('\nEndpoints: each method\'s delta_m against λ 0 of its regime, Bonferroni over '
             f'the {methods} methods this command compares '
             '(--weights > 0 and the regularizer --arms), the control\'s at 95%; shown = the '
             'interval excludes 0, so with the same spread only an effect beyond the '
             'half-width is shown:\n\n' + endpoints + '\n')
  if split:
    text += ('\nTraining images, each task\'s primary metric on the images whose label for it '
             'was kept vs dropped (every label scored, no augmentation); differences to λ 0 of '
             'the same regime, paired by seed, positive = better:\n\n' + split + '\n')
  if pilot_weights:
    text += '\nPilot (full labels):\n\n' + summarize.markdown_table(
        {n: s for n, s in final.items() if s['pilot']}, tasks) + '\n'
  if dropped:
    text += ('\nNot paired (the run and its reference computed with different numerics):\n'
             + '\n'.join(dropped) + '\n')
  summary = {'design': {'weights': weights, 'train_sizes': train_sizes, 'seeds': seeds,
                        'extras': extras, 'more_seeds': more_seeds,
                        **({'arms': [f'{n}:{w:g}' for n, w in arms]} if arms else {}),
                        'num_steps': config.num_steps, 'regimes': regimes,
                        'pilot_weights': list(pilot_weights), 'pilot_seeds': list(pilot_seeds),
                        'pilot_steps': pilot_steps},
             'best_weight': best, 'pilot_best_weight': pilot_best, 'cells': final,
             'wall_seconds': wall}
  for folder in {workdir, results_dir}:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'study.md'), 'w') as f:
      f.write(text)
    with open(os.path.join(folder, 'study.json'), 'w') as f:
      json.dump(summary, f, indent=2, sort_keys=True)
    summarize.plot_delta_m(grid, os.path.join(folder, 'delta_m.png'))
    has_split = summarize.plot_split(grid, tasks, os.path.join(folder, 'split.png'))
  if readme:
    summarize.write_readme_section(readme, readme_marker, text,
                         [os.path.join(results_dir, name) for name in
                          ('delta_m.png', 'split.png')[:2 if has_split else 1]])
  print(f'\n{text}', flush=True)
  if analyze and best is not None:
    run_dirs = [run_dir_of(study, design.Cell(largest, w), seeds[0]) for w in (0.0, best)]
    if all(d and os.path.isdir(os.path.join(workdir, d)) for d in run_dirs):
      analyze_premise(config, workdir, results_dir, largest, best, seeds[0], run_dirs)
  return summary


def run_dir_of(study: Study, cell: design.Cell, seed: int) -> str | None:
  """The run directory (relative to the workdir) of the newest record of (cell, seed)."""
  records = study.found.get((cell, seed))
  if not records:
    return None
  record = summarize.latest(records)
  return record.get('run_dir', f'{cell.name}_seed{seed}')


def analyze_premise(config, workdir, results_dir, train_size, weight, seed, run_dirs):
  from cmtdp_jax import analysis  # pylint: disable=import-outside-toplevel
  measured = []
  for w, run_dir in zip((0.0, weight), run_dirs):
    # Triplets from every other task's labels, also for the model trained without them.
    run_config = design.cell_config(config, train_size, w, '', seed)
    measured.append(analysis.analyze(run_config, os.path.join(workdir, run_dir)))
  for folder in {workdir, results_dir}:
    summarize.plot_consistency(*measured, os.path.join(folder, 'consistency.png'),
                     ('lambda 0 (raw features, no regularizer)',
                      f'lambda {weight:g} (trained projectors)'))
    with open(os.path.join(folder, 'consistency.json'), 'w') as f:
      json.dump({'lambda_0': measured[0], f'lambda_{weight:g}': measured[1]}, f, indent=2)
