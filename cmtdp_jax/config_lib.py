"""The base config every file in `configs/` starts from, its validation, and the
command-line parsing of `--config FILE` and its overrides (one line per error), with which
every absl command runs (`run`).

Config files override what differs (dataset, model, schedule); every field
used anywhere in the code has its default here, so `--config.x=y` overrides
are type-checked by ml_collections and unknown fields are rejected.
"""

from __future__ import annotations

import atexit
import dataclasses
import difflib
import gc
import importlib.util
import os
import sys
import traceback

import ml_collections
from absl import app
from absl import flags
from absl import logging

from cmtdp_jax import contrastive
from cmtdp_jax import data as data_lib
from cmtdp_jax import label_mapping
from cmtdp_jax import regularizers
from cmtdp_jax import tasks as tasks_lib
from cmtdp_jax.models.backbones import BACKBONES


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.tasks = tasks_lib.ALL

  config.data = ml_collections.ConfigDict()
  config.data.name = 'synthetic'
  config.data.data_dir = ''  # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  config.data.manual_dir = ''  # real datasets: raw folder, prepared on first use ('' = prepared)
  config.data.packaging = ''  # nyud: 'nyud_mt' or 'nyudv2'; '' = detect from the folder
  config.data.image_size = (96, 96)  # synthetic only
  config.data.num_train = 1000  # synthetic only
  config.data.num_eval = 200  # synthetic only
  config.data.dataset_seed = 0  # synthetic only
  config.data.crop_size = (96, 96)
  config.data.eval_split = ''  # '' = the dataset's validation split (e.g. 'test_new')
  config.data.eval_crop_size = ()  # () = crop_size; padding is ignored by the metrics
  config.data.cache = True
  config.data.shuffle_buffer = 1000
  config.data.prefetch = 2  # host-side tf.data batches
  config.data.device_prefetch = 2  # batches already on the devices while a step runs
  config.data.threads = 0  # 0 = tf.data default
  config.data.image_normalization = 'imagenet'  # augment.IMAGE_NORMALIZATIONS
  config.data.augment = ml_collections.ConfigDict()
  config.data.augment.name = 'atrc'  # augment.AUGMENTATIONS
  config.data.augment.scales = (1.0, 1.2, 1.5)  # 'mtan_scale_crop' only
  config.data.augment.min_scale = 0.5
  config.data.augment.max_scale = 2.0
  config.data.augment.cat_max_ratio = 0.75
  config.data.augment.flip = True
  config.data.augment.photometric = True
  # PASCAL: a crop without any part pixel gets all-ignore human_parts labels (ATRC).
  config.data.augment.parts_need_person = False
  # Partially annotated training (label_mapping.py): which tasks each training image
  # keeps, '' (all), 'one_label' or 'random' (each task with probability label_fraction, at
  # least one), drawn from partial_labels_seed (not config.seed); or label_mapping = a JSON
  # file {image_id: [tasks]}. The run's mapping is written to <workdir>/label_mapping.json.
  config.data.partial_labels = ''
  config.data.label_fraction = 0.5
  config.data.partial_labels_seed = 0
  config.data.label_mapping = ''
  # A positive control: fill a missing label from another kept one by a relation the dataset
  # guarantees (its builder's LABEL_DERIVATIONS; synthetic: 'sal_from_semseg'); '' = none.
  config.data.derive_labels = ''

  config.model = ml_collections.ConfigDict()
  config.model.framework = 'baseline'
  config.model.backbone = 'compact'
  config.model.backbone_kwargs = ml_collections.ConfigDict({'width': 16, 'blocks': 1})
  # The backbone the backbone_kwargs are written for ('' = any): another backbone, e.g.
  # --config.model.backbone=vit_s16 on a compact config, is built without them.
  config.model.backbone_kwargs_for = 'compact'
  config.model.head_channels = ml_collections.FieldReference(None, field_type=int)
  config.model.dtype = 'float32'  # compute dtype; params stay float32
  # Recompute the backbone's blocks in the backward pass: less activation memory for
  # about one more forward pass of compute (HRNet-48 at large batches).
  config.model.remat = False
  # .npz from `python -m cmtdp_jax.tools.convert_weights`, loaded into the backbone of a
  # fresh run (not on resume).
  config.model.pretrained = ''
  # .npz of a whole model from `convert_weights --framework` (InvPT's released checkpoints):
  # a fresh run starts from it (not on resume); --mode=eval without a checkpoint in the
  # workdir evaluates it as step 0.
  config.model.weights = ''

  # Per-task overrides of the SPEC loss weights and loss options.
  config.loss_weights = ml_collections.ConfigDict()
  config.loss_options = ml_collections.ConfigDict({'edge': {'pos_weight': 0.95}})
  # tasks.LOSS_NORMALIZATIONS: 'pooled' (ours), 'per_image' (MTPSL, JTR),
  # 'per_image_balanced' (DiffusionMTL).
  config.loss_normalization = 'pooled'

  config.contrastive = ml_collections.ConfigDict(
      dataclasses.asdict(contrastive.ContrastiveConfig()))
  # The cross-task regularizer by name (regularizers/__init__.py): '' (none, unless
  # contrastive.enable), 'cmtdp' (ours; options in config.contrastive), 'mtpsl', 'jtr'; its
  # weight (None = the method's published one: contrastive.weight for ours, 2.0 MTPSL, 1.0
  # JTR) and each method's options.
  config.regularizer = regularizers.regularizer_config()

  config.optim = ml_collections.ConfigDict()
  config.optim.name = 'sgd'
  config.optim.lr = 0.01
  config.optim.momentum = 0.9
  config.optim.weight_decay = 5e-4
  config.optim.schedule = 'poly'  # steps.LR_SCHEDULES: 'poly' or 'step'
  config.optim.poly_power = 0.9
  config.optim.step_size = 0  # 'step': decay every step_size steps ...
  config.optim.step_gamma = 0.5  # ... by this factor
  config.optim.warmup_steps = 0
  config.optim.grad_clip = 0.0  # max global L2 norm of the gradients; 0 = no clipping
  # A parameter tensor whose gradient is exactly 0 (a head whose task has no label in the
  # batch under partial labels, with nothing else reaching it): 'update' (optax: momentum
  # and weight decay move it anyway) or 'hold' (as PyTorch skips a grad of None; its
  # BatchNorm statistics are held too). steps.hold_zero_gradient.
  config.optim.zero_gradient_params = 'update'

  config.batch_size = 8  # global, over all hosts and devices
  config.eval_batch_size = 8
  config.num_steps = 40_000
  config.log_every = 50
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  config.eval_every = 0  # 0 = only at the end
  config.max_nonfinite_streak = 20  # stop after this many consecutive NaN steps
  # Resume even if a field of RESUME_FIXED changed since the checkpoint's run.
  config.allow_config_change = False

  config.eval = ml_collections.ConfigDict()
  # Per-task options of evaluation.make_metric (num_classes comes from the dataset). The
  # edge metric's are all here, so that --config.eval.metric_options.edge.X=... can set them
  # (README "Evaluation"); thresholds: the protocol's unless a config file sets a number.
  config.eval.metric_options = ml_collections.ConfigDict({'edge': {
      'max_dist': 0.011, 'protocol': 'seism', 'matcher': 'exact', 'ap': 'seism', 'workers': 1}})
  # Score `subset_tasks` only on the eval images that are also in split `subset_split`
  # ('' = all of them); PASCAL: edges on SEISM's test_new, the other tasks on all of val.
  config.eval.subset_split = ''
  config.eval.subset_tasks = ('edge',)
  # Edges are scored against 'label' (the training label) or 'seism' (PASCAL-Context:
  # SEISM's boundaries of the context LabelMap, pipeline.EDGE_GROUND_TRUTHS).
  config.eval.edge_ground_truth = 'label'
  # Also write delta_m (percent) against this named single-task reference, e.g.
  # 'mtpsl_nyuv2_onelabel' (evaluation.DELTA_M_REFERENCES); '' = none.
  config.eval.delta_m_reference = ''
  # Extra outputs under <workdir>/eval/step_<N>/ (evaluation/visualize.py):
  config.eval.save_predictions = False  # predictions/<index>.npz, task-space, unpadded
  config.eval.num_visualize = 0  # vis/<index>.png grids (+ TensorBoard) of the first N images
  config.eval.export_edges = False  # edges/<index>.png, 8-bit probabilities for SEISM

  # --mode=analyze (analysis.py): the paper's Figure 1 on eval batches.
  config.analysis = ml_collections.ConfigDict()
  config.analysis.num_batches = 4  # eval batches whose triplets are measured
  config.analysis.bins = 40  # histogram bins per (target, source) panel
  config.analysis.seed = 0  # triplet sampling

  config.mesh = ml_collections.ConfigDict()
  config.mesh.axes = ('data',)  # add 'fsdp' to shard parameters, e.g. ('data', 'fsdp')
  config.mesh.shape = (-1,)  # one size per axis; one -1 takes the remaining devices
  config.mesh.fsdp_min_size = 2 ** 14  # smaller arrays stay replicated
  return config


