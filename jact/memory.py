"""Compiled memory of a jitted step: what decides whether a batch fits, and what fills it.

XLA, not Python, decides when buffers die, so the sum of residual bytes says little about the
peak. `compiled` asks the compiler: it lowers and compiles the step (abstract shapes suffice, so
a large model at a large batch can be measured on a small machine) and reads its
`memory_analysis()`.

`at_peak` says what fills the scratch block: it compiles the step with XLA's dumps on and reads
its buffer assignment (where in the preallocated scratch block each value lives) and live ranges
(from which to which instruction of the schedule), and returns the buffers alive at the point of
the schedule with the most bytes in use, each with the operation that made it (its JAX name
scope: which layer, and whether it is jact's codec). `alive_at_peak` reads dumps that a
compilation has already written (`dump_options`). These read XLA's text dumps as XLA:CPU and
XLA:GPU write them in jax 0.12; where a version dumps differently, they say so rather than guess.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import tempfile
from typing import Any, Callable, NamedTuple

import jax

from jact import targets
from jact.info import format_bytes


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
  """Bytes of one compiled executable, from XLA's memory analysis.

  Attributes:
    temp: scratch buffers alive during the step (activations, residuals, workspaces); this is
      what compression reduces.
    argument: input buffers (parameters, optimizer state, the batch).
    output: output buffers.
    alias: outputs that reuse (donated) input buffers; counted in both of the above.
    generated_code: size of the compiled code.
  """
  temp: int
  argument: int
  output: int
  alias: int
  generated_code: int

  @property
  def peak(self) -> int:
    """Upper bound on the step's device memory: arguments, outputs and temporaries at once."""
    return self.argument + self.output - self.alias + self.temp

  def __str__(self) -> str:
    return (f"temp {format_bytes(self.temp)}, argument {format_bytes(self.argument)}, "
            f"output {format_bytes(self.output)}, alias {format_bytes(self.alias)}, "
            f"peak {format_bytes(self.peak)}")


def compiled(fn: Callable, *args: Any, target: str = "cpu", **kwargs: Any) -> CompiledMemory:
  """Compiles `fn` for these arguments and returns its memory analysis.

  Args:
    fn: a function, or an already jitted one (its own `static_argnums`, shardings and donation are
      then used).
    *args, **kwargs: pytrees of arrays or `jax.ShapeDtypeStruct`s (no data is needed). For a
      function that is not jitted yet, leaves that are not arrays (an Equinox module's activation
      functions and flags, Python numbers) are passed as they are, as `eqx.filter_jit` does.
    target: "cpu" (this process's default backend), "h100" or "h200" (XLA:GPU compiling for that
      card without one: the figure that decides whether a batch fits there; needs
      `pip install 'jax-act[gpu-compile]'`, see `jact.targets`), or another GPU's target
      description (its text, or a path to a `.txtpb` file).

  Returns:
    A `CompiledMemory`; `temp` is the figure that falls when residuals are compressed.
  """
  if hasattr(fn, "lower"):
    analysis = targets.compile_for(fn, target, *args, **kwargs).memory_analysis()
  else:
    jitted, arrays = _jit_of_arrays(fn, args, kwargs)
    analysis = targets.compile_for(jitted, target, *arrays).memory_analysis()
  if analysis is None:
    raise RuntimeError(f"the {target} compiler reports no memory analysis for this executable.")
  return CompiledMemory(temp=int(analysis.temp_size_in_bytes),
                        argument=int(analysis.argument_size_in_bytes),
                        output=int(analysis.output_size_in_bytes),
                        alias=int(analysis.alias_size_in_bytes),
                        generated_code=int(analysis.generated_code_size_in_bytes))


def _jit_of_arrays(fn: Callable, args: tuple, kwargs: dict) -> tuple[Callable, list]:
  """`jax.jit` of `fn` as a function of the array leaves of its arguments alone (arrays and
  `jax.ShapeDtypeStruct`s), the other leaves (Python numbers too) closed over, returning the array
  leaves of its result; and those array leaves."""
  leaves, tree = jax.tree.flatten((args, kwargs))
  traced = [hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves]

  def call(*arrays):
    arrays, others = iter(arrays), iter(x for x, t in zip(leaves, traced) if not t)
    call_args, call_kwargs = jax.tree.unflatten(tree, [next(arrays) if t else next(others) for t in traced])
    return [x for x in jax.tree.leaves(fn(*call_args, **call_kwargs)) if isinstance(x, jax.Array)]

  return jax.jit(call), [x for x, t in zip(leaves, traced) if t]


class Buffer(NamedTuple):
  """A place in the scratch block that is in use at the peak (`AliveAtPeak.buffers`).

  Values that share a place -- a loop's carry and its body's parameter, an in-place update -- are
  one buffer, counted once.

  Attributes:
    size: bytes.
    offset: where the place starts in the scratch block.
    names: the HLO values in it whose lives touch its range, those alive at the peak first.
    start: the first step of the schedule at which one of those alive at the peak is alive.
    end: the last such step.
  """
  size: int
  offset: int
  names: list[str]
  start: int
  end: int


