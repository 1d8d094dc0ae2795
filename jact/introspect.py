"""`jact.residuals`: which residuals a differentiated function stores, at which width."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import jax

from jact import _jaxpr, transform
from jact.info import ResidualInfo, ResidualTable


def residuals(fn: Callable, *args: Any, **kwargs: Any) -> ResidualTable:
  """Lists what reverse-mode differentiation of `fn(*args, **kwargs)` keeps for the backward pass.

  Every compressed call (`jact.remat_compress`, compressed Flax modules) reached while tracing
  contributes its residuals, with the width its policy chose and the bytes it stores. Residuals
  that `fn` keeps outside any compressed call follow, at full precision (named `<fn>/...`).
  Nothing is computed: only shapes are traced.

  A compressed call inside a `jax.jit`-wrapped function that was already traced for these shapes
  is not traced again, so it cannot report itself: pass the unjitted function.

  Returns:
    A `ResidualTable` (a list of `ResidualInfo`) that prints as a table with totals.
  """
  fun = inspect.unwrap(fn)  # a jax.jit wrapper would serve inner traces from its cache
  leaves, in_tree = jax.tree.flatten((args, kwargs))

  def flat(*leaves):
    a, k = jax.tree.unflatten(in_tree, leaves)
    return jax.tree.leaves(fun(*a, **k))

  scope = getattr(fun, "__name__", type(fun).__name__)
  config = transform.full_precision_config()
  with transform.collecting_regions() as regions:
    plan = transform.analyse(flat, leaves, [f"arg{i}" for i in range(len(leaves))], scope, config)
  jaxpr = plan.fwd.jaxpr
  outside = [r.info for r in plan.residuals if not _stored_by_jact(jaxpr, r.atom)]
  return ResidualTable([info for region in regions for info in region] + outside)


def _stored_by_jact(jaxpr, atom) -> bool:
  """Whether `atom` is something a compressed call stored (marked while collecting)."""
  if _jaxpr.is_literal(atom):
    return False
  eqn = _jaxpr.producers(jaxpr).get(atom)
  if eqn is None:
    return False
  if eqn.primitive.name == "name":
    return eqn.params.get("name") == transform.STORED_MARK
  for value in eqn.params.values():  # look through jit and other calls
    inner = getattr(value, "jaxpr", value)
    if hasattr(inner, "outvars") and len(inner.outvars) == len(eqn.outvars):
      return _stored_by_jact(inner, inner.outvars[eqn.outvars.index(atom)])
  return False
