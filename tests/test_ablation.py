"""The regularizer study tool: grid, pairing by seed, confidence intervals, resuming."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from scipy import stats

from cmtdp_jax import config_lib
from cmtdp_jax.studies.tool import design
from cmtdp_jax.studies.tool import numerics
from cmtdp_jax.studies.tool import running
from cmtdp_jax.studies.tool import summarize

TASKS = ('semseg', 'depth')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


FINGERPRINT = {'key': 'aaaaaaaaaaaa', 'jax': 'test', 'cpu': 'test', 'devices': 1, 'probe': {}}


@pytest.fixture(autouse=True)
def fixed_numerics(monkeypatch):
  """The probe compiles the real step; these tests fake training, so they fake it too."""
  monkeypatch.setattr(numerics, 'numerics_fingerprint', lambda config: dict(FINGERPRINT))


@pytest.fixture
def config():
  config = config_lib.base_config()
  config.tasks = TASKS
  config.loss_options = {}
  config.num_steps = 7
  return config


def test_arms_configure_their_regularizer_or_the_control(config):
  assert design.parse_arms(['mtpsl:2', 'control:1']) == [('mtpsl', 2.0), ('control', 1.0)]
  for bad in ('vat:1', 'jtr', 'jtr:0'):
    with pytest.raises(ValueError, match=f"--arms: '{bad}' is not name:weight"):
      design.parse_arms([bad])
  mtpsl = design.cell_config(config, 50, 2.0, 'mtpsl', 1, 'one_label')
  assert (mtpsl.regularizer.name, mtpsl.regularizer.weight) == ('mtpsl', 2.0)
  assert not mtpsl.contrastive.enable and not mtpsl.data.derive_labels
  control = design.cell_config(config, 50, 1.0, 'control', 1, 'one_label')
  assert control.data.derive_labels == 'sal_from_semseg'
  assert not control.contrastive.enable and not control.regularizer.name
  assert design.cell_name(1000, 2.0, 'mtpsl', 'one_label') == 'n1000_one_label_w2_mtpsl'


def test_study_runs_the_grid_then_extras_at_the_best_weight_and_resumes(tmp_path, monkeypatch,
                                                                          config):
  calls = []
  monkeypatch.setattr(running.train, 'train_and_evaluate', _fake_training(calls))
  monkeypatch.setattr(numerics, 'regularizer_share', lambda workdir: 0.5)
  results = tmp_path / 'results'
  args = (config, str(tmp_path / 'work'), str(results), [0.0, 1.0, 3.0], [20, 50], [0, 1, 2],
          ['hard', 'continuous_sources'], [], False)
  summary = running.run_study(*args)
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
  record = json.loads((results / 'aaaaaaaaaaaa' / 'n20_w1_seed2.json').read_text())
  assert record['metrics']['semseg/mIoU'] == pytest.approx(38.0 * 1.01)
  assert (results / 'study.md').read_text().count('\n| n') == 8
  assert (results / 'delta_m.png').stat().st_size > 0
  calls.clear()
  assert running.run_study(*args)['cells'] == summary['cells']
  assert calls == []  # every result file was there
  for path in results.glob('*/n50_w*_seed2.json'):
    path.unlink()
  partial = running.run_study(*args, train_missing=False)
  assert calls == [] and partial['cells']['n50_w3']['seeds'] == [0, 1]
  for path in results.glob('*/n50_w3_seed1.json'):
    path.unlink()
  one_seed = running.run_study(*args, train_missing=False)['cells']['n50_w3']
  assert one_seed['metrics']['semseg/mIoU'] == (pytest.approx(40.0 * 1.03), None)
  assert '| n50_w3 | 1 | 41.200 | 0.971 |' in (results / 'study.md').read_text()
  assert 'so far: 3.0; 18 of 24 planned runs finished' in (results / 'study.md').read_text()


def test_paired_interval_is_the_t_interval_of_per_seed_differences():
  reference = [{'seed': s, 'metrics': {'semseg/mIoU': 40.0 + s}} for s in range(4)]
  runs = [{'seed': s, 'metrics': {'semseg/mIoU': 40.0 + s + d}}
          for s, d in zip(range(4), [0.4, 0.0, 0.8, 0.4])]
  out = summarize.paired_delta_m(runs, reference, ('semseg',))
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

  monkeypatch.setattr(running.train, 'train_and_evaluate', noisy)
  monkeypatch.setattr(numerics, 'regularizer_share', lambda workdir: None)
  running.run_study(config, str(tmp_path / 'w'), str(tmp_path / 'r'), [0.0, 0.1, 0.2], [10],
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

  monkeypatch.setattr(running.train, 'train_and_evaluate', noisy)
  monkeypatch.setattr(numerics, 'regularizer_share', lambda workdir: None)
  summary = running.run_study(config, str(tmp_path / 'w'), str(tmp_path / 'r'),
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
  continuous = design.source_pairs(tasks, True)
  categorical = design.source_pairs(tasks, False)
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
  assert numerics.regularizer_share(str(tmp_path)) == pytest.approx(0.05)
  assert numerics.regularizer_share(str(tmp_path / 'none')) is None
  assert numerics.first_step_losses(str(tmp_path)) == {
      'loss/contrastive': numerics.float32_hex(0.4), 'loss/total': numerics.float32_hex(8.0)}


def test_first_step_losses_are_the_exact_bits_train_logs(tmp_path):
  from flax.metrics import tensorboard  # pylint: disable=import-outside-toplevel
  from cmtdp_jax import train  # pylint: disable=import-outside-toplevel
  loss = np.float32(1.0) + np.float32(2.0 ** -23)  # the float32 after 1
  writer = tensorboard.SummaryWriter(str(tmp_path))
  train._write_scalars(writer, 1, {'loss/semseg': loss}, 'train')  # pylint: disable=protected-access
  train._write_scalars(writer, 100, {'loss/semseg': np.float32(0.5)}, 'train')  # pylint: disable=protected-access
  writer.close()
  assert numerics.first_step_losses(str(tmp_path)) == {'loss/semseg': '3f800001'}


def test_a_preempted_run_is_not_recorded(tmp_path, monkeypatch, config):
  """train_and_evaluate returns early on SIGTERM (a checkpoint, no final eval file)."""
  monkeypatch.setattr(running.train, 'train_and_evaluate', lambda config, workdir: {})
  with pytest.raises(running.Interrupted, match='n10_w0_seed0 stopped before step 7'):
    running.run_study(config, str(tmp_path / 'w'), str(tmp_path / 'r'), [0.0], [10], [0], [],
                       [], False)
  assert not (tmp_path / 'r').exists()


def test_importing_the_tool_defines_no_flags():
  """benchmark.py and the CLI define --config too; the tool's flags exist only when it runs."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from cmtdp_jax.benchmarks import benchmark  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  from cmtdp_jax.studies.tool import __main__  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  assert 'summarize_only' not in flags.FLAGS


