"""The one evaluator that applies every rewrite while it runs a function's jaxpr.

A compressed call runs its traced function through `evaluate`, which replaces, equation by
equation: the elementwise chains found by `chains.find_chains` (one stored derivative each), each
max-pooling (`pooling`: a one-byte argmax instead of the input and output), and any equation given
a rule (a `lax.scan` whose body is compressed step by step, see `jact._loops`). What autodiff then
saves is what these rewrites leave, so they decide which residuals exist at all.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from jact import _jaxpr
from jact.rewrites import chains as chains_lib, pooling


def evaluate(jaxpr, chains: Sequence[chains_lib.Chain], consts: Sequence[Any], *args,
             rules: dict[int, Callable] | None = None) -> list[Any]:
  """Evaluates `jaxpr` with each chain, and each max-pooling, rewritten; `rules` maps equation
  indices to functions that replace them (input values -> output values)."""
  rules = rules or {}
  env = _jaxpr.bind_inputs(jaxpr, consts, args)
  start = {c.members[0]: (k, c) for k, c in enumerate(chains)}
  replaced = {i for c in chains for i in c.members}
  for i, eqn in enumerate(jaxpr.eqns):
    if i in start:
      k, chain = start[i]
      for var, value in zip(chain.outputs, chains_lib.rewrite(jaxpr, chain, k)(env.read(chain.source))):
        env.write(var, value)
    if i in replaced:
      continue
    if i in rules:
      for var, value in zip(eqn.outvars, rules[i]([env.read(v) for v in eqn.invars])):
        env.write(var, value)
    elif pooling.applies(eqn):
      env.write(eqn.outvars[0], pooling.rewrite(eqn)(env.read(eqn.invars[0])))
    else:
      for var, value in zip(eqn.outvars, _jaxpr.eval_eqn(eqn, [env.read(v) for v in eqn.invars])):
        env.write(var, value)
  return [env.read(v) for v in jaxpr.outvars]
