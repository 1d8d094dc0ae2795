"""Equinox and Haiku models, unchanged, with the one line that adds compression: compiled memory.

  python benchmarks/frameworks.py                  # H100 target (compile-only, no GPU needed)
  python benchmarks/frameworks.py --target cpu     # XLA:CPU
  python benchmarks/frameworks.py --small          # small sizes, a quick check

Models (abstract shapes: nothing runs, only XLA compiles):
- Equinox: a ViT-S/16-sized encoder (12 pre-LayerNorm blocks of `eqx.nn.MultiheadAttention` and a
  GELU MLP, width 384, 6 heads, 197 tokens), batch 64. Per block, the way a user writes it:
  `call = eqx.filter_checkpoint(lambda b, x: b(x))` against
  `call = jact.remat_compress(lambda b, x: b(x), bits=2, keep_argnums=(0,))` (and with
  `recompute=True`: checkpoint's trade, the stored inputs and the recomputed residuals
  compressed); jact's repeated calls are numbered per block, so a calibrated policy could
  address each.
- Haiku: `hk.nets.ResNet50` with `hk.transform_with_state` (BatchNorm state), batch 32 at
  224x224. The whole loss is wrapped once -- `jax.checkpoint(loss)` against
  `jact.remat_compress(loss, bits=2, keep_argnums=(0, 1))` -- since Haiku modules cannot be
  wrapped inside `hk.transform` by a JAX transform (Haiku's own `hk.remat` is lifted for that, and
  needs the model's code changed).

For each: compiled temp and temp + output of one `jax.grad` step (`jact.memory.compiled`), and
the ratio to the uncompressed step. Writes a markdown table and JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

import jact
from jact.info import format_bytes


class Block(eqx.Module):
  norm1: eqx.nn.LayerNorm
  attention: eqx.nn.MultiheadAttention
  norm2: eqx.nn.LayerNorm
  mlp1: eqx.nn.Linear
  mlp2: eqx.nn.Linear

  def __init__(self, width: int, heads: int, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.norm1, self.norm2 = eqx.nn.LayerNorm(width), eqx.nn.LayerNorm(width)
    self.attention = eqx.nn.MultiheadAttention(heads, width, key=k1)
    self.mlp1, self.mlp2 = eqx.nn.Linear(width, 4 * width, key=k2), eqx.nn.Linear(4 * width, width, key=k3)

  def __call__(self, x):  # one sequence: (tokens, width)
    h = jax.vmap(self.norm1)(x)
    x = x + self.attention(h, h, h, inference=True)  # no dropout
    h = jax.vmap(self.norm2)(x)
    return x + jax.vmap(self.mlp2)(jax.nn.gelu(jax.vmap(self.mlp1)(h)))


class Encoder(eqx.Module):
  blocks: list
  head: eqx.nn.Linear

  def __init__(self, depth: int, width: int, heads: int, classes: int, key):
    keys = jax.random.split(key, depth + 1)
    self.blocks = [Block(width, heads, k) for k in keys[:-1]]
    self.head = eqx.nn.Linear(width, classes, key=keys[-1])


def equinox_loss(call_block):
  def loss(model, x, labels):
    def one(x):
      for block in model.blocks:
        x = call_block(block, x)
      return model.head(jnp.mean(x, 0))
    logits = jax.vmap(one)(x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
  return loss


def equinox_case(small: bool):
  depth, width, heads, tokens, batch = (2, 64, 2, 17, 4) if small else (12, 384, 6, 197, 64)
  model = eqx.filter_eval_shape(Encoder, depth, width, heads, 1000, jax.random.key(0))
  x = jax.ShapeDtypeStruct((batch, tokens, width), jnp.float32)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  plain = lambda b, x: b(x)
  variants = {"baseline": equinox_loss(plain),
              "eqx.filter_checkpoint per block": equinox_loss(eqx.filter_checkpoint(plain)),
              "jact 2 bits per block": equinox_loss(jact.remat_compress(plain, bits=2, keep_argnums=(0,))),
              "jact 2 bits + recompute per block": equinox_loss(
                  jact.remat_compress(plain, bits=2, keep_argnums=(0,), recompute=True))}
  step = lambda loss: lambda model, x, labels: eqx.filter_grad(loss)(model, x, labels)
  name = f"Equinox ViT ({depth}x{width}, {tokens} tokens)"
  return name, batch, {k: (step(v), (model, x, labels)) for k, v in variants.items()}


def haiku_case(small: bool):
  batch, size = (4, 32) if small else (32, 224)

  def forward(x, is_training):
    return hk.nets.ResNet50(1000)(x, is_training)

  model = hk.transform_with_state(forward)
  x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  params, state = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, True), x)

  def loss(params, state, x, labels):
    logits, new_state = model.apply(params, state, None, x, True)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)), new_state

  variants = {"baseline": loss, "jax.checkpoint (whole loss)": jax.checkpoint(loss),
              "jact 2 bits (whole loss)": jact.remat_compress(loss, bits=2, keep_argnums=(0, 1))}
  step = lambda loss: lambda params, state, x, labels: jax.grad(loss, has_aux=True)(params, state, x, labels)
  return f"Haiku ResNet-50 ({size}x{size})", batch, {k: (step(v), (params, state, x, labels))
                                                     for k, v in variants.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--target", default="h100", help="cpu, h100 or h200 (default h100)")
  parser.add_argument("--small", action="store_true", help="small sizes, a quick check")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/frameworks"))
  args = parser.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  rows = []
  cases = [equinox_case(args.small), haiku_case(args.small)]
  jobs = [(model, batch, variant, step, inputs) for model, batch, variants in cases
          for variant, (step, inputs) in variants.items()]
  for model, batch, variant, step, inputs in tqdm(jobs, desc=f"compiling ({args.target})"):
    start = time.perf_counter()
    memory = jact.memory.compiled(step, *inputs, target=args.target)
    rows.append({"model": model, "batch": batch, "variant": variant, "temp_bytes": memory.temp,
                 "output_bytes": memory.output, "compile_seconds": time.perf_counter() - start})
  lines = [f"Compiled memory of one gradient step, {args.target} compiler (python benchmarks/frameworks.py "
           f"--target {args.target}{' --small' if args.small else ''})", "",
           "| model | batch | variant | compiled temp | vs baseline | temp + output | vs baseline | compile s |",
           "|---|---|---|---|---|---|---|---|"]
  base = {r["model"]: r for r in rows if r["variant"] == "baseline"}
  for r in rows:
    b = base[r["model"]]
    total, base_total = r["temp_bytes"] + r["output_bytes"], b["temp_bytes"] + b["output_bytes"]
    lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {format_bytes(r['temp_bytes'])} | "
                 f"{r['temp_bytes'] / b['temp_bytes']:.3f}x | {format_bytes(total)} | {total / base_total:.3f}x | "
                 f"{r['compile_seconds']:.0f} |")
  text = "\n".join(lines)
  print(text)
  suffix = f"{args.target}{'-small' if args.small else ''}"
  (args.out / f"frameworks-{suffix}.md").write_text(text + "\n")
  (args.out / f"frameworks-{suffix}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
  main()
