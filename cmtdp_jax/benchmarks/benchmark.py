"""Throughput of training, inference, input pipeline and evaluation for a config.

  python -m cmtdp_jax.benchmarks.benchmark --config configs/synthetic.py --steps 20 --json /tmp/b.json
  python -m cmtdp_jax.benchmarks.benchmark --config configs/nyud_hrnet18_baseline.py \
      --config.model.dtype=bfloat16 --compare_torch

Model, state, train and predict steps come from `steps.setup`, as in
`train.py`, fed with random in-memory batches of the config's shapes, so this
path imports no TensorFlow and runs on any accelerator machine. Both are measured with the contrastive regularizer off and on: the
ratio of the train step times is its overhead, and the predict step must cost
exactly the same FLOPs either way. The tf.data pipeline is timed only where
TensorFlow is importable, and evaluation (all task metrics, SEISM odsF
included) on random predictions of the eval shape. `--compare_torch` times
the PyTorch reference of the same model (`bench_torch.py`, run from the
repository root; timm for the ViTs) in one interleaved run: the timed train
steps alternate between JAX and PyTorch, and JAX / PyTorch is the median of
the per-pair ratios.

The checks in the JSON's `checks` (one compilation per jitted step, no host
callbacks in it, the donated state actually reused, equal inference FLOPs)
make the command exit 1 when one fails.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import re
import sys
import time

import flax
import jax
import jaxlib
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from cmtdp_jax import config_lib
from cmtdp_jax import data as data_lib
from cmtdp_jax import sharding
from cmtdp_jax import steps
from cmtdp_jax import tasks as tasks_lib
from cmtdp_jax.benchmarks.common import step_stats, synthetic_batch

# Peak dense TFLOP/s per JAX device (no sparsity), from the vendors' data sheets;
# first matching `device_kind` substring wins. 'float32' is what float32 convs and
# matmuls run at under JAX's default precision (TF32 tensor cores on A100 and later,
# one bf16 pass on TPUs); 'float32_highest' under jax_default_matmul_precision=highest.
PEAK_TFLOPS = (
    ('H100 PCIe', {'bfloat16': 756.0, 'float32': 378.0, 'float32_highest': 51.2}),
    ('H100', {'bfloat16': 989.4, 'float32': 494.7, 'float32_highest': 66.9}),  # SXM
    ('H200', {'bfloat16': 989.4, 'float32': 494.7, 'float32_highest': 66.9}),
    ('A100', {'bfloat16': 312.0, 'float32': 156.0, 'float32_highest': 19.5}),
    ('V100', {'bfloat16': None, 'float32': 15.7, 'float32_highest': 15.7}),  # no bf16 cores
    ('L4', {'bfloat16': 121.0, 'float32': 60.0, 'float32_highest': 30.3}),
    ('TPU v4', {'bfloat16': 275.0, 'float32': 275.0, 'float32_highest': None}),
    ('TPU v5 lite', {'bfloat16': 197.0, 'float32': 197.0, 'float32_highest': None}),  # v5e
    ('TPU v5e', {'bfloat16': 197.0, 'float32': 197.0, 'float32_highest': None}),
    ('TPU v5', {'bfloat16': 459.0, 'float32': 459.0, 'float32_highest': None}),  # v5p
    ('TPU v6', {'bfloat16': 918.0, 'float32': 918.0, 'float32_highest': None}),  # v6e
)

# Custom calls through which a compiled step would call back into Python.
_HOST_CALLBACK = re.compile(r'custom_call_target="[^"]*callback[^"]*"')


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """Peak FLOP/s of one device computing in `dtype`, or None when unknown (CPUs)."""
  if dtype == 'float32' and str(jax.config.jax_default_matmul_precision) in ('highest',
                                                                            'float32'):
    dtype = 'float32_highest'
  for pattern, peaks in PEAK_TFLOPS:
    if pattern.lower() in device_kind.lower():
      return None if peaks[dtype] is None else peaks[dtype] * 1e12
  return None


def _timed_calls(fn, count):
  """Seconds of `count` calls of `fn`, each waited for."""
  seconds = []
  for _ in range(count):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    seconds.append(time.perf_counter() - start)
  return seconds


def _compiled_summary(compiled, num_devices: int) -> dict:
  """XLA's FLOPs (the per-device program times the devices), memory plan, callbacks."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()
  text = compiled.as_text()
  return {
      'flops_per_device': float(cost.get('flops', 0.0)),
      'flops': float(cost.get('flops', 0.0)) * num_devices,
      'bytes_accessed_per_device': float(cost.get('bytes accessed', 0.0)),
      'memory_plan_bytes': None if memory is None else {
          name: int(getattr(memory, f'{name}_size_in_bytes'))
          for name in ('argument', 'output', 'alias', 'temp')},
      'host_callbacks': len(_HOST_CALLBACK.findall(text)),
      'convolutions': text.count(' convolution('),
      'transposes': text.count(' transpose('),
  }


