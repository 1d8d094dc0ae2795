"""Text transformers: BERT encoder (Devlin et al., 2019), GPT-2 decoder (Radford et al., 2019).

Both are stacks of the shared `TransformerLayer`: BERT post-norm with exact GELU, GPT-2 pre-norm,
causal, with tanh GELU. `Bert()` is BERT-base with a sequence-classification head (pooler plus
classifier, 109,483,778 parameters); `BertLarge()` is BERT-large. `GPT2()` is GPT-2 small
with its output projection tied to the token embedding (124,439,808 parameters).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .common import BlockWrapper, wrap
from .transformer import TransformerLayer, padding_bias


def _embedding(num_embeddings: int, features: int, dtype: Any, name: str) -> nn.Embed:
  """An embedding table initialised like BERT's and GPT-2's (normal, std 0.02)."""
  return nn.Embed(num_embeddings, features, embedding_init=nn.initializers.normal(0.02),
                  dtype=dtype, name=name)


def _positions(input_ids: jax.Array, max_position: int) -> jax.Array:
  """Position ids 0..tokens-1, checked against the table (an out-of-range gather would clamp)."""
  tokens = input_ids.shape[1]
  if tokens > max_position:
    raise ValueError(f"{tokens} tokens exceed max_position={max_position}")
  return jnp.arange(tokens)


class Bert(nn.Module):
  """A bidirectional encoder that classifies token sequences.

  Attributes:
    vocab_size: token vocabulary.
    hidden_size: token width.
    num_layers: encoder layers, named `layer_{i}`.
    num_heads: attention heads.
    mlp_features: hidden width of each MLP.
    max_position: longest sequence with a position embedding.
    type_vocab_size: number of segment types.
    num_labels: size of the output logits.
    dropout_rate: dropout on embeddings, attention probabilities and residual branches.
    train: dropout mode.
    dtype: computation dtype.
    wrap_block: class transform applied to `TransformerLayer` (e.g. `nn.remat`).
  """

  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_features: int = 3072
  max_position: int = 512
  type_vocab_size: int = 2
  num_labels: int = 2
  dropout_rate: float = 0.1
  train: bool = False
  dtype: Any = jnp.float32
  wrap_block: BlockWrapper | None = None

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None) -> jax.Array:
    """Maps token ids [batch, tokens] to logits [batch, num_labels].

    Args:
      input_ids: integer tokens; the first is read as the [CLS] summary.
      attention_mask: [batch, tokens], nonzero where a token is real rather than padding.
      token_type_ids: segment of each token; all 0 when omitted.
    """
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    positions = _positions(input_ids, self.max_position)
    x = (_embedding(self.vocab_size, self.hidden_size, self.dtype, "token_embedding")(input_ids)
         + _embedding(self.max_position, self.hidden_size, self.dtype,
                      "position_embedding")(positions)
         + _embedding(self.type_vocab_size, self.hidden_size, self.dtype,
                      "type_embedding")(token_type_ids))
    x = nn.LayerNorm(1e-12, dtype=self.dtype, name="embedding_norm")(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not self.train)(x)
    bias = None if attention_mask is None else padding_bias(attention_mask).astype(self.dtype)
    layer_cls = wrap(TransformerLayer, self.wrap_block)
    for i in range(self.num_layers):
      x = layer_cls(num_heads=self.num_heads, mlp_features=self.mlp_features, pre_norm=False,
                    dropout_rate=self.dropout_rate, attention_dropout_rate=self.dropout_rate,
                    layer_norm_epsilon=1e-12, train=self.train, dtype=self.dtype,
                    name=f"layer_{i}")(x, bias)
    pooled = jnp.tanh(nn.Dense(self.hidden_size, dtype=self.dtype, name="pooler")(x[:, 0]))
    pooled = nn.Dropout(self.dropout_rate, deterministic=not self.train)(pooled)
    return nn.Dense(self.num_labels, dtype=self.dtype, name="classifier")(pooled)


BertLarge = functools.partial(Bert, hidden_size=1024, num_layers=24, num_heads=16,
                              mlp_features=4096)


class GPT2(nn.Module):
  """A causal language model: predicts each next token.

  Attributes:
    vocab_size: token vocabulary.
    hidden_size: token width.
    num_layers: decoder layers, named `layer_{i}`.
    num_heads: attention heads.
    mlp_features: hidden width of each MLP.
    max_position: longest sequence with a position embedding.
    dropout_rate: dropout on embeddings, attention probabilities and residual branches.
    train: dropout mode.
    dtype: computation dtype.
    wrap_block: class transform applied to `TransformerLayer` (e.g. `nn.remat`).
  """

  vocab_size: int = 50257
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_features: int = 3072
  max_position: int = 1024
  dropout_rate: float = 0.1
  train: bool = False
  dtype: Any = jnp.float32
  wrap_block: BlockWrapper | None = None

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    """Maps token ids [batch, tokens] to next-token logits [batch, tokens, vocab_size]."""
    token_embedding = _embedding(self.vocab_size, self.hidden_size, self.dtype, "token_embedding")
    positions = _positions(input_ids, self.max_position)
    x = (token_embedding(input_ids)
         + _embedding(self.max_position, self.hidden_size, self.dtype,
                      "position_embedding")(positions))
    x = nn.Dropout(self.dropout_rate, deterministic=not self.train)(x)
    layer_cls = wrap(TransformerLayer, self.wrap_block)
    for i in range(self.num_layers):
      x = layer_cls(num_heads=self.num_heads, mlp_features=self.mlp_features, causal=True,
                    dropout_rate=self.dropout_rate, attention_dropout_rate=self.dropout_rate,
                    layer_norm_epsilon=1e-5, gelu_approximate=True, train=self.train,
                    dtype=self.dtype, name=f"layer_{i}")(x)
    x = nn.LayerNorm(1e-5, dtype=self.dtype, name="final_norm")(x)
    return token_embedding.attend(x)