def parse_flags(argv):
  """absl's flag parsing, with one line (exit status 2) for a command-line or config-file
  error: a config file that is missing or fails to load, an unknown `--config.<field>`,
  a bad flag value."""
  config_file = _config_argument(argv[1:])
  try:
    config = None if config_file is None else load_config_file(config_file)
  except ValueError as e:
    _usage_error(str(e))
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError) as e:
    message = config is not None and _unknown_override(config, argv[1:])
    if message:
      _usage_error(message)
    if isinstance(e, flags.Error):
      _usage_error(f'{e} (--help lists the flags)')
    raise


def run(main) -> None:
  """`app.run(main)` with `parse_flags`, and a quick exit. At exit the interpreter's last
  garbage collections walk every object that TensorFlow and JAX made: 2.3 s of each
  TensorFlow process's exit (docs/tests.md), paid by every command and by each of the
  suite's CLI runs. `gc.freeze()` as the first exit handler registered, so the last to run,
  leaves those objects to the OS; the handlers registered after it (Orbax's,
  jax.distributed's) run before it, and the files are closed by then."""
  atexit.register(gc.freeze)
  app.run(main, flags_parser=parse_flags)


def _usage_error(message: str):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _config_argument(args) -> str | None:
  """The value of the last `--config` flag in `args`, if any."""
  config_file = None
  for i, arg in enumerate(args):
    if arg == '--config' and i + 1 < len(args):
      config_file = args[i + 1]
    elif arg.startswith('--config='):
      config_file = arg.removeprefix('--config=')
  return config_file


