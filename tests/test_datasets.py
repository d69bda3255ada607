"""Real-dataset builders, prepare CLI and protocol configs, on tiny fixtures.

Each fixture is written here in the exact on-disk layout of its packaging
(a few small images per split; `.mat` files with the real field structure),
then prepared and read back through the builders and the `pipeline` decoding
that training uses.
"""

import ast
import glob
import json
import math
import os
import pathlib
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
import scipy.io
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

tf = pytest.importorskip('tensorflow')

from cmtdp_jax import config_lib, protocol  # noqa: E402
from cmtdp_jax import data as data_lib  # noqa: E402
from cmtdp_jax.data import (augment, folder_io, nyud, pascal_context, pipeline,  # noqa: E402
                            prepare, synthetic, synthetic_world)
from cmtdp_jax.evaluation import scoring  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
NYUD_IDS = {'train': ('a1', 'a2', 'a3'), 'val': ('b1', 'b2')}
HEIGHT, WIDTH = 12, 16


def _data_config(tmp_path, name, src='', packaging=''):
  config = config_lib.base_config().data
  config.name = name
  config.data_dir = str(tmp_path / 'tfds')
  config.manual_dir = str(src)
  config.packaging = packaging
  return config


def _decoded(data_config, split):
  """The split's examples as `pipeline` decodes them for training, in order."""
  source = pipeline.open_split(data_config, split,
                               data_lib.get_dataset_spec(data_config.name).tasks)
  return list(pipeline.decoded_examples(source, split).as_numpy_iterator())


def _ids(builder, split):
  return [x['id'].decode() for x in builder.as_dataset(split=split).as_numpy_iterator()]


def _finished_or_partial(data_dir):
  return (list(pathlib.Path(data_dir).rglob('dataset_info.json')) +
          list(pathlib.Path(data_dir).rglob('*incomplete*')))


def _unit_normals(rng, height, width):
  normals = rng.normal(size=(height, width, 3)).astype(np.float32)
  return normals / np.linalg.norm(normals, axis=-1, keepdims=True)


def _png_normals(rng, height, width):
  """Unit normals as the peers' 8-bit PNGs hold them (decoded 2x/255 - 1)."""
  return np.round((_unit_normals(rng, height, width) + 1.0) * 127.5).astype(np.uint8)


def _write_nyud(src, packaging):
  """A NYUD folder of `packaging`; returns {id: raw arrays as written}."""
  rng = np.random.default_rng(0)
  for folder in ('images', 'segmentation', 'depth', 'normals', 'edge', 'gt_sets'):
    (src / folder).mkdir(parents=True)
  raw = {}
  for split, ids in NYUD_IDS.items():
    (src / 'gt_sets' / f'{split}.txt').write_text('\n'.join(ids) + '\n')
    for i in ids:
      image = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
      semseg = rng.integers(0, 41, (HEIGHT, WIDTH)).astype(np.uint8)
      semseg[0, :3] = (0, 1, 40)
      depth = rng.uniform(0.5, 5.0, (HEIGHT, WIDTH)).astype(np.float32)
      depth[1, :4] = 0.0
      edge = rng.random((HEIGHT, WIDTH)) < 0.2
      Image.fromarray(semseg).save(src / 'segmentation' / f'{i}.png')
      np.save(src / 'depth' / f'{i}.npy', depth)
      if packaging == 'nyud_mt':
        Image.fromarray(image).save(src / 'images' / f'{i}.jpg', quality=100)
        normals = _unit_normals(rng, HEIGHT, WIDTH)
        normals[2, :5] = 0.0
        np.save(src / 'normals' / f'{i}.npy', normals)
        np.save(src / 'edge' / f'{i}.npy', edge.astype(np.float32))
      else:
        Image.fromarray(image).save(src / 'images' / f'{i}.png')
        encoded = _png_normals(rng, HEIGHT, WIDTH)
        Image.fromarray(encoded).save(src / 'normals' / f'{i}.png')
        normals = 2.0 * encoded.astype(np.float32) / 255.0 - 1.0
        Image.fromarray(edge.astype(np.uint8) * 255).save(src / 'edge' / f'{i}.png')
      raw[i] = dict(image=image, semseg=semseg, depth=depth, normals=normals, edge=edge)
  return raw


