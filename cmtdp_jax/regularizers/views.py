"""What every cross-task regularizer is called with (`regularizers` registry).

A training step runs the model once on the batch's images and, when the
regularizer asks for `extra_views` augmented views of each image (MTPSL: 1,
JTR: 2, ours: 0), on those too, in the same forward pass. Each view reaches the
regularizer as a `View`; `views[0]` is the view the task losses supervise.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple


class View(NamedTuple):
  """One augmented view of the batch, as the model saw it.

  predictions: task -> raw output [B, H, W, C] float32 at the input resolution
    (`tasks.Task.decode` conventions: logits, metres, unnormalised normals).
  features: task -> the task's last decoder feature [B, h, w, C].
  labels: task -> labels of this view, `tasks` conventions (255 / 0 invalid).
  bottleneck: the model's coarsest shared map [B, h', w', C'] (MTPSL's f), or
    None when the framework does not expose one.
  """
  predictions: Mapping[str, Any]
  features: Mapping[str, Any]
  labels: Mapping[str, Any]
  bottleneck: Any = None
