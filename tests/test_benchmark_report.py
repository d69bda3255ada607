"""The partial-label benchmark's report: delta_m in a run's eval files, the last step and
MTPSL's best-delta_m selection (`python -m cmtdp_jax.tools.benchmark_report`)."""

import json
import os

import pytest

from cmtdp_jax import config_lib
from cmtdp_jax import evaluation
from cmtdp_jax import train
from cmtdp_jax import workdir as workdir_lib
from cmtdp_jax.evaluation import visualize
from cmtdp_jax.tools import benchmark_report

REFERENCE = 'mtpsl_nyuv2_onelabel'  # semseg 26.1113, depth 0.771502, normals 30.073763


def _results(miou, abs_err, mean):
  return {'semseg/mIoU': miou, 'semseg/pixel_accuracy': 55.0, 'semseg/images': 654.0,
          'depth/abs_err': abs_err, 'depth/rmse': 0.9, 'depth/abs_rel': 0.3,
          'normals/mean': mean, 'normals/rmse': 36.0, 'normals/11.25': 20.0,
          'normals/22.5': 45.0, 'normals/30': 58.0}


# Step 200 has the best delta_m; step 300, the last, does not.
STEPS = {100: _results(25.0, 0.80, 31.0), 200: _results(29.0, 0.70, 29.0),
         300: _results(28.0, 0.74, 30.0)}


@pytest.fixture(name='run')
def fixture_run(tmp_path, monkeypatch, capsys):
  """A workdir whose eval files the train loop's `_evaluate_and_write` wrote, with
  `config.eval.delta_m_reference` set, for the results of STEPS (no model is trained); and
  what it printed."""
  config = config_lib.base_config()
  config.tasks = ('semseg', 'depth', 'normals')
  config.eval.delta_m_reference = REFERENCE
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  workdir_lib.save_config(config, workdir, 0)
  monkeypatch.setattr(visualize.EvalOutputs, 'from_config', lambda *args, **kwargs: None)
  for step, results in STEPS.items():
    monkeypatch.setattr(train, 'run_evaluation', lambda *args, r=results: dict(r))
    train._evaluate_and_write(  # pylint: disable=protected-access
        config, workdir, None, None, None, None, step, None)
  return workdir, capsys.readouterr().out


def test_eval_files_hold_delta_m_against_the_configured_reference(run):
  workdir, printed = run
  with open(os.path.join(workdir, 'eval', 'step_200.json')) as f:
    written = json.load(f)
  assert written == {**STEPS[200], 'delta_m': pytest.approx(
      evaluation.delta_m_against(STEPS[200], REFERENCE).value)}
  by_hand = 100 * ((29.0 - 26.1113) / 26.1113 - (0.70 - 0.771502) / 0.771502
                   - (29.0 - 30.073763) / 30.073763) / 3
  assert written['delta_m'] == pytest.approx(by_hand, rel=1e-12)
  table = printed.partition('Evaluation at step 200:')[2].partition('Evaluation at step')[0]
  assert table.split()[-2:] == ['delta_m', f"{written['delta_m']:.4f}"]  # printed too


def test_the_report_shows_the_last_step_and_mtpsl_selection(run, capsys):
  assert benchmark_report.main([run[0]]) == 0  # the reference from the run's config
  out = capsys.readouterr().out
  last, _, selection = out.partition("MTPSL's selection: best delta_m on the validation set "
                                     '(optimistic): step 200 of 3 evaluated')
  assert selection, out
  assert 'Last step (what we report): step 300' in last
  assert f"delta_m against {REFERENCE}: VICO-UoE/MTPSL nyu_mtl_xtc.py" in last

  def table(text):
    rows = [line.split() for line in text.splitlines()]
    return {row[0]: row[-1] for row in rows
            if row and ('/' in row[0] or row[:2] == ['delta_m', '(%)'])}

  for text, step in ((last, 300), (selection, 200)):
    values = table(text)
    assert float(values['delta_m']) == pytest.approx(
        evaluation.delta_m_against(STEPS[step], REFERENCE).value, abs=1e-4)
    assert float(values['semseg/mIoU']) == STEPS[step]['semseg/mIoU']
    assert list(values) == ['semseg/mIoU', 'semseg/pixel_accuracy', 'depth/abs_err',
                            'depth/rmse', 'normals/mean', 'normals/rmse', 'normals/11.25',
                            'normals/22.5', 'normals/30', 'delta_m']
  assert 'V.rel (it is the RMSE)' in last and 'V.Med (it is the RMSE)' in last


def test_another_reference_and_ties(run, capsys):
  """--reference overrides the config and delta_m is recomputed under it (Cityscapes':
  semseg and depth only); equal delta_m goes to the earliest step (MTPSL's strict >)."""
  assert benchmark_report.main([run[0], '--reference', 'mtpsl_cityscapes_full']) == 0
  out = capsys.readouterr().out
  expected = evaluation.delta_m_against(STEPS[300], 'mtpsl_cityscapes_full').value
  assert f'{expected:+.4f}' in out.partition("MTPSL's selection")[0]
  assert benchmark_report.best_step({100: 1.0, 200: 2.0, 300: 2.0, 400: None}) == 200
  assert benchmark_report.best_step({100: None}) is None


@pytest.mark.parametrize('setup,message', [
    ('empty', 'no readable eval/step_<N>.json: nothing evaluated yet'),
    ('no_reference', 'its config names no delta_m reference (config.eval.delta_m_reference); '
                     'pass --reference NAME, one of mtpsl_nyuv2_full,'),
    ('unknown_reference', "unknown delta_m reference 'nyuv2'; valid: mtpsl_nyuv2_full,"),
])
def test_one_line_errors(tmp_path, capsys, setup, message):
  workdir = str(tmp_path)
  args = [workdir]
  if setup != 'empty':
    os.makedirs(tmp_path / 'eval')
    with open(tmp_path / 'eval' / 'step_5.json', 'w') as f:
      json.dump(STEPS[100], f)
  if setup == 'unknown_reference':
    args += ['--reference', 'nyuv2']
  assert benchmark_report.main(args) == 1
  captured = capsys.readouterr()
  assert captured.out == ''
  assert captured.err.count('\n') == 1 and captured.err.startswith('benchmark_report: ')
  assert message in captured.err
