"""Graph neural networks for full-batch node classification: GCN, GraphSAGE and GAT.

Message passing runs on an edge list (`senders`, `receivers`) with gathers and
`jax.ops.segment_sum`, a chunk of edges at a time (`gather_sum`): the per-edge messages of a
graph of ogbn-arxiv's size take 1.3 GB at once, more than all node activations together, so the
edges are streamed through a `lax.scan` and at most `EDGE_CHUNK` messages exist at any time. The model follows the OGB ogbn-arxiv baselines: 3 layers, hidden 256,
BatchNorm, ReLU and dropout between layers.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .common import BlockWrapper, wrap


def add_self_loops(senders: jax.Array, receivers: jax.Array,
                   num_nodes: int) -> tuple[jax.Array, jax.Array]:
  """Appends an edge from every node to itself."""
  nodes = jnp.arange(num_nodes, dtype=senders.dtype)
  return jnp.concatenate([senders, nodes]), jnp.concatenate([receivers, nodes])


EDGE_CHUNK = 1 << 16


def gather_sum(values: jax.Array, senders: jax.Array, receivers: jax.Array, num_nodes: int,
               weights: jax.Array | None = None) -> jax.Array:
  """`segment_sum(weights * values[senders], receivers)`, forming `EDGE_CHUNK` messages at a time.

  Args:
    values: node values [num_nodes, ...].
    senders, receivers: the edges [num_edges].
    num_nodes: the number of receiving nodes.
    weights: per-edge factors broadcastable to `values[senders]`, or None for 1.
  """
  num_edges = senders.shape[0]
  chunk = max(1, min(EDGE_CHUNK, num_edges))
  num_chunks = -(-num_edges // chunk)
  pad = num_chunks * chunk - num_edges
  if weights is None:
    weights = jnp.ones((num_edges,) + (1,) * (values.ndim - 1), values.dtype)
  # Padding edges go from node 0 to node 0 with weight 0.
  split = lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape((num_chunks, chunk) + a.shape[1:])

  def add_chunk(total, edges):
    s, r, w = edges
    # Scattered into the carry itself: `total + segment_sum(...)` made XLA hoist segment_sum's
    # zeros out of the loop and add a node-sized buffer of them to `total` on every chunk.
    return total.at[r].add(values[s] * w), None

  zeros = jnp.zeros((num_nodes,) + values.shape[1:], values.dtype)
  total, _ = jax.lax.scan(add_chunk, zeros, (split(senders), split(receivers), split(weights)))
  return total


class GraphLayer(nn.Module):
  """One message-passing layer; unless it is the output layer, then BatchNorm, ReLU and dropout.

  Subclasses define `propagate`, the convolution itself.

  Attributes:
    features: output width.
    is_output: the last layer, which returns logits without normalisation or activation.
    dropout_rate: dropout after the activation.
    train: BatchNorm and dropout mode.
    dtype: computation dtype.
  """

  features: int
  is_output: bool = False
  dropout_rate: float = 0.5
  train: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, senders: jax.Array, receivers: jax.Array) -> jax.Array:
    """Maps node features [num_nodes, in_features] to [num_nodes, features]."""
    h = self.propagate(x, senders, receivers)
    if self.is_output:
      return h
    h = nn.BatchNorm(use_running_average=not self.train, momentum=0.9, dtype=self.dtype,
                     name="norm")(h)
    return nn.Dropout(self.dropout_rate, deterministic=not self.train)(nn.relu(h))

  def propagate(self, x: jax.Array, senders: jax.Array, receivers: jax.Array) -> jax.Array:
    raise NotImplementedError


class GCNLayer(GraphLayer):
  """Graph convolution (Kipf & Welling, 2017): symmetric-normalised sum over neighbours and self."""

  def propagate(self, x: jax.Array, senders: jax.Array, receivers: jax.Array) -> jax.Array:
    num_nodes = x.shape[0]
    senders, receivers = add_self_loops(senders, receivers, num_nodes)
    degree = jax.ops.segment_sum(jnp.ones(receivers.shape), receivers, num_nodes)
    scale = jax.lax.rsqrt(degree)
    edge_weights = (scale[senders] * scale[receivers]).astype(self.dtype)
    h = nn.Dense(self.features, use_bias=False, dtype=self.dtype, name="linear")(x)
    h = gather_sum(h, senders, receivers, num_nodes, edge_weights[:, None])
    return h + self.param("bias", nn.initializers.zeros, (self.features,))


class SAGELayer(GraphLayer):
  """GraphSAGE with the mean aggregator (Hamilton et al., 2017): W_root x + W_neigh mean(x_j)."""

  def propagate(self, x: jax.Array, senders: jax.Array, receivers: jax.Array) -> jax.Array:
    num_nodes = x.shape[0]
    total = gather_sum(x, senders, receivers, num_nodes)
    count = jax.ops.segment_sum(jnp.ones(receivers.shape), receivers, num_nodes)
    mean = total / jnp.maximum(count, 1.0).astype(x.dtype)[:, None]
    return (nn.Dense(self.features, dtype=self.dtype, name="neighbours")(mean)
            + nn.Dense(self.features, use_bias=False, dtype=self.dtype, name="root")(x))


class GATLayer(GraphLayer):
  """Graph attention (Velickovic et al., 2018): softmax-weighted neighbours, several heads.

  Hidden layers concatenate `num_heads` heads of `features // num_heads`; the output layer
  averages `num_heads` heads of `features`.
  """

  num_heads: int = 4
  negative_slope: float = 0.2

  def propagate(self, x: jax.Array, senders: jax.Array, receivers: jax.Array) -> jax.Array:
    if not self.is_output and self.features % self.num_heads:
      raise ValueError(f"features={self.features} is not divisible by num_heads={self.num_heads}")
    num_nodes = x.shape[0]
    senders, receivers = add_self_loops(senders, receivers, num_nodes)
    head_features = self.features if self.is_output else self.features // self.num_heads
    h = nn.DenseGeneral((self.num_heads, head_features), use_bias=False, dtype=self.dtype,
                        name="linear")(x)
    attention = lambda name: self.param(name, nn.initializers.glorot_uniform(),
                                        (self.num_heads, head_features))
    source_score = jnp.sum(h * attention("attention_source"), axis=-1)
    target_score = jnp.sum(h * attention("attention_target"), axis=-1)
    logits = nn.leaky_relu(source_score[senders] + target_score[receivers], self.negative_slope)
    # Subtracting each receiver's maximum keeps exp finite; it cancels in the softmax.
    logits = logits - jax.lax.stop_gradient(
        jax.ops.segment_max(logits, receivers, num_nodes))[receivers]
    weights = jnp.exp(logits)
    weights = weights / jax.ops.segment_sum(weights, receivers, num_nodes)[receivers]
    h = gather_sum(h, senders, receivers, num_nodes, weights[..., None])
    h = jnp.mean(h, axis=1) if self.is_output else h.reshape(num_nodes, -1)
    return h + self.param("bias", nn.initializers.zeros, (self.features,))


class GNN(nn.Module):
  """A stack of graph layers that classifies every node of one graph.

  Attributes:
    layer_cls: `GCNLayer`, `SAGELayer` or `GATLayer`.
    num_classes: size of the output logits.
    hidden_features: width of the hidden layers.
    num_layers: graph layers, named `layer_{i}`; the last outputs logits.
    dropout_rate: dropout between layers.
    train: BatchNorm and dropout mode.
    dtype: computation dtype.
    wrap_block: class transform applied to `layer_cls` (e.g. `nn.remat`).
  """

  layer_cls: type[GraphLayer]
  num_classes: int = 40
  hidden_features: int = 256
  num_layers: int = 3
  dropout_rate: float = 0.5
  train: bool = False
  dtype: Any = jnp.float32
  wrap_block: BlockWrapper | None = None

  @nn.compact
  def __call__(self, node_features: jax.Array, senders: jax.Array,
               receivers: jax.Array) -> jax.Array:
    """Maps node features [num_nodes, in_features] and edges [num_edges] to node logits."""
    layer_cls = wrap(self.layer_cls, self.wrap_block)
    x = node_features
    for i in range(self.num_layers):
      is_output = i == self.num_layers - 1
      x = layer_cls(features=self.num_classes if is_output else self.hidden_features,
                    is_output=is_output, dropout_rate=self.dropout_rate, train=self.train,
                    dtype=self.dtype, name=f"layer_{i}")(x, senders, receivers)
    return x


GCN = functools.partial(GNN, layer_cls=GCNLayer)
GraphSAGE = functools.partial(GNN, layer_cls=SAGELayer)
GAT = functools.partial(GNN, layer_cls=GATLayer)
