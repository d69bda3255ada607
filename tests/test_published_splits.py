"""The field's published split files, read as they are, without PyTorch and without
running anything in them (cmtdp_jax/pickled.py, label_mapping.read_published).

The fixtures in tests/golden/splits/ were written by torch.save / np.save in each
published format (tests/golden/make_split_fixtures.py); expected.json holds what
`torch.load` / `np.load(allow_pickle=True)` gave for them.
"""

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from cmtdp_jax import label_mapping
from cmtdp_jax import pickled
from cmtdp_jax.tools import convert_split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = os.path.join(ROOT, 'tests', 'golden', 'splits')
NYU_IDS = [str(i) for i in range(6)]
NYU_TASKS = ('semseg', 'depth', 'normals')


def fixture(name):
  return os.path.join(SPLITS, name)


def as_lists(value):
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, dict):
    return {str(k): as_lists(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [as_lists(v) for v in value]
  return value


with open(fixture('expected.json')) as _f:
  EXPECTED = json.load(_f)


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_reads_what_torch_load_gives(name):
  assert as_lists(pickled.load(fixture(name))) == EXPECTED[name]


def test_torch_load_still_agrees_where_torch_is_installed():
  torch = pytest.importorskip('torch', reason='the fixtures were checked against torch.load '
                                               'when written; this rechecks them live')
  for name in EXPECTED:
    if name.endswith('.pth'):
      value = torch.load(fixture(name), weights_only=False)
      if 'labels_weights' in value:
        np.testing.assert_array_equal(pickled.load(fixture(name))['labels_weights'],
                                      value['labels_weights'].numpy())


@pytest.mark.parametrize('name,want', [
    ('nyuv2_onelabel_legacy.pth', {'0': ('semseg',), '1': ('depth',), '2': ('normals',),
                                   '3': ('semseg',), '4': ('depth',), '5': ('normals',)}),
    ('nyuv2_random_zip.pth', {'0': ('semseg',), '1': ('depth', 'normals'),
                              '2': ('depth', 'semseg'), '3': ('normals',),
                              '4': ('normals', 'semseg'), '5': ('depth',)}),
])
def test_mtpsl_rows_become_image_ids(name, want):
  assert label_mapping.read(fixture(name), NYU_IDS, NYU_TASKS, 'nyuv2_mtan') == want


def test_strided_tensor_reads_as_its_values():
  assert label_mapping.read(fixture('nyuv2_strided_zip.pth'), NYU_IDS, NYU_TASKS,
                            'nyuv2_mtan') == label_mapping.read(
                                fixture('nyuv2_random_zip.pth'), NYU_IDS, NYU_TASKS, 'nyuv2_mtan')


def test_pascal_formats_agree():
  """MTPSL's {task: ids} .npy and DiffusionMTL's {id: row} .pth in its column order."""
  ids = ['2008_000002', '2008_000003', '2008_000007', '2008_000009', '2008_000016']
  tasks = ('semseg', 'human_parts', 'sal', 'normals', 'edge')
  npy = label_mapping.read(fixture('pascal_onelabel.npy'), ids, tasks, 'pascal_context')
  assert npy == {'2008_000002': ('semseg',), '2008_000003': ('human_parts', 'semseg'),
                 '2008_000007': ('sal', 'semseg'),
                 '2008_000009': ('human_parts', 'normals', 'semseg'),
                 '2008_000016': ('edge', 'sal', 'semseg')}
  rows = label_mapping.read(fixture('pascal_diffusionmtl_zip.pth'), ids, tasks, 'pascal_context')
  assert rows == {'2008_000002': ('semseg',), '2008_000003': ('human_parts',),
                  '2008_000007': ('sal',), '2008_000009': ('normals',), '2008_000016': ('edge',)}


def _legacy_file(payload: bytes) -> bytes:
  """A legacy torch.save stream whose object pickle is `payload`."""
  head = b''.join(pickle.dumps(v, protocol=2) for v in (
      pickled.LEGACY_MAGIC, 1001, {'little_endian': True}))
  return head + payload + pickle.dumps([], protocol=2)


class _RunsCode:
  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (os.system, (f'touch {self.path}',))


def _malicious_files(tmp_path, sentinel):
  payload = pickle.dumps({'labels_weights': _RunsCode(sentinel)}, protocol=2)
  legacy = tmp_path / 'evil_legacy.pth'
  legacy.write_bytes(_legacy_file(payload))
  zipped = tmp_path / 'evil_zip.pth'
  with zipfile.ZipFile(zipped, 'w') as archive:
    archive.writestr('archive/data.pkl', payload)
  npy = tmp_path / 'evil.npy'
  buffer = io.BytesIO()
  np.lib.format.write_array_header_1_0(buffer, {'descr': '|O', 'fortran_order': False,
                                                'shape': ()})
  npy.write_bytes(buffer.getvalue() + payload)  # the header starts with the magic
  return legacy, zipped, npy


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
  sentinel = tmp_path / 'ran'
  for path in _malicious_files(tmp_path, sentinel):
    with pytest.raises(pickled.RefusedPickle) as error:
      label_mapping.read(str(path), NYU_IDS, NYU_TASKS, 'nyuv2_mtan')
    message = str(error.value)
    assert message.startswith(str(path)) and '\n' not in message
    assert 'system' in message and 'nothing of it was run' in message
    assert not sentinel.exists()


def test_the_malicious_fixture_would_run_code_if_unpickled(tmp_path):
  """The refusal above is not vacuous: plain pickle runs this payload."""
  sentinel = tmp_path / 'ran'
  pickle.loads(pickle.dumps(_RunsCode(sentinel), protocol=2))
  assert sentinel.exists()


@pytest.mark.parametrize('name,dataset,ids,message', [
    ('cityscapes_onelabel_legacy.pth', 'nyuv2_mtan', NYU_IDS,
     'rows of 2 tasks, but this dataset\'s published files have 3 (semseg, depth, normals): '
     'a split file of another dataset (it fits cityscapes_mtan)?'),
    ('nyuv2_onelabel_legacy.pth', 'nyuv2_mtan', NYU_IDS[:4],
     '6 rows, but the train split has 4 images: a split file of another dataset'),
    ('nyuv2_onelabel_legacy.pth', 'nyud', NYU_IDS,
     "no published split file is known for config.data.name='nyud'"),
    ('pascal_diffusionmtl_zip.pth', 'nyuv2_mtan', NYU_IDS, 'has 5 label weights, but'),
])
def test_a_file_of_another_shape_is_refused_in_one_line(name, dataset, ids, message):
  with pytest.raises(ValueError) as error:
    label_mapping.read(fixture(name), ids, NYU_TASKS, dataset)
  assert str(error.value).startswith(fixture(name)) and message in str(error.value)
  assert '\n' not in str(error.value)


def test_weights_other_than_0_or_1_are_refused(tmp_path):
  path = tmp_path / 'halves.pth'
  path.write_bytes(_legacy_file(pickle.dumps({'labels_weights': np.full((6, 3), 0.5)})))
  with pytest.raises(ValueError, match='must be 0 or 1'):
    label_mapping.read(str(path), NYU_IDS, NYU_TASKS, 'nyuv2_mtan')


def test_truncated_file_is_one_line(tmp_path):
  path = tmp_path / 'cut.pth'
  path.write_bytes(open(fixture('nyuv2_onelabel_legacy.pth'), 'rb').read()[:-20])
  with pytest.raises(ValueError) as error:
    label_mapping.read(str(path), NYU_IDS, NYU_TASKS, 'nyuv2_mtan')
  assert str(error.value).startswith(str(path)) and '\n' not in str(error.value)


def test_convert_split_prints_counts_and_writes_json_that_reads_back(tmp_path):
  out = tmp_path / 'random.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'cmtdp_jax.tools.convert_split', fixture('nyuv2_random_zip.pth'),
       '--dataset', 'nyuv2_mtan', '--num_images', '6', '--out', str(out)],
      cwd=ROOT, capture_output=True, text=True, check=True)
  assert '6 images; labelled per task: depth 3, normals 3, semseg 3' in proc.stdout
  assert 'images by number of labelled tasks: 1 task: 3, 2 tasks: 3' in proc.stdout
  assert label_mapping.read(str(out), NYU_IDS, NYU_TASKS) == label_mapping.read(
      fixture('nyuv2_random_zip.pth'), NYU_IDS, NYU_TASKS, 'nyuv2_mtan')


def test_convert_split_checks_the_published_size():
  with pytest.raises(ValueError, match='6 rows, but the train split has 795 images'):
    convert_split.convert(fixture('nyuv2_random_zip.pth'), 'nyuv2_mtan')
