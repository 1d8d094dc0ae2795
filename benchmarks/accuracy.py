"""Accuracy of training with compressed residuals: a CNN, a transformer and a GNN on real data, on a CPU.

  python benchmarks/accuracy.py              # the full run, written to results/accuracy
  python benchmarks/accuracy.py --small      # a quick run (minutes)
  python benchmarks/accuracy.py --tasks digits --seeds 0 1 --out /tmp/acc
  python benchmarks/accuracy.py --report a/accuracy.json b/accuracy.json   # merge runs, plot, print

Tasks (`jact.models.tasks`; all data ships with installed packages, nothing is downloaded):
  digits  a ResNet (3 stages of basic blocks, 3x3/1 stem) on scikit-learn's 8x8 digits;
  text    a GPT-2-style causal transformer predicting the next character of Python's reference
          documentation (`pydoc_data.topics`, part of CPython): real English and code, where the
          transformer's attention and causal structure matter, unlike digits read as a sequence;
  graph   a GCN on a graph with planted communities (`models.graphs.random_graph`): no real
          graph ships with the installed packages.

Variants: full precision, uniform 8, 4 and 2 bits, and calibrated policies averaging 4 and 2
bits (`jact.calibrate` on the first batch of the first seed, at initialisation; the same policy
then trains every seed). Every variant of a seed starts from the same variables and sees the
same batches and dropout masks, so differences come from compression alone. The stochastic
rounding noise of compressed runs is drawn from the run's seed and the step number
(`training.compressed_blocks(..., seeded=True)`) rather than jact's default hash of the values,
so that the stability check below can round one batch several ways.

GACT's stability check: at a few points of every compressed run, the gradient variance that
quantisation adds (4 independent roundings of one batch, against that batch's exact gradient)
is divided by the variance of the exact gradient over 4 independent batches (the graph trains
on the whole graph, so there its only sampling noise is dropout). GACT's argument: when the
ratio is well below 1, compressed training converges like full-precision SGD.

Targets: calibrated avg 4 bits within 0.3 points of full precision, uniform 2 bits within 1
point (mean over seeds). Writes accuracy.json, losses.png and variance_ratio.png to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

import jact
from jact.models import graphs, tasks, training

TARGETS = {"calibrated avg 4": 0.3, "uniform 2": 1.0}
"""Largest accepted drop of the mean metric below full precision, in points."""


@dataclasses.dataclass(frozen=True)
class Variant:
  """How a run stores residuals: full precision, a uniform width or a calibrated average."""
  name: str
  bits: int | None = None
  avg_bits: float | None = None

  @property
  def compressed(self) -> bool:
    return self.bits is not None or self.avg_bits is not None


VARIANTS = (Variant("full precision"), Variant("uniform 8", bits=8), Variant("uniform 4", bits=4),
            Variant("uniform 2", bits=2), Variant("calibrated avg 4", avg_bits=4.0),
            Variant("calibrated avg 2", avg_bits=2.0))


def make_tasks(small: bool) -> dict[str, tasks.Task]:
  """The three tasks at full size, or shrunk for a quick run."""
  if small:
    return {"digits": tasks.digits_task(steps=60), "text": tasks.text_task(steps=60),
            "graph": tasks.graph_task(steps=40, size=graphs.GraphSize(1000, 4000, 32, 8))}
  return {"digits": tasks.digits_task(), "text": tasks.text_task(), "graph": tasks.graph_task()}


@dataclasses.dataclass
class Context:
  """What every run of one task shares."""
  task: tasks.Task
  exact: training.Trainer
  probe: training.NoiseProbe
  score: Callable
  checkpoints: int
  bar: tqdm
  initial: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def create(cls, task: tasks.Task, checkpoints: int, bar: tqdm) -> "Context":
    exact = training.Trainer(task, None)
    return cls(task, exact, training.NoiseProbe(exact), training.evaluator(task), checkpoints, bar)

  def init(self, seed: int) -> tuple:
    """The initial variables of a seed's runs, made once (every variant starts from them)."""
    if seed not in self.initial:
      self.initial[seed] = training.init(self.task, seed)
    return self.initial[seed]


