"""The transformer layer shared by BERT, GPT-2, ViT and Swin.

One `TransformerLayer` covers the post-norm (BERT) and pre-norm (GPT-2, ViT, Swin) variants. Its
attention works over the last two axes, so leading axes can be batch and windows (Swin), and it
takes an additive logits bias for padding masks and relative positions.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

MASKED = -1e9
"""Logit bias that removes a key from attention (finite, so a fully masked row stays finite)."""


def padding_bias(mask: jax.Array) -> jax.Array:
  """Turns a [batch, keys] mask (nonzero = attend) into a bias [batch, 1, 1, keys]."""
  return jnp.where(mask[:, None, None, :] != 0, 0.0, MASKED)


class MultiHeadAttention(nn.Module):
  """Self-attention with a fused QKV projection, over the token axis -2 of [..., tokens, features].

  Attributes:
    num_heads: number of heads; features must be divisible by it.
    causal: each token attends only to itself and earlier tokens.
    dropout_rate: dropout on the attention probabilities.
    train: dropout is active when True.
    dtype: computation dtype; the softmax runs in float32.
  """

  num_heads: int
  causal: bool = False
  dropout_rate: float = 0.0
  train: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """Attends x to itself; `bias` broadcasts against logits [..., heads, queries, keys]."""
    features = x.shape[-1]
    if features % self.num_heads:
      raise ValueError(f"features={features} is not divisible by num_heads={self.num_heads}")
    head_dim = features // self.num_heads
    qkv = nn.DenseGeneral((3, self.num_heads, head_dim), dtype=self.dtype, name="qkv")(x)
    query, key, value = (qkv[..., i, :, :] for i in range(3))
    logits = jnp.einsum("...qhd,...khd->...hqk", query, key) / jnp.sqrt(head_dim).astype(self.dtype)
    if bias is not None:
      logits = logits + bias
    if self.causal:
      # An additive bias of constants: the backward pass needs nothing from it, where selecting
      # with a mask would keep the mask and a zeros array at the size of the logits.
      tokens = x.shape[-2]
      causal = jnp.tril(jnp.ones((tokens, tokens), bool))
      logits = logits + jnp.where(causal, 0.0, MASKED).astype(logits.dtype)
    probs = jax.nn.softmax(logits.astype(jnp.float32)).astype(self.dtype)
    probs = nn.Dropout(self.dropout_rate, deterministic=not self.train)(probs)
    out = jnp.einsum("...hqk,...khd->...qhd", probs, value)
    return nn.DenseGeneral(features, axis=(-2, -1), dtype=self.dtype, name="out")(out)


class Mlp(nn.Module):
  """The position-wise feed-forward network: dense, GELU, dense back to the input width."""

  hidden_features: int
  gelu_approximate: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.Dense(self.hidden_features, dtype=self.dtype, name="fc1")(x)
    h = nn.gelu(h, approximate=self.gelu_approximate)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class TransformerLayer(nn.Module):
  """Attention then MLP, each in a residual branch with LayerNorm, dropout and drop-path.

  Pre-norm computes `x + f(norm(x))`; post-norm (BERT) computes `norm(x + f(x))`.

  Attributes:
    num_heads: attention heads.
    mlp_features: hidden width of the MLP.
    pre_norm: pre-norm (GPT-2, ViT, Swin) or post-norm (BERT).
    causal: causal self-attention (GPT-2).
    dropout_rate: dropout on each branch's output.
    attention_dropout_rate: dropout on attention probabilities.
    drop_path_rate: probability of dropping a whole branch per example (stochastic depth).
    layer_norm_epsilon: LayerNorm epsilon.
    gelu_approximate: tanh GELU (GPT-2) instead of the exact one.
    train: dropout and drop-path are active when True.
    dtype: computation dtype.
  """

  num_heads: int
  mlp_features: int
  pre_norm: bool = True
  causal: bool = False
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  layer_norm_epsilon: float = 1e-6
  gelu_approximate: bool = False
  train: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, attention_bias: jax.Array | None = None) -> jax.Array:
    """Maps [..., tokens, features] to the same shape; see `MultiHeadAttention` for the bias."""
    attention = MultiHeadAttention(self.num_heads, self.causal, self.attention_dropout_rate,
                                   self.train, self.dtype, name="attention")
    mlp = Mlp(self.mlp_features, self.gelu_approximate, self.dtype, name="mlp")
    branches = (("attention", lambda h: attention(h, attention_bias)), ("mlp", mlp))
    # The drop-path mask is shared by all positions of one example: axis 0 is the batch.
    drop_path = nn.Dropout(self.drop_path_rate, broadcast_dims=tuple(range(1, x.ndim)),
                           deterministic=not self.train)
    for name, branch in branches:
      norm = nn.LayerNorm(self.layer_norm_epsilon, dtype=self.dtype, name=f"{name}_norm")
      h = branch(norm(x) if self.pre_norm else x)
      h = drop_path(nn.Dropout(self.dropout_rate, deterministic=not self.train)(h))
      x = x + h if self.pre_norm else norm(x + h)
    return x
