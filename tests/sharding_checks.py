"""jact under SPMD sharding, measured on 8 simulated CPU devices.

A pre-LayerNorm transformer (self-attention and MLP blocks, each wrapped with `jact.compressed`;
the model, meshes and steps of `jact.models.sharded`) is trained with data parallelism (batch over
mesh axis "data") and with Megatron-style tensor parallelism (attention heads and MLP hidden units
over mesh axis "model"), and compared with the same step on one device and with the uncompressed
model; a small MLP is compressed inside and around `jax.shard_map`. XLA_FLAGS must be set before
jax is imported, so this runs in its own process: `python tests/sharding_checks.py [compiled]
[gradients] [shard_map]` prints the measurements as JSON (all parts by default);
tests/test_sharding.py runs it and asserts on them.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import jact
from jact.models.sharded import (BASELINE, BATCH, COMPRESSED, LENGTH, MEMORY_LENGTH, OPTIMIZER, WIDTH,
                                 jitted_train_step, loss_fn, meshes, partitioned, shardings)
from tree_math import tree_norm

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def count_collectives(hlo: str) -> dict[str, int]:
  """Collective operations in compiled HLO text (an async pair counts once, by its -start)."""
  return {op: len(re.findall(rf"\s{op}(?:-start)?\(", hlo)) for op in COLLECTIVES}


def large_constants(hlo: str, min_elements: int = 2**20) -> int:
  """Fusions that broadcast a literal into an array of `min_elements` or more: XLA computes such a
  value at the start of the step and keeps it alive until its last use."""
  shapes = re.findall(r"= \w+\[([\d,]+)\]\S* fusion\(%constant[\w.]*\)", hlo)
  return sum(1 for dims in shapes if np.prod([int(d) for d in dims.split(",")]) >= min_elements)


def describe(compiled) -> dict:
  """Collective counts, full-size constants and per-device temp bytes of a compiled executable."""
  hlo = compiled.as_text()
  return {"collectives": count_collectives(hlo), "large_constants": large_constants(hlo),
          "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes)}


def compiled_steps() -> dict:
  """The training step at MEMORY_LENGTH on one device (at the global batch and at the batch
  share of one data-parallel device) and sharded, baseline and compressed (abstract shapes)."""
  batch = jax.ShapeDtypeStruct((BATCH, MEMORY_LENGTH, WIDTH), jnp.float32)
  share = jax.ShapeDtypeStruct((BATCH // 8, MEMORY_LENGTH, WIDTH), jnp.float32)
  params = jax.eval_shape(BASELINE.init, jax.random.key(0), batch)
  opt_state = jax.eval_shape(OPTIMIZER.init, params)
  out = {}
  for name, parallelism, x in (("one device", None, batch), ("one device, batch / 8", None, share),
                               ("data", "data", batch), ("tensor", "tensor", batch)):
    for variant, model in (("baseline", BASELINE), ("compressed", COMPRESSED)):
      with partitioned(parallelism):
        step = jitted_train_step(model, parallelism, params, opt_state)
        out[f"{name}/{variant}"] = describe(step.lower(params, opt_state, x, x).compile())
  out["gradient_bytes"] = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(params))
  return out


def distances(actual, expected) -> dict:
  """How far gradients `actual` are from `expected`, relative to the norm of `expected`: the
  largest elementwise difference, the norm of the difference, and the fraction of elements that
  are bitwise equal."""
  norm = tree_norm(expected)
  diffs = [np.abs(np.asarray(a, np.float64) - np.asarray(e, np.float64))
           for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)]
  return {"max_abs": max(float(d.max()) for d in diffs) / norm,
          "norm": float(np.sqrt(sum(np.sum(d**2) for d in diffs))) / norm,
          "bitwise_equal": sum(int(np.sum(d == 0)) for d in diffs) / sum(d.size for d in diffs)}


def gradients() -> dict:
  """Compressed gradients (same seed) sharded against one device, and all against exact ones."""
  x, y = (jax.random.normal(jax.random.key(i), (BATCH, LENGTH, WIDTH)) for i in (1, 2))
  params = BASELINE.init(jax.random.key(0), x)
  exact = jax.jit(jax.grad(loss_fn(BASELINE)))(params, x, y)
  one_device = jax.jit(jax.grad(loss_fn(COMPRESSED)))(params, x, y)
  out = {"one device vs exact": distances(one_device, exact)}
  for parallelism in ("data", "tensor"):
    with partitioned(parallelism):
      s = shardings(parallelism, params)
      grad = jax.jit(jax.grad(loss_fn(COMPRESSED)), in_shardings=(s["params"], s["batch"], s["batch"]),
                     out_shardings=s["params"])
      sharded = grad(params, x, y)
    out[f"{parallelism} vs one device"] = distances(sharded, one_device)
    out[f"{parallelism} vs exact"] = distances(sharded, exact)
  return out


# --- jax.shard_map -------------------------------------------------------------------------------

SHARD_MAP_DEPTH = 3


def dense_gelu(x, w):
  return jax.nn.gelu(x @ w)


def mlp(layer):
  def apply(ws, x):
    for w in ws:
      x = layer(x, w)
    return x
  return apply


def compressed_mlp(rounding: str):
  """An MLP whose layers store their residuals at 2 bits."""
  return mlp(jact.remat_compress(dense_gelu, bits=2, keep_argnums=(1,), rounding=rounding))


def shard_map_losses(rounding: str) -> dict:
  """Data-parallel MLP losses through `jax.shard_map`: plain, compressed inside (each shard's
  layers are compressed), compressed around (remat_compress of a function that calls shard_map)."""
  mesh = meshes()["data"]

  def inside(apply):
    def local_loss(ws, x):
      return jax.lax.psum(jnp.sum(apply(ws, x) ** 2), "data")
    sharded = jax.shard_map(local_loss, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
    return lambda ws, x: sharded(ws, x) / x.size

  sharded_mlp = jax.shard_map(mlp(dense_gelu), mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"))
  around = jact.remat_compress(sharded_mlp, bits=2, keep_argnums=(0,), rounding=rounding)
  return {"plain": inside(mlp(dense_gelu)), "inside": inside(compressed_mlp(rounding)),
          "around": lambda ws, x: jnp.mean(around(ws, x) ** 2)}


def shard_map_checks() -> dict:
  """Collectives, temp bytes and gradients of compression inside and around `jax.shard_map`,
  with nearest rounding, so that the one-device compressed run is the exact reference."""
  rows = BATCH * LENGTH
  ws = [jax.random.normal(jax.random.key(i), (WIDTH, WIDTH)) / WIDTH**0.5 for i in range(SHARD_MAP_DEPTH)]
  x = jax.random.normal(jax.random.key(SHARD_MAP_DEPTH), (rows, WIDTH))
  mean_square = lambda apply: lambda ws, x: jnp.mean(apply(ws, x) ** 2)
  exact = jax.jit(jax.grad(mean_square(mlp(dense_gelu))))(ws, x)
  one_device = {"inside": compressed_mlp("nearest"),
                "around": jact.remat_compress(mlp(dense_gelu), bits=2, keep_argnums=(0,), rounding="nearest")}
  mesh = meshes()["data"]
  replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  out = {}
  for name, loss in shard_map_losses("nearest").items():
    grad = jax.jit(jax.grad(loss), in_shardings=([replicated] * SHARD_MAP_DEPTH, batch),
                   out_shardings=[replicated] * SHARD_MAP_DEPTH)
    try:
      out[name] = describe(grad.lower(ws, x).compile())
      grads = grad(ws, x)
    except Exception as error:  # a failure is a finding to report, not the end of the run
      out[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
      continue
    out[name]["vs exact"] = distances(grads, exact)
    if name in one_device:
      reference = jax.jit(jax.grad(mean_square(one_device[name])))(ws, x)
      out[name]["vs one device"] = distances(grads, reference)
      out[name]["one device vs exact"] = distances(reference, exact)
  return out


PARTS = {"compiled": compiled_steps, "gradients": gradients, "shard_map": shard_map_checks}


def main(parts: list[str]) -> None:
  """Prints a JSON object with the measurements of `parts` (all when empty)."""
  unknown = set(parts) - set(PARTS)
  if unknown:
    raise SystemExit(f"unknown parts {sorted(unknown)}; choose from {sorted(PARTS)}")
  json.dump({part: PARTS[part]() for part in parts or PARTS}, sys.stdout, indent=1)


if __name__ == "__main__":
  main(sys.argv[1:])
