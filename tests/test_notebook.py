"""The Colab notebook: committed clean, and runs top to bottom on the synthetic world.

The end-to-end test executes `launch/colab_reproduce.ipynb` with papermill in a
fresh kernel (smoke-sized model and world, a few steps, comparison on), so a
cell that breaks fails CI. The helpers of `cmtdp_jax.notebook_utils` are
tested directly and fast.
"""

import importlib.util
import json
import os
import subprocess

import numpy as np
import pytest

from cmtdp_jax import notebook_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'launch', 'colab_reproduce.ipynb')


def _cells():
  with open(NOTEBOOK) as f:
    return json.load(f)['cells']


def test_notebook_is_committed_without_outputs():
  for i, cell in enumerate(_cells()):
    if cell['cell_type'] == 'code':
      assert cell.get('outputs') == [], f'cell {i} has outputs: strip them before committing'
      assert cell.get('execution_count') is None, f'cell {i} has an execution count'


def test_first_cell_holds_the_tagged_parameters():
  import papermill  # pylint: disable=import-outside-toplevel
  code_cells = [c for c in _cells() if c['cell_type'] == 'code']
  assert 'parameters' in code_cells[0]['metadata'].get('tags', [])
  source = ''.join(code_cells[0]['source'])
  for line in source.splitlines():
    if line.strip() and not line.startswith('#'):
      assert line.count('=') == 1, f'papermill cannot parse {line!r}'
  names = set(papermill.inspect_notebook(NOTEBOOK))
  assert {'DATASET', 'DATA_FOLDER', 'FULL_PROTOCOL', 'NUM_STEPS', 'BACKBONE', 'FRAMEWORK',
          'RUN_COMPARISON', 'WORKDIR', 'TINY', 'OVERRIDES', 'TFDS_DATA_DIR'} <= names
  # Only the parameters cell may set them, or papermill's injected values would not win.
  for cell in code_cells[1:]:
    for line in ''.join(cell['source']).splitlines():
      assert line.split(' = ')[0] not in names, f'{line!r} sets a parameter outside cell 1'


def test_runs_top_to_bottom_on_the_synthetic_world(tmp_path, monkeypatch):
  import papermill  # pylint: disable=import-outside-toplevel
  assert importlib.util.find_spec('ipykernel'), 'the kernel needs ipykernel (requirements.txt)'
  # The kernel inherits this environment: one CPU device compiles fastest, and the
  # checkout is importable even where it is not pip-installed.
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(
      filter(None, [REPO, os.environ.get('PYTHONPATH')])))
  monkeypatch.setenv('JAX_NUM_CPU_DEVICES', '1')
  monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', '2')
  monkeypatch.setenv('MPLBACKEND', 'module://matplotlib_inline.backend_inline')
  output = tmp_path / 'executed.ipynb'
  papermill.execute_notebook(
      NOTEBOOK, str(output), kernel_name='python3', cwd=str(tmp_path), progress_bar=False,
      execution_timeout=600, parameters={
          'DATASET': 'synthetic', 'TFDS_DATA_DIR': str(tmp_path / 'tfds'),
          'WORKDIR': str(tmp_path / 'runs'), 'TINY': True, 'NUM_STEPS': 3,
          'RUN_COMPARISON': True, 'NUM_IMAGES': 2, 'MOUNT_DRIVE': False,
          # Three tasks of three kinds (classes, depth, edges with their boundary metric):
          # the regularized step over all six compiles several times longer.
          'OVERRIDES': {'tasks': ['semseg', 'depth', 'edge'], 'data.num_train': 16,
                        'data.num_eval': 8, 'data.image_size': [32, 32],
                        'data.crop_size': [32, 32]}})
  with open(output) as f:
    cells = json.load(f)['cells']
  text = '\n'.join(_output_text(c) for c in cells)
  assert 'delta_m (+contrastive vs baseline):' in text
  images = sum('image/png' in o.get('data', {}) for c in cells for o in c.get('outputs', []))
  assert images == 2 * 2, 'one figure per eval image, for the baseline and the comparison'
  for run in ('synthetic_compact_baseline_3steps', 'synthetic_compact_baseline_3steps_contrastive'):
    assert (tmp_path / 'runs' / run / 'eval' / 'step_3.json').exists()