@pytest.mark.parametrize('packaging', ['nyud_mt', 'nyudv2'])
def test_nyud_packaging_is_detected_and_decoded_to_task_conventions(tmp_path, packaging):
  src = tmp_path / 'src'
  raw = _write_nyud(src, packaging)
  builder = nyud.make_builder(_data_config(tmp_path, 'nyud', src))
  assert builder.builder_config.name == packaging
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {
      'train': 3, 'validation': 2}
  assert _ids(builder, 'validation') == ['b1', 'b2']
  # Once prepared, the folder is no longer needed.
  data_config = _data_config(tmp_path, 'nyud')
  assert nyud.make_builder(data_config).builder_config.name == packaging

  for example_id, example in zip(NYUD_IDS['val'], _decoded(data_config, 'validation')):
    r = raw[example_id]
    assert example['semseg'][0, :3].tolist() == [255, 0, 39]
    np.testing.assert_array_equal(example['semseg'], np.where(r['semseg'] == 0, 255,
                                                              r['semseg'].astype(int) - 1))
    np.testing.assert_array_equal(example['depth'], r['depth'])
    assert (example['depth'][1, :4] == 0).all()  # invalid stays 0
    np.testing.assert_allclose(example['normals'], r['normals'], atol=1e-6)
    np.testing.assert_array_equal(example['edge'], r['edge'])
    image_file = src / 'images' / f"{example_id}.{'jpg' if packaging == 'nyud_mt' else 'png'}"
    np.testing.assert_array_equal(example['image'], np.asarray(Image.open(image_file)))
    if packaging == 'nyud_mt':
      assert (example['normals'][2, :5] == 0).all()


def test_two_runs_preparing_one_dataset_share_the_first_ones_result(
    tmp_path, monkeypatch, capsys):
  """The second run starts while the first is generating (TFDS alone: FileExistsError
  at the second rename); it waits, then reads what the first one wrote."""
  config = _data_config(tmp_path, 'synthetic')
  config.image_size, config.num_train, config.num_eval = (32, 32), 4, 2
  builders, rendered = {}, []
  second = threading.Thread(
      target=lambda: builders.setdefault('second', synthetic.make_builder(config)))
  render = synthetic_world.render_scene

  def render_and_start_the_second_run(*args):
    rendered.append(args)
    if len(rendered) == 1:
      second.start()
      second.join(timeout=2)  # without the lock it would finish meanwhile
    return render(*args)
  monkeypatch.setattr(synthetic_world, 'render_scene', render_and_start_the_second_run)
  builders['first'] = synthetic.make_builder(config)
  second.join()
  for builder in builders.values():
    assert {s: i.num_examples for s, i in builder.info.splits.items()} == {
        'train': 4, 'validation': 2}
  assert len(rendered) == 6  # generated once
  out = capsys.readouterr().out
  assert 'Waiting for another run preparing synthetic_world/32x32_train4_eval2' in out
  # Progress with totals instead of TFDS's wording and bars, plain lines without a TTY.
  assert 'generating train: 4/4 examples (100%)' in out and 'Unknown size' not in out
  assert '\r' not in out


def test_unwritable_data_dir_stops_with_one_line_naming_it(tmp_path):
  """A data dir that cannot be created (here: below a file) is named in one line
  with the setting to change, instead of a traceback from the preparation lock."""
  (tmp_path / 'file').write_text('')
  config = _data_config(tmp_path, 'synthetic')
  config.data_dir = str(tmp_path / 'file' / 'tfds')
  config.image_size, config.num_train, config.num_eval = (32, 32), 4, 2
  with pytest.raises(ValueError, match=r'data dir .*file/tfds is not writable .*'
                                       r'--config.data.data_dir \(or TFDS_DATA_DIR\)'):
    synthetic.make_builder(config)


def test_unprepared_dataset_error_names_the_prepare_command(tmp_path):
  with pytest.raises(folder_io.FolderError,
                     match='python -m cmtdp_jax.data.prepare --dataset nyud --src DIR'):
    nyud.make_builder(_data_config(tmp_path, 'nyud'))


