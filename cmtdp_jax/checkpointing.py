"""Orbax checkpoints of the whole train state under `<workdir>/checkpoints`.

The state carries the step; data order and step RNG are pure functions of the
step (see `data/pipeline.py` and `steps.train_step`), so restoring the state is
all a resumed run needs to continue exactly where it stopped. Orbax writes each
step to a temporary directory and renames it when complete, and deletes old
steps only after a newer one is finished, so an interrupted save never costs
the previous checkpoint.

A checkpoint is damaged when its files cannot be read back (a truncated array
file, a deleted `_METADATA` or `default/`); a resume skips it for the newest
intact one and moves it aside to `<step>.corrupt`, never deleting it. One that
reads back but does not fit the config, or holds non-finite values, stops
the run with one line instead: an older checkpoint of the same run would not
do better.

A save that fails in the background (a full disk, a quota) stops the run at its
next step with one line naming the workdir and the last intact checkpoint
(`CheckpointWriteError`): a run must not go on training with nowhere to save.
Orbax leaves the failed step in its temporary folder, which the next start
removes.
"""

from __future__ import annotations

import contextlib
import errno
import logging as python_logging
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils


class DamagedCheckpointError(ValueError):
  """A checkpoint whose files cannot be read back."""


class CheckpointWriteError(RuntimeError):
  """A checkpoint that could not be written; the earlier ones are intact."""


# errno values of "no room left", and how TensorStore names them in its messages.
_NO_ROOM = {errno.ENOSPC: 'the disk is full', errno.EDQUOT: 'the disk quota is exceeded',
            errno.EFBIG: 'a file size limit is reached'}


