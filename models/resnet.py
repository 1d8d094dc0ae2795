"""ResNet (He et al., 2016) in NHWC with BatchNorm, matching torchvision's v1.5 layout.

Depth comes from `stage_sizes` and the block class, width from `num_filters` and `width_factor`,
so ResNet-18/34/50/101/152 and wide ResNet-50-2 are configurations of one module (`ResNet18` ...
`WideResNet50_2` below). Parameter counts equal torchvision's (ResNet-50: 25,557,032).
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .common import BlockWrapper, wrap

_PAD_3X3 = ((1, 1), (1, 1))


class _ResidualBlock(nn.Module):
  """Fields and the projection shortcut shared by the basic and bottleneck blocks.

  Attributes:
    features: the stage's base width; the block outputs `features * expansion` channels.
    strides: spatial stride of the block (2 at the first block of stages 2-4).
    width_factor: multiplies the width inside the block (2 for wide ResNet-50-2).
    train: batch statistics are used and updated when True, running averages otherwise.
    dtype: computation dtype.
  """

  features: int
  strides: int = 1
  width_factor: int = 1
  train: bool = False
  dtype: Any = jnp.float32

  expansion = 1

  def conv(self, features: int, kernel: int, strides: int = 1, name: str | None = None) -> nn.Conv:
    padding = _PAD_3X3 if kernel == 3 else "VALID"
    return nn.Conv(features, (kernel, kernel), strides, padding=padding, use_bias=False,
                   dtype=self.dtype, name=name)

  def norm(self, name: str | None = None) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not self.train, momentum=0.9, epsilon=1e-5,
                        dtype=self.dtype, name=name)

  def shortcut(self, x: jax.Array) -> jax.Array:
    out_features = self.features * self.expansion
    if self.strides == 1 and x.shape[-1] == out_features:
      return x
    x = self.conv(out_features, 1, self.strides, name="shortcut_conv")(x)
    return self.norm(name="shortcut_norm")(x)


class BasicBlock(_ResidualBlock):
  """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.relu(self.norm()(self.conv(self.features * self.width_factor, 3, self.strides)(x)))
    y = self.norm()(self.conv(self.features, 3)(y))
    return nn.relu(y + self.shortcut(x))


class Bottleneck(_ResidualBlock):
  """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a residual connection (ResNet-50 and up)."""

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = self.features * self.width_factor
    y = nn.relu(self.norm()(self.conv(width, 1)(x)))
    y = nn.relu(self.norm()(self.conv(width, 3, self.strides)(y)))
    y = self.norm()(self.conv(self.features * self.expansion, 1)(y))
    return nn.relu(y + self.shortcut(x))


class Stem(nn.Module):
  """7x7/2 convolution, BatchNorm, ReLU and 3x3/2 max-pool: the largest activations of a ResNet,
  so it is wrapped like the blocks. With `small` (for small images), a 3x3/1 convolution and no
  max-pool keep the input resolution, as CIFAR ResNets do.
  """

  num_filters: int = 64
  train: bool = False
  dtype: Any = jnp.float32
  small: bool = False

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    kernel, strides = (3, 1) if self.small else (7, 2)
    pad = kernel // 2
    x = nn.Conv(self.num_filters, (kernel, kernel), strides, padding=((pad, pad), (pad, pad)),
                use_bias=False, dtype=self.dtype, name="conv")(images)
    x = nn.relu(nn.BatchNorm(use_running_average=not self.train, momentum=0.9, epsilon=1e-5,
                             dtype=self.dtype, name="norm")(x))
    return x if self.small else nn.max_pool(x, (3, 3), (2, 2), padding=_PAD_3X3)


class ResNet(nn.Module):
  """An image classifier: 7x7/2 stem, max-pool, stages of residual blocks, pool, linear head.

  Attributes:
    stage_sizes: number of blocks in each stage.
    block_cls: `BasicBlock` or `Bottleneck`.
    num_classes: size of the output logits.
    num_filters: base width of the first stage; it doubles at each stage.
    width_factor: widens the inside of every block (wide ResNets).
    train: BatchNorm mode.
    dtype: computation dtype (parameters stay float32).
    small_stem: a 3x3/1 stem without max-pool, for small images (32x32 CIFAR, 8x8 digits),
      which the 7x7/2 stem and max-pool would shrink 4x before the first block.
    wrap_block: class transform applied to the stem and to `block_cls` (e.g. `nn.remat`); the
      stem is named `stem`, blocks `stage{s}_block{b}`, counting from 1 and 0.
  """

  stage_sizes: Sequence[int]
  block_cls: type[_ResidualBlock]
  num_classes: int = 1000
  num_filters: int = 64
  width_factor: int = 1
  train: bool = False
  dtype: Any = jnp.float32
  small_stem: bool = False
  wrap_block: BlockWrapper | None = None

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """Maps images [batch, height, width, channels] to logits [batch, num_classes]."""
    x = wrap(Stem, self.wrap_block)(self.num_filters, self.train, self.dtype, self.small_stem,
                                    name="stem")(images)
    block_cls = wrap(self.block_cls, self.wrap_block)
    for stage, num_blocks in enumerate(self.stage_sizes):
      for index in range(num_blocks):
        x = block_cls(features=self.num_filters * 2**stage,
                      strides=2 if stage > 0 and index == 0 else 1,
                      width_factor=self.width_factor, train=self.train, dtype=self.dtype,
                      name=f"stage{stage + 1}_block{index}")(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck)
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=Bottleneck)
WideResNet50_2 = functools.partial(ResNet50, width_factor=2)
