"""Dataset registry.

Each dataset is described by a `DatasetSpec` (tasks it labels, class counts,
splits) that imports no TensorFlow, so models and benchmarks can be built from
it on machines without TF; its TFDS builder lives in the module named by
`builder_module`, imported only when data is actually read.
"""

from __future__ import annotations

import dataclasses
import importlib

from cmtdp_jax import tasks as tasks_lib
from cmtdp_jax.data import synthetic_world


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  name: str
  tasks: tuple[str, ...]
  num_classes: dict[str, int]
  builder_module: str
  # How a user rebuilds the prepared files after deleting them (a damaged file's error
  # line says it): the synthetic world is generated again by the same run.
  rebuild: str = ('run python -m cmtdp_jax.data.prepare --dataset {name} --src <its folder> '
                  'with the same --data_dir')
  train_split: str = 'train'
  eval_split: str = 'validation'
  # The field's published split files (MTPSL, JTR, DiffusionMTL; `label_mapping`): the task of
  # each column of their per-image 0/1 rows, and how many training images they cover; () =
  # no published file is known for this dataset.
  split_columns: tuple[str, ...] = ()
  train_images: int | None = None

  def make_builder(self, data_config):
    """Returns the TFDS builder for `data_config` (imports TensorFlow)."""
    return importlib.import_module(self.builder_module).make_builder(data_config)


DATASETS = {
    'synthetic': DatasetSpec('synthetic', tasks_lib.ALL, dict(synthetic_world.NUM_CLASSES),
                             'cmtdp_jax.data.synthetic',
                             rebuild='run the same command again, which generates it anew'),
    'nyud': DatasetSpec('nyud', ('semseg', 'depth', 'normals', 'edge'), {'semseg': 40},
                        'cmtdp_jax.data.nyud'),
    'pascal_context': DatasetSpec('pascal_context',
                                  ('semseg', 'human_parts', 'sal', 'normals', 'edge'),
                                  {'semseg': 21, 'human_parts': 7},
                                  'cmtdp_jax.data.pascal_context',
                                  # DiffusionMTL utils/config.py: the order of p.TASKS.NAMES
                                  split_columns=('semseg', 'human_parts', 'sal', 'normals',
                                                 'edge'),
                                  train_images=4998),
    # MTAN's preprocessed NYUv2 and Cityscapes (lorenmt/mtan create_dataset.py), the data of
    # the partial-label benchmark; split columns: MTPSL nyu_mtl_xtc.py `tasks`,
    # cityscapes_mtl_xtc.py.
    'nyuv2_mtan': DatasetSpec('nyuv2_mtan', ('semseg', 'depth', 'normals'), {'semseg': 13},
                              'cmtdp_jax.data.mtan', split_columns=('semseg', 'depth', 'normals'),
                              train_images=795),
    'cityscapes_mtan': DatasetSpec('cityscapes_mtan', ('semseg', 'depth'), {'semseg': 7},
                                   'cmtdp_jax.data.mtan', split_columns=('semseg', 'depth'),
                                   train_images=2975),
}


def get_dataset_spec(name: str) -> DatasetSpec:
  if name not in DATASETS:
    raise ValueError(f"unknown config.data.name '{name}'; valid: {', '.join(DATASETS)}")
  return DATASETS[name]