class Checkpointer:
  """Saves every `every_steps` steps (and on demand), keeps the last `keep`.

  `read_only` (evaluation, analysis) creates, cleans and moves nothing, so it
  is safe next to a run that is training in the same workdir.
  """

  def __init__(self, workdir: str, every_steps: int, keep: int, async_save: bool = True,
               read_only: bool = False):
    self._saving = None  # the step of the last save started
    # Orbax wants absolute paths; keep URLs such as gs://... as they are.
    if '://' not in workdir:
      workdir = os.path.abspath(workdir)
    self.directory = os.path.join(workdir, 'checkpoints')
    self.every_steps = max(every_steps, 1)
    self.read_only = read_only
    if read_only and not epath.Path(self.directory).exists():
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    self.manager = ocp.CheckpointManager(
        self.directory, item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only,
            cleanup_tmp_directories=not read_only, read_only=read_only))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def maybe_save(self, step: int, state, force: bool = False) -> bool:
    """Saves at the configured interval, or now with `force` (end, SIGTERM).

    Called every step, it first raises `CheckpointWriteError` if the last save
    failed in the background (a cheap check: no wait).
    """
    self.check_saved()
    if not self.due(step, force):
      return False
    self.wait()  # Orbax waits for the last save too; here its failure names its own step
    self._saving = step
    _drop_callbacks_into_closed_loop()  # a failing write's other writes complete late
    with self._write_errors():
      return self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def check_saved(self):
    """Raises `CheckpointWriteError` if a background save has failed."""
    with self._write_errors():
      self.manager.check_for_errors()

  @contextlib.contextmanager
  def _write_errors(self):
    """Turns Orbax's error for a failed save into one `CheckpointWriteError` line."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  # Orbax raises many kinds
      if self._saving is None:  # nothing was written: not a save's failure
        raise
      raise CheckpointWriteError(self._describe_write_error(e)) from e

  def _describe_write_error(self, error: Exception) -> str:
    failed = self._saving
    self.manager.reload()
    intact = [s for s in self.manager.all_steps() if s != failed]
    last = (f'the last intact checkpoint is {self.directory}/{max(intact)}, which the same '
            'command resumes from' if intact else 'no earlier checkpoint exists')
    reason = _no_room(error)
    if reason:
      return (f'{reason}: checkpoint {failed} could not be written to {self.directory} '
              f'(workdir {os.path.dirname(self.directory)}); {last} once there is room')
    return (f'checkpoint {failed} could not be written to {self.directory}: '
            f'{_first_line(error)}; {last}')

  def due(self, step: int, force: bool = False) -> bool:
    """Whether `maybe_save(step, ..., force)` would write a checkpoint."""
    return self.manager.latest_step() != step and (force or step % self.every_steps == 0)

  def restore(self, abstract_state, step: int | None = None):
    """Restores `step`, by default the newest intact checkpoint, into the shapes,
    dtypes and shardings of `abstract_state` (a tree of `jax.ShapeDtypeStruct`
    with shardings). Every failure is one line.

    A damaged latest checkpoint is reported in one line and, unless read-only,
    moved aside to `<step>.corrupt`, so that the run saves that step again.
    """
    if step is not None:
      return self._restore_step(abstract_state, step)
    damaged = []
    for candidate in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, damage = self._restore_step(abstract_state, candidate), None
      except DamagedCheckpointError as e:
        state, damage = None, e
      # Each process reads its own shards: all skip a checkpoint damaged for any.
      if not _on_any_process(damage is not None):
        return state
      damage = damage or f'{self.directory}/{candidate} is damaged on another process'
      damaged.append(str(candidate))
      if self.read_only:
        logging.warning('%s; skipped it', damage)
      else:
        logging.warning('%s; skipped it and moved it to %s', damage, self._move_aside(candidate))
    if damaged:
      raise FileNotFoundError(f'no intact checkpoint in {self.directory}: '
                              f'{", ".join(damaged)} damaged')
    raise FileNotFoundError(f'no checkpoint in {self.directory}')

  def _restore_step(self, abstract_state, step: int):
    if step not in self.manager.all_steps():
      raise FileNotFoundError(f'no checkpoint for step {step} in {self.directory} '
                              f'(have {sorted(self.manager.all_steps())})')
    path = f'{self.directory}/{step}'
    if not (epath.Path(path) / 'default').exists():
      raise DamagedCheckpointError(f'{path} is damaged: it has no default/ folder')
    try:
      metadata = self.manager.item_metadata(step)
    except Exception as e:  # pylint: disable=broad-except  # Orbax raises many kinds
      _drop_callbacks_into_closed_loop()
      raise DamagedCheckpointError(f'{path} is damaged: {_first_line(e)}') from e
    if metadata is None or getattr(metadata, 'tree', None) is None:
      raise DamagedCheckpointError(f'{path} is damaged: default/_METADATA cannot be read')
    mismatch = describe_mismatch(metadata.tree, abstract_state)
    if mismatch:
      raise ValueError(f'checkpoint {path} does not match this config (different model, '
                       f'tasks or optimizer?): {mismatch}')
    try:
      state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # pylint: disable=broad-except
      _drop_callbacks_into_closed_loop()
      raise DamagedCheckpointError(f'{path} is damaged: {_first_line(e)}') from e
    nonfinite = nonfinite_arrays(state)
    if nonfinite:
      raise ValueError(f'checkpoint {path} holds non-finite values in {len(nonfinite)} '
                       f'arrays (first: {nonfinite[0]}); it cannot be resumed or evaluated')
    return state

  def _move_aside(self, step: int) -> str:
    source = epath.Path(self.directory) / str(step)
    target = source.with_name(f'{step}.corrupt')
    suffix = 1
    while target.exists():
      suffix += 1
      target = source.with_name(f'{step}.corrupt{suffix}')
    if jax.process_index() == 0:
      source.rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'checkpoint {step} moved aside')
    self.manager.reload()
    return str(target)

  def wait(self):
    with self._write_errors():
      self.manager.wait_until_finished()

  def close(self):
    try:
      self.wait()
    finally:
      self.manager.close()


def describe_mismatch(stored_tree, abstract_state, limit: int = 3) -> str:
  """'' if the stored tree has the keys, shapes and dtypes of `abstract_state`,
  else one line naming the first `limit` missing, unexpected and mis-shaped keys."""
  stored = ocp.tree.to_flat_dict(stored_tree)
  wanted = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(abstract_state, keep_empty_nodes=True))
  name = '/'.join
  kinds = {
      'missing': [name(k) for k in wanted if k not in stored],
      'unexpected': [name(k) for k in stored if k not in wanted],
      'mis-shaped': [f'{name(k)} {_shape_dtype(stored[k])} in the checkpoint, '
                     f'{_shape_dtype(v)} here' for k, v in wanted.items()
                     if k in stored and _shape_dtype(stored[k]) != _shape_dtype(v)],
  }
  parts = []
  for kind, keys in kinds.items():
    if keys:
      more = f' and {len(keys) - limit} more' if len(keys) > limit else ''
      parts.append(f'{len(keys)} {kind} ({"; ".join(keys[:limit])}{more})')
  return ', '.join(parts)


def _on_any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def nonfinite_arrays(state) -> list[str]:
  """Paths of the floating arrays of `state` with a NaN or inf, checked on the
  host-local shards and agreed between processes."""
  found = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if np.issubdtype(leaf.dtype, np.inexact) and not all(
        np.isfinite(np.asarray(shard.data)).all() for shard in leaf.addressable_shards):
      found.append(jax.tree_util.keystr(path, simple=True, separator='/'))
  if _on_any_process(bool(found)) and not found:
    found = ['(on another process)']
  return found


class _DropOrbaxNotices(python_logging.Filter):
  """Orbax warns that a read-only manager is read-only, that a damaged item
  "could not be restored" before it says why, and logs a failed background save
  with a traceback from each of its threads: our one line says each."""

  NOTICES = ('Given directory is read only', 'read_only=True, setting',
             'was found in the checkpoint, but could not be restored',
             '_SignalingThread.run() raised an exception',
             'Commit operations or the Commit callback in background save thread',
             'Save Finalize thread (save_finalize) failed')

  def filter(self, record):
    return not any(notice in record.getMessage() for notice in self.NOTICES)


python_logging.getLogger('absl').addFilter(_DropOrbaxNotices())


class _DropOrbaxWriteTasks(python_logging.Filter):
  """When a save fails, asyncio also reports each of Orbax's other write tasks and futures
  that failed with it ("Task exception was never retrieved", or "Future" or
  "_GatheringFuture", with a traceback), sometimes after our one line: Orbax raises the
  failure itself, so they say nothing new. Reports of errors that did not pass through
  Orbax's code are kept."""

  def filter(self, record):
    message = record.getMessage()
    if 'exception was never retrieved' not in message:
      return True
    return not (f'{os.sep}orbax{os.sep}' in message or _raised_in_orbax(record.exc_info))


