"""The regularizer's effect as a designed study: lambda x training-set size x label regime x seeds.

  python -m cmtdp_jax.studies.tool --config configs/synthetic.py --workdir runs/study \
      --results_dir cmtdp_jax/studies/regularizer/results --config.num_steps=1000

The design (`design`), the numerics a pair of runs must share (`numerics`), training what is
missing (`running`) and the summary (`summarize`) are modules of their own; each says its part.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from cmtdp_jax import config_lib
from cmtdp_jax.studies.tool import design, running


FLAGS = flags.FLAGS


def define_flags():
  """The command's flags; defined when it runs, so that importing this module (tests, other
  tools) does not claim flag names such as --config."""
  config_flags.DEFINE_config_file('config', None, 'Config file (optionally file.py:variant).',
                                  lock_config=False)
  flags.DEFINE_string('workdir', None, 'Directory for all runs and the summary.')
  flags.DEFINE_string('results_dir', '', "Per-run result files and the summary ('' = workdir).")
  flags.DEFINE_list('weights', ['0', '0.3', '1', '3'],
                    "Regularizer weights; 0 = regularizer off; 'pilot' = the pilot's best.")
  flags.DEFINE_list('train_sizes', ['200', '1000'], 'config.data.num_train values.')
  flags.DEFINE_list('regimes', ['full'], 'Label regimes: full, one_label, random<fraction>.')
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Training seeds, the same in every cell.')
  flags.DEFINE_list('extras', ['hard', 'categorical_sources', 'continuous_sources'],
                    'Variants run at the best weight of the largest training set.')
  flags.DEFINE_list('more_seeds', [], 'Seeds added where a paired difference is < 2 SE.')
  flags.DEFINE_list('arms', [], 'Comparison arms name:weight (mtpsl, jtr, control), run in '
                    'every regime and training size beside the weights.')
  flags.DEFINE_list('pilot_weights', [], "Weights of the pilot that picks --weights' 'pilot'.")
  flags.DEFINE_list('pilot_seeds', ['100'], 'Seeds of the pilot (not the study\'s).')
  flags.DEFINE_integer('pilot_steps', 0, 'Steps of a pilot run (0 = config.num_steps).')
  flags.DEFINE_bool('analyze', True, 'Figure 1 premise: lambda 0 vs the best lambda.')
  flags.DEFINE_bool('summarize_only', False, 'Summarize the finished runs, train nothing.')
  flags.DEFINE_string('readme', '', 'Also write the summary into this file, between '
                      "'<!-- <readme_marker> -->' and '<!-- /<readme_marker> -->'.")
  flags.DEFINE_string('readme_marker', 'study table', 'The section --readme replaces.')
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  try:
    _run_from_flags()
  except running.Interrupted as e:
    print(e, flush=True)
  except ValueError as e:  # a bad flag or file: one line
    sys.exit(f'error: {e}')


def _weights(values) -> list:
  try:
    return [v if v == 'pilot' else float(v) for v in values]
  except ValueError as e:
    raise ValueError(f"--weights: {e} (numbers, or 'pilot')") from e


def _run_from_flags():
  running.run_study(FLAGS.config, FLAGS.workdir, FLAGS.results_dir or FLAGS.workdir,
            _weights(FLAGS.weights), [int(n) for n in FLAGS.train_sizes],
            [int(s) for s in FLAGS.seeds], list(FLAGS.extras),
            [int(s) for s in FLAGS.more_seeds], FLAGS.analyze,
            train_missing=not FLAGS.summarize_only, regimes=list(FLAGS.regimes),
            pilot_weights=[float(w) for w in FLAGS.pilot_weights],
            pilot_seeds=[int(s) for s in FLAGS.pilot_seeds], pilot_steps=FLAGS.pilot_steps,
            readme=FLAGS.readme, readme_marker=FLAGS.readme_marker,
            arms=design.parse_arms(FLAGS.arms))


if __name__ == '__main__':
  define_flags()
  config_lib.run(main)
