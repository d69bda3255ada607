"""SEISM boundary evaluation: invariants, the summary rules, the readers, thinning,
the exact matcher against CSA, threads from any caller, merging, export."""

import importlib
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from scipy import sparse
from scipy.sparse import csgraph
from skimage import morphology

from cmtdp_jax import evaluation
from cmtdp_jax.evaluation import boundary


def _cross(height=48, width=64):
  label = np.zeros((height, width), np.uint8)
  label[20, 10:54] = 1
  label[8:40, 32] = 1
  return label


def _evaluate(probs, labels, **options):
  return evaluation.evaluate_boundaries(probs, labels, **{'workers': 1, **options})


def test_perfect_prediction_scores_100():
  label = _cross()
  result = _evaluate([label.astype(float)], [label])
  assert result['edge/odsF'] == 100.0
  assert result['edge/oisF'] == 100.0


def test_shift_inside_tolerance_is_still_perfect_and_beyond_it_drops():
  label = _cross()  # diagonal 80 px: tolerance 0.011 -> 0.88 px, 0.03 -> 2.4 px
  shifted = np.roll(label, 2, axis=0).astype(float)
  assert _evaluate([shifted], [label], max_dist=0.03)['edge/odsF'] == 100.0
  assert _evaluate([shifted], [label], max_dist=0.011)['edge/odsF'] < 60.0


def test_empty_prediction_scores_0():
  result = _evaluate([np.zeros((48, 64))], [_cross()])
  assert result['edge/odsF'] == 0.0 and result['edge/oisF'] == 0.0 and result['edge/AP'] == 0.0


def test_predictions_on_ignored_pixels_do_not_count():
  label = _cross()
  prob = label.astype(float)
  prob[40:44, 5:60] = 1.0  # a false edge band ...
  noisy = _evaluate([prob], [label])['edge/odsF']
  label[38:46] = 255  # ... inside an ignored region
  assert noisy < 90.0
  assert _evaluate([prob], [label])['edge/odsF'] == 100.0


def test_counts_follow_thresholds_of_the_nms_map():
  """Low-confidence pixels appear only at low thresholds; totals are exact."""
  label = _cross()
  prob = 0.9 * label.astype(float)
  prob[35, 5:60] = 0.3  # a weak false edge
  thresholds = boundary.threshold_values(99)
  counts = boundary.image_counts(boundary.quantize(prob), label, thresholds, 0.011)
  suppressed = boundary.edge_nms(boundary.quantize(prob))
  assert (counts[boundary.GT_PIXELS] == label.sum()).all()
  weak = thresholds <= 76 / 255  # 0.3 is stored as 76
  assert counts[boundary.PRED_PIXELS, weak].min() > counts[boundary.PRED_PIXELS, ~weak].max()
  assert (counts[boundary.PRED_PIXELS, thresholds > suppressed.max()] == 0).all()
  assert (counts[boundary.MATCHED_PRED] <= counts[boundary.PRED_PIXELS]).all()


def _seism_pr(cnt_r, sum_r, cnt_p, sum_p):
  """gather_measure.m, written out literally."""
  rec, prec = 0.0, 0.0
  if sum_r == 0 and cnt_p == 0:
    rec, prec = 1.0, 0.0
  if sum_p == 0 and cnt_r == 0:
    rec, prec = 0.0, 1.0
  if sum_p != 0 and cnt_r != 0:
    rec, prec = cnt_r / sum_r, cnt_p / sum_p
  return prec, rec


def _f(prec, rec):
  return 0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec)


def _seism_summary(per_image):
  """general_ods / general_ois / general_ap over per-image counts [N, 4, T]."""
  totals = per_image.sum(0)
  pr = [_seism_pr(*totals[:, k]) for k in range(totals.shape[1])]
  ods = max(_f(p, r) for p, r in pr)
  best = [int(np.argmax([_f(*_seism_pr(*c[:, k])) for k in range(c.shape[1])]))
          for c in per_image]
  ois = _f(*_seism_pr(*sum(c[:, k] for c, k in zip(per_image, best))))
  recalls = np.array([r for _, r in pr])
  precisions = np.array([p for p, _ in pr])
  unique, first = np.unique(recalls, return_index=True)
  ap = 0.0
  for r in np.linspace(0, 1, 101):
    if unique[0] <= r <= unique[-1]:
      ap += np.interp(r, unique, precisions[first]) / 100
  return 100 * ods, 100 * ois, 100 * ap


