"""Trace-time context: settings that reach every compressed call traced inside a `with` block.

They act when a compressed function is *traced*: a `jax.jit` function that was already traced
keeps what it saw then, so jit (or re-jit) the step inside the block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Iterator

from jact import policies

_state = threading.local()


@dataclasses.dataclass
class Probe:
  """What the sensitivity pass asks of compressed calls: keep residuals at full precision,
  report their values, and add `deltas` to them in the backward pass.

  Residuals are keyed by (name, occurrence): the k-th traced residual with that name.
  """
  deltas: dict[tuple[str, int], Any] = dataclasses.field(default_factory=dict)
  captured: dict[tuple[str, int], Any] = dataclasses.field(default_factory=dict)
  counts: dict[str, int] = dataclasses.field(default_factory=dict)

  def key(self, name: str) -> tuple[str, int]:
    k = self.counts.get(name, 0)
    self.counts[name] = k + 1
    return name, k


@dataclasses.dataclass
class _State:
  policy: Any = None
  regions: list | None = None
  probe: Probe | None = None
  enclosed: bool = False  # traced to be analysed by an enclosing compressed call or jact.residuals


def current() -> _State:
  if not hasattr(_state, "value"):
    _state.value = _State()
  return _state.value


@contextlib.contextmanager
def _replaced(**changes) -> Iterator[_State]:
  state = current()
  previous = dataclasses.replace(state)
  for name, value in changes.items():
    setattr(state, name, value)
  try:
    yield state
  finally:
    _state.value = previous


@contextlib.contextmanager
def use_policy(policy) -> Iterator[None]:
  """Every compressed call traced in this block uses `policy` instead of its own.

  This is how a bit table that arrives after a model was built (`jact.calibrate`) reaches it:

      policy = jact.calibrate(loss_fn, params, probe_batch, avg_bits=2)

      @functools.partial(jax.jit, static_argnames="policy")
      def train_step(state, batch, policy=None):
        with jact.use_policy(policy):   # applies while the step is traced
          ...

      state = train_step(state, batch, policy=policy)   # a new policy retraces the step

  `jax.jit` traces at the first call, not where it is applied: a `use_policy` block around
  `jax.jit(f)`, or around the call of an already-traced function, does not change its bits.

  Args:
    policy: anything `bits=` accepts (an int or a policy), or None to restore each call's own.
  """
  with _replaced(policy=None if policy is None else policies.resolve(policy)):
    yield


@contextlib.contextmanager
def collecting() -> Iterator[list]:
  """Each compressed call traced in this block appends its residual table to the yielded list."""
  with _replaced(regions=[]) as state:
    yield state.regions


@contextlib.contextmanager
def collecting_nothing() -> Iterator[None]:
  with _replaced(regions=None):
    yield


@contextlib.contextmanager
def enclosed() -> Iterator[None]:
  """Compressed calls traced in this block are parts of an enclosing compressed call (or of a
  function `jact.residuals` describes): they hand their backward pass no inputs for exact
  second-order derivatives, which the enclosing call computes itself (see `jact._vjp`)."""
  with _replaced(enclosed=True):
    yield


@contextlib.contextmanager
def probing(probe: Probe) -> Iterator[Probe]:
  with _replaced(probe=probe):
    yield probe