def _use_numerics(monkeypatch, key):
  monkeypatch.setattr(numerics, 'numerics_fingerprint', lambda config: dict(FINGERPRINT, key=key))


def test_runs_of_other_numerics_are_not_paired_and_the_reference_is_rerun(tmp_path, monkeypatch,
                                                                         config):
  """Resumed under other numerics (another machine, a changed step), the study trains the
  missing treatment and, beside the old reference, a reference under the new fingerprint."""
  calls = []
  fake = _fake_training(calls)
  shift = {'aaaaaaaaaaaa': 0.0, 'bbbbbbbbbbbb': 5.0}  # what other numerics do to a run

  def training(config, workdir):
    out = fake(config, workdir)
    out['semseg/mIoU'] += shift[os.path.basename(os.path.dirname(workdir))]
    return out

  monkeypatch.setattr(running.train, 'train_and_evaluate', training)
  monkeypatch.setattr(numerics, 'regularizer_share', lambda workdir: None)
  results = tmp_path / 'r'
  args = (config, str(tmp_path / 'w'), str(results), [0.0, 1.0], [10], [0, 1], [], [], False)
  running.run_study(*args)
  (results / 'aaaaaaaaaaaa' / 'n10_w1_seed1.json').unlink()  # stopped before seed 1's lambda 1
  _use_numerics(monkeypatch, 'bbbbbbbbbbbb')
  calls.clear()
  summary = running.run_study(*args)
  assert [(c[1], c[-1]) for c in calls] == [(0.0, 1), (1.0, 1)]
  assert (results / 'aaaaaaaaaaaa' / 'n10_w0_seed1.json').exists()  # both kept
  assert json.loads((results / 'bbbbbbbbbbbb' / 'n10_w0_seed1.json').read_text())[
      'fingerprint']['key'] == 'bbbbbbbbbbbb'
  delta = summary['cells']['n10_w1']['delta_m']
  # Each seed against the reference of its own numerics (seed 1: both shifted by 5).
  per_seed = [(40 * 1.01 / 40 - 1 + 1 - 1 / 1.01) / 2 * 100,
              ((43 * 1.01 + 5) / 48 - 1 + 1 - 1 / 1.01) / 2 * 100]
  assert delta['n'] == 2 and delta['dropped'] == []
  assert delta['mean'] == pytest.approx(np.mean(per_seed), rel=1e-9)
  assert delta['se'] == pytest.approx(np.std(per_seed, ddof=1) / np.sqrt(2), rel=1e-9)
  calls.clear()
  assert running.run_study(*args)['cells'] == summary['cells'] and calls == []
  # A treatment whose only reference has other numerics is dropped, and said so.
  (results / 'bbbbbbbbbbbb' / 'n10_w0_seed1.json').unlink()
  partial = running.run_study(*args, train_missing=False)['cells']['n10_w1']['delta_m']
  assert partial['n'] == 1
  assert partial['dropped'] == ['seed 1: numerics bbbbbbbbbbbb vs reference aaaaaaaaaaaa']
  assert ('- n10_w1 seed 1: numerics bbbbbbbbbbbb vs reference aaaaaaaaaaaa'
          in (results / 'study.md').read_text())