def _count(tree) -> int:
  return int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))


def _peak_memory(device) -> int | None:
  stats = device.memory_stats()
  return None if not stats else stats.get('peak_bytes_in_use')


def residual_bytes(fn, *args) -> int:
  """Bytes of the arrays `jax.vjp(fn, *args)` keeps for the backward pass.

  Shapes only (nothing runs), so it is the same on every backend; it is what
  rematerialisation (`config.model.remat`) shrinks.
  """
  residuals = jax.eval_shape(lambda *a: jax.vjp(fn, *a)[1], *args)
  return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(residuals)))


def activation_bytes_per_image(config, trainer, state) -> int:
  """Forward activations the train step keeps for its backward pass, per image:
  the VJP residuals at batch 2 minus batch 1, so parameters are not counted."""
  def loss(params, batch_stats, batch):
    return steps.compute_losses(trainer, params, batch_stats, batch, jax.random.key(0))[0]

  def at_batch(size):
    batch = jax.eval_shape(lambda: synthetic_batch(config, size, config.data.crop_size))
    return residual_bytes(loss, state.params, state.batch_stats, batch)

  return at_batch(2) - at_batch(1)


def benchmark_variant(config, mesh, num_steps: int, warmup: int, pipelined: bool,
                      profile_dir: str | None = None, torch_step=None) -> dict:
  """Times the train step, then the predict step, of one config.

  With `profile_dir`, the pipelined steps are also recorded by `jax.profiler`.
  With `torch_step` (a PyTorch train step, `bench_torch.py`), the timed
  steps alternate between the two frameworks, one JAX step then one PyTorch
  step, so that both see the same machine load; the PyTorch times are returned
  as `interleaved_seconds` with JAX's.
  """
  built = steps.setup(config, mesh)
  trainer, train_step, predict_step = built.trainer, built.train_step, built.predict_step
  state = built.init(steps.init_key(config.seed))
  batch = jax.device_put(synthetic_batch(config, config.batch_size, config.data.crop_size),
                         sharding.batch_sharding(mesh))
  result = {'params_trained': _count(state.params)}
  metrics = None

  def one_step():
    nonlocal state, metrics
    state, metrics = train_step(state, batch)
    return metrics['loss/total']

  with steps.count_compilations() as compilations:
    first_state = state
    first_call = sum(_timed_calls(one_step, 1))
    donated = [leaf.is_deleted() for leaf in jax.tree.leaves(first_state)]
    del first_state
    # Everything is on device already: an implicit host transfer would raise here.
    with jax.transfer_guard('disallow'):
      _timed_calls(one_step, warmup)
      if torch_step is None:
        seconds = _timed_calls(one_step, num_steps)
      else:
        _timed_calls(torch_step, warmup + 1)
        seconds, torch_seconds = [], []
        for _ in range(num_steps):
          seconds += _timed_calls(one_step, 1)
          torch_seconds += _timed_calls(torch_step, 1)
        result['interleaved_seconds'] = {'jax': seconds, 'torch': torch_seconds}
      if pipelined:  # no wait between steps, as train.py runs them
        start = time.perf_counter()
        for _ in range(num_steps):
          one_step()
        jax.block_until_ready(state)
        result['images_per_s_pipelined'] = num_steps * config.batch_size / (
            time.perf_counter() - start)
        if profile_dir:
          with jax.profiler.trace(profile_dir):
            for _ in range(num_steps):
              one_step()
            jax.block_until_ready(state)
  stats = step_stats(seconds)
  train = {'step_time_s': stats, 'images_per_s': config.batch_size / stats['median'],
           'first_call_s': first_call, 'compile_s': max(first_call - stats['median'], 0.0),
           'compilations': compilations['jit(train_step)'],
           'jit_cache_size': train_step._cache_size(),  # pylint: disable=protected-access
           'donated_fraction': float(np.mean(donated)),
           'peak_memory_bytes': _peak_memory(mesh.devices.flat[0]),
           'activation_bytes_per_image': activation_bytes_per_image(config, trainer, state),
           'last_loss': float(jax.device_get(metrics['loss/total']))}
  train.update(_compiled_summary(train_step.lower(state, batch).compile(), mesh.size))
  train['flops_per_image'] = train['flops'] / config.batch_size
  train['achieved_flops_per_s_per_device'] = train['flops_per_device'] / stats['median']
  result['train'] = train
  result['inference'] = _benchmark_predict(config, mesh, predict_step, state, num_steps, warmup)
  return result


