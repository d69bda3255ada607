"""Scale-out: FSDP meshes, two processes = one process, preemption, divergence."""

import json
import pathlib
import socket

import jax
import numpy as np
import pytest

from cmtdp_jax import sharding, train
from tests.conftest import tiny_config
from tests.test_cli import assert_same_params, run_main, start_main
from tests.test_train_step import run_steps


def test_fsdp_step_matches_data_parallel_and_shards_params():
  config = tiny_config(**{'optim.name': 'sgd', 'tasks': ('semseg', 'depth'),
                          'mesh.fsdp_min_size': 256})
  dp = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  fsdp = jax.make_mesh((4, 2), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  state_dp, hist_dp = run_steps(config, dp, 2, keep_on_device=True)
  state_fsdp, hist_fsdp = run_steps(config, fsdp, 2, keep_on_device=True)
  for a, b in zip(hist_dp, hist_fsdp):
    np.testing.assert_allclose(a['loss/total'], b['loss/total'], rtol=1e-5)
  sharded = [x for x in jax.tree.leaves(state_fsdp.params)
             if 'fsdp' in str(x.sharding.spec)]
  assert sharded, 'no parameter is sharded over fsdp'
  for leaf in sharded:
    assert leaf.addressable_shards[0].data.size * 2 == leaf.size
  assert any('fsdp' in str(x.sharding.spec) for x in jax.tree.leaves(state_fsdp.opt_state))
  for a, b in zip(jax.tree.leaves(state_dp.params), jax.tree.leaves(state_fsdp.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


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


def test_two_processes_match_one_process(tmp_path, data_dir):
  """2 processes x 4 CPU devices train like 1 process x 8 devices."""
  # SGD: AdamW turns reduction-order differences on near-zero gradients into O(lr) steps.
  flags = ('--config.num_steps=4', '--config.log_every=1', '--config.checkpoint_every=4',
           '--config.optim.name=sgd')
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
  np.testing.assert_allclose(_losses(outputs[0]), _losses(single.stdout), rtol=1e-4)
  assert len(_losses(single.stdout)) == 4
  assert_same_params(one, two, 4, exact=False)
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
