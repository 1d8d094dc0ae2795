"""The custom_jvp of a compressed call, and the cache that shares it between identical calls.

A `Traced` holds everything shared by the calls that trace to the same function: its jaxpr, the
chains rewritten in it, the loops compressed step by step, and one `Plan` per input signature.
Its `core` is the `jax.custom_jvp` that every call goes through. Its rule runs the plan's forward
interpreter (which stores the residuals compressed) and returns output tangents as
`jact._tangent`'s primitive: evaluated (forward mode) it is the exact JVP, transposed (reverse
mode) it runs the plan's backward interpreter on the stored residuals. While `jact.calibrate`
probes, calls go through `jact._probing`'s rules instead.

The custom_jvp closes over no tracer (constants and closed-over values arrive as arguments), so
`traced_for` can serve a `Traced` to every later call whose function has the same structure: the
16 identical layers of a deep network are analysed once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
from jax._src.interpreters import ad  # the tracer types of jvp and linearize (no public name)

from jact import _context, _jaxpr, _loops, _probing, _schedule, _tangent
from jact._classify import InputKind
from jact._options import Options
from jact._plan import Plan, build_plan
from jact.info import ResidualTable
from jact.rewrites import chains as chains_lib
from jact.rewrites.evaluate import evaluate


class Traced:
  """The compressed form of one traced function (see the module docstring)."""

  def __init__(self, fun_jaxpr, num_consts: int, kinds: Sequence[InputKind], labels: Sequence[str],
               scope: str, options: Options, twin_key: tuple | None = None):
    self.fun_jaxpr, self.num_consts, self.scope, self.options = fun_jaxpr, num_consts, scope, options
    self.twin_key = twin_key  # equal for calls that differ only in their names (see _share_rules)
    self.chains = chains_lib.find_chains(fun_jaxpr)
    self.own_kinds = list(kinds)
    # Loops whose residuals the loop itself would stack at full precision run with their body
    # compressed on its own, once a plan has found such residuals (`loop_rules`: those in use).
    self.candidate_loop_rules = _loops.loop_rules(fun_jaxpr, kinds, scope, options, traced_for)
    self.loop_rules: dict[int, Callable] = {}
    # A function with such loops takes the call's seed as its first input, for the loops' bodies:
    # without it, calls with different `rng`s would round the bodies' residuals alike.
    self.takes_seed = bool(self.candidate_loop_rules)
    self.kinds = [InputKind.INDEX, *kinds] if self.takes_seed else list(kinds)
    self.labels = ["seed", *labels] if self.takes_seed else list(labels)
    self.plans: dict[tuple, Plan] = {}
    self.last_plan: Plan | None = None  # the last one built or served outside calibration
    self.core = jax.custom_jvp(self.primal)
    self.core.defjvp(self.jvp)
    self.probing = _probing.ProbingRules(self)

  # --- the function and its inputs ---

  def pure(self, *inputs) -> list[Any]:
    """The traced function with its rewrites: chains, pooling and the loops in use."""
    seed, inputs = (inputs[0], inputs[1:]) if self.takes_seed else (None, inputs)
    # (While calibrate probes, every such loop runs with its body's residuals exposed by name.)
    active = self.candidate_loop_rules if _context.current().probe is not None else self.loop_rules
    rules = {i: (lambda invals, rule=rule: rule(seed, invals)) for i, rule in active.items()}
    return evaluate(self.fun_jaxpr, self.chains, inputs[:self.num_consts], *inputs[self.num_consts:], rules=rules)

  def with_seed(self, seed, inputs) -> list[Any]:
    """The inputs of `pure` and of the plans."""
    return [seed, *inputs] if self.takes_seed else list(inputs)

  def own_gradients(self, grads):
    """Cotangents of the call's inputs, without the seed's."""
    return grads[1:] if self.takes_seed else grads

  # --- plans ---

  def plan_for(self, inputs) -> Plan:
    """The plan for these inputs' types, built at the first call that has them."""
    # (While calibrate probes, loops run with their bodies' residuals exposed: see _probing.)
    probing = _context.current().probe is not None
    key = (tuple(jax.typeof(x) for x in inputs), probing)
    if key not in self.plans:
      # Compressed calls nested in this one are traced here only to find this call's residuals.
      with _context.collecting_nothing(), _context.enclosed():
        plan = self._build(inputs)
        if not probing and self.candidate_loop_rules and not self.loop_rules:
          plan = self._with_loops_compressed(plan, inputs)
      if not probing:
        _loops.warn_of_loop_stacks(self.scope, _loops.stacked_by_loops(plan.infos))
        if self.loop_rules:
          plan.table = _loops.table_with_loop_bodies(plan.infos, list(self.loop_rules.values()))
        self._share_rules(plan, key)
      self.plans[key] = plan
    if not probing:
      self.last_plan = self.plans[key]
    return self.plans[key]

  def _share_rules(self, plan: Plan, key: tuple) -> None:
    """Gives `plan` the compiled rules of an earlier plan that differs from it only in names.

    Repeated calls of one function get distinct names (`jact._naming`) so that policies can tell
    them apart; where they store every residual alike, one compiled forward and backward rule
    serves them all (`jact._schedule.rule`: XLA compiles it once per network, not per layer).
    Calls whose loops run compressed on their own are not shared: their bodies' rules differ.
    """
    if self.twin_key is None or self.loop_rules or self.candidate_loop_rules:
      return
    label = lambda name: name.removeprefix(self.scope + "/")
    storage = tuple(dataclasses.replace(info, name=label(info.name), rebuilt_from=label(info.rebuilt_from))
                    for info in plan.infos)
    try:
      plan.compiled_rules = _SHARED_RULES.setdefault((self.twin_key, key, storage), plan.compiled_rules)
    except TypeError:  # an unhashable part: not shared
      pass
    if len(_SHARED_RULES) > _TRACED_CAPACITY:
      _SHARED_RULES.pop(next(iter(_SHARED_RULES)))

  def _build(self, inputs) -> Plan:
    return build_plan(self.pure, inputs, self.kinds, self.labels, self.scope, self.options)

  def _with_loops_compressed(self, plan: Plan, inputs) -> Plan:
    """`plan`, or a plan with the loops run with their bodies compressed on their own.

    That is kept when loops stack activations and nothing compressed is stacked any more, if
    something was (the bodies may store less by rebuilding what they stacked) or the bodies
    compress something (a policy from jact.calibrate names the bodies' residuals, not the
    stacked ones).
    """
    if not _loops.stacked_activations(plan.infos):
      return plan
    stacked = _loops.stacked_by_loops(plan.infos)
    self.loop_rules = self.candidate_loop_rules
    rewritten = self._build(inputs)
    if stacked and _loops.bodies_unsized(self.loop_rules):
      # The policy names the residuals only as the loops stack them (written so by hand, or
      # calibrated by an older jact): the bodies get the finest width it gives those.
      width = max(r.bits for r in stacked)
      body_options = dataclasses.replace(self.options, policy=_loops.LoopBodyWidth(self.options.policy, width))
      self.loop_rules = _loops.loop_rules(self.fun_jaxpr, self.own_kinds, self.scope, body_options, traced_for)
      rewritten = self._build(inputs)
    if _loops.stacked_by_loops(rewritten.infos) or not (stacked or _loops.bodies_compress(self.loop_rules)):
      self.loop_rules = {}  # the loops run as they are
      return plan
    self.plans = {k: p for k, p in self.plans.items() if k[1]}  # traced without them
    return rewritten

  # --- the custom_jvp ---

  def primal(self, seed, *inputs):
    return self.pure(*self.with_seed(seed, inputs))

  def jvp(self, primals, tangents):
    """The custom_jvp rule: outputs from the forward rule (which stores the residuals
    compressed), output tangents as `jact._tangent`'s primitive -- exact when evaluated, the
    compressed backward pass when transposed."""
    seed, inputs = primals[0], self.with_seed(primals[0], primals[1:])
    own_inputs = list(self.own_gradients(inputs))
    try:
      plan = self.plan_for(inputs)
    except ValueError as error:
      if not _no_reverse_mode(error):
        raise
      # The function has no reverse mode (a lax.while_loop): forward mode needs no plan, and
      # reverse mode raises JAX's error when it transposes the tangent.
      plan, outs, stored = Unplanned(error), self.pure(*inputs), []
    state = _context.current()  # (read after planning, which replaces it for a while)
    if not isinstance(plan, Unplanned):
      outs, stored = _schedule.rule(plan, "forward", self.options)(seed, list(inputs))
      if state.regions is not None:
        state.regions.append(ResidualTable(plan.infos if plan.table is None else plan.table))
      # (While jact.residuals collects, nothing is compiled: all is marked, as this call's.)
      stored = _schedule.marked(plan, stored, by_reference=state.regions is None)
    float_tangents = [t for x, t in zip(own_inputs, tangents[1:]) if _tangent.is_float(x)]
    out_tangents = iter(_tangent.bind(self, plan, stored, None if state.enclosed else own_inputs, float_tangents))
    return outs, [next(out_tangents) if _tangent.is_float(o) else _tangent.float0_zeros(o) for o in outs]

  # --- what jact._tangent's primitive calls ---

  def tangent_avals(self) -> list:
    return [v.aval for v in self.fun_jaxpr.outvars if _tangent.is_float(v.aval.dtype)]

  def exact_jvp(self, inputs: list, tangents: list) -> list:
    """Tangents of the float outputs of the uncompressed function for those of its float inputs."""
    given = iter(tangents)
    full = [next(given) if _tangent.is_float(x) else _tangent.float0_zeros(x) for x in inputs]
    _, out_tangents = jax.jvp(self._exact, tuple(inputs), tuple(full))
    return [t for v, t in zip(self.fun_jaxpr.outvars, out_tangents) if _tangent.is_float(v.aval.dtype)]

  def backward(self, plan: Plan, stored: list, inputs: list | None, cts: list) -> list:
    """Cotangents of the float inputs for those of the float outputs, from the stored residuals."""
    if isinstance(plan, Unplanned):
      raise plan.error
    given = iter(cts)
    full = [next(given) if _tangent.is_float(v.aval.dtype) else _tangent.float0_zeros(v.aval)
            for v in self.fun_jaxpr.outvars]
    if inputs is None:  # part of an enclosing compressed call, which differentiates itself
      grads = self.own_gradients(_schedule.rule(plan, "backward", self.options)(stored, full))
    else:
      grads = self._differentiable_backward(plan)(stored, inputs, full)
    own_avals = [v.aval for v in (*self.fun_jaxpr.constvars, *self.fun_jaxpr.invars)]
    return [g for g, aval in zip(grads, own_avals) if _tangent.is_float(aval.dtype)]

  def _differentiable_backward(self, plan: Plan) -> Callable:
    """The backward rule of `plan` as a function of (stored arrays, the call's inputs,
    cotangents) whose own derivative is exact.

    Differentiating a backward pass (grad of grad, jax.hessian, Hessian-vector products, a
    gradient penalty) through rounded residuals would be silently wrong: a code carries no
    derivative of the value it rounds. So the backward pass's value comes from the stored
    residuals, as in any step, and its derivative from the call's full-precision inputs: the
    JVP of the uncompressed function's VJP. Second-order results are then the exact ones, up to
    the first-order gradient's own rounding noise where they multiply it (unbiased: stochastic
    rounding). Only that differentiation reads the inputs.
    """
    if "differentiable" not in plan.compiled_rules:
      backward = _schedule.rule(plan, "backward", self.options)

      @jax.custom_jvp
      def differentiable(stored, inputs, cts):
        return list(self.own_gradients(backward(stored, cts)))

      @differentiable.defjvp
      def derivative(primals, tangents):
        stored, inputs, cts = primals
        _, inputs_dot, cts_dot = tangents
        _, grads_dot = jax.jvp(self._exact_vjp, (inputs, cts), (inputs_dot, cts_dot))
        return differentiable(stored, inputs, cts), grads_dot

      plan.compiled_rules["differentiable"] = differentiable
    return plan.compiled_rules["differentiable"]

  def _exact(self, *inputs) -> list[Any]:
    """The uncompressed function of the call's own inputs (FIXED inputs get no derivative)."""
    xs = [jax.lax.stop_gradient(x) if k is InputKind.FIXED else x for x, k in zip(inputs, self.own_kinds)]
    return jax.core.eval_jaxpr(self.fun_jaxpr, xs[:self.num_consts], *xs[self.num_consts:])

  def _exact_vjp(self, inputs, cts) -> list[Any]:
    """Input cotangents of the uncompressed function (as jax.vjp gives them)."""
    _, pullback = jax.vjp(self._exact, *inputs)
    return list(pullback(list(cts)))

  def call(self, seed, inputs) -> list[Any]:
    """Runs the call: through `core`, or while calibrate probes through the probing rules.

    Directly under forward-mode differentiation (`jvp`, `jacfwd` outside any jit) the function
    runs as it is: forward mode keeps no residuals, so there is nothing to compress or plan."""
    if _context.current().probe is not None:
      return self.probing.call(seed, inputs)
    if any(isinstance(x, ad.JVPTracer) for x in inputs):
      return self.pure(*self.with_seed(seed, inputs))
    return self.core(seed, *inputs)

  def call_exposing(self, seed, inputs) -> list[Any]:
    """A loop body's call while calibrate probes (see `jact._probing`)."""
    return self.probing.exposed(seed, *inputs)


