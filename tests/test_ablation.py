"""The regularizer study tool: grid, pairing by seed, confidence intervals, resuming."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from scipy import stats

from cmtdp_jax import config_lib
from cmtdp_jax.tools import ablation

TASKS = ('semseg', 'depth')


def _fake_training(calls):
  """Metrics that improve with lambda by a known amount, plus a per-seed offset shared by
  every cell (what pairing by seed removes)."""
  def train_and_evaluate(config, workdir):
    calls.append((config.data.num_train, config.contrastive.weight if config.contrastive.enable
                  else 0.0, config.contrastive.strategy, config.contrastive.source_choice,
                  config.seed))
    gain = 1.0 + 0.01 * config.contrastive.weight * config.contrastive.enable
    offset = [0.0, 3.0, -2.0, 1.0, -1.0][config.seed]
    results = {'semseg/mIoU': (40.0 + offset) * gain, 'depth/rmse': 1.0 / gain}
    os.makedirs(os.path.join(workdir, 'eval'), exist_ok=True)
    with open(os.path.join(workdir, 'eval', f'step_{config.num_steps}.json'), 'w') as f:
      json.dump(results, f)
    return results
  return train_and_evaluate


@pytest.fixture
def config():
  config = config_lib.base_config()
  config.tasks = TASKS
  config.loss_options = {}
  config.num_steps = 7
  return config


def test_study_runs_the_grid_then_extras_at_the_best_weight_and_resumes(tmp_path, monkeypatch,
                                                                          config):
  calls = []
  monkeypatch.setattr(ablation.train, 'train_and_evaluate', _fake_training(calls))
  monkeypatch.setattr(ablation, 'regularizer_share', lambda workdir: 0.5)
  results = tmp_path / 'results'
  args = (config, str(tmp_path / 'work'), str(results), [0.0, 1.0, 3.0], [20, 50], [0, 1, 2],
          ['hard', 'continuous_sources'], [], False)
  summary = ablation.run_study(*args)
  assert len(calls) == 3 * 2 * 3 + 2 * 3
  assert calls[:6] == [(20, 0.0, 'random', 'uniform', 0), (20, 1.0, 'random', 'uniform', 0),
                       (20, 3.0, 'random', 'uniform', 0), (50, 0.0, 'random', 'uniform', 0),
                       (50, 1.0, 'random', 'uniform', 0), (50, 3.0, 'random', 'uniform', 0)]
  assert summary['best_weight'] == 3.0
  assert {c[1:4] for c in calls[-6:]} == {(3.0, 'hard', 'uniform'), (3.0, 'random', 'pairs')}
  cell = summary['cells']['n50_w3']
  # Paired by seed: the seed offsets cancel, so the interval is the exact gain's width.
  expected = ((40 * 1.03) / 40 - 1 + (1 - 1 / 1.03)) / 2 * 100
  assert cell['delta_m']['mean'] == pytest.approx(expected, rel=1e-6)
  assert cell['regularizer_share'] == pytest.approx(1.5)
  mious = [(40.0 + offset) * 1.03 for offset in (0.0, 3.0, -2.0)]
  assert cell['metrics']['semseg/mIoU'] == pytest.approx((np.mean(mious), np.std(mious, ddof=1)))
  assert summary['cells']['n50_w0']['delta_m'] is None
  record = json.loads((results / 'n20_w1_seed2.json').read_text())
  assert record['metrics']['semseg/mIoU'] == pytest.approx(38.0 * 1.01)
  assert (results / 'study.md').read_text().count('\n| n') == 8
  assert (results / 'delta_m.png').stat().st_size > 0
  calls.clear()
  assert ablation.run_study(*args)['cells'] == summary['cells']
  assert calls == []  # every result file was there
  for path in results.glob('n50_w*_seed2.json'):
    path.unlink()
  partial = ablation.run_study(*args, train_missing=False)
  assert calls == [] and partial['cells']['n50_w3']['seeds'] == [0, 1]
  for path in results.glob('n50_w3_seed1.json'):
    path.unlink()
  one_seed = ablation.run_study(*args, train_missing=False)['cells']['n50_w3']
  assert one_seed['metrics']['semseg/mIoU'] == (pytest.approx(40.0 * 1.03), None)
  assert '| n50_w3 | 1 | 41.200 | 0.971 |' in (results / 'study.md').read_text()
  assert 'so far: 3.0; 18 of 24 planned runs finished' in (results / 'study.md').read_text()


def test_paired_interval_is_the_t_interval_of_per_seed_differences():
  reference = [{'seed': s, 'metrics': {'semseg/mIoU': 40.0 + s}} for s in range(4)]
  runs = [{'seed': s, 'metrics': {'semseg/mIoU': 40.0 + s + d}}
          for s, d in zip(range(4), [0.4, 0.0, 0.8, 0.4])]
  out = ablation.paired_delta_m(runs, reference, ('semseg',))
  deltas = np.array([0.4 / 40, 0.0, 0.8 / 42, 0.4 / 43]) * 100
  half = stats.t.ppf(0.975, 3) * deltas.std(ddof=1) / 2
  assert out['n'] == 4
  np.testing.assert_allclose([out['mean'], out['low'], out['high']],
                             [deltas.mean(), deltas.mean() - half, deltas.mean() + half])


def test_more_seeds_go_to_cells_within_two_standard_errors(tmp_path, monkeypatch, config):
  calls = []
  fake = _fake_training(calls)

  def noisy(config, workdir):
    out = fake(config, workdir)
    out['semseg/mIoU'] += [0.0, 0.9, -0.9, 0.1, 0.3][config.seed] * config.contrastive.enable
    return out

  monkeypatch.setattr(ablation.train, 'train_and_evaluate', noisy)
  monkeypatch.setattr(ablation, 'regularizer_share', lambda workdir: None)
  ablation.run_study(config, str(tmp_path / 'w'), str(tmp_path / 'r'), [0.0, 0.1, 0.2], [10],
                     [0, 1, 2], [], [3, 4], False)
  # Seed by seed, so that a study stopped among the extra seeds leaves the cells even.
  assert [(c[1], c[-1]) for c in calls] == [(w, s) for s in range(5) for w in (0.0, 0.1, 0.2)]


def test_extras_stay_at_the_best_weight_of_the_design_seeds_and_get_more_seeds(
    tmp_path, monkeypatch, config):
  """Seed 3 makes lambda 0.1 the best; the extras ran at 0.2, the best after seeds 0-2,
  and being undecided they get seed 3 like the grid cells."""
  calls = []
  fake = _fake_training(calls)

  def noisy(config, workdir):
    out = fake(config, workdir)
    weight = config.contrastive.weight * config.contrastive.enable
    out['semseg/mIoU'] += ([0.0, 0.9, -0.9][config.seed] * config.contrastive.enable
                           if config.seed < 3 else -20 * weight)
    return out

  monkeypatch.setattr(ablation.train, 'train_and_evaluate', noisy)
  monkeypatch.setattr(ablation, 'regularizer_share', lambda workdir: None)
  summary = ablation.run_study(config, str(tmp_path / 'w'), str(tmp_path / 'r'),
                               [0.0, 0.1, 0.2], [10], [0, 1, 2], ['hard'], [3], False)
  assert summary['best_weight'] == 0.2
  assert max(summary['cells'].values(), key=lambda s: (s['delta_m'] or {}).get('mean') or -1e9
             if not s['extra'] else -1e9)['weight'] == 0.1
  assert [(c[1], c[2], c[-1]) for c in calls if c[2] == 'hard'] == [
      (0.2, 'hard', s) for s in range(4)]
  assert [(c[1], c[-1]) for c in calls[-4:]] == [(0.0, 3), (0.1, 3), (0.2, 3), (0.2, 3)]
  header = (tmp_path / 'r' / 'study.md').read_text().splitlines()[0]
  assert header.startswith('7 steps per run, seeds 0,1,2; more seeds 3; best lambda of 10 '
                           "scenes at seeds 0,1,2 (the extras' lambda): 0.2; 16 of 16 planned")


def test_source_pairs_split_by_label_kind():
  tasks = ('semseg', 'depth', 'normals', 'edge')
  continuous = ablation.source_pairs(tasks, True)
  categorical = ablation.source_pairs(tasks, False)
  assert {s for _, s in continuous} == {'depth', 'normals'}
  assert {s for _, s in categorical} == {'semseg', 'edge'}
  assert ('depth', 'depth') not in continuous and len(continuous) + len(categorical) == 12


def test_regularizer_share_reads_the_train_scalars(tmp_path):
  from flax.metrics import tensorboard  # pylint: disable=import-outside-toplevel
  writer = tensorboard.SummaryWriter(str(tmp_path))
  for step, (reg, total) in enumerate([(0.4, 8.0), (0.2, 4.0)], start=1):
    writer.scalar('train/loss/contrastive', reg, step)
    writer.scalar('train/loss/total', total, step)
  writer.close()
  assert ablation.regularizer_share(str(tmp_path)) == pytest.approx(0.05)
  assert ablation.regularizer_share(str(tmp_path / 'none')) is None


def test_a_preempted_run_is_not_recorded(tmp_path, monkeypatch, config):
  """train_and_evaluate returns early on SIGTERM (a checkpoint, no final eval file)."""
  monkeypatch.setattr(ablation.train, 'train_and_evaluate', lambda config, workdir: {})
  with pytest.raises(ablation.Interrupted, match='n10_w0_seed0 stopped before step 7'):
    ablation.run_study(config, str(tmp_path / 'w'), str(tmp_path / 'r'), [0.0], [10], [0], [],
                       [], False)
  assert not (tmp_path / 'r').exists()


def test_importing_the_tool_defines_no_flags():
  """benchmark.py and the CLI define --config too; the tool's flags exist only when it runs."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from cmtdp_jax import benchmark  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  assert 'summarize_only' not in flags.FLAGS
