"""tf.data input pipelines that feed globally sharded `jax.Array`s.

Training data order is a pure function of (seed, step): each epoch shuffles
the split with a seed derived from the epoch, and every example is augmented
with a stateless seed derived from its position in the global stream.
Resuming at step N therefore rebuilds exactly the stream an uninterrupted run
would have seen, skipping only undecoded records.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from cmtdp_jax import data as data_lib
from cmtdp_jax import tasks as tasks_lib
from cmtdp_jax.data import augment

# TF must never grab the accelerators that JAX uses.
tf.config.set_visible_devices([], 'GPU')

_MAX_EPOCHS = 1 << 30


def as_written(fn):
  """`fn` for tf.data, traced as written, without AutoGraph's conversion: the pipeline
  branches on tensors only through tf.cond / tf.while_loop, so converting it changes
  nothing it computes (tests/test_regularizers.py). It cost 3.3 s before the train dataset's
  first batch and 1.2 s before the eval dataset's (2-core CPU, 2026-12-06; docs/tests.md)."""
  return tf.autograph.experimental.do_not_convert(fn)


class DamagedDatasetError(ValueError):
  """A prepared dataset file that cannot be read back (truncated, corrupted)."""


@dataclasses.dataclass(frozen=True)
class Source:
  """A prepared dataset split as this process sees it."""
  builder: tfds.core.DatasetBuilder
  dataset: str  # its name in the registry (`data.DATASETS`)
  tasks: tuple[str, ...]
  split: str
  num_examples: int  # over all processes
  # Ids of `config.eval.subset_split`, the images `config.eval.subset_tasks` are scored on.
  subset_ids: frozenset[str] | None = None
  # Tasks read from another feature than their own: evaluation against SEISM's edges.
  label_features: tuple[tuple[str, str], ...] = ()

  def feature(self, task: str) -> str:
    return dict(self.label_features).get(task, task)


# config.eval.edge_ground_truth -> the feature the edge metric is scored against.
EDGE_GROUND_TRUTHS = {'label': 'edge', 'seism': 'edge_seism'}


def open_split(data_config, split: str, task_names) -> Source:
  """Prepares the dataset (process 0 first, others after it) and opens `split`."""
  spec = data_lib.get_dataset_spec(data_config.name)
  missing = [t for t in task_names if t not in spec.tasks]
  if missing:
    raise ValueError(f"config.tasks {missing} are not labelled in dataset '{spec.name}' "
                     f"(it has {', '.join(spec.tasks)})")
  if jax.process_index() == 0:
    builder = spec.make_builder(data_config)
  multihost_utils.sync_global_devices('dataset prepared')
  if jax.process_index() != 0:
    builder = spec.make_builder(data_config)
  if split not in builder.info.splits:
    raise ValueError(f"dataset '{spec.name}' has no split '{split}' "
                     f"(it has {', '.join(builder.info.splits)})")
  return Source(builder, spec.name, tuple(task_names), split,
                builder.info.splits[split].num_examples)


def open_eval_split(config) -> Source:
  """The eval split (`config.data.eval_split`, default the dataset's), with the ids
  of `config.eval.subset_split` when some tasks are scored on a subset of it.

  The literature scores PASCAL-Context's boundaries on SEISM's `test_new` list
  (2498 of the 5105 val images) and every other task on all of val: the PASCAL
  protocol sets subset_split='test_new', subset_tasks=('edge',).
  """
  spec = data_lib.get_dataset_spec(config.data.name)
  source = open_split(config.data, config.data.eval_split or spec.eval_split, config.tasks)
  edge_truth = config.eval.edge_ground_truth
  if edge_truth not in EDGE_GROUND_TRUTHS:
    raise ValueError(f"config.eval.edge_ground_truth: unknown '{edge_truth}' "
                     f"(valid: {', '.join(EDGE_GROUND_TRUTHS)})")
  feature = EDGE_GROUND_TRUTHS[edge_truth]
  if 'edge' in config.tasks and feature != 'edge':
    if feature not in source.builder.info.features:
      raise ValueError(f"config.eval.edge_ground_truth='{edge_truth}': dataset '{spec.name}' "
                       f"has no '{feature}' labels (PASCAL-Context has)")
    source = dataclasses.replace(source, label_features=(('edge', feature),))
  subset = config.eval.subset_split
  if not subset or not set(config.eval.subset_tasks) & set(config.tasks):
    return source
  if subset not in source.builder.info.splits:
    raise ValueError(f"config.eval.subset_split: dataset '{spec.name}' has no split '{subset}' "
                     f"(it has {', '.join(source.builder.info.splits)}); PASCAL-Context: copy "
                     "SEISM's list to ImageSets/Context/test_new.txt and prepare again")
  if 'id' not in source.builder.info.features:
    raise ValueError(f"config.eval.subset_split: dataset '{spec.name}' has no image ids")
  ids = source.builder.as_dataset(split=subset, shuffle_files=False,
                                  decoders={k: tfds.decode.SkipDecoding()
                                            for k in source.builder.info.features})
  ids = frozenset(r['id'].decode() for r in ids.map(as_written(lambda r: {'id': r['id']}))
                  .as_numpy_iterator())
  return dataclasses.replace(source, subset_ids=ids)