def test_records_without_fingerprint_pair_within_their_numerics_era(tmp_path, monkeypatch, config):
  """The regularizer study's records: 78031b1 was before the NaN guard, 655180b after it."""
  if subprocess.run(['git', 'cat-file', '-e', '5da98ea^{commit}'], cwd=ROOT,
                    capture_output=True, check=False).returncode:
    pytest.skip('needs the repository history (git clone without --depth)')
  assert numerics.numerics_era('78031b1') == 'before 5da98ea'
  assert numerics.numerics_era('655180b') == 'since 5da98ea'
  assert numerics.numerics_era('0000000') == 'commit 0000000'
  monkeypatch.setattr(numerics, 'numerics_fingerprint', None)  # nothing may train
  config.tasks = ('semseg', 'depth', 'normals', 'edge', 'sal', 'human_parts')
  config.num_steps = 1000
  summary = running.run_study(config, str(tmp_path / 'w'),
                               os.path.join(ROOT, 'cmtdp_jax', 'studies', 'regularizer', 'results'),
                               [0.0, 0.3, 1.0, 3.0], [200, 1000], [0, 1, 2],
                               ['hard', 'categorical_sources', 'continuous_sources'], [3], False,
                               train_missing=False)
  cell = summary['cells']['n200_w3']['delta_m']
  assert cell['n'] == 2 and summary['cells']['n200_w3']['seeds'] == [0, 1, 2]
  assert cell['dropped'] == ['seed 2: numerics legacy:vm x86_64 2 cores:since 5da98ea vs '
                             'reference legacy:vm x86_64 2 cores:before 5da98ea']
  assert summary['cells']['n1000_w3_hard']['delta_m']['n'] == 1  # seed 2: both after it
  assert summary['cells']['n1000_w1']['delta_m']['n'] == 4