def test_summary_follows_seism_rules():
  rng = np.random.default_rng(0)
  per_image = []
  for _ in range(5):
    gt = rng.integers(0, 50)  # includes images without boundaries
    pred = np.sort(rng.integers(0, 80, 9))[::-1]  # fewer pixels at higher thresholds
    pred[-2:] = 0  # nothing survives the highest thresholds
    matched_pred = np.minimum(pred, rng.integers(0, 40, 9)) * (gt > 0)
    matched_gt = np.minimum(matched_pred, gt)
    per_image.append(np.stack([matched_gt, np.full(9, gt), matched_pred, pred]))
  per_image = np.array(per_image)
  metric = evaluation.make_metric('edge', thresholds=np.linspace(0.1, 0.9, 9), workers=1)
  for counts in per_image:
    metric._add(counts)  # pylint: disable=protected-access
  result = metric.result()
  ods, ois, ap = _seism_summary(per_image)
  assert result['edge/odsF'] == pytest.approx(ods)
  assert result['edge/oisF'] == pytest.approx(ois)
  assert result['edge/AP'] == pytest.approx(ap)


def test_thresholds_are_seism_parameters():
  seism = np.array([float(f'{t:.2f}') for t in np.arange(0.01, 1.0, 0.01)])
  np.testing.assert_array_equal(boundary.threshold_values(99), seism)


def test_quantize_truncates_like_the_peers_png_export():
  np.testing.assert_array_equal(boundary.quantize(np.array([0.0, 0.5, 0.999, 1.0, 1.2, -1.0])),
                                [0, 127, 254, 255, 255, 0])


def test_pyedgeeval_nms_variant_matches_pyedgeeval(monkeypatch):
  # pyEdgeEval's preprocess package imports cv2 only for file helpers.
  monkeypatch.setitem(sys.modules, 'cv2', sys.modules.get('cv2', types.ModuleType('cv2')))
  fast_nms = importlib.import_module('pyEdgeEval.preprocess.nms.fast_nms').fast_nms
  smooth = ndimage.gaussian_filter(np.random.default_rng(1).random((60, 80)), 2)
  prob_u8 = boundary.quantize((smooth - smooth.min()) / np.ptp(smooth))
  theirs = fast_nms(prob_u8 / 255.0) > 0
  assert np.mean((boundary.edge_nms(prob_u8, 'pyedgeeval') > 0) != theirs) < 0.005
  assert np.mean((boundary.edge_nms(prob_u8) > 0) != theirs) > 0.01  # SEISM's variant differs


def test_threads_merge_and_repeated_runs_give_identical_counts():
  rng = np.random.default_rng(2)
  labels = [np.roll(_cross(), s, axis=1) for s in range(4)]
  probs = [np.clip(l + rng.uniform(0, 0.2, l.shape), 0, 1) for l in labels]
  inline, again = (evaluation.make_metric('edge') for _ in range(2))
  threads = evaluation.make_metric('edge', workers=2)
  first, second = (evaluation.make_metric('edge') for _ in range(2))
  for metric in (inline, again, threads):
    metric.update(np.stack(probs), np.stack(labels))
  first.update(np.stack(probs[:2]), np.stack(labels[:2]))
  second.update(np.stack(probs[2:]), np.stack(labels[2:]))
  merged = first.merge(second)
  for metric in (again, threads, merged):
    assert metric.state['images'] == 4
    np.testing.assert_array_equal(metric.state['counts'], inline.state['counts'])
    assert metric.result() == inline.result()
  rebuilt = type(inline).from_state(inline.state, inline)
  assert rebuilt.result() == inline.result()


def test_bench_thread_scaling_gives_the_same_counts_as_one_image_at_a_time():
  from cmtdp_jax.benchmarks import bench_boundary  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(6)
  maps = [(boundary.quantize(np.clip(l + rng.uniform(0, 0.3, l.shape), 0, 1)), l)
          for l in (np.roll(_cross(), s, axis=0) for s in range(3))]
  thresholds = boundary.threshold_values(9)
  scaling = bench_boundary.thread_scaling(maps, thresholds, 0.011, [1, 2])
  expected = sum(boundary.image_counts(p, l, thresholds, 0.011, 'pyedgeeval') for p, l in maps)
  for seconds, counts in scaling.values():
    assert seconds > 0
    np.testing.assert_array_equal(counts, expected)


