"""The regularizer's effect as a designed study: lambda x training-set size x label regime x seeds.

  python -m cmtdp_jax.tools.ablation --config configs/synthetic.py --workdir runs/study \
      --results_dir docs/regularizer_study --config.num_steps=1000

The design is fixed by the flags before anything runs:
- the grid: every `--weights` (lambda; 0 = no regularizer at all, the reference) x every
  `--train_sizes` (config.data.num_train) x every `--regimes` (`full`: every label;
  `one_label`: each training image keeps one task's labels; `random<f>`, e.g. `random0.5`: each
  task kept with probability f; config.data.partial_labels / label_fraction) x every `--seeds`;
  the same seeds in every cell, so each cell's difference to lambda 0 of its own regime and
  size is paired by seed;
- `--pilot_weights`: a short pilot (`--pilot_steps`, `--pilot_seeds`, full labels, the largest
  training set) before the grid; the weight `pilot` in `--weights` is the pilot weight with the
  highest mean delta_m against the pilot's lambda 0 (the pilot chooses which lambda the study
  tests, not whether an effect exists: its seeds are not the study's);
- `--extras` at the best lambda of the largest training set with full labels (the highest mean
  delta_m, decided once every one of `--seeds` of that column has finished; extra seeds do not
  move it): `hard` (strategy=hard), `categorical_sources` / `continuous_sources`
  (source_choice=pairs with only categorical, or only depth/normals, sources for every target);
- `--more_seeds` are added, seed by seed, to every cell, extras included (and its lambda-0
  reference), whose paired delta_m after `--seeds` is within twice its standard error.

Numerics that pair. Two runs are compared only when they computed with the same numerics:
the same code of the compiled train step, the same JAX/jaxlib, CPU model and device count. The
study measures this at its start as a fingerprint (`numerics_fingerprint`): the versions, the
CPU model, the number of devices and a probe that no cell's settings enter, so that a lambda-0
reference and a lambda-3 treatment share it: two train steps of the study's base config (seed
0, a fixed random batch) with the regularizer off and on with full labels, and on with partial
labels (that step compiles apart; since af84d44, so earlier keys differ), their losses and
gradient norms as float32 bit patterns and a sha256 of the parameters after them. Any change
to the rounding of the forward pass, the gradient or the update (a code change such as the
NaN guard of 5da98ea, another XLA build or CPU) changes the bits; the key is a 12-hex-digit
hash of it all. Measured on configs/synthetic.py: two processes give the same key; the commit
before the guard gives the same losses for both steps but other parameters after them (the
guard changed the update's rounding, not the forward pass), hence the parameters' digest. Each record keeps the whole fingerprint and the run's own losses at its first
step as float32 hex.

Results: every run trains in `<workdir>/<key>/<cell>_seed<seed>` and writes its record (eval
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

The summary goes to `<workdir>/study.md` and `study.json` (per cell: mean +- std of every task's
primary metric over its seeds, the latest record of each seed; delta_m against lambda 0 with a
paired 95% confidence interval over the seeds whose records share a fingerprint, and which seeds
were dropped for not sharing one; the regularizer's loss share; for the partial-label regimes,
every task's primary metric on the training images split by whether the task's own label was
kept or dropped on the image, and its paired difference to lambda 0), `delta_m.png`,
`split.png` (the partial regimes' differences by kept/dropped label), and the same files into
`results_dir`. `--analyze` also measures the paper's Figure 1 premise on seed 0
of the lambda-0 and the best-lambda model of the largest training set, side by side in
`consistency.png`. `--summarize_only` writes the same files from the runs finished so far;
`--readme=README.md` also puts the summary between the README's `<!-- study table -->` markers
(`--readme_marker`).
"""

from __future__ import annotations

import datetime
import functools
import glob
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from typing import NamedTuple

import numpy as np
from absl import app, flags
from ml_collections import config_flags
from scipy import stats as scipy_stats