@dataclasses.dataclass(frozen=True)
class AliveAtPeak:
  """What is alive when a compiled executable holds the most scratch memory, from XLA's dumps.

  Attributes:
    temp: bytes of the preallocated scratch block (the compiled temp bytes: what must fit); 0
      when XLA fused everything and needs no block.
    alive: the most bytes in use at one point of the schedule; `temp - alive` is space that XLA's
      packing leaves unused.
    peak_step: that point, as an index into `sequence`.
    peak_instruction: the HLO instruction scheduled there.
    buffers: the `Buffer`s in use there, largest first; their sizes sum to `alive`.
    op_names: HLO instruction name -> the `op_name` of its metadata (JAX's name scope). A loop
      body that layers share carries the first layer's name.
    sequence: step -> HLO instruction name, the executable's schedule.
  """
  temp: int
  alive: int
  peak_step: int
  peak_instruction: str
  buffers: list[Buffer]
  op_names: dict[str, str]
  sequence: dict[int, str]

  def made_by(self, buffer: Buffer) -> str:
    """What made `buffer`: the op name of the first of its values that has one (a loop's carry
    is named after the loop's parameter), else its first value's HLO name."""
    known = [self.op_names[n.split("{")[0]] for n in buffer.names if n.split("{")[0] in self.op_names]
    return known[0] if known else buffer.names[0]

  def __str__(self) -> str:
    return (f"temp {format_bytes(self.temp)}, most alive at once {format_bytes(self.alive)} at "
            f"{self.peak_instruction} (step {self.peak_step} of {len(self.sequence)}), "
            f"{len(self.buffers)} buffers")


def dump_options(directory: str | os.PathLike) -> dict[str, Any]:
  """Compiler options that make XLA write the text dumps `alive_at_peak` reads to `directory`:
  pass them as `jitted.lower(...).compile(compiler_options=dump_options(directory))`."""
  return {"xla_dump_to": str(directory), "xla_dump_hlo_as_text": True}


def at_peak(fn: Callable, *args: Any, target: str = "cpu", **kwargs: Any) -> AliveAtPeak:
  """Compiles `fn` for these arguments with XLA's dumps on and returns what is alive at its peak.

  Args:
    fn: a function, or an already jitted one (its own `static_argnums`, shardings and donation are
      then used). Lowering happens here, so call it inside any mesh context that `fn` needs.
    *args, **kwargs: arrays or `jax.ShapeDtypeStruct`s (no data is needed).
    target: as in `compiled`.

  Returns:
    An `AliveAtPeak`: the scratch block's size, the most bytes alive at once, and the buffers
    alive then with `made_by` to name each.
  """
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  with tempfile.TemporaryDirectory() as directory:
    targets.compile_for(jitted, target, *args, compiler_options=dump_options(directory), **kwargs)
    return alive_at_peak(directory)


def _dump(directory: str | os.PathLike, suffix: str) -> str:
  files = sorted(pathlib.Path(directory).glob(f"*after_optimizations{suffix}"), key=lambda p: p.stat().st_size)
  if not files:
    raise RuntimeError(f"XLA wrote no '*after_optimizations{suffix}' to {directory}: this backend or "
                       "version dumps differently.")
  return files[-1].read_text()  # the step's module is the largest


def alive_at_peak(directory: str | os.PathLike) -> AliveAtPeak:
  """Reads the dumps of one compilation: the scratch block, the schedule point with the most bytes
  alive, and the buffers alive there.

  Args:
    directory: where a compilation with `dump_options(directory)` wrote its dumps. Where it holds
      several modules, the largest (the step's) is read.

  Returns:
    An `AliveAtPeak`.

  Raises:
    RuntimeError: the dumps are missing or their format is not the one this reads.
  """
  assignment, live, hlo = (_dump(directory, s) for s in ("-buffer-assignment.txt", "-live-range.txt", ".txt"))
  block = re.search(r"allocation \d+: size (\d+)[^\n]*preallocated-temp:\n((?: value: [^\n]*\n)*)", assignment)
  sequence_part, _, ranges_part = live.partition("BufferLiveRange:")
  if not assignment.startswith("BufferAssignment") or not ranges_part:
    raise RuntimeError("could not read XLA's buffer assignment or live ranges: their format differs.")
  if block is None:  # everything fused: no scratch block
    return AliveAtPeak(temp=0, alive=0, peak_step=0, peak_instruction="-", buffers=[], op_names={}, sequence={})
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
  buffers = []
  for (offset, size), vs in in_use(peak).items():
    start, end = min(a for _, a, _ in vs), max(b for _, _, b in vs)
    names = list(dict.fromkeys([n for n, _, _ in vs] + sharing(offset, size, start, end)))
    buffers.append(Buffer(size, offset, names, start, end))
  buffers.sort(reverse=True)
  return AliveAtPeak(temp=int(block.group(1)), alive=bytes_in_use(peak) if steps else 0, peak_step=peak,
                     peak_instruction=sequence.get(peak, "?"), buffers=buffers, op_names=op_names,
                     sequence=sequence)
