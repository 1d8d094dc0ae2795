"""XLA compile seconds of a compressed gradient step against the uncompressed one.

  python benchmarks/compile_time.py                     # the MLP of tests/test_memory.py, depths 1-32
  python benchmarks/compile_time.py --depths 16 --repeats 5
  python benchmarks/compile_time.py --models resnet50 bert_large --target h100   # the zoo, paper sizes

With `--models`: the zoo's gradient step (`jact.models.variants`, paper sizes, abstract shapes)
for each model, uncompressed and jact at `--bits`, lowered once each and compiled `--repeats`
times for `--target` ("cpu", or "h100"/"h200": XLA:GPU without a GPU), variants interleaved, the
best time kept. Tracing and lowering are not counted: the figure is XLA's compile time.

The step is `jax.grad` of the MLP of `jact.models.mlp` (1024 wide, batch 1024, GELU, every layer
wrapped by `jact.remat_compress`), lowered and compiled `--repeats` times, variants interleaved,
the best compile time kept (the machine is shared; compile times wander). A straight line through
the seconds by depth separates what each layer costs from what the step costs once: XLA compiles
each distinct kernel once however many identical layers use it, so the codec's own kernels are a
fixed cost. Writes a markdown table and JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import numpy as np

from jact.models.mlp import lowered  # the MLP of tests/test_memory.py, by depth


def best_compile_seconds(variants: dict[str, int | None], depth: int, repeats: int) -> dict[str, float]:
  best = {name: float("inf") for name in variants}
  for _ in range(repeats):
    for name, bits in variants.items():
      jax.clear_caches()  # lowered afresh: a lowered step caches its executable
      step = lowered(bits, depth)
      start = time.perf_counter()
      step.compile()
      best[name] = min(best[name], time.perf_counter() - start)
  return best


def zoo_compile_seconds(models: list[str], bits: list[int], target: str, repeats: int) -> list[dict]:
  from jact import targets
  from jact.models import variants as V

  keys = ["baseline"] + [str(b) for b in bits]
  rows = []
  for model in models:
    best = {key: float("inf") for key in keys}
    for _ in range(repeats):
      for key in keys:
        spec = V.spec_for(model, V.VARIANTS_BY_KEY[key])
        batch = V.PAPER_MODELS[model]
        params, state = spec.abstract_init(batch)
        inputs = (params, state, spec.input_shapes(batch), V.rng_key())
        jax.clear_caches()  # lowered afresh: a lowered step caches its executable
        lowered = targets.lower_for(jax.jit(V.gradient_step(spec)), target, *inputs)
        start = time.perf_counter()
        lowered.compile()
        best[key] = min(best[key], time.perf_counter() - start)
    rows.append({"model": model, "seconds": best})
    print(model, {k: round(v, 1) for k, v in best.items()}, flush=True)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--depths", nargs="+", type=int, default=[1, 4, 16, 32])
  parser.add_argument("--bits", nargs="+", type=int, default=[2, 8])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default="results/compile_time")
  parser.add_argument("--models", nargs="+", help="zoo models (paper sizes) instead of the MLP")
  parser.add_argument("--target", default="cpu", help="with --models: cpu, h100 or h200")
  args = parser.parse_args()
  if args.models:
    rows = zoo_compile_seconds(args.models, args.bits, args.target, args.repeats)
    lines = [f"Compile seconds, {args.target} compiler (python benchmarks/compile_time.py --models "
             f"{' '.join(args.models)} --target {args.target} --bits {' '.join(map(str, args.bits))})", "",
             "| model | baseline | " + " | ".join(f"jact {b} bits" for b in args.bits) + " |",
             "|---" * (len(args.bits) + 2) + "|"]
    for r in rows:
      base = r["seconds"]["baseline"]
      lines.append(f"| {r['model']} | {base:.1f} s | " + " | ".join(
          f"{r['seconds'][str(b)]:.1f} s ({r['seconds'][str(b)] / base:.1f}x)" for b in args.bits) + " |")
    table = "\n".join(lines)
    print(table)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"compile_time_zoo_{args.target}.md").write_text(table + "\n")
    (out / f"compile_time_zoo_{args.target}.json").write_text(json.dumps(rows, indent=1))
    return
  variants = {"baseline": None, **{f"jact {b} bits": b for b in args.bits}}
  rows = []
  for depth in args.depths:
    seconds = best_compile_seconds(variants, depth, args.repeats)
    rows.append({"depth": depth, "seconds": seconds})
    print(depth, {k: round(v, 3) for k, v in seconds.items()}, flush=True)
  lines = ["| layers | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
  for r in rows:
    base = r["seconds"]["baseline"]
    lines.append(f"| {r['depth']} | " + " | ".join(
        f"{s:.3f} s" + ("" if name == "baseline" else f" ({s / base:.1f}x)") for name, s in r["seconds"].items()) + " |")
  fits = {}
  if len(rows) >= 2:
    depths = np.array([r["depth"] for r in rows], float)
    for name in variants:
      per_layer, fixed = np.polyfit(depths, [r["seconds"][name] for r in rows], 1)
      fits[name] = {"fixed_seconds": fixed, "seconds_per_layer": per_layer}
      lines.append(f"\n{name}: {fixed:.3f} s + {1000 * per_layer:.1f} ms per layer")
  table = "\n".join(lines)
  print(table)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "compile_time.md").write_text(table + "\n")
  (out / "compile_time.json").write_text(json.dumps(
      {"backend": jax.default_backend(), "jax": jax.__version__, "rows": rows, "fits": fits}, indent=1))
  print(f"written: {out / 'compile_time.md'}, {out / 'compile_time.json'}")


if __name__ == "__main__":
  main()
