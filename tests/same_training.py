"""Whether two runs of one config trained alike, when they may differ only in the order of
their float reductions (device count, process count, FSDP, another CPU).

Bitwise equality holds only for one executable on one CPU model: another device or process
count sums gradients and BatchNorm statistics in another order, and so does another CPU
(XLA picks its vector width per CPU). Such differences are a few ulps after one step, but
this training is chaotic: on the tests' tiny model at lr 2e-3 (SGD), a difference grows about
tenfold per step. So the check is tight where nothing has had time to grow (the losses of
steps 1 and 2, the state after step 1) and loose after.

The tolerances come from the noise floor and the faults' effects measured on 2026-12-06
(`test_train_step`'s 3-task config with the regularizer, SGD, 3 steps; the 6-task CLI config
gave the same orders of magnitude):

| pair                                               | loss 1, 2        | state 1 | loss 3   |
|----------------------------------------------------|------------------|---------|----------|
| 1 vs 8 devices, Intel Xeon (AVX-512)               | 0, 0             | 5.5e-6  | 1.8e-6   |
| same, XLA limited to SSE4.2 (6 tasks)              | 0, 0             | 3.2e-6  | 3.6e-7   |
| 2 processes vs 1, AMD EPYC (issue 32, 6 tasks)     | < 2.6e-6, 1.7e-5 | ~5e-4 * | 3.3e-4 (step 4) |
| fault: a process reads the other's shard           | 2.8e-3, 1.9e-2   | 0.70    | 1.8e-2   |
| fault: gradients summed over processes, not averaged | 0, 3.0e-2      | 0.76    | 6.1e-2   |
| fault: no all-reduce (each process its own images) | 4.7e-4, 1.7e-2   | 0.70    | 1.5e-2   |

Losses are relative differences of the total loss; state 1 is |state_a - state_b| after step
1 in units of one update (`state_ratio`); * inferred from the AMD run's step-2 loss. The early
loss tolerance is 59x the largest noise and each fault exceeds it 17x by step 2; the state's
is 40x the largest noise and 35x under every fault; the late one, where the noise has grown,
is 15x the largest noise and 3x under every fault. `test_train_step.
test_same_training_catches_faults` checks the faults' side on every machine.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

EARLY_STEPS = 2
EARLY_LOSS_RTOL = 1e-3  # noise <= 1.7e-5; every fault >= 1.7e-2 by step 2
LATE_LOSS_RTOL = 5e-3  # noise <= 3.3e-4 by step 4, faults >= 1.5e-2
STATE_RATIO = 2e-2  # noise <= 5e-4 (inferred, AMD), faults >= 0.70


@dataclasses.dataclass
class Run:
  """What a run leaves to compare: its total losses from step 1 on, and its params and
  BatchNorm statistics (`state_vectors`) after the steps it has them for."""
  losses: list[float]
  states: dict[int, dict[str, np.ndarray]]


def state_vectors(params, batch_stats) -> dict[str, np.ndarray]:
  """The params and the BatchNorm statistics, each flattened into one vector."""
  return {name: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(part)])
          for name, part in (('params', params), ('batch_stats', batch_stats))}


def state_ratio(reference: Run, candidate: Run, step: int = 1) -> float:
  """How far the candidate's state after `step` is from the reference's, in units of the
  reference's next update (the params change with each step, the init does not): the larger
  of the params' and the BatchNorm statistics' ratios, which change at different rates."""
  ratios = []
  for part, value in reference.states[step].items():
    update = np.linalg.norm(reference.states[step + 1][part] - value)
    ratios.append(np.linalg.norm(candidate.states[step][part] - value) / update)
  return float(max(ratios))


def differences(reference: Run, candidate: Run) -> list[str]:
  """Every way `candidate` did not train like `reference` (empty: alike)."""
  found = []
  if len(candidate.losses) != len(reference.losses):
    return [f'{len(candidate.losses)} logged steps, expected {len(reference.losses)}']
  for step, (a, b) in enumerate(zip(candidate.losses, reference.losses), start=1):
    rtol = EARLY_LOSS_RTOL if step <= EARLY_STEPS else LATE_LOSS_RTOL
    if abs(a - b) > rtol * abs(b):
      found.append(f'loss at step {step}: {a} vs {b} (relative {abs(a - b) / abs(b):.2e} > '
                   f'{rtol:g})')
  if 1 in candidate.states:
    ratio = state_ratio(reference, candidate)
    if not ratio <= STATE_RATIO:
      found.append(f'state after step 1 differs by {ratio:.3g} updates (> {STATE_RATIO:g})')
  return found


def assert_same_training(reference: Run, candidate: Run):
  found = differences(reference, candidate)
  assert not found, '; '.join(found)
