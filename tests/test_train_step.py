"""The jitted train step: sharding-invariance, learning, regularizer wiring.

Batches come straight from the synthetic world renderer (no TensorFlow), so
these tests exercise exactly what the benchmarks run on GPU machines.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmtdp_jax import sharding, steps
from cmtdp_jax.data import synthetic_world
from tests import same_training
from tests.conftest import tiny_config

MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


@functools.lru_cache(maxsize=None)
def _scenes(count, size, first_seed=0):
  return [synthetic_world.render_scene(first_seed + i, size, size) for i in range(count)]


def make_batch(config, first_seed=0):
  """A batch in the pipeline's conventions from rendered scenes."""
  size = config.data.crop_size[0]
  scenes = _scenes(config.batch_size, size, first_seed)
  batch = {'image': np.stack([(s['image'] - MEAN) / STD for s in scenes]).astype(np.float32)}
  for task in config.tasks:
    values = np.stack([s[task] for s in scenes])
    batch[task] = values.astype(np.float32 if task in ('depth', 'normals') else np.int32)
  return batch


def build(config, mesh):
  """(trainer, state, train step) exactly as the benchmark and train.py build them."""
  built = steps.setup(config, mesh)
  return built.trainer, built.init(steps.init_key(config.seed)), built.train_step


def steps_of(config, mesh, num_steps, batch_fn=None):
  """Yields (state, metrics) after each of `num_steps` train steps on the rendered batches,
  each passed through `batch_fn` first if given (the fault tests)."""
  _, state, step = build(config, mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  with jax.set_mesh(mesh):
    for i in range(num_steps):
      batch = make_batch(config, first_seed=100 * (i % 2))
      state, metrics = step(state, jax.device_put(batch_fn(batch) if batch_fn else batch,
                                                  batch_sharding))
      yield state, metrics


def run_steps(config, mesh, num_steps, keep_on_device=False):
  history = []
  for state, metrics in steps_of(config, mesh, num_steps):
    history.append(jax.device_get(metrics))
  return (state if keep_on_device else jax.device_get(state)), history


def trained_run(config, mesh, num_steps, batch_fn=None):
  """(the losses and the state after every step for `same_training`, the last state on
  its devices, the host metrics of every step)."""
  run, history = same_training.Run([], {}), []
  for step, (state, metrics) in enumerate(steps_of(config, mesh, num_steps, batch_fn), 1):
    history.append(jax.device_get(metrics))
    run.losses.append(float(history[-1]['loss/total']))
    run.states[step] = same_training.state_vectors(*jax.device_get((state.params,
                                                                    state.batch_stats)))
  return run, state, history


MESH8 = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
MESH1 = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
# SGD keeps float reordering differences proportional (Adam would amplify them on
# near-zero gradients); three tasks keep compilation short.
SGD_THREE_TASKS = {'contrastive.enable': True, 'optim.name': 'sgd',
                   'tasks': ('semseg', 'depth', 'normals')}


@pytest.fixture(scope='module')
def eight_device_run():
  return trained_run(tiny_config(**SGD_THREE_TASKS), MESH8, 3)[0]


def test_eight_devices_match_one_device(eight_device_run):
  """Data parallelism with synchronised BatchNorm computes the 1-device step, up to the
  reduction order (tolerances: `same_training`, derived from measured noise)."""
  assert jax.device_count() == 8, 'run with JAX_NUM_CPU_DEVICES=8'
  one_device = trained_run(tiny_config(**SGD_THREE_TASKS), MESH1, 3)[0]
  same_training.assert_same_training(eight_device_run, one_device)


def _second_half_reads_the_first(batch):
  return {k: np.concatenate([v[:4], v[:4]]) for k, v in batch.items()}


def test_same_training_catches_faults(eight_device_run):
  """The check that two processes train like one fails for each fault it is there for;
  each is built in one process, as the 8 devices' global batch of 2 processes x 4."""
  config = tiny_config(**SGD_THREE_TASKS)
  faults = {
      'a process trains on the other\'s shard':
          trained_run(config, MESH8, 3, _second_half_reads_the_first),
      'gradients summed over the 2 processes, not averaged':
          trained_run(tiny_config(**SGD_THREE_TASKS, **{'optim.lr': 2 * config.optim.lr}),
                      MESH8, 3),
      'no all-reduce: process 0 steps on its own 4 images':
          trained_run(tiny_config(**SGD_THREE_TASKS, batch_size=4),
                      jax.sharding.Mesh(np.array(jax.devices()[:4]), ('data',)), 3),
  }
  for fault, (run, _, _) in faults.items():
    assert same_training.differences(eight_device_run, run), f'not caught: {fault}'


def test_training_lowers_every_task_loss():
  config = tiny_config(**{'optim.lr': 3e-3, 'num_steps': 60})
  mesh = sharding.make_mesh(config.mesh)
  _, history = run_steps(config, mesh, 60)
  for task in config.tasks:
    first = np.mean([h[f'loss/{task}'] for h in history[:6]])
    last = np.mean([h[f'loss/{task}'] for h in history[-6:]])
    assert last < 0.9 * first, f'{task}: {first:.4f} -> {last:.4f}'


@pytest.fixture(scope='module')
def guarded():
  """One compiled tiny train step (AdamW) for the non-finite guard's tests."""
  config = tiny_config()
  mesh = sharding.make_mesh(config.mesh)
  _, state, step = build(config, mesh)
  return config, mesh, state, step


def run_step(guarded, state, batch):
  _, mesh, _, step = guarded
  with jax.set_mesh(mesh):
    return step(jax.tree.map(jnp.copy, state), batch)  # the step donates its input


def assert_same(tree_a, tree_b):
  for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)):
    np.testing.assert_array_equal(a, b)