def test_thinning_equals_scikit_image_thin():
  """bwmorph 'thin' = skimage.morphology.thin, on noise, blobs and lines."""
  rng = np.random.default_rng(3)
  for index in range(150):
    shape = tuple(rng.integers(3, 24, 2))
    binary = rng.random(shape) < rng.uniform(0.1, 0.9)
    if index % 3 == 1:
      binary = ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.5
    np.testing.assert_array_equal(boundary.thin(binary), morphology.thin(binary))


def test_maximum_matching_is_maximum_and_valid():
  rng = np.random.default_rng(4)
  for _ in range(40):
    n_left, n_right = rng.integers(1, 30, 2)
    adjacency = sparse.random(n_left, n_right, density=rng.uniform(0.02, 0.3), format='csr',
                              random_state=rng)
    active = (rng.random(n_left) < 0.8).astype(np.uint8)
    size, match_left = boundary._boundary_match.maximum_matching(  # pylint: disable=protected-access
        active, adjacency.indptr.astype(np.int32), adjacency.indices.astype(np.int32), n_right)
    active_rows = sparse.csr_matrix(adjacency.multiply(active[:, None]))
    active_rows.eliminate_zeros()  # scipy matches explicit zeros too
    expected = csgraph.maximum_bipartite_matching(active_rows, perm_type='column')
    assert size == np.count_nonzero(expected >= 0)
    matched = np.flatnonzero(match_left >= 0)
    assert matched.size == size and active[matched].all()
    assert len(set(match_left[matched])) == size
    assert all(adjacency[u, match_left[u]] != 0 for u in matched)


def test_exact_matcher_matches_at_least_csa():
  """Same selections and totals; CSA's sparse outlier graph can only lose matches."""
  rng = np.random.default_rng(5)
  label = _cross()
  prob_u8 = boundary.quantize(np.clip(ndimage.gaussian_filter(
      np.roll(label, 1, axis=0) + 0.6 * rng.random(label.shape), 0.7), 0, 1))
  thresholds = boundary.threshold_values(9)
  exact, csa = (boundary.image_counts(prob_u8, label, thresholds, 0.02, matcher=m)
                for m in ('exact', 'csa'))
  unmatched = [boundary.GT_PIXELS, boundary.PRED_PIXELS]
  np.testing.assert_array_equal(exact[unmatched], csa[unmatched])
  assert (exact[boundary.MATCHED_PRED] >= csa[boundary.MATCHED_PRED]).all()
  assert (exact[boundary.MATCHED_PRED] > 0).any()
  np.testing.assert_array_equal(exact[boundary.MATCHED_GT], exact[boundary.MATCHED_PRED])


def _reader_reference(protocol, prob_u8, threshold):
  """The peers' readers, written from their MATLAB / Python definitions."""
  if protocol in ('seism', 'invpt'):  # seism src/io/read_one_cont_png.m
    return boundary.edge_nms(prob_u8, 'seism').astype(np.float64) > threshold
  if protocol == 'mtl_pytorch':  # Multi-Task-Learning-PyTorch evaluation/seism/read_one_png.m
    return prob_u8.astype(np.float64) / 255.0 >= threshold
  # pyEdgeEval evaluate_boundaries_threshold: `pred >= thresh` after fast_nms
  return boundary.edge_nms(prob_u8, 'pyedgeeval') >= np.float64(threshold)


@pytest.mark.parametrize('protocol', list(boundary.PROTOCOLS))
def test_protocol_readers_follow_the_peers(protocol):
  label = _cross()
  # 51 / 255 is 0.2 in double: the double-precision reader tells `>=` from `>` there;
  # the NMS readers see single-precision values, which never equal a threshold.
  prob_u8 = np.where(label == 1, 51, 0).astype(np.uint8)
  prob_u8[30, 5:60] = 128
  prob_u8[5:45, 50] = np.linspace(0, 255, 40).astype(np.uint8)
  metric = evaluation.make_metric('edge', protocol=protocol)
  expected_thresholds = (boundary.HED_THRESHOLDS if protocol == 'invpt'
                         else boundary.threshold_values(99))
  np.testing.assert_allclose(metric.thresholds, expected_thresholds)
  counts = boundary.image_counts(prob_u8, label, metric.thresholds, 0.011, protocol)
  expected = [np.count_nonzero(morphology.thin(_reader_reference(protocol, prob_u8, t)))
              for t in metric.thresholds]
  np.testing.assert_array_equal(counts[boundary.PRED_PIXELS], expected)


def test_hed_thresholds_are_seism_parameters():
  assert len(boundary.HED_THRESHOLDS) == 101
  assert boundary.HED_THRESHOLDS[:3] == (0.001, 0.01, 0.02)
  assert boundary.HED_THRESHOLDS[-2:] == (0.99, 0.999)


