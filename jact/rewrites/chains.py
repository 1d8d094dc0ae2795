"""Elementwise chains stored as one derivative each.

Autodiff of an elementwise chain such as tanh-GELU saves several full-size residuals (for GELU: the
pre-activation, 3x**2, 1 - tanh**2 and 0.5 * (1 + tanh)), because it linearises each primitive
separately. But the chain's Jacobian is diagonal: its backward pass is `ct * D` with one array
`D = dy/dx`. jact rewrites such chains into a `custom_jvp` whose tangent is `D * t`, so autodiff
saves `D` alone. Since the backward pass stays linear in the stored residual, stochastic rounding of
`D` keeps the gradient unbiased -- unlike recomputing the chain from a quantised input, whose
nonlinear derivative would turn rounding noise into bias.

A chain is a maximal set of elementwise equations that depend on one non-constant variable (the
source) and constants. It is rewritten only when autodiff would otherwise save more full-size bytes
than the chain has outputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jact import _jaxpr

ELEMENTWISE = frozenset("""
neg sign floor ceil round is_finite exp exp2 log log1p expm1 tanh logistic sin cos tan asin acos atan
sinh cosh asinh acosh atanh sqrt rsqrt cbrt abs square integer_pow pow erf erfc erf_inv lgamma digamma
add add_any sub mul div max min select_n convert_element_type gt ge lt le eq ne and or not
copy copy_p reduce_precision clamp one_minus_square stop_gradient
""".split())
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "custom_jvp_call": "call_jaxpr", "closed_call": "call_jaxpr"}


def _inner(eqn):
  inner = eqn.params.get(_CALLS[eqn.primitive.name])
  return getattr(inner, "jaxpr", inner)


def is_elementwise(eqn) -> bool:
  """An equation whose outputs are elementwise functions of same-shaped (or scalar) operands."""
  name = eqn.primitive.name
  if eqn.effects:
    return False
  if name in _CALLS:
    if not all(is_elementwise(e) for e in _inner(eqn).eqns):
      return False
  elif name not in ELEMENTWISE:
    return False
  shape = eqn.outvars[0].aval.shape
  return (all(v.aval.shape == shape for v in eqn.outvars)
          and all(v.aval.shape in (shape, ()) for v in eqn.invars if not _jaxpr.is_literal(v)))


@dataclasses.dataclass(frozen=True)
class Chain:
  """Equations computing `outputs` elementwise from `source` (plus constant equations they need)."""
  source: Any
  members: tuple[int, ...]  # the elementwise equations, in program order
  eqn_indices: tuple[int, ...]  # members and the constant equations they need, in program order
  outputs: tuple[Any, ...]

  def evaluate(self, jaxpr, source_value) -> list[Any]:
    env = _jaxpr.Env()
    env.write(self.source, source_value)
    for i in self.eqn_indices:
      eqn = jaxpr.eqns[i]
      for var, value in zip(eqn.outvars, _jaxpr.eval_eqn(eqn, [env.read(v) for v in eqn.invars])):
        env.write(var, value)
    return [env.read(v) for v in self.outputs]


def find_chains(jaxpr) -> list[Chain]:
  """The chains of `jaxpr` worth rewriting (see the module docstring)."""
  source: dict[Any, Any] = {v: v for v in list(jaxpr.constvars) + list(jaxpr.invars)}
  members: dict[Any, list[int]] = {}
  constant_eqns: dict[Any, int] = {}  # constant variable -> its equation
  for i, eqn in enumerate(jaxpr.eqns):
    sources = {source[v] for v in eqn.invars if not _jaxpr.is_literal(v)}
    live = {s for s in sources if s is not None}
    if not live and not eqn.effects:
      for v in eqn.outvars:
        source[v] = None
        constant_eqns[v] = i
    elif len(live) == 1 and is_elementwise(eqn):
      (s,) = live
      members.setdefault(s, []).append(i)
      for v in eqn.outvars:
        source[v] = s
    else:
      for v in eqn.outvars:
        source[v] = v
  used_outside: dict[Any, set] = {}
  for i, eqn in enumerate(jaxpr.eqns):
    for v in eqn.invars:
      if not _jaxpr.is_literal(v) and source.get(v) is not None and source[v] is not v:
        if i not in members.get(source[v], ()):
          used_outside.setdefault(source[v], set()).add(v)
  for v in jaxpr.outvars:
    if not _jaxpr.is_literal(v) and source.get(v) is not None and source[v] is not v:
      used_outside.setdefault(source[v], set()).add(v)
  chains = []
  for s, indices in members.items():
    outputs = tuple(v for i in indices for v in jaxpr.eqns[i].outvars if v in used_outside.get(s, ()))
    if not outputs or any(v.aval.dtype != s.aval.dtype or v.aval.shape != s.aval.shape for v in outputs):
      continue
    if not jnp.issubdtype(s.aval.dtype, jnp.floating):
      continue
    needed = _jaxpr.constant_closure(jaxpr, [v for i in indices for v in jaxpr.eqns[i].invars], constant_eqns)
    chain = Chain(s, tuple(indices), tuple(sorted(set(indices) | needed)), outputs)
    if _worth_rewriting(jaxpr, chain):
      chains.append(chain)
  return chains


def _worth_rewriting(jaxpr, chain: Chain) -> bool:
  """True when autodiff of the chain saves more full-size bytes than one derivative per output."""
  aval = chain.source.aval  # the aval itself: inside shard_map it carries the varying manual axes
  residuals = jax.eval_shape(lambda s: jax.tree.leaves(jax.vjp(lambda x: chain.evaluate(jaxpr, x), s)[1]),
                             aval)
  saved = sum(r.size * r.dtype.itemsize for r in residuals if r.shape == aval.shape)
  return saved > len(chain.outputs) * aval.size * aval.dtype.itemsize


def chain_scope(index: int) -> str:
  return f"chain{index}"


def is_chain_scope(name: str) -> bool:
  return name.startswith("chain") and name[5:].isdigit()


def rewrite(jaxpr, chain: Chain, index: int):
  """The chain as a function of its source whose autodiff saves one derivative per output."""

  @jax.custom_jvp
  def fused(s):
    return chain.evaluate(jaxpr, s)

  @fused.defjvp
  def fused_jvp(primals, tangents):
    (s,), (t,) = primals, tangents
    outs = fused.fun(s)
    with jax.named_scope(chain_scope(index)):  # names the stored derivatives (XLA merges the primal)
      _, derivatives = jax.jvp(fused.fun, (s,), (jnp.ones_like(s),))
    return outs, [d * t for d in derivatives]

  return fused
