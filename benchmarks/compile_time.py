"""XLA compile seconds of a compressed gradient step against the uncompressed one, by depth.

  python benchmarks/compile_time.py                     # the MLP of tests/test_memory.py, depths 1-32
  python benchmarks/compile_time.py --depths 16 --repeats 5

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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--depths", nargs="+", type=int, default=[1, 4, 16, 32])
  parser.add_argument("--bits", nargs="+", type=int, default=[2, 8])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default="results/compile_time")
  args = parser.parse_args()
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
