"""Guo and Hall's (1989) parallel thinning, which is Lam, Lee and Suen's (1992) algorithm A1
and MATLAB's bwmorph(..., 'thin', Inf): one definition for the synthetic world's edge labels
and the boundary evaluation's non-maximum suppression (`evaluation.boundary.thin` runs these
tables compiled, in place).

NumPy only: the synthetic world imports it on machines without the evaluation's libraries.
"""

from __future__ import annotations

import numpy as np

# Neighbour k of a pixel is bit k of its code, counterclockwise from east (x_{k+1} in the
# papers): E, NE, N, NW, W, SW, S, SE as (row, column) offsets.
NEIGHBOUR_OFFSETS = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))


def tables() -> tuple[np.ndarray, np.ndarray]:
  """The two sub-iterations' 256-entry tables (uint8): 1 where a pixel with that
  neighbourhood code is deleted. Both need G1 (one crossing) and G2 (2 or 3 neighbour
  pairs); the first G3, the second G3'."""
  bits = (np.arange(256)[:, None] >> np.arange(8)) & 1 > 0
  crossings = sum(~bits[:, i] & (bits[:, i + 1] | bits[:, (i + 2) % 8]) for i in (0, 2, 4, 6))
  n1 = sum(bits[:, k] | bits[:, k - 1] for k in (1, 3, 5, 7))
  n2 = sum(bits[:, k] | bits[:, (k + 1) % 8] for k in (1, 3, 5, 7))
  g1_g2 = (crossings == 1) & np.isin(np.minimum(n1, n2), (2, 3))
  g3 = ~((bits[:, 1] | bits[:, 2] | ~bits[:, 7]) & bits[:, 0])
  g3_prime = ~((bits[:, 5] | bits[:, 6] | ~bits[:, 3]) & bits[:, 4])
  return (g1_g2 & g3).astype(np.uint8), (g1_g2 & g3_prime).astype(np.uint8)


TABLES = tables()


def thin(mask: np.ndarray) -> np.ndarray:
  """Thins a boolean map to 8-connected one-pixel-wide curves, all pixels of a
  sub-iteration at once, until nothing changes."""
  mask = np.array(mask, bool)
  height, width = mask.shape
  while True:
    changed = False
    for table in TABLES:
      padded = np.pad(mask, 1)
      code = np.zeros(mask.shape, np.uint8)
      for bit, (dy, dx) in enumerate(NEIGHBOUR_OFFSETS):
        code |= padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width].astype(np.uint8) << bit
      remove = mask & table[code].astype(bool)
      if remove.any():
        mask &= ~remove
        changed = True
    if not changed:
      return mask