def _output_text(cell):
  parts = []
  for out in cell.get('outputs', []):
    parts.append(''.join(out.get('text', '')))
    parts.append(''.join(out.get('data', {}).get('text/plain', '')))
  return ''.join(parts)


def test_build_config_short_tiny_and_overrides():
  config = notebook_utils.build_config('synthetic', num_steps=7, tiny=True, data_dir='/d',
                                       overrides={'batch_size': 4, 'data.num_train': 12})
  assert config.num_steps == 7 and config.checkpoint_every == 7 and config.log_every == 1
  assert tuple(config.data.crop_size) == (64, 64)  # the smoke variant
  assert config.batch_size == 4 and config.data.num_train == 12
  assert config.data.data_dir == '/d' and not config.contrastive.enable
  full = notebook_utils.build_config('synthetic', full_protocol=True, num_steps=7)
  assert full.num_steps == 2000  # the config file's own schedule
  other = notebook_utils.build_config('synthetic', backbone='resnet50', framework='padnet')
  assert other.model.backbone == 'resnet50' and not dict(other.model.backbone_kwargs)
  assert other.model.framework == 'padnet'


@pytest.mark.parametrize('dataset', ['nyud', 'pascal_context'])
def test_build_config_real_dataset_uses_the_protocol_file(dataset):
  config = notebook_utils.build_config(dataset, full_protocol=True, data_folder='/raw')
  assert config.data.name == dataset and config.data.manual_dir == '/raw'
  assert config.model.backbone == 'hrnet_w18_small_v2' and config.num_steps == 40_000
  short = notebook_utils.build_config(dataset, num_steps=100, backbone='resnet50')
  assert short.num_steps == 100 and short.model.backbone == 'resnet50'


def test_with_regularizer_copies():
  config = notebook_utils.build_config('synthetic', tiny=True, num_steps=2)
  regularized = notebook_utils.with_regularizer(config, 0.3)
  assert regularized.contrastive.enable and regularized.contrastive.weight == 0.3
  assert not config.contrastive.enable
  assert notebook_utils.run_name(regularized) == notebook_utils.run_name(config) + '_contrastive'


def test_resolve_dataset(tmp_path, capsys):
  assert notebook_utils.resolve_dataset('synthetic', '') == 'synthetic'
  assert notebook_utils.resolve_dataset('nyud', '') == 'synthetic'
  assert 'using the synthetic world' in capsys.readouterr().out
  assert notebook_utils.resolve_dataset('nyud', str(tmp_path)) == 'nyud'
  with pytest.raises(FileNotFoundError, match='DATA_FOLDER'):
    notebook_utils.resolve_dataset('pascal_context', str(tmp_path / 'missing'))
  with pytest.raises(ValueError, match='DATASET'):
    notebook_utils.resolve_dataset('cityscapes', '')


def test_prepare_dataset_without_the_command(monkeypatch, capsys):
  monkeypatch.setattr(notebook_utils.importlib.util, 'find_spec', lambda name: None)
  assert notebook_utils.prepare_dataset('nyud', '/raw') is False
  assert 'no `cmtdp_jax.data.prepare` command' in capsys.readouterr().out


def test_prepare_dataset_failure_is_reported(tmp_path, capsys):
  if notebook_utils.importlib.util.find_spec('cmtdp_jax.data.prepare') is None:
    pytest.skip('no prepare command in this checkout')
  with pytest.raises(RuntimeError, match='failed'):
    notebook_utils.prepare_dataset('nyud', str(tmp_path), str(tmp_path / 'tfds'))
  assert str(tmp_path) in capsys.readouterr().out  # the child's error names the folder


