"""Which buffers are alive when a compiled gradient step holds the most memory, from XLA itself.

  python benchmarks/where_memory_goes.py gcn 2           # GCN at ogbn-arxiv size, jact 2 bits
  python benchmarks/where_memory_goes.py bert_large baseline --top 30

Compiles the step of `benchmarks/memory.py` (abstract shapes: nothing runs) with XLA's dumps on,
then reads XLA's buffer assignment (where in its preallocated scratch block each value lives) and
live ranges (from which to which instruction of the schedule). Values that share a buffer -- a
loop's carry and its body's parameter, an in-place update -- are counted once, by their place in
the block. It prints:

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
import pathlib
import re
import sys
import tempfile

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import variants as V  # noqa: E402

from jact.info import format_bytes  # noqa: E402


def compile_with_dumps(model: str, variant_key: str, size: str, directory: str):
  spec = V.spec_for(model, V.VARIANTS_BY_KEY[variant_key], size)
  batch = V.PAPER_MODELS[model] if size == "paper" else 4
  params, state = spec.abstract_init(batch)
  lowered = jax.jit(V.gradient_step(spec)).lower(params, state, spec.input_shapes(batch), V.rng_key())
  return lowered.compile(compiler_options={"xla_dump_to": directory, "xla_dump_hlo_as_text": True})


def _dump(directory: str, suffix: str) -> str:
  files = sorted(pathlib.Path(directory).glob(f"*after_optimizations{suffix}"), key=lambda p: p.stat().st_size)
  if not files:
    raise RuntimeError(f"XLA wrote no '*after_optimizations{suffix}' to {directory}: this backend or "
                       "version dumps differently.")
  return files[-1].read_text()  # the step's module is the largest


def alive_at_peak(directory: str) -> dict:
  """Parses the dumps: the scratch block, the schedule point with the most bytes alive, and the
  buffers (offset, size, names of the values in it) alive there."""
  assignment, live, hlo = (_dump(directory, s) for s in ("-buffer-assignment.txt", "-live-range.txt", ".txt"))
  block = re.search(r"allocation \d+: size (\d+)[^\n]*preallocated-temp:\n((?: value: [^\n]*\n)*)", assignment)
  sequence_part, _, ranges_part = live.partition("BufferLiveRange:")
  if not assignment.startswith("BufferAssignment") or not ranges_part:
    raise RuntimeError("could not read XLA's buffer assignment or live ranges: their format differs.")
  if block is None:  # everything fused: no scratch block
    return {"temp": 0, "peak_step": 0, "peak_instruction": "-", "alive": 0, "buffers": [], "op_names": {},
            "sequence": {}}
  sequence = dict((int(i), name) for i, name in re.findall(r"^\s+(\d+):(\S+)$", sequence_part, re.M))
  ranges = {name + ("" if index in ("", "{}") else index): (int(a), int(b)) for name, index, a, b in
            re.findall(r"^\s+(\S+?)(\{[^}]*\})?:(\d+)-(\d+)$", ranges_part.split("Live ranges at")[0], re.M)}
  values = [(name, int(size), int(offset)) for name, size, offset in
            re.findall(r"value: <\d+ (\S+?)(?: \(phi\))? @\d+> \(size=(\d+),offset=(\d+)\)", block.group(2))]
  op_names = dict(re.findall(r"^\s*(?:ROOT )?%(\S+) = .*?op_name=\"([^\"]*)\"", hlo, re.M))
  live_values = [(name, size, offset) + ranges[name] for name, size, offset in values if name in ranges]
  steps = max(sequence, default=-1) + 1

  def in_use(t: int) -> dict[tuple[int, int], list]:
    """(offset, size) -> the values there at step t: values sharing a place at once share a buffer."""
    places: dict[tuple[int, int], list] = {}
    for name, size, offset, start, end in live_values:
      if start <= t <= end:
        places.setdefault((offset, size), []).append((name, start, end))
    return places

  def bytes_in_use(t: int) -> int:  # the union of the places in use (nested places count once)
    total, reach = 0, 0
    for offset, size in sorted(in_use(t)):
      total += max(0, offset + size - max(offset, reach))
      reach = max(reach, offset + size)
    return total

  def sharing(offset: int, size: int, start: int, end: int) -> list[str]:
    """Values in the same place whose lives touch [start, end] (a loop carry's chain: its
    initial value, the body's parameter, the update, the loop's result)."""
    return [name for name, s, o, a, b in live_values if (o, s) == (offset, size) and a <= end + 1 and b >= start - 1]

  peak = max(range(steps), key=bytes_in_use) if steps else 0
  at_peak = []
  for (offset, size), vs in in_use(peak).items():
    start, end = min(a for _, a, _ in vs), max(b for _, _, b in vs)
    names = list(dict.fromkeys([n for n, _, _ in vs] + sharing(offset, size, start, end)))
    at_peak.append((size, offset, names, start, end))
  at_peak.sort(reverse=True)
  return {"temp": int(block.group(1)), "peak_step": peak, "peak_instruction": sequence.get(peak, "?"),
          "alive": bytes_in_use(peak) if steps else 0, "buffers": at_peak, "op_names": op_names, "sequence": sequence}


def made_by(report: dict, names: list[str]) -> str:
  """What made a buffer of `alive_at_peak`'s report: the first of its values with an op name (a
  loop's carry is named after the loop's parameter), else its first value's name."""
  known = [report["op_names"][n.split("{")[0]] for n in names if n.split("{")[0] in report["op_names"]]
  return known[0] if known else names[0]


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
        f"most alive at once {format_bytes(report['alive'])} ({report['alive'] / temp:.0%}), at "
        f"{report['peak_instruction']} (step {report['peak_step']} of {len(report['sequence'])})")
  print(f"{'size':>11}  {'offset':>11}  {'alive':>11}  made by")
  for size, offset, names, start, end in report["buffers"][:args.top]:
    print(f"{format_bytes(size):>11}  {format_bytes(offset):>11}  {start:>5}-{end:<5}  {made_by(report, names)[-90:]}")
  rest = report["buffers"][args.top:]
  if rest:
    print(f"{'':>11}  {'':>11}  {'':>11}  ... {len(rest)} more, {format_bytes(sum(b[0] for b in rest))}")


if __name__ == "__main__":
  main()
