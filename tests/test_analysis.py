"""Eval extras (predictions, grids, edge PNGs) and the Figure 1 consistency analysis."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from cmtdp_jax import analysis
from cmtdp_jax import contrastive
from cmtdp_jax.evaluation import visualize
from tests.test_cli import run_main, summary_tags

TASKS = ('semseg', 'depth', 'edge')  # few tasks: the regularized train step compiles fast
STEPS = 6


@pytest.fixture(scope='module')
def run(tmp_path_factory, data_dir):
  """A 6-step smoke run trained with the regularizer, whose final evaluation has every extra
  on, then analysed. (`--mode=eval` writes its extras through the same code, and makes its
  own TensorBoard writer for the grids: tests/test_cli.py.)"""
  workdir = str(tmp_path_factory.mktemp('analysis'))
  flags = (f'--config.num_steps={STEPS}', f'--config.checkpoint_every={STEPS}',
           '--config.contrastive.enable=True', f'--config.tasks={TASKS}')
  # Eval pads the 32x32 images to 64x64; the saved outputs must be cropped back.
  run_main(workdir, *flags, '--config.data.eval_crop_size=(64, 64)',
           '--config.eval.save_predictions=True', '--config.eval.num_visualize=2',
           '--config.eval.export_edges=True', data_dir=data_dir)
  analysed = run_main(workdir, *flags, '--mode=analyze', '--config.analysis.num_batches=1',
                      data_dir=data_dir)
  return {'workdir': workdir, 'analyze': analysed}


def test_eval_saves_predictions_grids_and_edges(run):
  folder = os.path.join(run['workdir'], 'eval', f'step_{STEPS}')
  predictions = sorted(os.listdir(os.path.join(folder, 'predictions')))
  assert len(predictions) == 16  # every real eval image, no padding example
  with np.load(os.path.join(folder, 'predictions', predictions[0])) as saved:
    assert sorted(saved) == sorted(TASKS)
    for task in TASKS:
      assert saved[task].shape == (32, 32), task
    assert saved['semseg'].dtype == np.int32
    assert 0.0 <= saved['edge'].min() and saved['edge'].max() <= 1.0
  grids = sorted(os.listdir(os.path.join(folder, 'vis')))
  assert grids == ['00000.png', '00001.png']
  with Image.open(os.path.join(folder, 'vis', grids[0])) as grid:
    assert grid.mode == 'RGB' and min(grid.size) > 100
  edges = sorted(os.listdir(os.path.join(folder, 'edges')))
  assert len(edges) == 16
  with Image.open(os.path.join(folder, 'edges', edges[0])) as edge:
    assert edge.size == (32, 32) and edge.mode == 'L'
  assert {'eval_vis/00000', 'eval_vis/00001'} <= summary_tags(run['workdir'])


def test_analyze_writes_plot_and_every_pair(run):
  folder = os.path.join(run['workdir'], 'analysis')
  with Image.open(os.path.join(folder, f'step_{STEPS}.png')) as plot:
    assert plot.size[0] > 500
  with open(os.path.join(folder, f'step_{STEPS}.json')) as f:
    results = json.load(f)
  assert results['step'] == STEPS and 'Proj' in results['features']
  assert results['num_images'] == 8  # one smoke eval batch
  expected = {f'{t}<-{s}' for t in TASKS for s in TASKS if s != t}
  assert set(results['pairs']) == expected
  for name, stats in results['pairs'].items():
    assert stats['count'] > 0, name
    for key in ('mean_d_ap', 'mean_d_an', 'fraction_closer'):
      assert np.isfinite(stats[key]), (name, key)
  assert 'semseg<-depth' in run['analyze'].stdout  # the printed table


def test_triplet_statistics_and_plot(tmp_path):
  rng = np.random.default_rng(0)
  d_ap, d_an = rng.uniform(0.0, 0.4, 500), rng.uniform(0.6, 1.0, 500)
  stats = analysis.triplet_statistics(d_ap, d_an)
  assert stats['count'] == 500 and stats['fraction_closer'] == 1.0
  assert stats['mean_d_ap'] < 0.4 < 0.6 < stats['mean_d_an']
  assert analysis.triplet_statistics(d_an, d_ap)['fraction_closer'] == 0.0
  assert analysis.triplet_statistics([], [])['fraction_closer'] is None
  path = str(tmp_path / 'grid.png')
  analysis.plot_histograms({('semseg', 'depth'): (d_ap, d_an),
                            ('depth', 'semseg'): (np.array([]), np.array([]))}, path, 'test')
  with Image.open(path) as plot:
    assert plot.size[0] > 0


def test_eval_transform_keeps_the_size_and_denormalize_inverts_it():
  from cmtdp_jax.data import augment  # pylint: disable=import-outside-toplevel
  rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3)).astype(np.uint8)
  example = augment.eval_transform({'image': rgb.astype(np.float32)})
  image = np.asarray(example['image'])
  assert tuple(np.asarray(example['size'])) == (20, 30) == image.shape[:2]
  np.testing.assert_array_equal(visualize.denormalize(image), rgb)


class _LabelFeatures:
  """Stand-in model whose 'depth' features are the image itself."""

  def apply(self, variables, images, train):
    del variables, train
    return {}, {'depth': images}


def test_raw_features_that_encode_the_source_labels_separate_every_triplet():
  labels = np.random.default_rng(0).integers(0, 3, (2, 8, 8)).astype(np.int32)
  features = np.eye(3, dtype=np.float32)[labels]  # one-hot semseg labels as features
  cfg = contrastive.ContrastiveConfig(num_anchors=16, pool_size=32)
  out = analysis._pair_distances(  # pylint: disable=protected-access
      _LabelFeatures(), {'depth': ('semseg',)}, cfg, None, None, features,
      {'semseg': labels}, np.array([True, False]), jax.random.key(0))
  d_ap, d_an, valid = (np.asarray(x) for x in out['depth<-semseg'])
  assert valid[0].any() and not valid[1].any()  # the padding example never counts
  stats = analysis.triplet_statistics(d_ap[valid], d_an[valid])
  assert stats['fraction_closer'] == 1.0
  np.testing.assert_allclose(stats['mean_d_ap'], 0.0, atol=1e-6)
  np.testing.assert_allclose(stats['mean_d_an'], np.sqrt(2.0), rtol=1e-6)


def test_analysis_draws_triplets_as_training_does():
  """The analysis samples (target, source) triplets with `contrastive.sample_triplets`; the
  regularizer samples inside its fused step. With the same labels, config and a fixed source,
  the share of valid triplets (an anchor with a positive and a negative in its pool: it depends
  on the anchor and pool sampling, the masks and the thresholds, not on the features) agrees
  within 4.4 standard errors of the difference of the two means (p < 1e-5 if they agree)."""
  from tests.test_contrastive import module_inputs, small_config  # pylint: disable=import-outside-toplevel
  tasks = ('semseg', 'depth', 'normals')
  cfg = small_config(source_choice='pairs', pairs=(('semseg', 'depth'),))
  module = contrastive.CrossTaskContrastive(tasks, tasks, cfg)
  features, labels = module_inputs(batch=1)
  params = module.init(jax.random.key(0), features, labels, jax.random.key(1))
  train_valid = jax.jit(jax.vmap(
      lambda rng: module.apply(params, features, labels, rng)[1]['semseg<-depth/valid']))
  height, width = features['semseg'].shape[1:3]
  resized = contrastive.resize_labels_nearest(labels['depth'], height, width)
  analysis_valid = jax.jit(jax.vmap(lambda rng: analysis._sample(  # pylint: disable=protected-access
      rng[None], 'depth', resized, cfg).valid.mean()))
  draws = 400
  trained = np.asarray(train_valid(jax.random.split(jax.random.key(2), draws)))
  analysed = np.asarray(analysis_valid(jax.random.split(jax.random.key(3), draws)))
  standard_error = np.sqrt(trained.var(ddof=1) / draws + analysed.var(ddof=1) / draws)
  # Neither always nor never valid (0.94 here), so the share can tell samplers apart: a pool of
  # 8 instead of 32, or depth_pos 0.02 instead of 0.05, moves the analysis' share 21 and 15 SE.
  assert 0.05 < trained.mean() < 0.99
  assert abs(trained.mean() - analysed.mean()) < 4.4 * standard_error, (
      trained.mean(), analysed.mean(), standard_error)