def test_plot_predictions_draws_every_task():
  from cmtdp_jax.evaluation import visualize  # pylint: disable=import-outside-toplevel
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  n, h, w = 2, 8, 10
  image = rng.normal(size=(n, h, w, 3)).astype(np.float32)
  image[:, :1] = image[:, 7:] = 0  # eval padding, centred
  labels = {
      'semseg': rng.integers(0, 5, (n, h, w)).astype(np.int32),
      'depth': rng.uniform(0, 3, (n, h, w)).astype(np.float32),
      'normals': rng.normal(size=(n, h, w, 3)).astype(np.float32),
      'edge': np.where(rng.random((n, h, w)) < 0.1, 255, 0).astype(np.int32),
  }
  predictions = {'baseline': {
      'semseg': rng.integers(0, 5, (n, h, w)).astype(np.int32),
      'depth': rng.uniform(0, 3, (n, h, w)).astype(np.float32),
      'normals': rng.normal(size=(n, h, w, 3)).astype(np.float32),
      'edge': rng.random((n, h, w)).astype(np.float32)}}
  predictions['+contrastive'] = predictions['baseline']
  size = np.array([[6, w]] * n)  # the eval batches' original sizes
  offset = np.array([[1, 0]] * n)  # and where they start
  figures = notebook_utils.plot_predictions(dict(labels, image=image, size=size, offset=offset),
                                            predictions, tuple(labels), num=5)
  assert len(figures) == n
  axes = figures[0].axes
  assert len(axes) == len(labels) * 4
  assert axes[1].images[0].get_array().shape == (6, w, 3)  # padding cropped
  np.testing.assert_array_equal(axes[0].images[0].get_array(),
                                visualize.denormalize(image[0, 1:7]))
  plt.close('all')


def test_colourize_together_shares_the_depth_scale():
  gt = np.array([[1.0, 2.0]], np.float32)
  pred = np.array([[4.0, 0.5]], np.float32)
  together = notebook_utils.colourize_together('depth', [gt, pred])
  alone = notebook_utils.colourize_together('depth', [gt])
  assert not np.array_equal(together[0], alone[0])  # gt scaled by the prediction's max
  edge = notebook_utils.colourize_together('edge', [np.array([[255, 1]], np.int32)])[0]
  assert edge[0, 0].sum() == 0  # ignored edge pixels are background


def test_comparison_table_and_delta_m():
  baseline = {'semseg/mIoU': 0.5, 'depth/rmse': 1.0, 'depth/log_rmse': 0.3}
  regularized = {'semseg/mIoU': 0.55, 'depth/rmse': 0.9, 'depth/log_rmse': 0.2}
  table, gain = notebook_utils.comparison(baseline, regularized, ('semseg', 'depth'))
  assert gain.value == pytest.approx((10.0 + 10.0) / 2)
  assert 'delta_m (+contrastive vs baseline): +10.00%' in table
  assert 'log_rmse' in table and '-0.1000' in table
  _, missing = notebook_utils.comparison(baseline, {'semseg/mIoU': 0.5}, ('semseg', 'depth'))
  assert missing.value is None


@pytest.mark.parametrize('remote', ['https://github.com/lab/cmtdp_jax.git',
                                    'git@github.com:lab/cmtdp_jax.git',
                                    'https://github.com/lab/cmtdp_jax',
                                    'ssh://git@github.com/lab/cmtdp_jax.git'])
def test_colab_link_from_a_github_remote(remote):
  from cmtdp_jax.tools import colab_link  # pylint: disable=import-outside-toplevel
  assert colab_link.colab_link(remote) == ('https://colab.research.google.com/github/lab/'
                                           'cmtdp_jax/blob/main/launch/colab_reproduce.ipynb')
  assert os.path.join(REPO, colab_link.NOTEBOOK) == NOTEBOOK


def test_colab_link_refuses_other_remotes(tmp_path, capsys, monkeypatch):
  from cmtdp_jax.tools import colab_link  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match='not a GitHub remote'):
    colab_link.colab_link('https://gitlab.com/lab/cmtdp_jax.git')
  subprocess.run(['git', 'init', '-q', str(tmp_path)], check=True)
  monkeypatch.chdir(tmp_path)
  assert colab_link.main([]) == 1
  assert capsys.readouterr().err.startswith('error: git remote origin:')