def test_regimes_name_and_configure_their_cells(config):
  assert design.cell_name(1000, 3.0) == 'n1000_w3'
  assert design.cell_name(1000, 3.0, regime='one_label') == 'n1000_one_label_w3'
  assert design.cell_name(500, 0.0, regime='random0.5') == 'n500_random0.5_w0'
  assert design.cell_name(500, 1.0, pilot=True) == 'pilot_n500_w1'
  one = design.cell_config(config, 50, 3.0, '', 2, 'one_label')
  assert (one.data.partial_labels, one.seed, one.contrastive.weight) == ('one_label', 2, 3.0)
  random = design.cell_config(config, 50, 0.0, '', 0, 'random0.5', num_steps=11)
  assert (random.data.partial_labels, random.data.label_fraction) == ('random', 0.5)
  assert not random.contrastive.enable and random.num_steps == 11
  # The kept labels are drawn per seed, the same for both lambdas of a pair.
  assert design.cell_config(config, 50, 3.0, '', 3, 'random0.5').data.partial_labels_seed == 3
  assert not design.cell_config(config, 50, 1.0, '', 0).data.get('partial_labels')
  with pytest.raises(ValueError, match="--regimes: unknown regime 'random2'"):
    design.regime_labels('random2')


def test_pilot_picks_the_weight_and_partial_regimes_get_the_label_split(tmp_path, monkeypatch,
                                                                        config):
  calls = []
  fake = _fake_training(calls)
  configs = []

  def training(config, workdir):
    configs.append((os.path.basename(workdir), config.data.get('partial_labels', ''),
                    config.num_steps))
    return fake(config, workdir)

  def split(config, run_dir, mapping):
    """Dropped-label images gain 2 points with the regularizer, kept ones nothing."""
    weight = config.contrastive.weight * config.contrastive.enable
    return {'semseg/mIoU@kept': 50.0 + config.seed, 'semseg/mIoU@dropped': 30.0 + 2 * weight,
            'depth/rmse@kept': 1.0, 'depth/rmse@dropped': 2.0 - 0.1 * weight}

  monkeypatch.setattr(running.train, 'train_and_evaluate', training)
  monkeypatch.setattr(numerics, 'regularizer_share', lambda workdir: None)
  monkeypatch.setattr(running, 'split_by_label', split)
  mapping = {'00000': ('semseg',), '00001': ('depth',)}
  monkeypatch.setattr(running.label_mapping, 'load', lambda run_dir: mapping)
  summary = running.run_study(config, str(tmp_path / 'w'), str(tmp_path / 'r'),
                               [0.0, 'pilot'], [10], [0, 1], [], [], False,
                               regimes=['full', 'one_label'], pilot_weights=[1.0, 3.0],
                               pilot_seeds=[4], pilot_steps=3)
  assert configs[:3] == [('pilot_n10_w0_seed4', '', 3), ('pilot_n10_w1_seed4', '', 3),
                         ('pilot_n10_w3_seed4', '', 3)]
  assert summary['pilot_best_weight'] == 3.0  # the fake's gain grows with lambda
  assert [c[0] for c in configs[3:7]] == ['n10_w0_seed0', 'n10_w3_seed0',
                                          'n10_one_label_w0_seed0', 'n10_one_label_w3_seed0']
  assert {c[1] for c in configs if 'one_label' in c[0]} == {'one_label'}
  assert all(c[2] == 7 for c in configs[3:])
  cell = summary['cells']['n10_one_label_w3']
  assert cell['split']['semseg/mIoU@dropped']['difference']['mean'] == pytest.approx(6.0)
  assert cell['split']['depth/rmse@dropped']['difference']['mean'] == pytest.approx(0.3)
  assert cell['split']['depth/rmse@dropped']['relative']['mean'] == pytest.approx(15.0)
  assert (tmp_path / 'r' / 'split.png').stat().st_size > 0
  assert cell['split']['semseg/mIoU@kept']['mean'] == pytest.approx(50.5)
  assert summary['cells']['n10_w3']['split'] is None
  record = json.loads((tmp_path / 'r' / 'aaaaaaaaaaaa' / 'n10_one_label_w0_seed1.json').read_text())
  assert record['label_mapping_sha256'] == running.label_mapping.sha256(mapping)
  text = (tmp_path / 'r' / 'study.md').read_text()
  assert '| n10_one_label_w3 | semseg/mIoU | 50.500 ± 0.707 | 36.000 ± 0.000 | +0.00 [+0.00, +0.00] |' \
         ' +6.00 [+6.00, +6.00] |' in text
  assert 'pilot: lambda 1, 3 at 3 steps, seeds 4, best 3.0' in text
  assert '11 of 11 planned runs finished' in text
  assert '| pilot_n10_w3 | 1 |' in text


