"""Scale-out: FSDP meshes, two processes = one process, preemption, divergence."""

import json
import pathlib
import socket

import jax
import pytest

from cmtdp_jax import sharding, train
from tests import same_training
from tests.conftest import tiny_config
from tests.test_cli import checkpoint_state, run_main, start_main
from tests.test_train_step import trained_run


def test_fsdp_step_matches_data_parallel_and_shards_params():
  """Tolerances: `same_training` (FSDP reduce-scatters in another order)."""
  config = tiny_config(**{'optim.name': 'sgd', 'tasks': ('semseg', 'depth'),
                          'mesh.fsdp_min_size': 256})
  dp = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  fsdp = jax.make_mesh((4, 2), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  run_dp = trained_run(config, dp, 3)[0]
  run_fsdp, state_fsdp, _ = trained_run(config, fsdp, 3)
  same_training.assert_same_training(run_dp, run_fsdp)
  sharded = [x for x in jax.tree.leaves(state_fsdp.params)
             if 'fsdp' in str(x.sharding.spec)]
  assert sharded, 'no parameter is sharded over fsdp'
  for leaf in sharded:
    assert leaf.addressable_shards[0].data.size * 2 == leaf.size
  assert any('fsdp' in str(x.sharding.spec) for x in jax.tree.leaves(state_fsdp.opt_state))


def test_param_spec_rules():
  spec = jax.sharding.PartitionSpec
  assert sharding.param_spec((3, 3, 64, 128), 2, 1024) == spec(None, None, None, 'fsdp')
  assert sharding.param_spec((96, 3, 3, 64), 2, 1024) == spec('fsdp')
  assert sharding.param_spec((3, 3, 3, 63), 2, 10) == spec()  # nothing divisible
  assert sharding.param_spec((64, 64), 2, 1 << 20) == spec()  # too small
  assert sharding.param_spec((64, 64), 1, 0) == spec()  # no fsdp axis


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _losses(stdout):
  return [float(line.split('total ')[1].split()[0]) for line in stdout.splitlines()
          if line.startswith('step ')]


def _cli_run(workdir, stdout) -> same_training.Run:
  """A CLI run's logged losses and its saved states after steps 1 and 2."""
  states = {step: same_training.state_vectors(*checkpoint_state(workdir, step))
            for step in (1, 2)}
  return same_training.Run(_losses(stdout), states)


def test_two_processes_match_one_process(tmp_path, data_dir):
  """2 processes x 4 CPU devices train like 1 process x 8 devices, up to the order of the
  cross-process reductions (tolerances: `same_training`, derived from measured noise)."""
  # SGD: AdamW turns reduction-order differences on near-zero gradients into O(lr) steps.
  flags = ('--config.num_steps=4', '--config.log_every=1', '--config.checkpoint_every=1',
           '--config.keep_checkpoints=4', '--config.optim.name=sgd')
  one = str(tmp_path / 'one')
  single = run_main(one, *flags, data_dir=data_dir, devices=8)
  two = str(tmp_path / 'two')
  port = _free_port()
  procs = [start_main(two, *flags, '--distributed', f'--coordinator_address=localhost:{port}',
                      '--num_processes=2', f'--process_id={i}', data_dir=data_dir, devices=4,
                      log_path=str(tmp_path / f'process{i}.log'))
           for i in range(2)]
  outputs = [p.communicate(timeout=900)[0] for p in procs]
  for i, p in enumerate(procs):
    assert p.returncode == 0, (tmp_path / f'process{i}.log').read_text()[-3000:]
  assert not _losses(outputs[1]), 'only process 0 logs'
  assert len(_losses(single.stdout)) == 4
  same_training.assert_same_training(_cli_run(one, single.stdout), _cli_run(two, outputs[0]))
  # Each host scored its share of the eval set; the merged counts cover all of it.
  one_results, two_results = (json.loads((pathlib.Path(w) / 'eval' / 'step_4.json').read_text())
                              for w in (one, two))
  assert one_results.keys() == two_results.keys()
  images = {k: v for k, v in two_results.items() if k.endswith('/images')}
  assert images == {k: v for k, v in one_results.items() if k.endswith('/images')}
  assert len(images) == 6 and set(images.values()) == {16.0}, images


def test_consecutive_nonfinite_steps_stop_with_a_message():
  fetched = [{'loss/depth': 1.0, 'nonfinite_streak': 0}] + [
      {'loss/depth': float('nan'), 'nonfinite_streak': streak} for streak in (1, 2, 3, 3)]
  train._check_divergence(fetched[:3], 5, 3)  # below the limit
  with pytest.raises(FloatingPointError, match=r'3 consecutive non-finite steps .*up to step 6,'
                                                r'.*loss/depth=nan'):
    train._check_divergence(fetched, 7, 3)
