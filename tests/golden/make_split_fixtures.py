"""Writes the published-format split files the label-mapping tests read, once, with torch.

Each file is small and in one of the formats the field publishes (the real ones are
described, with checksums, in docs/partial_label_benchmark.md):
  nyuv2_onelabel_legacy.pth   MTPSL / JTR NYUv2: legacy torch.save of
                              {'labels_weights': FloatTensor[N, 3]}
  nyuv2_random_zip.pth        the same structure, zip torch.save, 1 or 2 tasks per image
  nyuv2_strided_zip.pth       a transposed (non-contiguous) tensor: strides are honoured
  cityscapes_onelabel_legacy.pth  MTPSL Cityscapes: FloatTensor[N, 2]
  pascal_onelabel.npy         MTPSL PASCAL: 0-d object array of {task: [numpy str ids]}
  pascal_diffusionmtl_zip.pth DiffusionMTL: zip torch.save of {numpy str id: [0/1 x 5]}
and expected.json, what `torch.load(weights_only=False)` / `np.load(allow_pickle=True)`
give for each, as plain lists. Rerun (needs torch) from the repository root:

  python tests/golden/make_split_fixtures.py
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'splits')
NYU_IMAGES = 6  # tests/test_published_splits.py's tiny MTAN folder
PASCAL_IDS = ['2008_000002', '2008_000003', '2008_000007', '2008_000009', '2008_000016']
PASCAL_TASKS = ('semseg', 'human_parts', 'sal', 'normals', 'edge')  # DiffusionMTL's order


def one_label(rows, columns):
  weights = torch.zeros(rows, columns)
  weights[torch.arange(rows), torch.arange(rows) % columns] = 1.0
  return weights


def plain(value):
  if isinstance(value, torch.Tensor):
    return value.tolist()
  if isinstance(value, np.ndarray):
    return plain(value.item()) if value.ndim == 0 else value.tolist()
  if isinstance(value, dict):
    return {str(k): plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  return value.item() if isinstance(value, np.generic) else value


def main():
  os.makedirs(HERE, exist_ok=True)
  random = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 0]],
                        dtype=torch.float32)
  files = {
      'nyuv2_onelabel_legacy.pth': ({'labels_weights': one_label(NYU_IMAGES, 3)}, False),
      'nyuv2_random_zip.pth': ({'labels_weights': random}, True),
      'nyuv2_strided_zip.pth': ({'labels_weights': random.t().contiguous().t()}, True),
      'cityscapes_onelabel_legacy.pth': ({'labels_weights': one_label(4, 2)}, False),
      'pascal_diffusionmtl_zip.pth': (
          {np.str_(i): [int(k == n % 5) for k in range(5)] for n, i in enumerate(PASCAL_IDS)},
          True),
  }
  expected = {}
  for name, (value, zipped) in files.items():
    path = os.path.join(HERE, name)
    torch.save(value, path, _use_new_zipfile_serialization=zipped)
    expected[name] = plain(torch.load(path, weights_only=False))
  lists = {t: list(np.array(PASCAL_IDS[n::2] if t != 'semseg' else PASCAL_IDS))
           for n, t in enumerate(PASCAL_TASKS)}
  npy = os.path.join(HERE, 'pascal_onelabel.npy')
  np.save(npy, np.array(lists, dtype=object))
  expected['pascal_onelabel.npy'] = plain(np.load(npy, allow_pickle=True))
  with open(os.path.join(HERE, 'expected.json'), 'w') as f:
    json.dump(expected, f, indent=1, sort_keys=True)
  print(f'wrote {len(expected)} files and expected.json to {HERE}')


if __name__ == '__main__':
  main()
