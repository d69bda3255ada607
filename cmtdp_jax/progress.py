"""Progress of long stretches (evaluation, dataset generation): done / total, rate, ETA.

On a terminal the line is redrawn in place. In a log file (no TTY) every
update is a new plain line, without '\\r' or escape sequences, and there are
few of them: one per tenth of the work or per `interval` seconds, whichever
comes first, and the last one. Imports neither JAX nor TensorFlow.
"""

from __future__ import annotations

import sys
import time


def format_duration(seconds: float) -> str:
  """'3m07s': minutes and seconds, as the training log's ETA."""
  seconds = max(round(seconds), 0)
  return f'{seconds // 60}m{seconds % 60:02d}s'


class Progress:
  """`what: done/total unit (percent) | rate unit/s | ETA`, updated with `advance`."""

  def __init__(self, what: str, total: int, unit: str, stream=None, enabled: bool = True,
               interval: float = 30.0, clock=time.monotonic):
    self.what, self.total, self.unit = what, max(total, 1), unit
    self.stream = stream or sys.stdout
    self.enabled = enabled
    self.interval = interval
    self.clock = clock
    self.in_place = self.stream.isatty()
    self.done = 0
    self.start = self.last_shown = clock()
    self.next_tenth = 1

  def advance(self, count: int = 1) -> None:
    if self.done == self.total:
      return  # the last line is shown once
    self.done = min(self.done + count, self.total)
    now = self.clock()
    tenth = self.done * 10 // self.total
    if self.in_place:
      due = now - self.last_shown >= 0.5
    else:
      due = tenth >= self.next_tenth or now - self.last_shown >= self.interval
    if self.done == self.total or due:
      self._show(now)
      self.next_tenth = tenth + 1

  def _show(self, now):
    if not self.enabled:
      return
    elapsed = max(now - self.start, 1e-9)
    rate = self.done / elapsed
    if self.done == self.total:
      tail = f'done in {format_duration(elapsed)}'
    else:
      tail = f'ETA {format_duration((self.total - self.done) / max(rate, 1e-9))}'
    line = (f'{self.what}: {self.done}/{self.total} {self.unit} '
            f'({100 * self.done // self.total}%) | {rate:.1f} {self.unit}/s | {tail}')
    if self.in_place:
      end = '\n' if self.done == self.total else ''
      self.stream.write(f'\r{line:<80}{end}')
    else:
      self.stream.write(line + '\n')
    self.stream.flush()
    self.last_shown = now


def track(items, what: str, total: int, unit: str):
  """Yields `items`, showing a `Progress` of `total` of them."""
  progress = Progress(what, total, unit)
  for item in items:
    yield item
    progress.advance()
