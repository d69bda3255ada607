"""Shared test setup: quiet TF, simulated 8-device CPU mesh, tiny configs."""

import importlib.metadata
import os
import re
import shutil
import tempfile

REQUIREMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            'requirements.txt')


def xla_flags_for_tests(jaxlib_version: str, requirements: str) -> str:
  """The tests' models are tiny: LLVM's optimisations cost far more compile time than they
  save at run time (model init compiled 5x faster), and so do XLA:CPU's fusion emitters (the
  JTR CLI test's run: 0.77x the CPU time without them, docs/tests.md). XLA aborts on a flag
  it does not know, so the emitters' flag is set only under the pinned jaxlib."""
  flags = ['--xla_backend_optimization_level=0']
  if re.search(rf'^jaxlib=={re.escape(jaxlib_version)}(?=\s|$)', requirements, re.MULTILINE):
    flags.append('--xla_cpu_use_fusion_emitters=false')
  return ' '.join(flags)


os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')
with open(REQUIREMENTS) as _requirements:
  os.environ.setdefault('XLA_FLAGS', xla_flags_for_tests(importlib.metadata.version('jaxlib'),
                                                         _requirements.read()))

import pytest  # noqa: E402


def pytest_configure(config):
  """One persistent XLA cache per test run, shared by its xdist workers and the subprocesses
  they start: XLA compiles dominate the suite on CPU, and many tests compile the same tiny
  steps. A cache the user names is used and kept; ours is removed at the end of the run."""
  if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:  # workers inherit the controller's
    config.xla_cache_to_remove = tempfile.mkdtemp(prefix='cmtdp_jax_tests_xla_cache_')
    os.environ['JAX_COMPILATION_CACHE_DIR'] = config.xla_cache_to_remove


def pytest_unconfigure(config):
  if getattr(config, 'xla_cache_to_remove', None):
    shutil.rmtree(config.xla_cache_to_remove, ignore_errors=True)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """One TFDS data dir per test session, so each synthetic dataset builds once."""
  return str(tmp_path_factory.mktemp('tfds'))


def tiny_config(data_dir='', **overrides):
  """The smoke config with the smallest sizes the tests need."""
  from configs import synthetic  # pylint: disable=import-outside-toplevel
  config = synthetic.get_config('smoke')
  config.data.data_dir = data_dir
  config.data.num_train = 32
  config.data.num_eval = 16
  config.data.image_size = config.data.crop_size = (32, 32)
  config.log_every = 5
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config
