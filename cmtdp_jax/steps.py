"""Train state, losses and the jitted train / predict steps.

Nothing here imports TensorFlow: benchmarks build the same steps on synthetic
in-memory batches on machines without TF.

The parameters are `{'model': ..., <regularizer's param_key>: ...}`: the predict
step (`make_predict_step`, the one training, evaluation, the benchmark and the
notebook run) only ever touches `params['model']`, so the training-only
parameters of a regularizer (`cmtdp_jax.regularizers`) cannot change what is
deployed. A regularizer that needs extra augmented views of each image gets
the model's outputs on them from the same forward pass. `setup` builds
everything of a config on a mesh, for training and the benchmark alike.
"""

from __future__ import annotations

import collections
import contextlib
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cmtdp_jax import data as data_lib
from cmtdp_jax import models
from cmtdp_jax import regularizers
from cmtdp_jax import sharding
from cmtdp_jax import tasks as tasks_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  nonfinite_steps: jax.Array  # total updates rejected as non-finite (train_step)
  nonfinite_streak: jax.Array  # consecutive ones, to stop a diverged run


@flax.struct.dataclass
class Trainer:
  """Everything static that the steps close over (not traced, not saved)."""
  model: nn.Module = flax.struct.field(pytree_node=False)
  regularizer: nn.Module | None = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  task_names: tuple[str, ...] = flax.struct.field(pytree_node=False)
  loss_weights: tuple[float, ...] = flax.struct.field(pytree_node=False)
  loss_options: Any = flax.struct.field(pytree_node=False)
  regularizer_weight: float = flax.struct.field(pytree_node=False)
  seed: int = flax.struct.field(pytree_node=False)
  max_nonfinite_streak: int = flax.struct.field(pytree_node=False)
  hold_zero_gradient: bool = flax.struct.field(pytree_node=False, default=False)
  loss_normalization: str = flax.struct.field(pytree_node=False, default='pooled')
  # The rng streams the model draws from in training ('dropout': a ViT's stochastic depth).
  model_rng_streams: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())


def _poly_decay(optim_config, steps: int):
  """(1 - t/T)^power to 0 (ATRC)."""
  return optax.polynomial_schedule(optim_config.lr, 0.0, optim_config.poly_power, steps)


def _step_decay(optim_config, steps: int):
  """lr x gamma^floor(t / step_size): PyTorch's StepLR, stepped once an epoch there
  (MTPSL: 100 epochs, 0.5), so step_size is in steps here: epochs x steps per epoch."""
  del steps
  return optax.exponential_decay(optim_config.lr, optim_config.step_size,
                                 optim_config.step_gamma, staircase=True)


# config.optim.schedule: the decay after the warm-up.
LR_SCHEDULES = {'poly': _poly_decay, 'step': _step_decay}


def learning_rate_schedule(optim_config, total_steps: int):
  """Linear warm-up, then the decay `optim_config.schedule` names (default 'poly')."""
  name = optim_config.get('schedule', 'poly')
  if name not in LR_SCHEDULES:
    raise ValueError(f"config.optim.schedule='{name}' is not one of {', '.join(LR_SCHEDULES)}")
  decay = LR_SCHEDULES[name](optim_config, max(total_steps - optim_config.warmup_steps, 1))
  if not optim_config.warmup_steps:
    return decay
  warmup = optax.linear_schedule(0.0, optim_config.lr, optim_config.warmup_steps)
  return optax.join_schedules([warmup, decay], [optim_config.warmup_steps])


OPTIMIZERS = ('sgd', 'adam', 'adamw')


def make_optimizer(optim_config, total_steps: int) -> optax.GradientTransformation:
  """SGD+momentum or Adam with coupled weight decay (wd x params added to the
  gradient) as PyTorch's SGD (SPEC) and Adam (TaskPrompter), or AdamW.

  With `grad_clip` > 0 the gradients are first scaled to a global L2 norm of
  at most `grad_clip`, as torch's `clip_grad_norm_` before `optimizer.step()`
  (so before the weight decay term); 0 = no clipping.
  """
  schedule = learning_rate_schedule(optim_config, total_steps)
  if optim_config.name == 'sgd':
    tx = optax.chain(optax.add_decayed_weights(optim_config.weight_decay),
                     optax.sgd(schedule, momentum=optim_config.momentum))
  elif optim_config.name == 'adam':
    tx = optax.chain(optax.add_decayed_weights(optim_config.weight_decay), optax.adam(schedule))
  elif optim_config.name == 'adamw':
    tx = optax.adamw(schedule, weight_decay=optim_config.weight_decay)
  else:
    raise ValueError(f"config.optim.name='{optim_config.name}' is not one of "
                     f"{', '.join(OPTIMIZERS)}")
  if optim_config.grad_clip:
    return optax.chain(optax.clip_by_global_norm(optim_config.grad_clip), tx)
  return tx