def _benchmark_predict(config, mesh, predict, state, num_steps, warmup) -> dict:
  eval_size = tuple(config.data.eval_crop_size or config.data.crop_size)
  images = jax.device_put(synthetic_batch(config, config.eval_batch_size, eval_size)['image'],
                          sharding.batch_sharding(mesh))
  params, batch_stats = state.params['model'], state.batch_stats
  call = lambda: predict(params, batch_stats, images)
  with steps.count_compilations() as compilations:
    first_call = sum(_timed_calls(call, 1))
    with jax.transfer_guard('disallow'):
      _timed_calls(call, warmup)
      seconds = _timed_calls(call, num_steps)
  stats = step_stats(seconds)
  result = {'step_time_s': stats, 'images_per_s': config.eval_batch_size / stats['median'],
            'first_call_s': first_call, 'compilations': compilations['jit(predict)'],
            'params': _count(params), 'batch_stats': _count(batch_stats)}
  result.update(_compiled_summary(predict.lower(params, batch_stats, images).compile(),
                                  mesh.size))
  result['flops_per_image'] = result['flops'] / config.eval_batch_size
  return result


def benchmark_pipeline(config, num_batches: int, warmup: int) -> dict:
  """Per-host images/s of the augmented tf.data train pipeline (needs TensorFlow)."""
  if importlib.util.find_spec('tensorflow') is None:
    return {'skipped': 'TensorFlow is not importable'}
  from cmtdp_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  spec = data_lib.get_dataset_spec(config.data.name)
  try:
    source = pipeline.open_split(config.data, spec.train_split, config.tasks)
  except (FileNotFoundError, ValueError) as e:
    return {'skipped': f'dataset not available: {e}'}
  batches = pipeline.train_dataset(source, config, 0).as_numpy_iterator()
  for _ in range(warmup):
    next(batches)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(batches)
  seconds = time.perf_counter() - start
  per_host = config.batch_size // jax.process_count()
  return {'images_per_s_per_host': num_batches * per_host / seconds,
          'batches': num_batches, 'per_host_batch': per_host,
          'augment': config.data.augment.to_dict(), 'crop_size': list(config.data.crop_size)}