def test_nonfinite_batch_is_skipped_and_counted(guarded):
  config, _, state, _ = guarded
  batch = make_batch(config)
  batch['image'][0, 0, 0, 0] = np.nan
  new_state, metrics = run_step(guarded, state, batch)
  assert float(metrics['skipped']) == 1.0
  assert int(new_state.nonfinite_steps) == 1 and int(new_state.nonfinite_streak) == 1
  assert int(new_state.step) == 1
  assert_same(new_state.params, state.params)


def test_update_to_garbage_state_is_rejected_despite_finite_loss_and_gradient(guarded):
  """A finite loss and gradient can still make the new state non-finite or absurd
  (lr=inf or 1e30, here an optimizer moment of 1e30): the whole update is rejected."""
  config, _, state, _ = guarded
  flat, treedef = jax.tree_util.tree_flatten_with_path(state.opt_state)
  leaves = [leaf for _, leaf in flat]
  first_moment = next(i for i, (path, _) in enumerate(flat)
                      if '.mu[' in jax.tree_util.keystr(path))
  leaves[first_moment] = jax.device_put(jnp.full_like(leaves[first_moment], 1e30),
                                        leaves[first_moment].sharding)
  garbage = state.replace(opt_state=jax.tree_util.tree_unflatten(treedef, leaves))
  new_state, metrics = run_step(guarded, garbage, make_batch(config))
  assert np.isfinite(metrics['loss/total']) and np.isfinite(metrics['grad_norm'])
  assert float(metrics['skipped']) == 1.0 and int(new_state.nonfinite_streak) == 1
  assert_same(new_state.params, state.params)


def test_state_stops_changing_at_the_streak_limit(guarded):
  """The loop reads the streak only when it fetches metrics, and still stops at
  exactly the step that reached the limit: the state no longer changes."""
  config, _, state, _ = guarded
  limit = np.int32(config.max_nonfinite_streak)
  stopped = state.replace(step=jnp.int32(7), nonfinite_steps=limit, nonfinite_streak=limit)
  new_state, metrics = run_step(guarded, stopped, make_batch(config))
  assert np.isfinite(metrics['loss/total']) and int(metrics['nonfinite_streak']) == limit
  assert int(new_state.step) == 7 and int(new_state.nonfinite_steps) == limit
  assert_same(new_state, stopped)


@pytest.mark.parametrize('name', ['cmtdp', 'mtpsl', 'jtr'])
def test_inference_is_untouched_by_the_regularizer(name):
  """Same outputs, parameter count and XLA FLOPs with each regularizer on or off; its
  parameters live beside 'model', never in it."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  outputs, counts, flops = [], [], []
  for regularizer in ('', name):
    config = tiny_config(**{'regularizer.name': regularizer})
    trainer, state, _ = build(config, mesh)
    assert sorted(state.params) == sorted(
        ['model'] + ([trainer.regularizer.param_key] if regularizer else []))
    predict = steps.make_predict_step(trainer.model, tuple(config.tasks),
                                      sharding.batch_sharding(mesh))
    images = make_batch(config)['image']
    with jax.set_mesh(mesh):
      compiled = predict.lower(state.params['model'], state.batch_stats, images).compile()
      outputs.append(jax.device_get(compiled(state.params['model'], state.batch_stats,
                                             images)))
    counts.append(sum(x.size for x in jax.tree.leaves(state.params['model'])))
    analysis = compiled.cost_analysis()
    flops.append((analysis[0] if isinstance(analysis, list) else analysis)['flops'])
  assert counts[0] == counts[1] and flops[0] == flops[1] and flops[0] > 0
  for task in outputs[0]:
    np.testing.assert_array_equal(outputs[0][task], outputs[1][task])