def test_folder_of_neither_nyud_packaging_is_refused(tmp_path):
  src = tmp_path / 'src'
  _write_nyud(src, 'nyud_mt')
  for path in (src / 'images').iterdir():
    path.unlink()
  with pytest.raises(folder_io.FolderError, match=r'images/a1\.jpg: not found \(nor \.png\)'):
    nyud.make_builder(_data_config(tmp_path, 'nyud', src))


def _remove_depth(src):
  os.remove(src / 'depth' / 'b2.npy')


def _wrong_depth_shape(src):
  np.save(src / 'depth' / 'b2.npy', np.ones((5, 7), np.float32))


def _garbage_semseg(src):
  (src / 'segmentation' / 'b1.png').write_bytes(b'not a png')


def _text_as_npy(src):
  (src / 'depth' / 'b2.npy').write_text('1.5 2.5\n')


def _unscaled_normals(src):
  np.save(src / 'normals' / 'a2.npy', np.full((HEIGHT, WIDTH, 3), 5.0, np.float32))


def _nan_depth(src):
  np.save(src / 'depth' / 'b1.npy', np.full((HEIGHT, WIDTH), np.nan, np.float32))


def _negative_depth(src):
  np.save(src / 'depth' / 'b1.npy', np.full((HEIGHT, WIDTH), -1.0, np.float32))


def _edge_255(src):
  np.save(src / 'edge' / 'a3.npy', np.load(src / 'edge' / 'a3.npy') * 255)


def _val_shares_train_ids(src):
  (src / 'gt_sets' / 'val.txt').write_text('b1\na2\nb2\n')


@pytest.mark.parametrize('break_folder, message', [
    (_remove_depth, 'depth/b2.npy: file not found'),
    (_wrong_depth_shape, 'depth/b2.npy: label shape (5, 7) differs from the expected (12, 16)'),
    (_garbage_semseg, 'segmentation/b1.png: unreadable image'),
    (_text_as_npy, "depth/b2.npy: not a NumPy .npy file (it starts with b'1.5 2.')"),
    (_unscaled_normals, 'normals/a2.npy: normals are not unit vectors: 100% of the pixels have '
                        'lengths other than 1 (median 8.66)'),
    (_nan_depth, 'depth/b1.npy: no valid depth value (all are NaN, infinite, zero or negative)'),
    (_negative_depth, 'depth/b1.npy: no valid depth value'),
    (_edge_255, 'edge/a3.npy: unexpected label values [255.0] (edge .npy files hold 0 and 1)'),
    (_val_shares_train_ids, 'gt_sets/val.txt: shares 1 ids with'),
])
def test_prepare_stops_at_a_bad_file_with_one_line_and_leaves_nothing(
    tmp_path, capsys, break_folder, message):
  src = tmp_path / 'src'
  _write_nyud(src, 'nyud_mt')
  break_folder(src)
  code = prepare.main(['--dataset', 'nyud', '--src', str(src),
                       '--data_dir', str(tmp_path / 'tfds')])
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith('error:')]
  assert code == 1
  assert len(errors) == 1 and message in errors[0], err
  assert 'Traceback' not in err
  assert not _finished_or_partial(tmp_path / 'tfds')


def test_edge_pngs_must_be_0_or_255(tmp_path):
  src = tmp_path / 'src'
  _write_nyud(src, 'nyudv2')
  Image.fromarray(np.eye(HEIGHT, WIDTH, dtype=np.uint8)).save(src / 'edge' / 'a1.png')  # 1 = edge
  with pytest.raises(folder_io.FolderError,
                     match=r'edge/a1.png: unexpected label values \[1\] \(edge PNGs hold 0 and 255'):
    nyud.make_builder(_data_config(tmp_path, 'nyud', src))


