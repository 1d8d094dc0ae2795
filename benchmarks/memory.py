"""Compiled memory of a gradient step, by model and by way of keeping residuals, side by side.

  python benchmarks/memory.py                       # the GACT paper's sizes (abstract shapes), H100 target
  python benchmarks/memory.py --target cpu          # XLA:CPU instead
  python benchmarks/memory.py --models resnet50 --variants baseline checkpoint 2 2x
  python benchmarks/memory.py --small               # tiny models, a quick check

For each model at the paper's size and each variant (see jact.models.variants): the residual bytes that
the forward pass hands to the backward pass (parameters excluded), XLA's compiled temp bytes of
the gradient step (forward and backward; abstract shapes, so nothing runs), the ratio to the
baseline, temp + output bytes (XLA may place stored values in output buffers written late, so temp
alone can flatter a variant) and temp bytes per sample. `--target h100` (the default) or `h200`
compiles for that GPU without one (`jact.memory.compiled(target=...)`; needs the gpu-compile
extra); `cpu` uses XLA:CPU. Writes a markdown table, JSON and a plot to --out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
from tqdm.auto import tqdm

import jact
from jact.info import format_bytes
from jact.models import variants as V


def measure(model: str, variant: V.Variant, batch: int, size: str, target: str) -> dict:
  spec = V.spec_for(model, variant, size)
  params, state = spec.abstract_init(batch)
  inputs = (params, state, spec.input_shapes(batch), V.rng_key())
  start = time.perf_counter()
  memory = jact.memory.compiled(V.gradient_step(spec), *inputs, target=target)
  compile_seconds = time.perf_counter() - start
  loss = lambda p, s, b, r: spec.loss(p, s, b, r)[0]
  residuals = jact.residuals(loss, *inputs, keep_argnums=(0, 1))
  return {"model": model, "variant": variant.name, "batch": batch,
          "residual_bytes": residuals.activation_nbytes(stored=True), "temp_bytes": memory.temp,
          "output_bytes": memory.output, "compile_seconds": compile_seconds}


def table(rows: list[dict]) -> str:
  baseline = {r["model"]: r for r in rows if r["variant"] == V.BASELINE.name}
  header = ("| model | batch | variant | residual bytes | compiled temp | vs baseline | temp + output | vs baseline "
            "| temp per sample | compile s |")
  lines = [header, "|---" * (header.count("|") - 1) + "|"]
  for r in rows:
    base = baseline.get(r["model"])
    total = r["temp_bytes"] + r["output_bytes"]
    ratio = f"{r['temp_bytes'] / base['temp_bytes']:.3f}x" if base else "-"
    total_ratio = f"{total / (base['temp_bytes'] + base['output_bytes']):.3f}x" if base else "-"
    lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {format_bytes(r['residual_bytes'])} | "
                 f"{format_bytes(r['temp_bytes'])} | {ratio} | {format_bytes(total)} | {total_ratio} | "
                 f"{format_bytes(r['temp_bytes'] / r['batch'])} | {r['compile_seconds']:.0f} |")
  return "\n".join(lines)


def plot(rows: list[dict], path: pathlib.Path, target: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  models = list(dict.fromkeys(r["model"] for r in rows))
  names = list(dict.fromkeys(r["variant"] for r in rows))
  fig, ax = plt.subplots(figsize=(1.8 * len(models) + 3, 4))
  width = 0.8 / len(names)
  for k, name in enumerate(names):
    values = [next((r["temp_bytes"] / r["batch"] / 2**20 for r in rows if r["model"] == m and r["variant"] == name), 0)
              for m in models]
    ax.bar([i + k * width for i in range(len(models))], values, width, label=name)
  ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(models))], models)
  ax.set_ylabel("compiled temp per sample (MiB)")
  ax.set_yscale("log")
  ax.set_title(f"Gradient-step memory per sample (XLA compiled temp, {target} compiler)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", nargs="+", default=["resnet50", "swin_t", "bert_large", "gcn"],
                      choices=sorted(V.PAPER_MODELS))
  parser.add_argument("--variants", nargs="+", default=["baseline", "checkpoint", "8", "4", "2", "2r"],
                      choices=sorted(V.VARIANTS_BY_KEY))
  parser.add_argument("--small", action="store_true", help="tiny models at batch 4")
  parser.add_argument("--target", default="h100", help="cpu, h100, h200 or a GPU target description (.txtpb)")
  parser.add_argument("--out", default="results/memory")
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  size = "tiny" if args.small else "paper"
  jobs = [(m, V.VARIANTS_BY_KEY[v]) for m in args.models for v in args.variants]
  rows = []
  for model, variant in tqdm(jobs, desc="compiling", disable=None):
    batch = 4 if args.small else V.PAPER_MODELS[model]
    rows.append(measure(model, variant, batch, size, args.target))
    (out / "memory.json").write_text(json.dumps({"target": args.target, "jax": jax.__version__, "rows": rows}, indent=1))
  text = table(rows)
  (out / "memory.md").write_text(text + "\n")
  plot(rows, out / "memory.png", args.target)
  print(text)
  print(f"\nwritten: {out / 'memory.md'}, {out / 'memory.json'}, {out / 'memory.png'}")


if __name__ == "__main__":
  main()
