"""Training and evaluation loop: build data, model, state and steps, then loop.

Reads top to bottom like Flax's imagenet example: `train_and_evaluate` opens
the data, creates the model and its state (restoring the latest checkpoint if
there is one), compiles the train step once and loops, logging every
`log_every` steps, checkpointing every `checkpoint_every` and evaluating every
`eval_every` and at the end. `evaluate` restores a checkpoint and runs the
full eval split.
"""

from __future__ import annotations

import os
import signal
import time

import jax
import numpy as np
from absl import logging
from flax.metrics import tensorboard
from jax.experimental import multihost_utils

from cmtdp_jax import atomic_json
from cmtdp_jax import checkpointing
from cmtdp_jax import config_lib
from cmtdp_jax import data as data_lib
from cmtdp_jax import evaluation
from cmtdp_jax import progress
from cmtdp_jax import regularizers
from cmtdp_jax import sharding
from cmtdp_jax import steps
from cmtdp_jax import workdir as workdir_lib
from cmtdp_jax.data import pipeline
from cmtdp_jax.evaluation import scoring
from cmtdp_jax.evaluation import visualize
from cmtdp_jax.models import convert

# Steps the host may dispatch ahead of the device. A SIGTERM is seen at the next dispatch and
# saved once the queued steps have run; uncapped, the queue held ~32 multi-second steps and a
# save came minutes late, past a cloud preemption's grace period. Two still leave a step
# queued on the device while the host prepares the next.
MAX_STEPS_IN_FLIGHT = 2


class _Preemption:
  """Tells the loop to checkpoint and stop at the next step boundary.

  One process: our own SIGTERM handler. Several: JAX's preemption sync point
  (through Orbax), which makes every host stop at the same step.
  """

  def __init__(self, checkpointer):
    self.checkpointer = checkpointer
    self.signalled = False
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.signalled = True

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.signalled
    return self.checkpointer.manager.reached_preemption(step)


def _setup(config, mesh=None):
  """Everything train and eval share: the mesh (default: the config's), validated, and
  `steps.setup` on it."""
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  config_lib.validate(config, sharding.data_parallel_size(mesh))
  return mesh, steps.setup(config, mesh)


def _create_state(config, built, checkpointer):
  """Restores the latest checkpoint, or initialises a fresh state."""
  if checkpointer.latest_step() is not None:
    state = checkpointer.restore(checkpointing.abstract_like(built.abstract_state,
                                                             built.state_sharding))
    logging.info('Resumed from %s at step %d', checkpointer.directory, int(state.step))
    return state
  state = built.init(steps.init_key(config.seed))
  if config.model.pretrained:
    state = _load_pretrained_backbone(state, config.model, built)
  if config.model.weights:
    state = _load_model_weights(state, config, built)
  return state


def _load_pretrained_backbone(state, model_config, built):
  """Replaces the backbone's params and BN statistics (if any: ViTs have none) by converted
  ImageNet weights (a ViT's position grid resized once to its img_size's, as InvPT)."""
  backbone = {'params': state.params['model']['backbone']}
  if 'backbone' in state.batch_stats:
    backbone['batch_stats'] = state.batch_stats['backbone']
  loaded = convert.load_pretrained(jax.device_get(backbone), model_config.pretrained,
                                   model_config.backbone,
                                   getattr(built.model.backbone, 'position_grid', None))
  params = dict(state.params, model=dict(state.params['model'], backbone=loaded['params']))
  batch_stats = state.batch_stats
  if 'batch_stats' in loaded:
    batch_stats = dict(batch_stats, backbone=loaded['batch_stats'])
  logging.info('Loaded pretrained backbone from %s', model_config.pretrained)
  return jax.device_put(state.replace(params=params, batch_stats=batch_stats),
                        built.state_sharding)