def benchmark_evaluation(config, num_images: int, edge_workers: int = 0) -> dict:
  """Images/s of every task's metric (update + result) on random eval-shaped maps.

  Edge maps are `bench_boundary`'s synthetic boundaries, since on noise NMS
  would keep nearly every pixel.
  """
  try:
    # pylint: disable=import-outside-toplevel
    from cmtdp_jax import evaluation
    from cmtdp_jax.benchmarks import bench_boundary
  except ImportError as e:
    return {'skipped': f'evaluation dependencies missing: {e}'}
  height, width = config.data.eval_crop_size or config.data.crop_size
  labels = synthetic_batch(config, num_images, (height, width), seed=1)
  predictions = synthetic_batch(config, num_images, (height, width), seed=2)
  rng = np.random.default_rng(3)
  for name in config.tasks:
    task = tasks_lib.get_task(name)
    if name == 'edge':
      pairs = [bench_boundary.synthetic_pair(rng, height, width) for _ in range(num_images)]
      predictions[name] = np.stack([p for p, _ in pairs]).astype(np.float32)
      labels[name] = np.stack([l for _, l in pairs]).astype(np.int32)
    elif task.label_kind == tasks_lib.CATEGORICAL and task.channels == 1:
      predictions[name] = rng.uniform(0.0, 1.0, labels[name].shape).astype(np.float32)
  result = {'images': num_images, 'image_size': [height, width], 'images_per_s_per_task': {}}
  for name in config.tasks:
    options = evaluation.metric_options(config, name)
    if name == 'edge' and edge_workers:
      options['workers'] = edge_workers
    metric = evaluation.make_metric(name, **options)
    start = time.perf_counter()
    for i in range(0, num_images, config.eval_batch_size):
      metric.update(predictions[name][i:i + config.eval_batch_size],
                    labels[name][i:i + config.eval_batch_size])
    metric.result()
    result['images_per_s_per_task'][name] = num_images / (time.perf_counter() - start)
    if name == 'edge':
      result['edge_workers'] = metric.workers
  result['images_per_s'] = 1.0 / sum(1.0 / v for v in result['images_per_s_per_task'].values())
  return result


def _versions() -> dict[str, str]:
  return {'python': platform.python_version(), 'jax': jax.__version__,
          'jaxlib': jaxlib.__version__, 'flax': flax.__version__, 'optax': optax.__version__,
          'numpy': np.__version__}


def run_benchmark(config, num_steps: int = 10, warmup: int = 2, *, pipeline: bool = True,
                  evaluation: bool = True, compare_torch: bool = False, eval_images: int = 16,
                  edge_workers: int = 0, config_name: str = '',
                  profile_dir: str | None = None) -> dict:
  """Runs every measurement of the module docstring; returns the JSON-able results."""
  mesh = sharding.make_mesh(config.mesh)
  config_lib.validate(config, sharding.data_parallel_size(mesh))
  device = mesh.devices.flat[0]
  regularized = bool(config.contrastive.enable)
  results = {
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'config': config_name, 'versions': _versions(),
      'device': {'kind': device.device_kind, 'platform': device.platform,
                 'count': jax.device_count(), 'processes': jax.process_count(),
                 'host_cpus': os.cpu_count()},
      'load_average_start': list(os.getloadavg()),
      'model': {'framework': config.model.framework, 'backbone': config.model.backbone,
                'dtype': config.model.dtype, 'tasks': list(config.tasks)},
      'batch_size': config.batch_size, 'image_shape': [*config.data.crop_size, 3],
      'eval_batch_size': config.eval_batch_size,
      'eval_image_shape': [*(config.data.eval_crop_size or config.data.crop_size), 3],
      'steps': num_steps, 'warmup': warmup,
  }
  checks = {}
  torch_step, results['torch'] = None, {'skipped': 'off'}
  if compare_torch:
    results['torch'] = _optional_part('torch', lambda: _torch_train_step(config), checks)
    torch_step = results['torch'].pop('step', None)
    torch_peak_memory = results['torch'].pop('peak_memory', None)
  variants = {'with_regularizer' if regularized else 'without_regularizer':
              benchmark_variant(config, mesh, num_steps, warmup, pipelined=True,
                                profile_dir=profile_dir, torch_step=torch_step)}
  if len(config.tasks) >= 2:
    other = config.copy_and_resolve_references()
    with other.unlocked():
      other.contrastive.enable = not regularized
    variants['without_regularizer' if regularized else 'with_regularizer'] = (
        benchmark_variant(other, mesh, num_steps, warmup, pipelined=False))
  results['variants'] = variants
  primary = variants['with_regularizer' if regularized else 'without_regularizer']
  peak = peak_flops(device.device_kind, config.model.dtype)
  results['peak_flops_per_s_per_device'] = peak
  results['mfu'] = (None if peak is None else
                    primary['train']['achieved_flops_per_s_per_device'] / peak)
  if torch_step is not None:
    results['torch'].update(_interleaved_comparison(config, primary, results['torch']['params']),
                            peak_memory_bytes=torch_peak_memory())
    checks['torch_same_param_count'] = results['torch']['same_param_count']

  for name, variant in variants.items():
    checks[f'{name}/one_compilation'] = (variant['train']['compilations'] == 1 and
                                         variant['train']['jit_cache_size'] == 1)
    checks[f'{name}/no_host_callbacks'] = variant['train']['host_callbacks'] == 0
    checks[f'{name}/state_donated'] = variant['train']['donated_fraction'] == 1.0
    # The predict step is one cached executable per model: the second variant (the same
    # model, the regularizer is train-only) reuses the first's compile.
    checks[f'{name}/predict_one_compilation'] = variant['inference']['compilations'] <= 1
  if len(variants) == 2:
    with_, without = variants['with_regularizer'], variants['without_regularizer']
    results['regularizer_overhead'] = {
        'step_time_ratio': (with_['train']['step_time_s']['median'] /
                            without['train']['step_time_s']['median']),
        'flops_ratio': with_['train']['flops'] / without['train']['flops'],
        # The regularizer's part of the regularized train step's XLA FLOPs.
        'flops_share': 1.0 - without['train']['flops'] / with_['train']['flops'],
        'extra_trained_params': with_['params_trained'] - without['params_trained']}
    results['inference_equal'] = {
        'flops': with_['inference']['flops'] == without['inference']['flops'],
        'params': with_['inference']['params'] == without['inference']['params'],
        'memory_plan': (with_['inference']['memory_plan_bytes'] ==
                        without['inference']['memory_plan_bytes'])}
    checks['inference_flops_equal'] = results['inference_equal']['flops']
    checks['inference_params_equal'] = results['inference_equal']['params']
  results['checks'] = checks

  parts = {'input_pipeline': (pipeline, lambda: benchmark_pipeline(config, num_steps, warmup)),
           'evaluation': (evaluation,
                          lambda: benchmark_evaluation(config, eval_images, edge_workers))}
  for name, (enabled, measure) in parts.items():
    results[name] = _optional_part(name, measure, checks) if enabled else {'skipped': 'off'}
  results['load_average_end'] = list(os.getloadavg())
  return results


