"""Haiku: a clear error where a compressed call would leak tracers into a Haiku transform.

Haiku keeps parameters and state in a frame outside JAX. A compressed function that creates
parameters (`hk.Linear(...)` at init) or writes state (`hk.set_state`, BatchNorm's averages)
inside `hk.transform` would leave values of jact's trace in that frame. Haiku's own transforms
(`hk.remat`, `hk.vmap`) are lifted for this; jact compresses a Haiku model from outside: wrap the
pure function of (params, state, batch) -- see the README's Haiku section.

Haiku is not imported here: only a user who imported it can be inside its transform.
"""

from __future__ import annotations

import sys

import jax


def values_in_frame() -> set[int] | None:
  """The ids of the values in the current Haiku frame, or None outside a Haiku transform."""
  frame = _frame()
  return None if frame is None else {id(v) for v in _values(frame)}


def check_no_leak(before: set[int] | None, name: str) -> None:
  """Raises if tracing a compressed call put traced values into the Haiku frame (`before`: its
  `values_in_frame` before)."""
  frame = _frame()
  if before is None or frame is None:
    return
  if any(isinstance(v, jax.core.Tracer) and id(v) not in before for v in _values(frame)):
    raise TypeError(
        f"{name}: this compressed function creates Haiku parameters or writes Haiku state inside "
        "hk.transform, which would leak jact's traced values into Haiku's frame. Compress the "
        "transformed model from outside instead: wrap the pure function of (params, state, "
        "batch), e.g. jact.remat_compress(loss, keep_argnums=(0, 1)) with loss calling "
        "model.apply (the README's Haiku section).")


def _frame():
  base = sys.modules.get("haiku._src.base")
  if base is None or not base.inside_transform():
    return None
  return base.current_frame()


def _values(frame) -> list:
  return jax.tree.leaves((dict(frame.params), dict(frame.state or {})))
