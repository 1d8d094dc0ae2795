"""Which buffers are alive when a compiled gradient step holds the most memory, from XLA itself.

  python benchmarks/investigations/where_memory_goes.py gcn 2           # GCN at ogbn-arxiv size, jact 2 bits
  python benchmarks/investigations/where_memory_goes.py bert_large baseline --top 30

Compiles the step of `benchmarks/memory.py` (abstract shapes: nothing runs) with XLA's dumps on,
then reads them with `jact.memory.alive_at_peak`: XLA's buffer assignment (where in its
preallocated scratch block each value lives) and live ranges (from which to which instruction of
the schedule). Values that share a buffer -- a loop's carry and its body's parameter, an in-place
update -- are counted once, by their place in the block. It prints:

* the compiled temp bytes (the scratch block: what must fit);
* the most bytes alive at one point of the schedule, and where; the difference is space XLA's
  packing leaves unused;
* the buffers alive at that point, largest first, with the operation that made each (its name
  scope: which layer, and whether it is jact's codec).

Names come from XLA's metadata: a loop body that layers share carries the first layer's name.
Reads XLA:CPU's text dumps (jax 0.12); on another backend or version their format may differ, and
the script says so rather than guess.
"""

from __future__ import annotations

import argparse
import tempfile

import jax

from jact.info import format_bytes
from jact.memory import alive_at_peak, dump_options
from jact.models import variants as V


def compile_with_dumps(model: str, variant_key: str, size: str, directory: str):
  spec = V.spec_for(model, V.VARIANTS_BY_KEY[variant_key], size)
  batch = V.PAPER_MODELS[model] if size == "paper" else 4
  params, state = spec.abstract_init(batch)
  lowered = jax.jit(V.gradient_step(spec)).lower(params, state, spec.input_shapes(batch), V.rng_key())
  return lowered.compile(compiler_options=dump_options(directory))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("model", choices=sorted(V.PAPER_MODELS))
  parser.add_argument("variant", choices=sorted(V.VARIANTS_BY_KEY))
  parser.add_argument("--small", action="store_true", help="the tiny test size at batch 4 instead of the paper's")
  parser.add_argument("--top", type=int, default=20, help="buffers to list")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as directory:
    compiled = compile_with_dumps(args.model, args.variant, "tiny" if args.small else "paper", directory)
    report = alive_at_peak(directory)
  temp = compiled.memory_analysis().temp_size_in_bytes
  print(f"{args.model}, {V.VARIANTS_BY_KEY[args.variant].name}: compiled temp {format_bytes(temp)}; "
        f"most alive at once {format_bytes(report.alive)} ({report.alive / temp:.0%}), at "
        f"{report.peak_instruction} (step {report.peak_step} of {len(report.sequence)})")
  print(f"{'size':>11}  {'offset':>11}  {'alive':>11}  made by")
  for buffer in report.buffers[:args.top]:
    print(f"{format_bytes(buffer.size):>11}  {format_bytes(buffer.offset):>11}  {buffer.start:>5}-{buffer.end:<5}  "
          f"{report.made_by(buffer)[-90:]}")
  rest = report.buffers[args.top:]
  if rest:
    print(f"{'':>11}  {'':>11}  {'':>11}  ... {len(rest)} more, {format_bytes(sum(b.size for b in rest))}")


if __name__ == "__main__":
  main()
