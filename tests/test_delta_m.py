"""delta_m signs and values, missing baselines, result loading and tables."""

import json
import os

import pytest

from cmtdp_jax import atomic_json
from cmtdp_jax import config_lib
from cmtdp_jax import evaluation

MULTI = {'semseg/mIoU': 40.0, 'depth/rmse': 0.5, 'normals/mean': 22.0, 'edge/odsF': 70.0,
         'normals/median': 15.0}
SINGLE = {'semseg/mIoU': 36.0, 'depth/rmse': 0.6, 'normals/mean': 20.0, 'edge/odsF': 70.0}


def test_delta_m_signs_and_value():
  result = evaluation.delta_m(MULTI, SINGLE)
  deltas = {task: delta for task, _, _, _, delta in result.rows}
  assert deltas['semseg'] == pytest.approx(100 * 4 / 36)  # higher mIoU: better
  assert deltas['depth'] == pytest.approx(100 * 0.1 / 0.6)  # lower rmse: better
  assert deltas['normals'] == pytest.approx(-100 * 2 / 20)  # higher angle: worse
  assert deltas['edge'] == 0.0
  assert result.value == pytest.approx(sum(deltas.values()) / 4)
  assert result.missing == ()
  assert 'delta_m: +' in str(result)


def test_missing_baseline_makes_delta_m_unavailable():
  single = {k: v for k, v in SINGLE.items() if k != 'depth/rmse'}
  result = evaluation.delta_m(MULTI, single)
  assert result.value is None
  assert result.missing == ('no single-task depth/rmse',)
  text = str(result)
  assert '(missing)' in text and 'n/a' in text and 'depth/rmse' in text.splitlines()[-1]


def test_no_baselines_or_no_tasks():
  assert evaluation.delta_m(MULTI, None).value is None
  empty = evaluation.delta_m({}, SINGLE)
  assert empty.value is None and empty.missing
  missing_multi = evaluation.delta_m(MULTI, SINGLE, tasks=['semseg', 'sal'])
  assert missing_multi.value is None and missing_multi.missing == ('no multi-task sal/maxF',)
  zero = evaluation.delta_m(MULTI, {**SINGLE, 'edge/odsF': 0.0})
  assert zero.value is None
  with pytest.raises(ValueError, match='no primary metric'):
    evaluation.delta_m(MULTI, SINGLE, tasks=['optical_flow'])


def test_primary_metric_override():
  primary = {**evaluation.PRIMARY_METRICS, 'sal': 'sal/mIoU'}
  result = evaluation.delta_m({'sal/mIoU': 66.0}, {'sal/mIoU': 60.0}, primary=primary)
  assert result.value == pytest.approx(10.0)


def _write(path, values):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(values, f)


def test_load_single_task_results_from_workdirs_and_files(tmp_path):
  semseg_dir = tmp_path / 'semseg'
  _write(str(semseg_dir / 'eval' / 'step_200.json'), {'semseg/mIoU': 30.0})
  _write(str(semseg_dir / 'eval' / 'step_1000.json'), {'semseg/mIoU': 36.0, 'depth/rmse': 9.0})
  _write(str(tmp_path / 'edge.json'), {'edge/odsF': 70.0})
  results = evaluation.load_single_task_results({
      'semseg': str(semseg_dir),  # largest step wins; other tasks' keys dropped
      'edge': str(tmp_path / 'edge.json'),
      'depth': str(tmp_path / 'never_trained'),
  })
  assert results == {'semseg/mIoU': 36.0, 'edge/odsF': 70.0}
  assert evaluation.delta_m(MULTI, results).missing == ('no single-task depth/rmse',
                                                        'no single-task normals/mean')
  assert evaluation.load_single_task_results(str(semseg_dir)) == {'semseg/mIoU': 36.0,
                                                                  'depth/rmse': 9.0}
  os.makedirs(tmp_path / 'crashed_before_eval')
  assert evaluation.load_single_task_results(str(tmp_path / 'crashed_before_eval')) == {}
  _write(str(tmp_path / 'all.json'), SINGLE)
  assert evaluation.load_single_task_results(str(tmp_path / 'all.json')) == SINGLE
  assert evaluation.load_single_task_results(str(tmp_path / 'absent.json')) == {}


def test_format_table_aligns_columns():
  table = evaluation.format_table({'semseg/mIoU': 36.35, 'depth/rmse': 0.6248,
                                   'normals/11.25': 40.0})
  lines = table.splitlines()
  assert lines[0].split() == ['task', 'metric', 'value']
  assert lines[1].split() == ['semseg', 'mIoU', '36.3500']
  assert len({len(line) for line in lines}) == 1  # values right-aligned in one column
  assert len({line.index(line.split()[1]) for line in lines}) == 1


def test_format_table_prints_image_counts_as_integers():
  table = evaluation.format_table({'edge/odsF': 70.5, 'edge/images': 2498.0})
  assert table.splitlines()[2].split() == ['edge', 'images', '2498']


def test_results_are_written_whole_or_not_at_all(tmp_path):
  """A write that fails half-way (here: a value JSON cannot hold, after the first key)
  keeps the previous file and leaves no partial one beside it."""
  path = str(tmp_path / 'step_3.json')
  atomic_json.write_json(path, {'depth/rmse': 0.5})
  with pytest.raises(TypeError):
    atomic_json.write_json(path, {'a/first': 1.0, 'b/second': object()}, sort_keys=True)
  with open(path) as f:
    assert json.load(f) == {'depth/rmse': 0.5}
  assert os.listdir(tmp_path) == ['step_3.json']
  assert evaluation.load_single_task_results(str(tmp_path / 'step_3.json')) == {'depth/rmse': 0.5}


