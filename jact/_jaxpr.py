"""Small jaxpr utilities: evaluation, dependence analysis, names and scheduling points.

jact evaluates the forward and backward jaxprs of a wrapped function itself (rather than calling
`jax.vjp`'s closures) so that it can place each residual's quantisation right after the residual's
last forward use and each dequantisation right before its first backward use.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np
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

  Calls (jit, shard_map, custom_jvp, scan, ...) are followed into their jaxpr, output by output (a
  scan's carry, until what it carries from one step to the next is known); any other equation's
  outputs depend on all of its inputs. Constvars carry no tag.
  """
  deps: dict[Var, frozenset] = {v: frozenset() for v in jaxpr.constvars}
  deps.update(zip(jaxpr.invars, invar_tags))
  for eqn in jaxpr.eqns:
    ins = [frozenset() if is_literal(v) else deps.get(v, frozenset()) for v in eqn.invars]
    inner = _inner_jaxpr(eqn)
    if inner is not None:
      outs = _through_loop(eqn, ins, functools.partial(_output_dependence, inner), frozenset.union)
    else:
      outs = [frozenset().union(*ins)] * len(eqn.outvars)
    for v, tags in zip(eqn.outvars, outs):
      deps[v] = tags
  return deps


def _output_dependence(inner, ins: Sequence[frozenset]) -> list[frozenset]:
  inner_deps = dependence(inner, ins)
  return [frozenset() if is_literal(v) else inner_deps.get(v, frozenset()) for v in inner.outvars]


def mark(jaxpr, atom, producer_of: dict | None = None) -> str | None:
  """The name `atom` is marked with by `checkpoint_name(value, name)`, if any, looking through
  calls and loops whose outputs correspond to their jaxpr's outputs one to one. (`producer_of`:
  `jaxpr`'s `producers`, when the caller has them.)"""
  if is_literal(atom):
    return None
  eqn = (producers(jaxpr) if producer_of is None else producer_of).get(atom)
  if eqn is None:
    return None
  if eqn.primitive.name == "name":
    return eqn.params.get("name")
  for value in eqn.params.values():
    inner = getattr(value, "jaxpr", value)
    if hasattr(inner, "outvars") and len(inner.outvars) == len(eqn.outvars):
      return mark(inner, inner.outvars[eqn.outvars.index(atom)])
  return None


def named(jaxpr, atom, name: str, producer_of: dict | None = None) -> bool:
  """Whether `atom` is a value marked `checkpoint_name(value, name)` (see `mark`)."""
  return mark(jaxpr, atom, producer_of) == name


class ScanPositions(NamedTuple):
  """Input positions of a scan's constants, carry and scanned-over arrays (its outputs start
  with the carry out, in the carry's order)."""
  consts: list[int]
  carry: list[int]
  xs: list[int]


def scan_positions(eqn) -> ScanPositions:
  """Where a scan equation's constants, carry and scanned-over arrays are among its inputs."""
  if "num_carry" in eqn.params:  # jax before 0.12
    consts, carry = eqn.params["num_consts"], eqn.params["num_carry"]
    return ScanPositions(list(range(consts)), list(range(consts, consts + carry)),
                         list(range(consts + carry, len(eqn.invars))))
  return ScanPositions(*(list(part) for part in eqn.params["ft_in"].update(list(range(len(eqn.invars)))).unpack()))


def scan_carry_positions(eqn) -> list[int]:
  return scan_positions(eqn).carry


def _through_loop(eqn, ins: Sequence[Any], run: Callable[[list], list], join: Callable,
                  with_inputs: bool = False):
  """`run(ins)`: an analysis of a call-like equation's outputs from facts about its inputs. For a
  scan the carry in is joined with the carry out until that changes nothing: a later step's carry
  holds what earlier steps computed, not only the initial value. With `with_inputs`, also the
  inputs' facts so joined."""
  carry = scan_carry_positions(eqn) if eqn.primitive.name == "scan" else []
  ins = list(ins)
  while True:
    outs = run(ins)
    joined = [join(ins[k], out) for k, out in zip(carry, outs)]
    if all(ins[k] == j for k, j in zip(carry, joined)):
      return (outs, ins) if with_inputs else outs
    for k, j in zip(carry, joined):
      ins[k] = j


def scan_input_dependence(eqn, ins: Sequence[frozenset]) -> list[frozenset]:
  """The tags of a scan's inputs as its body sees them over all steps (see `dependence`)."""
  run = functools.partial(_output_dependence, _inner_jaxpr(eqn))
  return _through_loop(eqn, ins, run, frozenset.union, with_inputs=True)[1]


