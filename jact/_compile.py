"""Compiling each compressed layer once per network instead of once per call.

XLA inlines every function call into its caller before optimising, so a network whose 50 layers
each quantise two residuals compiles the codec 100 times: compressed steps compiled 5-13x slower
than uncompressed ones. `shared_jit` marks a function for late inlining (`jax.Inline.XLA_LATE`);
XLA:CPU (jax 0.12) then keeps it as one called computation, optimised and compiled once for all
its calls. jact uses it for each plan's forward and backward rule (_schedule.py): a layer's
codec work still fuses with the layer's own computation, but nothing fuses across the call
boundary, which costs some step time on CPU (16-layer MLP, 2 bits: about 5% over the early-inlined
form; sharing the codec functions themselves as well cost 15%, so they are inlined early).

XLA's SPMD partitioner does not see through such calls (it replicates their operands, adding
all-gathers), so with more than one device the function is called as it is, inlined. Setting the
environment variable JACT_LATE_INLINING=0 (or `jact._compile.LATE_INLINING = False` before
tracing) uses it everywhere.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import jax

LATE_INLINING = os.environ.get("JACT_LATE_INLINING", "1") != "0"


def single_device() -> bool:
  """Whether this process sees one device: then no SPMD partitioner will rewrite what is traced."""
  return jax.device_count() == 1


def shared_jit(fun: Callable) -> Callable:
  """`fun`, jitted with late inlining when this process sees a single device (and sharing is on)."""
  late = jax.jit(fun, inline=jax.Inline.XLA_LATE)

  @functools.wraps(fun)
  def call(*args, **kwargs):
    return (late if LATE_INLINING and single_device() else fun)(*args, **kwargs)

  return call
