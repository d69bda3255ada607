"""Boundary detection odsF / oisF / AP with the SEISM protocol, in Python.

The peers (Multi-Task-Learning-PyTorch, ATRC, InvPT) save each edge
probability map as an 8-bit PNG (floor(255 p)) and run SEISM in MATLAB:
  1. a reader turns the PNG into one binary map per threshold. SEISM's
     `src/io/read_one_cont_png.m` (our default, protocol 'seism'): the PNG
     as single precision, Dollar's edge NMS (orientation from
     `convTri(E, 4)`, `edgesNmsMex(E, O, 1, 5, 1.01)`), then `E > t`;
     see PROTOCOLS for the peers' variants;
  2. `eval_cont` / `edgesEvalImg`: thin the binary map (`bwmorph 'thin'`)
     and match it to the ground-truth boundary with `correspondPixels`,
     maxDist x image diagonal (0.011 NYUD, 0.0075 PASCAL), outlier cost 100;
  3. `gather_measure`, `general_ods/ois/ap`: sum the counts over images per
     threshold; ODS = best F over thresholds (no interpolation), OIS = F of
     the counts summed at each image's best threshold, AP = mean of the
     precision interpolated at recall 0, 0.01, .., 1 within the recall range.

Here the same steps run in memory, NMS once per image (pyEdgeEval's port of
`edgesNmsMex`). The default matcher ('exact') solves `correspondPixels`'
problem exactly: its minimum-cost assignment, with an outlier cost 100x the
largest pixel distance, is a maximum-cardinality matching of the pixel pairs
within maxDist (one more match saves at least 0.99x the outlier cost), so
the graph of those pairs is built once per image and each threshold's
thinned map is matched with Hopcroft-Karp. The BSDS/SEISM CSA solver
(matcher='csa', pyEdgeEval's `correspond_pixels`) draws its sparse outlier
graph from a clock-seeded random stream and can leave a pixel or two
unmatched that could be matched, so its counts vary between runs; the exact
matcher's never fall below them and are the same on every run and machine.
Thinning is a sparse version of MATLAB's `bwmorph(B, 'thin', Inf)` with
its look-up tables (equal to `skimage.morphology.thin`, tested).

The thinning, the graph and Hopcroft-Karp are a Cython extension
(`_boundary_match.pyx`, built by `pip install -e .`) rather than numba:
it adds no runtime dependency (numba pins llvmlite and lags numpy
releases), no process pays a JIT compile (every test process and worker
would), and its loops release the GIL, so `workers > 1` evaluates images in
threads: no process start-up, and nothing re-imports the caller's main
module (stdin scripts, notebooks and scripts without a `__main__` guard
work). The CSA reference holds the GIL, so it gains nothing from threads.

Ground-truth pixels equal to 1 are boundary; 255 marks ignored pixels, where
predictions are dropped after NMS. odsF, oisF and AP are in percent.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import math
import os
import time
from typing import Iterable, Mapping

import numpy as np
from PIL import Image
from pyEdgeEval import correspond_pixels
from pyEdgeEval import nms as edges_nms
from scipy import ndimage

from cmtdp_jax import thinning
from cmtdp_jax.evaluation import _boundary_match
from cmtdp_jax.evaluation import metrics

# The four counts per threshold, in this order, as SEISM's fb measure keeps them.
MATCHED_GT, GT_PIXELS, MATCHED_PRED, PRED_PIXELS = range(4)


def threshold_values(thresholds: int | Iterable[float]) -> np.ndarray:
  """K thresholds k / (K + 1), k = 1..K (SEISM's 0.01 .. 0.99 for K = 99), or the values given."""
  if isinstance(thresholds, (int, np.integer)):
    return np.arange(1, int(thresholds) + 1) / float(thresholds + 1)
  return np.asarray(list(thresholds), np.float64)


def quantize(prob: np.ndarray) -> np.ndarray:
  """Probabilities -> uint8 as the peers write their PNGs (`(255 * p).astype(uint8)`)."""
  return np.floor(np.clip(np.asarray(prob, np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


def _conv_tri(image: np.ndarray, radius: int) -> np.ndarray:
  """Dollar's convTri for integer radius >= 1, with symmetric padding."""
  if radius == 1:
    kernel = np.array([1.0, 2.0, 1.0]) / 4.0
  else:
    ramp = np.arange(1, radius + 2)
    kernel = np.concatenate([ramp, ramp[-2::-1]]) / float(radius + 1) ** 2
  kernel = kernel.astype(image.dtype)
  out = ndimage.convolve1d(image, kernel, axis=0, mode='reflect')
  return ndimage.convolve1d(out, kernel, axis=1, mode='reflect')


NMS_VARIANTS = ('seism', 'pyedgeeval')


def edge_nms(prob_u8: np.ndarray, variant: str = 'seism') -> np.ndarray:
  """Dollar's edge NMS of an 8-bit edge map, in single precision as MATLAB; in [0, 1].

  'seism': SEISM's read_one_cont_png, orientation
    mod(atan(Oyy sign(-Oxy) / (Oxx + 1e-5)), pi) from convTri(E, 4). Line
    by line (src/io/read_one_cont_png.m at HEAD, 3d421f8): im2single(imread)
    is u8 / 255 in single; convTri(E, 4) is `_conv_tri` (triangle kernel,
    symmetric padding); gradient2 is np.gradient (central differences,
    one-sided at the border), [Ox, Oy] = (axis 1, axis 0); Oxx + 1e-5 and
    atan stay single; edgesNmsMex(E, O, 1, 5, 1.01, 1) is pyEdgeEval's port
    of it; the threshold is `E > t` (PROTOCOLS['seism']).
  'pyedgeeval': pyEdgeEval's fast_nms (after HED's nms_process.m): E =
    convTri(E, 1) first, and only Oxx == 0 is replaced by 1e-5.
  Where the map is nearly flat the orientation comes from rounding noise, so
  the two variants keep different low pixels: on `bench_boundary`'s four
  photographs the SEISM variant gives odsF 0.11 points, oisF 4.8 and AP 10.3
  points below pyEdgeEval's (cmtdp_jax/benchmarks/README.md; issue 16 measured 0.8 points of
  odsF on a NYUD-sized set, 0.2 on PASCAL-Context), not a rounding-level change.
  """
  _check_option(variant, NMS_VARIANTS, 'NMS variant')
  edge = prob_u8.astype(np.float32) / np.float32(255.0)
  if variant == 'pyedgeeval':
    edge = _conv_tri(edge, 1)
  oy, ox = np.gradient(_conv_tri(edge, 4))
  oxx = np.gradient(ox, axis=1)
  oyy, oxy = np.gradient(oy)
  if variant == 'seism':
    oxx = oxx + np.float32(1e-5)
  else:
    oxx[oxx == 0] = 1e-5
  orientation = np.mod(np.arctan(oyy * np.sign(-oxy) / oxx), np.pi)
  return edges_nms(edge, orientation, r=1, s=5, m=1.01).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How a peer's reader turns an 8-bit edge PNG into one binary map per threshold.

  nms: `edge_nms` variant, or None for the map as read (u8 / 255, double).
  strict: `E > t` (else `E >= max(eps, t)`).
  thresholds: their number (see `threshold_values`) or values.
  """
  nms: str | None
  strict: bool
  thresholds: int | tuple[float, ...]


# HED's thresholds, SEISM's parameters/HED.txt: 0.001, 0.01 .. 0.99, 0.999.
HED_THRESHOLDS = (0.001,) + tuple(k / 100 for k in range(1, 100)) + (0.999,)

PROTOCOLS = {
    # jponttuset/seism src/io/read_one_cont_png.m (HEAD, 3d421f8): NMS, then `>`;
    # 99 thresholds as Multi-Task-Learning-PyTorch writes them.
    'seism': Protocol(nms='seism', strict=True, thresholds=99),
    # InvPT / TaskPrompter (prismformore/Multi-Task-Transformer README, "as ATRC
    # and ASTMT"): read_one_cont_png with SEISM's parameters/HED.txt.
    'invpt': Protocol(nms='seism', strict=True, thresholds=HED_THRESHOLDS),
    # Multi-Task-Learning-PyTorch evaluation/seism/read_one_png.m (MTI-Net, PAD-Net
    # tables): no NMS, double(imread) / 255 >= t.
    'mtl_pytorch': Protocol(nms=None, strict=False, thresholds=99),
    # pyEdgeEval's loop (evaluate_boundaries_threshold): fast_nms, then `>=`.
    'pyedgeeval': Protocol(nms='pyedgeeval', strict=False, thresholds=99),
}

MATCHERS = ('exact', 'csa')


def _check_option(value: str, valid, what: str) -> str:
  if value not in valid:
    raise ValueError(f"unknown {what} '{value}'; valid: {', '.join(valid)}")
  return value


def protocol_map(prob_u8: np.ndarray, protocol: str = 'seism') -> np.ndarray:
  """The map a protocol thresholds: the NMS map (single) or the 8-bit map / 255 (double)."""
  nms = PROTOCOLS[_check_option(protocol, PROTOCOLS, 'protocol')].nms
  if nms is None:
    return prob_u8.astype(np.float64) / 255.0
  return edge_nms(prob_u8, nms)




def _thin_padded(padded_flat: np.ndarray, stride: int, pixels: np.ndarray) -> np.ndarray:
  """Thins a flattened zero-bordered 0/1 image in place; returns its remaining pixels."""
  pixels = np.array(pixels, np.intp)
  left = _boundary_match.thin_in_place(padded_flat, stride, pixels, *thinning.TABLES)
  return pixels[:left]


def thin(binary: np.ndarray) -> np.ndarray:
  """MATLAB's bwmorph(binary, 'thin', Inf), visiting only the foreground pixels."""
  padded = np.pad(np.asarray(binary, bool).astype(np.uint8), 1)
  _thin_padded(padded.reshape(-1), padded.shape[1], np.flatnonzero(padded))
  return padded[1:-1, 1:-1].astype(bool)


def tolerance_offsets(shape, max_dist: float):
  """(rows, cols) offsets within max_dist x diagonal, as correspondPixels' window."""
  radius = max_dist * math.hypot(*shape)
  reach = math.ceil(radius)
  rows, cols = np.mgrid[-reach:reach + 1, -reach:reach + 1]
  inside = rows ** 2 + cols ** 2 <= radius * radius
  return rows[inside].astype(np.int32), cols[inside].astype(np.int32)


class _Stopwatch:
  """Adds the CPU seconds since the previous call to `totals[stage]` (no-op without
  totals): CPU time, so that a loaded machine does not inflate one stage."""

  def __init__(self, totals):
    self.totals = totals
    self.last = time.process_time()

  def __call__(self, stage):
    if self.totals is None:
      return
    now = time.process_time()
    self.totals[stage] = self.totals.get(stage, 0.0) + now - self.last
    self.last = now


def image_counts(prob_u8: np.ndarray, gt: np.ndarray, thresholds: np.ndarray,
                 max_dist: float, protocol: str = 'seism', matcher: str = 'exact',
                 timings: dict | None = None) -> np.ndarray:
  """Counts [4, T] (matched gt, gt, matched pred, pred pixels) of one image.

  `timings`, if given, accumulates the CPU seconds of this process spent in
  'nms', 'graph', 'thinning' and 'matching' (for the benchmark; one thread).
  """
  strict = PROTOCOLS[_check_option(protocol, PROTOCOLS, 'protocol')].strict
  _check_option(matcher, MATCHERS, 'matcher')
  stopwatch = _Stopwatch(timings)
  boundary = gt == 1
  edge = protocol_map(prob_u8, protocol)
  edge[gt == metrics.IGNORE_LABEL] = 0
  stopwatch('nms')
  height, width = edge.shape
  # Pixels by decreasing value: each threshold selects a prefix of them.
  candidates = np.flatnonzero(edge > 0)
  candidates = candidates[np.argsort(-edge.ravel()[candidates], kind='stable')]
  # Compared in double, as MATLAB compares a single map with a double scalar
  # (single(0.1) == 0.1 is false) and as pyEdgeEval compares with float64 values.
  ascending = edge.ravel()[candidates[::-1]].astype(np.float64)
  levels = np.asarray(thresholds, np.float64)
  if not strict:
    levels = np.maximum(levels, np.finfo(np.float64).eps)
  selected = ascending.size - np.searchsorted(ascending, levels,
                                              side='right' if strict else 'left')
  counts = np.zeros((4, len(thresholds)), np.int64)
  counts[GT_PIXELS] = np.count_nonzero(boundary)
  if matcher == 'exact' and boundary.any():
    graph = _PixelGraph(candidates, boundary, max_dist)
  stopwatch('graph')
  stride = width + 2
  padded_pixels = (candidates // width + 1) * stride + candidates % width + 1
  padded = np.zeros((height + 2) * stride, np.uint8)
  matched_by_size = {}  # thresholds selecting as many pixels select the same ones
  for k, size in enumerate(selected):
    if size == 0:
      continue
    if size not in matched_by_size:
      padded[padded_pixels[:size]] = 1
      remaining = _thin_padded(padded, stride, padded_pixels[:size])
      stopwatch('thinning')
      if not boundary.any():
        matched = 0
      elif matcher == 'exact':
        matched = graph.matches(padded)
      else:
        binary = padded.reshape(height + 2, stride)[1:-1, 1:-1]
        matched = _csa_matches(binary.astype(bool), boundary, max_dist)
      stopwatch('matching')
      padded[remaining] = 0
      matched_by_size[size] = (matched, matched, remaining.size)
    counts[[MATCHED_GT, MATCHED_PRED, PRED_PIXELS], k] = matched_by_size[size]
  return counts


class _PixelGraph:
  """Pairs of candidate prediction pixels and ground-truth pixels within the tolerance.

  Built once per image; `matches` solves one thinned map's matching on it.
  """

  def __init__(self, candidates: np.ndarray, boundary: np.ndarray, max_dist: float):
    height, width = boundary.shape
    target_index = np.full(boundary.shape, -1, np.int32)
    self.targets = np.count_nonzero(boundary)
    target_index[boundary] = np.arange(self.targets, dtype=np.int32)
    rows, cols = (candidates // width).astype(np.int32), (candidates % width).astype(np.int32)
    indptr, self.indices = _boundary_match.neighbour_graph(
        rows, cols, target_index, *tolerance_offsets(boundary.shape, max_dist))
    reachable = np.diff(indptr) > 0  # the others can never be matched
    self.indptr = np.concatenate([[0], indptr[1:][reachable]]).astype(np.int32)
    self.padded_pixels = (rows[reachable] + 1) * (width + 2) + cols[reachable] + 1

  def matches(self, padded_flat: np.ndarray) -> int:
    active = np.ascontiguousarray(padded_flat[self.padded_pixels])
    return _boundary_match.maximum_matching(active, self.indptr, self.indices, self.targets)[0]


def _csa_matches(binary, boundary, max_dist) -> int:
  """Matched pixels of one thinned map by correspondPixels' CSA (the SEISM reference)."""
  matched_pred, _, _, _ = correspond_pixels(binary, boundary, max_dist=max_dist)
  return np.count_nonzero(matched_pred)


def precision_recall_f(counts: np.ndarray):
  """SEISM's precision, recall and F of counts [4, ...].

  No predictions: recall 0, precision 1. Predictions but no ground truth:
  recall 1, precision 0 (gather_measure.m).
  """
  counts = np.asarray(counts, np.float64)
  matched_gt, gt, matched_pred, pred = counts
  recall = np.where(pred == 0, 0.0, np.where(gt == 0, 1.0, matched_gt / np.maximum(gt, 1.0)))
  precision = np.where(pred == 0, 1.0,
                       np.where(gt == 0, 0.0, matched_pred / np.maximum(pred, 1.0)))
  total = precision + recall
  f_score = np.divide(2.0 * precision * recall, total, out=np.zeros_like(total),
                      where=total > 0)
  return precision, recall, f_score


def average_precision(precision: np.ndarray, recall: np.ndarray) -> float:
  """SEISM's general_ap: precision interpolated at recall 0:0.01:1 inside the recall range."""
  unique_recall, first = np.unique(recall, return_index=True)
  if unique_recall.size < 2:
    return 0.0
  grid = np.linspace(0.0, 1.0, 101)
  inside = (grid >= unique_recall[0]) & (grid <= unique_recall[-1])
  return float(np.interp(grid[inside], unique_recall, precision[first]).sum() / 100.0)


def pyedgeeval_average_precision(precision: np.ndarray, recall: np.ndarray) -> float:
  """pyEdgeEval's AP (calculate_metrics.py): at recall r = 0, 0.01, .., 0.99 the
  best precision among thresholds with recall >= r, summed and divided by 101.

  Applied to SEISM's precision and recall, where an empty map has precision 1
  (pyEdgeEval: 0); that can only raise the value at r = 0.
  """
  return float(sum(np.max(precision[recall >= r], initial=0.0)
                   for r in np.arange(0.0, 1.0, 0.01)) / 101.0)


AP_DEFINITIONS = {'seism': average_precision, 'pyedgeeval': pyedgeeval_average_precision}


def summarize(counts: np.ndarray, ois_counts: np.ndarray, thresholds: np.ndarray,
              prefix: str = 'edge', ap: str = 'seism') -> dict[str, float]:
  """odsF, oisF, AP (percent, `AP_DEFINITIONS[ap]`) and the ODS threshold."""
  precision, recall, f_score = precision_recall_f(counts)
  best = int(np.argmax(f_score))
  return {
      f'{prefix}/odsF': 100.0 * float(f_score[best]),
      f'{prefix}/oisF': 100.0 * float(precision_recall_f(ois_counts)[2]),
      f'{prefix}/AP': 100.0 * AP_DEFINITIONS[ap](precision, recall),
      f'{prefix}/ods_threshold': float(thresholds[best]),
  }


class BoundaryMetric(metrics.Metric):
  """Streaming SEISM boundary evaluation; see the module docstring.

  Args:
    max_dist: match tolerance as a fraction of the image diagonal (0.011
      NYUD, 0.0075 PASCAL).
    thresholds: number of thresholds or their values (default: the protocol's).
    workers: threads evaluating images in parallel (default 1: in the
      calling process, while it waits). With more, images are evaluated
      while the caller keeps updating; `state` and `result()` wait for them.
    protocol: the peer reader to reproduce, a key of PROTOCOLS (default
      'seism', SEISM's read_one_cont_png).
    matcher: 'exact' (maximum matching, deterministic) or 'csa' (pyEdgeEval's
      correspondPixels, the SEISM reference; slow and clock-seeded).
    ap: AP definition, a key of AP_DEFINITIONS (default SEISM's general_ap).
    image_ids: optional subset (e.g. PASCAL's SEISM `test_new` list).
  """

  task = 'edge'

  def __init__(self, max_dist=0.011, thresholds=None, workers=1, protocol='seism',
               matcher='exact', ap='seism', image_ids=None):
    self.protocol = _check_option(protocol, PROTOCOLS, 'protocol')
    self.matcher = _check_option(matcher, MATCHERS, 'matcher')
    self.ap = _check_option(ap, AP_DEFINITIONS, 'AP definition')
    self.max_dist = float(max_dist)
    self.thresholds = threshold_values(
        PROTOCOLS[protocol].thresholds if thresholds is None else thresholds)
    self.workers = int(workers)
    super().__init__(image_ids)

  def _reset(self):
    super()._reset()
    self._threads = None
    self._pending = collections.deque()

  def _zero_state(self):
    return {'counts': np.zeros((4, len(self.thresholds)), np.int64),
            'ois_counts': np.zeros(4, np.int64)}

  def _update(self, pred, gt):
    for prob, label in zip(pred, gt):
      if not (label != metrics.IGNORE_LABEL).any():
        continue
      job = (quantize(prob), label.astype(np.uint8), self.thresholds, self.max_dist,
             self.protocol, self.matcher)
      if self.workers == 1:
        self._add(image_counts(*job))
        continue
      if self._threads is None:
        self._threads = concurrent.futures.ThreadPoolExecutor(self.workers)
      self._pending.append(self._threads.submit(image_counts, *job))
      while len(self._pending) > 4 * self.workers:  # bound the memory held in the queue
        self._add(self._pending.popleft().result())

  def _add(self, counts):
    best = int(np.argmax(precision_recall_f(counts)[2]))
    self._state['counts'] += counts
    self._state['ois_counts'] += counts[:, best]

  def _finish(self):
    while self._pending:
      self._add(self._pending.popleft().result())
    if self._threads is not None:
      self._threads.shutdown()
      self._threads = None

  @property
  def state(self):
    self._finish()
    return super().state

  def merge(self, other):
    self._finish()
    return super().merge(other)

  def result(self):
    self._finish()
    return summarize(self._state['counts'], self._state['ois_counts'], self.thresholds,
                     ap=self.ap)


def evaluate_boundaries(predictions: Iterable[np.ndarray], labels: Iterable[np.ndarray],
                        ids: Iterable[str] | None = None, **options) -> dict[str, float]:
  """One-shot evaluation of per-image probability maps and edge labels.

  `options` are BoundaryMetric's; `ids` are needed with `image_ids`.
  """
  metric = BoundaryMetric(**options)
  for prob, label, image_id in zip(predictions, labels,
                                   itertools.repeat(None) if ids is None else ids):
    metric.update(prob, label, image_id)
  return metric.result()


def export_edge_pngs(predictions: Mapping[str, np.ndarray], folder: str) -> list[str]:
  """Writes `<folder>/<id>.png` (8-bit, as `quantize`) for SEISM's read_one_cont_png.

  To get the MATLAB number, copy the folder to `<seism>/datasets/<database>/
  <method>/` and write `<seism>/parameters/<method>.txt` with the thresholds
  0.01 .. 0.99, one '%.2f' per line (as Multi-Task-Learning-PyTorch does).
  """
  os.makedirs(folder, exist_ok=True)
  paths = []
  for image_id, prob in predictions.items():
    path = os.path.join(folder, f'{image_id}.png')
    Image.fromarray(quantize(prob)).save(path)
    paths.append(path)
  return paths
