"""The regularizer registry: ours, MTPSL's and JTR's behind one call, their extra views in the
pipeline, the positive control's derived labels, and each one trained through the CLI.

Each method's loss is checked against the official code in its own file
(tests/test_contrastive.py, test_regularizer_mtpsl.py, test_regularizer_jtr.py); inference
equality for all three is in tests/test_train_step.py.
"""

import json
import os
import re

import jax
import ml_collections
import numpy as np
import pytest

from cmtdp_jax import config_lib, label_mapping, regularizers
from cmtdp_jax.data import synthetic_world
from tests.conftest import tiny_config
from tests.test_cli import run_main

tf = pytest.importorskip('tensorflow')

from cmtdp_jax.data import pipeline, synthetic  # noqa: E402


@pytest.mark.parametrize('overrides,name,views', [
    ({}, '', 0),
    ({'contrastive.enable': True}, 'cmtdp', 0),
    ({'regularizer.name': 'cmtdp'}, 'cmtdp', 0),
    ({'regularizer.name': 'mtpsl'}, 'mtpsl', 1),
    ({'regularizer.name': 'jtr'}, 'jtr', 2),
])
def test_names_and_views(overrides, name, views):
  config = tiny_config(**overrides)
  assert regularizers.chosen_name(config) == name
  assert regularizers.extra_views(config) == views


@pytest.mark.parametrize('overrides,message', [
    ({'regularizer.name': 'vat'}, "config.regularizer.name: unknown 'vat'"),
    ({'regularizer.name': 'jtr', 'contrastive.enable': True},
     'config.contrastive.enable=True means config.regularizer.name=cmtdp'),
])
def test_config_errors_are_one_line(overrides, message):
  with pytest.raises(ValueError, match=message):
    config_lib.validate(tiny_config(**overrides), 1)


def test_published_weights_and_overrides():
  """MTPSL's con-weight 2.0 and JTR's 1 (its 4 and 2 are inside), ours from contrastive."""
  num_classes = dict(synthetic_world.NUM_CLASSES)
  tasks = ('semseg', 'depth', 'normals')
  weights = {}
  for name in regularizers.NAMES:
    config = tiny_config(**{'regularizer.name': name, 'tasks': tasks})
    weights[name] = regularizers.choose(config, tasks, num_classes, (128, 32)).weight
  assert weights == {'cmtdp': tiny_config().contrastive.weight, 'mtpsl': 2.0, 'jtr': 1.0}
  config = tiny_config(**{'regularizer.name': 'mtpsl', 'regularizer.weight': 0.5})
  assert regularizers.choose(config, tasks, num_classes, (128, 32)).weight == 0.5


def test_network_widths_follow_segnet_or_scale_to_the_host():
  assert regularizers.network_widths('segnet', 7, 32) == (64, 128, 256, 512, 512)
  assert regularizers.network_widths('scaled', 512, 32) == (64, 128, 256, 512, 512)
  assert regularizers.network_widths('scaled', 128, 32) == (16, 32, 64, 128, 128)
  assert regularizers.network_widths('scaled', 64, 16) == (16, 32, 64, 64)
  with pytest.raises(ValueError, match="'wide' is not 'segnet' or 'scaled'"):
    regularizers.network_widths('wide', 128, 32)


def test_binary_and_categorical_channels():
  """A binary categorical task (edge, sal) enters MTPSL's and JTR's networks as 2 classes."""
  assert regularizers.input_channels(('semseg', 'edge', 'depth', 'normals'),
                                     {'semseg': 8}) == (8, 2, 1, 3)


def _first_batches(config, count=2, mapping=None):
  source = pipeline.open_split(config.data, 'train', config.tasks)
  batches = pipeline.train_dataset(source, config, 0, mapping,
                                   regularizers.extra_views(config)).as_numpy_iterator()
  return [next(batches) for _ in range(count)]


def test_extra_views_only_when_asked_and_the_first_view_unchanged(data_dir):
  plain = _first_batches(tiny_config(data_dir))
  for name, count in (('mtpsl', 1), ('jtr', 2)):
    batches = _first_batches(tiny_config(data_dir, **{'regularizer.name': name}))
    for a, b in zip(plain, batches):
      assert 'views' not in a and len(b['views']) == count
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
      for view in b['views']:
        assert set(view) == {'image', *a} and all(view[k].shape == a[k].shape for k in view)
        # A crop of at most 1.5x: a view's valid depth can only be nearer, by 1/s.
        valid = (view['depth'] > 0) & (a['depth'] > 0)
        assert valid.any()
  views = batches[0]['views']
  assert not np.array_equal(views[0]['image'], views[1]['image'])  # independent crops


def test_sal_from_semseg_is_exact_in_the_synthetic_world():
  for seed in range(3):
    scene = synthetic_world.render_scene(seed, 48, 48)
    derived = synthetic.LABEL_DERIVATIONS['sal_from_semseg'][2](tf.constant(scene['semseg']))
    np.testing.assert_array_equal(derived.numpy(), scene['sal'])


