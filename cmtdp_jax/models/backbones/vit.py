"""Plain ViT backbones (ViT-S/16, B/16, L/16) in timm's layout, with a simple feature pyramid.

The trunk is timm's `vit_{small,base,large}_patch16_{224,384}`: a 16x16 patch
embedding conv, a class token, a learned position embedding (class position
included), pre-norm blocks (LayerNorm eps 1e-6, fused qkv attention, MLP with
exact-erf GELU) and a final LayerNorm. Submodule names are timm's module paths
with every numeric index glued to its parent by '_' ('blocks.3.attn.qkv' ->
'blocks_3/attn/qkv'), so timm checkpoints convert mechanically (see
`cmtdp_jax.models.convert`).

Dense prediction needs maps at strides 4-32; a plain ViT has one stride (16).
As BEiT's and MAE's segmentation backbones do (Bao et al. 2022, He et al.
2022), four blocks spread over the depth are tapped (blocks 3/6/9/12 of a
12-block trunk, i.e. indices (2, 5, 8, 11); (5, 11, 17, 23) for ViT-L; the
last tap after the final norm, as timm's `forward_features` returns it), their
patch tokens reshaped to stride-16 maps, and ViTDet's simple feature pyramid
(Li et al., ECCV 2022, detectron2's `SimpleFeaturePyramid`) brings them to
strides 4/8/16/32: two 2x2 stride-2 transposed convs with LayerNorm+GELU
between them (stride 4), one (stride 8), identity (stride 16), 2x2 max-pool
(stride 32); every level then gets ViTDet's 1x1 and 3x3 convs, each followed by
a LayerNorm, to `pyramid_channels`. The pyramid is new: timm checkpoints hold
only the trunk, and `convert.load_pretrained` leaves the pyramid as initialised.

Inputs of any size work: the image is zero-padded at the bottom/right to a
multiple of 16 (timm's `dynamic_img_pad`), and the position embedding, stored
for the `img_size` grid, is resized to the input's grid as timm's
`dynamic_img_size` does (`resample_abs_pos_embed`: torch bicubic with
antialias=True, which is PIL's separable bicubic resampling, Keys a=-0.5;
see `resize_grid`).

`pyramid='none'` skips the pyramid and returns the four tapped token maps
themselves, all at stride 16 with `dim` channels (class token dropped; the
last one after the final norm, the others before it), as InvPT's ViT
(prismformore/Multi-Task-Transformer, InvPT/models/transformers/vit.py,
`select_list`) hands them to its decoder (framework 'invpt').
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cmtdp_jax.models.layers import Dtype

LAYER_NORM_EPSILON = 1e-6
# timm's init_weights_vit_timm: trunc-normal(0.02) Linear weights and position
# embedding, zero biases, class token normal(1e-6).
_DENSE_INIT = nn.initializers.truncated_normal(0.02)


def _keys_cubic(x, a: float = -0.5):
  """Keys' cubic convolution kernel (a=-0.5: PIL's and torch's antialiased bicubic)."""
  x = np.abs(x)
  return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, ((x - 5) * x + 8) * x * a - 4 * a, 0.0))


@functools.cache
def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) weights of torch's bicubic F.interpolate with antialias=True.

  PIL-style separable resampling, align_corners=False: output i is centred at
  input coordinate (i + 0.5) * in/out; the kernel support is 2 input pixels,
  widened by the factor when shrinking; taps outside the input are dropped and
  the remaining weights renormalised (no index clamping, unlike antialias=False).
  """
  scale = in_size / out_size
  stretch = max(scale, 1.0)
  weights = np.zeros((out_size, in_size))
  for i in range(out_size):
    center = scale * (i + 0.5)
    low = max(int(center - 2 * stretch + 0.5), 0)
    high = min(int(center + 2 * stretch + 0.5), in_size)
    taps = _keys_cubic((np.arange(low, high) - center + 0.5) / stretch)
    weights[i, low:high] = taps / taps.sum()
  return weights


@functools.cache
def interpolate_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) weights of torch's F.interpolate(mode='bicubic',
  align_corners=False) without antialiasing: Keys' kernel with a=-0.75 at source
  coordinate (i + 0.5) * in/out - 0.5, taps outside the input clamped to its border."""
  weights = np.zeros((out_size, in_size))
  for i in range(out_size):
    source = (i + 0.5) * in_size / out_size - 0.5
    base = math.floor(source)
    for tap in range(base - 1, base + 3):
      weights[i, min(max(tap, 0), in_size - 1)] += _keys_cubic(tap - source, a=-0.75)
  return weights


