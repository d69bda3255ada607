"""Times and checks our boundary evaluation against pyEdgeEval's loop and the CSA matcher.

  python -m cmtdp_jax.benchmarks.bench_boundary --images 8 --size 480x640

Maps: scikit-image's sample photographs resized to --size; ground truth is
the thinned border of a Felzenszwalb segmentation of each photograph, the
prediction its normalised gradient magnitude (dense at low thresholds, as
real edge maps). `--maps synthetic` uses Voronoi boundaries instead.

Everything runs in this process on one core, on the same 8-bit maps, with
pyEdgeEval's NMS (protocol 'pyedgeeval'), 99 thresholds and max_dist 0.011:
  - ours: `image_counts` with the exact matcher, timed per stage, run twice;
  - CSA: the same pipeline with correspondPixels' CSA (matcher='csa');
  - pyEdgeEval's own loop (`evaluate_boundaries_threshold`), its NMS,
    thinning and matching timed by wrapping the functions it calls.
It prints the CPU seconds per image by stage (and the wall time), the
speed-up, odsF/oisF/AP of each (SEISM's summary rules; pyEdgeEval's own
summary too), the per-threshold count differences exact - CSA, our scores
under every protocol, and both AP definitions. `--threads 1,2` also times the
streaming metric (`BoundaryMetric`, exact matcher) with each number of threads,
wall seconds per image, and checks that their counts are identical. Exit status
1 if ours differs from CSA or from pyEdgeEval's loop by more than 0.001 odsF
(F in [0, 1]), or two runs (or two thread counts) differ.
"""

import argparse
import contextlib
import sys
import time
import types

import numpy as np
from scipy import ndimage
from skimage import data as sample_data
from skimage import color, filters, morphology, segmentation, transform

from cmtdp_jax.evaluation import boundary

TOLERANCE = 0.001  # on F in [0, 1]
PHOTOGRAPHS = ('astronaut', 'camera', 'coffee', 'chelsea', 'rocket', 'coins', 'clock',
               'immunohistochemistry')
STAGES = ('nms', 'thinning', 'graph', 'matching')


def synthetic_pair(rng, height, width, regions=12):
  """(probabilities, uint8 edge label) of one synthetic image."""
  centres = rng.uniform(0, 1, (regions, 2)) * [height, width]
  yy, xx = np.mgrid[:height, :width]
  labels = ((yy[..., None] - centres[:, 0]) ** 2 +
            (xx[..., None] - centres[:, 1]) ** 2).argmin(-1)
  edges = np.zeros((height, width), bool)
  edges[:-1] |= labels[:-1] != labels[1:]
  edges[:, :-1] |= labels[:, :-1] != labels[:, 1:]
  edges = morphology.thin(edges)
  kept = ndimage.gaussian_filter(rng.random((height, width)), 8) > 0.47
  moved = ndimage.shift(edges & kept, rng.uniform(-2, 2, 2), order=0)
  blobs = ndimage.gaussian_filter(rng.random((height, width)), 3) > 0.56
  clutter = morphology.thin(blobs ^ ndimage.binary_erosion(blobs))
  logits = ndimage.gaussian_filter(moved * 6.0 + clutter * 2.5, 1.5) * 4.0 - 4.5
  logits += ndimage.gaussian_filter(rng.standard_normal((height, width)), 1.0) * 0.5
  return 1.0 / (1.0 + np.exp(-logits)), edges.astype(np.uint8)


def photograph_pair(name, height, width):
  """(gradient-magnitude probabilities, region-border label) of a sample photograph."""
  image = getattr(sample_data, name)()
  if image.ndim == 3:
    image = color.rgb2gray(image[..., :3])
  image = transform.resize(image.astype(np.float64), (height, width), anti_aliasing=True)
  regions = segmentation.felzenszwalb(image, scale=300, sigma=0.8, min_size=200)
  label = morphology.thin(segmentation.find_boundaries(regions, mode='inner'))
  magnitude = filters.sobel(filters.gaussian(image, sigma=1.0))
  prob = np.clip(magnitude / np.percentile(magnitude, 98), 0.0, 1.0)
  return prob, label.astype(np.uint8)


def _pyedgeeval():
  """pyEdgeEval's loop module and summary; its preprocess package imports cv2
  only for file helpers, so an empty stand-in is enough when OpenCV is absent."""
  try:
    import cv2  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    sys.modules['cv2'] = types.ModuleType('cv2')
  # pylint: disable=import-outside-toplevel
  from pyEdgeEval.common.binary_label import evaluate_boundaries as loop_module
  from pyEdgeEval.common.binary_label.calculate_metrics import calculate_metrics
  return loop_module, calculate_metrics