def _unknown_override(config, args):
  """The error of the first `--config.<path>` in `args` that names no field of `config`."""
  for arg in args:
    path = arg.split('=', 1)[0].removeprefix('--no').removeprefix('--')
    message = path.startswith('config.') and unknown_field(
        config, path.removeprefix('config.'))
    if message:
      return message
  return None


def load_config_file(argument: str) -> ml_collections.ConfigDict:
  """The config of `--config FILE[:VARIANT]`, as ml_collections builds it.

  Raises ValueError with one line naming the file (and the line, for an error in
  it) where ml_collections prints a traceback (or, for a missing file, fails
  only at the config's first use).
  """
  path, _, variant = argument.partition(':')
  flag = f'--config {argument}'
  if not os.path.isfile(path):
    problem = 'is not a file' if os.path.exists(path) else 'no such file'
    raise ValueError(f'{flag}: {problem} (working directory {os.getcwd()})')
  try:
    spec = importlib.util.spec_from_file_location('cmtdp_jax_config_file', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  except SyntaxError as e:
    elsewhere = os.path.abspath(e.filename or path) != os.path.abspath(path)
    raise ValueError(f'{flag}: {e.filename + " " if elsewhere else ""}line {e.lineno}: '
                     f'{e.msg}') from None
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise ValueError(f'{flag}: {_error_in_file(e, path)}') from None
  if not callable(getattr(module, 'get_config', None)):
    raise ValueError(f'{flag}: the file defines no get_config()')
  try:
    config = module.get_config(*([variant] if variant else []))
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise ValueError(f'{flag}: get_config() raised {_error_in_file(e, path)}') from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f'{flag}: get_config() returned {type(config).__name__}, '
                     'not a ConfigDict')
  return config


def _error_in_file(error: Exception, path: str) -> str:
  """'Type: message (line N)', N the innermost line of `path` the error passed through."""
  lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
           if os.path.abspath(frame.filename) == os.path.abspath(path)]
  return f'{type(error).__name__}: {error}' + (f' (line {lines[-1]})' if lines else '')


