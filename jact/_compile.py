"""Compiling each compressed layer once per network instead of once per call.

XLA inlines every function call into its caller before optimising, so a network whose 50 layers
each quantise two residuals compiles the codec 100 times: compressed steps compiled 5-13x slower
than uncompressed ones. `shared_jit` marks a function for late inlining (`jax.Inline.XLA_LATE`);
XLA:CPU (jax 0.12) then keeps it as one called computation, optimised and compiled once for all
its calls. jact uses it for each plan's forward and backward rule (transform.py): a layer's
codec work still fuses with the layer's own computation, but nothing fuses across the call
boundary, which costs some step time on CPU (16-layer MLP, 2 bits: about 5% over the early-inlined
form; sharing the codec functions themselves as well cost 15%, so they are inlined early).

XLA's SPMD partitioner does not see through such calls (it replicates their operands, adding
all-gathers), so with more than one device the plain, early-inlined form is used. Setting the
environment variable JACT_LATE_INLINING=0 (or `jact._compile.LATE_INLINING = False` before
tracing) uses it everywhere.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import jax

LATE_INLINING = os.environ.get("JACT_LATE_INLINING", "1") != "0"


def shared_jit(fun: Callable, jit_otherwise: bool = True, **jit_options) -> Callable:
  """`jax.jit(fun, **jit_options)`, shared by all its call sites until late inlining when this
  process sees a single device; with more devices the plain jit, or `fun` itself if not
  `jit_otherwise`."""
  early = jax.jit(fun, **jit_options) if jit_otherwise else fun
  late = jax.jit(fun, inline=jax.Inline.XLA_LATE, **jit_options)

  @functools.wraps(fun)
  def call(*args, **kwargs):
    return (late if LATE_INLINING and jax.device_count() == 1 else early)(*args, **kwargs)

  return call
