"""Building a TFDS dataset once, even when several runs need it at the same time (the
`data.prepare` command and a run that prepares its dataset on first use both go through it).

TFDS generates into a private temporary folder and renames it into place; a
second run preparing the same dataset meanwhile fails at its own rename with
FileExistsError. `build_once` takes an exclusive lock in the data dir first, so
the second run waits and then reads what the first one wrote. Generation
shows one `progress.Progress` per split (total and ETA) instead of TFDS's
bars without a total and its 'Unknown size (download: Unknown size ...)'.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

import tensorflow_datasets as tfds

from cmtdp_jax import progress


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Our builders' base: announces a preparation in plain words."""

  def _log_download_bytes(self):  # TFDS's 'Downloading and preparing dataset Unknown size'
    print(f'Preparing dataset {self.info.full_name} in {self.data_dir_root} '
          '(once; later runs read it)', flush=True)

  def _log_download_done(self):
    """Silent: each split's progress has ended with 'done in'."""


def examples(items, split: str, total: int):
  """Yields a split generator's `items`, showing its progress."""
  return progress.track(items, f'generating {split}', total, 'examples')


def build_once(make_builder, download_config=None):
  """`make_builder()`'s builder, prepared by this process or by one it waited for."""
  builder = make_builder()
  if builder.is_prepared():
    return builder
  with _exclusive(builder):
    builder = make_builder()  # the lock's previous holder may have prepared it
    if not builder.is_prepared():
      tfds.disable_progress_bar()  # replaced by `examples`
      builder.download_and_prepare(download_config=download_config)
  return builder


@contextlib.contextmanager
def _exclusive(builder):
  """Holds `builder`'s lock file in its data dir; not on remote (gs://) data dirs."""
  root = os.fspath(builder.data_dir_root)
  if '://' in root:
    yield
    return
  path = os.path.join(root, f'.{builder.info.full_name.replace("/", "-")}.lock')
  try:
    os.makedirs(root, exist_ok=True)
    lock = open(path, 'a')
  except OSError as e:
    raise ValueError(f'data dir {root} is not writable ({e.strerror}), so {builder.info.full_name} '
                     'cannot be prepared there: set --config.data.data_dir (or TFDS_DATA_DIR) '
                     'to a writable folder') from e
  with lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f'Waiting for another run preparing {builder.info.full_name} ({path})',
            flush=True)
      fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
