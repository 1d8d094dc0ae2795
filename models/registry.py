"""The model registry: each zoo model with its synthetic data and objective, at tiny or paper size."""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from . import bert, gnn, graphs, resnet, swin, vit
from .common import BlockWrapper

Batch = dict[str, jax.Array]
"""Model inputs by argument name, plus "labels" where the objective needs them."""
Params = Any
State = dict[str, Any]
"""Non-parameter variable collections ("batch_stats"); empty for models without BatchNorm."""
BatchFn = Callable[[jax.Array, int], Batch]
Objective = Callable[[jax.Array, Batch], jax.Array]
TrainStep = Callable[[Params, State, optax.OptState, Batch, jax.Array],
                     tuple[Params, State, optax.OptState, jax.Array]]


def _model_inputs(batch: Batch) -> Batch:
  return {name: value for name, value in batch.items() if name != "labels"}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A zoo model with what a benchmark needs to train it: data, objective, abstract shapes.

  Attributes:
    name: registry name, e.g. "resnet50".
    size: "tiny" or "paper".
    module: the Flax module in training mode (`module.clone(train=False)` evaluates).
    make_batch: `(key, batch_size) -> Batch` of synthetic data.
    objective: `(logits, batch) -> scalar loss`.
    batched: False for the GNNs, whose batch is the whole graph whatever `batch_size` says.
  """

  name: str
  size: str
  module: nn.Module
  make_batch: BatchFn
  objective: Objective
  batched: bool = True

  def input_shapes(self, batch_size: int) -> Batch:
    """The batch as `jax.ShapeDtypeStruct`s, for compiling a step without any data."""
    return jax.eval_shape(lambda key: self.make_batch(key, batch_size), jax.random.key(0))

  def init(self, key: jax.Array, batch: Batch) -> tuple[Params, State]:
    """Initialises the variables for `batch` (arrays or `ShapeDtypeStruct`s under eval_shape)."""
    params_key, dropout_key = jax.random.split(key)
    variables = self.module.init({"params": params_key, "dropout": dropout_key},
                                 **_model_inputs(batch))
    params = variables.pop("params")
    return params, variables

  def abstract_init(self, batch_size: int) -> tuple[Params, State]:
    """`init` under `jax.eval_shape`: shapes only, nothing allocated, fine at paper size."""
    return jax.eval_shape(self.init, jax.random.key(0), self.input_shapes(batch_size))

  def num_params(self) -> int:
    """The number of parameters, counted on abstract shapes."""
    params, _ = self.abstract_init(1)
    return sum(leaf.size for leaf in jax.tree.leaves(params))

  def loss(self, params: Params, state: State, batch: Batch,
           rng: jax.Array) -> tuple[jax.Array, State]:
    """The training loss and the updated state; differentiate with `has_aux=True`.

    Args:
      params: the "params" collection.
      state: the other collections, updated in training mode (BatchNorm statistics).
      batch: as made by `make_batch`.
      rng: key for dropout and drop-path.
    """
    logits, new_state = self.module.apply({"params": params, **state}, **_model_inputs(batch),
                                          rngs={"dropout": rng}, mutable=list(state))
    return self.objective(logits, batch), new_state

  def logits(self, params: Params, state: State, batch: Batch) -> jax.Array:
    """The model's output in evaluation mode (running statistics, no dropout)."""
    return self.module.clone(train=False).apply({"params": params, **state},
                                                **_model_inputs(batch))

  def train_step(self, optimizer: optax.GradientTransformation) -> TrainStep:
    """A pure step `(params, state, opt_state, batch, rng) -> (params, state, opt_state, loss)`."""
    def step(params, state, opt_state, batch, rng):
      (loss, state), grads = jax.value_and_grad(self.loss, has_aux=True)(params, state, batch, rng)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), state, opt_state, loss
    return step


def classification_loss(logits: jax.Array, batch: Batch) -> jax.Array:
  """Mean cross-entropy of logits [..., classes] against integer `batch["labels"]`."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         batch["labels"]).mean()


def next_token_loss(logits: jax.Array, batch: Batch) -> jax.Array:
  """Mean cross-entropy of each position's logits against the following token."""
  tokens = batch["input_ids"]
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32),
                                                         tokens[:, 1:]).mean()


def _images(module: nn.Module, image_size: int) -> BatchFn:
  def make_batch(key: jax.Array, batch_size: int) -> Batch:
    image_key, label_key = jax.random.split(key)
    return {"images": jax.random.normal(image_key, (batch_size, image_size, image_size, 3)),
            "labels": jax.random.randint(label_key, (batch_size,), 0, module.num_classes)}
  return make_batch


def _tokens(key: jax.Array, batch_size: int, seq_len: int, vocab_size: int) -> jax.Array:
  return jax.random.randint(key, (batch_size, seq_len), 0, vocab_size)


