"""Pieces MTPSL's and JTR's networks share, written as the PyTorch originals compute them.

Both call their network on one image at a time in train mode, so BatchNorm normalises with
that image's statistics (`ImageNorm`); both sample semseg with a hard Gumbel-softmax
(`gumbel_hard`) and compare maps with torch 2.x's `F.cosine_similarity` (`cosine_similarity`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_EPSILON = 1e-5  # torch's BatchNorm2d
COSINE_EPSILON = 1e-12  # MTPSL model/mapfns.py, JTR code/models/nyuv2_segnet_jtr.py


class ImageNorm(nn.Module):
  """BatchNorm2d in train mode on a batch of one image, for each image of [N, H, W, C]:
  each image normalised by its own per-channel mean and biased variance, then
  scaled and shifted (learnable, init 1 / 0). No running statistics: neither
  method ever uses them."""
  epsilon: float = BN_EPSILON

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    variance = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
    return (x - mean) * jax.lax.rsqrt(variance + self.epsilon) * scale + bias


def gumbel_hard(logits, noise, tau: float = 1.0):
  """`F.gumbel_softmax(hard=True)` along the last axis with the given Gumbel(0, 1) `noise`:
  the one-hot of the soft sample's argmax in value, the soft sample's gradient (as torch:
  y_hard - y_soft.detach() + y_soft)."""
  soft = jax.nn.softmax((logits + noise) / tau, axis=-1)
  hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), soft.shape[-1], dtype=soft.dtype)
  return hard - jax.lax.stop_gradient(soft) + soft


def _clamped_norm(x, eps: float):
  """The L2 norm over the last axis, its value clamped below at `eps` as torch's
  cosine_similarity does under no_grad: the gradient is the unclamped norm's, and
  0 (not NaN) for a zero vector, as torch's vector_norm backward."""
  squares = jnp.sum(x * x, axis=-1, keepdims=True)
  positive = squares > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)), 0.0)
  return norm + jax.lax.stop_gradient(jnp.maximum(norm, eps) - norm)


def cosine_similarity(a, b, eps: float = COSINE_EPSILON):
  """torch 2.x `F.cosine_similarity` over the last axis: sum((a / max(|a|, eps)) *
  (b / max(|b|, eps))), each vector normalised first (not w12 / sqrt(w1 w2))."""
  return jnp.sum((a / _clamped_norm(a, eps)) * (b / _clamped_norm(b, eps)), axis=-1)