def resize_position_embedding(pos_embed: np.ndarray, rows: int, columns: int) -> np.ndarray:
  """A (1, 1 + g * g, dim) checkpoint embedding (class token first) resized once to a
  rows x columns grid as InvPT (and timm before `resample_abs_pos_embed`) resize it at
  load time: `resize_pos_embed`, F.interpolate bicubic without antialiasing."""
  grid = math.isqrt(pos_embed.shape[1] - 1)
  if grid * grid != pos_embed.shape[1] - 1:
    raise ValueError(f'a position embedding of {pos_embed.shape[1] - 1} positions is not a '
                     'square grid')
  cells = np.asarray(pos_embed[0, 1:], np.float64).reshape(grid, grid, -1)
  cells = np.einsum('ih,jw,hwc->ijc', interpolate_matrix(grid, rows),
                    interpolate_matrix(grid, columns), cells)
  return np.concatenate([pos_embed[:, :1], cells.reshape(1, rows * columns, -1)],
                        axis=1).astype(pos_embed.dtype)


def resize_grid(grid, height: int, width: int):
  """Resizes (..., H, W, C) `grid` to (..., height, width, C) as timm resizes pos. embeddings."""
  if grid.shape[-3:-1] == (height, width):
    return grid
  rows = jnp.asarray(resize_matrix(grid.shape[-3], height), jnp.float32)
  cols = jnp.asarray(resize_matrix(grid.shape[-2], width), jnp.float32)
  return jnp.einsum('ih,jw,...hwc->...ijc', rows, cols, grid.astype(jnp.float32),
                    precision='highest')


def layer_norm(dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=dtype, name=name)


def dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, kernel_init=_DENSE_INIT, name=name)


