"""The 16-layer MLP on which compiled memory and compile time are measured.

`DEPTH` GELU layers `x @ w`, `WIDTH` wide, on a batch of `BATCH` rows: the step that
tests/test_memory.py checks (compiled temp bytes, shared code, no folded constants) and whose
compile seconds benchmarks/compile_time.py and benchmarks/investigations/compile_floor.py measure.
Imported as `from jact.models import mlp`; all shapes are abstract, so nothing is allocated.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

import jact

WIDTH = BATCH = 1024
DEPTH = 16


def layer(x: jax.Array, w: jax.Array) -> jax.Array:
  return jax.nn.gelu(x @ w)


def mlp_loss(f: Callable) -> Callable:
  """`loss(ws, x)`: the mean square of `x` after one `f(x, w)` per weight."""
  def loss(ws, x):
    for w in ws:
      x = f(x, w)
    return jnp.mean(x**2)
  return loss


def abstract_inputs(depth: int = DEPTH) -> tuple[list[jax.ShapeDtypeStruct], jax.ShapeDtypeStruct]:
  """`(ws, x)` of `depth` layers as ShapeDtypeStructs."""
  return [jax.ShapeDtypeStruct((WIDTH, WIDTH), jnp.float32)] * depth, jax.ShapeDtypeStruct((BATCH, WIDTH), jnp.float32)


def wrapped(bits: int | None) -> Callable:
  """The layer, uncompressed (`bits` None) or storing its activations at `bits` (weights kept)."""
  return layer if bits is None else jact.remat_compress(layer, bits=bits, keep_argnums=(1,))


def lowered(bits: int | None, depth: int = DEPTH):
  """The gradient step (`jax.grad` of the loss) of `depth` layers at `bits` (None: uncompressed),
  lowered for XLA: nothing is compiled yet."""
  return jax.jit(jax.grad(mlp_loss(wrapped(bits)))).lower(*abstract_inputs(depth))