def _load_model_weights(state, config, built):
  """Replaces the whole model's params and BN statistics by a converted checkpoint
  (`convert_weights --framework`); the regularizer's own parameters stay as initialised."""
  variables = {'params': state.params['model'], 'batch_stats': state.batch_stats}
  img_size = getattr(getattr(built.model, 'backbone', None), 'img_size', None)
  loaded = convert.load_model_weights(jax.device_get(variables), config.model.weights,
                                      config.model.framework, config.model.backbone,
                                      config.tasks, img_size)
  logging.info('Loaded the model from %s', config.model.weights)
  state = state.replace(params=dict(state.params, model=loaded['params']),
                        batch_stats=loaded['batch_stats'])
  return jax.device_put(state, built.state_sharding)


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming if possible); returns final eval results.

  One run per workdir: process 0 holds its lock (`workdir.acquire`) from before it writes
  anything there until the run ends.
  """
  mesh, built = _setup(config)
  spec = data_lib.get_dataset_spec(config.data.name)
  workdir_lib.check_writable(workdir)
  is_chief = jax.process_index() == 0
  lock = workdir_lib.acquire(workdir) if is_chief else None
  checkpointer, writer = None, None
  try:
    checkpointer = checkpointing.Checkpointer(workdir, config.checkpoint_every,
                                              config.keep_checkpoints)
    latest = checkpointer.latest_step()
    workdir_lib.check_resume(config, workdir, latest)
    state = _create_state(config, built, checkpointer)
    start_step = int(state.step)
    workdir_lib.record_start(config, workdir, latest, start_step, is_chief)
    if is_chief:
      writer = tensorboard.SummaryWriter(workdir)

    batch_sharding = sharding.batch_sharding(mesh)
    train_step = built.train_step
    train_source = pipeline.open_split(config.data, spec.train_split, config.tasks)
    mapping = workdir_lib.label_mapping_at_start(
        config, workdir, lambda: pipeline.split_ids(train_source), is_chief,
        resuming=latest is not None)
    eval_source = pipeline.open_eval_split(config)
    train_data = pipeline.train_dataset(train_source, config, start_step, mapping,
                                        regularizers.extra_views(config))
    batches = pipeline.global_batches(pipeline.numpy_batches(train_data, train_source),
                                      batch_sharding, config.data.device_prefetch)
    preemption = _Preemption(checkpointer)
    logging.info('Training %s on %s for %d steps (from %d), %d devices, global batch %d',
                 config.model.framework, spec.name, config.num_steps, start_step,
                 jax.device_count(), config.batch_size)

    pending, last_log, last_log_step = [], time.time(), start_step
    results = {}
    with jax.set_mesh(mesh), steps.count_compilations() as compilations:
      for step in range(start_step + 1, config.num_steps + 1):
        batch = next(batches)
        call_start = time.time()
        state, metrics = train_step(state, batch)
        call_seconds = time.time() - call_start
        pending.append(metrics)
        if len(pending) > MAX_STEPS_IN_FLIGHT:
          jax.block_until_ready(pending[-MAX_STEPS_IN_FLIGHT - 1])
        is_log_step = step % config.log_every == 0 or step == config.num_steps
        if step == start_step + 1 and not is_log_step:
          # Once per run, so the first line comes now rather than `log_every` steps later.
          first = jax.device_get(metrics)
          _log_first_step(step, config.num_steps, first, time.time() - last_log, call_seconds)
          _write_scalars(writer, step, first, 'train')
          last_log, last_log_step = time.time(), step  # the rates leave the compile out
        preempted = preemption.reached(step)
        evaluating = (bool(config.eval_every) and step % config.eval_every == 0
                      and step != config.num_steps)
        if is_log_step or preempted or evaluating or checkpointer.due(step):
          # The state stops changing at the streak limit (steps.train_step): stop the
          # run before that state is logged, saved or evaluated as if still training.
          pending = jax.device_get(pending)  # once: later fetches skip what is on the host
          _check_divergence(pending, step, config.max_nonfinite_streak)
        if is_log_step:
          averaged = _mean_metrics(pending)
          pending = []
          now = time.time()
          rate = (step - last_log_step) * config.batch_size / max(now - last_log, 1e-9)
          _log_progress(step, config.num_steps, averaged, rate, config.batch_size, writer)
          last_log, last_log_step = now, step
          if averaged['skipped'] > 0:
            logging.warning('step %d: skipped non-finite updates (total %d)', step,
                            int(state.nonfinite_steps))
          if compilations['jit(train_step)'] > 1:
            logging.warning('step %d: the train step compiled %d times: a batch changed shape, '
                            'dtype or sharding', step, compilations['jit(train_step)'])
        checkpointer.maybe_save(step, state, force=step == config.num_steps)
        if preempted:
          checkpointer.maybe_save(step, state, force=True)
          logging.info('SIGTERM: saved step %d, exiting', step)
          return results
        if evaluating:
          results = _evaluate_and_write(config, workdir, built.model, state, eval_source, mesh,
                                        step, writer)
      logging.info('Train step compilations in this run: %d', compilations['jit(train_step)'])
      results = _evaluate_and_write(config, workdir, built.model, state, eval_source, mesh,
                                    int(state.step), writer)
  finally:
    if checkpointer:
      checkpointer.close()  # never exit with a save still being written
    if writer:
      writer.flush()
    if lock:
      lock.release()
  return results


def _has_checkpoint(config, workdir: str) -> bool:
  if not os.path.isdir(workdir):
    return False
  checkpointer = checkpointing.Checkpointer(workdir, config.checkpoint_every,
                                            config.keep_checkpoints, read_only=True)
  try:
    return checkpointer.latest_step() is not None
  finally:
    checkpointer.close()


def restore(config, workdir: str, step: int | None = None, mesh=None):
  """Restores checkpoint `step` (default latest) of a run for inference or analysis, onto
  `mesh` (default: the config's; the notebook passes one device).

  Returns (mesh, model, trainer, state).
  """
  mesh, built = _setup(config, mesh)
  # Read-only: safe next to a run training in the same workdir; creates nothing.
  checkpointer = checkpointing.Checkpointer(workdir, config.checkpoint_every,
                                            config.keep_checkpoints, read_only=True)
  try:
    state = checkpointer.restore(
        checkpointing.abstract_like(built.abstract_state, built.state_sharding), step)
  finally:
    checkpointer.close()
  return mesh, built.model, built.trainer, state


def evaluate(config, workdir: str, step: int | None = None) -> dict[str, float]:
  """Restores checkpoint `step` (default latest) and evaluates the eval split; with no
  checkpoint in `workdir` and `config.model.weights` set, evaluates those weights as step 0
  (a converted published checkpoint, say)."""
  if config.model.weights and step is None and not _has_checkpoint(config, workdir):
    mesh, built = _setup(config)
    model, state = built.model, _load_model_weights(built.init(steps.init_key(config.seed)),
                                                    config, built)
  else:
    mesh, model, _, state = restore(config, workdir, step)
  eval_source = pipeline.open_eval_split(config)
  workdir_lib.check_writable(workdir)
  with jax.set_mesh(mesh):
    return _evaluate_and_write(config, workdir, model, state, eval_source, mesh,
                               int(state.step), None)


def run_evaluation(config, model, state, eval_source, mesh, outputs=None,
                   metrics=None) -> dict[str, float]:
  """Predicts the whole eval split and returns the pooled metrics.

  `outputs` (a `visualize.EvalOutputs`) also gets every host-local batch.
  `metrics` replaces the run's metrics (`scoring.eval_metrics`): {name: Metric}; a name
  '<task><suffix>' adds the suffix to the metric's result keys, so that one task can be
  scored several ways (say on two subsets of its images) in one pass.
  """
  batch_sharding = sharding.batch_sharding(mesh)
  predict = steps.make_predict_step(model, tuple(config.tasks), batch_sharding)
  metrics = metrics or scoring.eval_metrics(config, eval_source)
  shown = progress.Progress('evaluation', eval_source.num_examples, 'images',
                            enabled=jax.process_index() == 0)
  for batch in pipeline.numpy_batches(pipeline.eval_dataset(eval_source, config), eval_source):
    images = pipeline.to_global({'image': batch['image']}, batch_sharding)['image']
    predictions = predict(state.params['model'], state.batch_stats, images)
    local = jax.tree.map(np.asarray, multihost_utils.global_array_to_host_local_array(
        predictions, mesh, batch_sharding.spec))
    scoring.update_metrics(metrics, batch, local)
    shown.advance(int(batch['mask'].sum()) * jax.process_count())  # hosts hold equal shares
    if outputs:
      outputs.add(batch, local)
  if outputs:
    outputs.close()
  return _merge_across_hosts(metrics)


def _merge_across_hosts(metrics) -> dict[str, float]:
  """Every metric's results over all hosts, and '<task>/images': how many images each
  task was scored on (the eval JSON says so when a task is scored on a subset)."""
  results = {}
  for name, metric in metrics.items():
    if jax.process_count() > 1:
      summed = jax.tree.map(lambda x: np.sum(_allgather_exact(x), axis=0), metric.state)
      metric = type(metric).from_state(summed, metric)
    part = name[len(metric.task):]  # the name's suffix (run_evaluation)
    results.update({key + part: value for key, value in metric.result().items()})
    results[f'{metric.task}/images{part}'] = float(metric.num_images)
  return results


def _allgather_exact(x: np.ndarray) -> np.ndarray:
  """process_allgather for 64-bit arrays too (JAX would cast them to 32 bits):
  the bytes travel as uint32 words and are viewed back."""
  shape = np.shape(x)
  x = np.ascontiguousarray(np.atleast_1d(x))
  if x.dtype.itemsize == 8:
    gathered = np.asarray(multihost_utils.process_allgather(x.view(np.uint32))).view(x.dtype)
  else:
    gathered = np.asarray(multihost_utils.process_allgather(x))
  return gathered.reshape((-1,) + shape)


def _evaluate_and_write(config, workdir, model, state, eval_source, mesh, step, writer):
  start = time.time()
  outputs = visualize.EvalOutputs.from_config(config, workdir, step, writer)
  results = run_evaluation(config, model, state, eval_source, mesh, outputs)
  logging.info('Evaluated step %d in %.1fs', step, time.time() - start)
  if config.eval.delta_m_reference:  # its tasks are trained (config_lib.validate)
    delta = evaluation.delta_m_against(results, config.eval.delta_m_reference)
    if delta.value is not None:
      results['delta_m'] = delta.value
  if jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, 'eval'), exist_ok=True)
    atomic_json.write_json(os.path.join(workdir, 'eval', f'step_{step}.json'), results,
                           indent=2, sort_keys=True)
    print(f'\nEvaluation at step {step}:\n{evaluation.format_table(results)}', flush=True)
    _write_scalars(writer, step, results, 'eval')
  return results


def _mean_metrics(fetched):
  """Means of the host copies of the steps' metrics since the last log."""
  return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def _log_progress(step, total, metrics, images_per_second, batch_size, writer):
  eta = (total - step) * batch_size / max(images_per_second, 1e-9)
  _print_step(step, total, metrics,
              f'{images_per_second:.1f} img/s | ETA {progress.format_duration(eta)}')
  _write_scalars(writer, step, metrics, 'train')


def _log_first_step(step, total, metrics, seconds, call_seconds):
  """The first step's line; `call_seconds` is the train step's call, which returns once
  traced and compiled (the step itself runs asynchronously)."""
  _print_step(step, total, metrics,
              f'first step {seconds:.1f}s (compile {call_seconds:.1f}s)')


def _print_step(step, total, metrics, tail):
  losses = ' '.join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in metrics.items()
                    if k.startswith('loss/'))
  if jax.process_index() == 0:
    print(f'step {step}/{total} | {losses} | {tail}', flush=True)


def _write_scalars(writer, step, values, prefix):
  if writer:
    for key, value in values.items():
      writer.scalar(f'{prefix}/{key}', value, step)


def _check_divergence(fetched_metrics, last_step, max_streak):
  """Stops the run at the step that made `max_streak` consecutive non-finite updates.

  `fetched_metrics` are the host copies of the steps' metrics up to `last_step`.
  """
  first_step = last_step - len(fetched_metrics) + 1
  for offset, metrics in enumerate(fetched_metrics):
    if metrics['nonfinite_streak'] >= max_streak:
      losses = ', '.join(f'{k}={float(v):.4g}' for k, v in metrics.items()
                         if k.startswith('loss/'))
      raise FloatingPointError(
          f'{max_streak} consecutive non-finite steps (loss, gradient or updated state) up to '
          f'step {first_step + offset}, none of them applied; task losses: {losses}')
