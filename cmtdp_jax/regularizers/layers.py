"""Pieces MTPSL's and JTR's networks share, written as the PyTorch originals compute them.

Both call their network on one image at a time in train mode, so BatchNorm normalises with
that image's statistics (`ImageNorm`); both sample semseg with a hard Gumbel-softmax
(`gumbel_hard`) and compare maps with torch 2.x's `F.cosine_similarity` (`cosine_similarity`).
MTPSL's network, hundreds of small 3x3 convolutions per step, uses `Conv3x3`: its kernel
gradient is cheaper on CPU.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_EPSILON = 1e-5  # torch's BatchNorm2d
COSINE_EPSILON = 1e-12  # MTPSL model/mapfns.py, JTR code/models/nyuv2_segnet_jtr.py
_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _conv3x3(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=_NHWC)


def conv3x3_kernel_gradient(x, grad):
  """d(sum(grad * conv3x3(x, k))) / dk as nine matmuls, one per kernel tap: the tap (dy, dx)
  pairs x shifted by (dy - 1, dx - 1) with grad, summed over images and positions."""
  height, width, channels = x.shape[1:]
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  grad = grad.reshape(-1, grad.shape[-1])
  taps = [jnp.dot(padded[:, dy:dy + height, dx:dx + width].reshape(-1, channels).T, grad)
          for dy in range(3) for dx in range(3)]
  return jnp.stack(taps).reshape((3, 3) + taps[0].shape)


def _xla_kernel_gradient(x, grad, kernel):
  return jax.vjp(lambda k: _conv3x3(x, k), kernel)[1](grad)[0]


@jax.custom_vjp
def conv3x3(x, kernel):
  """`nn.Conv`'s 3x3, stride 1, zero padding 1 convolution of NHWC `x` with an HWIO kernel.

  Same value and input gradient. On CPU the kernel gradient is `conv3x3_kernel_gradient`, the
  same sum in another order: XLA:CPU computes it as a convolution contracting the batch, 1.1
  to 4 times slower than the matmuls at MTPSL's shapes (288 maps of 96x96x16 to 12x12x128,
  measured 2026-12-07). Elsewhere it is XLA's own (cuDNN's on GPU)."""
  return _conv3x3(x, kernel)


def _conv3x3_forward(x, kernel):
  return _conv3x3(x, kernel), (x, kernel)


def _conv3x3_backward(residuals, grad):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda inputs: _conv3x3(inputs, kernel), x)
  kernel_grad = jax.lax.platform_dependent(
      x, grad, kernel, cpu=lambda x, grad, _: conv3x3_kernel_gradient(x, grad),
      default=_xla_kernel_gradient)
  return input_vjp(grad)[0], kernel_grad


conv3x3.defvjp(_conv3x3_forward, _conv3x3_backward)


class Conv3x3(nn.Module):
  """`nn.Conv(features, (3, 3), padding=1)` with bias (same parameters, names and value),
  through `conv3x3`."""
  features: int
  kernel_init: nn.initializers.Initializer = nn.linear.default_kernel_init

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', self.kernel_init, (3, 3, x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias)
    return conv3x3(x, kernel) + bias


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
