"""The study's design, fixed by the flags before anything runs.

- the grid: every `--weights` (lambda; 0 = no regularizer at all, the reference) x every
  `--train_sizes` (config.data.num_train) x every `--regimes` (`full`: every label;
  `one_label`: each training image keeps one task's labels; `random<f>`, e.g. `random0.5`: each
  task kept with probability f; config.data.partial_labels / label_fraction) x every `--seeds`;
  the same seeds in every cell, so each cell's difference to lambda 0 of its own regime and
  size is paired by seed;
- `--pilot_weights`: a short pilot (`--pilot_steps`, `--pilot_seeds`, full labels, the largest
  training set) before the grid; the weight `pilot` in `--weights` is the pilot weight with the
  highest mean delta_m against the pilot's lambda 0 (the pilot chooses which lambda the study
  tests, not whether an effect exists: its seeds are not the study's);
- `--extras` at the best lambda of the largest training set with full labels (the highest mean
  delta_m, decided once every one of `--seeds` of that column has finished; extra seeds do not
  move it): `hard` (strategy=hard), `categorical_sources` / `continuous_sources`
  (source_choice=pairs with only categorical, or only depth/normals, sources for every target);
- `--more_seeds` are added, seed by seed, to every cell, extras included (and its lambda-0
  reference), whose paired delta_m after `--seeds` is within twice its standard error.
"""

from __future__ import annotations

from typing import NamedTuple

from cmtdp_jax import tasks as tasks_lib
from cmtdp_jax.data import synthetic


CONTINUOUS_KINDS = (tasks_lib.DEPTH, tasks_lib.NORMALS)


def source_pairs(task_names, continuous: bool) -> tuple[tuple[str, str], ...]:
  """Every (target, source) pair whose source is continuous (depth, normals) or categorical."""
  return tuple((t, s) for t in task_names for s in task_names if s != t and
               (tasks_lib.get_task(s).label_kind in CONTINUOUS_KINDS) == continuous)


# Arms of a comparison (`--arms name:weight`), run in every regime and training size beside
# the weight grid: another regularizer at its weight, or the positive control, which fills a
# missing sal label from the kept semseg label (synthetic.LABEL_DERIVATIONS, exact in this
# world) and has no regularizer; its weight only names the cell.
REGULARIZER_ARMS = ('mtpsl', 'jtr')
CONTROL_ARM = 'control'
ARMS = (*REGULARIZER_ARMS, CONTROL_ARM)
CONTROL_DERIVATION = 'sal_from_semseg'
CONTROL_TASK = synthetic.LABEL_DERIVATIONS[CONTROL_DERIVATION][0]  # whose labels it fills


# The roles of a comparison's cells in its pre-registered endpoints (summarize.endpoint_table):
# our regularizer at a weight > 0 and the regularizer arms are the methods compared with each
# other (one Bonferroni family per regime); the control shows what size of effect the testbed
# resolves.
METHOD = 'method'


def endpoint_role(cell: 'Cell') -> str | None:
  """METHOD, CONTROL_ARM, or None (a reference, a pilot, or an extra of our regularizer)."""
  if cell.pilot or cell.weight <= 0:
    return None
  if cell.extra == CONTROL_ARM:
    return CONTROL_ARM
  return METHOD if cell.extra in ('', *REGULARIZER_ARMS) else None


def compared_methods(weights, arms) -> int:
  """How many methods the design compares in each regime and training size: the Bonferroni
  family of its endpoints, whichever of their cells have records yet."""
  cells = [Cell(0, w) for w in weights] + [Cell(0, w, name) for name, w in arms]
  return sum(endpoint_role(cell) == METHOD for cell in cells)


def parse_arms(values) -> list[tuple[str, float]]:
  """`--arms` entries 'name:weight' as (name, weight)."""
  arms = []
  for value in values:
    name, _, weight = value.partition(':')
    try:
      weight = float(weight)
    except ValueError:
      weight = -1.0
    if name not in ARMS or weight <= 0:
      raise ValueError(f"--arms: '{value}' is not name:weight with a name of "
                       f"{', '.join(ARMS)} and a weight > 0")
    if name in dict(arms):
      raise ValueError(f"--arms: '{name}' is given twice")
    arms.append((name, weight))
  return arms


def extra_overrides(name: str, task_names) -> dict:
  if name == 'hard':
    return {'strategy': 'hard'}
  if name in ('categorical_sources', 'continuous_sources'):
    return {'source_choice': 'pairs',
            'pairs': source_pairs(task_names, name == 'continuous_sources')}
  raise ValueError(f"--extras: unknown extra '{name}' "
                   '(valid: hard, categorical_sources, continuous_sources)')


def regime_labels(regime: str) -> tuple[str, float | None]:
  """(config.data.partial_labels, label_fraction) of a `--regimes` entry."""
  if regime == 'full':
    return '', None
  if regime == 'one_label':
    return 'one_label', None
  if regime.startswith('random'):
    try:
      fraction = float(regime[len('random'):])
    except ValueError:
      fraction = -1.0
    if 0.0 < fraction < 1.0:
      return 'random', fraction
  raise ValueError(f"--regimes: unknown regime '{regime}' "
                   '(valid: full, one_label, random<fraction in (0, 1)>, e.g. random0.5)')


class Cell(NamedTuple):
  """One cell of the design; its runs differ only in the seed."""
  train_size: int
  weight: float
  extra: str = ''
  regime: str = 'full'
  pilot: bool = False

  @property
  def name(self) -> str:
    return cell_name(self.train_size, self.weight, self.extra, self.regime, self.pilot)

  @property
  def reference(self) -> 'Cell':
    return Cell(self.train_size, 0.0, '', self.regime, self.pilot)


def cell_name(train_size: int, weight: float, extra: str = '', regime: str = 'full',
              pilot: bool = False) -> str:
  """e.g. n1000_w3, n1000_w3_hard, n1000_one_label_w0, pilot_n1000_w1."""
  return (('pilot_' if pilot else '') + f'n{train_size}' +
          ('' if regime == 'full' else f'_{regime}') + f'_w{weight:g}' +
          (f'_{extra}' if extra else ''))


def cell_config(config, train_size: int, weight: float, extra: str, seed: int,
                regime: str = 'full', num_steps: int = 0):
  config = config.copy_and_resolve_references()
  config.seed = seed
  config.data.num_train = train_size
  config.contrastive.enable = weight > 0 and extra not in ARMS
  config.contrastive.weight = weight
  if extra in REGULARIZER_ARMS:
    config.regularizer.name = extra
    config.regularizer.weight = weight
  elif extra == CONTROL_ARM:
    config.data.derive_labels = CONTROL_DERIVATION
  elif extra:
    config.contrastive.update(extra_overrides(extra, config.tasks))
  partial, fraction = regime_labels(regime)
  if partial:
    config.data.partial_labels = partial
    # Each seed its own draw of the kept labels, the same for every lambda of that seed: the
    # pairs share their labels, and the seeds sample mappings as well as initialisations.
    config.data.partial_labels_seed = seed
    if fraction is not None:
      config.data.label_fraction = fraction
  if num_steps:
    config.num_steps = num_steps
  return config