# config.optim.zero_gradient_params: what a step does to a parameter tensor whose
# gradient is exactly 0 (e.g. a task head whose task has no label in the batch, partial
# labels): 'update' moves it as optax does every parameter (momentum, weight decay);
# 'hold' keeps it (`hold_zero_gradient`).
ZERO_GRADIENT_PARAMS = ('update', 'hold')


def make_trainer(config, model, total_steps: int) -> Trainer:
  if config.optim.zero_gradient_params not in ZERO_GRADIENT_PARAMS:
    raise ValueError(f"config.optim.zero_gradient_params='{config.optim.zero_gradient_params}' "
                     f"is not one of {', '.join(ZERO_GRADIENT_PARAMS)}")
  task_names = tuple(config.tasks)
  weights = dict(config.loss_weights)
  name = regularizers.chosen_name(config)
  bottleneck = None
  if name and name != 'cmtdp':
    bottleneck = model_bottleneck(model, (1, *config.data.crop_size, 3))
  choice = regularizers.choose(config, task_names,
                               data_lib.get_dataset_spec(config.data.name).num_classes,
                               bottleneck)
  tx = make_optimizer(config.optim, total_steps)
  if choice is not None and choice.own_optimizer is not None:
    tx = with_own_optimizer(tx, choice.param_key, *choice.own_optimizer)
  return Trainer(
      model=model, regularizer=None if choice is None else choice.module,
      tx=tx, task_names=task_names,
      loss_weights=tuple(weights.get(t, tasks_lib.get_task(t).loss_weight) for t in task_names),
      loss_options={t: dict(config.loss_options.get(t, {})) for t in task_names},
      regularizer_weight=0.0 if choice is None else choice.weight, seed=int(config.seed),
      max_nonfinite_streak=int(config.max_nonfinite_streak),
      hold_zero_gradient=config.optim.zero_gradient_params == 'hold',
      loss_normalization=config.loss_normalization,
      model_rng_streams=models.rng_streams(model))


def with_own_optimizer(tx, key: str, is_own: Callable[[tuple], bool], lr: float):
  """`tx` for every parameter but those under `params[key]` for which `is_own(path)`
  (path: the keys below `key`), which get Adam at `lr` (MTPSL's FiLM tables)."""
  def labels(params):
    return {k: jax.tree_util.tree_map_with_path(
        lambda path, _, k=k: 'own' if k == key and is_own(tuple(p.key for p in path))
        else 'main', v) for k, v in params.items()}
  return optax.multi_transform({'main': tx, 'own': optax.adam(lr)}, labels)


# A framework sows its coarsest shared map here (`frameworks.sow_bottleneck`) when the
# collection is mutable: only for a regularizer with extra views, so other steps are as before.
SHARED = 'shared'


def bottleneck_of(collection) -> Any:
  """The sown bottleneck in a 'shared' collection, or None."""
  for name, value in collection.items():
    if name == 'bottleneck':
      return value[0]
    if isinstance(value, Mapping):
      found = bottleneck_of(value)
      if found is not None:
        return found
  return None


