"""Real data that ships with installed packages (no download), as batches for the zoo's models.

* `digits`: scikit-learn's 1797 handwritten 8x8 digits (UCI), as images for the CNNs.
* `python_docs`: the text of Python's own reference documentation (`pydoc_data.topics`, part of
  every CPython installation, about 490,000 characters of English and code), as characters for a
  causal language model.
* `planted_graph`: no real graph ships with the installed packages (scikit-learn has none,
  networkx is not a dependency), so node classification runs on `graphs.random_graph`, a graph
  with planted communities, split into labelled training nodes and held-out test nodes.

Every function returns `Split(train, test)` of `Batch` dicts in the zoo's format (model inputs by
argument name, plus "labels"). Labels of -1 mark positions that are not scored: the unlabelled
nodes of a graph (see `masked_cross_entropy`).
"""

from __future__ import annotations

import string
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import graphs
from .registry import Batch

UNSCORED = -1
"""The label of a position that neither the loss nor the accuracy counts."""


class Split(NamedTuple):
  """A data set split into what a model trains on and what it is scored on."""

  train: Batch
  test: Batch


def _shuffled_split(num_examples: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction={test_fraction} is outside (0, 1)")
  order = np.random.default_rng(seed).permutation(num_examples)
  num_train = num_examples - int(round(test_fraction * num_examples))
  return order[:num_train], order[num_train:]


def digits(test_fraction: float = 0.25, seed: int = 0) -> Split:
  """scikit-learn's 8x8 digits as standardised images [n, 8, 8, 1] with labels 0-9.

  Args:
    test_fraction: share of the 1797 images held out for testing.
    seed: the shuffle before the split.

  Returns:
    `Split` of {"images", "labels"}; pixels are standardised with the training set's per-pixel
    mean and its overall standard deviation.
  """
  from sklearn.datasets import load_digits

  data = load_digits()
  images = data.images.astype(np.float32)[..., None]
  labels = data.target.astype(np.int32)
  train, test = _shuffled_split(len(labels), test_fraction, seed)
  mean, std = images[train].mean(axis=0), images[train].std()
  standardise = lambda index: {"images": jnp.asarray((images[index] - mean) / std),
                               "labels": jnp.asarray(labels[index])}
  return Split(standardise(train), standardise(test))


# Printable ASCII; every other character of the text maps to the last id.
_ALPHABET = string.printable
_UNKNOWN = len(_ALPHABET)
TEXT_VOCAB_SIZE = len(_ALPHABET) + 1


def encode_text(text: str) -> np.ndarray:
  """Character ids: printable ASCII in `string.printable` order, anything else `TEXT_VOCAB_SIZE - 1`."""
  lookup = np.full(128, _UNKNOWN, np.int32)
  lookup[[ord(c) for c in _ALPHABET]] = np.arange(len(_ALPHABET))
  codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
  return np.where(codes < 128, lookup[np.minimum(codes, 127)], _UNKNOWN).astype(np.int32)


def python_docs(seq_len: int = 128, test_fraction: float = 0.1) -> Split:
  """Python's reference documentation as character sequences for next-character prediction.

  The topics of `pydoc_data.topics` are joined in name order; the last `test_fraction` of the
  characters (whole topics near the end of the alphabet) is held out.

  Args:
    seq_len: characters per sequence.
    test_fraction: share of the text held out.

  Returns:
    `Split` of {"input_ids"}: `train["input_ids"]` is the whole training text as one row [1, n]
    (cut windows from it with `text_windows`), `test["input_ids"]` its non-overlapping windows
    [m, seq_len].
  """
  from pydoc_data.topics import topics

  ids = encode_text("\n\n".join(topics[name] for name in sorted(topics)))
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction={test_fraction} is outside (0, 1)")
  split = len(ids) - int(test_fraction * len(ids))
  test = ids[split:]
  test = test[: len(test) // seq_len * seq_len].reshape(-1, seq_len)
  return Split({"input_ids": jnp.asarray(ids[None, :split])}, {"input_ids": jnp.asarray(test)})


def text_windows(text: jax.Array, starts: jax.Array, seq_len: int) -> Batch:
  """Windows `text[0, s:s + seq_len]` for each start `s`: a batch {"input_ids"} [len(starts), seq_len]."""
  index = starts[:, None] + jnp.arange(seq_len)
  return {"input_ids": text[0, index]}


def planted_graph(size: graphs.GraphSize, train_fraction: float = 0.5, seed: int = 0,
                  homophily: float = 0.65, class_separation: float = 0.3) -> Split:
  """A node-classification graph with planted communities (`graphs.random_graph`), split by node.

  Args:
    size: nodes, edges, features and classes.
    train_fraction: share of nodes whose labels are trained on; the others are the test nodes.
    seed: the graph and the split.
    homophily, class_separation: as in `graphs.random_graph`.

  Returns:
    `Split`: both halves hold the whole graph; `labels` is `UNSCORED` outside the half's nodes.
  """
  graph = graphs.random_graph(jax.random.key(seed), size, homophily, class_separation)
  train, test = _shuffled_split(size.num_nodes, 1.0 - train_fraction, seed)
  def keep(index):
    labels = jnp.full(size.num_nodes, UNSCORED, jnp.int32).at[index].set(graph.labels[index])
    return {**graph._asdict(), "labels": labels}
  return Split(keep(train), keep(test))


def masked_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy of logits [..., classes] over the labels that are not `UNSCORED`."""
  scored = labels != UNSCORED
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           jnp.where(scored, labels, 0))
  return jnp.sum(jnp.where(scored, losses, 0.0)) / jnp.maximum(jnp.sum(scored), 1)


def correct_and_scored(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(number of correct predictions, number of scored labels), `UNSCORED` labels excluded."""
  scored = labels != UNSCORED
  return jnp.sum(scored & (jnp.argmax(logits, axis=-1) == labels)), jnp.sum(scored)
