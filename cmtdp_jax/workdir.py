"""Run bookkeeping: what a run keeps in its workdir, and the rules of starting one there.

- One training run per workdir: a lock file that process 0 holds until the run ends
  (`acquire`). The lock is `fcntl.flock` on `<workdir>/run.lock`. The kernel releases it when
  its process ends in any way, SIGKILL included, so a lock file left by a killed run never
  blocks a restart; the file itself only says who holds it, for the error message of a second
  run. Multi-host runs share one workdir by design: only process 0 takes the lock. URL
  workdirs (gs://...) have no file locks and are not checked.
- The config of every start (`save_config`): `config.json` of the first, `config.<N>.json` of
  a resume from step N, so that no resume overwrites the original.
- The resume rules (`check_resume`, `record_start`): every changed field is logged against the
  config of the run that wrote the checkpoint resumed; those that make the resumed run another
  experiment (`config_lib.RESUME_FIXED`) are refused unless `config.allow_config_change`.
- The label mapping of a partially labelled run (`label_mapping_at_start`).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket

import jax
from absl import logging
from etils import epath

from cmtdp_jax import config_lib
from cmtdp_jax import label_mapping

LOCK_FILE = 'run.lock'


class WorkdirLock:
  """Held from `acquire` until `release` (or the end of a `with` block)."""

  def __init__(self, fd: int):
    self._fd = fd

  def release(self):
    if self._fd is not None:
      os.ftruncate(self._fd, 0)  # an empty lock file: no run holds the workdir
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.release()


def acquire(workdir: str) -> WorkdirLock | None:
  """Locks `workdir` (None for URLs); raises ValueError naming the run holding it."""
  if '://' in workdir:
    return None
  fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _holder(fd)
    os.close(fd)
    raise ValueError(f'--workdir {workdir} is in use by another run ({holder}); '
                     'wait for it to end or pass another --workdir') from None
  started = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),
                            'started': started}).encode(), 0)
  return WorkdirLock(fd)


def _holder(fd: int) -> str:
  try:
    owner = json.loads(os.pread(fd, 4096, 0))
    return f"host {owner['host']}, pid {owner['pid']}, started {owner['started']}"
  except (ValueError, KeyError, TypeError):  # it is still writing its details
    return 'details not written yet'


def check_writable(workdir):
  """Creates `workdir` if needed; one line if it cannot be written."""
  if workdir.startswith('gs://'):
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test_{jax.process_index()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ValueError(f'--workdir {workdir} is not writable: {e.strerror}') from e


def config_files(workdir) -> dict[int, epath.Path]:
  """The config of every start of a run in `workdir`, by the step it started from."""
  found = {}
  for path in epath.Path(workdir).glob('config*.json'):
    start = path.name[len('config.'):-len('.json')]
    if path.name == 'config.json' or start.isdigit():
      found[int(start) if start.isdigit() else 0] = path
  return found


def save_config(config, workdir, start_step):
  """Keeps the config of every start: `config.json` of the first, then
  `config.<start_step>.json`, so that no resume overwrites the original."""
  name = f'config.{start_step}.json' if start_step else 'config.json'
  (epath.Path(workdir) / name).write_text(config.to_json_best_effort(indent=2))


def writer_config(workdir, checkpoint_step) -> epath.Path | None:
  """The config file of the run that wrote `checkpoint_step` (the last start before it)."""
  earlier = {start: path for start, path in config_files(workdir).items()
             if start < checkpoint_step}
  return earlier[max(earlier)] if earlier else None


def check_config_change(config, workdir, checkpoint_step):
  """Logs every field changed since the run that wrote `checkpoint_step`, one
  line each; refuses those that make the resumed run another experiment
  (`config_lib.RESUME_FIXED`) unless `config.allow_config_change`."""
  path = writer_config(workdir, checkpoint_step)
  if path is None:
    logging.warning('No config.json of the run that wrote checkpoint %d: cannot tell which '
                    'fields changed', checkpoint_step)
    return
  try:
    previous = json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); it is the config of the run that '
                     f'wrote checkpoint {checkpoint_step}') from e
  current = json.loads(config.to_json_best_effort())
  defaults = json.loads(config_lib.base_config().to_json_best_effort())
  free = label_mapping.resume_free_fields({**defaults['data'], **previous.get('data', {})},
                                         current['data'], workdir)
  refused = []
  for field, old, new in config_lib.changed_fields(previous, current, defaults=defaults):
    logging.warning('config.%s changed since %s: %s -> %s', field, path.name, old, new)
    if old is not config_lib.ABSENT and config_lib.fixed_on_resume(field) and field not in free:
      refused.append(f'config.{field}')
  if refused and not config.allow_config_change:
    raise ValueError(f'{", ".join(refused)} changed since {path} (the run that wrote checkpoint '
                     f'{checkpoint_step}): resuming would not continue that run; pass '
                     '--config.allow_config_change=True to resume anyway, or another --workdir')


def label_mapping_at_start(config, workdir, image_ids, is_chief, resuming):
  """The tasks each training image keeps (None: all), `label_mapping.FILENAME` in
  `workdir`: written by process 0 at a start with no checkpoint, read back by every
  resume of one. `image_ids()` lists the training split's ids, read only for partial
  labels."""
  path = os.path.join(workdir, label_mapping.FILENAME)
  existed = os.path.exists(path)
  if not label_mapping.is_partial(config.data):  # reads no ids
    if existed:
      logging.warning('%s is not used: this start trains on all labels', path)
    return None
  mapping = label_mapping.for_run(config.data, config.tasks, image_ids(),
                                  workdir, resuming=resuming)
  read_back = resuming and existed
  if not read_back and is_chief:
    if existed and label_mapping.sha256(mapping) != label_mapping.file_sha256(path):
      logging.warning('%s replaced: the start that wrote it saved no checkpoint, and this '
                      'one asks for another mapping', path)
    label_mapping.save(workdir, mapping)
  logging.info('Label mapping %s %s (sha256 %s): %s', path,
               'read back' if read_back else 'written', label_mapping.sha256(mapping),
               label_mapping.describe(mapping, config.tasks))
  unlabelled = [t for t, n in label_mapping.counts(mapping, config.tasks).items() if n == 0]
  if unlabelled:
    logging.warning('No training image keeps the labels of %s: their losses are 0 throughout',
                    ', '.join(unlabelled))
  return mapping


def check_resume(config, workdir, latest: int | None):
  """Before the restore (which fails less clearly on a width change): the config against
  the run that wrote the latest checkpoint."""
  if latest is not None:
    check_config_change(config, workdir, latest)


def record_start(config, workdir, latest: int | None, start_step: int, is_chief: bool):
  """After the restore: when damaged checkpoints skipped back into an earlier run's, the
  config against that run too; then process 0 keeps this start's config."""
  if latest is not None and writer_config(workdir, start_step) != writer_config(workdir, latest):
    check_config_change(config, workdir, start_step)
  if is_chief:
    save_config(config, workdir, start_step)