def model_bottleneck(model, image_shape) -> tuple[int, int] | None:
  """(channels, stride) of the model's sown bottleneck for images of `image_shape`."""
  def shared(images):
    variables = model.init(jax.random.key(0), images, train=False)
    return model.apply(variables, images, train=False, mutable=[SHARED])[1]
  found = bottleneck_of(jax.eval_shape(shared, jax.ShapeDtypeStruct(image_shape, jnp.float32)))
  return None if found is None else (found.shape[-1], image_shape[1] // found.shape[1])


def init_key(seed: int):
  """Key for parameter initialisation.

  The 'rbg' generator compiles several times faster than threefry on CPU for
  the hundreds of initializer calls of a model; the train step keeps the
  default generator for its sampling.
  """
  return jax.random.key(seed, impl='rbg')


def init_state(trainer: Trainer, rng, image_shape) -> TrainState:
  """Initialises model (and projector) variables for images of `image_shape`."""
  model_rng, reg_rng, sample_rng = jax.random.split(rng, 3)
  images = jnp.zeros(image_shape, jnp.float32)
  variables = trainer.model.init(model_rng, images, train=False)
  params = {'model': variables['params']}
  if trainer.regularizer is not None:
    (predictions, features), shared = trainer.model.apply(variables, images, train=False,
                                                          mutable=[SHARED])
    view = regularizers.View(predictions, features,
                             dummy_labels(trainer.task_names, image_shape),
                             bottleneck_of(shared))
    params[trainer.regularizer.param_key] = trainer.regularizer.init(
        reg_rng, (view,) * (1 + trainer.regularizer.extra_views), None, sample_rng)['params']
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, batch_stats=variables.get('batch_stats', {}),
                    opt_state=trainer.tx.init(params), nonfinite_steps=zero,
                    nonfinite_streak=zero)


class Components(NamedTuple):
  """What a run builds from its config before any array exists."""
  model: nn.Module
  trainer: Trainer
  init: Callable[[Any], TrainState]  # init_key(seed) -> a fresh state
  abstract_state: TrainState  # shapes and dtypes of `init`'s output


def build(config) -> Components:
  """Model, trainer and state initialiser of `config`; shared by training,
  evaluation, the benchmark and the notebook helpers."""
  spec = data_lib.get_dataset_spec(config.data.name)
  model = models.get_model(config.model, config.tasks, spec.num_classes)
  trainer = make_trainer(config, model, config.num_steps)
  init = functools.partial(init_state, trainer,
                           image_shape=(config.batch_size, *config.data.crop_size, 3))
  return Components(model, trainer, init, jax.eval_shape(init, init_key(config.seed)))


class Setup(NamedTuple):
  """What a run builds from its config on a mesh: training, evaluation and the benchmark."""
  model: nn.Module
  trainer: Trainer
  abstract_state: TrainState
  state_sharding: Any
  init: Callable[[Any], TrainState]  # init_key(seed) -> a fresh state, sharded
  train_step: Callable
  predict_step: Callable


def setup(config, mesh) -> Setup:
  """`build` placed on `mesh`: the state's shardings (data parallel, FSDP), its sharded
  initialiser and the jitted steps."""
  model, trainer, init, abstract = build(config)
  state_sharding = sharding.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)
  batch_sharding = sharding.batch_sharding(mesh)
  return Setup(model, trainer, abstract, state_sharding,
               jax.jit(init, out_shardings=state_sharding),
               make_train_step(trainer, state_sharding, batch_sharding,
                               sharding.replicated(mesh)),
               make_predict_step(model, tuple(config.tasks), batch_sharding))


def dummy_labels(task_names, image_shape):
  """All-invalid labels of the right shapes, for shape inference at init."""
  batch, height, width = image_shape[:3]
  labels = {}
  for task in task_names:
    kind = tasks_lib.get_task(task).label_kind
    if kind == tasks_lib.CATEGORICAL:
      labels[task] = jnp.full((batch, height, width), tasks_lib.IGNORE_LABEL, jnp.int32)
    elif kind == tasks_lib.DEPTH:
      labels[task] = jnp.zeros((batch, height, width), jnp.float32)
    else:
      labels[task] = jnp.zeros((batch, height, width, 3), jnp.float32)
  return labels


