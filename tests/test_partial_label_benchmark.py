"""The partial-label benchmark as the field runs it: MTAN's NYUv2 / Cityscapes folders,
MTPSL's scale-crop, per-image loss normalisation, the cosine normals loss, and a
one-label SegNet run from MTPSL's split file through the CLI.

The folder written here has MTAN's layout (lorenmt/mtan create_dataset.py; MTPSL
dataset/nyuv2ssl.py reads it) at a tiny size.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')

from cmtdp_jax import label_mapping, protocol, tasks as tasks_lib  # noqa: E402
from cmtdp_jax.data import augment, pipeline  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = os.path.join(ROOT, 'tests', 'golden', 'splits')
HEIGHT, WIDTH = 32, 64  # divisible by 32: SegNet pools five times
SIZES = {'train': 6, 'val': 3}  # tests/golden/make_split_fixtures.py NYU_IMAGES


def write_mtan(src, cityscapes=False, sizes=SIZES):
  rng = np.random.default_rng(0)
  for split, count in sizes.items():
    for i in range(count):
      files = {
          'image': rng.uniform(0, 1, (HEIGHT, WIDTH, 3)).astype(np.float32),
          'label_7' if cityscapes else 'label': rng.integers(
              -1, 7 if cityscapes else 13, (HEIGHT, WIDTH)).astype(np.float32),
          'depth': np.where(rng.uniform(size=(HEIGHT, WIDTH, 1)) < 0.1, 0.0,
                            rng.uniform(0.5, 9, (HEIGHT, WIDTH, 1))).astype(np.float32),
      }
      if not cityscapes:
        normals = rng.normal(size=(HEIGHT, WIDTH, 3))
        normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
        normals[:2] = 0.0  # invalid rows
        files['normal'] = normals.astype(np.float32)
      for folder, array in files.items():
        os.makedirs(os.path.join(src, split, folder), exist_ok=True)
        np.save(os.path.join(src, split, folder, f'{i}.npy'), array)
  return src


def data_config(tmp_path, name, src):
  config = protocol.partial_label_config(name).data
  config.data_dir = str(tmp_path / 'tfds')
  config.manual_dir = str(src)
  return config


@pytest.mark.parametrize('name,cityscapes', [('nyuv2_mtan', False), ('cityscapes_mtan', True)])
def test_mtan_folder_decodes_to_task_conventions(tmp_path, name, cityscapes):
  src = write_mtan(str(tmp_path / 'src'), cityscapes)
  config = data_config(tmp_path, name, src)
  tasks = ('semseg', 'depth') if cityscapes else ('semseg', 'depth', 'normals')
  source = pipeline.open_split(config, 'train', tasks)
  assert pipeline.split_ids(source) == [str(i) for i in range(6)]
  examples = list(pipeline.decoded_examples(source, 'train').as_numpy_iterator())
  for i, example in enumerate(examples):
    folder = os.path.join(src, 'train')
    image = np.load(os.path.join(folder, 'image', f'{i}.npy'))
    # Stored x 255 in float32 and divided back by 'unit_range': one rounding each way.
    np.testing.assert_allclose(example['image'] / 255.0, image, rtol=2.5e-7, atol=0)
    label = np.load(os.path.join(folder, 'label_7' if cityscapes else 'label', f'{i}.npy'))
    np.testing.assert_array_equal(example['semseg'], np.where(label < 0, 255, label))
    np.testing.assert_array_equal(example['depth'], np.load(
        os.path.join(folder, 'depth', f'{i}.npy'))[..., 0])
    if not cityscapes:
      np.testing.assert_array_equal(example['normals'],
                                    np.load(os.path.join(folder, 'normal', f'{i}.npy')))


def test_missing_files_are_named(tmp_path):
  src = write_mtan(str(tmp_path / 'src'))
  os.remove(os.path.join(src, 'val', 'normal', '2.npy'))
  with pytest.raises(ValueError, match=r'val/normal/2\.npy: file not found'):
    pipeline.open_split(data_config(tmp_path, 'nyuv2_mtan', src), 'train', ('semseg',))


def _ramp_example(height=12, width=20):
  rows, cols = np.meshgrid(np.arange(height, dtype=np.float32),
                           np.arange(width, dtype=np.float32), indexing='ij')
  return {'image': tf.constant(np.stack([rows, cols, rows], -1)),
          'semseg': tf.constant((rows * 100 + cols).astype(np.int32)),
          'depth': tf.constant(rows + 1.0)}


@pytest.mark.parametrize('seed', range(4))
def test_scale_crop_is_mtpsls_random_scale_crop(seed):
  """MTPSL's RandomScaleCrop at s = 1.5: a crop of int(H/s) x int(W/s), resized back
  with F.interpolate (bilinear, align_corners=True for the image; 'nearest', the
  floor of dst * in / out, for labels; depth / s). On ramps both are exact."""
  height, width, scale = 12, 20, 1.5
  aug = ml_collections.ConfigDict({'name': 'mtan_scale_crop', 'scales': (scale,), 'flip': False})
  out = augment.train_transform(_ramp_example(height, width),
                                tf.constant([seed, 7], tf.int64), aug, (height, width),
                                normalization='unit_range')
  crop_h, crop_w = int(height / scale), int(width / scale)
  image = out['image'].numpy() * 255.0
  top, left = image[0, 0, 0], image[0, 0, 1]
  assert top == int(top) and 0 <= top <= height - crop_h and 0 <= left <= width - crop_w
  r = np.arange(height)[:, None]
  c = np.arange(width)[None, :]
  np.testing.assert_allclose(image[..., 0], np.broadcast_to(
      top + r * (crop_h - 1) / (height - 1), (height, width)), atol=1e-4)
  np.testing.assert_allclose(image[..., 1], np.broadcast_to(
      left + c * (crop_w - 1) / (width - 1), (height, width)), atol=1e-4)
  nearest_r, nearest_c = top + (r * crop_h) // height, left + (c * crop_w) // width
  np.testing.assert_array_equal(out['semseg'].numpy(), nearest_r * 100 + nearest_c)
  np.testing.assert_allclose(out['depth'].numpy(),
                             np.broadcast_to((nearest_r + 1.0) / scale, (height, width)))


def test_scale_crop_at_scale_one_is_the_identity():
  aug = ml_collections.ConfigDict({'name': 'mtan_scale_crop', 'scales': (1.0,), 'flip': False})
  example = _ramp_example()
  out = augment.train_transform(example, tf.constant([1, 2], tf.int64), aug, (12, 20),
                                normalization='unit_range')
  np.testing.assert_array_equal(out['image'].numpy() * 255.0, example['image'].numpy())
  np.testing.assert_array_equal(out['semseg'].numpy(), example['semseg'].numpy())


def _mtpsl_per_image_losses(logits, labels, depth_pred, depth, normals_pred, normals):
  """MTPSL model/segnet_mtl.py model_fit on one image, transcribed in NumPy."""
  logp = logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))
  valid = labels != 255
  semseg = -np.mean(np.take_along_axis(logp, np.where(valid, labels, 0)[..., None], -1)[..., 0][
      valid])
  mask = depth != 0
  depth_loss = np.sum(np.abs(depth_pred[..., 0] - depth) * mask) / np.count_nonzero(mask)
  unit = normals_pred / np.linalg.norm(normals_pred, axis=-1, keepdims=True)
  mask = np.sum(normals, -1) != 0
  normals_loss = 1 - np.sum(np.sum(unit * normals, -1) * mask) / np.count_nonzero(mask)
  return np.array([semseg, depth_loss, normals_loss])


@pytest.mark.parametrize('normalization', ['per_image', 'per_image_balanced'])
def test_per_image_normalisation_is_mtpsls_and_diffusionmtls(normalization):
  """MTPSL nyu_mtl_xtc.py: sum over images of the labelled tasks' per-image losses,
  over the batch size; DiffusionMTL losses/loss_schemes.py: each image's sum times
  T / its labelled tasks."""
  rng = np.random.default_rng(3)
  batch, height, width = 3, 8, 8
  logits = rng.normal(size=(batch, height, width, 13)).astype(np.float32)
  labels = rng.integers(0, 13, (batch, height, width)).astype(np.int32)
  labels[:, :2] = 255
  depth_pred = rng.normal(size=(batch, height, width, 1)).astype(np.float32)
  depth = np.where(rng.uniform(size=(batch, height, width)) < 0.2, 0,
                   rng.uniform(1, 5, (batch, height, width))).astype(np.float32)
  normals_pred = rng.normal(size=(batch, height, width, 3)).astype(np.float32)
  normals = rng.normal(size=(batch, height, width, 3))
  normals = (normals / np.linalg.norm(normals, axis=-1, keepdims=True)).astype(np.float32)
  normals[:, -1] = 0
  kept = np.array([[1, 0, 0], [0, 1, 1], [1, 1, 1]], bool)
  names = ('semseg', 'depth', 'normals')
  labelled = {t: jnp.asarray(kept[:, k]) for k, t in enumerate(names)}
  raws = {'semseg': logits, 'depth': depth_pred, 'normals': normals_pred}
  targets = {'semseg': labels, 'depth': depth, 'normals': normals}
  ours = sum(tasks_lib.get_task(t).compute_loss(
      raws[t], targets[t], {'loss': 'cosine'} if t == 'normals' else {}, labelled[t],
      tasks_lib.image_loss_weights(normalization, t, labelled, batch)) for t in names)
  per_image = np.stack([_mtpsl_per_image_losses(logits[b], labels[b], depth_pred[b], depth[b],
                                                normals_pred[b], normals[b])
                        for b in range(batch)])
  scale = 3 / kept.sum(1) if normalization == 'per_image_balanced' else np.ones(batch)
  want = np.sum((per_image * kept).sum(1) * scale) / batch
  # float32 losses of O(1) against a float64 transcription: 1e-5 relative is ~100 ulps.
  np.testing.assert_allclose(float(ours), want, rtol=1e-5)


def test_pooled_normalisation_is_unchanged():
  """The default builds no per-image weights: the step stays as it was."""
  assert tasks_lib.image_loss_weights('pooled', 'depth', None, 4) is None
  with pytest.raises(ValueError, match='config.loss_normalization'):
    tasks_lib.image_loss_weights('per_pixel', 'depth', None, 4)


def _cli(tmp_path, src, *flags):
  cmd = [sys.executable, '-m', 'cmtdp_jax.main', '--config=configs/nyuv2_segnet.py:onelabel',
         f'--workdir={tmp_path / "run"}', f'--config.data.data_dir={tmp_path / "tfds"}',
         f'--config.data.manual_dir={src}', f'--config.data.crop_size=({HEIGHT},{WIDTH})',
         '--config.model.backbone_kwargs.widths=(4,4,8,8,8)', '--config.num_steps=2',
         f'--config.data.label_mapping={SPLITS}/nyuv2_onelabel_legacy.pth', *flags]
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='2', TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_one_label_segnet_trains_and_evaluates_from_mtpsls_file(tmp_path):
  src = write_mtan(str(tmp_path / 'src'))
  proc = _cli(tmp_path, src)
  assert proc.returncode == 0, proc.stderr[-3000:]
  workdir = tmp_path / 'run'
  assert label_mapping.load(str(workdir)) == label_mapping.read(
      f'{SPLITS}/nyuv2_onelabel_legacy.pth', [str(i) for i in range(6)],
      ('semseg', 'depth', 'normals'), 'nyuv2_mtan')
  with open(workdir / 'eval' / 'step_2.json') as f:
    results = json.load(f)
  for key in ('semseg/mIoU', 'semseg/pixel_accuracy', 'depth/abs_err', 'depth/rmse',
              'normals/mean', 'normals/rmse', 'delta_m'):
    assert np.isfinite(results[key]), key
  assert results['semseg/images'] == SIZES['val']


@pytest.mark.parametrize('change,message', [
    (lambda tmp_path, src: [f'--config.data.manual_dir={tmp_path}/nowhere'],
     'nowhere: folder not found'),
    (lambda tmp_path, src: [f'--config.data.label_mapping={tmp_path}/onelabel.pth'],
     'config.data.label_mapping: no such file'),
    (lambda tmp_path, src: [f'--config.data.label_mapping={SPLITS}/cityscapes_onelabel_legacy.pth'],
     'a split file of another dataset (it fits cityscapes_mtan)?'),
])
def test_cli_errors_are_one_line(tmp_path, change, message):
  src = write_mtan(str(tmp_path / 'src'))
  proc = _cli(tmp_path, src, *change(tmp_path, src))
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert 'Traceback' not in proc.stderr and lines[-1].startswith('error:'), proc.stderr[-3000:]
  assert message in lines[-1]


def test_benchmark_configs_parse_with_every_variant():
  for name, settings in (('nyuv2_mtan', ('full', 'onelabel', 'randomlabels')),
                         ('cityscapes_mtan', ('full', 'onelabel'))):
    for setting in settings:
      config = protocol.partial_label_config(name, f'{setting},balanced')
      assert config.eval.delta_m_reference.endswith(setting)
      assert config.loss_normalization == 'per_image_balanced'
  with pytest.raises(ValueError, match="unknown config variant 'randomlabels'"):
    protocol.partial_label_config('cityscapes_mtan', 'randomlabels')
  config = protocol.partial_label_config('nyuv2_mtan', 'onelabel,mtpsl')
  assert config.regularizer.name == 'mtpsl' and config.regularizer.mtpsl.widths == 'segnet'
  assert jax.devices()