def train_runs(context: Context, trainer: training.Trainer, label: str, seeds: list[int],
               recalibration: Callable[[], jact.Recalibration] | None = None,
               snapshots: list | None = None) -> dict:
  """Trains `trainer` from every seed's initial variables: metric, losses and gradient noise.

  Args:
    context: the task's shared pieces.
    trainer: the variant; the full-precision one measures no noise.
    label: the variant's name, for the progress bar.
    seeds: the runs.
    recalibration: makes a fresh `jact.Recalibration` per run, whose policy trains each step.
    snapshots: receives `(step, params, state)` at every checkpoint of the first seed.
  """
  task, runs = context.task, []
  every = max(1, task.steps // context.checkpoints)
  for seed in seeds:
    context.bar.set_description(f"{task.name}: {label}, seed {seed}")
    params, state = context.init(seed)
    noise = []
    recalibrate = recalibration() if recalibration else None
    policy_for = None if recalibrate is None else (lambda step, *args: recalibrate(step, *args))

    def checkpoint(step, params, state):
      if snapshots is not None and seed == seeds[0]:
        snapshots.append((step, params, state))
      if trainer is not context.exact:
        key = jax.random.fold_in(jax.random.key(seed + 10_000), step)
        policy = None
        if recalibrate is not None:  # the policy this step trains with (calibrated first when due)
          policy = (recalibrate(step, params, state, *trainer.batch(seed, step)[:2]) if step < task.steps
                    else recalibrate.policy)
        measured = context.probe(trainer, params, state, key, policy)
        noise.append({"step": step, **dataclasses.asdict(measured), "ratio": measured.ratio})

    trained = trainer.train(params, state, seed, progress=context.bar, checkpoint_every=every,
                            on_checkpoint=checkpoint, policy_for=policy_for)
    runs.append({"seed": seed, "metric": context.score(trained.params, trained.state),
                 "losses": trained.losses.tolist(), "seconds": trained.seconds, "noise": noise})
    tqdm.write(f"{task.name}, {label}, seed {seed}: {task.metric} {100 * runs[-1]['metric']:.2f}%, "
               f"{trained.seconds:.0f} s" + (f", noise ratio {np.median([n['ratio'] for n in noise]):.3g}" if noise else ""))
  metrics = np.array([r["metric"] for r in runs])
  return {"runs": runs, "mean": float(metrics.mean()),
          "std": float(metrics.std(ddof=1)) if len(runs) > 1 else 0.0}


def run_task(task: tasks.Task, seeds: list[int], checkpoints: int, bar: tqdm) -> dict:
  """Trains every variant of `task` for every seed and diagnoses missed targets; its part of the JSON."""
  context = Context.create(task, checkpoints, bar)
  params0, state0 = context.init(seeds[0])
  policies = {v.name: training.calibrate(task, params0, state0, seeds[0], v.avg_bits)
              for v in VARIANTS if v.avg_bits is not None}
  results, snapshots = {}, []
  for variant in VARIANTS:
    bits = policies.get(variant.name, variant.bits)
    if variant.compressed:
      trainer = training.Trainer(task, training.compressed_blocks(bits, seeded=True))
      results[variant.name] = train_runs(context, trainer, variant.name, seeds)
    else:  # the first seed's snapshots serve the diagnosis
      results[variant.name] = train_runs(context, context.exact, variant.name, seeds, snapshots=snapshots)
    if variant.name in policies:
      policy = policies[variant.name]
      results[variant.name]["policy"] = {"bits": policy.bits, "average_bits": policy.average_bits,
                                         "predicted_variance": policy.predicted_variance}
  sensitivity = max(policies.values(), key=lambda p: len(p.residuals))
  result = {"description": task.description, "metric": task.metric, "steps": task.steps,
            "batch_size": task.batch_size, "variants": results,
            "sensitivity": sensitivity_ranking(sensitivity, policies)}
  result["missed_targets"] = check_targets(result)
  if result["missed_targets"]:
    result["diagnosis"] = diagnose(context, seeds[0], snapshots, results)
  return result


def block_pattern(name: str) -> str:
  """A residual name with its block replaced by `*` ("GPT2/layer_1/attention/x" -> "GPT2/*/attention/x")."""
  parts = name.split("/")
  return "/".join(parts[:1] + ["*"] + parts[2:])


def diagnose(context: Context, seed: int, snapshots: list, results: dict) -> dict:
  """Why a task misses a target, on one seed.

  1. Sensitivity over training: `jact.calibrate` at the full-precision run's checkpoints: which
     residuals carry the predicted gradient variance at 2 bits, and how the total grows.
  2. The residual kind (the same residual in every block) that carries most of it at the end is
     kept at full precision under uniform 2 and 4 bits: how much accuracy that alone recovers.
  3. Calibrated avg 4 bits re-calibrated during training (`jact.Recalibration`, GACT's adapt
     interval, every quarter of the run) instead of once at initialisation.
  """
  task = context.task
  over_training = jact.Recalibration(training.calibration_loss(task), every=1, avg_bits=2.0, has_aux=True,
                                     progress=False)
  shares = []
  for step, params, state in snapshots:
    batch, key = training.probe_batch(task, seed)
    over_training(step, params, state, batch, key)
    residuals = over_training.history[-1][1].residuals
    total = sum(r.variance_at(2) for r in residuals)
    by_kind = {}
    for r in residuals:
      by_kind[block_pattern(r.name)] = by_kind.get(block_pattern(r.name), 0.0) + r.variance_at(2) / total
    shares.append({"step": step, "predicted_variance_at_2_bits": total,
                   "top_residuals": {r.name: r.variance_at(2) / total for r in
                                     sorted(residuals, key=lambda r: -r.variance_at(2))[:4]},
                   "top_kinds": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])[:3])})
  dominant = next(iter(shares[-1]["top_kinds"]))
  variants = {}
  for bits in (2, 4):
    policy = jact.policies.by_name({dominant: 32, "*": bits})
    trainer = training.Trainer(task, training.compressed_blocks(policy, seeded=True))
    variants[f"uniform {bits}, {dominant} at 32"] = train_runs(context, trainer, f"uniform {bits} keeping {dominant}", [seed])
  every = max(1, task.steps // 4)
  recalibration = lambda: jact.Recalibration(training.calibration_loss(task), every=every, avg_bits=4.0,
                                             has_aux=True, progress=False)
  trainer = training.Trainer(task, training.compressed_blocks(32, seeded=True))
  variants[f"calibrated avg 4, recalibrated every {every} steps"] = train_runs(
      context, trainer, "calibrated avg 4, recalibrated", [seed], recalibration=recalibration)
  reference = results["full precision"]["runs"][0]["metric"]
  for name in ("uniform 2", "uniform 4", "calibrated avg 4"):
    variants[name] = {"runs": results[name]["runs"][:1]}
  return {"seed": seed, "full_precision": reference, "sensitivity_over_training": shares,
          "dominant_kind": dominant,
          "variants": {name: {"metric": v["runs"][0]["metric"],
                              "vs_full_precision_points": 100 * (v["runs"][0]["metric"] - reference),
                              "median_noise_ratio": float(np.median([n["ratio"] for n in v["runs"][0]["noise"]])),
                              "runs": v["runs"]} for name, v in variants.items()}}


def sensitivity_ranking(reference: jact.policies.Calibrated, policies: dict) -> list[dict]:
  """Residuals by predicted gradient variance at 2 bits (most harmful first), with calibrated widths."""
  ranked = sorted(reference.residuals, key=lambda r: -r.variance_at(2))
  total = sum(r.variance_at(2) for r in ranked)
  return [{"name": r.name, "share_of_variance_at_2_bits": r.variance_at(2) / total if total else 0.0,
           "nbytes": r.nbytes, **{f"bits ({name})": p.bits.get(r.name) for name, p in policies.items()}}
          for r in ranked]


def check_targets(result: dict) -> list[str]:
  """The targets a task misses, as sentences."""
  variants = result["variants"]
  base = variants["full precision"]["mean"]
  return [f"{name}: {100 * (variants[name]['mean'] - base):+.2f} points vs full precision (target >= -{limit})"
          for name, limit in TARGETS.items() if 100 * (base - variants[name]["mean"]) > limit]


def table(name: str, result: dict) -> str:
  """A markdown table of one task: metric mean and spread, change vs full precision, noise ratio."""
  variants = result["variants"]
  base = variants["full precision"]
  header = ("variant", f"{result['metric']} (mean ± std)", "per seed", "vs full precision",
            "quantisation / sampling variance (median over training)")
  rows = []
  for variant in VARIANTS:
    v = variants[variant.name]
    ratios = [n["ratio"] for r in v["runs"] for n in r["noise"]]
    rows.append((variant.name, f"{100 * v['mean']:.2f}% ± {100 * v['std']:.2f}",
                 " / ".join(f"{100 * r['metric']:.2f}" for r in v["runs"]),
                 "" if variant.name == "full precision" else f"{100 * (v['mean'] - base['mean']):+.2f} points",
                 f"{np.median(ratios):.2g}" if ratios else ""))
  return f"**{name}**: {result['description']}, {result['steps']} steps\n\n" + training.markdown_table(header, rows)


def diagnosis_text(name: str, result: dict) -> str:
  """The diagnosis of a task's missed targets: sensitivity over training and the follow-up runs."""
  diagnosis = result["diagnosis"]
  lines = [f"**{name}, diagnosis** (seed {diagnosis['seed']}; full precision "
           f"{100 * diagnosis['full_precision']:.2f}%). Predicted gradient variance at 2 bits over training "
           "(`jact.calibrate` at the full-precision run's checkpoints) and the residuals that carry it:", ""]
  for point in diagnosis["sensitivity_over_training"]:
    top = ", ".join(f"`{n}` {100 * share:.0f}%" for n, share in point["top_residuals"].items())
    lines.append(f"* step {point['step']}: {point['predicted_variance_at_2_bits']:.3g}; {top}")
  header = ("variant (seed 0)", result["metric"], "vs full precision", "quantisation / sampling variance (median)")
  rows = [(variant, f"{100 * v['metric']:.2f}%", f"{v['vs_full_precision_points']:+.2f} points", f"{v['median_noise_ratio']:.2g}")
          for variant, v in diagnosis["variants"].items()]
  return "\n".join(lines + ["", training.markdown_table(header, rows)])


def plot(results: dict, out: pathlib.Path) -> list[pathlib.Path]:
  """losses.png (training loss per task and variant) and variance_ratio.png (GACT's check)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = []
  fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
  for ax, (name, result) in zip(axes[0], results.items()):
    for colour, variant in enumerate(VARIANTS):
      losses = np.mean([r["losses"] for r in result["variants"][variant.name]["runs"]], axis=0)
      ax.plot(training.smooth(losses, max(1, len(losses) // 50)), label=variant.name, lw=1, color=f"C{colour}")
    ax.set(title=f"{name}: training loss", xlabel="step", ylabel="mean over seeds, smoothed",
           yscale="log")
  axes[0][0].legend()
  fig.tight_layout()
  paths.append(out / "losses.png")
  fig.savefig(paths[-1], dpi=120)

  fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
  for ax, (name, result) in zip(axes[0], results.items()):
    for colour, variant in enumerate(VARIANTS):
      if not variant.compressed:
        continue
      runs = result["variants"][variant.name]["runs"]
      steps = [n["step"] for n in runs[0]["noise"]]
      ratio = np.mean([[n["ratio"] for n in r["noise"]] for r in runs], axis=0)
      ax.plot(steps, ratio, marker="o", label=variant.name, color=f"C{colour}")
    ax.axhline(1.0, color="gray", ls="--", lw=1)
    ax.set(title=f"{name}: quantisation / sampling variance", xlabel="step",
           ylabel="ratio (mean over seeds)", yscale="log")
  axes[0][0].legend()
  fig.tight_layout()
  paths.append(out / "variance_ratio.png")
  fig.savefig(paths[-1], dpi=120)
  return paths


def tail_losses(losses: list[float]) -> tuple[float, float]:
  """Mean training loss over the 10% of steps before the last 10%, and over the last 10%.

  A run has converged (for its schedule) when the two agree up to the minibatch noise.
  """
  tenth = max(1, len(losses) // 10)
  return float(np.mean(losses[-2 * tenth:-tenth])), float(np.mean(losses[-tenth:]))


def summarise(report: dict, out: pathlib.Path) -> None:
  """Writes accuracy.json and the plots to `out` and prints the tables, targets and diagnoses."""
  results = report["tasks"]
  report["missed_targets"] = {name: result["missed_targets"] for name, result in results.items()}
  (out / "accuracy.json").write_text(json.dumps(report, indent=1))
  paths = plot(results, out)
  for name, result in results.items():
    print(table(name, result), end="\n\n")
    tails = [tail_losses(r["losses"]) for r in result["variants"]["full precision"]["runs"]]
    print("convergence: full-precision mean training loss over the second-to-last and the last 10% of steps, "
          "per seed: " + ", ".join(f"{before:.3g} -> {last:.3g}" for before, last in tails))
    print("most sensitive residuals at initialisation (share of predicted variance at 2 bits): " +
          ", ".join(f"{r['name']} {100 * r['share_of_variance_at_2_bits']:.0f}%" for r in result["sensitivity"][:3]),
          end="\n\n")
    for miss in result["missed_targets"]:
      print(f"TARGET MISSED {name}: {miss}")
    if "diagnosis" in result:
      print(diagnosis_text(name, result), end="\n\n")
  print(f"training wall time {', '.join(f'{n} {s / 60:.1f} min' for n, s in report['task_seconds'].items())}; "
        f"wrote {out / 'accuracy.json'}, {', '.join(map(str, paths))}")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="short runs of smaller tasks")
  parser.add_argument("--tasks", nargs="+", choices=("digits", "text", "graph"), default=["digits", "text", "graph"])
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  parser.add_argument("--checkpoints", type=int, default=5, help="noise measurements per run, besides the first")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/accuracy"))
  parser.add_argument("--report", nargs="+", type=pathlib.Path, metavar="JSON",
                      help="train nothing: merge the tasks of these accuracy.json files (e.g. one run per "
                           "task) into --out, plot and print them")
  args = parser.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  if args.report:
    reports = [json.loads(path.read_text()) for path in args.report]
    merged = {**reports[0], "command": [r["command"] for r in reports], "tasks": {}, "task_seconds": {}}
    for r in reports:
      merged["tasks"].update(r["tasks"])
      merged["task_seconds"].update(r["task_seconds"])
    summarise(merged, args.out)
    return 0
  selected = {name: task for name, task in make_tasks(args.small).items() if name in args.tasks}
  total = sum(task.steps for task in selected.values()) * len(VARIANTS) * len(args.seeds)
  results, seconds = {}, {}
  report = {"command": " ".join(["python benchmarks/accuracy.py"] + (argv if argv is not None else sys.argv[1:])),
            "backend": jax.default_backend(), "jact": jact.__version__, "seeds": args.seeds,
            "targets_points": TARGETS, "task_seconds": seconds, "tasks": results}
  with tqdm(total=total, unit="step", disable=None) as bar:
    for name, task in selected.items():
      task_start = time.perf_counter()
      results[name] = run_task(task, args.seeds, args.checkpoints, bar)
      seconds[name] = time.perf_counter() - task_start
      (args.out / "accuracy.json").write_text(json.dumps(report, indent=1))  # each finished task
  summarise(report, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
