"""Which tasks are labelled on which training image (partially annotated training).

A label mapping is `{image_id: (task, ...)}` over every image of the train
split: the tasks whose labels the losses and the regularizer may use on that
image (`steps.compute_losses`, `contrastive.CrossTaskContrastive`); evaluation
always uses every label. `config.data.partial_labels` draws one:

  'one_label'  each image keeps exactly one task; a permutation of the ids
               (seeded) is dealt round-robin over the tasks in sorted order,
               so the task counts differ by at most one (MTPSL / DiffusionMTL's
               one-label setting).
  'random'     each task is kept independently with probability
               `config.data.label_fraction`; an image that kept none gets one
               task drawn uniformly, so every image has at least one.

Draws depend only on the split's ids, the set of tasks and
`config.data.partial_labels_seed` (not on `config.seed`, so that runs with
different training seeds share a mapping). `config.data.label_mapping=PATH`
reads a user's mapping in the same format instead; it must name every training
image (a missing one is an error, not silently unlabelled).

It also reads the split files the field publishes, as they are (`read_published`;
`python -m cmtdp_jax.tools.convert_split` turns one into JSON): MTPSL's and JTR's
`.pth` ({'labels_weights': [N, T] 0/1 tensor}, row i = image id 'i', MTAN's
`train/*/{i}.npy`), MTPSL's PASCAL `.npy` (a dict from task to image ids) and
DiffusionMTL's `.pth` (a dict from image id to a 0/1 list). A row's columns are
the tasks of the dataset's `DatasetSpec.split_columns`. These files are pickles:
`pickled.load` reads them without running anything in them.

A run keeps its mapping in `<workdir>/label_mapping.json` (`FILENAME`): a JSON
object from image id to its sorted task list, keys sorted, written once at the
first start; a resume of a checkpoint reads it back. Image ids are the dataset's 'id' feature
(NYUD, PASCAL-Context: the file names) or, for datasets without one (the
synthetic world), the position of the image in the stored split, '%05d' (the
names evaluation gives its outputs too). This module imports no TensorFlow.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from cmtdp_jax import atomic_json
from cmtdp_jax import data as data_lib
from cmtdp_jax import pickled

MODES = ('', 'one_label', 'random')
FILENAME = 'label_mapping.json'

LabelMapping = dict[str, tuple[str, ...]]


def draw(ids: Sequence[str], tasks: Sequence[str], mode: str, fraction: float = 0.5,
         seed: int = 0) -> LabelMapping:
  """A mapping of `mode` ('one_label' or 'random') over `ids`, deterministic in `seed`."""
  ids, tasks = sorted(ids), sorted(tasks)
  rng = np.random.default_rng(seed)
  if mode == 'one_label':
    kept = np.zeros((len(ids), len(tasks)), bool)
    order = rng.permutation(len(ids))
    kept[order, np.arange(len(ids)) % len(tasks)] = True
  elif mode == 'random':
    kept = rng.random((len(ids), len(tasks))) < fraction
    empty = np.flatnonzero(~kept.any(axis=1))
    kept[empty, rng.integers(0, len(tasks), len(empty))] = True
  else:
    raise ValueError(f"config.data.partial_labels: unknown mode '{mode}' "
                     f"(valid: {', '.join(repr(m) for m in MODES)})")
  return {i: tuple(t for t, k in zip(tasks, row) if k) for i, row in zip(ids, kept)}


def validate(values, ids: Sequence[str], tasks: Sequence[str], path: str) -> LabelMapping:
  """`values` (parsed JSON of file `path`) as a mapping over exactly `ids`, or a
  one-line ValueError naming the file and the first offending id or task."""
  if not isinstance(values, dict):
    raise ValueError(f'{path}: a label mapping is a JSON object {{image_id: [tasks]}}, '
                     f'got {type(values).__name__}')
  known = set(ids)
  mapping = {}
  for image_id, image_tasks in sorted(values.items()):
    if image_id not in known:
      raise ValueError(f"{path}: image id '{image_id}' is not in the train split "
                       f"({len(known)} images, ids like '{min(known)}')")
    if not isinstance(image_tasks, list) or not all(isinstance(t, str) for t in image_tasks):
      raise ValueError(f"{path}: image '{image_id}' maps to {image_tasks!r}, not a list of "
                       'task names')
    if not image_tasks:
      raise ValueError(f"{path}: image '{image_id}' has no task; leave an image out of "
                       'training by removing it from the split instead')
    for task in image_tasks:
      if task not in tasks:
        raise ValueError(f"{path}: image '{image_id}' names task '{task}', which is not in "
                         f"config.tasks ({', '.join(tasks)})")
    mapping[image_id] = tuple(sorted(set(image_tasks)))
  missing = [i for i in ids if i not in mapping]
  if missing:
    raise ValueError(f"{path}: {len(missing)} of the {len(known)} training images are "
                     f"missing (the first: '{missing[0]}'); every image needs its task list")
  return mapping


class _RepeatedKey(ValueError):
  pass


def _object_without_repeated_keys(pairs):
  """json's object hook: a key given twice would silently keep its last value."""
  values = dict(pairs)
  if len(values) < len(pairs):  # one pass: a PASCAL mapping has about 5000 keys
    seen = set()
    raise _RepeatedKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
  return values


