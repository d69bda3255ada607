"""TFDS builder for the procedurally generated synthetic multi-task world.

The scenes come from `synthetic_world.render_scene`; the builder only caches
them as TFRecords under the data dir, so a dataset is generated once per
(size, counts, seed) and read back like any real dataset afterwards.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from cmtdp_jax.data import generation
from cmtdp_jax.data import synthetic_world

def _sal_from_semseg(semseg):
  """The world's saliency is its object and person classes (synthetic_world: 'sal: 1 on
  every object and the person, 0 on the room'), so a semseg label gives the sal label."""
  room = tf.reduce_any(semseg[..., None] == tf.constant(synthetic_world.ROOM_CLASSES,
                                                        semseg.dtype), axis=-1)
  return tf.where(semseg == 255, semseg, tf.cast(~room, semseg.dtype))


# `config.data.derive_labels` (pipeline.derive_missing_labels): name -> (target task, source
# task, source label -> target label). Exact in this world: a control whose cross-task
# supervision is guaranteed, for the regularizer comparison.
LABEL_DERIVATIONS = {'sal_from_semseg': ('sal', 'semseg', _sal_from_semseg)}

# Scene seeds of the eval split start here, so train and eval never overlap.
EVAL_SEED_OFFSET = 50_000_000


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  height: int = 96
  width: int = 96
  num_train: int = 1000
  num_eval: int = 200
  seed: int = 0


class SyntheticWorld(generation.Builder):
  """Rooms with objects and an articulated 'person', labelled for six tasks."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [SyntheticConfig(name='default')]

  def _info(self):
    c = self.builder_config
    hw = (c.height, c.width)
    label = lambda: tfds.features.Tensor(shape=hw, dtype=np.uint8, encoding='zlib')
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=hw + (3,)),
            'semseg': label(),
            'human_parts': label(),
            'sal': label(),
            'edge': label(),
            'depth': tfds.features.Tensor(shape=hw, dtype=np.float32, encoding='zlib'),
            'normals': tfds.features.Tensor(shape=hw + (3,), dtype=np.float32,
                                            encoding='zlib'),
        }),
        description='Procedural multi-task scenes; see cmtdp_jax/data/synthetic_world.py.')

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    return {
        'train': self._generate_examples('train', c.seed * 100_000_000, c.num_train),
        'validation': self._generate_examples(
            'validation', c.seed * 100_000_000 + EVAL_SEED_OFFSET, c.num_eval),
    }

  def _generate_examples(self, split, first_seed, count):
    c = self.builder_config
    for i in generation.examples(range(count), split, count):
      yield i, synthetic_world.render_scene(first_seed + i, c.height, c.width)


def make_builder(data_config):
  """Builder for `data_config`, generating the data on first use."""
  height, width = data_config.image_size
  config = SyntheticConfig(
      name=f'{height}x{width}_train{data_config.num_train}_eval{data_config.num_eval}'
           f'_seed{data_config.dataset_seed}',
      height=height, width=width, num_train=data_config.num_train,
      num_eval=data_config.num_eval, seed=data_config.dataset_seed)
  return generation.build_once(
      lambda: SyntheticWorld(config=config, data_dir=data_config.data_dir or None))