def _inner_jaxpr(eqn):
  """The jaxpr a call-like equation runs on its own inputs, giving its own outputs, or None."""
  inner = next((eqn.params[p] for p in _CALL_PARAMS if p in eqn.params), None)
  inner = getattr(inner, "jaxpr", inner)
  if (inner is not None and hasattr(inner, "eqns") and len(inner.invars) == len(eqn.invars)
      and len(inner.outvars) == len(eqn.outvars)):
    return inner
  return None


def constant_producers(jaxpr) -> dict[Var, int]:
  """Variables computed from literals and the jaxpr's constvars alone -> the equation computing them."""
  constant, out = set(jaxpr.constvars), {}
  for i, eqn in enumerate(jaxpr.eqns):
    if not eqn.effects and all(is_literal(v) or v in constant for v in eqn.invars):
      constant.update(eqn.outvars)
      out.update((v, i) for v in eqn.outvars)
  return out


def constant_closure(jaxpr, atoms: Sequence[Any], constant: dict) -> set[int]:
  """The equations (of `constant`: variable -> its equation) that computing `atoms` needs."""
  needed: set[int] = set()
  stack = [v for v in atoms if not is_literal(v)]
  while stack:
    i = constant.get(stack.pop())
    if i is not None and i not in needed:
      needed.add(i)
      stack.extend(u for u in jaxpr.eqns[i].invars if not is_literal(u))
  return needed


def feeding_outputs_only(jaxpr) -> set:
  """Variables whose every use is, directly or through other such variables, an output of `jaxpr`
  (in a backward jaxpr: the cotangents of the inputs and what only they are made of)."""
  outputs = {v for v in jaxpr.outvars if not is_literal(v)}
  consumers: dict[Var, list] = {}
  for eqn in jaxpr.eqns:
    for v in eqn.invars:
      if not is_literal(v):
        consumers.setdefault(v, []).append(eqn)
  only: set = set()
  for eqn in reversed(jaxpr.eqns):
    for v in eqn.outvars:
      uses = consumers.get(v, [])
      if (v in outputs or uses) and all(all(u in only for u in user.outvars) for user in uses):
        only.add(v)
  return only


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


# Primitives whose outputs are linear in their inputs (a sum of each input's contribution), and
# those bilinear in their two operands. Used to find residuals that the backward pass uses
# non-polynomially (as a divisor, inside a transcendental function): their rounding noise is not
# averaged out by stochastic rounding and grows with the noise's size relative to the value.
LINEAR = frozenset("""
add add_any sub neg reshape transpose broadcast_in_dim reduce_sum convert_element_type copy copy_p
squeeze expand_dims slice dynamic_slice concatenate pad reduce_precision rev cumsum split
reduce_window_sum device_put symbolic_zeros zeros_like mul_zero real imag conj
pvary psum psum_invariant all_gather reduce_scatter ppermute all_to_all
""".split())
BILINEAR = frozenset("mul dot_general conv_general_dilated".split())
_CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
POLYNOMIAL, NONLINEAR = 2, 3


def degrees(jaxpr, input_degrees: Sequence[int]) -> list[int]:
  """Degree of each output in the inputs marked with degree 1: 0, 1 (linear), POLYNOMIAL (2 or
  more: products of marked values) or NONLINEAR (anything else)."""
  degree: dict[Var, int] = {v: 0 for v in jaxpr.constvars}
  degree.update(zip(jaxpr.invars, input_degrees))
  read = lambda v: 0 if is_literal(v) else degree.get(v, 0)
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if not any(ins):
      outs = [0] * len(eqn.outvars)
    elif name == "optimization_barrier":  # identity, position by position
      outs = ins
    elif name in LINEAR:
      outs = [max(ins)] * len(eqn.outvars)
    elif name in BILINEAR:
      outs = [max(ins) if max(ins) == NONLINEAR else min(sum(ins), POLYNOMIAL)] * len(eqn.outvars)
    elif name == "div":
      outs = [ins[0] if ins[1] == 0 else NONLINEAR]
    elif name == "select_n":
      outs = [max(ins[1:]) if ins[0] == 0 else NONLINEAR]
    elif name in ("select_and_scatter_add", "select_and_gather_add"):  # (values, selector)
      outs = [ins[0] if ins[1] == 0 else NONLINEAR]
    elif name in ("gather", "dynamic_update_slice", "scatter-add", "scatter_add"):
      outs = [max(ins)] * len(eqn.outvars) if all(d == 0 for d in ins[1:2]) or name != "gather" else [NONLINEAR]
    else:
      inner = _inner_jaxpr(eqn)
      outs = (_through_loop(eqn, ins, lambda ins, inner=inner: degrees(inner, ins), max) if inner is not None
              else [NONLINEAR] * len(eqn.outvars))
    for v, d in zip(eqn.outvars, outs):
      degree[v] = d
  return [read(v) for v in jaxpr.outvars]