def test_pyedgeeval_ap_matches_pyedgeeval(monkeypatch):
  monkeypatch.setitem(sys.modules, 'cv2', sys.modules.get('cv2', types.ModuleType('cv2')))
  calculate = importlib.import_module(
      'pyEdgeEval.common.binary_label.calculate_metrics').calculate_metrics
  rng = np.random.default_rng(6)
  pred = np.sort(rng.integers(50, 400, (3, 9)), axis=1)[:, ::-1]
  gt = rng.integers(100, 300, (3, 1)).repeat(9, axis=1)
  matched = np.minimum(pred, gt) * rng.uniform(0.3, 1.0, (3, 9))
  per_image = np.stack([matched, gt, matched, pred], axis=1).astype(np.int64)
  thresholds = np.linspace(0.1, 0.9, 9)
  samples = [{'name': str(i), 'counts': tuple(c)} for i, c in enumerate(per_image)]
  _, _, overall = calculate(lambda sample: sample['counts'], thresholds.tolist(), samples,
                            nproc=1)
  metric = evaluation.make_metric('edge', thresholds=thresholds, ap='pyedgeeval')
  for counts in per_image:
    metric._add(counts)  # pylint: disable=protected-access
  assert metric.result()['edge/AP'] == pytest.approx(100 * overall['AP'])
  precision, recall, _ = boundary.precision_recall_f(per_image.sum(0))
  seism_ap = boundary.average_precision(precision, recall)
  assert seism_ap != pytest.approx(overall['AP'], abs=0.005)  # the definitions differ


_CALLER = textwrap.dedent("""
    import numpy as np
    from cmtdp_jax import evaluation
    label = np.zeros((4, 24, 32), np.uint8)
    label[:, 12, 4:28] = 1
    metric = evaluation.make_metric('edge', workers=2, thresholds=5)
    metric.update(label.astype(float), label)
    print('odsF', metric.result()['edge/odsF'])
""")


def test_threads_work_from_stdin_unguarded_scripts_and_notebooks(tmp_path):
  """No `__main__` guard, no file, a kernel: a process pool would re-run the script,
  fail to import `<stdin>`, or need the caller's main. The three run concurrently."""
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  script = tmp_path / 'unguarded.py'
  script.write_text(_CALLER)
  runs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True),
          subprocess.Popen([sys.executable, '-'], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True)]
  runs[1].stdin.write(_CALLER)
  runs[1].stdin.close()
  notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(_CALLER)])
  nbclient.NotebookClient(notebook, timeout=120, kernel_name='python3').execute()
  assert notebook.cells[0].outputs[0]['text'] == 'odsF 100.0\n'
  for run in runs:
    output = run.stdout.read()
    assert run.wait(timeout=120) == 0
    assert output.splitlines() == ['odsF 100.0']  # once: the script did not re-run


def test_image_subset_and_ids():
  label = _cross()
  wrong = np.zeros_like(label, float)
  result = evaluation.evaluate_boundaries([label.astype(float), wrong], [label, label],
                                          ids=['keep', 'drop'], image_ids={'keep'}, workers=1)
  assert result['edge/odsF'] == 100.0


def test_export_pngs_hold_the_quantized_map(tmp_path):
  prob = np.linspace(0, 1, 12).reshape(3, 4)
  paths = evaluation.export_edge_pngs({'2008_000123': prob}, str(tmp_path / 'edge'))
  assert paths == [str(tmp_path / 'edge' / '2008_000123.png')]
  np.testing.assert_array_equal(np.array(Image.open(paths[0])), boundary.quantize(prob))


@pytest.mark.parametrize('option, message', [
    ({'protocol': 'hed'}, 'seism, invpt, mtl_pytorch, pyedgeeval'),
    ({'matcher': 'hungarian'}, 'exact, csa'), ({'ap': 'voc'}, 'seism, pyedgeeval')])
def test_unknown_options(option, message):
  with pytest.raises(ValueError, match=message):
    evaluation.make_metric('edge', **option)


def test_compiled_thinning_is_the_reference_algorithm():
  """The evaluation's in-place compiled thinning and `thinning.thin` (the synthetic world's
  edge labels) give the same maps: one algorithm, one table definition."""
  from cmtdp_jax import thinning  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  for _ in range(100):
    mask = rng.random((rng.integers(3, 30), rng.integers(3, 30))) < rng.uniform(0.2, 0.9)
    np.testing.assert_array_equal(boundary.thin(mask), thinning.thin(mask))
