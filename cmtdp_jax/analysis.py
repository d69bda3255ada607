"""Cross-task consistency of decoder features: the paper's Figure 1.

For every (target t, source s) pair the regularizer knows, triplets are drawn
from s's ground truth by the training's rule (`contrastive.sample_triplets`
composes the same pixel sampler, pair masks and matching per image; its random
draws are not training's; 'random' matching, so the histograms are not biased
by hard mining) on
t's decoder features of eval images, and embedded with the trained projector
Proj_{t,s}; a run trained without the regularizer has no projectors, so its
L2-normalised raw features are measured instead. Features consistent with s's
labels put anchor-positive distances below anchor-negative ones.

  python -m cmtdp_jax.main --config ... --workdir ... --mode=analyze [--step=N]

writes `<workdir>/analysis/step_<N>.png` (histograms, targets as rows and
sources as columns) and `step_<N>.json` (the images measured and, per pair,
the triplet count, mean distances and the fraction of triplets with
d(a, p) < d(a, n)).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cmtdp_jax import atomic_json
from cmtdp_jax import contrastive
from cmtdp_jax import sharding
from cmtdp_jax import tasks as tasks_lib
from cmtdp_jax import train
from cmtdp_jax.data import pipeline


def triplet_statistics(d_ap, d_an) -> dict:
  """Count, mean distances and the fraction of triplets whose positive is closer.

  Values are None without any triplet, so the JSON never holds NaN.
  """
  d_ap, d_an = np.asarray(d_ap, np.float64), np.asarray(d_an, np.float64)
  if not d_ap.size:
    return {'count': 0, 'mean_d_ap': None, 'mean_d_an': None, 'fraction_closer': None}
  return {'count': int(d_ap.size), 'mean_d_ap': float(d_ap.mean()),
          'mean_d_an': float(d_an.mean()), 'fraction_closer': float(np.mean(d_ap < d_an))}


def plot_histograms(distances, path: str, title: str, bins: int = 40):
  """Saves a PNG grid of d(a, p) and d(a, n) histograms.

  Args:
    distances: {(target, source): (d_ap, d_an)} 1-D arrays of valid triplets.
      Rows are targets and columns sources, both in order of first mention,
      so a task's row and column line up.
    path: PNG to write.
    title: figure title (says which features were measured).
    bins: histogram bins per panel, shared by both distributions.
  """
  order = list(dict.fromkeys(task for pair in distances for task in pair))
  targets = [t for t in order if any(pair[0] == t for pair in distances)]
  sources = [s for s in order if any(pair[1] == s for pair in distances)]
  figure = Figure(figsize=(3.0 * len(sources), 2.4 * len(targets) + 0.6), dpi=100)
  canvas = FigureCanvasAgg(figure)
  axes = figure.subplots(len(targets), len(sources), squeeze=False)
  for ax in axes.flat:
    ax.set_axis_off()
  for (target, source), (d_ap, d_an) in distances.items():
    ax = axes[targets.index(target), sources.index(source)]
    ax.set_axis_on()
    stats = triplet_statistics(d_ap, d_an)
    if stats['count']:
      edges = np.histogram_bin_edges(np.concatenate([d_ap, d_an]), bins=bins)
      ax.hist(d_ap, bins=edges, alpha=0.6, color='tab:green', label='d(a, p)')
      ax.hist(d_an, bins=edges, alpha=0.6, color='tab:red', label='d(a, n)')
      ax.legend(fontsize=7)
      summary = f"{stats['fraction_closer']:.0%} with d(a,p) < d(a,n)"
    else:
      summary = 'no valid triplet'
    ax.set_title(f'features {target}, triplets by {source}\n{summary}', fontsize=8)
    ax.tick_params(labelsize=7)
  figure.suptitle(title, fontsize=10)
  figure.tight_layout()
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  canvas.print_png(path)


def _sample(keys, source, labels, cfg):
  """`contrastive.sample_triplets` on every image of a batch of labels."""
  return jax.vmap(lambda key, image_labels: contrastive.sample_triplets(
      key, source, image_labels, num_anchors=cfg.num_anchors, pool_size=cfg.pool_size,
      **cfg.thresholds))(keys, labels)


def _embed(flat_features, pixels, projector):
  """Pixels [B, K] of [B, h * w, C] features, projected (or L2-normalised without projector)."""
  gathered = jnp.take_along_axis(flat_features, pixels[..., None], axis=1)
  if projector is None:
    return tasks_lib.unit_vectors(gathered)
  return contrastive.project(projector, gathered)


def _pair_distances(model, pairs, cfg, variables, projectors, images, labels, mask, rng):
  """{pair name: (d_ap, d_an, valid)}, each [B, K], for one batch."""
  _, features = model.apply(variables, images, train=False)
  distance = functools.partial(contrastive.rowwise_distance, distance=cfg.distance)
  out = {}
  for target_index, (target, sources) in enumerate(pairs.items()):
    feats = features[target].astype(jnp.float32)
    batch, height, width, channels = feats.shape
    flat = feats.reshape(batch, height * width, channels)
    for source_index, source in enumerate(sources):
      name = contrastive.pair_name(target, source)
      projector = None if projectors is None else projectors[name]
      keys = jax.random.split(
          jax.random.fold_in(jax.random.fold_in(rng, target_index), source_index), batch)
      triplets = _sample(
          keys, source, contrastive.resize_labels_nearest(labels[source], height, width), cfg)
      anchor = _embed(flat, triplets.anchor, projector)
      out[name] = (distance(anchor, _embed(flat, triplets.positive, projector)),
                   distance(anchor, _embed(flat, triplets.negative, projector)),
                   triplets.valid & mask[:, None])
  return out


def analyze(config, workdir: str, step: int | None = None) -> dict:
  """Measures checkpoint `step` (default latest) of the run in `workdir`; returns the JSON."""
  if config.analysis.num_batches < 1:
    raise ValueError(f'config.analysis.num_batches={config.analysis.num_batches} must be >= 1')
  mesh, model, _, state = train.restore(config, workdir, step)
  eval_source = pipeline.open_eval_split(config)
  step = int(state.step)
  cfg = contrastive.ContrastiveConfig.from_dict(config.contrastive)
  pairs = contrastive.source_options(config.tasks, config.tasks, cfg)
  projectors = state.params.get('contrastive')
  if projectors is None:
    features = 'L2-normalised raw decoder features (trained without the regularizer)'
  else:
    features = 'projected features Proj_{t,s} (trained with the regularizer)'
  logging.info('Analysing step %d on %s', step, features)

  batch_sharding = sharding.batch_sharding(mesh)
  measure = jax.jit(functools.partial(_pair_distances, model, pairs, cfg))
  variables = {'params': state.params['model'], 'batch_stats': state.batch_stats}
  rng = jax.random.key(config.analysis.seed)
  collected, num_images = {}, 0
  batches = pipeline.eval_dataset(eval_source, config).take(config.analysis.num_batches)
  with jax.set_mesh(mesh):
    for index, batch in enumerate(batches.as_numpy_iterator()):
      inputs = pipeline.to_global({k: batch[k] for k in ('image', 'mask', *config.tasks)},
                                  batch_sharding)
      labels = {t: inputs[t] for t in config.tasks}
      num_images += int(multihost_utils.process_allgather(batch['mask']).sum())
      out = measure(variables, projectors, inputs['image'], labels, inputs['mask'],
                    jax.random.fold_in(rng, index))
      out = multihost_utils.process_allgather(out, tiled=True)
      for name, (d_ap, d_an, valid) in out.items():
        collected.setdefault(name, []).append((d_ap[valid], d_an[valid]))

  distances = {}
  for target, sources in pairs.items():
    for source in sources:
      parts = collected[contrastive.pair_name(target, source)]
      distances[target, source] = tuple(np.concatenate(p) for p in zip(*parts))
  results = {'step': step, 'features': features, 'distance': cfg.distance,
             'num_images': num_images,
             'pairs': {contrastive.pair_name(t, s): triplet_statistics(*d)
                       for (t, s), d in distances.items()}}
  if jax.process_index() == 0:
    folder = os.path.join(workdir, 'analysis')
    plot_histograms(distances, os.path.join(folder, f'step_{step}.png'),
                    f'Triplet distances at step {step}: {features}', config.analysis.bins)
    atomic_json.write_json(os.path.join(folder, f'step_{step}.json'), results, indent=2)
    print(f'\nCross-task consistency at step {step} ({features}):\n{format_table(results)}',
          flush=True)
  return results


def format_table(results: dict) -> str:
  """One line per (target, source) pair of the analysis JSON."""
  lines = [f"{'pair':<24} {'triplets':>8} {'d(a,p)':>8} {'d(a,n)':>8} {'p closer':>8}"]
  for name, stats in results['pairs'].items():
    if stats['count']:
      lines.append(f"{name:<24} {stats['count']:>8} {stats['mean_d_ap']:>8.3f} "
                   f"{stats['mean_d_an']:>8.3f} {stats['fraction_closer']:>8.1%}")
    else:
      lines.append(f"{name:<24} {0:>8} {'-':>8} {'-':>8} {'-':>8}")
  return '\n'.join(lines)
