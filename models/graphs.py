"""Synthetic graphs for the GNN models: ogbn-arxiv-sized for benchmarks, tiny for tests.

No download: node classes, features and edges are drawn from a seed. Features are noisy class
centres and most edges join nodes of the same class, so the task is learnable and neighbours
help, as on a real citation graph; the structure is otherwise uniform random.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class GraphSize(NamedTuple):
  """The dimensions of a node-classification graph."""

  num_nodes: int
  num_edges: int
  num_features: int
  num_classes: int


OGBN_ARXIV = GraphSize(num_nodes=169_343, num_edges=1_166_243, num_features=128, num_classes=40)
"""The size of ogbn-arxiv (directed edges as published, before symmetrisation)."""

TINY_GRAPH = GraphSize(num_nodes=64, num_edges=256, num_features=16, num_classes=4)


class Graph(NamedTuple):
  """A graph as flat arrays; edge e carries a message from `senders[e]` to `receivers[e]`."""

  node_features: jax.Array  # [num_nodes, num_features] float32
  senders: jax.Array  # [num_edges] int32
  receivers: jax.Array  # [num_edges] int32
  labels: jax.Array  # [num_nodes] int32


@functools.partial(jax.jit, static_argnames=("size", "homophily", "class_separation"))
def random_graph(key: jax.Array, size: GraphSize, homophily: float = 0.65,
                 class_separation: float = 0.3) -> Graph:
  """Draws a node-classification graph of exactly `size`.

  Args:
    key: PRNG key; the same key gives the same graph.
    size: node, edge, feature and class counts (static).
    homophily: fraction of edges whose receiver is drawn from the sender's class; the others
      pick any node (ogbn-arxiv's edge homophily is about 0.65).
    class_separation: norm scale of the class centres relative to unit feature noise.

  Returns:
    A `Graph`. Under `jax.eval_shape` it costs no memory, which gives the shapes of the
    ogbn-arxiv-sized graph for compiling a step on abstract inputs.
  """
  if not 0.0 <= homophily <= 1.0:
    raise ValueError(f"homophily={homophily} is outside [0, 1]")
  (label_key, centre_key, noise_key, sender_key, offset_key, random_key,
   choice_key) = jax.random.split(key, 7)
  num_nodes, num_edges = size.num_nodes, size.num_edges
  labels = jax.random.randint(label_key, (num_nodes,), 0, size.num_classes, jnp.int32)
  centres = class_separation * jax.random.normal(centre_key, (size.num_classes, size.num_features))
  features = centres[labels] + jax.random.normal(noise_key, (num_nodes, size.num_features))
  senders = jax.random.randint(sender_key, (num_edges,), 0, num_nodes, jnp.int32)
  # A same-class receiver: a uniform position inside the sender's class in class-sorted order.
  by_class = jnp.argsort(labels).astype(jnp.int32)
  class_sizes = jnp.bincount(labels, length=size.num_classes)
  class_starts = jnp.cumsum(class_sizes) - class_sizes
  sender_class = labels[senders]
  offsets = jnp.floor(jax.random.uniform(offset_key, (num_edges,)) * class_sizes[sender_class])
  same_class = by_class[class_starts[sender_class] + offsets.astype(jnp.int32)]
  any_node = jax.random.randint(random_key, (num_edges,), 0, num_nodes, jnp.int32)
  receivers = jnp.where(jax.random.bernoulli(choice_key, homophily, (num_edges,)), same_class,
                        any_node)
  return Graph(features, senders, receivers, labels)