def _parse(path: str):
  try:
    with open(path) as f:
      return json.load(f, object_pairs_hook=_object_without_repeated_keys)
  except OSError as e:
    raise ValueError(f'{path}: cannot read the label mapping ({e.strerror})') from None
  except _RepeatedKey as e:
    raise ValueError(f"{path}: image id '{e}' is given twice") from None
  except ValueError as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from None


PUBLISHED_SUFFIXES = ('.pth', '.npy')


def is_published(path: str) -> bool:
  """Whether `path` is one of the field's pickled split files rather than our JSON."""
  return path.endswith(PUBLISHED_SUFFIXES)


def _matching_datasets(columns: int, rows: int | None = None) -> str:
  names = [s.name for s in data_lib.DATASETS.values() if len(s.split_columns) == columns
           and (rows is None or s.train_images == rows)]
  return f" (it fits {', '.join(names)})" if names else ''


def _zero_one(path: str, rows: np.ndarray) -> np.ndarray:
  if rows.size and not np.isin(rows, (0, 1)).all():
    raise ValueError(f'{path}: label weights must be 0 or 1, found '
                     f'{sorted(set(np.unique(rows).tolist()) - {0, 1})[:5]}')
  return rows.astype(bool)


def _from_rows(path: str, rows: np.ndarray, ids: Sequence[str], columns) -> dict:
  """MTPSL / JTR: row i of a [N, T] 0/1 matrix is image 'i'."""
  if rows.ndim != 2:
    raise ValueError(f"{path}: 'labels_weights' has shape {rows.shape}, not [images, tasks]")
  if rows.shape[1] != len(columns):
    raise ValueError(f'{path}: rows of {rows.shape[1]} tasks, but this dataset\'s published '
                     f"files have {len(columns)} ({', '.join(columns)}): a split file of "
                     f'another dataset{_matching_datasets(rows.shape[1])}?')
  if rows.shape[0] != len(ids):
    raise ValueError(f'{path}: {rows.shape[0]} rows, but the train split has {len(ids)} '
                     'images: a split file of another dataset'
                     f'{_matching_datasets(rows.shape[1], rows.shape[0])}?')
  kept = _zero_one(path, rows)
  return {str(i): [t for t, k in zip(columns, row) if k] for i, row in enumerate(kept)}


def _from_task_lists(path: str, lists: dict) -> dict:
  """MTPSL's PASCAL .npy: {task: [image ids]}."""
  values = collections.defaultdict(list)
  for task, image_ids in lists.items():
    if not isinstance(image_ids, list) or not all(isinstance(i, str) for i in image_ids):
      raise ValueError(f"{path}: task '{task}' maps to {type(image_ids).__name__}, not a list "
                       'of image ids')
    for image_id in image_ids:
      values[image_id].append(task)
  return dict(values)


def _from_id_rows(path: str, rows: dict, columns) -> dict:
  """DiffusionMTL: {image id: 0/1 per column}."""
  values = {}
  for image_id, row in rows.items():
    row = np.asarray(row)
    if row.shape != (len(columns),):
      raise ValueError(f"{path}: image '{image_id}' has {row.size} label weights, but this "
                       f"dataset's published files have {len(columns)} ({', '.join(columns)}): "
                       f'a split file of another dataset{_matching_datasets(row.size)}?')
    values[str(image_id)] = [t for t, k in zip(columns, _zero_one(path, row)) if k]
  return values


