"""The forward and backward interpreters of a plan, ordered by barriers so that memory falls.

Compressing a residual saves memory only if its full-precision buffer dies early, and XLA, not
Python, decides buffer lifetimes. So jact interprets both jaxprs of a plan itself and orders the
codec with `lax.optimization_barrier`:

* forward (`run_forward`): a residual is quantised right after its last forward use, and the next
  equation's inputs pass through a barrier together with the codes, so no later forward work can
  start while the full-precision residual is still alive;
* backward (`run_backward`): the codes of a residual pass through a barrier together with the
  cotangent inputs of the first equation that needs it, and are dequantised after it, so XLA
  cannot restore every residual of the network at the start of the backward pass.

`rule` makes each of them one XLA function shared by every call of the plan (`jact._compile`);
`Stored` and `marked` are what the forward rule hands the backward rule.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jact import _compile, _jaxpr, codec, quantization
from jact._classify import EXPOSED_MARK, STORED_MARK, Recomputation
from jact._options import Options
from jact._plan import Plan
from jact.rewrites import affine


def rule(plan: Plan, direction: str, options: Options) -> Callable:
  """The "forward" or "backward" rule of `plan` as one function shared by every call.

  A deep network calls the same plan once per layer. As one XLA function marked for late
  inlining (see jact._compile), the layers' identical work is optimised and compiled once
  instead of once per layer, which cuts compile time several-fold. Forward: `(seed, inputs) ->
  (outputs, stored)`; backward: `(stored, cotangents) -> input cotangents`.
  """
  if direction not in plan.compiled_rules:  # a plan belongs to one set of options
    body = run_forward if direction == "forward" else run_backward
    shared = _compile.shared_jit(functools.partial(body, plan, options))
    if direction == "forward":
      plan.compiled_rules[direction] = lambda seed, inputs: hand_over(plan, *shared(seed, inputs), inputs)
    else:
      plan.compiled_rules[direction] = shared
  return plan.compiled_rules[direction]


def run_forward(plan: Plan, options: Options, seed: jax.Array, inputs: Sequence[Any], compress: bool = True):
  """Outputs and the residuals it computes; with `compress=False` every residual is kept as it is.

  The stored list holds one entry per residual (None for those rebuilt in the backward pass), then
  the small values that rebuilding reads (`plan.rebuild_operands`).
  Inputs stored as they are (`plan.stored_inputs`) are left as None: `hand_over` adds them
  outside the shared rule, since an input returned by an XLA call is copied, which for the
  weights of every layer would cost a copy of the model kept until the backward pass.
  """
  jaxpr = plan.fwd.jaxpr
  env = _jaxpr.bind_inputs(jaxpr, plan.fwd.consts, inputs)
  constant = _jaxpr.constant_producers(jaxpr)
  ready: dict[int, list[int]] = {}
  for uid, r in enumerate(plan.residuals):
    if r.compressed and compress and r.rebuild is None:
      ready.setdefault(r.ready_after, []).append(uid)
  stored: list[Any] = [None] * len(plan.residuals)
  pending: list[tuple[int, codec.QuantizedArray]] = []
  kernels = quantize_kernels(plan, options.kernel)

  def quantize_ready(index: int):
    for uid in ready.get(index, ()):
      r = plan.residuals[uid]
      pending.append((uid, quantization.quantize(env.read(r.atom), r.info.bits, options.group_size,
                                                 options.rounding, seed=residual_seed(seed, uid),
                                                 kernel=kernels[uid])))

  def tie(values: list[Any]) -> list[Any]:
    """Makes `values` available only after every pending quantisation is done."""
    values, codes = jax.lax.optimization_barrier((values, [q for _, q in pending]))
    for (uid, _), q in zip(pending, codes):
      stored[uid] = q
    pending.clear()
    return values

  quantize_ready(-1)
  for i, eqn in enumerate(jaxpr.eqns):
    invals = [env.read(v) for v in eqn.invars]
    dynamic = [k for k, v in enumerate(eqn.invars) if not _jaxpr.is_literal(v)]
    # Codes are tied to the next equation that reads a runtime value: tied to a constant (an iota
    # of indices), they would leave the work after it free to run ahead.
    if pending and any(eqn.invars[k] not in constant and eqn.invars[k] not in jaxpr.constvars for k in dynamic):
      for k, value in zip(dynamic, tie([invals[k] for k in dynamic])):
        invals[k] = value
    for var, value in zip(eqn.outvars, _eval_with_late_constants(jaxpr, constant, eqn, invals, env)):
      env.write(var, value)
    quantize_ready(i)
  outs = [env.read(v) for v in jaxpr.outvars[:plan.num_outs]]
  if pending:
    outs = tie(outs)
  for uid, r in enumerate(plan.residuals):
    if (stored[uid] is None and not _jaxpr.is_literal(r.atom) and not r.recomputed
        and uid not in plan.stored_inputs and not (compress and r.rebuild is not None)):
      stored[uid] = env.read(r.atom)
  return outs, stored + [None if how is not None else env.read(v)
                         for v, how in zip(plan.rebuild_operands, plan.operand_recompute)]


def run_forward_uncompressed(plan: Plan, options: Options, seed: jax.Array, inputs: Sequence[Any]):
  """Outputs and every residual stored as it is, handed over as the backward pass receives them
  (calibration's probes, and a backward pass that is itself differentiated)."""
  return hand_over(plan, *run_forward(plan, options, seed, inputs, compress=False), inputs)


def hand_over(plan: Plan, outs: list[Any], stored: list[Any], inputs: Sequence[Any]):
  """`run_forward`'s results completed with the inputs stored as they are and those that
  recomputations read: the residuals the backward pass receives."""
  stored = list(stored)
  for uid, i in plan.stored_inputs.items():
    stored[uid] = inputs[i]
  return outs, stored + [inputs[i] for i in plan.recompute_inputs]


def run_backward(plan: Plan, options: Options, stored: Sequence[Any], cts: Sequence[Any]):
  """Input cotangents. Every stored array enters the computation through a barrier with the
  cotangents that first need it, so that XLA cannot hoist work on it (dequantisation, a layout
  copy of a weight, a recomputation) to the start of the backward pass and keep the result alive."""
  fallback_tie = [c for c in cts if jnp.issubdtype(jnp.result_type(c), jnp.inexact)]
  num_stored, num_operands = len(plan.residuals), len(plan.rebuild_operands)
  operands = list(stored[num_stored:num_stored + num_operands])
  parameters = list(stored[num_stored + num_operands:])
  stored = stored[:num_stored]
  jaxpr = plan.bwd.jaxpr
  num_res = len(plan.leaf_ids)
  env = _jaxpr.bind_inputs(jaxpr, plan.bwd.consts, [None] * num_res + list(cts))
  constant = _jaxpr.constant_producers(jaxpr)
  vars_of: dict[int, list[Any]] = {}
  for var, uid in zip(jaxpr.invars[:num_res], plan.leaf_ids):
    vars_of.setdefault(uid, []).append(var)
  uid_of = {var: uid for uid, vs in vars_of.items() for var in vs}
  kernels = dequantize_kernels(plan, options.kernel)

  def restore(uid: int, value: Any):
    for var in vars_of[uid]:
      env.write(var, value)

  waiting = set()
  for uid, r in enumerate(plan.residuals):
    if _jaxpr.is_literal(r.atom):
      restore(uid, r.atom.val)
    else:
      waiting.add(uid)

  # A restore also waits for the results of the equation before it, so that restoring follows the
  # backward jaxpr's order: work before a residual's first use (the weight gradient that reads the
  # previous residual) is done, and what it read can die, before the residual is decoded. With
  # several devices, a weight gradient in a barrier would be all-reduced there (one all-reduce per
  # layer instead of one combined): values that only make up the cotangent outputs are left out.
  previous: list[Any] = []
  left_out = set() if _compile.single_device() else _jaxpr.feeding_outputs_only(jaxpr)

  def restore_for(atoms: Sequence[Any], invals: list[Any] | None):
    need = sorted({uid_of[v] for v in atoms if not _jaxpr.is_literal(v) and uid_of.get(v) in waiting})
    if not need:
      return
    tie_positions = [k for k, v in enumerate(atoms) if not _jaxpr.is_literal(v) and v not in uid_of]
    tie_values = [invals[k] for k in tie_positions] if invals is not None and tie_positions else fallback_tie
    tie_values = list(tie_values) + previous
    rebuilding = [u for u in need if stored[u] is None and plan.residuals[u].rebuild is not None]
    recomputing = (any(plan.residuals[u].recomputed for u in need)
                   or (rebuilding and any(how is not None for how in plan.operand_recompute)))
    sources = [(None if plan.residuals[u].rebuild.representative is None
                else stored[plan.residuals[u].rebuild.representative])
               if u in rebuilding else stored[u] for u in need]
    (codes, params, small), tied = jax.lax.optimization_barrier(
        ((sources, parameters if recomputing else [], operands if rebuilding else []), tie_values))
    if invals is not None and tie_positions:
      for k, value in zip(tie_positions, tied):
        invals[k] = value
    if rebuilding:
      small = {v: value if how is None else _recompute(plan, params, how)
               for v, value, how in zip(plan.rebuild_operands, small, plan.operand_recompute)}
    for uid, value in zip(need, codes):
      residual = plan.residuals[uid]
      if residual.recomputed:
        value = _recompute(plan, params, residual.recompute)
      else:
        if isinstance(value, codec.QuantizedArray):
          value = quantization.dequantize(value, kernel=kernels[uid])
        if uid in rebuilding:
          value = affine.rebuild(plan.fwd.jaxpr, residual.rebuild.representative_path, residual.rebuild.path,
                                 value, small)
      restore(uid, value)
      waiting.discard(uid)

  for eqn in jaxpr.eqns:
    invals = [None if (not _jaxpr.is_literal(v) and uid_of.get(v) in waiting) else env.read(v)
              for v in eqn.invars]
    restore_for(eqn.invars, invals)
    invals = [env.read(v) if value is None else value for v, value in zip(eqn.invars, invals)]
    outs = _eval_with_late_constants(jaxpr, constant, eqn, invals, env)
    for var, value in zip(eqn.outvars, outs):
      env.write(var, value)
    previous[:] = [v for var, v in zip(eqn.outvars, outs)
                   if jnp.issubdtype(jnp.result_type(v), jnp.inexact) and var not in left_out]
  restore_for(jaxpr.outvars, None)
  return [env.read(v) for v in jaxpr.outvars]


# Operations XLA:GPU runs as library calls (cuDNN convolutions), whose operands and results are
# in memory whatever surrounds them. A matrix product is not one of them: XLA fuses elementwise
# work into its operands and its epilogue.
_IN_MEMORY_ANYWAY = frozenset({"conv_general_dilated"})


def quantize_kernels(plan: Plan, kernel: str) -> list[str]:
  """The codec implementation for quantising each residual of `plan` under the call's `kernel`.

  With "auto", the fused kernel (`jact.quantization`) quantises only what is in memory anyway: the
  results of convolutions. Everything else is quantised by the jax.numpy codec, which XLA fuses
  with the work that makes the residual (a mask, a chain's derivative, a matrix product's
  epilogue) or that reads it, so that no extra full-precision buffer exists; a fused kernel is one
  opaque call that needs its input in memory first. Measured on the H100 target
  (tests/test_gpu_targets.py): kernels for every residual cost 15-20% more compiled memory than
  none on a small CNN and a small transformer, and kernels for the calls' inputs as well still
  cost 5% on the transformer.
  """
  if kernel != "auto":
    return [kernel] * len(plan.residuals)
  producers = _jaxpr.producers(plan.fwd.jaxpr)
  in_memory = lambda r: (not _jaxpr.is_literal(r.atom) and r.atom in producers
                         and producers[r.atom].primitive.name in _IN_MEMORY_ANYWAY)
  return ["auto" if in_memory(r) else "xla" for r in plan.residuals]


def dequantize_kernels(plan: Plan, kernel: str) -> list[str]:
  """The codec implementation for restoring each residual, as `quantize_kernels` chooses: with
  "auto", the fused kernel restores only what only convolutions read (their operands are in memory
  anyway); anything else reads the jax.numpy codec's decoding, which XLA fuses into the reader."""
  if kernel != "auto":
    return [kernel] * len(plan.residuals)
  jaxpr = plan.bwd.jaxpr
  uid_of = dict(zip(jaxpr.invars[:len(plan.leaf_ids)], plan.leaf_ids))
  readers: dict[int, set[str]] = {}
  for eqn in jaxpr.eqns:
    for v in eqn.invars:
      if not _jaxpr.is_literal(v) and v in uid_of:
        readers.setdefault(uid_of[v], set()).add(eqn.primitive.name)
  return ["auto" if readers.get(uid) and readers[uid] <= _IN_MEMORY_ANYWAY else "xla"
          for uid in range(len(plan.residuals))]


def residual_seed(seed: jax.Array, index: int) -> jax.Array:
  """A distinct seed per residual; `quantize` scrambles it with a bijective hash."""
  return seed ^ np.uint32((index + 1) * 0x9E3779B9 % 2**32)


def _recompute(plan: Plan, parameters: Sequence[Any], recompute: Recomputation) -> Any:
  """A recomputed value, from the inputs the forward pass handed over."""
  value_of = dict(zip(plan.recompute_inputs, parameters))
  (value,) = _jaxpr.eval_jaxpr(recompute.jaxpr, plan.fwd.consts, *[value_of[i] for i in recompute.inputs])
  return value


_LOOPS = frozenset({"scan", "while"})
# Operations that update a buffer in place: a constant operand (the zeros a scatter-add -- the
# transpose of a gather -- accumulates into) is materialised in a buffer of its own.
_IN_PLACE = _LOOPS | {"scatter-add", "scatter_add", "scatter"}
# Calls whose bodies the backward pass evaluates inline when they hold such an operation: called,
# their constants are out of reach of the barrier (a checkpointed gather's transpose is one).
_CALLS = frozenset({"checkpoint", "remat2", "jit", "pjit", "closed_call"})


def _body(eqn):
  """(jaxpr, consts) of a call equation."""
  inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
  return (inner.jaxpr, inner.consts) if hasattr(inner, "consts") else (inner, [])


def _holds_late_constants(jaxpr) -> bool:
  constant = _jaxpr.constant_producers(jaxpr)
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in _IN_PLACE and any(
        not _jaxpr.is_literal(v) and v in constant and v.aval.shape for v in eqn.invars):
      return True
    if eqn.primitive.name in _CALLS and _holds_late_constants(_body(eqn)[0]):
      return True
  return False


def _eval_with_late_constants(jaxpr, constant: dict, eqn, invals: list[Any], env) -> list[Any]:
  """`eqn` evaluated with the constants it updates in place made late (`constants_made_late`),
  looking inside calls that hold such an update."""
  if eqn.primitive.name in _CALLS and _holds_late_constants(_body(eqn)[0]):
    inner, consts = _body(eqn)
    inner_env = _jaxpr.bind_inputs(inner, consts, invals)
    inner_constant = _jaxpr.constant_producers(inner)
    for inner_eqn in inner.eqns:
      outs = _eval_with_late_constants(inner, inner_constant, inner_eqn,
                                       [inner_env.read(v) for v in inner_eqn.invars], inner_env)
      for var, value in zip(inner_eqn.outvars, outs):
        inner_env.write(var, value)
    return [inner_env.read(v) for v in inner.outvars]
  return _jaxpr.eval_eqn(eqn, constants_made_late(jaxpr, constant, eqn, invals, env))


def constants_made_late(jaxpr, constant: dict, eqn, invals: list[Any], env) -> list[Any]:
  """`invals` of a loop or an in-place update, with the constants it carries or updates (the
  zeros a scan or a scatter-add accumulates into) rebuilt so that XLA computes them only once the
  equation's other inputs exist.

  XLA schedules an instruction that reads no runtime value early, at the start of the step, and
  a loop needs its carry in a buffer of its own: the constant is materialised there and kept
  alive until the loop runs -- in a graph network, a node-sized buffer per message-passing layer,
  alive across the whole forward or backward pass; in a CNN, the max-pooling gradient's
  input-sized zeros, alive across the backward pass (seen on XLA:GPU). Passing the constant's
  literal inputs through a barrier with the equation's runtime inputs makes it wait for them.
  """
  if eqn.primitive.name not in _IN_PLACE:
    return invals
  late = [k for k, v in enumerate(eqn.invars) if not _jaxpr.is_literal(v) and v in constant and v.aval.shape]
  dynamic = [k for k, v in enumerate(eqn.invars) if not _jaxpr.is_literal(v) and v not in constant
             and v not in jaxpr.constvars]
  if not late or not dynamic:
    return invals
  order = sorted(_jaxpr.constant_closure(jaxpr, [eqn.invars[k] for k in late], constant))
  leaves = [jnp.asarray(env.read(u), u.aval.dtype) for i in order for u in jaxpr.eqns[i].invars
            if _jaxpr.is_literal(u) or u not in constant]
  tied, leaf_values = jax.lax.optimization_barrier(([invals[k] for k in dynamic], leaves))
  local, leaf_values = {}, iter(leaf_values)
  for i in order:
    chain_eqn = jaxpr.eqns[i]
    ins = [local[u] if not _jaxpr.is_literal(u) and u in local else next(leaf_values) for u in chain_eqn.invars]
    local.update(zip(chain_eqn.outvars, _jaxpr.eval_eqn(chain_eqn, ins)))
  invals = list(invals)
  for k, value in zip(dynamic, tied):
    invals[k] = value
  for k in late:
    invals[k] = local[eqn.invars[k]]
  return invals


@jax.tree_util.register_pytree_node_class
class Stored:
  """What a compressed call's forward rule hands its backward rule: the stored arrays, with the
  plan that made them as static data."""

  def __init__(self, arrays, plan):
    self.arrays, self.plan = arrays, plan

  def tree_flatten(self):
    return (self.arrays,), self.plan

  @classmethod
  def tree_unflatten(cls, plan, children):
    return cls(children[0], plan)


def marked(plan: Plan, stored: Sequence[Any], by_reference: bool = True, exposing: bool = False) -> list[Any]:
  """A plan's handed-over residuals with what its forward rule made marked, so that an enclosing
  compressed call keeps it as it is (see jact._classify); with `exposing`, what the policy sizes
  is marked with its own name instead, for calibrate to probe. Inputs handed over as they are stay
  unmarked (`by_reference`): marked, they would no longer be seen as inputs, and a scan would
  stack copies of them instead of forwarding them."""
  inputs_at = len(plan.residuals) + len(plan.rebuild_operands)  # then the inputs recomputing reads
  kept = set(plan.stored_inputs) | set(range(inputs_at, len(stored))) if by_reference else set()
  out = []
  for k, value in enumerate(stored):
    info = plan.residuals[k].info if k < len(plan.residuals) else None
    name = EXPOSED_MARK + info.name if exposing and info is not None and info.sized_by_policy else STORED_MARK
    out.append(value if k in kept else jax.tree.map(lambda x, name=name: checkpoint_name(x, name), value))
  return out