def _raised_in_orbax(exc_info) -> bool:
  error = exc_info[1] if isinstance(exc_info, tuple) and len(exc_info) == 3 else None
  traceback = getattr(error, '__traceback__', None)
  while traceback is not None:
    if f'{os.sep}orbax{os.sep}' in traceback.tb_frame.f_code.co_filename:
      return True
    traceback = traceback.tb_next
  return False


python_logging.getLogger('asyncio').addFilter(_DropOrbaxWriteTasks())


def _drop_callbacks_into_closed_loop():
  """After a failed read or write TensorStore still completes the others into
  Orbax's event loop, closed by then, and Python prints a 'RuntimeError: Event
  loop is closed' traceback for each: drops just those (our one line says what
  failed)."""
  previous = sys.unraisablehook
  if getattr(previous, 'drops_reads_into_closed_loop', False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'):
      previous(unraisable)

  hook.drops_reads_into_closed_loop = True
  sys.unraisablehook = hook


def _no_room(error: BaseException) -> str | None:
  """What ran out, if `error` (or an error it was raised from) says that no room is left:
  an `OSError`, or TensorStore's message with its `os_error_code`."""
  while error is not None:
    code = getattr(error, 'errno', None)
    if code in _NO_ROOM:
      return _NO_ROOM[code]
    for code, reason in _NO_ROOM.items():
      if f"os_error_code='{code}'" in str(error) or os.strerror(code) in str(error):
        return reason
    error = error.__cause__ or error.__context__
  return None


def _shape_dtype(x) -> str:
  return f'{tuple(x.shape)} {np.dtype(x.dtype).name}'


def _first_line(error: Exception) -> str:
  """The first line of an Orbax/TensorStore error, without its spec dump."""
  text = str(error).strip() or type(error).__name__
  return text.splitlines()[0].split('. See full TensorStore details')[0].split(
      ' [tensorstore_spec=')[0]


def abstract_like(state, shardings):
  """Shape/dtype/sharding skeleton of `state` for restoring into."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)