from cmtdp_jax import config_lib
from cmtdp_jax import evaluation
from cmtdp_jax import label_mapping
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
                    "Regularizer weights; 0 = regularizer off; 'pilot' = the pilot's best.")
  flags.DEFINE_list('train_sizes', ['200', '1000'], 'config.data.num_train values.')
  flags.DEFINE_list('regimes', ['full'], 'Label regimes: full, one_label, random<fraction>.')
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Training seeds, the same in every cell.')
  flags.DEFINE_list('extras', ['hard', 'categorical_sources', 'continuous_sources'],
                    'Variants run at the best weight of the largest training set.')
  flags.DEFINE_list('more_seeds', [], 'Seeds added where a paired difference is < 2 SE.')
  flags.DEFINE_list('pilot_weights', [], "Weights of the pilot that picks --weights' 'pilot'.")
  flags.DEFINE_list('pilot_seeds', ['100'], 'Seeds of the pilot (not the study\'s).')
  flags.DEFINE_integer('pilot_steps', 0, 'Steps of a pilot run (0 = config.num_steps).')
  flags.DEFINE_bool('analyze', True, 'Figure 1 premise: lambda 0 vs the best lambda.')
  flags.DEFINE_bool('summarize_only', False, 'Summarize the finished runs, train nothing.')
  flags.DEFINE_string('readme', '', 'Also write the summary into this file, between '
                      "'<!-- <readme_marker> -->' and '<!-- /<readme_marker> -->'.")
  flags.DEFINE_string('readme_marker', 'study table', 'The section --readme replaces.')
  flags.mark_flags_as_required(['config', 'workdir'])


CONTINUOUS_KINDS = (tasks_lib.DEPTH, tasks_lib.NORMALS)

# Commits known to have changed the rounding of the compiled train step, oldest first: records
# without a fingerprint pair only with records made at commits on the same side of each.
# 5da98ea: the NaN guard (steps.train_step's finiteness checks and jnp.where on the state).
NUMERICS_CHANGES = ('5da98ea',)


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


def regime_labels(regime: str) -> tuple[str, float | None]:
  """(config.data.partial_labels, label_fraction) of a `--regimes` entry."""
  if regime == 'full':
    return '', None
  if regime == 'one_label':
    return 'one_label', None
  if regime.startswith('random'):
    try:
      fraction = float(regime[len('random'):])
    except ValueError:
      fraction = -1.0
    if 0.0 < fraction < 1.0:
      return 'random', fraction
  raise ValueError(f"--regimes: unknown regime '{regime}' "
                   '(valid: full, one_label, random<fraction in (0, 1)>, e.g. random0.5)')


class Cell(NamedTuple):
  """One cell of the design; its runs differ only in the seed."""
  train_size: int
  weight: float
  extra: str = ''
  regime: str = 'full'
  pilot: bool = False

  @property
  def name(self) -> str:
    return cell_name(self.train_size, self.weight, self.extra, self.regime, self.pilot)

  @property
  def reference(self) -> 'Cell':
    return Cell(self.train_size, 0.0, '', self.regime, self.pilot)


def cell_name(train_size: int, weight: float, extra: str = '', regime: str = 'full',
              pilot: bool = False) -> str:
  """e.g. n1000_w3, n1000_w3_hard, n1000_one_label_w0, pilot_n1000_w1."""
  return (('pilot_' if pilot else '') + f'n{train_size}' +
          ('' if regime == 'full' else f'_{regime}') + f'_w{weight:g}' +
          (f'_{extra}' if extra else ''))


def cell_config(config, train_size: int, weight: float, extra: str, seed: int,
                regime: str = 'full', num_steps: int = 0):
  config = config.copy_and_resolve_references()
  config.seed = seed
  config.data.num_train = train_size
  config.contrastive.enable = weight > 0
  config.contrastive.weight = weight
  if extra:
    config.contrastive.update(extra_overrides(extra, config.tasks))
  partial, fraction = regime_labels(regime)
  if partial:
    config.data.partial_labels = partial
    # Each seed its own draw of the kept labels, the same for every lambda of that seed: the
    # pairs share their labels, and the seeds sample mappings as well as initialisations.
    config.data.partial_labels_seed = seed
    if fraction is not None:
      config.data.label_fraction = fraction
  if num_steps:
    config.num_steps = num_steps
  return config


