"""Small jaxpr utilities: evaluation, dependence analysis, names and scheduling points.

jact evaluates the forward and backward jaxprs of a wrapped function itself (rather than calling
`jax.vjp`'s closures) so that it can place each residual's quantisation right after the residual's
last forward use and each dequantisation right before its first backward use.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from jax._src import source_info_util  # name scopes of equations: how Flax module paths reach residual names
from jax.extend import core as jex

Literal = jex.Literal
Var = jex.Var


def is_literal(atom) -> bool:
  return isinstance(atom, Literal)


def eval_eqn(eqn, invals: Sequence[Any]) -> list[Any]:
  """Binds one equation as jax's own `eval_jaxpr` does, keeping its source info and name scopes."""
  params = eqn.primitive.get_bind_params(eqn.params)
  subfuns = []
  if isinstance(params, tuple):  # older jax: (subfuns, params)
    subfuns, params = params
  name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
  with source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack), eqn.ctx.manager:
    outvals = eqn.primitive.bind(*subfuns, *invals, **params)
  return list(outvals) if eqn.primitive.multiple_results else [outvals]


class Env:
  """Variable -> value map for interpreting a jaxpr."""

  def __init__(self):
    self._values: dict[Var, Any] = {}

  def read(self, atom) -> Any:
    return atom.val if is_literal(atom) else self._values[atom]

  def write(self, var, value) -> None:
    if type(var).__name__ != "DropVar":
      self._values[var] = value


def bind_inputs(jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> Env:
  env = Env()
  for var, value in zip(jaxpr.constvars, consts):
    env.write(var, value)
  for var, value in zip(jaxpr.invars, args):
    env.write(var, value)
  return env


def eval_jaxpr(jaxpr, consts: Sequence[Any], *args) -> list[Any]:
  """Evaluates a jaxpr; `consts` may be tracers of an outer trace."""
  env = bind_inputs(jaxpr, consts, args)
  for eqn in jaxpr.eqns:
    for var, value in zip(eqn.outvars, eval_eqn(eqn, [env.read(v) for v in eqn.invars])):
      env.write(var, value)
  return [env.read(v) for v in jaxpr.outvars]


def dependence(jaxpr, invar_tags: Sequence[frozenset]) -> dict[Var, frozenset]:
  """For every variable, the union of the tags of the inputs it depends on.

  An equation's outputs are taken to depend on all of its inputs (conservative for equations
  with sub-jaxprs). Constvars carry no tag.
  """
  deps: dict[Var, frozenset] = {v: frozenset() for v in jaxpr.constvars}
  deps.update(zip(jaxpr.invars, invar_tags))
  for eqn in jaxpr.eqns:
    tags = frozenset().union(*(deps.get(v, frozenset()) for v in eqn.invars if not is_literal(v)))
    for v in eqn.outvars:
      deps[v] = tags
  return deps


def producers(jaxpr) -> dict[Var, Any]:
  return {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}


def last_uses(jaxpr) -> dict[Var, int]:
  """Index of the last equation reading each variable (-1 for variables no equation reads)."""
  last: dict[Var, int] = {}
  for i, eqn in enumerate(jaxpr.eqns):
    for v in eqn.invars:
      if not is_literal(v):
        last[v] = i
  return last


def first_uses(jaxpr) -> dict[Var, int]:
  first: dict[Var, int] = {}
  for i, eqn in enumerate(jaxpr.eqns):
    for v in eqn.invars:
      if not is_literal(v):
        first.setdefault(v, i)
  return first


def scope_names(eqn) -> list[str]:
  """The `jax.named_scope` names (Flax module paths among them) an equation was traced under."""
  stack = getattr(eqn.source_info.name_stack, "stack", ())
  return [e.name for e in stack if type(e).__name__ == "Scope"]


def current_scope() -> list[str]:
  """The named scopes active at the caller."""
  stack = getattr(source_info_util.current_name_stack(), "stack", ())
  return [e.name for e in stack if type(e).__name__ == "Scope"]
