"""Tests for the reference model zoo (jact.models): tiny sizes run, paper sizes are only traced."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jact import models
from jact.models import graphs, swin

BATCH = 2
# Compiling dominates the tiny models' run time on CPU; LLVM's optimisation does not pay here.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# The distinct tiny configurations and their logits' shapes: the deeper and wider ResNets and
# BERT-large share their tiny form with ResNet-50 and BERT-base, and their paper-size parameter
# counts check their structure. GPT-2 predicts a 128-token vocabulary at each of 16 positions;
# the GNNs classify the 64 nodes of the tiny graph into 4 classes.
TINY_LOGITS_SHAPES = {
    "resnet18": (BATCH, 10), "resnet50": (BATCH, 10), "vit_b16": (BATCH, 10),
    "swin_t": (BATCH, 10), "bert_base": (BATCH, 2), "gpt2_small": (BATCH, 16, 128),
    "gcn": (64, 4), "sage": (64, 4), "gat": (64, 4),
}

# Parameter counts of the reference implementations (torchvision, timm vit_base_patch16_224,
# official Swin-T, Hugging Face BertForSequenceClassification with 2 labels and GPT2LMHeadModel,
# the OGB ogbn-arxiv GCN and GraphSAGE baselines).
PAPER_PARAMS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
    "resnet101": 44_549_160, "resnet152": 60_192_808, "wide_resnet50_2": 68_883_240,
    "vit_b16": 86_567_656, "swin_t": 28_288_354, "bert_base": 109_483_778,
    "bert_large": 335_143_938, "gpt2_small": 124_439_808, "gcn": 110_120, "sage": 218_664,
    # 4 heads, by hand: 128*256 + 2*256 + 256 + 512, 256*256 + 2*256 + 256 + 512,
    # 256*160 + 2*160 + 40 (kernels, attention vectors, biases, BatchNorm).
    "gat": 142_184,
}


@functools.cache
def _tiny(name: str) -> tuple[models.ModelSpec, models.Batch, models.Params, models.State]:
  """A tiny model with a batch and initial variables, built once per test session."""
  spec = models.get_model(name)
  batch = spec.make_batch(jax.random.key(1), BATCH)
  params, state = jax.jit(spec.init, compiler_options=FAST_COMPILE)(jax.random.key(0), batch)
  return spec, batch, params, state


# Per-leaf checks run in NumPy: eager JAX would compile a kernel for every distinct leaf shape.
def _norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(leaf))) for leaf in jax.tree.leaves(tree))))


def _assert_trees_close(actual, expected, rtol: float) -> None:
  """Leafwise closeness with an absolute tolerance scaled to the whole tree's norm."""
  scale = _norm(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, e, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_paper_parameter_counts_match_reference(name):
  spec = models.get_model(name, "paper")
  assert spec.num_params() == PAPER_PARAMS[name]


def _recording_sgd(learning_rate: float) -> optax.GradientTransformation:
  """Plain SGD whose optimiser state is the last gradient, so a train step also returns it."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(np.zeros_like, params),
      update=lambda grads, state, params=None: (
          jax.tree.map(lambda g: -learning_rate * g, grads), grads))


@pytest.mark.parametrize("name", TINY_LOGITS_SHAPES)
def test_tiny_model_trains_and_remat_matches(name):
  spec, batch, params, state = _tiny(name)
  logits = jax.eval_shape(spec.logits, params, state, batch)
  assert logits.shape == TINY_LOGITS_SHAPES[name]

  optimizer = _recording_sgd(0.1)
  opt_state = optimizer.init(params)
  rng = jax.random.key(2)
  results = {}
  for wrap_block in (None, nn.remat):
    step = models.get_model(name, wrap_block=wrap_block).train_step(optimizer)
    results[wrap_block] = jax.jit(step, compiler_options=FAST_COMPILE)(params, state, opt_state,
                                                                       batch, rng)
  new_params, new_state, grads, loss = results[None]
  assert np.isfinite(loss) and np.isfinite(_norm(grads)) and _norm(grads) > 0
  assert _norm(jax.tree.map(np.subtract, new_params, params)) > 0
  # BatchNorm statistics (the only state) move in training mode.
  assert all(not np.array_equal(a, b)
             for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new_state), strict=True))
  _, remat_state, remat_grads, remat_loss = results[nn.remat]
  # Recomputation repeats the same float32 ops; at most their fusion and order may differ.
  tolerance = 1e-5
  np.testing.assert_allclose(remat_loss, loss, rtol=tolerance)
  _assert_trees_close(remat_grads, grads, tolerance)
  _assert_trees_close(remat_state, new_state, tolerance)


def test_batch_norm_statistics_are_read_not_updated_in_evaluation():
  spec, batch, params, state = _tiny("gcn")
  assert set(state) == {"batch_stats"}
  inputs = {name: value for name, value in batch.items() if name != "labels"}
  logits, new_state = spec.module.clone(train=False).apply(
      {"params": params, **state}, **inputs, mutable=["batch_stats"])
  _assert_trees_close(new_state, state, 0.0)
  np.testing.assert_array_equal(logits, spec.logits(params, state, batch))


def test_gpt2_is_causal():
  spec, batch, params, state = _tiny("gpt2_small")
  changed = {"input_ids": batch["input_ids"].at[:, -1].set(0)}
  logits = jax.jit(spec.logits, compiler_options=FAST_COMPILE)
  before, after = (logits(params, state, b) for b in (batch, changed))
  np.testing.assert_allclose(after[:, :-1], before[:, :-1], atol=1e-6)


def test_bert_ignores_padding():
  spec, batch, params, state = _tiny("bert_base")
  batch = {**batch, "attention_mask": batch["attention_mask"].at[:, -4:].set(0)}
  changed = {**batch, "input_ids": batch["input_ids"].at[:, -4:].set(0)}
  logits = jax.jit(spec.logits, compiler_options=FAST_COMPILE)
  before, after = (logits(params, state, b) for b in (batch, changed))
  np.testing.assert_allclose(after, before, atol=1e-6)


def test_swin_windows_round_trip_and_relative_positions():
  x = jnp.arange(2 * 8 * 8 * 3.0).reshape(2, 8, 8, 3)
  windows = swin.window_partition(x, 4)
  assert windows.shape == (2, 4, 16, 3)
  np.testing.assert_array_equal(windows[0, 1, 0], x[0, 0, 4])  # second window starts at column 4
  np.testing.assert_array_equal(swin.window_merge(windows, 4, 8, 8), x)
  # Window side 2: (row, column) offsets (dr, dc) map to (dr + 1) * 3 + (dc + 1).
  np.testing.assert_array_equal(swin.relative_position_index(2),
                                [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])


def test_shifted_window_mask_separates_regions():
  mask = swin.shifted_window_mask(8, 8, window_size=4, shift_size=2)
  assert mask.shape == (4, 1, 16, 16)
  assert not mask[0].any()  # the top-left window holds one region only
  # In the last window every 2x2 quadrant is its own region: a token sees its 4 neighbours.
  np.testing.assert_array_equal((mask[3, 0] == 0).sum(axis=-1), 4)


def test_random_graph_has_requested_size_and_homophily():
  size = graphs.TINY_GRAPH._replace(num_nodes=500, num_edges=4000)
  graph = graphs.random_graph(jax.random.key(0), size, homophily=0.5)
  assert graph.node_features.shape == (size.num_nodes, size.num_features)
  assert graph.senders.shape == graph.receivers.shape == (size.num_edges,)
  assert graph.labels.shape == (size.num_nodes,)
  for index in (graph.senders, graph.receivers):
    assert index.dtype == jnp.int32 and 0 <= index.min() and index.max() < size.num_nodes
  same = np.mean(graph.labels[graph.senders] == graph.labels[graph.receivers])
  expected = 0.5 + 0.5 / size.num_classes
  assert abs(same - expected) < 4 * np.sqrt(expected * (1 - expected) / size.num_edges)


def test_arxiv_sized_graph_shapes_without_allocating():
  spec = models.get_model("gcn", "paper")
  shapes = spec.input_shapes(batch_size=1)
  arxiv = graphs.OGBN_ARXIV
  assert shapes["node_features"].shape == (arxiv.num_nodes, arxiv.num_features)
  assert shapes["senders"].shape == shapes["receivers"].shape == (arxiv.num_edges,)
  assert shapes["labels"].shape == (arxiv.num_nodes,)
  assert spec.module.num_classes == arxiv.num_classes


@pytest.mark.parametrize("name", ["resnet18", "gat"])
def test_paper_train_step_lowers_on_abstract_inputs(name):
  spec = models.get_model(name, "paper", wrap_block=nn.remat)
  optimizer = optax.adam(1e-3)
  params, state = spec.abstract_init(batch_size=8)
  opt_state = jax.eval_shape(optimizer.init, params)
  rng = jax.eval_shape(jax.random.key, 0)
  lowered = jax.jit(spec.train_step(optimizer)).lower(params, state, opt_state,
                                                      spec.input_shapes(8), rng)
  assert "dot_general" in lowered.as_text()


def test_get_model_rejects_unknown_names():
  with pytest.raises(ValueError, match="unknown model"):
    models.get_model("resnet19")
  with pytest.raises(ValueError, match="unknown size"):
    models.get_model("resnet18", "huge")
  with pytest.raises(ValueError, match="does not accept"):
    models.get_model("resnet18", seq_len=3)


def test_overrides_reach_module_and_data():
  spec = models.get_model("gpt2_small", "paper", seq_len=128, num_layers=1)
  assert spec.input_shapes(4)["input_ids"].shape == (4, 128)
  assert spec.module.num_layers == 1
