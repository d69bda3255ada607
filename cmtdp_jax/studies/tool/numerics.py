"""Numerics that pair. Two runs are compared only when they computed with the same numerics:
the same code of the compiled train step, the same JAX/jaxlib, CPU model and device count. The
study measures this at its start as a fingerprint (`numerics_fingerprint`): the versions, the
CPU model, the number of devices and a probe that no cell's settings enter, so that a lambda-0
reference and a lambda-3 treatment share it: two train steps of the study's base config (seed
0, a fixed random batch) with the regularizer off and on with full labels, and on with partial
labels (that step compiles apart; since af84d44, so earlier keys differ), their losses and
gradient norms as float32 bit patterns and a sha256 of the parameters after them. Any change
to the rounding of the forward pass, the gradient or the update (a code change such as the
NaN guard of 5da98ea, another XLA build or CPU) changes the bits; the key is a 12-hex-digit
hash of it all. Measured on configs/synthetic.py: two processes give the same key; the commit
before the guard gives the same losses for both steps but other parameters after them (the
guard changed the update's rounding, not the forward pass), hence the parameters' digest. Each record keeps the whole fingerprint and the run's own losses at its first
step as float32 hex.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import platform
import subprocess

import numpy as np


# Commits known to have changed the rounding of the compiled train step, oldest first: records
# without a fingerprint pair only with records made at commits on the same side of each.
# 5da98ea: the NaN guard (steps.train_step's finiteness checks and jnp.where on the state).
NUMERICS_CHANGES = ('5da98ea',)


def train_scalars(workdir: str) -> dict[int, dict[str, float]]:
  """{step: {tag: value}} of the logged train scalars (TensorBoard, float32)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  values = {}
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag.startswith('train/'):
          values.setdefault(event.step, {})[value.tag] = np.float32(
              tf.make_ndarray(value.tensor))
  return values


def regularizer_share(workdir: str) -> float | None:
  """Mean over the logged train steps (each start's first step included) of
  lambda * regularizer / total loss (TensorBoard)."""
  values = train_scalars(workdir)
  shares = [float(v[tag]) / float(v['train/loss/total']) for v in values.values()
            for tag in REGULARIZER_LOSSES if tag in v and v.get('train/loss/total')]
  return float(np.mean(shares)) if shares else None


# Each regularizer's logged loss (steps.compute_losses: 'loss/<its param_key>').
REGULARIZER_LOSSES = ('train/loss/contrastive', 'train/loss/mtpsl', 'train/loss/jtr')


def float32_hex(value) -> str:
  """The bit pattern of `value` as float32: equal strings, equal numbers to the last bit."""
  return f'{int(np.asarray(value, np.float32).view(np.uint32)):08x}'


def first_step_losses(workdir: str) -> dict | None:
  """The run's losses at its first step, as float32 hex (a run logs its first step at once,
  unaveraged)."""
  values = train_scalars(workdir)
  if 1 not in values:
    return None
  return {tag[len('train/'):]: float32_hex(v) for tag, v in sorted(values[1].items())
          if tag.startswith('train/loss/')}


def numerics_fingerprint(config, probe_steps: int = 2) -> dict:
  """What decides the rounding of a run's compiled step, independent of its cell.

  The probe trains `probe_steps` steps of `config` (seed 0, the benchmark's fixed random
  batch) with the regularizer off and on (at its weight, or 1 when that is 0), both with full
  labels, and on with partial labels (image r keeps only the r-th task, cyclically: the step
  with `batch['labelled']` compiles apart and has its own rounding). It keeps every loss and
  the gradient norm as float32 hex and a sha256 of the parameters after them. Versions, CPU
  model and device count go in beside it; `key` hashes everything.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  from cmtdp_jax import sharding, steps  # pylint: disable=import-outside-toplevel
  from cmtdp_jax.benchmarks import common  # pylint: disable=import-outside-toplevel
  probes = {}
  for name, enable, partial in (('off', False, False), ('on', True, False),
                                ('partial', True, True)):
    probe = config.copy_and_resolve_references()
    probe.seed = 0
    probe.contrastive.enable = enable
    probe.contrastive.weight = float(config.contrastive.weight) or 1.0
    if 'partial_labels' in probe.data:
      probe.data.partial_labels = ''
    mesh = sharding.make_mesh(probe.mesh)
    with jax.set_mesh(mesh):
      built = steps.setup(probe, mesh)
      state, train_step = built.init(steps.init_key(probe.seed)), built.train_step
      batch = common.synthetic_batch(probe, probe.batch_size, probe.data.crop_size)
      if partial:
        rows = np.arange(probe.batch_size) % len(probe.tasks)
        batch['labelled'] = {t: rows == i for i, t in enumerate(sorted(probe.tasks))}
      batch = jax.device_put(batch, sharding.batch_sharding(mesh))
      losses = []
      for _ in range(probe_steps):
        state, metrics = train_step(state, batch)
        metrics = jax.device_get(metrics)
        losses.append({k: float32_hex(v) for k, v in sorted(metrics.items())
                       if k.startswith('loss/') or k == 'grad_norm'})
      digest = hashlib.sha256()
      for leaf in jax.tree.leaves(jax.device_get(state.params)):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    probes[name] = {'losses': losses, 'params_sha256': digest.hexdigest()}
  fingerprint = {'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'cpu': cpu_model(),
                 'devices': jax.device_count(), 'platform': jax.default_backend(),
                 'probe': probes}
  fingerprint['key'] = fingerprint_hash(fingerprint)
  return fingerprint


def fingerprint_hash(fingerprint: dict) -> str:
  body = json.dumps({k: v for k, v in fingerprint.items() if k != 'key'}, sort_keys=True)
  return hashlib.sha256(body.encode()).hexdigest()[:12]


def cpu_model() -> str:
  """/proc/cpuinfo's 'model name' (Linux), else what `platform` says."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def pairing_key(record: dict) -> str:
  """Records pair only when these are equal: the fingerprint's key, or for a record made
  before fingerprints, its machine and the numerics era of its commit."""
  if 'fingerprint' in record:
    return record['fingerprint']['key']
  return f"legacy:{record.get('machine', '?')}:{numerics_era(record.get('commit', 'unknown'))}"


@functools.lru_cache(maxsize=None)
def numerics_era(commit: str) -> str:
  """'before <c>' or 'since <c>' of the NUMERICS_CHANGES; 'commit <commit>' when git cannot
  place it (it then pairs only with records of the same commit)."""
  commit = commit.removesuffix('-dirty')
  era = f'before {NUMERICS_CHANGES[0]}' if NUMERICS_CHANGES else 'all'
  for change in NUMERICS_CHANGES:
    try:
      code = subprocess.run(['git', '-C', repository_root(), 'merge-base', '--is-ancestor',
                             change, commit], capture_output=True, check=False).returncode
    except OSError:
      code = 128
    if code not in (0, 1):
      return f'commit {commit}'
    if code == 0:
      era = f'since {change}'
  return era


def repository_root() -> str:
  return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def commit() -> str:
  """The code a run trained with: the repository's HEAD (+ '-dirty' with local changes)."""
  root = repository_root()
  try:
    head = subprocess.run(['git', '-C', root, 'rev-parse', '--short', 'HEAD'], check=True,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(['git', '-C', root, 'status', '--porcelain', '--untracked-files=no',
                            'cmtdp_jax'], check=True, capture_output=True, text=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'
  return head + ('-dirty' if dirty.strip() else '')
