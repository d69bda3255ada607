"""One training run per workdir: a lock file that the run holds until it ends.

The lock is `fcntl.flock` on `<workdir>/run.lock`. The kernel releases it when
its process ends in any way, SIGKILL included, so a lock file left by a killed
run never blocks a restart; the file itself only says who holds it, for the
error message of a second run. Multi-host runs share one workdir by design:
only process 0 takes the lock. URL workdirs (gs://...) have no file locks and
are not checked. Stdlib only, so that it imports in milliseconds.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket

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
