"""Progress lines: few plain lines in a log file, one redrawn line on a terminal."""

import io

from cmtdp_jax import progress


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


class Terminal(io.StringIO):
  def isatty(self):
    return True


def test_log_file_gets_a_line_per_tenth_without_carriage_returns():
  stream, clock = io.StringIO(), FakeClock()
  shown = progress.Progress('evaluation', 1000, 'images', stream=stream, clock=clock)
  for _ in range(1000):
    clock.now += 0.01
    shown.advance()
  lines = stream.getvalue().splitlines()
  assert len(lines) == 10, lines
  assert lines[0] == 'evaluation: 100/1000 images (10%) | 100.0 images/s | ETA 0m09s'
  assert lines[-1] == 'evaluation: 1000/1000 images (100%) | 100.0 images/s | done in 0m10s'
  assert '\r' not in stream.getvalue() and '\x1b' not in stream.getvalue()


def test_slow_work_gets_a_line_per_interval():
  stream, clock = io.StringIO(), FakeClock()
  shown = progress.Progress('generating train', 1000, 'examples', stream=stream, clock=clock,
                            interval=30)
  for _ in range(20):
    clock.now += 10
    shown.advance()
  assert len(stream.getvalue().splitlines()) == 6  # at 30, 60, ... 180 s: every third step


def test_terminal_redraws_one_line_and_ends_it():
  stream, clock = Terminal(), FakeClock()
  shown = progress.Progress('evaluation', 4, 'images', stream=stream, clock=clock)
  for _ in range(4):
    clock.now += 1
    shown.advance()
  text = stream.getvalue()
  assert text.count('\r') == 4 and text.count('\n') == 1
  assert text.rstrip(' \n').endswith('4/4 images (100%) | 1.0 images/s | done in 0m04s')


def test_disabled_progress_prints_nothing():
  stream = io.StringIO()
  shown = progress.Progress('evaluation', 2, 'images', stream=stream, enabled=False)
  shown.advance(2)
  assert not stream.getvalue()