def read_published(path: str, dataset: str, ids: Sequence[str]) -> dict[str, list[str]]:
  """{image id: [tasks]} of a published split file for `dataset`, whose train split
  has `ids`, before `validate`. One-line ValueError naming the file otherwise."""
  columns = data_lib.get_dataset_spec(dataset).split_columns
  if not columns:
    known = ', '.join(s.name for s in data_lib.DATASETS.values() if s.split_columns)
    raise ValueError(f"{path}: no published split file is known for config.data.name="
                     f"'{dataset}' (there are for {known}); give a JSON label mapping")
  try:
    value = pickled.load(path)
  except OSError as e:
    raise ValueError(f'{path}: cannot read the label mapping ({e.strerror})') from None
  if isinstance(value, dict) and set(value) == {'labels_weights'} and isinstance(
      value['labels_weights'], np.ndarray):
    return _from_rows(path, value['labels_weights'], ids, columns)
  if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
    if all(k in columns for k in value):
      return _from_task_lists(path, value)
    return _from_id_rows(path, value, columns)
  raise ValueError(f'{path}: not a split file of a known layout ({type(value).__name__}; '
                   "expected {'labels_weights': [images, tasks]}, {task: [ids]} or "
                   '{id: [0/1 per task]})')


def _values(path: str, dataset: str, ids: Sequence[str]):
  return read_published(path, dataset, ids) if is_published(path) else _parse(path)


def read(path: str, ids: Sequence[str], tasks: Sequence[str],
         dataset: str = '') -> LabelMapping:
  """The mapping in file `path` (our JSON, or a published file of `dataset`), checked
  against the split's `ids` and `tasks`."""
  return validate(_values(path, dataset, ids), ids, tasks, path)


def _text(mapping: Mapping[str, Sequence[str]]) -> str:
  return json.dumps({i: list(t) for i, t in mapping.items()}, sort_keys=True, indent=1)


def sha256(mapping: Mapping[str, Sequence[str]]) -> str:
  """Hex digest of the mapping's file contents (the same for the same mapping)."""
  return hashlib.sha256(_text(mapping).encode()).hexdigest()


def file_sha256(path: str) -> str:
  """Hex digest of a mapping file's bytes: `sha256` of the mapping `save` wrote there."""
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def save(workdir: str, mapping: Mapping[str, Sequence[str]]) -> str:
  """Writes `<workdir>/label_mapping.json` whole or not at all; returns its path."""
  path = os.path.join(workdir, FILENAME)
  atomic_json.write_json(path, {i: list(t) for i, t in mapping.items()}, sort_keys=True,
                         indent=1)
  return path


def load(workdir: str) -> LabelMapping | None:
  """The mapping a run in `workdir` trained on, or None (it trained on all labels)."""
  path = os.path.join(workdir, FILENAME)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      values = json.load(f)
  except ValueError as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from None
  if not isinstance(values, dict):
    raise ValueError(f'{path}: a label mapping is a JSON object {{image_id: [tasks]}}')
  return {i: tuple(t) for i, t in sorted(values.items())}


def counts(mapping: LabelMapping, tasks: Sequence[str]) -> dict[str, int]:
  """How many images keep each of `tasks`' labels (0 included)."""
  return {t: sum(t in image_tasks for image_tasks in mapping.values()) for t in sorted(tasks)}


def describe(mapping: LabelMapping, tasks: Sequence[str]) -> str:
  """'N images; labelled per task: task count, ...' for the log line."""
  per_task = ', '.join(f'{t} {n}' for t, n in counts(mapping, tasks).items())
  return f'{len(mapping)} images; labelled per task: {per_task}'


def check_config(data_config) -> None:
  """One-line errors for the partial-label fields of `config.data`."""
  mode = data_config.partial_labels
  if mode not in MODES:
    raise ValueError(f"config.data.partial_labels: unknown mode '{mode}' "
                     f"(valid: {', '.join(repr(m) for m in MODES)})")
  seed = data_config.partial_labels_seed
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    raise ValueError(f'config.data.partial_labels_seed={seed!r} must be an integer >= 0')
  if not 0 < data_config.label_fraction <= 1:
    raise ValueError(f'config.data.label_fraction={data_config.label_fraction} must be in '
                     '(0, 1]')
  if data_config.label_mapping:
    if mode:
      raise ValueError(f"config.data.label_mapping and config.data.partial_labels='{mode}' "
                       'both choose the labelled tasks: set only one')
    if not os.path.isfile(data_config.label_mapping):
      raise ValueError(f'config.data.label_mapping: no such file {data_config.label_mapping}')


