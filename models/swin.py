"""Swin Transformer (Liu et al., 2021): attention in local windows, shifted every other block.

`Swin()` with its defaults is Swin-T (28,288,354 parameters with a 1000-class head, as the
official implementation). A Swin block is the shared pre-norm `TransformerLayer` applied to the
tokens regrouped into windows: shifting and partitioning only permute tokens, and LayerNorm, the
MLP and the residual adds act per token, so this equals the original block exactly. The
relative-position bias and the mask that keeps shifted windows from mixing regions enter as an
attention bias.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .common import BlockWrapper, wrap
from .transformer import MASKED, TransformerLayer
from .vit import patch_embedding


def window_partition(x: jax.Array | np.ndarray, window_size: int) -> jax.Array | np.ndarray:
  """Regroups [batch, height, width, channels] into [batch, windows, window_size**2, channels]."""
  batch, height, width, channels = x.shape
  x = x.reshape(batch, height // window_size, window_size, width // window_size, window_size,
                channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, -1, window_size**2, channels)


def window_merge(windows: jax.Array, window_size: int, height: int, width: int) -> jax.Array:
  """Inverse of `window_partition`."""
  batch, _, _, channels = windows.shape
  x = windows.reshape(batch, height // window_size, width // window_size, window_size,
                      window_size, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height, width, channels)


def relative_position_index(window_size: int) -> np.ndarray:
  """For each (query, key) pair of a window, the row of the relative-position bias table."""
  coords = np.stack(np.meshgrid(np.arange(window_size), np.arange(window_size), indexing="ij"))
  coords = coords.reshape(2, -1)
  relative = coords[:, :, None] - coords[:, None, :] + window_size - 1
  return relative[0] * (2 * window_size - 1) + relative[1]


def shifted_window_mask(height: int, width: int, window_size: int, shift_size: int) -> np.ndarray:
  """Bias [windows, 1, tokens, tokens] that stops attention across regions a cyclic shift joined."""
  regions = np.zeros((1, height, width, 1), np.int32)
  bounds = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
  for label, (rows, cols) in enumerate((r, c) for r in bounds for c in bounds):
    regions[:, rows, cols, :] = label
  labels = window_partition(regions, window_size)[0, :, :, 0]
  different = labels[:, :, None] != labels[:, None, :]
  return np.where(different, MASKED, 0.0).astype(np.float32)[:, None]


class SwinBlock(nn.Module):
  """A (shifted) window attention block on [batch, height, width, channels].

  Attributes:
    num_heads: attention heads.
    window_size: side of the square windows; height and width must be multiples of it.
    shift_size: cyclic shift before partitioning (0 or window_size // 2).
    mlp_ratio: MLP width relative to the channels.
    drop_path_rate: stochastic-depth rate of this block.
    train: drop-path mode.
    dtype: computation dtype.
  """

  num_heads: int
  window_size: int
  shift_size: int = 0
  mlp_ratio: int = 4
  drop_path_rate: float = 0.0
  train: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _, height, width, channels = x.shape
    if height % self.window_size or width % self.window_size:
      raise ValueError(f"resolution {height}x{width} is not a multiple of "
                       f"window_size={self.window_size}")
    table = self.param("relative_position_bias", nn.initializers.truncated_normal(0.02),
                       ((2 * self.window_size - 1)**2, self.num_heads))
    bias = table[relative_position_index(self.window_size)].transpose(2, 0, 1)
    if self.shift_size:
      bias = bias + shifted_window_mask(height, width, self.window_size, self.shift_size)
    x = jnp.roll(x, (-self.shift_size, -self.shift_size), axis=(1, 2))
    windows = TransformerLayer(self.num_heads, self.mlp_ratio * channels,
                               drop_path_rate=self.drop_path_rate, layer_norm_epsilon=1e-5,
                               train=self.train, dtype=self.dtype, name="transformer")(
                                   window_partition(x, self.window_size), bias.astype(self.dtype))
    x = window_merge(windows, self.window_size, height, width)
    return jnp.roll(x, (self.shift_size, self.shift_size), axis=(1, 2))


class PatchEmbed(nn.Module):
  """4x4 patches embedded by a strided convolution, then LayerNorm: the first stage's input."""

  patch_size: int = 4
  embed_dim: int = 96
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = patch_embedding(self.patch_size, self.embed_dim, self.dtype)(images)
    return nn.LayerNorm(1e-5, dtype=self.dtype, name="norm")(x)


class PatchMerging(nn.Module):
  """Halves the resolution, doubles the channels: 2x2 neighbours concatenated, normed, projected."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                        axis=-1)
    x = nn.LayerNorm(1e-5, dtype=self.dtype, name="norm")(x)
    return nn.Dense(x.shape[-1] // 2, use_bias=False, dtype=self.dtype, name="reduction")(x)


class Swin(nn.Module):
  """An image classifier: 4x4 patches, stages of Swin blocks with patch merging, pool, linear head.

  Attributes:
    num_classes: size of the output logits.
    patch_size: side of the square patches.
    embed_dim: channels of the first stage; doubled by each patch merging.
    depths: blocks per stage.
    num_heads: attention heads per stage.
    window_size: window side; a stage no larger than a window uses one unshifted window.
    mlp_ratio: MLP width relative to the channels.
    drop_path_rate: stochastic depth, rising linearly from 0 to this over all blocks.
    train: drop-path mode.
    dtype: computation dtype.
    wrap_block: class transform applied to the patch embedding (`patch_embed`), `SwinBlock`
      (`stage{s}_block{b}`) and `PatchMerging` (`stage{s}_merging`).
  """

  num_classes: int = 1000
  patch_size: int = 4
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: int = 4
  drop_path_rate: float = 0.2
  train: bool = False
  dtype: Any = jnp.float32
  wrap_block: BlockWrapper | None = None

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """Maps images [batch, height, width, channels] to logits [batch, num_classes]."""
    x = wrap(PatchEmbed, self.wrap_block)(self.patch_size, self.embed_dim, self.dtype,
                                          name="patch_embed")(images)
    drop_path_rates = iter(np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist())
    block_cls = wrap(SwinBlock, self.wrap_block)
    merging_cls = wrap(PatchMerging, self.wrap_block)
    for stage, (depth, num_heads) in enumerate(zip(self.depths, self.num_heads, strict=True)):
      if stage > 0:
        x = merging_cls(self.dtype, name=f"stage{stage + 1}_merging")(x)
      resolution = min(x.shape[1], x.shape[2])
      window_size = min(self.window_size, resolution)
      for index in range(depth):
        shifted = index % 2 == 1 and resolution > window_size
        x = block_cls(num_heads=num_heads, window_size=window_size,
                      shift_size=window_size // 2 if shifted else 0, mlp_ratio=self.mlp_ratio,
                      drop_path_rate=next(drop_path_rates), train=self.train, dtype=self.dtype,
                      name=f"stage{stage + 1}_block{index}")(x)
    x = nn.LayerNorm(1e-5, dtype=self.dtype, name="final_norm")(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(jnp.mean(x, axis=(1, 2)))
