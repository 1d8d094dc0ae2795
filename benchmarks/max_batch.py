"""The largest batch whose compiled training step fits a memory budget, by way of keeping residuals.

  python benchmarks/max_batch.py                          # ResNet-50, Swin-T, BERT-large; 80 GiB, H100 target
  python benchmarks/max_batch.py --models resnet50 --budgets 16 --variants baseline 2 --target cpu

The step is forward, backward and an Adam update, jitted with parameters, state and optimizer
state donated; its peak is XLA's compiled argument + output - alias + temp bytes (parameters and
optimizer state counted), from abstract shapes, so nothing runs; `--target h100` (default) or
`h200` compiles for that GPU without one, `cpu` uses XLA:CPU. The search brackets the batch
from an affine fit of two small batches, then bisects on compiled memory to within
`--resolution` (relative). Writes a markdown table, JSON and a bar plot to --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib

import jax
from tqdm.auto import tqdm

import jact
from jact.models import training
from jact.models import variants as V

GiB = 2**30


@functools.lru_cache(maxsize=None)
def peak_bytes(model: str, variant_key: str, batch: int, target: str) -> int:
  spec = V.spec_for(model, V.VARIANTS_BY_KEY[variant_key])
  step, optimizer = V.train_step(spec)
  return jact.memory.compiled(step, *V.abstract_train_inputs(spec, batch, optimizer), target=target).peak


def max_batch(model: str, variant_key: str, budget: int, resolution: float, target: str) -> int:
  """Largest batch b with peak_bytes(b) <= budget, to within `resolution` of b (0 if none fits)."""
  peak_at = lambda batch: peak_bytes(model, variant_key, batch, target)
  low_batch, high_batch = 4, 8
  slope = (peak_at(high_batch) - peak_at(low_batch)) / (high_batch - low_batch)
  base = peak_at(low_batch) - slope * low_batch
  guess = max(1, int((budget - base) / slope)) if slope > 0 else 1
  # Peak memory is close to affine in the batch, so the guess is near: bracket it in small steps.
  return training.max_batch(peak_at, budget, start=guess, resolution=resolution, growth=1 + 4 * resolution)


def table(rows: list[dict], budgets: list[int]) -> str:
  header = "| model | variant | " + " | ".join(f"max batch @{b} GiB | vs baseline" for b in budgets) + " |"
  lines = [header, "|---" * (header.count("|") - 1) + "|"]
  for r in rows:
    cells = []
    for b in budgets:
      base = next(x for x in rows if x["model"] == r["model"] and x["variant"] == V.BASELINE.name)
      value, reference = r["max_batch"][str(b)], base["max_batch"][str(b)]
      cells += [str(value), f"{value / reference:.1f}x" if reference else "-"]
    lines.append(f"| {r['model']} | {r['variant']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(rows: list[dict], budgets: list[int], path: pathlib.Path, target: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  models = list(dict.fromkeys(r["model"] for r in rows))
  fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4), squeeze=False)
  for ax, budget in zip(axes[0], budgets):
    names = list(dict.fromkeys(r["variant"] for r in rows))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
      values = [next((r["max_batch"][str(budget)] for r in rows if r["model"] == m and r["variant"] == name), 0)
                for m in models]
      ax.bar([i + k * width for i in range(len(models))], values, width, label=name)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(models))], models)
    ax.set_yscale("log")
    ax.set_ylabel("largest batch that fits")
    ax.set_title(f"{budget} GiB (compiled training step, {target} compiler)")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", nargs="+", default=["resnet50", "swin_t", "bert_large"], choices=sorted(V.PAPER_MODELS))
  parser.add_argument("--variants", nargs="+", default=["baseline", "checkpoint", "8", "4", "2", "2r"],
                      choices=sorted(V.VARIANTS_BY_KEY))
  parser.add_argument("--budgets", nargs="+", type=int, default=[80], help="GiB")
  parser.add_argument("--target", default="h100", help="cpu, h100, h200 or a GPU target description (.txtpb)")
  parser.add_argument("--resolution", type=float, default=0.02, help="relative precision of the search")
  parser.add_argument("--out", default="results/max_batch")
  args = parser.parse_args()
  if "baseline" not in args.variants:
    parser.error("--variants must include baseline: every ratio is to it")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  rows = []
  for model, key in tqdm([(m, v) for m in args.models for v in args.variants], desc="searching", disable=None):
    found = {str(b): max_batch(model, key, b * GiB, args.resolution, args.target) for b in args.budgets}
    rows.append({"model": model, "variant": V.VARIANTS_BY_KEY[key].name, "max_batch": found})
    (out / "max_batch.json").write_text(json.dumps({"target": args.target, "jax": jax.__version__, "rows": rows},
                                                   indent=1))
  text = table(rows, args.budgets)
  (out / "max_batch.md").write_text(text + "\n")
  plot(rows, args.budgets, out / "max_batch.png", args.target)
  print(text)
  print(f"\nwritten: {out / 'max_batch.md'}, {out / 'max_batch.json'}, {out / 'max_batch.png'}")


if __name__ == "__main__":
  main()