def test_control_fills_missing_sal_from_kept_semseg(data_dir):
  config = tiny_config(data_dir, **{'data.derive_labels': 'sal_from_semseg'})
  source = pipeline.open_split(config.data, 'train', config.tasks)
  ids = pipeline.split_ids(source)
  mapping = label_mapping.draw(ids, config.tasks, 'one_label', seed=0)
  plain_config = tiny_config(data_dir)
  for plain, derived in zip(_first_batches(plain_config, 2, mapping),
                            _first_batches(config, 2, mapping)):
    kept = plain['labelled']
    np.testing.assert_array_equal(derived['labelled']['sal'], kept['sal'] | kept['semseg'])
    np.testing.assert_array_equal(derived['sal'], plain['sal'])  # exact: the same labels
    for task in set(config.tasks) - {'sal'}:
      np.testing.assert_array_equal(derived['labelled'][task], kept[task])
  with pytest.raises(ValueError, match='needs partial labels'):
    _first_batches(config)


def test_most_labels_bounds_every_one_label_batch(data_dir):
  """MTPSL's pair slots rest on `most_labels`: no image of a one-label batch keeps more
  labels, the derived one counted; other regimes give no bound."""
  for derive, most in (('', 1), ('sal_from_semseg', 2)):
    config = tiny_config(data_dir, **{'data.partial_labels': 'one_label',
                                      'data.derive_labels': derive})
    assert label_mapping.most_labels(config.data) == most
    source = pipeline.open_split(config.data, 'train', config.tasks)
    mapping = label_mapping.draw(pipeline.split_ids(source), config.tasks, 'one_label', seed=0)
    counts = np.concatenate([np.sum([batch['labelled'][t] for t in config.tasks], axis=0)
                             for batch in _first_batches(config, 4, mapping)])
    assert counts.max() == most  # reached: some image has a derived sal label
    config.regularizer.name = 'mtpsl'
    choice = regularizers.choose(config, config.tasks, dict(synthetic_world.NUM_CLASSES),
                                 (8, 16))
    assert choice.module.max_labels == most
  for overrides in ({}, {'data.partial_labels': 'random'}):
    assert label_mapping.most_labels(tiny_config(data_dir, **overrides).data) is None


def test_unknown_derivation_names_the_flag(data_dir):
  config = tiny_config(data_dir, **{'data.derive_labels': 'depth_from_sal'})
  source = pipeline.open_split(config.data, 'train', config.tasks)
  with pytest.raises(ValueError, match="config.data.derive_labels: 'depth_from_sal' is not"):
    pipeline.label_derivation(source, config.data.derive_labels)
  assert isinstance(config.data, ml_collections.ConfigDict)


@pytest.mark.parametrize('name', ['mtpsl', 'jtr'])
def test_cli_trains_and_evaluates_with_each_regularizer(tmp_path, data_dir, name):
  """The issue's command (smoke, one_label, 4 steps, then evaluation) on three of the six
  tasks, which keeps MTPSL's pairs and the compilations small enough for CI. Ours runs the
  same way in tests/test_partial_labels.py (contrastive.enable=True is name=cmtdp)."""
  workdir = str(tmp_path / name)
  proc = run_main(workdir, '--config.num_steps=4', '--config.log_every=2',
                  '--config.tasks=("semseg","depth","normals")',
                  '--config.data.partial_labels=one_label',
                  f'--config.regularizer.name={name}', data_dir=data_dir)
  key = 'contrastive' if name == 'cmtdp' else name
  assert re.search(rf'step 4/4 \| .*\b{key} [0-9.]+ ', proc.stdout), proc.stdout[-2000:]
  with open(os.path.join(workdir, 'eval', 'step_4.json')) as f:
    results = json.load(f)
  assert np.isfinite(results['depth/rmse']) and results['semseg/images'] == 16


def test_pipeline_traced_as_written_equals_autographs_conversion(data_dir, monkeypatch):
  """`pipeline.as_written` skips AutoGraph, which only cost start-up time: with every branch
  of the train transform on (partial labels, a derived label, extra views) and the eval
  pipeline, the batches equal those of AutoGraph's conversion bit for bit."""
  config = tiny_config(data_dir, **{'data.derive_labels': 'sal_from_semseg',
                                    'regularizer.name': 'jtr'})
  source = pipeline.open_split(config.data, 'train', config.tasks)
  mapping = label_mapping.draw(pipeline.split_ids(source), config.tasks, 'one_label', seed=0)

  def batches():
    evaluation = pipeline.eval_dataset(pipeline.open_eval_split(config), config)
    return _first_batches(config, 2, mapping) + list(evaluation.take(2).as_numpy_iterator())

  traced = batches()
  monkeypatch.setattr(pipeline, 'as_written', lambda fn: fn)  # tf.data's default: AutoGraph
  converted = batches()
  assert len(traced) == len(converted) == 4
  for a, b in zip(traced, converted):
    jax.tree.map(np.testing.assert_array_equal, a, b)
