"""Training tasks on real data: a zoo model, its data, how batches are drawn and what is scored.

Three tasks, one per family of the GACT paper, sized to train on a CPU:

* `digits_task`: a ResNet with the small-image stem on scikit-learn's 8x8 digits.
* `text_task`: a GPT-2-style causal transformer predicting the next character of Python's
  reference documentation.
* `graph_task`: a GCN classifying the nodes of a graph with planted communities.

A task builds its model for any `wrap_block` (`None`, `nn.remat`, `jact.compressed` ...), so every
variant trains the same variables; see `models.training` for the loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax

from . import datasets, graphs
from .common import BlockWrapper
from .registry import Batch, ModelSpec, get_model

Sampler = Callable[[jax.Array, int], Batch]
"""`(key, batch_size) -> Batch`: a training batch drawn inside a jitted step."""
Targets = Callable[[jax.Array, Batch], tuple[jax.Array, jax.Array]]
"""`(logits, batch) -> (logits [..., classes], labels [...])`: what the loss and accuracy compare."""


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """A model on real data, with everything a training loop needs.

  Attributes:
    name: short name ("digits", "text", "graph").
    description: one line saying what is trained on what.
    build: `wrap_block -> ModelSpec`: the model with its blocks wrapped (None: unwrapped).
    data: the training and test data.
    sample: draws a training batch; sampling is with replacement, so consecutive batches are
      independent (the minibatch noise of SGD that the GACT stability check compares with).
    targets: the logits and labels that the loss and accuracy compare; labels equal to
      `datasets.UNSCORED` are ignored.
    batch_size: training batch size (a graph trains on all of it: its number of nodes).
    steps: training steps.
    learning_rate: peak learning rate of the warm-up cosine schedule.
    metric: name of the score, e.g. "test accuracy".
  """

  name: str
  description: str
  build: Callable[[BlockWrapper | None], ModelSpec]
  data: datasets.Split
  sample: Sampler
  targets: Targets
  batch_size: int
  steps: int
  learning_rate: float
  metric: str

  def replace(self, **changes) -> "Task":
    """A copy with some fields changed (e.g. `steps` for a quick run)."""
    return dataclasses.replace(self, **changes)


def sample_rows(data: Batch) -> Sampler:
  """Draws `batch_size` examples (rows of every array) uniformly with replacement."""
  num_examples = len(next(iter(data.values())))
  def sample(key: jax.Array, batch_size: int) -> Batch:
    index = jax.random.randint(key, (batch_size,), 0, num_examples)
    return {name: value[index] for name, value in data.items()}
  return sample


def sample_windows(text: jax.Array, seq_len: int) -> Sampler:
  """Draws `batch_size` windows of `seq_len` characters at uniform random offsets."""
  def sample(key: jax.Array, batch_size: int) -> Batch:
    starts = jax.random.randint(key, (batch_size,), 0, text.shape[1] - seq_len + 1)
    return datasets.text_windows(text, starts, seq_len)
  return sample


def whole(data: Batch) -> Sampler:
  """The whole training set at every step (full-batch training of a graph)."""
  return lambda key, batch_size: data


def _labels(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
  return logits, batch["labels"]


def _next_token(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
  return logits[:, :-1], batch["input_ids"][:, 1:]


def digits_task(steps: int = 400, batch_size: int = 64, num_filters: int = 16,
                stage_sizes: Sequence[int] = (1, 1, 1), learning_rate: float = 3e-3,
                test_fraction: float = 0.25) -> Task:
  """A ResNet (basic blocks, 3x3/1 stem, no max-pool) classifying scikit-learn's 8x8 digits.

  Args:
    steps, batch_size, learning_rate: training.
    num_filters: width of the first stage (it doubles at each stage).
    stage_sizes: basic blocks per stage; three stages take 8x8 to 2x2.
    test_fraction: share of the 1797 images held out.
  """
  data = datasets.digits(test_fraction)
  build = lambda wrap_block: get_model(
      "resnet18", "tiny", wrap_block=wrap_block, image_size=8, stage_sizes=tuple(stage_sizes),
      num_filters=num_filters, num_classes=10, small_stem=True)
  return Task("digits", f"ResNet ({len(stage_sizes)} stages of {tuple(stage_sizes)} basic blocks, "
              f"width {num_filters}) on scikit-learn digits", build, data, sample_rows(data.train),
              _labels, batch_size, steps, learning_rate, "test accuracy")


def text_task(steps: int = 600, batch_size: int = 32, seq_len: int = 64, hidden_size: int = 32,
              num_layers: int = 2, num_heads: int = 2, learning_rate: float = 3e-3) -> Task:
  """A GPT-2-style causal transformer predicting the next character of Python's documentation.

  Args:
    steps, batch_size, learning_rate: training.
    seq_len: characters per sequence.
    hidden_size, num_layers, num_heads: the transformer (MLP width 4 x hidden, no dropout).
  """
  data = datasets.python_docs(seq_len)
  build = lambda wrap_block: get_model(
      "gpt2_small", "tiny", wrap_block=wrap_block, vocab_size=datasets.TEXT_VOCAB_SIZE,
      seq_len=seq_len, max_position=seq_len, hidden_size=hidden_size, num_layers=num_layers,
      num_heads=num_heads, mlp_features=4 * hidden_size, dropout_rate=0.0)
  return Task("text", f"GPT-2-style transformer ({num_layers} layers, width {hidden_size}) on "
              "Python's documentation, next character", build, data,
              sample_windows(data.train["input_ids"], seq_len), _next_token, batch_size, steps,
              learning_rate, "next-character accuracy")


def graph_task(steps: int = 200, size: graphs.GraphSize = graphs.GraphSize(4000, 16000, 32, 8),
               hidden_features: int = 64, num_layers: int = 3, learning_rate: float = 1e-2) -> Task:
  """A GCN classifying the nodes of a graph with planted communities (half the nodes labelled).

  Args:
    steps, learning_rate: full-batch training.
    size: the graph (`graphs.random_graph`).
    hidden_features, num_layers: the GCN (BatchNorm, ReLU, dropout 0.5 between layers).
  """
  data = datasets.planted_graph(size)
  build = lambda wrap_block: get_model(
      "gcn", "tiny", wrap_block=wrap_block, num_classes=size.num_classes,
      hidden_features=hidden_features, num_layers=num_layers)
  return Task("graph", f"GCN ({num_layers} layers, hidden {hidden_features}) on a planted-community "
              f"graph ({size.num_nodes} nodes, {size.num_edges} edges)", build, data,
              whole(data.train), _labels, size.num_nodes, steps, learning_rate,
              "test accuracy")