def test_a_few_off_unit_normals_are_invalid_with_one_warning(tmp_path, caplog):
  src = tmp_path / 'src'
  raw = _write_nyud(src, 'nyud_mt')
  for example_id in ('b1', 'b2'):
    normals = raw[example_id]['normals'].copy()
    normals[5, 5] = 3.0  # 1 pixel of 192: below the share that refuses a file
    np.save(src / 'normals' / f'{example_id}.npy', normals)
  data_config = _data_config(tmp_path, 'nyud', src)
  with caplog.at_level('WARNING'):
    nyud.make_builder(data_config)
  warnings = [r.getMessage() for r in caplog.records if 'not unit length' in r.getMessage()]
  assert len(warnings) == 1 and warnings[0].startswith(
      'validation: 2 normals pixels in 2 files were not unit length'), warnings
  for example in _decoded(data_config, 'validation'):
    assert (example['normals'][5, 5] == 0).all()


def test_prepare_cli_exit_code_and_summary(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL='3')
  run = lambda src: subprocess.run(
      [sys.executable, '-m', 'cmtdp_jax.data.prepare', '--dataset', 'nyud', '--src', str(src),
       '--data_dir', str(tmp_path / 'tfds')], capture_output=True, text=True, env=env)
  missing = run(tmp_path / 'nowhere')
  assert missing.returncode == 1
  last_line = missing.stderr.strip().splitlines()[-1]
  assert last_line == f"error: {tmp_path / 'nowhere'}: folder not found"
  assert 'Traceback' not in missing.stderr

  _write_nyud(tmp_path / 'src', 'nyudv2')
  done = run(tmp_path / 'src')
  assert done.returncode == 0, done.stderr
  assert 'nyud/nyudv2/1.0.0 prepared in' in done.stdout
  assert 'train: 3 examples' in done.stdout and 'validation: 2 examples' in done.stdout
  assert 'semseg % of pixels per class: 0:' in done.stdout


def _anno(objects):
  """A PASCAL-Part 'anno' struct; objects = [(class, class index, mask, [(part, mask)])]."""
  array = np.zeros((1, len(objects)),
                   dtype=[('class', 'O'), ('class_ind', 'O'), ('mask', 'O'), ('parts', 'O')])
  for k, (name, index, mask, parts) in enumerate(objects):
    part_array = np.zeros((1, len(parts)), dtype=[('part_name', 'O'), ('mask', 'O')])
    for j, (part, part_mask) in enumerate(parts):
      part_array[0, j] = (part, part_mask.astype(np.uint8))
    array[0, k] = (name, np.array([[index]], np.uint8), mask.astype(np.uint8),
                   part_array if parts else np.zeros((0, 0)))
  return {'anno': {'imname': 'x', 'objects': array}}


PASCAL_IDS = {'train': ('2008_000001',), 'val': ('2008_000002', '2008_000003', '2008_000004'),
              'test_new': ('2008_000003',)}
PASCAL_SIZES = {'2008_000001': (12, 16), '2008_000002': (12, 16), '2008_000003': (14, 10),
                '2008_000004': (12, 16)}
PART_ROWS = (('hair', 1), ('neck', 2), ('luarm', 3), ('rhand', 4), ('ruleg', 5), ('lfoot', 6))


def _row_mask(height, width, row):
  mask = np.zeros((height, width), bool)
  mask[row] = True
  return mask


