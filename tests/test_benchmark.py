"""The benchmark: one compilation per step, a complete JSON, the peak FLOP/s table."""

import functools
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmtdp_jax.benchmarks import benchmark
from cmtdp_jax.benchmarks import common
from cmtdp_jax import data as data_lib
from cmtdp_jax import models
from cmtdp_jax import steps
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_compiles_each_step_once_and_writes_json(tmp_path):
  out = tmp_path / 'bench.json'
  cmd = [sys.executable, '-m', 'cmtdp_jax.benchmarks.benchmark', '--config=configs/synthetic.py:smoke',
         '--steps=3', '--warmup=1', f'--json={out}', "--config.tasks=('semseg','edge')",
         '--config.data.crop_size=(32,32)',
         '--nopipeline', '--eval_images=2', '--edge_workers=1', '--compare_torch',
         f'--profile_dir={tmp_path / "profile"}']
  # Two devices: a sharding mismatch between steps would only show with several.
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='2')
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f'{proc.stdout}\n{proc.stderr[-4000:]}'
  assert 'regularizer overhead' in proc.stdout
  results = json.loads(out.read_text())
  assert all(results['checks'].values()), results['checks']
  for key in ('date', 'versions', 'device', 'model', 'batch_size', 'image_shape',
              'load_average_start', 'load_average_end'):
    assert results[key], key
  assert {'jax', 'jaxlib', 'flax'} <= set(results['versions'])
  assert results['image_shape'] == [32, 32, 3] and results['model']['dtype'] == 'float32'
  assert set(results['variants']) == {'without_regularizer', 'with_regularizer'}
  for variant in results['variants'].values():
    train, inference = variant['train'], variant['inference']
    assert train['compilations'] == 1 and train['jit_cache_size'] == 1
    for value in (train['step_time_s']['median'], train['images_per_s'], train['compile_s'],
                  train['flops_per_image'], train['achieved_flops_per_s_per_device'],
                  inference['images_per_s'], inference['flops_per_image']):
      assert value > 0
    assert train['activation_bytes_per_image'] > 0
  # One predict executable for the model, which the regularizer (train-only) does not change.
  assert sum(v['inference']['compilations'] for v in results['variants'].values()) == 1
  assert list((tmp_path / 'profile').rglob('*.xplane.pb'))  # the jax.profiler trace
  assert results['inference_equal'] == {'flops': True, 'params': True, 'memory_plan': True}
  assert results['regularizer_overhead']['step_time_ratio'] > 0
  assert results['regularizer_overhead']['extra_trained_params'] > 0
  overhead = results['regularizer_overhead']
  assert overhead['flops_share'] == pytest.approx(1 - 1 / overhead['flops_ratio'])
  assert 0 < overhead['flops_share'] < 1
  assert results['mfu'] is None  # CPU: no peak, achieved FLOP/s instead
  from cmtdp_jax.benchmarks import gpu_table  # pylint: disable=import-outside-toplevel
  cells = gpu_table.row(results).strip('| ').split(' | ')
  assert cells[1:3] == ['32x32 (8)', 'float32'] and cells[6] == '-'  # no MFU on CPU
  assert float(cells[4]) == pytest.approx(
      results['variants']['without_regularizer']['train']['step_time_s']['median'] * 1e3, abs=0.1)
  assert results['evaluation']['images_per_s_per_task']['edge'] > 0
  assert results['input_pipeline'] == {'skipped': 'off'}
  assert 'skipped' in results['torch']  # no PyTorch reference of the compact backbone


def test_gpu_table_row_of_an_invpt_result():
  """gpu_table's row of a result as gpu.sh's InvPT rows write it (no torch, no MFU)."""
  from cmtdp_jax.benchmarks import gpu_table  # pylint: disable=import-outside-toplevel
  train = lambda seconds: {'train': {'step_time_s': {'median': seconds},
                                     'images_per_s': 6 / seconds, 'peak_memory_bytes': 3 * 2**30}}
  results = {'model': {'framework': 'invpt', 'backbone': 'vit_b16', 'dtype': 'bfloat16'},
             'variants': {'without_regularizer': train(0.5), 'with_regularizer': train(0.51)},
             'image_shape': [448, 576, 3], 'batch_size': 6, 'device': {'kind': 'NVIDIA H100'},
             'mfu': 0.25, 'regularizer_overhead': {'step_time_ratio': 1.02, 'flops_share': 0.0053},
             'torch': {'skipped': 'off'}}
  assert gpu_table.row(results).strip('| ').split(' | ') == [
      'vit_b16 `invpt`', '448x576 (6)', 'bfloat16', 'NVIDIA H100', '500.0', '12.0', '25.0%',
      '3.00 GiB', '1.02x step time, 0.53% of FLOPs', '-']


def test_remat_keeps_fewer_activations_in_the_train_step():
  config = tiny_config('')
  kept = {}
  for remat in (False, True):
    config.model.remat = remat
    model = models.get_model(config.model, config.tasks,
                             data_lib.get_dataset_spec(config.data.name).num_classes)
    trainer = steps.make_trainer(config, model, config.num_steps)
    state = jax.eval_shape(functools.partial(
        steps.init_state, trainer, image_shape=(config.batch_size, *config.data.crop_size, 3)),
        steps.init_key(0))
    kept[remat] = benchmark.activation_bytes_per_image(config, trainer, state)
  assert 0 < kept[True] < kept[False]


def test_no_tensorflow_outside_the_pipeline_part():
  """GPU machines without TF run everything but the pipeline timing."""
  modules = 'bench_boundary'
  if importlib.util.find_spec('torch'):  # bench_torch needs torch, CI has none
    modules += ', bench_torch'
  code = ('import sys; from cmtdp_jax import evaluation; '
          f'from cmtdp_jax.benchmarks import benchmark, gpu_table, {modules}; '
          "assert 'tensorflow' not in sys.modules")
  subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True, timeout=300)


