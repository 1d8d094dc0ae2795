"""Adaptive bits: `jact.calibrate`'s predictions against measurement, what its allocation gains, what it costs.

  python benchmarks/calibrate.py              # the full run, written to results/calibrate
  python benchmarks/calibrate.py --small      # a quick run: fewer seeds and probes, ResNet-18 batch 8
  python benchmarks/calibrate.py --parts cost --out /tmp/calibrate
  python benchmarks/calibrate.py --report a/calibrate.json b/calibrate.json --out /tmp/both   # merge runs

Parts:
  prediction  On three small models (`jact.models.small`: a GELU MLP, conv + BatchNorm blocks, a
              transformer block), the gradient variance `jact.calibrate` predicts at uniform 2
              and 4 bits against the variance measured over rounding seeds on the real
              compressed path, in total and for each of the five most sensitive residuals alone.
  allocation  A GELU MLP whose layers' weight scales span 4 .. 1/8, so that its residuals'
              sensitivities differ widely: calibrated to an average of 2 bits against uniform 2
              bits at the same byte budget, measured variance.
  cost        ResNet-18 with the paper's widths and depth at reduced resolution (this CPU cannot
              run 224x224 in minutes), every block and the stem `jact.compressed`: the wall time
              of method="vjp" (several probe counts), "jvp" and "gact", interleaved in one
              process, through `jact.Recalibration` -- its first calibration (with compilation)
              and a second one on new variables and a new batch of the same shapes (compilation
              reused, as in training) -- and the measured gradient variance of each method's
              allocation at the same budget.

Measured variance: E ||g_q - g||^2 over independent roundings (g_q, rounding keys 0, 1, ...)
against the exact gradient g of the same batch, with its standard error. The ResNet's blocks
draw their rounding noise from a Flax RNG stream (`training.compressed_blocks(seeded=True)`) so
that one batch can be rounded several ways.

Writes calibrate.json, sensitivity.png (per residual, with the chosen bits) and
predicted_vs_measured.png to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import sys
import time

import jax
import numpy as np
from tqdm.auto import tqdm

import jact
from jact.info import format_bytes
from jact.models import get_model, small, training

PARTS = ("prediction", "allocation", "cost")
AVG_BITS = 2.0
ALLOCATION_SCALES = (4.0, 2.0, 1.0, 0.5, 0.25, 0.125)
TOP_RESIDUALS = 5


@dataclasses.dataclass(frozen=True)
class Config:
  """The sizes of a run.

  Attributes:
    seeds: rounding seeds per measured variance of the small models.
    resnet_seeds: rounding seeds per measured variance of ResNet-18.
    image_size, batch_size: of ResNet-18's probe batch.
    vjp_probes: `num_probes` of the "vjp" rows of the cost part (4 is calibrate's default).
    jvp_probes: `num_probes` of the "jvp" row (0: no "jvp" row).
  """
  seeds: int
  resnet_seeds: int
  image_size: int
  batch_size: int
  vjp_probes: tuple[int, ...]
  jvp_probes: int


FULL = Config(seeds=64, resnet_seeds=32, image_size=32, batch_size=32, vjp_probes=(8, 4, 2), jvp_probes=1)
SMALL = Config(seeds=16, resnet_seeds=8, image_size=32, batch_size=8, vjp_probes=(8, 2), jvp_probes=1)


def measurement(errors: np.ndarray) -> dict:
  """Mean and standard error of squared gradient errors."""
  return {"measured": float(np.mean(errors)), "stderr": float(np.std(errors, ddof=1) / np.sqrt(len(errors)))}


# --- prediction ----------------------------------------------------------------------------------

def prediction(config: Config, bar: tqdm) -> list[dict]:
  """Predicted and measured variance of the small models, in total and per top residual."""
  rows = []
  for model, make in small.MODELS.items():
    bar.set_postfix_str(model)
    loss, params, x = make()
    policy = jact.calibrate(loss(2), params, x, avg_bits=AVG_BITS, progress=False)
    for bits in (2, 4):
      errors = small.compressed_squared_errors(loss, params, x, bits, config.seeds)
      rows.append({"model": model, "residual": "total", "bits": bits,
                   "predicted": policy.predicted_variance_at(bits), **measurement(errors)})
    top = sorted(policy.residuals, key=lambda r: -r.sensitivity)[:TOP_RESIDUALS]
    errors = small.residual_squared_errors(loss(2), [params, x], [r.name for r in top], (2, 4), config.seeds)
    rows += [{"model": model, "residual": r.name, "bits": bits, "predicted": r.variance_at(bits),
              **measurement(errors[r.name, bits])} for r in top for bits in (2, 4)]
    bar.update()
  return rows


# --- allocation ----------------------------------------------------------------------------------

def allocation(config: Config, bar: tqdm) -> dict:
  """Calibrated average 2 bits against uniform 2 bits on an MLP of widely differing layers."""
  loss, params, x = small.mlp(scales=ALLOCATION_SCALES)
  policy = jact.calibrate(loss(2), params, x, avg_bits=AVG_BITS, progress=False)
  uniform = jact.policies.uniform(2)
  variants = []
  for name, bits, stored, predicted in (
      ("uniform 2 bits", uniform, sum(r.stored_nbytes_at(2) for r in policy.residuals),
       policy.predicted_variance_at(2)),
      (f"calibrated avg {AVG_BITS:g} bits", policy, policy.stored_nbytes, policy.predicted_variance)):
    bar.set_postfix_str(name)
    errors = small.compressed_squared_errors(loss, params, x, bits, config.seeds)
    variants.append({"variant": name, "stored_bytes": stored, "predicted": predicted, **measurement(errors)})
    bar.update()
  return {"scales": ALLOCATION_SCALES, "budget_bytes": policy.budget_bytes, "variants": variants,
          "residuals": residual_rows(policy), "policy": policy.to_data()}


def residual_rows(policy: jact.policies.Calibrated) -> list[dict]:
  return [{"residual": r.name, "sensitivity": r.sensitivity, "bits": r.bits,
           "variance_at_bits": r.variance_at(r.bits), "variance_at_2": r.variance_at(2), "nbytes": r.nbytes}
          for r in policy.residuals]


# --- cost ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Method:
  """One calibration method of the cost part."""
  method: str
  num_probes: int | None = None

  @property
  def name(self) -> str:
    return self.method if self.num_probes is None else f"{self.method} ({self.num_probes} probes)"

  def recalibration(self, loss) -> jact.Recalibration:
    probes = {} if self.num_probes is None else {"num_probes": self.num_probes}
    return jact.Recalibration(loss, every=1, has_aux=True, avg_bits=AVG_BITS, method=self.method,
                              progress=False, **probes)

  def passes(self, residuals: int) -> str:
    """What one calibration runs, in words."""
    if self.method == "vjp":
      return f"1 linearisation + {self.num_probes} transposed passes"
    if self.method == "jvp":
      return f"{residuals} x (1 linearisation + {self.num_probes} jvp)"
    return f"{residuals} x 3 gradients"


def resnet(config: Config):
  """ResNet-18 (paper widths and depth) at `config.image_size`, every block and the stem compressed
  with rounding noise from a Flax RNG stream; its loss and two (variables, batch) probes."""
  spec = get_model("resnet18", "paper", image_size=config.image_size,
                   wrap_block=training.compressed_blocks(32, seeded=True))

  def loss(params, state, batch, rounding_key):
    logits, new_state = spec.module.apply({"params": params, **state}, batch["images"], mutable=list(state),
                                          rngs={training.ROUNDING_STREAM: rounding_key})
    return spec.objective(logits, batch), new_state

  init = jax.jit(get_model("resnet18", "paper", image_size=config.image_size).init)
  probes = []
  for seed in (0, 1):
    batch = spec.make_batch(jax.random.key(seed), config.batch_size)
    params, state = init(jax.random.key(100 + seed), batch)
    probes.append((params, state, batch))
  return loss, probes


def cost(config: Config, bar: tqdm) -> dict:
  """Wall and CPU time of each method's calibrations, interleaved; measured variance of each allocation."""
  loss, probes = resnet(config)
  methods = ([Method("vjp", p) for p in config.vjp_probes] + [Method("jvp", config.jvp_probes)] * bool(config.jvp_probes)
             + [Method("gact")])
  params, state, batch = probes[0]

  @functools.partial(jax.jit, static_argnames="policy")
  def gradient(params, state, batch, rounding_key, policy):
    with jact.use_policy(policy):
      return jax.grad(loss, has_aux=True)(params, state, batch, rounding_key)[0]

  exact = gradient(params, state, batch, jax.random.key(0), policy=32)  # also warms up XLA before timing
  recalibrations = [m.recalibration(loss) for m in methods]
  timings = [{} for _ in methods]
  policies = []
  for step, (params_, state_, batch_) in enumerate(probes):  # interleaved: every method's first call, then every second one
    for method, recalibration, timing in zip(methods, recalibrations, timings):
      bar.set_postfix_str(f"{method.name}, calibration {step + 1}")
      wall, cpu = time.perf_counter(), time.process_time()
      policy = recalibration(step, params_, state_, batch_, jax.random.key(0))
      timing["first" if step == 0 else "again"] = {"wall_s": time.perf_counter() - wall,
                                                   "cpu_s": time.process_time() - cpu}
      if step == 0:
        policies.append(policy)
      bar.update()

  def measured(name: str, policy) -> dict:
    bar.set_postfix_str(f"measured variance, {name}")
    errors = small.squared_errors(lambda key: gradient(params, state, batch, key, policy=policy), exact,
                                  config.resnet_seeds)
    bar.update()
    return measurement(errors)

  residuals = len(policies[0].residuals)
  rows = [{"method": m.name, "passes": m.passes(residuals), "timing": t, "stored_bytes": p.stored_nbytes,
           "predicted": p.predicted_variance, **measured(m.name, p)}
          for m, p, t in zip(methods, policies, timings)]
  reference = policies[0]  # its prediction at 2 bits
  rows.append({"method": "uniform 2 bits", "passes": "", "timing": None,
               "stored_bytes": sum(r.stored_nbytes_at(2) for r in reference.residuals),
               "predicted": reference.predicted_variance_at(2), **measured("uniform 2 bits", jact.policies.uniform(2))})
  bar.set_postfix_str("measured variance, top residuals alone")
  top = sorted(reference.residuals, key=lambda r: -r.variance_at(2))[:TOP_RESIDUALS]
  errors = small.residual_squared_errors(loss, [params, state, batch, jax.random.key(0)], [r.name for r in top], (2,),
                                         config.resnet_seeds, has_aux=True)
  top_rows = [{"model": "resnet18", "residual": r.name, "bits": 2, "predicted": r.variance_at(2),
               **measurement(errors[r.name, 2])} for r in top]
  bar.update()
  return {"model": f"resnet18 (paper widths and depth) at {config.image_size}x{config.image_size}, "
                   f"batch {config.batch_size}", "residual_names": residuals,
          "budget_bytes": policies[0].budget_bytes, "rows": rows, "top_residuals": top_rows,
          "sensitivity": {m.name: residual_rows(p) for m, p in zip(methods, policies)}}


# --- report --------------------------------------------------------------------------------------

def markdown_table(header: tuple[str, ...], rows: list[tuple]) -> str:
  rows = [tuple(str(c) for c in row) for row in rows]
  widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
  line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
  return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def variance(row: dict) -> str:
  return f"{row['measured']:.3g} ± {row['stderr']:.2g}"


def tables(report: dict) -> list[str]:
  """The report's tables, as markdown, with a title line each."""
  out = []
  if "prediction" in report:
    rows = report["prediction"]
    out.append("Prediction: predicted vs measured gradient variance (total, then the top residuals)\n" + markdown_table(
        ("model", "residual", "bits", "predicted", "measured ± se", "predicted / measured"),
        [(r["model"], r["residual"], r["bits"], f"{r['predicted']:.3g}", variance(r),
          f"{r['predicted'] / r['measured']:.2f}") for r in rows]))
  if "allocation" in report:
    result = report["allocation"]
    out.append(f"Allocation: MLP with layer scales {result['scales']}, sensitivities (variance at 1 bit) "
               "and chosen bits\n" + markdown_table(
                   ("residual", "sensitivity", "bits", "variance at its bits", "variance at 2 bits"),
                   [(r["residual"], f"{r['sensitivity']:.3g}", r["bits"], f"{r['variance_at_bits']:.3g}",
                     f"{r['variance_at_2']:.3g}") for r in sorted(result["residuals"], key=lambda r: -r["sensitivity"])]))
    out.append(f"Allocation: same budget ({format_bytes(result['budget_bytes'])})\n" + markdown_table(
        ("variant", "stored", "predicted", "measured ± se"),
        [(v["variant"], format_bytes(v["stored_bytes"]), f"{v['predicted']:.3g}", variance(v))
         for v in result["variants"]]))
  if "cost" in report:
    result = report["cost"]
    gact = next(r for r in result["rows"] if r["method"] == "gact")["timing"]
    rows = []
    for r in result["rows"]:
      t = r["timing"]
      seconds = lambda call: f"{t[call]['wall_s']:.1f} / {t[call]['cpu_s']:.1f}"
      ratio = lambda call: (f"{gact[call]['cpu_s'] / t[call]['cpu_s']:.1f}x "
                            f"({gact[call]['wall_s'] / t[call]['wall_s']:.1f}x)")
      times = ("", "", "", "") if t is None else (seconds("first"), seconds("again"), ratio("again"), ratio("first"))
      rows.append((r["method"], r["passes"], *times, format_bytes(r["stored_bytes"]), f"{r['predicted']:.3g}",
                   variance(r)))
    out.append(f"Cost: {result['model']}, {result['residual_names']} residual names, budget avg {AVG_BITS:g} bits "
               f"({format_bytes(result['budget_bytes'])})\n" + markdown_table(
                   ("method", "runs", "1st call: wall / CPU s", "again: wall / CPU s", "gact / this, again: CPU (wall)",
                    "gact / this, 1st: CPU (wall)", "stored", "predicted", "measured ± se"), rows))
    out.append(f"ResNet-18: the {TOP_RESIDUALS} residuals of largest predicted variance at 2 bits, each alone "
               "(others exact)\n" + markdown_table(
                   ("residual", "bits", "predicted", "measured ± se", "predicted / measured"),
                   [(r["residual"], r["bits"], f"{r['predicted']:.3g}", variance(r), f"{r['predicted'] / r['measured']:.2f}")
                    for r in result["top_residuals"]]))
  return out


def plot(report: dict, out: pathlib.Path) -> list[pathlib.Path]:
  """Sensitivity per residual with the chosen bits, and predicted against measured variance."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = []
  panels = []
  if "cost" in report:
    sensitivity = report["cost"]["sensitivity"]
    reference = next(iter(sensitivity))
    panels.append((f"ResNet-18, {reference}", sensitivity[reference], sensitivity.get("gact")))
  if "allocation" in report:
    panels.append((f"MLP, layer scales {report['allocation']['scales']}", report["allocation"]["residuals"], None))
  if panels:
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, 5 * len(panels)), squeeze=False)
    colours = {1: "#d73027", 2: "#fc8d59", 4: "#fee090", 8: "#91bfdb", 16: "#4575b4", 32: "#313695"}
    for ax, (title, rows, gact) in zip(axes[:, 0], panels):
      rows = sorted(rows, key=lambda r: -r["sensitivity"])
      positive = [r["sensitivity"] for r in rows if r["sensitivity"] > 0]
      floor = min(positive) / 10 if positive else 1e-12
      heights = [max(r["sensitivity"], floor) for r in rows]
      ax.bar(range(len(rows)), heights, color=[colours[r["bits"]] for r in rows], log=True)
      if gact is not None:
        by_name = {r["residual"]: r["sensitivity"] for r in gact}
        ax.plot(range(len(rows)), [max(by_name[r["residual"]], floor) for r in rows], "k.", label="gact's estimate")
      crowded = len(rows) > 24
      ax.set_xticks(range(len(rows)), [r["residual"].removeprefix("ResNet/") for r in rows],
                    rotation=90 if crowded else 30, ha="center" if crowded else "right", fontsize=6 if crowded else 9)
      ax.set_ylabel("predicted variance at 1 bit")
      ax.set_title(f"{title}: sensitivity per residual, colour = chosen bits (zero sensitivity: at the floor)", fontsize=10)
      handles = [plt.Rectangle((0, 0), 1, 1, color=c) for b, c in colours.items() if any(r["bits"] == b for r in rows)]
      labels = [f"{b} bit{'s' if b > 1 else ''}" for b in colours if any(r["bits"] == b for r in rows)]
      if gact is not None:
        handles.append(ax.lines[0])
        labels.append("gact's estimate")
      ax.legend(handles, labels, fontsize=8)
    fig.tight_layout()
    paths.append(out / "sensitivity.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

  panels = [("small models: uniform 2 and 4 bits, total (o) and top residuals (x)",
             [(f"{r['model']}, {'total' if r['residual'] == 'total' else 'top residuals'}", r)
              for r in report.get("prediction", [])]),
            ("ResNet-18: each method's allocation, uniform 2 bits, top residuals alone (x)",
             [(r["method"], r) for r in report.get("cost", {}).get("rows", [])] +
             [("top residuals alone at 2 bits", r) for r in report.get("cost", {}).get("top_residuals", [])])]
  panels = [(title, points) for title, points in panels if points]
  if panels:
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 6.5), squeeze=False)
    for ax, (title, points) in zip(axes[0], panels):
      for label in dict.fromkeys(label for label, _ in points):
        chosen = [r for l, r in points if l == label]
        ax.errorbar([r["predicted"] for r in chosen], [r["measured"] for r in chosen],
                    yerr=[r["stderr"] for r in chosen], fmt="x" if "top" in label else "o", label=label, ms=5)
      values = [v for _, r in points for v in (r["predicted"], r["measured"])]
      low, high = min(values) / 2, max(values) * 2
      ax.plot([low, high], [low, high], "k-", lw=0.8)
      ax.fill_between([low, high], [low / 1.5, high / 1.5], [low * 1.5, high * 1.5], color="0.9", label="within 1.5x")
      ax.set(xscale="log", yscale="log", xlabel="predicted gradient variance", ylabel="measured gradient variance")
      ax.set_title(title, fontsize=9)
      ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "predicted_vs_measured.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
  return paths


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="fewer seeds and probes, ResNet-18 batch 8")
  parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/calibrate"))
  parser.add_argument("--vjp-probes", type=int, nargs="+", help="the cost part's vjp rows (default 8 4 2)")
  parser.add_argument("--jvp-probes", type=int, help="the cost part's jvp row (default 1; 0: none, it is slow)")
  parser.add_argument("--report", type=pathlib.Path, nargs="+", metavar="JSON",
                      help="measure nothing: print the tables and draw the plots of these calibrate.json files "
                           "(separate runs merged; a later file's part replaces an earlier one's)")
  args = parser.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  if args.report:
    report = {}
    for path in args.report:
      report.update({k: v for k, v in json.loads(path.read_text()).items() if k in PARTS})
    paths = plot(report, args.out)
    for text in tables(report):
      print(text, end="\n\n")
    print(f"wrote {', '.join(map(str, paths))}")
    return 0
  config = SMALL if args.small else FULL
  if args.vjp_probes:
    config = dataclasses.replace(config, vjp_probes=tuple(args.vjp_probes))
  if args.jvp_probes is not None:
    config = dataclasses.replace(config, jvp_probes=args.jvp_probes)
  methods = len(config.vjp_probes) + bool(config.jvp_probes) + 1
  steps = {"prediction": len(small.MODELS), "allocation": 2, "cost": 2 * methods + methods + 2}
  report = {"command": " ".join(["python benchmarks/calibrate.py"] + (argv if argv is not None else sys.argv[1:])),
            "backend": jax.default_backend(), "cpus": os.cpu_count(), "load_average_before": os.getloadavg(),
            "config": dataclasses.asdict(config)}
  start = time.perf_counter()
  parts = {"prediction": prediction, "allocation": allocation, "cost": cost}
  with tqdm(total=sum(steps[p] for p in args.parts), disable=None) as bar:
    for part in args.parts:
      bar.set_description(part)
      report[part] = parts[part](config, bar)
      (args.out / "calibrate.json").write_text(json.dumps(report, indent=1))  # each finished part
  report.update(wall_seconds=time.perf_counter() - start, load_average_after=os.getloadavg())
  (args.out / "calibrate.json").write_text(json.dumps(report, indent=1))
  paths = plot(report, args.out)
  for text in tables(report):
    print(text, end="\n\n")
  print(f"wall time {report['wall_seconds'] / 60:.1f} min on {report['cpus']} CPUs (load average "
        f"{report['load_average_before'][0]:.1f} before, {report['load_average_after'][0]:.1f} after); "
        f"wrote {args.out / 'calibrate.json'}, {', '.join(map(str, paths))}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