# The partial-label benchmark's single-task references, as VICO-UoE/MTPSL writes them
# (nyu_mtl_xtc.py and cityscapes_mtl_xtc.py, `stl_performance`).
MTPSL_NYUV2_ONELABEL = {'semantic': 26.1113, 'depth': 0.771502, 'normal': 30.073763}
MTPSL_CITYSCAPES_FULL = {'semantic': 74.07, 'depth': 0.0124}


def test_delta_m_against_a_named_reference_is_mtpsl_formula():
  """MTPSL's `mtl_performance`: +(mIoU - ref)/ref - (abs_err - ref)/ref - (mean - ref)/ref,
  over the tasks, x 100; other keys (rmse, a task the reference lacks) play no part."""
  results = {'semseg/mIoU': 30.0, 'semseg/pixel_accuracy': 61.0, 'depth/abs_err': 0.70,
             'depth/rmse': 0.95, 'normals/mean': 31.0, 'normals/rmse': 38.0}
  ref = MTPSL_NYUV2_ONELABEL
  expected = 100 * ((30.0 - ref['semantic']) / ref['semantic']
                    - (0.70 - ref['depth']) / ref['depth']
                    - (31.0 - ref['normal']) / ref['normal']) / 3
  result = evaluation.delta_m_against(results, 'mtpsl_nyuv2_onelabel')
  assert result.value == pytest.approx(expected, rel=1e-12)
  assert [row[:2] for row in result.rows] == [('semseg', 'semseg/mIoU'),
                                               ('depth', 'depth/abs_err'),
                                               ('normals', 'normals/mean')]
  ref = MTPSL_CITYSCAPES_FULL
  cityscapes = evaluation.delta_m_against(results, 'mtpsl_cityscapes_full')
  assert cityscapes.value == pytest.approx(100 * ((30.0 - ref['semantic']) / ref['semantic']
                                                  - (0.70 - ref['depth']) / ref['depth']) / 2)


def test_the_references_and_their_sources():
  references = evaluation.DELTA_M_REFERENCES
  assert list(references) == ['mtpsl_nyuv2_full', 'mtpsl_nyuv2_onelabel',
                              'mtpsl_nyuv2_randomlabels', 'mtpsl_cityscapes_full',
                              'mtpsl_cityscapes_onelabel', 'jtr_nyuv2_onelabel',
                              'jtr_nyuv2_randomlabels', 'jtr_cityscapes_onelabel']
  # KentoNishi/JTR-CVPR-2024 README.md's --seg-baseline / --depth-baseline / --norm-baseline.
  assert references['jtr_nyuv2_onelabel'].values == {
      'semseg/mIoU': 25.75, 'depth/abs_err': 0.6511, 'normals/mean': 33.73}
  assert references['jtr_cityscapes_onelabel'].values == {
      'semseg/mIoU': 69.50, 'depth/abs_err': 0.0186}
  assert references['mtpsl_nyuv2_randomlabels'].values == {
      'semseg/mIoU': 28.7153, 'depth/abs_err': 0.754012, 'normals/mean': 28.946388}
  assert references['mtpsl_cityscapes_onelabel'].tasks == ('semseg', 'depth')
  for name, reference in references.items():
    if name.startswith('jtr_'):
      assert reference.source.startswith('KentoNishi/JTR-CVPR-2024 README.md')
      continue
    script = 'nyu_mtl_xtc.py' if 'nyuv2' in name else 'cityscapes_mtl_xtc.py'
    setting = name.rpartition('_')[2]
    assert reference.source == f"VICO-UoE/MTPSL {script}, stl_performance['{setting}']"


def test_delta_m_against_unknown_reference_or_missing_metric():
  with pytest.raises(ValueError) as error:
    evaluation.delta_m_against(MULTI, 'mtpsl_nyu_full')
  message = str(error.value)
  assert '\n' not in message and "'mtpsl_nyu_full'" in message
  assert all(name in message for name in evaluation.DELTA_M_REFERENCES)
  old_run = {'semseg/mIoU': 30.0, 'depth/rmse': 0.9, 'normals/mean': 31.0}  # before abs_err
  result = evaluation.delta_m_against(old_run, 'mtpsl_nyuv2_full')
  assert result.value is None and result.missing == ('no multi-task depth/abs_err',)


def test_config_delta_m_reference_is_checked():
  config = config_lib.base_config()
  config.tasks = ('semseg', 'depth', 'normals')
  config.eval.delta_m_reference = 'mtpsl_nyuv2_onelabel'
  config_lib.validate(config, 4)
  config.eval.delta_m_reference = 'onelabel'
  with pytest.raises(ValueError, match=r"^config.eval.delta_m_reference='onelabel' is not '' "
                                       r"or a known reference \(mtpsl_nyuv2_full, "):
    config_lib.validate(config, 4)
  config.eval.delta_m_reference = 'mtpsl_nyuv2_full'
  config.tasks = ('semseg', 'depth')
  with pytest.raises(ValueError, match=r"^config.eval.delta_m_reference='mtpsl_nyuv2_full' "
                                       r"scores normals, which config.tasks"):
    config_lib.validate(config, 4)
