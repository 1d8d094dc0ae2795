"""Vision Transformer (Dosovitskiy et al., 2021): patch embedding, class token, pre-norm encoder.

`ViT()` with its defaults is ViT-B/16 with a 1000-class head (86,567,656 parameters at 224x224,
as timm's `vit_base_patch16_224`).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .common import BlockWrapper, wrap
from .transformer import TransformerLayer


def patch_embedding(patch_size: int, features: int, dtype: Any) -> nn.Conv:
  """The layer that embeds each non-overlapping patch: a convolution with stride = kernel."""
  patch = (patch_size, patch_size)
  return nn.Conv(features, patch, patch, padding="VALID", dtype=dtype, name="patch_embedding")


class ViT(nn.Module):
  """An image classifier that reads non-overlapping patches as tokens.

  Attributes:
    num_classes: size of the output logits.
    patch_size: side of the square patches.
    hidden_size: token width.
    num_layers: encoder layers, named `layer_{i}`.
    num_heads: attention heads.
    mlp_features: hidden width of each MLP.
    dropout_rate: dropout after the embedding and in each residual branch.
    train: dropout mode.
    dtype: computation dtype.
    wrap_block: class transform applied to `TransformerLayer` (e.g. `nn.remat`).
  """

  num_classes: int = 1000
  patch_size: int = 16
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_features: int = 3072
  dropout_rate: float = 0.0
  train: bool = False
  dtype: Any = jnp.float32
  wrap_block: BlockWrapper | None = None

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """Maps images [batch, height, width, channels] to logits [batch, num_classes]."""
    x = patch_embedding(self.patch_size, self.hidden_size, self.dtype)(images)
    x = x.reshape(x.shape[0], -1, self.hidden_size)
    cls_token = self.param("cls_token", nn.initializers.zeros, (1, 1, self.hidden_size))
    cls_tokens = jnp.broadcast_to(cls_token.astype(x.dtype), (x.shape[0], 1, self.hidden_size))
    x = jnp.concatenate([cls_tokens, x], axis=1)
    position = self.param("position_embedding", nn.initializers.normal(0.02),
                          (1, x.shape[1], self.hidden_size))
    x = nn.Dropout(self.dropout_rate, deterministic=not self.train)(x + position)
    layer_cls = wrap(TransformerLayer, self.wrap_block)
    for i in range(self.num_layers):
      x = layer_cls(num_heads=self.num_heads, mlp_features=self.mlp_features,
                    dropout_rate=self.dropout_rate, train=self.train, dtype=self.dtype,
                    name=f"layer_{i}")(x)
    x = nn.LayerNorm(1e-6, dtype=self.dtype, name="final_norm")(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x[:, 0])
