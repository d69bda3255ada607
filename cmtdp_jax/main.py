"""Command line entry point.

  python -m cmtdp_jax.main --config configs/synthetic.py --workdir /tmp/run
  python -m cmtdp_jax.main --config configs/synthetic.py:smoke --workdir /tmp/smoke
  python -m cmtdp_jax.main --config configs/synthetic.py --workdir /tmp/run --mode=eval
  python -m cmtdp_jax.main --config configs/synthetic.py --workdir /tmp/run --mode=analyze

Any config field can be overridden with `--config.field=value`. The fields and
their defaults are documented in cmtdp_jax/config_lib.py (base_config), each
config file's docstring (configs/) and cmtdp_jax/protocol.py (the real-dataset
variants); `--mode=print_config` prints the config after the overrides and exits:

  python -m cmtdp_jax.main --config configs/synthetic.py:smoke --mode=print_config
"""

import logging as python_logging
import os
import sys

# TensorFlow only reads data here: its C++ notices (oneDNN, a cache left half read after
# an error) would only bury our one error line. Errors still show.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from cmtdp_jax import analysis
from cmtdp_jax import checkpointing
from cmtdp_jax import config_lib
from cmtdp_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (optionally file.py:variant).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and eval results.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'analyze', 'print_config'],
                  'Train (then evaluate), only evaluate, plot the cross-task consistency '
                  'of the features (the paper\'s Figure 1), or print the config after the '
                  '--config.field overrides and exit (needs no --workdir).')
flags.DEFINE_integer('step', None, 'With --mode=eval/analyze: checkpoint step (default latest).')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (TPU pods, Slurm, '
                  'or the coordinator flags below).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process).')
flags.DEFINE_integer('process_id', None, 'This process index (multi-process).')
flags.mark_flags_as_required(['config'])
flags.register_validator('workdir', lambda workdir: workdir or FLAGS.mode == 'print_config',
                         'is required (except with --mode=print_config)')


class _QuietLibraries(python_logging.Filter):
  """Keeps this project's INFO lines; libraries' only from WARNING (ERROR for TFDS)."""

  def filter(self, record):
    if 'tensorflow_datasets' in record.pathname:
      return record.levelno >= python_logging.ERROR
    return record.levelno >= python_logging.WARNING or 'cmtdp_jax' in record.pathname


def main(argv):
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.mode == 'print_config':
    print(FLAGS.config)
    return
  if FLAGS.distributed:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  logging.info('JAX processes %d/%d, devices %s', jax.process_index(), jax.process_count(),
               jax.devices())
  try:
    if FLAGS.mode == 'train':
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == 'eval':
      train.evaluate(FLAGS.config, FLAGS.workdir, FLAGS.step)
    else:
      analysis.analyze(FLAGS.config, FLAGS.workdir, FLAGS.step)
  except (ValueError, FileNotFoundError, FloatingPointError,
          checkpointing.CheckpointWriteError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  config_lib.run(main)