def _train_scalars(workdir: str) -> dict[int, dict[str, float]]:
  """{step: {tag: value}} of the logged train and first-step scalars (TensorBoard, float32)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  values = {}
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag.startswith(('train/', 'first_step/')):
          values.setdefault(event.step, {})[value.tag] = np.float32(
              tf.make_ndarray(value.tensor))
  return values


def regularizer_share(workdir: str) -> float | None:
  """Mean over the logged train steps of lambda * regularizer / total loss (TensorBoard)."""
  values = _train_scalars(workdir)
  shares = [float(v['train/loss/contrastive']) / float(v['train/loss/total'])
            for v in values.values()
            if 'train/loss/contrastive' in v and v.get('train/loss/total')]
  return float(np.mean(shares)) if shares else None


def float32_hex(value) -> str:
  """The bit pattern of `value` as float32: equal strings, equal numbers to the last bit."""
  return f'{int(np.asarray(value, np.float32).view(np.uint32)):08x}'


def first_step_losses(workdir: str) -> dict | None:
  """The run's losses at its first step, as float32 hex (train.py logs them as 'first_step/',
  or as 'train/' when every step is logged)."""
  values = _train_scalars(workdir)
  if 1 not in values:
    return None
  tags = values[1]
  prefix = 'first_step/' if any(t.startswith('first_step/') for t in tags) else 'train/'
  return {tag[len(prefix):]: float32_hex(v) for tag, v in sorted(tags.items())
          if tag.startswith(prefix + 'loss/')}


def numerics_fingerprint(config, probe_steps: int = 2) -> dict:
  """What decides the rounding of a run's compiled step, independent of its cell.

  The probe trains `probe_steps` steps of `config` (seed 0, the benchmark's fixed random
  batch) with the regularizer off and on (at its weight, or 1 when that is 0), both with full
  labels, and on with partial labels (image r keeps only the r-th task, cyclically: the step
  with `batch['labelled']` compiles apart and has its own rounding). It keeps every loss and
  the gradient norm as float32 hex and a sha256 of the parameters after them. Versions, CPU
  model and device count go in beside it; `key` hashes everything.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  from cmtdp_jax import benchmark  # pylint: disable=import-outside-toplevel
  from cmtdp_jax import sharding  # pylint: disable=import-outside-toplevel
  probes = {}
  for name, enable, partial in (('off', False, False), ('on', True, False),
                                ('partial', True, True)):
    probe = config.copy_and_resolve_references()
    probe.seed = 0
    probe.contrastive.enable = enable
    probe.contrastive.weight = float(config.contrastive.weight) or 1.0
    if 'partial_labels' in probe.data:
      probe.data.partial_labels = ''
    mesh = sharding.make_mesh(probe.mesh)
    with jax.set_mesh(mesh):
      _, _, state, train_step, _ = benchmark.build(probe, mesh)
      batch = benchmark.synthetic_batch(probe, probe.batch_size, probe.data.crop_size)
      if partial:
        rows = np.arange(probe.batch_size) % len(probe.tasks)
        batch['labelled'] = {t: rows == i for i, t in enumerate(sorted(probe.tasks))}
      batch = jax.device_put(batch, sharding.batch_sharding(mesh))
      losses = []
      for _ in range(probe_steps):
        state, metrics = train_step(state, batch)
        metrics = jax.device_get(metrics)
        losses.append({k: float32_hex(v) for k, v in sorted(metrics.items())
                       if k.startswith('loss/') or k == 'grad_norm'})
      digest = hashlib.sha256()
      for leaf in jax.tree.leaves(jax.device_get(state.params)):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    probes[name] = {'losses': losses, 'params_sha256': digest.hexdigest()}
  fingerprint = {'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'cpu': cpu_model(),
                 'devices': jax.device_count(), 'platform': jax.default_backend(),
                 'probe': probes}
  fingerprint['key'] = fingerprint_hash(fingerprint)
  return fingerprint