def _labelled_sequences(module: nn.Module, seq_len: int) -> BatchFn:
  def make_batch(key: jax.Array, batch_size: int) -> Batch:
    token_key, length_key, label_key = jax.random.split(key, 3)
    lengths = jax.random.randint(length_key, (batch_size, 1), seq_len // 2, seq_len + 1)
    return {"input_ids": _tokens(token_key, batch_size, seq_len, module.vocab_size),
            "attention_mask": (jnp.arange(seq_len) < lengths).astype(jnp.int32),
            "labels": jax.random.randint(label_key, (batch_size,), 0, module.num_labels)}
  return make_batch


def _sequences(module: nn.Module, seq_len: int) -> BatchFn:
  def make_batch(key: jax.Array, batch_size: int) -> Batch:
    return {"input_ids": _tokens(key, batch_size, seq_len, module.vocab_size)}
  return make_batch


def _graph(module: nn.Module, num_nodes: int, num_edges: int, num_features: int) -> BatchFn:
  size = graphs.GraphSize(num_nodes, num_edges, num_features, module.num_classes)
  def make_batch(key: jax.Array, batch_size: int) -> Batch:
    del batch_size  # The batch is the whole graph.
    return graphs.random_graph(key, size)._asdict()
  return make_batch


@dataclasses.dataclass(frozen=True)
class _Task:
  """How a family's data is made: `data(module, **{field: value for field in data_fields})`."""

  data: Callable[..., BatchFn]
  data_fields: tuple[str, ...]
  objective: Objective
  batched: bool = True


_IMAGES = _Task(_images, ("image_size",), classification_loss)
_LABELLED_SEQUENCES = _Task(_labelled_sequences, ("seq_len",), classification_loss)
_SEQUENCES = _Task(_sequences, ("seq_len",), next_token_loss)
_NODES = _Task(_graph, ("num_nodes", "num_edges", "num_features"), classification_loss,
               batched=False)


@dataclasses.dataclass(frozen=True)
class _Entry:
  model: Callable[..., nn.Module]
  task: _Task
  paper: dict[str, Any]
  tiny: dict[str, Any]


_PAPER_IMAGES = {"image_size": 224}
_TINY_RESNET = {"image_size": 32, "stage_sizes": (1, 1, 1, 1), "num_filters": 8,
                "num_classes": 10}
_TINY_TEXT = {"seq_len": 16, "vocab_size": 128, "hidden_size": 32, "num_layers": 2,
              "num_heads": 2, "mlp_features": 64, "max_position": 32}
_PAPER_GRAPH = graphs.OGBN_ARXIV._asdict()
_TINY_GRAPH = {**graphs.TINY_GRAPH._asdict(), "hidden_features": 32}

_REGISTRY: dict[str, _Entry] = {
    "resnet18": _Entry(resnet.ResNet18, _IMAGES, _PAPER_IMAGES, _TINY_RESNET),
    "resnet34": _Entry(resnet.ResNet34, _IMAGES, _PAPER_IMAGES, _TINY_RESNET),
    "resnet50": _Entry(resnet.ResNet50, _IMAGES, _PAPER_IMAGES, _TINY_RESNET),
    "resnet101": _Entry(resnet.ResNet101, _IMAGES, _PAPER_IMAGES, _TINY_RESNET),
    "resnet152": _Entry(resnet.ResNet152, _IMAGES, _PAPER_IMAGES, _TINY_RESNET),
    "wide_resnet50_2": _Entry(resnet.WideResNet50_2, _IMAGES, _PAPER_IMAGES, _TINY_RESNET),
    "vit_b16": _Entry(vit.ViT, _IMAGES, _PAPER_IMAGES, {
        "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
        "mlp_features": 64, "num_classes": 10}),
    "swin_t": _Entry(swin.Swin, _IMAGES, _PAPER_IMAGES, {
        "image_size": 32, "embed_dim": 16, "depths": (2, 2), "num_heads": (1, 2),
        "window_size": 4, "num_classes": 10}),
    "bert_base": _Entry(bert.Bert, _LABELLED_SEQUENCES, {"seq_len": 128}, _TINY_TEXT),
    "bert_large": _Entry(bert.BertLarge, _LABELLED_SEQUENCES, {"seq_len": 128}, _TINY_TEXT),
    "gpt2_small": _Entry(bert.GPT2, _SEQUENCES, {"seq_len": 1024}, _TINY_TEXT),
    "gcn": _Entry(gnn.GCN, _NODES, _PAPER_GRAPH, _TINY_GRAPH),
    "sage": _Entry(gnn.GraphSAGE, _NODES, _PAPER_GRAPH, _TINY_GRAPH),
    "gat": _Entry(gnn.GAT, _NODES, _PAPER_GRAPH, _TINY_GRAPH),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)
SIZES: tuple[str, ...] = ("tiny", "paper")


def get_model(name: str, size: str = "tiny", *, wrap_block: BlockWrapper | None = None,
              **overrides: Any) -> ModelSpec:
  """Builds a registered model with its synthetic data and objective.

  Args:
    name: one of `MODEL_NAMES`.
    size: "tiny" (seconds on a CPU, for tests) or "paper" (the GACT paper's configuration).
    wrap_block: class transform applied to each repeated block, e.g. `nn.remat` or
      `lambda cls: jact.compressed(cls, bits=policy)`.
    **overrides: module fields (`num_classes`, `dtype`, `num_layers`, ...) or data fields
      (`image_size`; `seq_len`; `num_nodes`, `num_edges`, `num_features`), replacing the
      size's defaults.

  Returns:
    A `ModelSpec` whose module is in training mode.
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
  entry = _REGISTRY[name]
  model_cls = getattr(entry.model, "func", entry.model)
  module_fields = {field.name for field in dataclasses.fields(model_cls)} - {
      "parent", "name", "train", "wrap_block"}
  config = {**getattr(entry, size), **overrides}
  unknown = set(config) - module_fields - set(entry.task.data_fields)
  if unknown:
    raise ValueError(f"{name} does not accept {sorted(unknown)}; accepted: "
                     f"{sorted(module_fields | set(entry.task.data_fields))}")
  data = {field: config.pop(field) for field in entry.task.data_fields}
  module = entry.model(**config, train=True, wrap_block=wrap_block)
  return ModelSpec(name, size, module, entry.task.data(module, **data), entry.task.objective,
                   entry.task.batched)
