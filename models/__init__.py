"""jact.models: the reference model zoo (Flax linen) for jact's tests, benchmarks and notebooks.

Every model takes `wrap_block`, a class transform applied to each repeated block (ResNet block,
Swin block, transformer layer, GNN layer) before it is instantiated, so the memory policy is the
caller's choice and model code never changes::

    spec = get_model("resnet50", "paper", wrap_block=nn.remat)
    spec = get_model("bert_large", "paper",
                     wrap_block=lambda cls: jact.compressed(cls, bits=policy))

Blocks take only arrays in `__call__` (flags such as `train` are module attributes) and are
named stably (`layer_{i}`, `stage{s}_block{b}`), so residual names carry their module paths.

Registry:
  get_model(name, size="tiny", *, wrap_block=None, **overrides) -> ModelSpec
    name: one of MODEL_NAMES; size: "tiny" or "paper"; overrides: module fields
    (num_classes, dtype, num_layers, ...) or data fields (image_size, seq_len, num_nodes,
    num_edges, num_features).

  ModelSpec fields: name, size, module (train mode), make_batch(key, batch_size) -> Batch,
  objective(logits, batch) -> loss, batched (False for GNNs: the batch is the whole graph).
  ModelSpec methods:
    input_shapes(batch_size) -> Batch of jax.ShapeDtypeStruct
    init(key, batch) -> (params, state)
    abstract_init(batch_size) -> (params, state) as ShapeDtypeStructs (jax.eval_shape)
    num_params() -> int
    loss(params, state, batch, rng) -> (loss, new_state)
    logits(params, state, batch) -> logits in evaluation mode
    train_step(optimizer) -> step(params, state, opt_state, batch, rng)
                             -> (params, state, opt_state, loss)

Real data and training (submodules, imported as `from jact.models import tasks, training`):
  datasets: scikit-learn's digits, Python's documentation as characters, a planted-community graph.
  tasks: digits_task, text_task, graph_task -> Task (a model builder, data, sampler, metric).
  training: compressed_blocks, Trainer, evaluator, calibrate, NoiseProbe, step_memory,
    residual_table, max_batch, time_interleaved.

A paper-size step compiles on CPU without data::

    spec = get_model("resnet50", "paper")
    params, state = spec.abstract_init(256)
    step = jax.jit(spec.train_step(optax.sgd(0.1)))
    compiled = step.lower(params, state, jax.eval_shape(optax.sgd(0.1).init, params),
                          spec.input_shapes(256), jax.eval_shape(jax.random.key, 0)).compile()
"""

from .bert import GPT2, Bert, BertLarge
from .common import BlockWrapper, wrap
from .gnn import GAT, GCN, GNN, GATLayer, GCNLayer, GraphLayer, GraphSAGE, SAGELayer
from .graphs import OGBN_ARXIV, TINY_GRAPH, Graph, GraphSize, random_graph
from .registry import (MODEL_NAMES, SIZES, Batch, ModelSpec, Params, State, classification_loss,
                       get_model, next_token_loss)
from .resnet import (BasicBlock, Bottleneck, ResNet, ResNet18, ResNet34, ResNet50, ResNet101,
                     ResNet152, WideResNet50_2)
from .swin import PatchMerging, Swin, SwinBlock
from .transformer import MultiHeadAttention, Mlp, TransformerLayer
from .vit import ViT