@contextlib.contextmanager
def _timed_stages(module, names, totals):
  """Wraps `module.<name>` so that each call adds its seconds to totals[stage]."""
  originals = {name: getattr(module, name) for name in names}

  def timed(function, stage):
    def wrapper(*args, **kwargs):
      start = time.process_time()
      try:
        return function(*args, **kwargs)
      finally:
        totals[stage] = totals.get(stage, 0.0) + time.process_time() - start
    return wrapper

  for name, stage in names.items():
    setattr(module, name, timed(originals[name], stage))
  try:
    yield
  finally:
    for name, function in originals.items():
      setattr(module, name, function)


def pyedgeeval_counts(prob_u8, label, thresholds, max_dist, totals):
  """pyEdgeEval's per-image counts [4, T] in our row order, its stages timed."""
  loop_module, _ = _pyedgeeval()
  stages = {'fast_nms': 'nms', 'binary_thin': 'thinning', 'correspond_pixels': 'matching'}
  with _timed_stages(loop_module, stages, totals):
    count_r, sum_r, count_p, sum_p = loop_module.evaluate_boundaries_threshold(
        thresholds, prob_u8 / 255.0, label == 1, max_dist=max_dist, apply_thinning=True,
        apply_nms=True)
  return np.stack([count_r, sum_r, count_p, sum_p]).astype(np.int64)


def seism_summary(per_image, thresholds, ap='seism'):
  ois = np.zeros(4, np.int64)
  for counts in per_image:
    ois += counts[:, np.argmax(boundary.precision_recall_f(counts)[2])]
  return boundary.summarize(per_image.sum(0), ois, thresholds, ap=ap)


def pyedgeeval_summary(per_image, thresholds):
  """pyEdgeEval's calculate_metrics on precomputed counts, in percent."""
  _, calculate = _pyedgeeval()
  samples = [{'name': str(i), 'counts': tuple(c)} for i, c in enumerate(per_image)]
  _, _, overall = calculate(lambda sample: sample['counts'], thresholds.tolist(), samples,
                            nproc=1)
  return {'edge/odsF': 100 * overall['ODS_f1'], 'edge/oisF': 100 * overall['OIS_f1'],
          'edge/AP': 100 * overall['AP']}


def _run(maps, evaluate):
  """Per-image counts [N, 4, T], stage CPU seconds and CPU seconds of `evaluate`.

  CPU time of this (single-threaded) process: on a shared machine wall time
  also counts the other users' turns.
  """
  totals, counts = {}, []
  start, wall = time.process_time(), time.perf_counter()
  for index, (prob_u8, label) in enumerate(maps):
    counts.append(evaluate(prob_u8, label, totals))
    print(f'  image {index + 1}/{len(maps)}: {time.process_time() - start:.1f} CPU s',
          file=sys.stderr, flush=True)
  seconds = time.process_time() - start
  totals['wall'] = time.perf_counter() - wall
  return np.stack(counts), totals, seconds


def thread_scaling(maps, thresholds, max_dist, thread_counts):
  """{threads: (wall seconds per image, counts [4, T])} of the streaming metric on
  `maps` (8-bit probability, label) with each number of threads."""
  out = {}
  for threads in thread_counts:
    metric = boundary.BoundaryMetric(max_dist, thresholds, workers=threads,
                                     protocol='pyedgeeval')
    start = time.perf_counter()
    for prob_u8, label in maps:
      metric.update((prob_u8 + 0.5) / 255.0, label)  # quantizes back to prob_u8
    counts = metric.state['counts']  # waits for the threads
    out[threads] = ((time.perf_counter() - start) / len(maps), counts)
  return out