def unknown_field(config, path: str) -> str | None:
  """The one-line error for `--config.<path>=...` when `path` is no field, else None.

  Suggests the closest field, by its last name first (`model.widht` ->
  `model.backbone_kwargs.width`), then by the whole path.
  """
  node = config
  for name in path.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      break
    node = node[name]
  else:
    return None
  fields = list(_field_paths(config))
  leaf = path.rpartition('.')[2]
  by_leaf = {f: difflib.SequenceMatcher(None, leaf, f.rpartition('.')[2]).ratio() for f in fields}
  best = max(fields, key=lambda f: (by_leaf[f], difflib.SequenceMatcher(None, path, f).ratio()))
  closest = ([best] if by_leaf[best] >= 0.75 else
             difflib.get_close_matches(path, fields, n=1, cutoff=0.75))
  hint = (f'did you mean config.{closest[0]}?' if closest else
          'python -m cmtdp_jax.main --config FILE --mode=print_config lists the fields')
  return f'--config.{path}: config has no field {path!r}; {hint}'


def _field_paths(config, prefix=''):
  for name, value in config.items():
    yield prefix + name
    if isinstance(value, ml_collections.ConfigDict):
      yield from _field_paths(value, f'{prefix}{name}.')


def _check_metric_options(config) -> None:
  """Builds every trained task's metric once, so that a bad option (an unknown edge
  protocol, a misspelt name) stops the run now rather than at its first evaluation."""
  from cmtdp_jax import evaluation  # pylint: disable=import-outside-toplevel
  for task in config.eval.metric_options:
    if task in config.tasks:
      try:
        evaluation.make_metric(task, **evaluation.metric_options(config, task))
      except (TypeError, ValueError) as e:
        raise ValueError(f'config.eval.metric_options.{task}: {e}') from None


def _check_delta_m_reference(config) -> None:
  """A named delta_m reference exists and the run trains every task it scores."""
  name = config.eval.delta_m_reference
  if not name:
    return
  from cmtdp_jax import evaluation  # pylint: disable=import-outside-toplevel
  if name not in evaluation.DELTA_M_REFERENCES:
    raise ValueError(f"config.eval.delta_m_reference='{name}' is not '' or a known reference "
                     f"({', '.join(evaluation.DELTA_M_REFERENCES)})")
  absent = [t for t in evaluation.DELTA_M_REFERENCES[name].tasks if t not in config.tasks]
  if absent:
    raise ValueError(f"config.eval.delta_m_reference='{name}' scores {', '.join(absent)}, "
                     f'which config.tasks {tuple(config.tasks)} does not train')