def test_pipeline_throughput(data_dir):
  pytest.importorskip('tensorflow')
  config = tiny_config(data_dir)
  result = benchmark.benchmark_pipeline(config, num_batches=2, warmup=1)
  assert result['images_per_s_per_host'] > 0
  assert result['per_host_batch'] == config.batch_size


@pytest.mark.parametrize('config_name, backbone, size', [
    ('nyud_hrnet18_baseline', 'hrnet_w18_small_v2', (32, 32)),
    ('nyud_vitb_mt', 'vit_s16', (64, 48)),  # timm's trunk; 4x3 tokens, padded to 64x64
    # InvPT's transcription (no timm); its kwargs are for vit_l16, so the JAX ViT keeps its
    # 224 position grid while the transcription's is the input's: the count accounts for it.
    ('nyud_invpt_vitl', 'vit_b16', (64, 64)),
])
def test_torch_reference_is_the_same_model(config_name, backbone, size):
  torch = pytest.importorskip('torch')
  if config_name == 'nyud_vitb_mt':
    pytest.importorskip('timm')
  from cmtdp_jax.benchmarks import bench_torch  # pylint: disable=import-outside-toplevel
  config = importlib.import_module(f'configs.{config_name}').get_config()
  config.model.backbone = backbone
  config.batch_size, config.data.crop_size = 2, size
  spec = data_lib.get_dataset_spec(config.data.name)
  model = models.get_model(config.model, config.tasks, spec.num_classes)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jax.ShapeDtypeStruct((2, *size, 3), jnp.float32))
  batch = common.synthetic_batch(config, 2, size)
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # OpenMP's spinning threads crawl on busy shared cores
  try:
    step, info = bench_torch.train_step(config, batch)
    step()
  finally:
    torch.set_num_threads(threads)
  assert info['params'] == sum(x.size for x in jax.tree.leaves(shapes['params']))
  if config.model.framework == 'invpt':  # + the modules InvPT builds and never reads
    assert info['params_with_unused'] > info['params']


def test_torch_invpt_supervises_the_intermediate_predictions(monkeypatch):
  """InvPT's PyTorch step adds the loss of every prediction, the intermediate ones (the JAX
  model's '<task>/intermediate') included, each with its task's loss, as the JAX step does."""
  torch = pytest.importorskip('torch')
  from cmtdp_jax.benchmarks import bench_torch  # pylint: disable=import-outside-toplevel
  config = importlib.import_module('configs.nyud_invpt_vitl').get_config()
  config.model.backbone = 'vit_b16'
  config.batch_size, config.data.crop_size = 2, (64, 64)  # BatchNorm: 2 values at 1x1
  losses = []

  def task_loss(name, raw, label, options):
    losses.append((name, tuple(raw.shape[2:])))
    return real(name, raw, label, options)
  real = bench_torch.task_loss
  monkeypatch.setattr(bench_torch, 'task_loss', task_loss)
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    step, info = bench_torch.train_step(config, common.synthetic_batch(config, 2, (64, 64)))
    step()
  finally:
    torch.set_num_threads(threads)
  assert sorted(losses) == sorted([(t, (64, 64)) for t in config.tasks] * 2)
  assert info['params_with_unused'] > info['params']


def test_compare_torch_alternates_the_frameworks_step_by_step(monkeypatch):
  """The interleaved run, with a stand-in for the PyTorch step (CI has no torch)."""
  torch_step = lambda: None
  monkeypatch.setattr(benchmark, '_torch_train_step', lambda config: {
      'step': torch_step, 'params': -1, 'peak_memory': lambda: None})
  timed, calls = benchmark._timed_calls, []  # pylint: disable=protected-access

  def logged(fn, count):
    calls.append(('torch' if fn is torch_step else 'other', count))
    return timed(fn, count)
  monkeypatch.setattr(benchmark, '_timed_calls', logged)
  config = tiny_config('', **{'tasks': ('depth',), 'batch_size': 8, 'eval_batch_size': 8})
  results = benchmark.run_benchmark(config, num_steps=3, warmup=1, pipeline=False,
                                    evaluation=False, compare_torch=True)
  first_torch = calls.index(('torch', 2))  # PyTorch's warm-up, then one step of each in turn
  assert calls[first_torch + 1:first_torch + 7] == [('other', 1), ('torch', 1)] * 3
  pairs = results['torch']['interleaved_seconds']
  assert len(pairs['jax']) == len(pairs['torch']) == 3
  assert results['torch']['jax_over_torch_images_per_s'] == pytest.approx(
      float(np.median(np.asarray(pairs['torch']) / np.asarray(pairs['jax']))))
  assert results['checks']['torch_same_param_count'] is False  # -1 parameters
  assert 'interleaved_seconds' not in results['variants']['without_regularizer']

@pytest.mark.parametrize('kind, dtype, tflops', [
    ('NVIDIA H100 80GB HBM3', 'bfloat16', 989.4),
    ('NVIDIA H100 PCIe', 'bfloat16', 756.0),
    ('NVIDIA H200', 'float32', 494.7),
    ('NVIDIA A100-SXM4-40GB', 'bfloat16', 312.0),
    ('Tesla V100-SXM2-16GB', 'bfloat16', None),
    ('TPU v5 lite', 'bfloat16', 197.0),
    ('TPU v5', 'bfloat16', 459.0),
    ('cpu', 'float32', None),
])
def test_peak_flops_table(kind, dtype, tflops):
  peak = benchmark.peak_flops(kind, dtype)
  assert peak == (None if tflops is None else tflops * 1e12)
