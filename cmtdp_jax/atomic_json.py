"""JSON files written whole or not at all.

A run killed while writing leaves the previous file (or none), never a truncated one that
a reader would take for a finished result: evaluation results, analyses, label mappings and
the study tool's records are all written this way.
"""

from __future__ import annotations

import json
import os


def write_json(path: str, value, **dump_options) -> None:
  """Writes `value` as JSON to `path` through `<path>.partial` and a rename."""
  partial = f'{path}.partial'
  try:
    with open(partial, 'w') as f:
      json.dump(value, f, **dump_options)
    os.replace(partial, path)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