def validate(config, num_devices: int) -> None:
  """One-line errors for inconsistent configs, before anything compiles."""
  for task in config.tasks:
    tasks_lib.get_task(task)
  if not config.tasks:
    raise ValueError('config.tasks is empty')
  repeated = sorted({t for t in config.tasks if list(config.tasks).count(t) > 1})
  if repeated:
    raise ValueError(f'config.tasks {tuple(config.tasks)} names {", ".join(repeated)} '
                     'more than once')
  data_lib.get_dataset_spec(config.data.name)
  for field in ('loss_weights', 'loss_options'):
    for task in config[field]:
      if task not in tasks_lib.TASKS:  # a typo is an error ...
        raise ValueError(f"config.{field}.{task} names an unknown task; valid tasks: "
                         f"{', '.join(tasks_lib.TASKS)}")
      if task not in config.tasks:  # ... an untrained task only a note: defaults name them
        logging.info("config.%s.%s is ignored: '%s' is not in config.tasks %s", field, task,
                     task, tuple(config.tasks))
  _check_metric_options(config)
  _check_delta_m_reference(config)
  contrastive.ContrastiveConfig.from_dict(config.contrastive)
  regularizers.chosen_name(config)
  if config.contrastive.enable and len(config.tasks) < 2:
    raise ValueError('config.contrastive.enable needs at least two tasks in config.tasks')
  for name in ('batch_size', 'eval_batch_size'):
    value = config[name]
    if value <= 0 or value % num_devices:
      raise ValueError(f'config.{name}={value} is not a positive multiple of the '
                       f'{num_devices} data-parallel devices')
  unknown_axes = set(config.mesh.axes) - {'data', 'fsdp'}
  if unknown_axes:
    raise ValueError(f'config.mesh.axes {tuple(config.mesh.axes)} has unknown axes '
                     f'{sorted(unknown_axes)}; valid: data, fsdp')
  for name in ('prefetch', 'device_prefetch'):
    if config.data[name] < 0:
      raise ValueError(f'config.data.{name}={config.data[name]} must be >= 0')
  if config.optim.grad_clip < 0:
    raise ValueError(f'config.optim.grad_clip={config.optim.grad_clip} must be >= 0 '
                     '(0 = no clipping)')
  if config.model.weights and config.model.pretrained:
    raise ValueError('config.model.weights (a whole model) and config.model.pretrained (its '
                     'backbone) are both set: give one')
  if config.model.backbone_kwargs_for and config.model.backbone_kwargs_for not in BACKBONES:
    raise ValueError(f"config.model.backbone_kwargs_for='{config.model.backbone_kwargs_for}' "
                     f"is not '' or a backbone ({', '.join(sorted(BACKBONES))})")
  if config.num_steps <= 0:
    raise ValueError(f'config.num_steps={config.num_steps} must be positive')
  if config.max_nonfinite_streak <= 0:  # 0 would freeze the state before the first step
    raise ValueError(f'config.max_nonfinite_streak={config.max_nonfinite_streak} must be '
                     'positive')
  height, width = config.data.crop_size
  if height < 32 or width < 32:
    raise ValueError(f'config.data.crop_size {tuple(config.data.crop_size)} is smaller '
                     'than the output stride 32')
  label_mapping.check_config(config.data)
  if config.loss_normalization not in tasks_lib.LOSS_NORMALIZATIONS:
    raise ValueError(f"config.loss_normalization: unknown '{config.loss_normalization}' "
                     f"(valid: {', '.join(tasks_lib.LOSS_NORMALIZATIONS)})")
  if config.optim.schedule == 'step' and config.optim.step_size <= 0:
    raise ValueError('config.optim.schedule=step needs config.optim.step_size > 0 (steps '
                     'between decays)')
  augment = config.data.augment
  if not 0 < augment.min_scale <= augment.max_scale:
    raise ValueError(f'config.data.augment scales ({augment.min_scale}, {augment.max_scale}) '
                     'must satisfy 0 < min_scale <= max_scale')


# Fields a resumed run must share with the run that wrote its checkpoint: with
# another batch size, dataset, task list or model it would not continue that run.
# 'data' includes the partial-label fields: a resume trains on <workdir>/label_mapping.json
# (label_mapping.resume_free_fields: those whose change leaves that file's mapping as it was).
RESUME_FIXED = ('batch_size', 'tasks', 'data', 'model')
# ... except those that only say where the data lives, how fast it is read, what
# evaluation uses, or what only a fresh run loads.
RESUME_FREE = ('data.data_dir', 'data.manual_dir', 'data.cache', 'data.prefetch',
               'data.device_prefetch', 'data.threads', 'data.eval_split', 'data.eval_crop_size',
               'model.remat', 'model.pretrained', 'model.weights')


class _Absent:
  def __repr__(self):
    return '<absent>'


ABSENT = _Absent()  # the value of a field that a config (e.g. an older run's) lacks


def changed_fields(old: dict, new: dict, prefix: str = '', defaults: dict | None = None):
  """Yields (field, old value, new value) for every leaf that differs between two
  configs as JSON dicts (`ABSENT` for a field one of them lacks). A field `old`
  lacks takes its value in `defaults` (e.g. `base_config()` as JSON) where that has
  it: a run older than the field ran with the behaviour its default keeps."""
  defaults = defaults if isinstance(defaults, dict) else {}
  for name in sorted(set(old) | set(new)):
    a, b = old.get(name, defaults.get(name, ABSENT)), new.get(name, ABSENT)
    if isinstance(a, dict) and isinstance(b, dict):
      yield from changed_fields(a, b, f'{prefix}{name}.', defaults.get(name))
    elif a != b and name != 'allow_config_change':
      yield f'{prefix}{name}', a, b


def fixed_on_resume(field: str) -> bool:
  within = lambda names: any(field == n or field.startswith(n + '.') for n in names)
  return within(RESUME_FIXED) and not within(RESUME_FREE)