def _optional_part(name, measure, checks) -> dict:
  """Runs one measurement after the train step's; a failure is reported, not raised,
  so the numbers measured before it still come out (and the run exits 1)."""
  try:
    return measure()
  except Exception as e:  # pylint: disable=broad-except
    checks[f'{name}_ran'] = False
    return {'failed': f'{type(e).__name__}: {e}'}


def _torch_train_step(config) -> dict:
  """The PyTorch reference's train step on the JAX benchmark's batch (`step`) and what
  it runs, or why there is none (`skipped`)."""
  try:
    from cmtdp_jax.benchmarks import bench_torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    return {'skipped': f'PyTorch reference not importable ({e}); run from the repo root'}
  batch = synthetic_batch(config, config.batch_size, config.data.crop_size)
  step, info = bench_torch.train_step(config, batch)
  return info if step is None else {'step': step, **info}


def _interleaved_comparison(config, variant, torch_params: int) -> dict:
  """PyTorch's step times from `variant`'s interleaved run, and JAX / PyTorch images/s
  as the median over the step pairs of PyTorch's step time over JAX's."""
  pairs = variant.pop('interleaved_seconds')
  stats = step_stats(pairs['torch'])
  return {'step_time_s': stats, 'images_per_s': config.batch_size / stats['median'],
          'interleaved_seconds': pairs,
          'jax_over_torch_images_per_s': float(np.median(
              np.asarray(pairs['torch']) / np.asarray(pairs['jax']))),
          'same_param_count': torch_params == variant['inference']['params']}