def compute_losses(trainer: Trainer, params, batch_stats, batch, rng):
  """Weighted task losses + lambda x regularizer; returns (total, (stats, metrics))."""
  extra = 0 if trainer.regularizer is None else trainer.regularizer.extra_views
  images = batch['image']
  if extra:  # one forward pass over every view, as MTPSL and JTR batch theirs
    images = jnp.concatenate([images, *(view['image'] for view in batch['views'])])
  # The model's streams are folded from the step's rng apart from the regularizer's.
  rngs = {name: jax.random.fold_in(rng, i + 1) for i, name in enumerate(trainer.model_rng_streams)}
  (predictions, features), updates = trainer.model.apply(
      {'params': params['model'], 'batch_stats': batch_stats}, images, train=True,
      mutable=['batch_stats', 'intermediates'] + ([SHARED] if extra else []), rngs=rngs)
  if extra:
    all_views = per_view(1 + extra, (predictions, features, updates[SHARED],
                                     updates.get('intermediates', {})))
    (predictions, features), updates = all_views[0][:2], {
        'batch_stats': updates['batch_stats'], 'intermediates': all_views[0][3]}
  weights = dict(zip(trainer.task_names, trainer.loss_weights))
  # Partially annotated batches say which images keep each task's label
  # (label_mapping.py); without 'labelled' every image keeps every label.
  labelled = batch.get('labelled')

  def task_loss(task, raw):
    return tasks_lib.get_task(task).compute_loss(
        raw, batch[task], trainer.loss_options[task],
        None if labelled is None else labelled[task],
        tasks_lib.image_loss_weights(trainer.loss_normalization, task, labelled,
                                     batch['image'].shape[0]))
  metrics = {}
  total = 0.0
  for task in trainer.task_names:
    loss = task_loss(task, predictions[task])
    metrics[f'loss/{task}'] = loss
    total = total + weights[task] * loss
  # Deep supervision: every sown auxiliary prediction gets its task's loss and weight.
  for key, raw in aux_predictions(updates.get('intermediates', {})).items():
    task = key.split('/', 1)[0]
    loss = task_loss(task, raw)
    metrics[f'aux_loss/{key}'] = loss
    total = total + weights[task] * loss
  if trainer.regularizer is not None:
    views = [regularizers.View(predictions, features, {t: batch[t] for t in trainer.task_names})]
    if extra:
      views = [regularizers.View(p, f, {t: labels[t] for t in trainer.task_names},
                                 bottleneck_of(shared))
               for (p, f, shared, _), labels in zip(all_views, [batch, *batch['views']])]
    reg_loss, diagnostics = trainer.regularizer.apply(
        {'params': params[trainer.regularizer.param_key]}, tuple(views), labelled, rng)
    key = trainer.regularizer.param_key
    metrics[f'loss/{key}'] = reg_loss
    metrics.update({f'{key}/{k}': v for k, v in diagnostics.items()})
    total = total + trainer.regularizer_weight * reg_loss
  metrics['loss/total'] = total
  return total, (updates['batch_stats'], metrics)


def per_view(num_views: int, tree):
  """`tree`'s arrays (batch-major over `num_views` stacked views) split into one tree
  per view."""
  size = jax.tree.leaves(tree)[0].shape[0] // num_views
  return [jax.tree.map(lambda x, i=i: x[i * size:(i + 1) * size], tree)
          for i in range(num_views)]


def aux_predictions(intermediates) -> dict[str, jax.Array]:
  """Flattens every `sow('intermediates', 'aux_predictions', {...})` of a model."""
  found = {}
  for name, value in intermediates.items():
    if name == 'aux_predictions':
      for sown in value:
        found.update(sown)
    elif isinstance(value, Mapping):
      found.update(aux_predictions(value))
  return found


def hold_zero_gradient(tx, grads, state: TrainState, params, opt_state, batch_stats):
  """The new (params, opt_state, batch_stats) with what a zero gradient leaves as it was.

  As PyTorch's optimizers skip a parameter whose `.grad` is None, a parameter tensor
  whose gradient is exactly 0 everywhere keeps its value and its optimizer state
  (momentum or moments; no weight decay), and a BatchNorm whose scale and bias got
  none keeps its running statistics: a head whose task has no label in the batch,
  and that nothing else reaches, does not move. Unlike PyTorch's per-parameter step
  counts, optax's one count (Adam's bias correction, the schedule) still advances.
  """
  moved = jax.tree.map(lambda g: jnp.any(g != 0), grads)
  pick = lambda keep_new, new, old: jnp.where(keep_new, new, old)
  params = jax.tree.map(pick, moved, params, state.params)
  opt_moved = optax.tree_utils.tree_map_params(
      tx, lambda _, m: m, opt_state, moved,
      transform_non_params=lambda value: jax.tree.map(lambda _: True, value))
  opt_state = jax.tree.map(pick, opt_moved, opt_state, state.opt_state)
  moved_params = flax.traverse_util.flatten_dict(moved['model'])
  def stats_moved(path):
    module = path[:-1]  # (..., 'mean' | 'var') -> the BatchNorm's params, if it has any
    flags = [moved_params[module + (n,)] for n in ('scale', 'bias') if module + (n,) in
             moved_params]
    return functools.reduce(jnp.logical_or, flags) if flags else True
  stats_flags = flax.traverse_util.unflatten_dict(
      {path: stats_moved(path) for path in flax.traverse_util.flatten_dict(batch_stats)})
  batch_stats = jax.tree.map(pick, stats_flags, batch_stats, state.batch_stats)
  return params, opt_state, batch_stats


