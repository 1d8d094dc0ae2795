"""Compiled memory of a jitted step: what decides whether a batch fits.

XLA, not Python, decides when buffers die, so the sum of residual bytes says little about the
peak. `compiled` asks the compiler: it lowers and compiles the step (abstract shapes suffice, so
a large model at a large batch can be measured on a small machine) and reads its
`memory_analysis()`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

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


def compiled(fn: Callable, *args: Any, **kwargs: Any) -> CompiledMemory:
  """Compiles `fn` for these arguments and returns its memory analysis.

  Args:
    fn: a function, or an already jitted one (its own `static_argnums`, shardings and donation are
      then used).
    *args, **kwargs: arrays or `jax.ShapeDtypeStruct`s (no data is needed).

  Returns:
    A `CompiledMemory`; `temp` is the figure that falls when residuals are compressed.
  """
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  analysis = jitted.lower(*args, **kwargs).compile().memory_analysis()
  if analysis is None:
    raise RuntimeError(f"the {jax.default_backend()} backend reports no memory analysis for this executable.")
  return CompiledMemory(temp=int(analysis.temp_size_in_bytes),
                        argument=int(analysis.argument_size_in_bytes),
                        output=int(analysis.output_size_in_bytes),
                        alias=int(analysis.alias_size_in_bytes),
                        generated_code=int(analysis.generated_code_size_in_bytes))