def test_split_metrics_score_each_task_on_kept_and_dropped_images(config):
  """A stand-in batch: perfect predictions on the images whose semseg label was kept."""
  from cmtdp_jax import train  # pylint: disable=import-outside-toplevel
  from cmtdp_jax.evaluation import scoring  # pylint: disable=import-outside-toplevel
  config.tasks = ('semseg', 'depth')
  mapping = {'a': ['semseg', 'depth'], 'b': ['semseg'], 'c': ['depth']}
  metrics = running.split_metrics(config, mapping)
  assert sorted(metrics) == ['depth@dropped', 'depth@kept', 'semseg@dropped', 'semseg@kept']
  labels = np.zeros((3, 4, 4), np.int32)
  labels[:, :2] = 1
  wrong = np.where(labels == 1, 2, 1)
  depth = np.ones((3, 4, 4), np.float32)
  batch = {'id': np.array([b'a', b'b', b'c']), 'mask': np.ones(3, bool),
           'offset': np.zeros((3, 2), np.int32), 'size': np.full((3, 2), 4, np.int32),
           'semseg': labels, 'depth': depth}
  predictions = {'semseg': np.stack([labels[0], labels[1], wrong[2]]),
                 'depth': np.stack([depth[0] * 2, depth[1] * 3, depth[2]])}
  scoring.update_metrics(metrics, batch, predictions)
  results = train._merge_across_hosts(metrics)  # pylint: disable=protected-access
  assert results['semseg/mIoU@kept'] > 0 and results['semseg/mIoU@dropped'] == 0.0
  assert results['semseg/images@kept'] == 2 and results['semseg/images@dropped'] == 1
  assert results['depth/rmse@kept'] == pytest.approx(np.sqrt(0.5))  # a, c: errors 1 and 0
  assert results['depth/rmse@dropped'] == pytest.approx(2.0)  # b


def test_records_name_the_commit_the_study_started_at(tmp_path, monkeypatch, config):
  """A commit that lands while the study trains (HEAD moves) is not the code its runs ran:
  every record names the commit of the study's start. Before, each named HEAD at its end."""
  head = ['1111111']
  fake = _fake_training([])

  def training_while_a_commit_lands(config, workdir):
    head[0] = '2222222'
    return fake(config, workdir)

  monkeypatch.setattr(numerics, 'commit', lambda: head[0])
  monkeypatch.setattr(running.train, 'train_and_evaluate', training_while_a_commit_lands)
  monkeypatch.setattr(numerics, 'regularizer_share', lambda workdir: None)
  running.run_study(config, str(tmp_path / 'w'), str(tmp_path / 'r'), [0.0, 1.0], [10], [0],
                    [], [], False)
  records = sorted((tmp_path / 'r' / FINGERPRINT['key']).glob('n10_*.json'))
  assert [json.loads(r.read_text())['commit'] for r in records] == ['1111111', '1111111']