def train_step(trainer: Trainer, state: TrainState, batch):
  """One optimizer step (`make_optimizer`: SGD, Adam or AdamW) that never makes the
  state non-finite, so no checkpoint holds NaN.

  An update whose loss, gradient or new state (parameters, optimizer state, BN
  statistics) is not finite is rejected: the state stays as it was and the
  rejection is counted. Once `max_nonfinite_streak` consecutive updates were
  rejected the state stops changing altogether (its step too), so the loop can
  read the streak only when it fetches metrics anyway and still stop the run
  at exactly the step that reached the limit.
  """
  rng = jax.random.fold_in(jax.random.key(trainer.seed), state.step)
  grad_fn = jax.value_and_grad(compute_losses, argnums=1, has_aux=True)
  (loss, (batch_stats, metrics)), grads = grad_fn(trainer, state.params, state.batch_stats,
                                                  batch, rng)
  updates, opt_state = trainer.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if trainer.hold_zero_gradient:
    params, opt_state, batch_stats = hold_zero_gradient(trainer.tx, grads, state, params,
                                                        opt_state, batch_stats)
  # One norm per tree instead of a reduction and a branch per leaf: the latter
  # compiles many times slower on XLA:CPU. A squared norm that overflows float32
  # counts as non-finite, which also rejects finite garbage (parameters of 1e30).
  grad_norm = optax.global_norm(grads)
  new_state_norm = optax.global_norm([x for x in jax.tree.leaves((params, opt_state, batch_stats))
                                      if jnp.issubdtype(x.dtype, jnp.inexact)])
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(new_state_norm)
  running = state.nonfinite_streak < trainer.max_nonfinite_streak
  accept = finite & running
  rejected = (running & ~finite).astype(jnp.int32)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(accept, n, o), new, old)
  streak = jnp.where(accept, 0, state.nonfinite_streak + rejected)
  metrics['grad_norm'] = grad_norm
  metrics['skipped'] = 1.0 - finite.astype(jnp.float32)
  metrics['nonfinite_streak'] = streak
  return TrainState(
      step=state.step + running.astype(jnp.int32),
      params=keep(params, state.params),
      batch_stats=keep(batch_stats, state.batch_stats),
      opt_state=keep(opt_state, state.opt_state),
      nonfinite_steps=state.nonfinite_steps + rejected,
      nonfinite_streak=streak), metrics


@contextlib.contextmanager
def count_compilations():
  """Yields a Counter of XLA compilations per jitted function name, e.g. 'jit(train_step)'.

  A step that compiles more than once (a changed shape, dtype or sharding)
  silently costs a compile per change; the loop and the benchmark check this.
  """
  counts = collections.Counter()

  def listener(event, duration_secs, **kwargs):
    del duration_secs
    if event == '/jax/core/compile/backend_compile_duration':
      counts[kwargs.get('fun_name', '?')] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counts
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def make_train_step(trainer: Trainer, state_sharding, batch_sharding, replicated):
  """The jitted train step with explicit shardings; the old state is donated."""
  return jax.jit(functools.partial(train_step, trainer),
                 in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, replicated),
                 donate_argnums=(0,))


def predict(model: nn.Module, task_names, model_params, batch_stats, images):
  """Inference: task-space predictions; never builds the regularizer."""
  predictions, _ = model.apply({'params': model_params, 'batch_stats': batch_stats},
                               images, train=False)
  return {t: tasks_lib.get_task(t).decode(predictions[t]) for t in task_names}


@functools.lru_cache(maxsize=8)
def make_predict_step(model, task_names, batch_sharding=None):
  """The jitted predict step: (model params, BN statistics, images) -> {task: prediction}.

  Parameters keep the shardings they were committed with (replicated or FSDP); the
  predictions are sharded like the batch. Cached, so that every evaluation of a run
  reuses one compiled step.
  """
  placed = {} if batch_sharding is None else {'out_shardings': batch_sharding}
  return jax.jit(functools.partial(predict, model, tuple(task_names)), **placed)