# --- value sets: residuals that provably take at most two values (masks) -------------------------

_SAME_VALUES = frozenset("""
broadcast_in_dim reshape transpose squeeze expand_dims slice dynamic_slice rev copy copy_p
reduce_max reduce_min
""".split())  # the output holds values of the first operand
_UNION = frozenset("select_n concatenate pad dynamic_update_slice".split())  # values of the data operands
_ARITHMETIC = {"add": np.add, "add_any": np.add, "sub": np.subtract, "mul": np.multiply,
               "div": np.divide, "max": np.maximum, "min": np.minimum, "neg": np.negative,
               "abs": np.abs, "sign": np.sign}
MAX_VALUES = 2


def value_sets(jaxpr, const_values: Sequence[Any] = ()) -> dict[Var, frozenset]:
  """For variables that provably take at most `MAX_VALUES` distinct values, those values.

  A forward analysis from literals and small constants: value-preserving operations (reshape,
  broadcast, select_n between cases, ...) and elementwise arithmetic on such sets, which numpy
  evaluates in the variables' dtypes as XLA does. A boolean variable takes at most two values
  whatever computed it. Used to store masks -- a ReLU's derivative, a dropout's scaled mask -- at
  1 bit, where the codec represents them exactly.
  """
  sets: dict[Var, frozenset] = {}
  for var, value in zip(jaxpr.constvars, const_values):
    values = _small_unique(value)
    if values is not None:
      sets[var] = values
  _propagate(jaxpr, sets)
  return sets


def _small_unique(value) -> frozenset | None:
  try:
    array = np.asarray(value)
  except Exception:  # a tracer or an extended dtype
    return None
  if array.size > 4096 or array.dtype.kind not in "biuf":
    return None
  values = frozenset(np.unique(array).tolist())
  return values if len(values) <= MAX_VALUES else None


def _literal_values(atom) -> frozenset:
  value = atom.val
  return frozenset([value.item() if hasattr(value, "item") else value])


def _propagate(jaxpr, sets: dict) -> None:
  read = lambda v: _literal_values(v) if is_literal(v) else sets.get(v)
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    ins = [read(v) for v in eqn.invars]
    outs: list = [None] * len(eqn.outvars)
    inner = _inner_jaxpr(eqn)
    if eqn.effects:
      pass
    elif inner is not None:
      def run(ins, inner=inner):
        inner_sets = {v: s for v, s in zip(inner.invars, ins) if s is not None}
        _propagate(inner, inner_sets)
        return [_literal_values(v) if is_literal(v) else inner_sets.get(v) for v in inner.outvars]

      def join(a, b):  # unknown, or too many values, absorbs
        return None if a is None or b is None or len(a | b) > MAX_VALUES else a | b
      outs = _through_loop(eqn, ins, run, join)
    elif name in _SAME_VALUES and ins and ins[0] is not None:
      outs = [ins[0]]
    elif name == "optimization_barrier":
      outs = ins
    elif name in _UNION:
      data = ins[1:] if name == "select_n" else ins[:2] if name in ("pad", "dynamic_update_slice") else ins
      if all(d is not None for d in data):
        outs = [frozenset().union(*data)]
    elif name == "convert_element_type" and ins[0] is not None:
      outs = [_apply(lambda a: a, ins, eqn.outvars[0].aval.dtype, [eqn.invars[0].aval.dtype])]
    elif name in _ARITHMETIC and all(s is not None for s in ins):
      outs = [_apply(_ARITHMETIC[name], ins, eqn.outvars[0].aval.dtype,
                     [v.aval.dtype for v in eqn.invars])]
    for var, values in zip(eqn.outvars, outs):
      if values is None and var.aval.dtype == np.bool_:
        values = frozenset([False, True])
      if values is not None and len(values) <= MAX_VALUES:
        sets[var] = values


def _apply(fn, operand_sets, out_dtype, in_dtypes) -> frozenset | None:
  """`fn` over every combination of operand values, each in its own dtype, cast to `out_dtype`."""
  try:
    out_dtype = np.dtype(out_dtype)
    in_dtypes = [np.dtype(d) for d in in_dtypes]
  except TypeError:  # extended dtypes
    return None
  results = set()
  with np.errstate(all="ignore"):
    for combination in itertools.product(*operand_sets):
      args = [np.asarray(v, d) for v, d in zip(combination, in_dtypes)]
      results.add(np.asarray(fn(*args)).astype(out_dtype).item())
      if len(results) > MAX_VALUES:
        return None
  return frozenset(results)