def _write_pascal(src):
  """A PASCAL_MT folder: 2008_000002 has a person with six parts (and a cat with a
  'head' part, which must not count), 2008_000003 a person without parts,
  2008_000001/4 no person. Returns {id: raw arrays as written}."""
  rng = np.random.default_rng(1)
  for folder in ('JPEGImages', 'ImageSets/Context', 'semseg/VOC12', 'semseg/pascal-context',
                 'pascal-context/trainval', 'human_parts', 'normals_distill', 'sal_distill'):
    (src / folder).mkdir(parents=True)
  for split, ids in PASCAL_IDS.items():
    (src / 'ImageSets' / 'Context' / f'{split}.txt').write_text('\n'.join(ids) + '\n')
  raw = {}
  for i, (height, width) in PASCAL_SIZES.items():
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
        src / 'JPEGImages' / f'{i}.jpg')
    label_map = np.full((height, width), 72, np.uint16)  # chair: NYUD has it
    label_map[:, width // 2:] = 2  # aeroplane: NYUD has not
    scipy.io.savemat(src / 'pascal-context' / 'trainval' / f'{i}.mat', {'LabelMap': label_map})
    semseg = rng.integers(0, 21, (height, width)).astype(np.uint8)
    semseg[0, 0] = 255
    Image.fromarray(semseg).save(src / 'semseg' / 'pascal-context' / f'{i}.png')
    if i == '2008_000002':  # VOC12 takes precedence over pascal-context
      semseg = (semseg + 1) % 21
      Image.fromarray(semseg).save(src / 'semseg' / 'VOC12' / f'{i}.png')
    normals = _png_normals(rng, height, width)
    Image.fromarray(normals).save(src / 'normals_distill' / f'{i}.png')
    sal = rng.choice(np.array([0, 127, 128, 255], np.uint8), (height, width))
    Image.fromarray(sal).save(src / 'sal_distill' / f'{i}.png')
    whole = np.ones((height, width), bool)
    if i == '2008_000002':
      rows = [(name, _row_mask(height, width, r)) for r, (name, _) in enumerate(PART_ROWS)]
      cat_head = _row_mask(height, width, height - 1)
      objects = [('person', 15, whole, rows), ('cat', 8, whole, [('head', cat_head)])]
    elif i == '2008_000003':
      objects = [('person', 15, whole, [])]
    else:
      objects = [('dog', 12, whole, [])]
    scipy.io.savemat(src / 'human_parts' / f'{i}.mat', _anno(objects))
    raw[i] = dict(label_map=label_map, semseg=semseg, normals=normals, sal=sal)
  return raw


def test_pascal_context_labels_follow_the_peers(tmp_path):
  src = tmp_path / 'src'
  raw = _write_pascal(src)
  data_config = _data_config(tmp_path, 'pascal_context', src)
  builder = pascal_context.make_builder(data_config)
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {
      'train': 1, 'validation': 3, 'test_new': 1}
  assert _ids(builder, 'test_new') == ['2008_000003']

  examples = dict(zip(PASCAL_IDS['val'], _decoded(data_config, 'validation')))
  for example_id, example in examples.items():
    r = raw[example_id]
    assert example['image'].shape == PASCAL_SIZES[example_id] + (3,)
    np.testing.assert_array_equal(example['semseg'], r['semseg'])
    valid = (r['label_map'] == 72)[..., None]
    np.testing.assert_allclose(example['normals'],
                               np.where(valid, 2.0 * r['normals'] / 255.0 - 1.0, 0.0), atol=1e-6)
    np.testing.assert_array_equal(example['sal'], r['sal'] >= 128)
    # Edges only along the chair/aeroplane boundary, thinned to one pixel per row.
    width = PASCAL_SIZES[example_id][1]
    columns = np.nonzero(example['edge'])[1]
    assert set(columns) <= {width // 2 - 1, width // 2}
    assert example['edge'].sum(axis=1).max() == 1 and example['edge'].sum() >= 5

  parts = examples['2008_000002']['human_parts']
  for row, (_, label) in enumerate(PART_ROWS):
    assert (parts[row] == label).all()
  assert (parts[len(PART_ROWS):] == 0).all()  # the cat's 'head' is no human part
  assert (examples['2008_000003']['human_parts'] == 255).all()  # person without parts
  assert (examples['2008_000004']['human_parts'] == 255).all()  # no person


def test_laplacian_edges_have_cv2_semantics():
  label_map = np.full((5, 5), 2)
  label_map[2, 1], label_map[2, 3] = 1, 3  # (2, 2): neighbours differ, Laplacian is 0
  edges = pascal_context.context_edges(label_map)
  assert not edges[2, 2] and edges[2, 3]


def test_normals_classes_come_from_the_folder_when_it_has_the_lists(tmp_path):
  class_lists = {'nyu': {'chair': 5, 'unknown': 20, 'wall': 21},
                 'context': {'chair': 72, 'tvmonitor': 427, 'unknown': 431, 'wall': 440}}
  (tmp_path / 'json').mkdir()
  for name, classes in class_lists.items():
    (tmp_path / 'json' / f'{name}_classes.json').write_text(json.dumps(classes))
  assert pascal_context.normals_classes(tmp_path) == (72, 427, 440)
  embedded = pascal_context.normals_classes(tmp_path / 'no_lists')
  assert len(embedded) == 170 and {72, 284, 427, 440} <= set(embedded)
  assert 2 not in embedded  # aeroplane


def test_variable_sizes_pad_to_the_eval_size(tmp_path):
  src = tmp_path / 'src'
  _write_pascal(src)
  config = config_lib.base_config()
  config.data = _data_config(tmp_path, 'pascal_context', src)
  config.data.eval_crop_size = (16, 16)
  config.eval_batch_size = 3
  source = pipeline.open_split(config.data, 'validation', ('semseg', 'normals'))
  (batch,) = list(pipeline.eval_dataset(source, config).as_numpy_iterator())
  assert batch['image'].shape == (3, 16, 16, 3) and batch['normals'].shape == (3, 16, 16, 3)
  # Centred (ATRC's PadImage): example 1 is 14x10, so 1 row above and 3 columns left of it.
  np.testing.assert_array_equal(batch['size'][1], (14, 10))
  np.testing.assert_array_equal(batch['offset'][1], (1, 3))
  assert (batch['semseg'][1, :1] == 255).all() and (batch['semseg'][1, 15:] == 255).all()
  assert (batch['semseg'][1, :, :3] == 255).all() and (batch['semseg'][1, :, 13:] == 255).all()


def test_pascal_protocol_scores_edges_on_test_new_and_the_rest_on_val(tmp_path):
  """The literature's PASCAL evaluation in one run: boundaries on SEISM's test_new ids, every
  other task on all val images (here 1 of 3 and 3)."""
  src = tmp_path / 'src'
  _write_pascal(src)
  config = config_lib.base_config()
  config.data = _data_config(tmp_path, 'pascal_context', src)
  config.tasks = ('semseg', 'edge')
  config.eval_batch_size = 2
  config.eval.metric_options.edge.thresholds = 5
  assert protocol.protocol_config('pascal_context', 'compact', 'baseline').eval.subset_split == \
      'test_new'
  config.eval.subset_split = 'test_new'
  source = pipeline.open_eval_split(config)
  assert source.split == 'validation' and source.subset_ids == frozenset({'2008_000003'})
  metrics = scoring.eval_metrics(config, source)
  for batch in pipeline.eval_dataset(source, config).as_numpy_iterator():
    perfect = {t: np.where(batch[t] == 255, 0, batch[t]).astype(np.float32) if t == 'edge'
               else batch[t] for t in config.tasks}
    scoring.update_metrics(metrics, batch, perfect)
  assert {t: m.num_images for t, m in metrics.items()} == {'semseg': 3, 'edge': 1}
  assert metrics['semseg'].result()['semseg/mIoU'] == pytest.approx(100.0)
  config.eval.subset_split = 'missing'
  with pytest.raises(ValueError, match="config.eval.subset_split: .* no split 'missing'"):
    pipeline.open_eval_split(config)
  config.tasks = ('semseg',)  # no task is scored on the subset: nothing to read
  assert pipeline.open_eval_split(config).subset_ids is None


def _seg2bmap_reference(seg):
  """BSDS seg2bmap.m line by line: e, s, se neighbours, then the last row, column, corner."""
  e, south, se = (np.zeros(seg.shape, seg.dtype) for _ in range(3))
  e[:, :-1] = seg[:, 1:]
  south[:-1, :] = seg[1:, :]
  se[:-1, :-1] = seg[1:, 1:]
  b = (seg != e) | (seg != south) | (seg != se)
  b[-1, :] = seg[-1, :] != e[-1, :]
  b[:, -1] = seg[:, -1] != south[:, -1]
  b[-1, -1] = False
  return b


def test_seism_ground_truth_is_thinned_seg2bmap():
  rng = np.random.default_rng(5)
  for _ in range(20):
    seg = rng.integers(0, 3, (9, 11)).repeat(2, axis=0).repeat(2, axis=1)
    np.testing.assert_array_equal(pascal_context.seg2bmap(seg), _seg2bmap_reference(seg))
    thinned = pascal_context.seism_edges(seg)
    assert not (thinned & ~_seg2bmap_reference(seg)).any()
  split = np.zeros((4, 6), np.uint16)
  split[:, 3:] = 7
  expected = np.zeros((4, 6), bool)
  expected[:, 2] = True  # the pixel west of the change, half a pixel towards the origin
  np.testing.assert_array_equal(pascal_context.seism_edges(split), expected)


def test_edge_ground_truth_tool_scores_the_training_label_against_seism():
  from cmtdp_jax.benchmarks import edge_ground_truth  # pylint: disable=import-outside-toplevel
  split = np.zeros((12, 16), np.uint16)
  split[:, 8:] = 7
  out = edge_ground_truth.compare([('split', split)], max_dist=0.1)
  label = int(pascal_context.context_edges(split).sum())
  assert out['SEISM pixels'] == 12 and out['training label pixels'] == label
  recall = min(label, 12) / 12  # within the tolerance every pixel can match
  precision = min(label, 12) / label
  assert out['F of the training label against SEISM'] == pytest.approx(
      100 * 2 * precision * recall / (precision + recall))
  far = edge_ground_truth.compare([('split', split)], max_dist=0.001)  # under one pixel
  assert far['F of the training label against SEISM'] < 100.0


def test_pascal_eval_can_score_edges_against_seism_ground_truth(tmp_path):
  src = tmp_path / 'src'
  raw = _write_pascal(src)
  config = config_lib.base_config()
  config.data = _data_config(tmp_path, 'pascal_context', src)
  config.tasks = ('edge',)
  config.eval_batch_size = 3
  assert protocol.protocol_config('pascal_context', 'compact',
                                  'baseline').eval.edge_ground_truth == 'seism'
  labels = {}
  for truth in ('label', 'seism'):
    config.eval.edge_ground_truth = truth
    (batch,) = pipeline.eval_dataset(pipeline.open_eval_split(config), config).as_numpy_iterator()
    labels[truth] = [augment.crop_to_original(batch['edge'][i], batch['offset'][i],
                                              batch['size'][i]) for i in range(3)]
  for i, example_id in enumerate(('2008_000002', '2008_000003', '2008_000004')):
    label_map = raw[example_id]['label_map']
    np.testing.assert_array_equal(labels['seism'][i], pascal_context.seism_edges(label_map))
    np.testing.assert_array_equal(labels['label'][i], pascal_context.context_edges(label_map))
  config.eval.edge_ground_truth = 'matlab'
  with pytest.raises(ValueError, match="config.eval.edge_ground_truth: unknown 'matlab'"):
    pipeline.open_eval_split(config)


@pytest.mark.parametrize('device_prefetch', [0, 1, 3, 10])
def test_device_prefetch_keeps_order_and_runs_ahead(monkeypatch, device_prefetch):
  images = np.arange(5 * 8 * 2, dtype=np.float32).reshape(5, 8, 2)
  ds = tf.data.Dataset.from_tensor_slices({'image': images})
  converted = []
  to_global = pipeline.to_global
  monkeypatch.setattr(pipeline, 'to_global',
                      lambda batch, sharding: converted.append(1) or to_global(batch, sharding))
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  batches = pipeline.global_batches(ds.as_numpy_iterator(), NamedSharding(mesh, P('data')),
                                    device_prefetch)
  seen = []
  for batch in batches:
    # Conversions run ahead of what was consumed, up to the end of the data.
    assert len(converted) == min(len(seen) + 1 + device_prefetch, len(images))
    seen.append(np.asarray(batch['image']))
  np.testing.assert_array_equal(np.stack(seen), images)


def test_train_augmentation_keeps_real_labels_consistent(tmp_path):
  src = tmp_path / 'src'
  _write_nyud(src / 'nyud', 'nyud_mt')
  _write_pascal(src / 'pascal')
  aug = protocol.protocol_config('nyud', 'hrnet_w18_small_v2', 'baseline').data.augment
  first = lambda config: {k: tf.constant(v) for k, v in _decoded(config, 'train')[0].items()}
  nyud_example = first(_data_config(tmp_path, 'nyud', src / 'nyud'))
  no_person = first(_data_config(tmp_path, 'pascal_context', src / 'pascal'))
  for seed in range(4):
    seed = tf.constant([seed, 7], tf.int64)
    out = augment.train_transform(nyud_example, seed, aug, (10, 14))
    assert out['image'].shape == (10, 14, 3)
    assert set(np.unique(out['semseg'])) <= set(range(40)) | {255}
    assert set(np.unique(out['edge'])) <= {0, 1, 255}
    assert (out['depth'].numpy() >= 0).all()
    norms = np.linalg.norm(out['normals'], axis=-1)
    assert np.all((norms == 0) | (np.abs(norms - 1) < 1e-5))
    parts = augment.train_transform(no_person, seed, aug, (10, 14))['human_parts']
    assert (parts.numpy() == 255).all()


CONFIG_FILES = sorted(glob.glob(str(REPO / 'configs' / 'nyud_*.py')) +
                      glob.glob(str(REPO / 'configs' / 'pascal_*.py')))


@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda p: pathlib.Path(p).stem)
def test_protocol_config_files_and_variants_validate(path):
  config = config_lib.load_config_file(path)
  tasks = data_lib.get_dataset_spec(config.data.name).tasks
  for variant in ['', 'contrastive'] + [f'single_task={t}' for t in tasks]:
    config = config_lib.load_config_file(f'{path}:{variant}' if variant else path)
    # 8 data-parallel devices where the batch splits over them; InvPT's batch of 6 over 2.
    config_lib.validate(config, math.gcd(config.batch_size, 8))
    assert config.contrastive.enable == (variant == 'contrastive')
    if variant.startswith('single_task'):
      assert config.model.framework == 'single_task' and len(config.tasks) == 1


def test_protocol_values():
  nyud_config = protocol.protocol_config('nyud', 'hrnet_w48', 'padnet')
  assert tuple(nyud_config.tasks) == ('semseg', 'depth', 'normals', 'edge')
  assert tuple(nyud_config.data.crop_size) == (425, 560)
  assert tuple(nyud_config.data.eval_crop_size) == (425, 560)  # ATRC: pad only up to the crop
  assert (nyud_config.optim.lr, nyud_config.loss_options.edge.pos_weight,
          nyud_config.eval.metric_options.edge.max_dist) == (0.01, 0.8, 0.011)
  pascal = protocol.protocol_config('pascal_context', 'hrnet_w18_small_v2', 'mtinet',
                                    'contrastive')
  assert tuple(pascal.data.crop_size) == tuple(pascal.data.eval_crop_size) == (512, 512)
  assert (pascal.optim.lr, pascal.loss_options.edge.pos_weight,
          pascal.eval.metric_options.edge.max_dist) == (0.005, 0.95, 0.0075)
  assert (pascal.optim.name, pascal.optim.momentum, pascal.optim.weight_decay,
          pascal.optim.poly_power, pascal.num_steps, pascal.batch_size) == (
              'sgd', 0.9, 5e-4, 0.9, 40_000, 8)
  assert 'edge' not in protocol.protocol_config('nyud', 'hrnet_w48', 'baseline',
                                                'single_task=depth').loss_options
  with pytest.raises(ValueError, match="unknown config variant 'single_task=sal'"):
    protocol.protocol_config('nyud', 'hrnet_w48', 'baseline', 'single_task=sal')


def test_data_layer_imports_nothing_above_it():
  """cmtdp_jax.data reads and augments datasets; scoring (evaluation) and the models sit on
  top of it, never the other way round (pipeline.py imported evaluation to score batches).
  Leaf modules below both may be imported: the task registry, progress lines, thinning."""
  allowed = ('cmtdp_jax.data', 'cmtdp_jax.tasks', 'cmtdp_jax.progress', 'cmtdp_jax.thinning')
  found = []
  for path in sorted((REPO / 'cmtdp_jax' / 'data').glob('*.py')):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        modules = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module == 'cmtdp_jax':
        modules = [f'cmtdp_jax.{a.name}' for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        modules = [node.module or '']
      else:
        continue
      found += [f'{path.name}:{node.lineno} {m}' for m in modules
                if m.startswith('cmtdp_jax') and not m.startswith(allowed)]
  assert not found, found
