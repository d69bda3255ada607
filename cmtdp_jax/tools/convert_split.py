"""Converts a published partial-label split file to our JSON label mapping, and says what it holds.

  python -m cmtdp_jax.tools.convert_split onelabel.pth --dataset nyuv2_mtan --out onelabel.json
  python -m cmtdp_jax.tools.convert_split randomlabels.npy --dataset pascal_context

Reads MTPSL's and JTR's .pth and .npy and DiffusionMTL's .pth without PyTorch
and without running anything in them (`cmtdp_jax.pickled`), prints the images
labelled per task and how many images have 1, 2, ... tasks, and with --out
writes the mapping that `--config.data.label_mapping` reads. Training reads the
published file directly too; the JSON is for reading and editing. A matrix row
i is image 'i' of the dataset; the row count must be its training split's
(`--num_images` for a smaller folder).
"""

from __future__ import annotations

import argparse
import collections
import sys

from cmtdp_jax import atomic_json
from cmtdp_jax import data as data_lib
from cmtdp_jax import label_mapping


def summary(mapping: label_mapping.LabelMapping, tasks) -> str:
  histogram = collections.Counter(len(t) for t in mapping.values())
  per_count = ', '.join(f'{n} task{"s" if n > 1 else ""}: {histogram[n]}'
                        for n in sorted(histogram))
  return (f'{label_mapping.describe(mapping, tasks)}\n'
          f'images by number of labelled tasks: {per_count}')


def convert(path: str, dataset: str, num_images: int | None = None) -> label_mapping.LabelMapping:
  """The mapping in published file `path` for `dataset`, checked as training checks it."""
  spec = data_lib.get_dataset_spec(dataset)
  expected = num_images or spec.train_images
  row_ids = [str(i) for i in range(expected or 0)]
  values = label_mapping.read_published(path, dataset, row_ids)
  if expected and len(values) != expected:
    raise ValueError(f'{path}: {len(values)} images, but {dataset} has {expected} training '
                     'images: a split file of another dataset?')
  return label_mapping.validate(values, sorted(values), spec.tasks, path)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('file', help='a published .pth or .npy split file')
  parser.add_argument('--dataset', required=True,
                      choices=[s.name for s in data_lib.DATASETS.values() if s.split_columns])
  parser.add_argument('--out', default='', help='write the mapping as JSON here')
  parser.add_argument('--num_images', type=int, default=0,
                      help="the training split's size, if not the dataset's published one")
  args = parser.parse_args(argv)
  try:
    mapping = convert(args.file, args.dataset, args.num_images or None)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(summary(mapping, data_lib.get_dataset_spec(args.dataset).tasks))
  if args.out:
    atomic_json.write_json(args.out, {i: list(t) for i, t in mapping.items()}, sort_keys=True,
                           indent=1)
    print(f'wrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