def _si(value, unit='') -> str:
  if value is None:
    return 'n/a'
  for scale, prefix in ((1e15, 'P'), (1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if abs(value) >= scale:
      return f'{value / scale:.3g} {prefix}{unit}'
  return f'{value:.3g} {unit}'.rstrip()


def _time_cell(stats) -> str:
  return (f"{stats['median'] * 1e3:.1f} ms [{stats['p10'] * 1e3:.1f}, "
          f"{stats['p90'] * 1e3:.1f}]")


def format_report(results) -> str:
  """The human-readable tables of `run_benchmark`'s results."""
  model, device = results['model'], results['device']
  h, w, _ = results['image_shape']
  lines = [
      f"{results['config']}  {results['date']}",
      f"device {device['kind']} x{device['count']} ({device['platform']}), "
      f"{device['host_cpus']} host CPUs, load average "
      f"{results['load_average_start'][0]:.2f} -> {results['load_average_end'][0]:.2f}",
      ' '.join(f'{k} {v}' for k, v in results['versions'].items()),
      f"{model['framework']}/{model['backbone']} {model['dtype']}, tasks "
      f"{','.join(model['tasks'])}, batch {results['batch_size']} x {h}x{w}, "
      f"{results['steps']} timed steps after {results['warmup']} warm-up",
      '']
  names = list(results['variants'])
  columns = [results['variants'][n] for n in names]

  def table(title, rows):
    lines.append(f"{title:<34s}" + ''.join(f'{n.replace("_", " "):>30s}' for n in names))
    for label, cell in rows:
      lines.append(f'  {label:<32s}' + ''.join(f'{cell(c):>30s}' for c in columns))
    lines.append('')

  table('train step', [
      ('step time median [p10, p90]', lambda c: _time_cell(c['train']['step_time_s'])),
      ('images/s', lambda c: f"{c['train']['images_per_s']:.2f}"),
      ('images/s, pipelined dispatch',
       lambda c: f"{c['images_per_s_pipelined']:.2f}" if 'images_per_s_pipelined' in c
       else '-'),
      ('compile (first call - step)', lambda c: f"{c['train']['compile_s']:.1f} s"),
      ('compilations / jit cache', lambda c: f"{c['train']['compilations']} / "
                                             f"{c['train']['jit_cache_size']}"),
      ('XLA FLOPs / image', lambda c: _si(c['train']['flops_per_image'], 'FLOP')),
      ('achieved per device', lambda c: _si(c['train']['achieved_flops_per_s_per_device'],
                                            'FLOP/s')),
      ('peak device memory', lambda c: _si(c['train']['peak_memory_bytes'], 'B')),
      ('XLA temp buffers', lambda c: _si((c['train']['memory_plan_bytes'] or {}).get('temp'),
                                         'B')),
      ('activations kept / image', lambda c: _si(c['train']['activation_bytes_per_image'],
                                                 'B')),
      ('XLA convolutions / transposes', lambda c: f"{c['train']['convolutions']} / "
                                                  f"{c['train']['transposes']}"),
      ('state donated / host callbacks', lambda c: f"{c['train']['donated_fraction']:.0%} / "
                                                   f"{c['train']['host_callbacks']}"),
      ('parameters trained', lambda c: f"{c['params_trained']:,}"),
  ])
  eh, ew, _ = results['eval_image_shape']
  table(f"predict step ({results['eval_batch_size']} x {eh}x{ew})", [
      ('time median [p10, p90]', lambda c: _time_cell(c['inference']['step_time_s'])),
      ('images/s', lambda c: f"{c['inference']['images_per_s']:.2f}"),
      ('XLA FLOPs / image', lambda c: _si(c['inference']['flops_per_image'], 'FLOP')),
      ('XLA FLOPs (exact)', lambda c: f"{c['inference']['flops']:.6g}"),
      ('parameters / BN statistics', lambda c: f"{c['inference']['params']:,} / "
                                               f"{c['inference']['batch_stats']:,}"),
  ])
  mfu = results['mfu']
  lines.append('MFU (train step, XLA FLOPs): ' + (
      f"{mfu:.1%} of {_si(results['peak_flops_per_s_per_device'], 'FLOP/s')}" if mfu is not None
      else f'n/a (no peak FLOP/s known for {device["kind"]}; achieved rate above)'))
  if 'regularizer_overhead' in results:
    overhead = results['regularizer_overhead']
    lines.append(f"regularizer overhead: step time x{overhead['step_time_ratio']:.3f}, "
                 f"XLA FLOPs x{overhead['flops_ratio']:.3f} "
                 f"({overhead['flops_share']:.2%} of the regularized step), "
                 f"+{overhead['extra_trained_params']:,} trained (projector) parameters")
    same = results['inference_equal']
    lines.append(f"inference with vs without regularizer: FLOPs equal {same['flops']}, "
                 f"parameters equal {same['params']}, XLA memory plan equal {same['memory_plan']}")
  for title, name, describe in (
      ('tf.data train pipeline', 'input_pipeline', lambda r: (
          f"{r['images_per_s_per_host']:.1f} images/s per host ({r['batches']} batches of "
          f"{r['per_host_batch']}, augmented)")),
      ('evaluation metrics', 'evaluation', lambda r: (
          f"{r['images_per_s']:.2f} images/s, all tasks ({r['images']} images "
          f"{r['image_size'][0]}x{r['image_size'][1]}, edge workers {r.get('edge_workers')}); "
          + ', '.join(f'{k} {v:.1f}' for k, v in r['images_per_s_per_task'].items()))),
      ('PyTorch reference train step', 'torch', lambda r: (
          f"{r['images_per_s']:.2f} images/s (median {r['step_time_s']['median'] * 1e3:.1f} "
          f"ms, {r['device']}, torch {r['torch']}, {r['threads']} threads, "
          f"{r['params']:,} parameters); JAX / PyTorch images/s "
          f"{r['jax_over_torch_images_per_s']:.2f} (median of "
          f"{len(r['interleaved_seconds']['torch'])} interleaved step pairs)"))):
    part = results[name]
    text = (f"skipped ({part['skipped']})" if 'skipped' in part else
            f"FAILED ({part['failed']})" if 'failed' in part else describe(part))
    lines.append(f'{title}: {text}')
  failed = [name for name, ok in results['checks'].items() if not ok]
  lines.append('checks: ' + ('all passed' if not failed else 'FAILED ' + ', '.join(failed)) +
               f" ({', '.join(results['checks'])})")
  return '\n'.join(lines)


FLAGS = flags.FLAGS


def define_flags():
  """The command's flags; defined when it runs, so that importing this module (tests, the
  notebook) next to the CLI does not define --config twice."""
  config_flags.DEFINE_config_file('config', None, 'Config file (optionally file.py:variant).',
                                  lock_config=True)
  flags.DEFINE_integer('steps', 10, 'Timed train / predict steps (and pipeline batches).')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps after the compiling first call.')
  flags.DEFINE_string('json', None, 'Where to write the results as JSON.')
  flags.DEFINE_bool('pipeline', True, 'Time the tf.data train pipeline (needs TensorFlow).')
  flags.DEFINE_bool('evaluation', True, 'Time the evaluation metrics, odsF included.')
  flags.DEFINE_integer('eval_images', 16, 'Images for the evaluation metrics.')
  flags.DEFINE_integer('edge_workers', 0,
                       'Threads of the odsF evaluation (0: the metric default, in-process).')
  flags.DEFINE_bool('compare_torch', False, 'Also time the PyTorch reference model (run from '
                    'the repository root).')
  flags.DEFINE_string('profile_dir', None, 'Record the timed steps with jax.profiler into this '
                      'folder (view with `xprof --logdir DIR` or TensorBoard\'s profile plugin).')
  flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config_name = config_flags.get_config_filename(FLAGS['config'])
  try:
    results = run_benchmark(FLAGS.config, FLAGS.steps, FLAGS.warmup, pipeline=FLAGS.pipeline,
                            evaluation=FLAGS.evaluation, compare_torch=FLAGS.compare_torch,
                            eval_images=FLAGS.eval_images, edge_workers=FLAGS.edge_workers,
                            config_name=config_name, profile_dir=FLAGS.profile_dir)
  except ValueError as e:
    sys.exit(f'error: {e}')
  print(format_report(results), flush=True)
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(results, f, indent=2)
  if not all(results['checks'].values()):
    sys.exit(1)


if __name__ == '__main__':
  define_flags()
  config_lib.run(main)