def test_a_partial_label_run_records_its_kept_and_dropped_split(tmp_path, data_dir):
  """One real one_label run through the tool (tiny): it trains, evaluates, then scores the
  training images by whether each task's label was kept, with the mapping it wrote."""
  from tests.conftest import tiny_config  # pylint: disable=import-outside-toplevel
  config = tiny_config(data_dir, **{'tasks': ('semseg', 'depth'), 'num_steps': 2,
                                    'eval_batch_size': 16})
  record = running.train_run(config, str(tmp_path / 'w'), str(tmp_path / 'r'),
                              design.Cell(32, 1.0, regime='one_label'), 0, dict(FINGERPRINT))
  mapping = running.label_mapping.load(str(tmp_path / 'w' / FINGERPRINT['key'] /
                                            'n32_one_label_w1_seed0'))
  assert record['label_mapping_sha256'] == running.label_mapping.sha256(mapping)
  kept = sum('semseg' in tasks for tasks in mapping.values())
  assert kept == 16  # one_label over two tasks
  split = record['split_metrics']
  assert split['semseg/images@kept'] == kept and split['semseg/images@dropped'] == 32 - kept
  assert split['depth/images@kept'] == 32 - kept and np.isfinite(split['depth/rmse@dropped'])
  saved = json.loads((tmp_path / 'r' / FINGERPRINT['key'] / 'n32_one_label_w1_seed0.json')
                     .read_text())
  assert saved['split_metrics'] == split


def test_readme_section_is_the_summary(tmp_path, monkeypatch, config):
  monkeypatch.setattr(running.train, 'train_and_evaluate', _fake_training([]))
  monkeypatch.setattr(numerics, 'regularizer_share', lambda workdir: None)
  readme = tmp_path / 'README.md'
  readme.write_text('# x\n<!-- study table -->\nold\n<!-- /study table -->\nafter\n')
  running.run_study(config, str(tmp_path / 'w'), str(tmp_path / 'docs' / 'r'), [0.0, 1.0], [10],
                     [0], [], [], False, readme=str(readme))
  text = readme.read_text()
  summary = (tmp_path / 'docs' / 'r' / 'study.md').read_text()
  assert text == ('# x\n<!-- study table -->\n' + summary +
                  '\n![delta_m against lambda](docs/r/delta_m.png)\n<!-- /study table -->\nafter\n')
  readme.write_text('no markers')
  with pytest.raises(ValueError, match='--readme .*README.md: needs one'):
    running.run_study(config, str(tmp_path / 'w'), str(tmp_path / 'docs' / 'r'), [0.0], [10],
                       [0], [], [], False, readme=str(readme))


def test_fingerprint_sees_a_change_of_the_update_that_leaves_the_losses_alone(monkeypatch):
  """What the NaN guard did: the same losses, other parameters after the step. The change
  is made to the partial-label step only (the full-label steps lower to the same HLO, so
  they hit the compile cache), which the fingerprint must see too."""
  from configs import synthetic  # pylint: disable=import-outside-toplevel
  from cmtdp_jax import steps  # pylint: disable=import-outside-toplevel
  monkeypatch.undo()  # the real probe
  config = synthetic.get_config('smoke')
  config.tasks = TASKS
  config.data.image_size = config.data.crop_size = (32, 32)
  config.model.backbone_kwargs.width = 4
  config.model.head_channels = 8
  first = numerics.numerics_fingerprint(config, probe_steps=1)
  assert first['key'] == numerics.fingerprint_hash(first) and len(first['key']) == 12
  assert first['cpu'] == numerics.cpu_model() and first['devices'] >= 1
  assert set(first['probe']['on']['losses'][0]) == {
      'grad_norm', 'loss/semseg', 'loss/depth', 'loss/contrastive', 'loss/total'}
  original = steps.compute_losses

  def rescaled_if_partial(trainer, params, batch_stats, batch, rng):
    total, aux = original(trainer, params, batch_stats, batch, rng)
    if 'labelled' in batch:  # the gradient, not the logged losses
      total = total * (1.0 + 2.0 ** -10)
    return total, aux

  monkeypatch.setattr(steps, 'compute_losses', rescaled_if_partial)
  changed = numerics.numerics_fingerprint(config, probe_steps=1)
  assert changed['key'] != first['key']
  assert changed['probe']['off'] == first['probe']['off']
  assert changed['probe']['on'] == first['probe']['on']
  losses = lambda probe: {k: v for k, v in probe['losses'][0].items() if k.startswith('loss/')}
  assert losses(changed['probe']['partial']) == losses(first['probe']['partial'])
  assert changed['probe']['partial']['params_sha256'] != first['probe']['partial']['params_sha256']