def _decoder(source: Source):
  """Decodes a raw TFDS record into the label conventions of `tasks`."""
  features = source.builder.info.features

  def decode(record):
    example = {'image': tf.cast(features['image'].decode_example(record['image']), tf.float32)}
    for task in source.tasks:
      value = features[source.feature(task)].decode_example(record[task])
      if tasks_lib.get_task(task).label_kind == tasks_lib.CATEGORICAL:
        value = tf.reshape(value, tf.shape(value)[:2])  # drop a PNG's channel axis
      example[task] = tf.cast(value, tasks_lib.get_task(task).label_dtype)
    return example
  return decode


def _read(source: Source, split: str, with_id: bool = False):
  """Undecoded records: the image, the tasks' labels and, if asked and present, the id."""
  keys = {'image': 'image'} | {t: source.feature(t) for t in source.tasks}
  if with_id and 'id' in source.builder.info.features:
    keys['id'] = 'id'
  decoders = {feature: tfds.decode.SkipDecoding() for feature in keys.values()}
  ds = source.builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                                 read_config=tfds.ReadConfig(interleave_cycle_length=1))
  return ds.map(as_written(lambda r: {k: r[feature] for k, feature in keys.items()}))


def _with_ids(records: tf.data.Dataset, first_position: int = 0) -> tf.data.Dataset:
  """`records` (of a split, from its `first_position`-th record on) with an 'id' each: the
  dataset's own, or for datasets without one (synthetic) the record's position in the
  split, '%05d' (`label_mapping`)."""
  if 'id' in records.element_spec:
    return records
  return records.enumerate(start=first_position).map(as_written(
      lambda position, r: dict(r, id=tf.strings.as_string(position, width=5, fill='0'))))


def split_ids(source: Source) -> list[str]:
  """The ids of `source.split`'s images in stored order (see `_with_ids`)."""
  if 'id' not in source.builder.info.features:
    return [f'{position:05d}' for position in range(source.num_examples)]
  records = source.builder.as_dataset(
      split=source.split, shuffle_files=False,
      decoders={k: tfds.decode.SkipDecoding() for k in source.builder.info.features},
      read_config=tfds.ReadConfig(interleave_cycle_length=1))
  return [i.decode() for i in records.map(as_written(lambda r: r['id'])).as_numpy_iterator()]


def _labelled_lookup(mapping, task_names):
  """record id -> {task: whether its label is kept}, a static table in the graph."""
  ids = sorted(mapping)
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant(ids), tf.range(len(ids), dtype=tf.int64)),
      default_value=-1)
  kept = tf.constant([[t in mapping[i] for t in task_names] for i in ids], tf.bool)

  def lookup(image_id):
    row = tf.gather(kept, table.lookup(image_id))  # an unknown id (-1) fails here
    return {t: row[j] for j, t in enumerate(task_names)}
  return lookup


def label_derivation(source: Source, name: str):
  """(target, source task, fn) of `config.data.derive_labels` for `source`'s dataset."""
  derivations = getattr(importlib.import_module(
      data_lib.get_dataset_spec(source.dataset).builder_module), 'LABEL_DERIVATIONS', {})
  if name not in derivations:
    raise ValueError(f"config.data.derive_labels: '{name}' is not a derivation of dataset "
                     f"'{source.dataset}' (it has: {', '.join(derivations) or 'none'})")
  target, origin, _ = derivation = derivations[name]
  if target not in source.tasks or origin not in source.tasks:
    raise ValueError(f"config.data.derive_labels='{name}' needs tasks {target} and {origin} "
                     'in config.tasks')
  return derivation


