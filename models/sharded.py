"""A small transformer trained under SPMD sharding on 8 devices, compressed or not.

A pre-LayerNorm transformer (self-attention and MLP blocks, each wrapped with `jact.compressed`)
with its training step jitted on one device, with data parallelism (batch over mesh axis "data")
or with Megatron-style tensor parallelism (attention heads and MLP hidden units over mesh axis
"model"). Shared by tests/sharding_checks.py and benchmarks/investigations/sharding_memory.py, as
`from jact.models import sharded`.

The meshes need 8 devices. On a CPU, the caller sets
`XLA_FLAGS=--xla_force_host_platform_device_count=8` before jax is first imported (so before
`jact` is): this module imports jax, and only `meshes()` (called by `partitioned`, `shardings`
and `jitted_train_step` when sharding) asks for the devices.
"""

from __future__ import annotations

import contextlib
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jact

WIDTH, HEADS, HIDDEN, LAYERS = 512, 8, 2048, 2
HEAD_DIM = WIDTH // HEADS
BATCH, LENGTH = 64, 32  # gradients are computed at this size
MEMORY_LENGTH = 256  # compiled memory is measured at this sequence length, where activations dominate
OPTIMIZER = optax.adam(1e-3)
# Logical axis names of the activations (flax.linen.with_logical_constraint) and their mesh axes.
AXIS_RULES = (("batch", "data"),)


def residual_stream(x: jax.Array) -> jax.Array:
  """Keeps the (batch, length, width) stream batch-sharded and replicated over "model", as in
  Megatron; without a constraint the partitioner may shard it along width. A no-op on one device."""
  return nn.with_logical_constraint(x, ("batch", None, None))


class Attention(nn.Module):
  """Pre-LayerNorm multi-head self-attention with a residual connection."""

  @nn.compact
  def __call__(self, x):
    return residual_stream(x + nn.SelfAttention(num_heads=HEADS, deterministic=True)(nn.LayerNorm()(x)))


class Mlp(nn.Module):
  """Pre-LayerNorm GELU MLP with a residual connection."""

  @nn.compact
  def __call__(self, x):
    hidden = nn.gelu(nn.Dense(HIDDEN)(nn.LayerNorm()(x)))
    return residual_stream(x + nn.Dense(WIDTH)(hidden))


class Transformer(nn.Module):
  """LAYERS pairs of attention and MLP blocks; the block classes are compressed or not."""
  attention: type = Attention
  mlp: type = Mlp

  @nn.compact
  def __call__(self, x):
    for _ in range(LAYERS):
      x = self.mlp()(self.attention()(x))
    return x


# With the heads sharded over "model", a device holds HEADS / 4 heads of HEAD_DIM values each. A
# quantisation group of the default 256 values would span 4 heads, so its min/max would need the
# neighbouring device: groups of HEAD_DIM stay within one head (see the README, "Many devices").
COMPRESSED = Transformer(jact.compressed(Attention, bits=2, group_size=HEAD_DIM), jact.compressed(Mlp, bits=2))
BASELINE = Transformer()


def tensor_parallel_spec(path) -> P:
  """Megatron sharding of a parameter: column-parallel query/key/value and first MLP layer
  (output features over "model"), row-parallel attention output and second MLP layer (input
  features over "model"); LayerNorm and the row-parallel biases replicated."""
  name = "/".join(str(getattr(key, "key", key)) for key in path)
  rules = [(r"(query|key|value)/kernel$", P(None, "model", None)), (r"(query|key|value)/bias$", P("model", None)),
           (r"out/kernel$", P("model", None, None)), (r"Dense_0/kernel$", P(None, "model")),
           (r"Dense_0/bias$", P("model")), (r"Dense_1/kernel$", P("model", None))]
  return next((spec for pattern, spec in rules if re.search(pattern, name)), P())


@functools.cache
def meshes() -> dict:
  """Data-parallel and tensor-parallel meshes over the 8 devices (Auto axes: the partitioner
  propagates the shardings of the inputs, as with jit's in_shardings in Flax training loops)."""
  auto = lambda n: (AxisType.Auto,) * n
  return {"data": jax.make_mesh((8,), ("data",), axis_types=auto(1)),
          "tensor": jax.make_mesh((2, 4), ("data", "model"), axis_types=auto(2))}


@contextlib.contextmanager
def partitioned(parallelism: str | None):
  """Tracing context of a sharded step: its mesh and the activation axis rules (none on one device)."""
  if parallelism is None:
    yield
    return
  with jax.set_mesh(meshes()[parallelism]), nn.logical_axis_rules(AXIS_RULES):
    yield


def shardings(parallelism: str, params, opt_state=None) -> dict:
  """Shardings for "data" or "tensor" parallelism: of the parameters (and of the optimizer
  state, whose moments follow the parameters), of a batch and of a replicated value."""
  mesh = meshes()[parallelism]
  replicated = NamedSharding(mesh, P())
  if parallelism == "data":
    param_sharding = jax.tree.map(lambda _: replicated, params)
  else:
    param_sharding = jax.tree_util.tree_map_with_path(
        lambda path, _: NamedSharding(mesh, tensor_parallel_spec(path)), params)
  out = {"params": param_sharding, "batch": NamedSharding(mesh, P("data")), "replicated": replicated}
  if opt_state is not None:
    out["opt_state"] = optax.tree_map_params(OPTIMIZER, lambda _, sharding: sharding, opt_state, param_sharding,
                                             transform_non_params=lambda _: replicated)
  return out


def loss_fn(model: nn.Module):
  def loss(params, x, y):
    return jnp.mean((model.apply(params, x) - y) ** 2)
  return loss


def train_step(model: nn.Module):
  """One Adam step; its compiled temp bytes are what compression reduces."""
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn(model))(params, x, y)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def jitted_train_step(model: nn.Module, parallelism: str | None, params, opt_state):
  """The training step jitted on one device (parallelism None) or sharded, params and state donated."""
  if parallelism is None:
    return jax.jit(train_step(model), donate_argnums=(0, 1))
  s = shardings(parallelism, params, opt_state)
  return jax.jit(train_step(model), in_shardings=(s["params"], s["opt_state"], s["batch"], s["batch"]),
                 out_shardings=(s["params"], s["opt_state"], s["replicated"]), donate_argnums=(0, 1))
