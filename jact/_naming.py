"""Distinct, stable residual names for repeated calls of one compressed function.

`for w in ws: x = layer(x, w)` calls one wrapped `layer` several times. Each call's residuals get
their own scope, numbered the way Haiku numbers modules: `layer`, `layer_1`, `layer_2`, ... in the
order the calls are traced, counted per full scope (so a call inside `jax.named_scope("enc")`
counts apart from one outside it) within one traced computation. A traced computation is the
outermost JAX transformation in progress (a `jax.jit`, `jax.grad`, `jax.vmap`, `make_jaxpr`...):
the same program traced again gets the same names, whatever transformations sit inside it, and a
`lax.scan` body is traced once, so calls inside it share the body's names. A call with no
transformation around it (eager, nothing to differentiate) is not numbered. Calibration counts
each probed gradient on its own (`counting_calls`), as it evaluates the loss several times in one
computation.

A function that JAX traces once and then serves from its cache (an inner `jax.jit` called again
with the same shapes) keeps the names it was traced with: its calls are not counted again.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import weakref
from typing import Iterator

from jax._src import core

_per_computation: "weakref.WeakKeyDictionary[object, collections.Counter]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_frames = threading.local()


def numbered(scope: str) -> str:
  """`scope` for the next call with that scope in the current computation: `scope` for the first,
  `scope_<n>` for the n-th after it."""
  counts = _counts()
  if counts is None:
    return scope
  with _lock:
    n = counts[scope]
    counts[scope] = n + 1
  return scope if n == 0 else f"{scope}_{n}"


@contextlib.contextmanager
def counting_calls() -> Iterator[None]:
  """Calls traced in this block are numbered from the start, apart from the enclosing computation."""
  stack = _stack()
  stack.append(collections.Counter())
  try:
    yield
  finally:
    stack.pop()


def _stack() -> list:
  if not hasattr(_frames, "stack"):
    _frames.stack = []
  return _frames.stack


def _counts() -> collections.Counter | None:
  stack = _stack()
  if stack:
    return stack[-1]
  root = _outermost_trace()
  if root is None:
    return None
  with _lock:
    counts = _per_computation.get(root)
    if counts is None:
      counts = _per_computation[root] = collections.Counter()
  return counts


def _outermost_trace():
  """The outermost transformation being traced (the trace just above evaluation), or None."""
  trace = core.trace_ctx.trace
  if isinstance(trace, core.EvalTrace):
    return None
  while (parent := getattr(trace, "parent_trace", None)) is not None and not isinstance(parent, core.EvalTrace):
    trace = parent
  return trace


@contextlib.contextmanager
def calling(scope: str) -> Iterator[None]:
  """While a compressed call with `scope` traces its function (see `caller_scope`)."""
  stack = getattr(_frames, "calls", None)
  if stack is None:
    stack = _frames.calls = []
  stack.append(scope)
  try:
    yield
  finally:
    stack.pop()


def caller_scope() -> str:
  """The scope of the compressed call whose function is being traced."""
  stack = getattr(_frames, "calls", None)
  if not stack:
    raise RuntimeError("jact internal error: a call that takes its caller's scope was traced outside one.")
  return stack[-1]