def _no_reverse_mode(error: Exception) -> bool:
  """Whether `error` is JAX's refusal to reverse-differentiate (a lax.while_loop, say)."""
  return "Reverse-mode differentiation does not work" in str(error)


class Unplanned:
  """The plan of a call that has none: building it raised `error` (reverse mode of a
  lax.while_loop, say), which reverse mode raises again."""

  def __init__(self, error: Exception):
    self.error = error


# --- the cache ---------------------------------------------------------------------------------

_TRACED: dict[tuple, Traced] = {}
_TRACED_CAPACITY = 256
_SHARED_RULES: dict[tuple, dict] = {}  # see Traced._share_rules


def traced_for(fun_jaxpr, num_consts: int, kinds: Sequence[InputKind], labels: Sequence[str], scope: str,
               options: Options) -> Traced:
  """The `Traced` of a function, shared with every earlier call of the same structure."""
  twin_key = (_structure(fun_jaxpr), num_consts, tuple(kinds), tuple(labels),
              dataclasses.replace(options, name=None, numbered=False, name_from_caller=False))
  key = (twin_key, scope, options)
  try:
    entry = _TRACED.get(key)
  except TypeError:  # an unhashable policy: no sharing
    return Traced(fun_jaxpr, num_consts, kinds, labels, scope, options)
  if entry is None:
    if len(_TRACED) >= _TRACED_CAPACITY:
      _TRACED.pop(next(iter(_TRACED)))
    entry = _TRACED[key] = Traced(fun_jaxpr, num_consts, kinds, labels, scope, options, twin_key)
  return entry


def clear_cache() -> None:
  """Forgets every shared `Traced` (and so its plans and compiled rules)."""
  _TRACED.clear()
  _SHARED_RULES.clear()


def _structure(jaxpr) -> tuple:
  """A key equal for jaxprs that compute the same thing: their text, the name scopes of their
  equations and the identity of any functions in their parameters (custom_jvp rules and the like)."""
  parts: list = [str(jaxpr)]

  def walk(j):
    for eqn in j.eqns:
      parts.append(tuple(_jaxpr.scope_names(eqn)))
      for value in eqn.params.values():
        inner = getattr(value, "jaxpr", value)
        if hasattr(inner, "eqns"):
          walk(inner)
        elif callable(value):
          parts.append(id(value))

  walk(jaxpr)
  return tuple(parts)