class Attention(nn.Module):
  """timm's Attention: one fused qkv Linear, softmax(q k^T / sqrt(d)) v, output Linear.

  The logits and the softmax are computed in float32 whatever the compute dtype.
  """
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, tokens, dim = x.shape
    head_dim = dim // self.num_heads
    qkv = dense(3 * dim, self.dtype, 'qkv')(x).reshape(batch, tokens, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    weights = nn.softmax(logits * head_dim ** -0.5, axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(batch, tokens, dim)
    return dense(dim, self.dtype, 'proj')(out)


class Mlp(nn.Module):
  """fc1 -> GELU (exact erf, as torch's nn.GELU) -> fc2."""
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.gelu(dense(self.hidden, self.dtype, 'fc1')(x), approximate=False)
    return dense(x.shape[-1], self.dtype, 'fc2')(y)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

  With `drop_path` > 0, training drops each residual branch per image with that
  probability and scales the kept ones by 1 / (1 - drop_path) (timm's DropPath,
  stochastic depth); it draws from the 'dropout' rng stream.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  drop_path: float = 0.0

  def _drop_path(self, branch, train: bool):
    if not train or self.drop_path == 0.0:
      return branch
    keep = 1.0 - self.drop_path
    kept = jax.random.bernoulli(self.make_rng('dropout'), keep, (branch.shape[0], 1, 1))
    return branch * (kept / keep).astype(branch.dtype)

  @nn.compact
  def __call__(self, x, train: bool = False):
    attn = Attention(self.num_heads, self.dtype, name='attn')(layer_norm(self.dtype, 'norm1')(x))
    x = x + self._drop_path(attn, train)
    hidden = int(x.shape[-1] * self.mlp_ratio)
    mlp = Mlp(hidden, self.dtype, name='mlp')(layer_norm(self.dtype, 'norm2')(x))
    return x + self._drop_path(mlp, train)


class PatchEmbed(nn.Module):
  """Non-overlapping patch_size x patch_size conv (timm's `patch_embed.proj`)."""
  dim: int
  patch_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    return nn.Conv(self.dim, (self.patch_size,) * 2, (self.patch_size,) * 2, padding='VALID',
                   dtype=self.dtype, name='proj')(images)


class SimpleFeaturePyramid(nn.Module):
  """ViTDet's simple feature pyramid on four stride-16 maps -> strides 4, 8, 16, 32.

  Deconvolutions from `maps[0]` (stride 4) and `maps[1]` (stride 8), identity
  on `maps[2]`, 2x2 max-pool on `maps[3]` (stride 32, ceil size), then per
  level a 1x1 and a 3x3 conv without bias, each followed by a LayerNorm.
  """
  channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, maps):
    dim = maps[0].shape[-1]
    deconv = lambda features, name: nn.ConvTranspose(
        features, (2, 2), (2, 2), padding='VALID', dtype=self.dtype, name=name)
    x4 = deconv(dim // 2, 'stride4_up1')(maps[0])
    x4 = nn.gelu(layer_norm(self.dtype, 'stride4_norm')(x4), approximate=False)
    x4 = deconv(dim // 4, 'stride4_up2')(x4)
    x8 = deconv(dim // 2, 'stride8_up')(maps[1])
    x32 = nn.max_pool(maps[3], (2, 2), (2, 2), padding='SAME')
    outputs = []
    for stride, x in zip((4, 8, 16, 32), (x4, x8, maps[2], x32)):
      x = nn.Conv(self.channels, (1, 1), use_bias=False, dtype=self.dtype,
                  name=f'stride{stride}_lateral')(x)
      x = layer_norm(self.dtype, f'stride{stride}_lateral_norm')(x)
      x = nn.Conv(self.channels, (3, 3), padding=1, use_bias=False, dtype=self.dtype,
                  name=f'stride{stride}_output')(x)
      outputs.append(layer_norm(self.dtype, f'stride{stride}_output_norm')(x))
    return outputs


def default_taps(depth: int) -> tuple[int, ...]:
  """Blocks ending each quarter of the depth: (2, 5, 8, 11) for 12, (5, 11, 17, 23) for 24."""
  return tuple(math.ceil(depth * (k + 1) / 4) - 1 for k in range(4))


class VisionTransformer(nn.Module):
  """ViT trunk (timm layout) + simple feature pyramid; returns four NHWC maps, finest first.

  Attributes:
    dim, depth, num_heads, mlp_ratio, patch_size: the trunk's shape.
    img_size: the input size the stored position embedding is laid out for: an
      int for a square (224 or 384 for timm's checkpoints) or (height, width)
      (InvPT's checkpoints: their training size); other input sizes resize it.
    taps: ascending indices of the blocks that feed the pyramid, finest level
      first (default: `default_taps`); blocks after the last are not built.
    pyramid_channels: channels of every pyramid level.
    pyramid: 'simple' (ViTDet's simple feature pyramid, strides 4/8/16/32) or
      'none' (the tapped token maps, stride 16, `dim` channels; no new layers).
    remat: recompute every block in the backward pass (nn.remat) instead of
      storing its activations.
    drop_path_rate: stochastic depth of the last block, rising linearly from 0 at the
      first (timm's schedule; InvPT trains ViT-L with 0.15). Training then needs a
      'dropout' rng (`models.rng_streams`).
  """
  dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  patch_size: int = 16
  img_size: int | tuple[int, int] = 224
  taps: tuple[int, ...] | None = None
  pyramid_channels: int = 256
  pyramid: str = 'simple'
  dtype: Dtype = jnp.float32
  remat: bool = False
  drop_path_rate: float = 0.0

  PYRAMIDS = ('simple', 'none')

  @property
  def feature_channels(self) -> tuple[int, ...]:
    return (self.pyramid_channels if self.pyramid == 'simple' else self.dim,) * 4

  @property
  def feature_strides(self) -> tuple[int, ...]:
    return (4, 8, 16, 32) if self.pyramid == 'simple' else (self.patch_size,) * 4

  @property
  def block_indices(self) -> tuple[int, ...]:
    taps = default_taps(self.depth) if self.taps is None else tuple(self.taps)
    if len(taps) != 4 or list(taps) != sorted(taps) or not 0 <= taps[0] <= taps[-1] < self.depth:
      raise ValueError(f'ViT taps={taps} must be 4 ascending block indices in [0, {self.depth})')
    return taps

  @property
  def position_grid(self) -> tuple[int, int]:
    """(rows, columns) of the stored position embedding."""
    height, width = (self.img_size,) * 2 if isinstance(self.img_size, int) else self.img_size
    return height // self.patch_size, width // self.patch_size

  def setup(self):
    rows, columns = self.position_grid
    self.patch_embed = PatchEmbed(self.dim, self.patch_size, self.dtype)
    self.cls_token = self.param('cls_token', nn.initializers.normal(1e-6), (1, 1, self.dim))
    self.pos_embed = self.param('pos_embed', _DENSE_INIT, (1, 1 + rows * columns, self.dim))
    block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    rates = np.linspace(0.0, self.drop_path_rate, self.depth)
    self.blocks = [block(self.num_heads, self.mlp_ratio, self.dtype, float(rate))
                   for rate in rates]
    self.norm = layer_norm(self.dtype)
    if self.pyramid not in self.PYRAMIDS:
      raise ValueError(f"ViT pyramid='{self.pyramid}' is not one of {', '.join(self.PYRAMIDS)}")
    if self.pyramid == 'simple':
      self.simple_pyramid = SimpleFeaturePyramid(self.pyramid_channels, self.dtype, name='pyramid')

  def tokens(self, images, train: bool = False):
    """The tapped blocks' outputs, (batch, 1 + h * w, dim) each (class token first), and (h, w)."""
    height, width = images.shape[1:3]
    pad = lambda size: -size % self.patch_size
    images = jnp.pad(images, ((0, 0), (0, pad(height)), (0, pad(width)), (0, 0)))
    x = self.patch_embed(images)
    batch, h, w, _ = x.shape
    pos_embed = self.pos_embed[0]
    pos_grid = resize_grid(pos_embed[1:].reshape(*self.position_grid, self.dim), h, w)
    pos_embed = jnp.concatenate([pos_embed[:1], pos_grid.reshape(h * w, self.dim)])
    cls = jnp.broadcast_to(self.cls_token, (batch, 1, self.dim)).astype(x.dtype)
    x = jnp.concatenate([cls, x.reshape(batch, h * w, self.dim)], axis=1)
    x = (x + pos_embed.astype(x.dtype)).astype(self.dtype)
    taps, outputs = self.block_indices, []
    for index in range(max(taps) + 1):
      x = self.blocks[index](x, train)
      outputs += [x] * taps.count(index)
    outputs[-1] = self.norm(outputs[-1])
    return outputs, (h, w)

  def __call__(self, images, train: bool = False):
    tokens, (h, w) = self.tokens(images, train)  # no batch statistics
    maps = [t[:, 1:].reshape(t.shape[0], h, w, self.dim) for t in tokens]
    return self.simple_pyramid(maps) if self.pyramid == 'simple' else maps


# timm's vit_{small,base,large}_patch16_{224,384}.
SIZES = {
    'vit_s16': dict(dim=384, depth=12, num_heads=6),
    'vit_b16': dict(dim=768, depth=12, num_heads=12),
    'vit_l16': dict(dim=1024, depth=24, num_heads=16),
}


def _constructor(name: str):
  def build(dtype: Dtype = jnp.float32, remat: bool = False, **kwargs) -> VisionTransformer:
    return VisionTransformer(**{**SIZES[name], **kwargs}, dtype=dtype, remat=remat)
  build.__name__ = name
  build.__doc__ = f"{name}: timm's trunk shape {SIZES[name]}; kwargs override any field."
  return build


vit_s16, vit_b16, vit_l16 = (_constructor(name) for name in SIZES)