def is_partial(data_config) -> bool:
  """Whether `config.data` asks for partially annotated training."""
  return bool(data_config.partial_labels or data_config.label_mapping)


def _most_kept(data_config) -> int | None:
  """The most tasks a mapping of `data_config` gives one image: 1 in 'one_label'; None
  otherwise (a 'random' draw or a user's file may give every task)."""
  return 1 if data_config.partial_labels == 'one_label' else None


def most_labels(data_config) -> int | None:
  """The most tasks one training image can have labelled under `data_config` when the
  config alone bounds it: 1 in 'one_label', 2 with `derive_labels` (which labels one more
  task); None otherwise."""
  most = _most_kept(data_config)
  if most is None:
    return None
  return most + (1 if data_config.derive_labels else 0)


def _within_most_kept(mapping: LabelMapping, data_config, path: str) -> LabelMapping:
  """`mapping`, if no image keeps more tasks than `data_config` gives one (a saved mapping
  can come from another config, through config.allow_config_change, or a hand edit)."""
  most = _most_kept(data_config)
  if most is None:
    return mapping
  over = next(((i, t) for i, t in mapping.items() if len(t) > most), None)
  if over is not None:
    raise ValueError(f"{path}: image '{over[0]}' keeps {len(over[1])} tasks {list(over[1])}, "
                     f"but config.data.partial_labels='{data_config.partial_labels}' keeps "
                     f'{most}: this mapping was drawn under another config')
  return mapping


def _fields_read(data: Mapping) -> set[str]:
  """The partial-label fields (of `config.data` as a dict) that choose the mapping."""
  if data['label_mapping']:
    return {'label_mapping'}
  mode = data['partial_labels']
  return ({'partial_labels'} | ({'partial_labels_seed'} if mode else set())
          | ({'label_fraction'} if mode == 'random' else set()))


def _same_as_saved(path: str, workdir: str, dataset: str) -> bool:
  """Whether file `path` holds the mapping saved in `workdir` (task order aside)."""
  try:
    saved = load(workdir)
    if saved is None:
      return False
    saved_tasks = sorted({t for image_tasks in saved.values() for t in image_tasks})
    return read(path, list(saved), saved_tasks, dataset) == saved
  except ValueError:  # unreadable, or another image or task: not the same
    return False


def resume_free_fields(old_data: Mapping, new_data: Mapping, workdir: str) -> set[str]:
  """The partial-label fields of `config.data` (as dicts: the checkpoint's run's and
  this one's) whose change leaves what a resume in `workdir` trains on, its saved
  mapping, as it was: a field neither config reads (`label_fraction` without
  'random'), or a user's mapping file that moved (same mapping, another path)."""
  unread = {'label_fraction', 'partial_labels_seed'} - _fields_read(old_data) - _fields_read(
      new_data)
  if old_data['label_mapping'] and new_data['label_mapping'] and _same_as_saved(
      new_data['label_mapping'], workdir, new_data['name']):
    unread.add('label_mapping')
  return {f'data.{field}' for field in unread}


def for_run(data_config, tasks: Sequence[str], ids: Sequence[str], workdir: str, *,
            resuming: bool) -> LabelMapping | None:
  """The mapping a run trains on: when it resumes a checkpoint, the one in
  `workdir` that its first start wrote; else the user's file or a fresh draw as
  `data_config` says (a file left by a start that saved no checkpoint is not read:
  this start may ask for another mapping). None for all labels. Does not write
  anything (`save`)."""
  if not is_partial(data_config):
    return None
  repeated = next((i for i, n in collections.Counter(ids).items() if n > 1), None)
  if repeated is not None:
    raise ValueError(f"the train split has image id '{repeated}' more than once: a label "
                     'mapping needs unique ids')
  saved_path = os.path.join(workdir, FILENAME)
  if resuming and os.path.exists(saved_path):
    return _within_most_kept(read(saved_path, ids, tasks), data_config, saved_path)
  if data_config.label_mapping:
    return read(data_config.label_mapping, ids, tasks, data_config.name)
  return draw(ids, tasks, data_config.partial_labels, data_config.label_fraction,
              data_config.partial_labels_seed)
