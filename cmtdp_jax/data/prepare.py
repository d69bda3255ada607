"""Prepares a real dataset from a local folder into the TFDS data dir (no downloads).

  python -m cmtdp_jax.data.prepare --dataset nyud --src /data/NYUD_MT
  python -m cmtdp_jax.data.prepare --dataset pascal_context --src /data/PASCAL_MT \
      --data_dir /data/tfds

Recognises the folder's packaging (NYUD: nyud_mt or nyudv2), builds every
split with a progress line (total and ETA), then prints a summary: examples
per split and each class-map task's share of pixels per class. A missing,
unreadable or inconsistent file stops it with one line naming the file and
exit code 1;
TFDS renames the dataset into place only once complete, so nothing
half-written is left behind. A dataset already prepared is only summarised.
"""

from __future__ import annotations

import argparse
import sys

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from cmtdp_jax import data as data_lib
from cmtdp_jax import tasks as tasks_lib
from cmtdp_jax.data import folder_io

DATASETS = ('nyud', 'pascal_context', 'nyuv2_mtan', 'cityscapes_mtan')


def class_shares(builder, split, task_names):
  """{task: percent of the split's pixels per label value 0..255}."""
  ds = builder.as_dataset(split=split, decoders=tfds.decode.PartialDecoding(
      {t: True for t in task_names}))
  counts = {t: np.zeros(256, np.int64) for t in task_names}
  for example in ds.as_numpy_iterator():
    for task in task_names:
      counts[task] += np.bincount(example[task].ravel(), minlength=256)
  return {t: 100.0 * c / max(c.sum(), 1) for t, c in counts.items()}


def summary(builder, spec) -> str:
  lines = [f'{builder.info.full_name} prepared in {builder.data_dir}']
  for split, info in builder.info.splits.items():
    lines.append(f'  {split}: {info.num_examples} examples')
    for task, shares in class_shares(builder, split, tuple(spec.num_classes)).items():
      per_class = ' '.join(f'{c}:{shares[c]:.1f}' for c in range(spec.num_classes[task]))
      lines.append(f'    {task} % of pixels per class: {per_class} '
                   f'ignored:{shares[tasks_lib.IGNORE_LABEL]:.1f}')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dataset', required=True, choices=DATASETS)
  parser.add_argument('--src', required=True, help='the dataset folder (see the README)')
  parser.add_argument('--data_dir', default='',
                      help='TFDS data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)')
  parser.add_argument('--packaging', default='',
                      help="nyud: 'nyud_mt' or 'nyudv2' (default: detect from --src)")
  args = parser.parse_args(argv)
  spec = data_lib.get_dataset_spec(args.dataset)
  data_config = ml_collections.ConfigDict({
      'name': args.dataset, 'data_dir': args.data_dir, 'manual_dir': args.src,
      'packaging': args.packaging})
  try:
    builder = spec.make_builder(data_config)
  except folder_io.FolderError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(summary(builder, spec))
  return 0


if __name__ == '__main__':
  sys.exit(main())
