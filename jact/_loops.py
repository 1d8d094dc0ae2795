"""Loops compressed step by step: a `lax.scan` whose body is a compressed call of its own.

Autodiff of a `lax.scan` stacks each step's residuals over the steps, at full precision, before
jact sees them: an RNN or layers under `nn.scan` would keep the whole stack. When a plan finds
such stacked activations, the loop is run as `lax.scan` over its body wrapped like a compressed
call (`loop_with_compressed_body`), so that each step quantises its own residuals and the loop
stacks codes. This module builds those loop rules, decides what the residual table lists for
them, and warns about loops that still stack full-precision residuals.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jact import _context, _jaxpr, codec, info as info_lib
from jact._classify import InputKind
from jact._options import Options
from jact.codec import hashing
from jact.info import Kept, ResidualInfo


def loop_rules(fun_jaxpr, kinds: Sequence[InputKind], scope: str, options: Options,
               trace_body: Callable) -> dict[int, Callable]:
  """For each `lax.scan` of `fun_jaxpr` that activations flow through: a function that runs it
  with its body compressed on its own (equation index -> (seed, input values) -> output values).

  `trace_body(jaxpr, num_consts, kinds, labels, scope, options)` traces a body as a compressed
  call (`jact._vjp.traced_for`).
  """
  if not any(eqn.primitive.name == "scan" for eqn in fun_jaxpr.eqns):
    return {}
  deps = _jaxpr.dependence(fun_jaxpr, [frozenset({k}) for k in kinds])
  rules = {}
  for i, eqn in enumerate(fun_jaxpr.eqns):
    if eqn.primitive.name == "scan" and not eqn.effects:
      tags = _jaxpr.scan_input_dependence(
          eqn, [frozenset() if _jaxpr.is_literal(v) else deps.get(v, frozenset()) for v in eqn.invars])
      if any(InputKind.COMPRESSIBLE in t for t in tags):
        rules[i] = loop_with_compressed_body(eqn, tags, f"{scope}/loop{len(rules)}", options, trace_body)
  return rules


def loop_with_compressed_body(eqn, tags: Sequence[frozenset], scope: str, options: Options,
                              trace_body: Callable) -> Callable:
  """Runs a scan as `lax.scan` over its body wrapped like a compressed call: each step quantises
  its own residuals, so the loop stacks codes, not full-precision values.

  The body's inputs: the loop's constants are kept (parameters, or activations that the enclosing
  call stores itself); carry and scanned-over arrays are compressible when an activation flows
  into them, parameters when only parameters do (layers under `nn.scan`), index inputs when they
  are integers, and otherwise floats that carry no gradient (a graph's edge weights), which the
  body is not differentiated by -- else it would store what their gradient needs. Each step's
  rounding seed is a hash of the step number and the enclosing call's seed. `min_size` applies to
  what the loop keeps of a residual, all its steps: a body's residual counts `length` times.
  """
  closed = eqn.params["jaxpr"]
  length = eqn.params["length"]
  options = dataclasses.replace(options, min_size=-(-options.min_size // max(1, length)))
  positions = _jaxpr.scan_positions(eqn)
  kinds = [_body_input_kind(k in positions.consts, var, t) for k, (var, t) in enumerate(zip(eqn.invars, tags))]
  labels = [f"closure{j}" for j in range(len(closed.consts))] + [f"in{k}" for k in range(len(eqn.invars))]
  traced = trace_body(closed.jaxpr, len(closed.consts), [InputKind.KEPT] * len(closed.consts) + kinds, labels,
                      scope, options)
  carry, xs = positions.carry, positions.xs

  def run(seed: jax.Array, invals: list[Any]) -> list[Any]:
    loop_seed = hashing.fmix32(seed ^ np.uint32(0x632BE5AB))

    def step(carried, sliced):
      index, sliced = sliced
      inputs = list(invals)
      for k, value in zip(carry + xs, list(carried) + list(sliced)):
        inputs[k] = value
      call = traced.call if _context.current().probe is None else traced.call_exposing
      outs = call(hashing.fmix32(index ^ loop_seed), list(closed.consts) + inputs)
      return outs[:len(carry)], outs[len(carry):]

    steps = jnp.arange(length, dtype=jnp.uint32)
    carried, stacked = jax.lax.scan(step, [invals[k] for k in carry], (steps, [invals[k] for k in xs]),
                                    length=length, reverse=eqn.params["reverse"], unroll=eqn.params["unroll"])
    return list(carried) + list(stacked)

  run.body, run.length = traced, length  # for the residual table (`table_with_loop_bodies`)
  return run


def _body_input_kind(is_constant: bool, var, tags: frozenset) -> InputKind:
  if is_constant:
    return InputKind.KEPT
  if not jnp.issubdtype(var.aval.dtype, jnp.inexact):
    return InputKind.INDEX
  if InputKind.COMPRESSIBLE in tags:
    return InputKind.COMPRESSIBLE
  return InputKind.KEPT if InputKind.KEPT in tags else InputKind.FIXED


@dataclasses.dataclass(frozen=True)
class LoopBodyWidth:
  """The policy of a loop body whose enclosing policy names only the residuals as the loop would
  stack them (`<scope>/scan0`): `width` for what that policy keeps at full precision."""
  policy: Any
  width: int

  def __call__(self, info: ResidualInfo) -> int:
    bits = codec.check_bits(self.policy(info))
    return self.width if bits == 32 else bits


def stacked_by_loops(infos: Sequence[ResidualInfo]) -> list[ResidualInfo]:
  """Compressed residuals that a loop stacks at full precision before they are compressed."""
  return [r for r in infos if r.stacked_by_loop and r.compressed and not r.recomputed]


def stacked_activations(infos: Sequence[ResidualInfo]) -> list[ResidualInfo]:
  """Activations a loop stacks that jact would compress under some width."""
  return [r for r in infos if r.stacked_by_loop and not r.recomputed and r.sized_by_policy]


def _body_rows(rules: dict) -> list[ResidualInfo]:
  """The residuals of the loop bodies of `rules`, as last traced."""
  return [r for rule in rules.values() if rule.body.last_plan is not None for r in rule.body.last_plan.infos]


def bodies_compress(rules: dict) -> bool:
  """Whether the loop bodies compress any residual."""
  return any(r.compressed for r in _body_rows(rules))


def bodies_unsized(rules: dict) -> bool:
  """Whether the policy left at full precision a residual of the loop bodies that it could compress."""
  return any(r.sized_by_policy and not r.compressed and not r.recomputed for r in _body_rows(rules))


def warn_of_loop_stacks(scope: str, stacked: Sequence[ResidualInfo]) -> None:
  if stacked:
    warnings.warn(
        f"{scope}: {len(stacked)} residuals ({info_lib.format_bytes(sum(r.nbytes for r in stacked))}) are "
        f"stacked over the steps of a lax.scan at full precision before they are compressed "
        f"({', '.join(r.name for r in stacked[:3])}{', ...' if len(stacked) > 3 else ''}), so the peak "
        "falls little or not at all. jact compresses a loop step by step unless its body has effects "
        "(a callback) or keeps every residual (all below min_size, or nonlinear in the backward "
        "pass); jact.compressed on the module that nn.scan or nn.RNN repeats, or "
        "jact.remat_compress on the function passed to lax.scan, then compresses the body.",
        stacklevel=2)


def table_with_loop_bodies(infos: list[ResidualInfo], rules: Sequence[Callable]) -> list[ResidualInfo]:
  """The residual table of a plan (`infos`) whose loops run with their bodies compressed: instead
  of the codes that the loops stack (rows kept as "nested"), the bodies' own residuals, each
  stacked over its loop's steps, with the width it is stored at. (Inputs a body keeps by reference
  are the loop's, listed by the enclosing call.) Where the bytes would not add up, `infos`."""
  body_rows = []
  for rule in rules:
    body = rule.body.last_plan
    if body is None:
      return infos
    rows = body.infos if body.table is None else body.table  # (a body's own loops listed so too)
    body_rows += [dataclasses.replace(r, shape=(rule.length, *r.shape), loop_steps=(rule.length, *r.loop_steps))
                  for r in rows if not (r.is_argument and not r.compressed)]
  stacked = [r for r in infos if r.stacked_by_loop and r.kept_because == Kept.NESTED]
  if sum(r.stored_nbytes for r in stacked) != sum(r.stored_nbytes for r in body_rows):
    return infos
  return [r for r in infos if not (r.stacked_by_loop and r.kept_because == Kept.NESTED)] + body_rows