def fingerprint_hash(fingerprint: dict) -> str:
  body = json.dumps({k: v for k, v in fingerprint.items() if k != 'key'}, sort_keys=True)
  return hashlib.sha256(body.encode()).hexdigest()[:12]


def cpu_model() -> str:
  """/proc/cpuinfo's 'model name' (Linux), else what `platform` says."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def pairing_key(record: dict) -> str:
  """Records pair only when these are equal: the fingerprint's key, or for a record made
  before fingerprints, its machine and the numerics era of its commit."""
  if 'fingerprint' in record:
    return record['fingerprint']['key']
  return f"legacy:{record.get('machine', '?')}:{numerics_era(record.get('commit', 'unknown'))}"


@functools.lru_cache(maxsize=None)
def numerics_era(commit: str) -> str:
  """'before <c>' or 'since <c>' of the NUMERICS_CHANGES; 'commit <commit>' when git cannot
  place it (it then pairs only with records of the same commit)."""
  commit = commit.removesuffix('-dirty')
  era = f'before {NUMERICS_CHANGES[0]}' if NUMERICS_CHANGES else 'all'
  for change in NUMERICS_CHANGES:
    try:
      code = subprocess.run(['git', '-C', _repository_root(), 'merge-base', '--is-ancestor',
                             change, commit], capture_output=True, check=False).returncode
    except OSError:
      code = 128
    if code not in (0, 1):
      return f'commit {commit}'
    if code == 0:
      era = f'since {change}'
  return era


def _repository_root() -> str:
  return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def split_by_label(config, run_dir: str, mapping: dict) -> dict[str, float]:
  """The trained model of `run_dir` on the training images (every label, no augmentation):
  each task's metrics on the images whose label for it was kept ('<key>@kept') and on those
  whose label was dropped ('<key>@dropped')."""
  import jax  # pylint: disable=import-outside-toplevel
  from cmtdp_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from cmtdp_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  mesh, model, _, state, _ = train.restore(config, run_dir)
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


def train_run(config, workdir: str, results_dir: str, cell: Cell, seed: int,
              fingerprint: dict, num_steps: int = 0) -> dict:
  """Trains one run under `fingerprint` (resuming its checkpoint) and writes its record."""
  key = fingerprint['key']
  name = f'{cell.name}_seed{seed}'
  run_config = cell_config(config, cell.train_size, cell.weight, cell.extra, seed, cell.regime,
                           num_steps)
  run_dir = os.path.join(workdir, key, name)
  start = time.time()
  metrics = train.train_and_evaluate(run_config, run_dir)
  if not os.path.exists(os.path.join(run_dir, 'eval', f'step_{run_config.num_steps}.json')):
    raise Interrupted(f'{name} stopped before step {run_config.num_steps} (SIGTERM); its '
                      'checkpoint is kept: rerun the same command to resume the study')
  share = regularizer_share(run_dir)
  record = {'cell': cell.name, 'seed': seed, 'weight': cell.weight,
            'train_size': cell.train_size, 'extra': cell.extra, 'regime': cell.regime,
            'pilot': cell.pilot, 'num_steps': run_config.num_steps,
            'metrics': metrics, 'edge_options': evaluation.metric_options(run_config, 'edge'),
            'regularizer_share': None if share is None else cell.weight * share,
            'wall_seconds': round(time.time() - start, 1),
            'machine': f'{platform.node()} {platform.machine()} {os.cpu_count()} cores',
            'commit': _commit(), 'fingerprint': fingerprint,
            'first_step_losses': first_step_losses(run_dir),
            'run_dir': os.path.join(key, name),
            'finished': datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec='seconds')}
  if regime_labels(cell.regime)[0]:
    mapping = label_mapping.load(run_dir)
    record['split_metrics'] = split_by_label(run_config, run_dir, mapping)
    # Both runs of a pair must have trained on the same labels: this says whether they did.
    record['label_mapping_sha256'] = label_mapping.sha256(mapping)
  folder = os.path.join(results_dir, key)
  os.makedirs(folder, exist_ok=True)
  # Whole or not at all: a record's file says that the run finished.
  evaluation.write_results(os.path.join(folder, 'fingerprint.json'), fingerprint, indent=2,
                           sort_keys=True)
  evaluation.write_results(os.path.join(folder, f'{name}.json'), record, indent=2,
                           sort_keys=True)
  return record


def _commit() -> str:
  """The code a run trained with: the repository's HEAD (+ '-dirty' with local changes)."""
  root = _repository_root()
  try:
    head = subprocess.run(['git', '-C', root, 'rev-parse', '--short', 'HEAD'], check=True,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(['git', '-C', root, 'status', '--porcelain', '--untracked-files=no',
                            'cmtdp_jax'], check=True, capture_output=True, text=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'
  return head + ('-dirty' if dirty.strip() else '')


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


def record_cell(record: dict) -> Cell:
  return Cell(record['train_size'], float(record['weight']), record.get('extra', ''),
              record.get('regime', 'full'), record.get('pilot', False))


def latest(records: list[dict]) -> dict:
  """The newest of one seed's records (a fingerprinted one over one made before them)."""
  return max(records, key=lambda r: ('fingerprint' in r, r.get('finished', '')))


def _t_interval(values) -> dict:
  """Mean and 95% t-interval of paired differences."""
  if not values:
    return {'n': 0, 'mean': None, 'low': None, 'high': None, 'se': None}
  mean = float(np.mean(values))
  if len(values) < 2:
    return {'n': 1, 'mean': mean, 'low': None, 'high': None, 'se': None}
  se = float(np.std(values, ddof=1) / np.sqrt(len(values)))
  half = float(scipy_stats.t.ppf(0.975, len(values) - 1) * se)
  return {'n': len(values), 'mean': mean, 'low': mean - half, 'high': mean + half, 'se': se}


def pairs(runs, reference) -> tuple[list[tuple[dict, dict]], list[str]]:
  """(run, reference) of the same seed and pairing key; why each other seed of `runs` has none.

  A seed with several records pairs through the newest key that both sides have."""
  by_seed = {}
  for r in reference:
    by_seed.setdefault(r['seed'], {})[pairing_key(r)] = r
  runs_by_seed = {}
  for r in runs:
    runs_by_seed.setdefault(r['seed'], []).append(r)
  paired, dropped = [], []
  for seed in sorted(runs_by_seed):
    references = by_seed.get(seed, {})
    candidates = [r for r in runs_by_seed[seed] if pairing_key(r) in references]
    if candidates:
      run = latest(candidates)
      paired.append((run, references[pairing_key(run)]))
    elif references:
      dropped.append(f"seed {seed}: numerics {', '.join(sorted({pairing_key(r) for r in runs_by_seed[seed]}))}"
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
          'numerics': sorted({pairing_key(r) for r in runs})}


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


class _Study:
  """The records found and made so far, and how to get a missing one."""

  def __init__(self, config, workdir, results_dir, train_missing, pilot_steps=0):
    self.config, self.workdir, self.results_dir = config, workdir, results_dir
    self.train_missing, self.pilot_steps = train_missing, pilot_steps
    self.found = {}  # (Cell, seed) -> [records], everything in results_dir
    for record in load_records(results_dir):
      self.found.setdefault((record_cell(record), record['seed']), []).append(record)
    self.used = {}  # Cell -> {(seed, key): record}: the cells this design asked for
    self._fingerprint = None

  def fingerprint(self) -> dict:
    """The current numerics; measured once, when the first run must train."""
    if self._fingerprint is None:
      self._fingerprint = numerics_fingerprint(self.config)
      print(f"numerics fingerprint {self._fingerprint['key']}: jax {self._fingerprint['jax']}, "
            f"{self._fingerprint['cpu']}, {self._fingerprint['devices']} devices", flush=True)
    return self._fingerprint

  def _records(self, cell, seed) -> list[dict]:
    return self.found.get((cell, seed), [])

  def _train(self, cell, seed) -> None:
    record = train_run(self.config, self.workdir, self.results_dir, cell, seed,
                       self.fingerprint(), self.pilot_steps if cell.pilot else 0)
    self.found.setdefault((cell, seed), []).append(record)

  def run(self, cell: Cell, seed: int) -> None:
    """Makes sure (cell, seed) has a record that pairs (module docstring), training what is
    missing under the current fingerprint."""
    if cell.weight == 0:
      if not self._records(cell, seed) and self.train_missing:
        self._train(cell, seed)
    else:
      reference = cell.reference
      keys = {pairing_key(r) for r in self._records(reference, seed)}
      if not any(pairing_key(r) in keys for r in self._records(cell, seed)) and (
          self.train_missing):
        current = self.fingerprint()['key']
        if current not in keys:
          self._train(reference, seed)
        if current not in {pairing_key(r) for r in self._records(cell, seed)}:
          self._train(cell, seed)
      self._use(reference, seed)
    self._use(cell, seed)

  def _use(self, cell, seed) -> None:
    for record in self._records(cell, seed):
      self.used.setdefault(cell, {})[(seed, pairing_key(record))] = record

  def summaries(self, tasks, every_seed: bool = False) -> dict:
    """The cells the design asked for, from the records it asked for; `every_seed`: from
    every record of those cells (the final summary: also seeds that an earlier decision,
    under another pairing, added)."""
    if every_seed:
      for (cell, seed), records in self.found.items():
        if cell in self.used:
          for record in records:
            self.used[cell].setdefault((seed, pairing_key(record)), record)
    out = {}
    for cell, records in self.used.items():
      reference = (list(self.used.get(cell.reference, {}).values()) if cell.weight > 0
                   else None)
      summary = summarize_cell(list(records.values()), reference, tasks)
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
              readme_marker: str = 'study table') -> dict:
  """Runs (or, without `train_missing`, only summarizes) the study; returns the summary.

  `weights` are floats, or 'pilot' for the best of `pilot_weights`."""
  tasks = tuple(config.tasks)
  regimes = list(regimes)
  for regime in regimes:
    regime_labels(regime)  # a bad name fails before anything trains
  study = _Study(config, workdir, results_dir, train_missing, pilot_steps)
  largest = max(train_sizes)

  pilot_best = None
  if pilot_weights:
    for seed in pilot_seeds:
      for weight in pilot_weights:
        if weight > 0:
          study.run(Cell(largest, weight, pilot=True), seed)
    pilot_best = best_weight(study.summaries(tasks), largest, pilot=True)
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
          study.run(Cell(train_size, weight, '', regime), seed)
  # The extras' lambda is decided on `seeds` alone: extra seeds refine the cells, they do
  # not move the extras to another lambda (which would rerun all of them).
  best = best_weight(study.summaries(tasks), largest)
  if best is not None:
    for extra in extras:
      for seed in seeds:
        study.run(Cell(largest, best, extra), seed)
  undecided = [s for s in study.summaries(tasks).values()
               if not s['pilot'] and s['delta_m'] and s['delta_m']['se'] is not None
               and abs(s['delta_m']['mean']) < 2 * s['delta_m']['se']]
  for seed in more_seeds:  # seed by seed here too
    for s in undecided:
      study.run(Cell(s['train_size'], s['weight'], s['extra'], s['regime']), seed)

  final = study.summaries(tasks, every_seed=True)
  grid = {name: s for name, s in final.items() if not s['pilot']}
  table = markdown_table(grid, tasks)
  split = split_table(grid, tasks)
  dropped = dropped_lines(final)
  wall = study.wall_seconds()
  added = ({(s['train_size'], s['weight'], s['extra'], s['regime']) for s in undecided}
           | {(s['train_size'], 0.0, '', s['regime']) for s in undecided})
  pilot_runs = len([w for w in pilot_weights if w > 0]) + (1 if pilot_weights else 0)
  planned = ((len(weights) * len(train_sizes) * len(regimes) + len(extras)) * len(seeds)
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
  if split:
    text += ('\nTraining images, each task\'s primary metric on the images whose label for it '
             'was kept vs dropped (every label scored, no augmentation); differences to λ 0 of '
             'the same regime, paired by seed, positive = better:\n\n' + split + '\n')
  if pilot_weights:
    text += '\nPilot (full labels):\n\n' + markdown_table(
        {n: s for n, s in final.items() if s['pilot']}, tasks) + '\n'
  if dropped:
    text += ('\nNot paired (the run and its reference computed with different numerics):\n'
             + '\n'.join(dropped) + '\n')
  summary = {'design': {'weights': weights, 'train_sizes': train_sizes, 'seeds': seeds,
                        'extras': extras, 'more_seeds': more_seeds,
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
    plot_delta_m(grid, os.path.join(folder, 'delta_m.png'))
    has_split = plot_split(grid, tasks, os.path.join(folder, 'split.png'))
  if readme:
    write_readme_section(readme, readme_marker, text,
                         [os.path.join(results_dir, name) for name in
                          ('delta_m.png', 'split.png')[:2 if has_split else 1]])
  print(f'\n{text}', flush=True)
  if analyze and best is not None:
    run_dirs = [_run_dir(study, Cell(largest, w), seeds[0]) for w in (0.0, best)]
    if all(d and os.path.isdir(os.path.join(workdir, d)) for d in run_dirs):
      _analyze_premise(config, workdir, results_dir, largest, best, seeds[0], run_dirs)
  return summary


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


def _run_dir(study: _Study, cell: Cell, seed: int) -> str | None:
  """The run directory (relative to the workdir) of the newest record of (cell, seed)."""
  records = study.found.get((cell, seed))
  if not records:
    return None
  record = latest(records)
  return record.get('run_dir', f'{cell.name}_seed{seed}')


def _analyze_premise(config, workdir, results_dir, train_size, weight, seed, run_dirs):
  from cmtdp_jax import analysis  # pylint: disable=import-outside-toplevel
  measured = []
  for w, run_dir in zip((0.0, weight), run_dirs):
    # Triplets from every other task's labels, also for the model trained without them.
    run_config = cell_config(config, train_size, w, '', seed)
    measured.append(analysis.analyze(run_config, os.path.join(workdir, run_dir)))
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
  except ValueError as e:  # a bad flag or file: one line
    sys.exit(f'error: {e}')


def _weights(values) -> list:
  try:
    return [v if v == 'pilot' else float(v) for v in values]
  except ValueError as e:
    raise ValueError(f"--weights: {e} (numbers, or 'pilot')") from e


def _run_from_flags():
  run_study(FLAGS.config, FLAGS.workdir, FLAGS.results_dir or FLAGS.workdir,
            _weights(FLAGS.weights), [int(n) for n in FLAGS.train_sizes],
            [int(s) for s in FLAGS.seeds], list(FLAGS.extras),
            [int(s) for s in FLAGS.more_seeds], FLAGS.analyze,
            train_missing=not FLAGS.summarize_only, regimes=list(FLAGS.regimes),
            pilot_weights=[float(w) for w in FLAGS.pilot_weights],
            pilot_seeds=[int(s) for s in FLAGS.pilot_seeds], pilot_steps=FLAGS.pilot_steps,
            readme=FLAGS.readme, readme_marker=FLAGS.readme_marker)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=config_lib.parse_flags)