def _scores_line(name, result):
  return f'{name:34s}' + ''.join(f"{result[f'edge/{k}']:9.3f}" for k in ('odsF', 'oisF', 'AP'))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=len(PHOTOGRAPHS))
  parser.add_argument('--size', default='480x640', help='HxW')
  parser.add_argument('--maps', choices=('photos', 'synthetic'), default='photos')
  parser.add_argument('--max-dist', type=float, default=0.011)
  parser.add_argument('--seed', type=int, default=0, help='synthetic maps only')
  parser.add_argument('--threads', default='', help='e.g. 1,2: time the streaming metric '
                      'with each number of threads')
  args = parser.parse_args(argv)
  height, width = (int(v) for v in args.size.lower().split('x'))
  if args.maps == 'photos':
    pairs = [photograph_pair(PHOTOGRAPHS[i % len(PHOTOGRAPHS)], height, width)
             for i in range(args.images)]
  else:
    rng = np.random.default_rng(args.seed)
    pairs = [synthetic_pair(rng, height, width) for _ in range(args.images)]
  maps = [(boundary.quantize(prob), label) for prob, label in pairs]
  thresholds = boundary.threshold_values(99)
  max_dist = args.max_dist

  def ours(matcher):
    return lambda prob_u8, label, totals: boundary.image_counts(
        prob_u8, label, thresholds, max_dist, 'pyedgeeval', matcher, totals)

  exact, exact_stages, exact_seconds = _run(maps, ours('exact'))
  repeat, _, _ = _run(maps, ours('exact'))
  csa, csa_stages, csa_seconds = _run(maps, ours('csa'))
  reference, reference_stages, reference_seconds = _run(
      maps, lambda p, l, totals: pyedgeeval_counts(p, l, thresholds, max_dist, totals))

  n = len(maps)
  print(f'{n} {args.maps} of {height}x{width}, 99 thresholds, max_dist {max_dist}, '
        f'pyEdgeEval NMS, one core, in this process')
  print(f"\nCPU seconds per image{'':13s}" +
        ''.join(f'{s:>10s}' for s in STAGES + ('other', 'total', 'wall')))
  for name, stages, seconds in (('ours (exact matcher)', exact_stages, exact_seconds),
                                ('ours, CSA matcher', csa_stages, csa_seconds),
                                ('pyEdgeEval loop', reference_stages, reference_seconds)):
    other = seconds - sum(stages.get(s, 0.0) for s in STAGES)
    print(f'{name:34s}' + ''.join(f'{stages.get(s, 0.0) / n:10.3f}' for s in STAGES) +
          f"{other / n:10.3f}{seconds / n:10.3f}{stages['wall'] / n:10.3f}")
  print(f'speed-up over pyEdgeEval loop: {reference_seconds / exact_seconds:.1f}x '
        f'(over the CSA matcher: {csa_seconds / exact_seconds:.1f}x)')

  rows = [('ours (exact matcher)', seism_summary(exact, thresholds)),
          ('ours, CSA matcher', seism_summary(csa, thresholds)),
          ('pyEdgeEval loop, SEISM summary', seism_summary(reference, thresholds)),
          ('pyEdgeEval loop, its own summary', pyedgeeval_summary(reference, thresholds))]
  print(f"\n{'':34s}{'odsF':>9s}{'oisF':>9s}{'AP':>9s}")
  for name, result in rows:
    print(_scores_line(name, result))

  more = exact[:, boundary.MATCHED_PRED] - csa[:, boundary.MATCHED_PRED]
  same_selection = np.array_equal(exact[:, boundary.PRED_PIXELS], csa[:, boundary.PRED_PIXELS])
  print(f'\nexact - CSA matched pixels per (image, threshold): min {more.min()}, max '
        f'{more.max()}, differ at {np.count_nonzero(more)} of {more.size}, total '
        f'{more.sum()} of {csa[:, boundary.MATCHED_PRED].sum()} '
        f'({100 * more.sum() / max(csa[:, boundary.MATCHED_PRED].sum(), 1):.3f}%); '
        f'same thinned maps: {same_selection}')
  thinned = exact[:, boundary.PRED_PIXELS] - reference[:, boundary.PRED_PIXELS]
  print(f'thinned pixels ours - pyEdgeEval (binary_thin stops early): differ at '
        f'{np.count_nonzero(thinned)} of {thinned.size}, max {np.abs(thinned).max()}')
  deterministic = np.array_equal(exact, repeat)
  print(f'two runs of ours identical: {deterministic}')

  print('\nour odsF / oisF / AP under each protocol (exact matcher, its thresholds):')
  for protocol, spec in boundary.PROTOCOLS.items():
    protocol_thresholds = boundary.threshold_values(spec.thresholds)
    counts = np.stack([boundary.image_counts(p, l, protocol_thresholds, max_dist, protocol)
                       for p, l in maps])
    print(_scores_line(f'  {protocol}', seism_summary(counts, protocol_thresholds)))
  print('AP definitions on our counts: SEISM general_ap '
        f"{seism_summary(exact, thresholds)['edge/AP']:.3f}, pyEdgeEval "
        f"{seism_summary(exact, thresholds, ap='pyedgeeval')['edge/AP']:.3f}")

  if args.threads:
    scaling = thread_scaling(maps, thresholds, max_dist,
                             [int(n) for n in args.threads.split(',')])
    single = next(iter(scaling.values()))
    print('\nstreaming metric, wall s per image by threads: ' + ', '.join(
        f'{n}: {seconds:.3f} ({single[0] / seconds:.2f}x)' for n, (seconds, _) in scaling.items()))
    same = all(np.array_equal(c, single[1]) for _, c in scaling.values())
    print(f'same counts with every number of threads: {same}')
    deterministic = deterministic and same

  exact_ods = rows[0][1]['edge/odsF']
  checks = {'vs CSA': exact_ods - rows[1][1]['edge/odsF'],
            'vs pyEdgeEval loop': exact_ods - rows[2][1]['edge/odsF']}
  print('\nodsF differences (F in [0, 1]): ' +
        ', '.join(f'ours {k} {v / 100:+.5f}' for k, v in checks.items()))
  if not deterministic or any(abs(v) / 100 > TOLERANCE for v in checks.values()):
    print(f'FAIL: odsF differs by more than {TOLERANCE} or runs differ')
    return 1
  print(f'OK: odsF within {TOLERANCE}, identical runs')
  return 0


if __name__ == '__main__':
  sys.exit(main())
