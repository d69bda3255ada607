"""The GPU table of cmtdp_jax/benchmarks/README.md from the JSON files `gpu.sh` wrote.

  python -m cmtdp_jax.benchmarks.gpu_table OUT_DIR

One Markdown row per file, in the README's columns; a missing value is '-'.
"""

from __future__ import annotations

import glob
import json
import os
import sys

USAGE = 'usage: python -m cmtdp_jax.benchmarks.gpu_table OUT_DIR'
HEADER = ('| model | shape (batch) | dtype | device | step ms | images/s | MFU | peak memory | '
          'regularizer overhead | JAX / PyTorch |\n' + '|---' * 10 + '|')


def _or_dash(value, text) -> str:
  return '-' if value is None else text(value)


def row(results: dict) -> str:
  """One table row of a benchmark JSON (`benchmark.run_benchmark`)."""
  model = results['model']
  variant = results['variants'].get('with_regularizer' if 'with_regularizer' in
                                    results['variants'] else 'without_regularizer')
  plain = results['variants'].get('without_regularizer', variant)
  height, width, _ = results['image_shape']
  overhead = results.get('regularizer_overhead', {})
  torch = results.get('torch', {}).get('jax_over_torch_images_per_s')
  cells = [
      f"{model['backbone']} `{model['framework']}`",
      f"{height}x{width} ({results['batch_size']})",
      model['dtype'],
      results['device']['kind'],
      f"{plain['train']['step_time_s']['median'] * 1e3:.1f}",
      f"{plain['train']['images_per_s']:.1f}",
      _or_dash(results.get('mfu'), lambda v: f'{100 * v:.1f}%'),
      _or_dash(plain['train'].get('peak_memory_bytes'), lambda v: f'{v / 2**30:.2f} GiB'),
      _or_dash(overhead.get('step_time_ratio'), lambda v: f'{v:.2f}x step time' + (
          f", {overhead['flops_share']:.2%} of FLOPs" if 'flops_share' in overhead else '')),
      _or_dash(torch, lambda v: f'{v:.2f}'),
  ]
  return '| ' + ' | '.join(cells) + ' |'


def table(folder: str) -> str:
  paths = sorted(glob.glob(os.path.join(folder, '*.json')), key=os.path.getmtime)
  if not paths:
    raise ValueError(f'{folder}: no benchmark JSON files (run gpu.sh first)')
  rows = []
  for path in paths:
    try:
      with open(path) as f:
        rows.append(row(json.load(f)))
    except (ValueError, KeyError) as e:
      raise ValueError(f'{path}: not a benchmark result ({e!r})') from e
  return '\n'.join([HEADER, *rows])


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv in (['-h'], ['--help']):
    print(f'{USAGE}\n\n{__doc__}')
    return 0
  if len(argv) != 1:
    sys.exit(USAGE)
  try:
    print(table(argv[0]))
  except ValueError as e:
    sys.exit(f'error: {e}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