def derive_missing_labels(example, kept, derivation):
  """An image without its target label but with the source's gets the derived one."""
  target, origin, derive = derivation
  use = ~kept[target] & kept[origin]
  example = dict(example, **{target: tf.where(use, derive(example[origin]), example[target])})
  return example, dict(kept, **{target: kept[target] | use})


def decoded_examples(source: Source, split: str | None = None) -> tf.data.Dataset:
  """The split's examples in order, decoded and not augmented (tools and tests)."""
  return _read(source, split or source.split).map(as_written(_decoder(source)))


def steps_per_epoch(source: Source, global_batch: int) -> int:
  """Full global batches in one pass over the split (at least one)."""
  return max(source.num_examples // global_batch, 1)


def check_transforms(data_config) -> None:
  """One line for an unknown augmentation or image normalisation name."""
  for flag, name, registry in (
      ('config.data.augment.name', data_config.augment.name, augment.AUGMENTATIONS),
      ('config.data.image_normalization', data_config.image_normalization,
       augment.IMAGE_NORMALIZATIONS)):
    if name not in registry:
      raise ValueError(f"{flag}: unknown '{name}' (valid: {', '.join(registry)})")


def train_dataset(source: Source, config, start_step: int, label_mapping=None,
                  extra_views: int = 0) -> tf.data.Dataset:
  """Endless, deterministic, augmented per-host batches starting at `start_step`.

  With a `label_mapping` ({image id: tasks}, `cmtdp_jax.label_mapping`) every batch
  also has 'labelled': {task: bool [batch]}, whether the image keeps that
  task's label; order and augmentation are the same as without. With
  `extra_views` (a regularizer's, `regularizers.extra_views`) every batch also has
  'views': a tuple of that many {image, labels} batches, each a scale-crop of the
  first view.

  The sample order is global: every host shuffles the whole split with the
  same seed and keeps its own rows of each global batch, before decoding. So
  the global batch at step N, and its augmentation, do not depend on how many
  hosts read it: a run resumes exactly even on a different number of hosts,
  and one 8-device process computes what two 4-device processes do.
  """
  check_transforms(config.data)
  global_batch = config.batch_size
  per_host = global_batch // jax.process_count()
  process = jax.process_index()
  per_epoch = steps_per_epoch(source, global_batch)
  samples_per_epoch = per_epoch * global_batch
  records = _read(source, source.split, with_id=label_mapping is not None)
  if label_mapping is not None:
    records = _with_ids(records)
    labelled = _labelled_lookup(label_mapping, source.tasks)
  if config.data.cache:
    records = records.cache()
  if source.num_examples < samples_per_epoch:
    records = records.repeat()  # tiny datasets: an epoch wraps around the split

  def epoch(e):
    shuffled = records.shuffle(config.data.shuffle_buffer, seed=config.seed * 7919 + e,
                               reshuffle_each_iteration=False)
    positions = tf.data.Dataset.range(e * samples_per_epoch, (e + 1) * samples_per_epoch)
    return tf.data.Dataset.zip(positions, shuffled.take(samples_per_epoch))

  start_epoch, offset = divmod(start_step, per_epoch)
  ds = tf.data.Dataset.range(start_epoch, _MAX_EPOCHS).flat_map(as_written(epoch))
  ds = ds.skip(offset * global_batch)
  ds = ds.filter(as_written(
      lambda position, _: (position % global_batch) // per_host == process))
  decode = _decoder(source)
  crop = tuple(config.data.crop_size)
  derivation = None
  if config.data.derive_labels:
    if label_mapping is None:
      raise ValueError('config.data.derive_labels fills missing labels: it needs partial '
                       'labels (config.data.partial_labels or label_mapping)')
    derivation = label_derivation(source, config.data.derive_labels)

  def transform(position, record):
    seed = tf.stack([tf.constant(config.seed, tf.int64), position])
    kept = labelled(record['id']) if label_mapping is not None else {}
    example = decode(record)
    if derivation is not None:
      example, kept = derive_missing_labels(example, kept, derivation)
    example = augment.train_transform(example, seed, config.data.augment, crop,
                                      semseg_kept=kept.get('semseg', True),
                                      normalization=config.data.image_normalization)
    if extra_views:  # from seeds the first view does not use
      example['views'] = augment.extra_views(
          example, tf.random.experimental.stateless_fold_in(seed, 0x7653), extra_views)
    if label_mapping is not None:
      example['labelled'] = kept
    return example

  options = tf.data.Options()
  options.deterministic = True
  if config.data.threads:
    options.threading.private_threadpool_size = config.data.threads
  ds = ds.map(as_written(transform), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(per_host, drop_remainder=True).prefetch(config.data.prefetch)
  return ds.with_options(options)


def eval_dataset(source: Source, config) -> tf.data.Dataset:
  """One ordered pass over the split in equal-size per-host batches.

  Every host yields the same number of batches (hosts with fewer examples add
  padding examples), and each batch carries a 'mask' of real examples, so the
  jitted eval step never sees a ragged batch and padding never counts.

  Every example has an 'id' (`_with_ids`). Images are padded centred to the largest of the batch, at least
  `eval_crop_size` (default: the crop size), as ATRC does; 'size' and
  'offset' locate each original image (`augment.crop_to_original`). The
  protocol datasets give every batch one shape; a dataset whose images vary
  beyond `eval_crop_size` compiles the predict step once per batch shape.
  """
  check_transforms(config.data)
  per_host = config.eval_batch_size // jax.process_count()
  # tfds.split_for_jax_process, with where this process's part starts (for `_with_ids`).
  parts = tfds.even_splits(source.split, n=jax.process_count(), drop_remainder=False)
  process = jax.process_index()
  first = sum(source.builder.info.splits[part].num_examples for part in parts[:process])
  local = _with_ids(_read(source, parts[process], with_id=True), first)
  most_per_host = -(-source.num_examples // jax.process_count())
  num_batches = -(-most_per_host // per_host)
  decode = _decoder(source)
  min_size = tuple(config.data.eval_crop_size or config.data.crop_size)

  def transform(record, is_real):
    example = augment.eval_transform(decode(record), config.data.image_normalization)
    if 'id' in record:
      example['id'] = record['id']
    return dict(example, mask=is_real)

  real = local.map(as_written(lambda r: (r, tf.constant(True))))
  padding = local.take(1).map(as_written(lambda r: (r, tf.constant(False)))).repeat()
  ds = real.concatenate(padding).take(num_batches * per_host)
  ds = ds.map(as_written(transform), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.padded_batch(per_host, padding_values=augment.padding_values(ds.element_spec),
                       drop_remainder=True)
  return ds.map(as_written(lambda batch: augment.centre_in_batch(batch, min_size))).prefetch(2)


def to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Assembles per-host numpy batches into global arrays sharded over the batch."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def numpy_batches(ds: tf.data.Dataset, source: Source):
  """`ds`'s elements as numpy; a damaged file of `source` stops it with one line
  (`DamagedDatasetError`) naming the file and how to rebuild the dataset."""
  iterator = ds.as_numpy_iterator()
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.DataLossError as e:
      raise DamagedDatasetError(_describe_damage(source, e)) from None
    yield batch


def _describe_damage(source: Source, error: tf.errors.DataLossError) -> str:
  """Reads the split's files one by one (only after a failed read) to name the damaged one."""
  builder, spec = source.builder, data_lib.get_dataset_spec(source.dataset)
  for path in builder.info.splits[source.split].filepaths:
    try:
      for _ in tf.data.TFRecordDataset(str(path)):
        pass
    except tf.errors.DataLossError as damage:
      reason = _tf_reason(damage)
      break
  else:
    path, reason = f'a file of {builder.data_dir}', _tf_reason(error)
  rebuild = spec.rebuild.format(name=spec.name)
  return f'{path} is damaged ({reason}): delete {builder.data_dir} and {rebuild}'


def _tf_reason(error: tf.errors.OpError) -> str:
  """TensorFlow's message without its op and function names."""
  return error.message.split('}} ')[-1].split(' [Op:')[0].replace("' failed with", ':').strip()


def global_batches(batches, sharding, device_prefetch: int = 2):
  """Global arrays of the host-local numpy `batches`, `device_prefetch` batches ahead.

  Transfers are asynchronous: while the train step runs on one batch, the next
  ones are already being copied to the devices (Flax's `prefetch_to_device`).
  """
  ready = collections.deque()
  for batch in batches:
    ready.append(to_global(batch, sharding))
    if len(ready) > device_prefetch:
      yield ready.popleft()
  while ready:
    yield ready.popleft()
