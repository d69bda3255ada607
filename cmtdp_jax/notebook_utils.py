"""Helpers of `launch/colab_reproduce.ipynb`, kept here so the cells stay short.

The notebook's parameters become a config (`build_config`), a raw dataset
folder becomes a prepared TFDS dataset (`prepare_dataset`), a finished run's
checkpoint gives predictions for a few eval images (`load_predictor`,
`eval_examples`), drawn with each task's `colourize` (`plot_predictions`), and
two runs' results become a side-by-side table with delta_m (`comparison`).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from typing import Mapping, Sequence

import jax
import ml_collections
import numpy as np

from cmtdp_jax import config_lib
from cmtdp_jax import evaluation
from cmtdp_jax import steps
from cmtdp_jax import tasks as tasks_lib
from cmtdp_jax.evaluation import report

REAL_DATASETS = ('nyud', 'pascal_context')
# Config file prefix and backbone short name of configs/<prefix>_<short>_<framework>.py.
CONFIG_PREFIX = {'nyud': 'nyud', 'pascal_context': 'pascal'}
BACKBONE_SHORT = {'hrnet_w18_small_v2': 'hrnet18', 'hrnet_w48': 'hrnet48'}
DEFAULT_REAL_BACKBONE = 'hrnet_w18_small_v2'


def repo_root() -> str:
  """The checkout holding `cmtdp_jax/` and `configs/` (an editable install)."""
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_dataset(dataset: str, data_folder: str) -> str:
  """The dataset to train on: a real one needs its folder, else the synthetic world."""
  valid = ('synthetic',) + REAL_DATASETS
  if dataset not in valid:
    raise ValueError(f"DATASET '{dataset}' is not one of {', '.join(valid)}")
  if dataset == 'synthetic':
    return dataset
  if not data_folder:
    print(f"DATASET='{dataset}' but DATA_FOLDER is empty: using the synthetic world instead. "
          f'Set DATA_FOLDER to the {dataset} folder (e.g. on Google Drive) to train on it.')
    return 'synthetic'
  if not os.path.isdir(data_folder):
    raise FileNotFoundError(f'DATA_FOLDER {data_folder} is not a folder (is Google Drive '
                            'mounted, and is the path right?)')
  return dataset


def prepare_dataset(dataset: str, src: str, data_dir: str = '') -> bool:
  """Runs `python -m cmtdp_jax.data.prepare`, streaming its output into the notebook.

  Returns False (after saying why) when this checkout has no such command;
  training then prepares the dataset itself on first use from
  `config.data.manual_dir`. Raises RuntimeError when preparation fails.
  """
  if importlib.util.find_spec('cmtdp_jax.data.prepare') is None:
    print('This checkout has no `cmtdp_jax.data.prepare` command: skipping the separate '
          f'preparation step; training prepares {dataset} from {src} on first use.')
    return False
  command = [sys.executable, '-m', 'cmtdp_jax.data.prepare', '--dataset', dataset,
             '--src', src]
  if data_dir:
    command += ['--data_dir', data_dir]
  print('$', ' '.join(command), flush=True)
  # The kernel's own stdout is not the notebook's: relay the child's lines.
  with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True, cwd=repo_root()) as process:
    for line in process.stdout:
      print(line, end='', flush=True)
  if process.returncode:
    raise RuntimeError(f'preparing {dataset} from {src} failed (exit {process.returncode}); '
                       'the line above names the problem')
  return True


def build_config(dataset: str = 'synthetic', *, full_protocol: bool = False,
                 num_steps: int = 500, backbone: str = '', framework: str = 'baseline',
                 tiny: bool = False, data_folder: str = '', data_dir: str = '',
                 pretrained: str = '', seed: int = 0,
                 overrides: Mapping[str, object] | None = None):
  """The run's config from the notebook's parameters.

  synthetic: `configs/synthetic.py` (`:smoke` with `tiny`); its own schedule
  with `full_protocol`, else `num_steps` steps. nyud / pascal_context: the
  ATRC protocol config `configs/<dataset>_<backbone>_<framework>.py` (default
  backbone HRNet-W18-small-v2); `num_steps` steps unless `full_protocol`.
  `overrides` maps dotted config fields to values, e.g. {'batch_size': 4}.
  """
  if dataset == 'synthetic':
    config = config_lib.load_config_file(
        os.path.join(repo_root(), 'configs', 'synthetic.py') + (':smoke' if tiny else ''))
    if backbone and backbone != config.model.backbone:
      config.model.backbone = backbone
      # The compact backbone's kwargs fit no other.
      config.model.backbone_kwargs = ml_collections.ConfigDict()
  elif dataset in REAL_DATASETS:
    config = _protocol_config(dataset, backbone or DEFAULT_REAL_BACKBONE, framework)
  else:
    raise ValueError(f"unknown dataset '{dataset}'; valid: synthetic, "
                     f"{', '.join(REAL_DATASETS)}")
  config.model.framework = framework
  if not full_protocol:
    _shorten(config, num_steps)
  config.seed = seed
  config.data.data_dir = data_dir
  if dataset in REAL_DATASETS:
    config.data.manual_dir = data_folder
  if pretrained:
    config.model.pretrained = pretrained
  if overrides:
    config.update_from_flattened_dict(dict(overrides))
  return config


def _protocol_config(dataset, backbone, framework):
  short = BACKBONE_SHORT.get(backbone)
  path = os.path.join(repo_root(), 'configs',
                      f'{CONFIG_PREFIX[dataset]}_{short}_{framework}.py')
  if short and os.path.isfile(path):
    return config_lib.load_config_file(path)
  # No file for this combination: the same protocol, built directly.
  from cmtdp_jax import protocol  # pylint: disable=import-outside-toplevel
  config = protocol.protocol_config(dataset, backbone, 'baseline')
  config.model.framework = framework
  return config


def _shorten(config, num_steps):
  """A `num_steps` schedule: warmup, logging and checkpoints scaled to fit."""
  if num_steps <= 0:
    raise ValueError(f'NUM_STEPS={num_steps} must be positive')
  config.num_steps = num_steps
  config.optim.warmup_steps = min(config.optim.warmup_steps, num_steps // 10)
  config.log_every = max(1, min(config.log_every, num_steps // 10))
  config.checkpoint_every = num_steps  # only the final state is needed
  config.eval_every = 0


def with_regularizer(config, weight: float | None = None):
  """A copy of `config` with the cross-task contrastive regularizer on."""
  regularized = copy.deepcopy(config)
  regularized.contrastive.enable = True
  if weight is not None:
    regularized.contrastive.weight = weight
  return regularized


def run_name(config) -> str:
  name = f'{config.data.name}_{config.model.backbone}_{config.model.framework}'
  name += f'_{config.num_steps}steps'
  return name + ('_contrastive' if config.contrastive.enable else '')


def load_predictor(config, workdir: str):
  """(predict(images) -> {task: decoded map}) from the latest checkpoint in `workdir`,
  restored as evaluation restores it, onto one device (plenty for a few images, whatever
  mesh trained the model)."""
  from cmtdp_jax import train  # pylint: disable=import-outside-toplevel  # imports TensorFlow
  one_device = jax.sharding.Mesh(np.array(jax.local_devices()[:1]), ('data',))
  _, model, _, state = train.restore(config, workdir, mesh=one_device)
  apply = steps.make_predict_step(model, tuple(config.tasks))

  def predict(images):
    out = apply(state.params['model'], state.batch_stats, images)
    return {task: np.asarray(value) for task, value in out.items()}
  return predict


def eval_examples(config, num: int) -> dict[str, np.ndarray]:
  """The first `num` real examples of the eval split, as the eval step sees them."""
  from cmtdp_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  source = pipeline.open_eval_split(config)
  keys = ('image', 'size', 'offset') + tuple(config.tasks)
  collected = {k: [] for k in keys}
  count = 0
  for batch in pipeline.eval_dataset(source, config).as_numpy_iterator():
    real = batch['mask']
    for k in keys:
      collected[k].append(batch[k][real])
    count += int(real.sum())
    if count >= num:
      break
  return {k: np.concatenate(v)[:num] for k, v in collected.items()}


def colourize_together(task: str, maps: Sequence[np.ndarray]) -> list[np.ndarray]:
  """Colours maps of one task on one scale (depth: a shared maximum)."""
  spec = tasks_lib.get_task(task)
  maps = [np.asarray(m) for m in maps]
  if spec.label_kind == tasks_lib.CATEGORICAL and spec.channels == 1:
    # sal/edge ground truth: show ignored pixels as background, not as positives.
    maps = [np.where(m == tasks_lib.IGNORE_LABEL, 0, m) if m.dtype.kind in 'iu' else m
            for m in maps]
  return list(spec.colourize(np.stack(maps)))


def plot_predictions(examples: Mapping[str, np.ndarray],
                     predictions: Mapping[str, Mapping[str, np.ndarray]],
                     tasks: Sequence[str], num: int | None = None):
  """One figure per image: a row per task with input, ground truth, then each model.

  Args:
    examples: 'image' (normalised, [N, H, W, 3]) and each task's labels.
    predictions: model name -> task -> decoded predictions [N, ...].
    tasks: the rows.
    num: images to draw (default all).
  Returns:
    The matplotlib figures.
  """
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from cmtdp_jax.evaluation import visualize  # pylint: disable=import-outside-toplevel
  num = len(examples['image']) if num is None else min(num, len(examples['image']))
  titles = ['input', 'ground truth'] + list(predictions)
  figures = []
  for i in range(num):
    (top, left), (height, width) = examples['offset'][i], examples['size'][i]
    box = (slice(top, top + height), slice(left, left + width))  # without the eval padding
    figure, axes = plt.subplots(len(tasks), len(titles), squeeze=False,
                                figsize=(2.2 * len(titles), 2.2 * len(tasks)))
    for row, task in enumerate(tasks):
      maps = [examples[task][i]] + [p[task][i] for p in predictions.values()]
      panels = [visualize.denormalize(examples['image'][i])] + colourize_together(task, maps)
      for col, panel in enumerate(panels):
        axis = axes[row, col]
        axis.set_xticks([])
        axis.set_yticks([])
        if col == 0 and row:
          axis.axis('off')  # the input once is enough
          continue
        axis.imshow(panel[box])
        if row == 0:
          axis.set_title(titles[col], fontsize=9)
        if col == 1:
          axis.set_ylabel(task, fontsize=9)
    figure.suptitle(f'eval image {i}', fontsize=10)
    figure.tight_layout()
    figures.append(figure)
  return figures


def comparison(baseline: Mapping[str, float], regularized: Mapping[str, float],
               tasks: Sequence[str]) -> tuple[str, evaluation.DeltaM]:
  """Side-by-side table of two runs' results, and delta_m of regularized vs baseline.

  delta_m is `evaluation.delta_m` with the baseline in place of the
  single-task results: the mean relative gain of each task's primary metric.
  """
  rows = [('task', 'metric', 'baseline', '+contrastive', 'change')]
  for key in list(baseline) + [k for k in regularized if k not in baseline]:
    task, _, metric = key.rpartition('/')
    before, after = baseline.get(key), regularized.get(key)
    change = '' if before is None or after is None else f'{after - before:+.4f}'
    rows.append((task, metric, report.format_value(before), report.format_value(after), change))
  gain = evaluation.delta_m(regularized, baseline, tasks=[
      t for t in tasks if t in evaluation.PRIMARY_METRICS])
  primary = [('task', 'primary metric', 'baseline', '+contrastive', 'delta (%)')]
  for task, key, mt, st, delta in gain.rows:
    primary.append((task, key, report.format_value(st), report.format_value(mt),
                    'n/a' if delta is None else f'{delta:+.2f}'))
  summary = ('delta_m (+contrastive vs baseline): ' +
             ('n/a (' + '; '.join(gain.missing) + ')' if gain.value is None
              else f'{gain.value:+.2f}%'))
  text = report.aligned_table(rows) + '\n\n' + report.aligned_table(primary) + '\n' + summary
  return text, gain