STUDY = os.path.join('cmtdp_jax', 'studies', 'partial_labels')


@pytest.mark.parametrize('config_file,results,regimes,weights,pilot,marker', [
    (os.path.join(STUDY, 'config.py'), 'results', ('full', 'one_label', 'random0.5'),
     [0.0, 'pilot'], True, 'partial label study table'),
    ('configs/synthetic.py', 'results_64', ('full',), [0.0, 1.0], False,
     'partial label study 64x64 table'),
])
def test_committed_partial_label_tables_are_the_tools_output(tmp_path, monkeypatch,
                                                              config_file, results, regimes,
                                                              weights, pilot, marker):
  """The study README's tables are what the tool writes from the committed records, with
  DESIGN.md's arguments (nothing edited by hand, nothing trained: every record is there)."""
  import shutil  # pylint: disable=import-outside-toplevel
  folder = os.path.join(STUDY, results)
  shutil.copytree(os.path.join(ROOT, folder), tmp_path / folder)
  shutil.copy(os.path.join(ROOT, STUDY, 'README.md'), tmp_path / STUDY / 'README.md')
  monkeypatch.setattr(running, 'train_run', lambda *args: pytest.fail('trained a run'))
  config = config_lib.load_config_file(os.path.join(ROOT, config_file))
  config.num_steps = 1000
  pilot_args = ({'pilot_weights': [1.0, 3.0], 'pilot_seeds': [100, 101], 'pilot_steps': 500}
                if pilot else {})
  running.run_study(config, str(tmp_path / 'work'), str(tmp_path / folder), weights, [1000],
                     [0, 1, 2, 3], [], [], analyze=False, train_missing=False, regimes=regimes,
                     readme=str(tmp_path / STUDY / 'README.md'), readme_marker=marker,
                     **pilot_args)
  section = lambda text: text.split(f'<!-- {marker} -->')[1].split(f'<!-- /{marker} -->')[0]
  with open(os.path.join(ROOT, STUDY, 'README.md')) as f:
    committed = section(f.read())
  assert 'n1000_w1' in committed
  assert section((tmp_path / STUDY / 'README.md').read_text()) == committed


COMPARISON = os.path.join('cmtdp_jax', 'studies', 'regularizer_comparison')


def test_committed_comparison_table_is_the_tools_output(tmp_path, monkeypatch):
  """The comparison study's README table is what the tool writes from the committed records
  with its README's command (nothing edited by hand, nothing trained)."""
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.copytree(os.path.join(ROOT, COMPARISON, 'results'), tmp_path / COMPARISON / 'results')
  shutil.copy(os.path.join(ROOT, COMPARISON, 'README.md'), tmp_path / COMPARISON / 'README.md')
  monkeypatch.setattr(running, 'train_run', lambda *args: pytest.fail('trained a run'))
  config = config_lib.load_config_file(os.path.join(ROOT, COMPARISON, 'config.py'))
  config.num_steps = 1000
  running.run_study(config, str(tmp_path / 'work'), str(tmp_path / COMPARISON / 'results'),
                    [0.0, 1.0], [1000], [0, 1, 2, 3], [], [], analyze=False,
                    train_missing=False, regimes=('one_label', 'random0.5'),
                    readme=str(tmp_path / COMPARISON / 'README.md'),
                    arms=design.parse_arms(['control:1', 'jtr:1', 'mtpsl:2']))
  section = lambda text: text.split('<!-- study table -->')[1].split('<!-- /study table -->')[0]
  with open(os.path.join(ROOT, COMPARISON, 'README.md')) as f:
    committed = section(f.read())
  assert 'n1000_one_label_w0' in committed
  assert section((tmp_path / COMPARISON / 'README.md').read_text()) == committed


