"""Training steps on a GPU: step-time ratios and real peak memory, baseline vs checkpoint vs jact.

  python benchmarks/gpu/steps.py                 # on the GPU: writes $OUT/gpu_steps.json
  python benchmarks/gpu/steps.py --small         # tiny models, a smoke test on any backend

1. step time: ResNet-50 (batch 64, 224x224) and BERT-base (sequence 128, batch 32), one Adam step
   each of: the baseline, `jax.checkpoint` per block, jact 2 bits with the Pallas codec, jact 2
   bits with the XLA codec. Steps of all variants are timed interleaved in one process (median of
   rounds), so the ratios are side by side.
2. peak memory: ResNet-50 (batch 64) and BERT-large (sequence 128, batch 32), baseline vs jact 2
   bits: `device.memory_stats()["peak_bytes_in_use"]` after one real step, each in a fresh
   process (the statistic is per process), beside the GPU compiler's memory analysis.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import jax

import jact
from jact.models import training
from jact.models import variants as V

STEP_MODELS = {"resnet50": 64, "bert_base": 32}
PEAK_MODELS = {"resnet50": 64, "bert_large": 32}
STEP_VARIANTS = {"baseline": V.BASELINE, "checkpoint": V.CHECKPOINT,
                 "jact 2 bits (pallas)": V.Variant("jact 2 bits (pallas)",
                                                   lambda c: jact.compressed(c, bits=2, kernel="pallas"), 2),
                 "jact 2 bits (xla)": V.Variant("jact 2 bits (xla)",
                                                lambda c: jact.compressed(c, bits=2, kernel="xla"), 2)}


def _setup(model: str, variant: V.Variant, batch: int, size: str):
  spec = V.spec_for(model, variant, size)
  step, optimizer = V.train_step(spec)
  key = jax.random.key(0)
  data = spec.make_batch(key, batch)
  params, state = spec.init(key, data)
  return step, [params, state, optimizer.init(params), data, V.rng_key()]


def _advancing(step, args):
  """A call of `step` that carries its parameters, state and optimizer state to the next call."""
  def call():
    *args[:3], loss = step(*args)
    return loss
  return call


def step_times(size: str, batches: dict[str, int], rounds: int, repeats: int) -> dict:
  """Median seconds per step of every variant, timed in alternation."""
  out = {}
  for model, batch in batches.items():
    runs = {name: _setup(model, variant, batch, size) for name, variant in STEP_VARIANTS.items()}
    seconds = training.time_interleaved([_advancing(*run) for run in runs.values()], rounds, repeats)
    base = seconds[list(runs).index("baseline")]
    out[model] = {name: {"seconds": s, "vs baseline": s / base} for name, s in zip(runs, seconds)}
    print(model, {n: round(v["vs baseline"], 3) for n, v in out[model].items()}, flush=True)
  return out


def peak_in_this_process(model: str, variant_key: str, batch: int, size: str) -> dict:
  variant = V.VARIANTS_BY_KEY[variant_key]
  step, args = _setup(model, variant, batch, size)
  compiled = jact.memory.compiled(step, *args)
  jax.block_until_ready(step(*args))
  stats = jax.devices()[0].memory_stats() or {}
  return {"peak_bytes_in_use": stats.get("peak_bytes_in_use"), "compiled_temp": compiled.temp,
          "compiled_peak": compiled.peak}


def peaks(size: str, batches: dict[str, int]) -> dict:
  out = {}
  for model, batch in batches.items():
    for key in ("baseline", "2"):
      command = [sys.executable, __file__, "--peak-child", model, key, str(batch), size]
      result = subprocess.run(command, capture_output=True, text=True, timeout=900)
      record = json.loads(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else {
          "error": result.stderr[-2000:]}
      out[f"{model}/{V.VARIANTS_BY_KEY[key].name}"] = record
      print(model, key, record, flush=True)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--small", action="store_true", help="tiny models at batch 4")
  parser.add_argument("--peak-child", nargs=4, metavar=("MODEL", "VARIANT", "BATCH", "SIZE"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.peak_child:
    model, key, batch, size = args.peak_child
    print(json.dumps(peak_in_this_process(model, key, int(batch), size)))
    return
  size = "tiny" if args.small else "paper"
  shrink = (lambda d: {k: 4 for k in d}) if args.small else (lambda d: d)
  out_dir = pathlib.Path(os.environ.get("OUT", "results"))
  out_dir.mkdir(parents=True, exist_ok=True)
  results = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "small": args.small}
  start = time.perf_counter()
  results["step_time"] = step_times(size, shrink(STEP_MODELS), rounds=3 if args.small else 5,
                                    repeats=2 if args.small else 10)
  results["peak"] = peaks(size, shrink(PEAK_MODELS))
  results["wall_seconds"] = time.perf_counter() - start
  path = out_dir / "gpu_steps.json"
  path.write_text(json.dumps(results, indent=1))
  print(f"{results['wall_seconds']:.0f} s; wrote {path}")


if __name__ == "__main__":
  main()
