"""`jact.residuals`: which residuals a differentiated function stores, at which width."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Sequence

import jax

from jact import _context, _jaxpr
from jact._classify import STORED_MARK
from jact._plan import analyse, full_precision_options
from jact.info import ResidualInfo, ResidualTable


def residuals(fn: Callable, *args: Any, keep_argnums: Sequence[int] = (), **kwargs: Any) -> ResidualTable:
  """Lists what reverse-mode differentiation of `fn(*args, **kwargs)` keeps for the backward pass.

  Every compressed call (`jact.remat_compress`, compressed Flax modules) reached while tracing
  contributes its residuals, with the width its policy chose and the bytes it stores. Residuals
  that `fn` keeps outside any compressed call follow, at full precision (named `<fn>/...`).
  Nothing is computed: only shapes are traced, so `jax.ShapeDtypeStruct`s may stand for arrays.

  Args:
    fn: the function that will be differentiated (typically the loss).
    *args, **kwargs: its arguments.
    keep_argnums: positional arguments of `fn` that are parameters: residuals outside compressed
      calls that are these arguments (or computed from them alone) are listed as "parameter", so
      that `ResidualTable.activation_nbytes` counts activations only.

  A compressed call inside a `jax.jit`-wrapped function that was already traced for these shapes
  is not traced again, so it cannot report itself: pass the unjitted function.

  Returns:
    A `ResidualTable` (a list of `ResidualInfo`) that prints as a table with totals.
  """
  # Unwrap jax.jit (its cache would serve inner traces), but not other wrappers: a compressed
  # function's own `__wrapped__` is the uncompressed one.
  fun = inspect.unwrap(fn, stop=lambda f: not hasattr(f, "lower"))
  leaves, in_tree = jax.tree.flatten((args, kwargs))
  kept = [i in keep_argnums for i, a in enumerate(args) for _ in jax.tree.leaves(a)]
  kept += [False] * (len(leaves) - len(kept))

  def flat(*leaves):
    a, k = jax.tree.unflatten(in_tree, leaves)
    return jax.tree.leaves(fun(*a, **k))

  scope = getattr(fun, "__name__", type(fun).__name__)
  with _context.collecting() as regions, _context.enclosed():
    plan = analyse(flat, leaves, kept, [f"arg{i}" for i in range(len(leaves))], scope, full_precision_options())
  jaxpr = plan.fwd.jaxpr
  # Plain JAX stores what it keeps outside compressed calls: nothing there is rebuilt.
  outside = [dataclasses.replace(r.info, recomputed=False) for r in plan.residuals
             if not _jaxpr.named(jaxpr, r.atom, STORED_MARK)]
  return ResidualTable([info for region in regions for info in region] + outside)