def test_endpoints_are_bonferroni_over_the_designed_methods_and_the_control_at_95():
  """A difference whose 95% interval excludes 0 but whose 98.3% one does not is shown for the
  control and not for a method among 3; a method's dropped-label tasks are Bonferroni over
  the tasks (3 here: 98.3%), the control's filled task is at 95%; references and our
  regularizer's extras have no endpoint."""
  t95, t975 = stats.t.ppf(0.975, 3), stats.t.ppf(1 - 0.025 / 2, 3)
  between = (t95 + t975) / 2  # mean / se: shown at 95%, not at 97.5% (nor at 98.3%)
  def difference(ratio, n=4):
    return {'n': n, 'mean': ratio * 0.5, 'se': 0.5 if n > 1 else None, 'low': None,
            'high': None}
  split = {'semseg/mIoU@dropped': {'difference': difference(between)},
           'depth/rmse@dropped': {'difference': difference(5.0)},
           'sal/maxF@dropped': {'difference': difference(between)}}
  def cell(weight, extra='', delta_m=difference(between)):
    return {'train_size': 1000, 'weight': weight, 'extra': extra, 'regime': 'one_label',
            'pilot': False, 'split': split, 'delta_m': None if weight == 0 else delta_m}
  summaries = {'none': cell(0.0), 'ours': cell(1.0), 'jtr': cell(1.0, 'jtr'),
               'control': cell(1.0, 'control'), 'hard': cell(1.0, 'hard'),
               'mtpsl': cell(2.0, 'mtpsl', difference(1.0, n=1))}
  def rows(table):
    return {line.split(' | ')[0][2:]: line[:-2].split(' | ') for line in table.splitlines()[2:]}
  tasks = ('semseg', 'depth', 'sal')
  table = rows(summarize.endpoint_table(summaries, tasks, methods=3))
  assert sorted(table) == ['control', 'jtr', 'mtpsl', 'ours']
  mean, half = between * 0.5, 4.857 * 0.5  # t(1 - 0.05 / 6, 3 degrees of freedom) = 4.857
  assert table['ours'][3:7] == [f'{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]',
                                '98.3%', f'{half:.2f}', 'no']
  assert table['jtr'][6] == 'no'
  assert table['mtpsl'][2:7] == ['1', '+0.50 (1 seed)', '98.3%', '-', 'too few seeds']
  assert table['control'][4:7] == ['95.0%', f'{t95 * 0.5:.2f}', 'yes']
  assert table['ours'][7] == f'depth/rmse +2.50 [{2.5 - half:+.2f}, {2.5 + half:+.2f}]'
  assert table['control'][7].startswith('sal/maxF +') and table['control'][7].endswith(
      'at 95%: yes')
  alone = rows(summarize.endpoint_table({'ours': cell(1.0)}, tasks, methods=1))
  assert alone['ours'][4:7] == ['95.0%', f'{t95 * 0.5:.2f}', 'yes']


def test_the_bonferroni_family_is_the_designs_methods():
  assert design.compared_methods([0.0, 1.0], design.parse_arms(
      ['control:1', 'jtr:1', 'mtpsl:2'])) == 3
  assert design.compared_methods([0.0, 0.3, 1.0], design.parse_arms(['control:1'])) == 2
  with pytest.raises(ValueError, match="--arms: 'jtr' is given twice"):
    design.parse_arms(['jtr:1', 'jtr:2'])
