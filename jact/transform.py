"""`remat_compress`: store a function's autodiff residuals compressed.

How it works. The wrapped function becomes a `jax.custom_vjp`. Its forward rule evaluates the
forward jaxpr of `jax.vjp(f)`, whose extra outputs are exactly the residuals (every primitive's
saved values, with no per-op code), and stores each one at the width its policy chooses. Its
backward rule evaluates the backward jaxpr of the same `jax.vjp` on the restored residuals.

Compressing a residual saves memory only if its full-precision buffer dies early, and XLA, not
Python, decides buffer lifetimes. So jact interprets both jaxprs itself and orders the codec with
`lax.optimization_barrier`:

* forward: a residual is quantised right after its last forward use, and the next equation's
  inputs pass through a barrier together with the codes, so no later forward work can start while
  the full-precision residual is still alive;
* backward: the codes of a residual pass through a barrier together with the cotangent inputs of
  the first equation that needs it, and are dequantised after it, so XLA cannot restore every
  residual of the network at the start of the backward pass.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.interpreters import partial_eval as pe

from jact import _affine, _chains, _compile, _context, _jaxpr, codec, hashing, info as info_lib, policies
from jact.info import ResidualInfo

DEFAULT_GROUP_SIZE = 256
DEFAULT_MIN_SIZE = 4096
# What a wrapped function's input is: a parameter (keep_argnums, closed-over values), an array of
# integers or booleans that is not differentiated (indices, masks), or a compressible activation;
# in a loop's body compressed on its own, also a float that carries no gradient (a graph's edge
# weights): "fixed".
_KEEP, _INDEX, _COMPRESSIBLE, _FIXED = "keep", "index", "compressible", "fixed"
_NOT_DIFFERENTIATED = frozenset({_INDEX, _FIXED})


def _kind(leaf: Any, kept: bool) -> str:
  if kept:
    return _KEEP
  return _COMPRESSIBLE if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) else _INDEX


@dataclasses.dataclass(frozen=True)
class _Config:
  policy: Any
  group_size: int
  min_size: int
  rounding: str
  kernel: str = "auto"
  compress_nonlinear: bool = False  # also residuals used nonlinearly (the inputs of a recomputation)


# --- residual analysis -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Residual:
  """One distinct residual of a traced call: where it lives in the forward jaxpr, how it is stored."""
  atom: Any  # a jaxpr Var or Literal of the forward jaxpr
  info: ResidualInfo
  ready_after: int  # forward equation index after which it can be quantised (-1: at the start)
  # The part of the forward jaxpr that rebuilds it (its inputs are those it reads).
  recompute: tuple[Any, tuple[int, ...]] | None = None
  # For a residual rebuilt from an affine relative (see jact._affine): (the relative's index,
  # its path, this residual's path).
  rebuild: tuple[int, Any, Any] | None = None

  @property
  def recomputed(self) -> bool:
    """Rebuilt in the backward pass from parameters, index inputs and constants."""
    return self.info.recomputed

  @property
  def compressed(self) -> bool:
    return self.info.bits != 32 and not _jaxpr.is_literal(self.atom)


@dataclasses.dataclass(eq=False)
class _Plan:
  """The forward and backward jaxprs of one traced call and what to do with each residual."""
  fwd: Any  # ClosedJaxpr: inputs -> outputs + residual leaves
  bwd: Any  # ClosedJaxpr: residual leaves + cotangents -> input cotangents
  num_outs: int
  residuals: list[_Residual]  # distinct residuals
  leaf_ids: list[int]  # residual leaf position -> index into `residuals`
  recompute_inputs: tuple[int, ...] = ()  # forward inputs (parameters, index inputs) recomputing reads
  rebuild_operands: tuple[Any, ...] = ()  # small forward values that rebuilding needs
  # For each of those: how to recompute it from parameters (`_recomputation`), or None: stored.
  operand_recompute: tuple[Any, ...] = ()
  _rules: dict = dataclasses.field(default_factory=dict)
  table: list[ResidualInfo] | None = None  # what jact.residuals lists, when not `infos` (loop bodies)

  @property
  def infos(self) -> list[ResidualInfo]:
    return [r.info for r in self.residuals]

  @functools.cached_property
  def stored_inputs(self) -> dict[int, int]:
    """Residual index -> input index, for the inputs stored as they are (parameters)."""
    invar_index = {v: i for i, v in enumerate(self.fwd.jaxpr.invars)}
    return {uid: invar_index[r.atom] for uid, r in enumerate(self.residuals)
            if not _jaxpr.is_literal(r.atom) and r.atom in invar_index and not r.compressed}

  def rule(self, name: str, config: "_Config") -> Callable:
    """The forward or backward rule of this plan as one function shared by every call.

    A deep network calls the same plan once per layer. As one XLA function marked for late
    inlining (see jact._compile), the layers' identical work is optimised and compiled once
    instead of once per layer, which cuts compile time several-fold.
    """
    if name not in self._rules:  # a plan belongs to one configuration
      body = _run_forward if name == "forward" else _run_backward
      shared = _compile.shared_jit(functools.partial(body, self, config))
      if name == "forward":
        self._rules[name] = lambda seed, inputs: _hand_over(self, *shared(seed, inputs), inputs)
      else:
        self._rules[name] = shared
    return self._rules[name]


def full_precision_config() -> _Config:
  """A configuration that keeps every residual: for describing plain functions."""
  return _Config(policies.uniform(32), DEFAULT_GROUP_SIZE, 0, "stochastic")


def analyse(fun: Callable, leaves: Sequence[Any], kept: Sequence[bool], labels: Sequence[str],
            scope: str, config: _Config) -> "_Plan":
  """The residual plan of `fun(*leaves)` without running anything; `kept` marks parameter leaves."""
  return _build_plan(fun, leaves, [_kind(leaf, k) for leaf, k in zip(leaves, kept)], labels, scope, config)


def _build_plan(pure: Callable, inputs: Sequence[Any], kinds: Sequence[str], labels: Sequence[str],
                scope: str, config: _Config) -> _Plan:
  vjp_tree = []

  fixed = [k == _FIXED for k in kinds]

  def forward_with_residuals(*xs):
    no_gradient = lambda *xs: pure(*[jax.lax.stop_gradient(x) if f else x for x, f in zip(xs, fixed)])
    outs, vjp_fn = jax.vjp(no_gradient, *xs)
    leaves, tree = jax.tree.flatten(vjp_fn)
    vjp_tree.append(tree)
    return outs, leaves

  fwd = jax.make_jaxpr(forward_with_residuals)(*inputs)
  num_res = vjp_tree[0].num_leaves
  out_avals, res_avals = fwd.out_avals[:-num_res or None], fwd.out_avals[len(fwd.out_avals) - num_res:]
  num_outs = len(out_avals)
  bwd = jax.make_jaxpr(lambda res, cts: jax.tree.unflatten(vjp_tree[0], res)(cts))(
      list(res_avals), [a.to_tangent_aval() for a in out_avals])
  residuals, leaf_ids = _classify(fwd.jaxpr, num_outs, kinds, labels, scope, config,
                                  _nonlinear(bwd.jaxpr, fwd.jaxpr.outvars[num_outs:]),
                                  _jaxpr.value_sets(fwd.jaxpr, fwd.consts))
  inputs_needed: set[int] = set()
  invar_index = {v: i for i, v in enumerate(fwd.jaxpr.invars)}
  alive = {invar_index[r.atom] for r in residuals if not _jaxpr.is_literal(r.atom) and r.atom in invar_index}
  for k, r in enumerate(residuals):
    if r.recomputed:
      pruned, inputs = recompute = _recomputation(fwd.jaxpr, r.atom)
      # Stored instead: what needs an activation (rebuilding would redo work on activations and
      # keep them alive), a value of index inputs that would keep more of their bytes alive than
      # it has, and work with effects (dead-code elimination keeps it; rebuilding would repeat it).
      index_bytes = sum(info_lib.aval_nbytes(fwd.jaxpr.invars[i].aval) for i in inputs
                        if kinds[i] in _NOT_DIFFERENTIATED and i not in alive)
      if (any(kinds[i] == _COMPRESSIBLE for i in inputs) or index_bytes > r.info.nbytes
          or any(eqn.effects for eqn in pruned.eqns)):
        residuals[k] = dataclasses.replace(r, info=dataclasses.replace(r.info, recomputed=False))
        continue
      inputs_needed.update(inputs)
      alive.update(inputs)
      residuals[k] = dataclasses.replace(r, recompute=recompute)
  # Small operands of rebuilding computed from parameters alone (a LayerNorm scale's broadcast)
  # are recomputed too: parameters are alive anyway.
  def from_parameters(v):
    pruned, inputs = recompute = _recomputation(fwd.jaxpr, v)
    if all(kinds[i] == _KEEP for i in inputs) and not any(eqn.effects for eqn in pruned.eqns):
      return recompute
    return None

  operands, operand_recompute = _store_affine_relatives_once(fwd.jaxpr, residuals, from_parameters)
  inputs_needed.update(i for r in operand_recompute if r is not None for i in r[1])
  return _Plan(fwd, bwd, num_outs, residuals, leaf_ids, tuple(sorted(inputs_needed)), operands, operand_recompute)


def _stacked_by_loops(infos: Sequence[ResidualInfo]) -> list[ResidualInfo]:
  return [r for r in infos if r.stacked_by_loop and r.compressed and not r.recomputed]


def _stacked_activations(infos: Sequence[ResidualInfo]) -> list[ResidualInfo]:
  """Activations a loop stacks that jact would compress under some width."""
  return [r for r in infos if r.stacked_by_loop and not r.recomputed and r.sized_by_policy]


def _body_rows(rules: dict) -> list[ResidualInfo]:
  """The residuals of the loop bodies of `rules`, as last traced."""
  return [r for rule in rules.values() if rule.body.last_plan is not None for r in rule.body.last_plan.infos]


def _bodies_compress(rules: dict) -> bool:
  """Whether the loop bodies compress any residual."""
  return any(r.compressed for r in _body_rows(rules))


def _bodies_unsized(rules: dict) -> bool:
  """Whether the policy left at full precision a residual of the loop bodies that it could compress."""
  return any(r.sized_by_policy and not r.compressed and not r.recomputed for r in _body_rows(rules))


def _warn_of_loop_stacks(scope: str, stacked: Sequence[ResidualInfo]) -> None:
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


@dataclasses.dataclass(frozen=True)
class _LoopBodyWidth:
  """The policy of a loop body whose enclosing policy names only the residuals as the loop would
  stack them (`<scope>/scan0`): `width` for what that policy keeps at full precision."""
  policy: Any
  width: int

  def __call__(self, info: ResidualInfo) -> int:
    bits = codec.check_bits(self.policy(info))
    return self.width if bits == 32 else bits


def _loop_rules(fun_jaxpr, kinds: Sequence[str], scope: str, config: _Config) -> dict[int, Callable]:
  """For each `lax.scan` of `fun_jaxpr` that activations flow through: a function that runs it
  with its body compressed on its own (equation index -> (seed, input values) -> output values)."""
  if not any(eqn.primitive.name == "scan" for eqn in fun_jaxpr.eqns):
    return {}
  deps = _jaxpr.dependence(fun_jaxpr, [frozenset({k}) for k in kinds])
  rules = {}
  for i, eqn in enumerate(fun_jaxpr.eqns):
    if eqn.primitive.name == "scan" and not eqn.effects:
      tags = _jaxpr.scan_input_dependence(
          eqn, [frozenset() if _jaxpr.is_literal(v) else deps.get(v, frozenset()) for v in eqn.invars])
      if any(_COMPRESSIBLE in t for t in tags):
        rules[i] = _loop_with_compressed_body(eqn, tags, f"{scope}/loop{len(rules)}", config)
  return rules


def _loop_with_compressed_body(eqn, tags: Sequence[frozenset], scope: str, config: _Config) -> Callable:
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
  config = dataclasses.replace(config, min_size=-(-config.min_size // max(1, eqn.params["length"])))
  consts, carry, xs = _jaxpr.scan_positions(eqn)
  kinds = []
  for k, (var, t) in enumerate(zip(eqn.invars, tags)):
    floating = jnp.issubdtype(var.aval.dtype, jnp.inexact)
    kinds.append(_KEEP if k in consts else _INDEX if not floating else _COMPRESSIBLE if _COMPRESSIBLE in t
                 else _KEEP if _KEEP in t else _FIXED)
  labels = [f"closure{j}" for j in range(len(closed.consts))] + [f"in{k}" for k in range(len(eqn.invars))]
  traced = _traced_for(closed.jaxpr, len(closed.consts), [_KEEP] * len(closed.consts) + kinds, labels,
                       scope, config)

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

    steps = jnp.arange(eqn.params["length"], dtype=jnp.uint32)
    carried, stacked = jax.lax.scan(step, [invals[k] for k in carry], (steps, [invals[k] for k in xs]),
                                    length=eqn.params["length"], reverse=eqn.params["reverse"],
                                    unroll=eqn.params["unroll"])
    return list(carried) + list(stacked)

  run.body, run.length = traced, eqn.params["length"]  # for the residual table (_with_loop_bodies)
  return run


NESTED = "stored by a nested compressed call"


def _with_loop_bodies(plan: "_Plan", rules: Sequence[Callable]) -> list[ResidualInfo]:
  """The residual table of a plan whose loops run with their bodies compressed: instead of the
  codes that the loops stack (rows kept as "nested"), the bodies' own residuals, each stacked
  over its loop's steps, with the width it is stored at. (Inputs a body keeps by reference are
  the loop's, listed by the enclosing call.) Where the bytes would not add up, the plan's rows."""
  body_rows = []
  for rule in rules:
    body = rule.body.last_plan
    if body is None:
      return plan.infos
    rows = body.infos if body.table is None else body.table  # (a body's own loops listed so too)
    body_rows += [dataclasses.replace(r, shape=(rule.length, *r.shape), loop_steps=(rule.length, *r.loop_steps))
                  for r in rows if not (r.is_argument and not r.compressed)]
  stacked = [r for r in plan.infos if r.stacked_by_loop and r.kept_because == NESTED]
  if sum(r.stored_nbytes for r in stacked) != sum(r.stored_nbytes for r in body_rows):
    return plan.infos
  return [r for r in plan.infos if not (r.stacked_by_loop and r.kept_because == NESTED)] + body_rows


def _store_affine_relatives_once(jaxpr, residuals: list[_Residual], from_parameters: Callable):
  """Marks compressed residuals that are affine functions of another one as rebuilt from it (see
  jact._affine); returns the small values their rebuilding needs, and for each how it is
  recomputed (`from_parameters(value)`: a `_recomputation`, or None where it is stored)."""
  candidates = {uid: r.atom for uid, r in enumerate(residuals)
                if r.compressed and not r.recomputed and not r.info.two_valued}
  groups = _affine.representatives(jaxpr, candidates)
  operands: list[Any] = []
  recompute: dict[Any, Any] = {}
  for uid, (rep, paths) in groups.items():
    # The group gets its finest width; values rebuilt from small values alone are exact.
    bits = 32 if rep is None else max(residuals[u].info.bits for u in paths)
    if uid != rep:
      representative = None if rep is None else paths[rep]
      needed = [v for v in _affine.small_operands(jaxpr, [p for p in (representative, paths[uid]) if p])
                if v not in operands]
      operands.extend(needed)
      recompute.update((v, from_parameters(v)) for v in needed)
      extra = sum(info_lib.aval_nbytes(v.aval) for v in needed if recompute[v] is None)
      info = dataclasses.replace(residuals[uid].info, bits=bits, extra_nbytes=extra,
                                 rebuilt_from="small values" if rep is None else residuals[rep].info.name)
      residuals[uid] = dataclasses.replace(residuals[uid], info=info, rebuild=(rep, representative, paths[uid]))
    else:
      residuals[uid] = dataclasses.replace(residuals[uid], info=dataclasses.replace(residuals[uid].info, bits=bits))
  return tuple(operands), tuple(recompute[v] for v in operands)


def _recomputation(jaxpr, atom) -> tuple[Any, tuple[int, ...]]:
  """The part of `jaxpr` that computes `atom`, and the inputs it reads (for values of parameters,
  index inputs and constants).

  Such values -- a transposed weight, a dropout mask drawn from a key, a graph's edges cut into
  chunks -- cost little to rebuild from inputs that are alive anyway, while storing them would
  keep a buffer alive from the forward to the backward pass. Dead-code elimination looks into
  loops and calls, so a value that a loop computes from its index inputs alone is rebuilt by a
  loop that does only that.
  """
  pruned, used = pe.dce_jaxpr(jaxpr.replace(outvars=[atom]), [True])
  return pruned, tuple(i for i, u in enumerate(used) if u)


def _nonlinear(bwd_jaxpr, residual_atoms) -> set:
  """Forward atoms of residuals that the backward pass uses non-polynomially (as a divisor, say).

  Stochastic rounding keeps the gradient unbiased when it is linear in a residual, and nearly so
  when polynomial (products of independent rounding errors average out; only an element's error
  times itself does not). As a divisor, a residual's rounding error is amplified where the value
  is small relative to its group's range, biasing the gradient: such residuals are kept.
  """
  positions: dict[Any, list[int]] = {}
  for i, atom in enumerate(residual_atoms):
    if not _jaxpr.is_literal(atom):
      positions.setdefault(atom, []).append(i)
  num_in = len(bwd_jaxpr.invars)
  out = set()
  for atom, where in positions.items():
    if not jnp.issubdtype(atom.aval.dtype, jnp.floating):
      continue
    marked = [1 if i in where else 0 for i in range(num_in)]
    if max(_jaxpr.degrees(bwd_jaxpr, marked), default=0) == _jaxpr.NONLINEAR:
      out.add(atom)
  return out


def _classify(jaxpr, num_outs: int, kinds: Sequence[str], labels: Sequence[str], scope: str,
              config: _Config, nonlinear: set, value_sets: dict) -> tuple[list[_Residual], list[int]]:
  deps = _jaxpr.dependence(jaxpr, [frozenset({k}) for k in kinds])
  producer_index = {v: i for i, eqn in enumerate(jaxpr.eqns) for v in eqn.outvars}
  producers = _jaxpr.producers(jaxpr)
  last_use = _jaxpr.last_uses(jaxpr)
  invar_index = {v: i for i, v in enumerate(jaxpr.invars)}
  counters: dict[str, int] = {}
  residuals: list[_Residual] = []
  seen: dict[Any, int] = {}
  leaf_ids = []
  for atom in jaxpr.outvars[num_outs:]:
    if not _jaxpr.is_literal(atom) and atom in seen:  # the same array saved twice: stored once
      leaf_ids.append(seen[atom])
      continue
    aval = atom.aval
    primitive, is_argument = None, False
    producer = None if _jaxpr.is_literal(atom) else producers.get(atom)
    marked = _jaxpr.mark(jaxpr, atom, producers)
    nested = marked == STORED_MARK
    # While calibrate probes, a loop body's residuals come out of the loop under their own names.
    exposed = marked[len(EXPOSED_MARK):] if marked and marked.startswith(EXPOSED_MARK) else ""
    if _jaxpr.is_literal(atom):
      source, label = info_lib.CONSTANT, "literal"
    elif atom in invar_index:
      i = invar_index[atom]
      is_argument, label = True, labels[i]
      source = (info_lib.PARAMETER if kinds[i] == _KEEP else info_lib.INDEX if kinds[i] in _NOT_DIFFERENTIATED
                else info_lib.INPUT)
    else:
      primitive = producer.primitive.name if producer is not None else None
      scopes = _jaxpr.scope_names(producer) if producer is not None else []
      chain = [name for name in scopes if _chains.is_chain_scope(name)]
      inner = [name for name in scopes if not _chains.is_chain_scope(name)]
      if inner and inner[0] == scope.rsplit("/", 1)[-1]:  # Flax re-enters the module's own scope
        inner = inner[1:]
      # A rewritten elementwise chain stores its derivative (see _chains); a nested compressed
      # call, its codes and bounds.
      kind = "derivative" if chain else "nested" if nested else primitive or "const"
      path = "/".join(inner + chain[-1:] + [kind])
      count = counters.get(path, 0)
      counters[path] = count + 1
      label = f"{path}{count}"
      tags = deps.get(atom, frozenset())
      source = (info_lib.ACTIVATION if _COMPRESSIBLE in tags
                else info_lib.INDEX if tags & _NOT_DIFFERENTIATED
                else info_lib.PARAMETER if tags else info_lib.CONSTANT)
    values = None if _jaxpr.is_literal(atom) else value_sets.get(atom)
    stacked = (producer is not None and producer.primitive.name == "scan"
               and producer.outvars.index(atom) >= len(_jaxpr.scan_carry_positions(producer)))
    info = ResidualInfo(name=exposed or f"{scope}/{label}", shape=tuple(aval.shape), dtype=aval.dtype,
                        source=source, is_argument=is_argument, primitive=primitive, stacked_by_loop=stacked,
                        group_size=config.group_size,
                        two_valued=(values is not None and jnp.issubdtype(aval.dtype, jnp.floating)
                                    and codec.exact_at_one_bit(values, aval.dtype)))
    info = _choose_bits(info, config, used_nonlinearly=not config.compress_nonlinear
                        and not _jaxpr.is_literal(atom) and atom in nonlinear)
    if nested and source not in info_lib.RECOMPUTABLE:
      # Stored by a compressed call nested in this one: its codes and bounds are kept as they are
      # (rounding a group's bounds would break its decoding).
      info = dataclasses.replace(info, bits=32, kept_because=NESTED)
    if _jaxpr.is_literal(atom):
      ready = -1
    else:
      ready = max(producer_index.get(atom, -1), last_use.get(atom, -1))
      seen[atom] = len(residuals)
    leaf_ids.append(len(residuals))
    recomputed = (source in info_lib.RECOMPUTABLE and not is_argument and not _jaxpr.is_literal(atom))
    residuals.append(_Residual(atom, dataclasses.replace(info, recomputed=recomputed), ready))
  return residuals, leaf_ids


def _choose_bits(info: ResidualInfo, config: _Config, used_nonlinearly: bool) -> ResidualInfo:
  if info.source in info_lib.RECOMPUTABLE:
    return dataclasses.replace(info, kept_because=info.source)
  if not jnp.issubdtype(info.dtype, jnp.floating):
    return dataclasses.replace(info, kept_because="not floating point")
  if info.size < config.min_size:
    return dataclasses.replace(info, kept_because=f"< min_size={config.min_size}")
  if used_nonlinearly:
    return dataclasses.replace(info, kept_because="nonlinear in backward")
  if len(info.shape) >= 2 and info.shape[-1] == 1:
    # One value per row (a softmax's 1/s**2, a LayerNorm's 1/sigma, a node's degree): a group
    # would span rows of unrelated scales, and rounding the small ones scales whole rows'
    # gradients. At 1/(row length) of the row's bytes, keeping them costs little.
    return dataclasses.replace(info, kept_because="per-row statistic")
  bits = config.policy(info)
  try:
    bits = codec.check_bits(bits, what="bits")
  except ValueError:
    raise ValueError(f"the policy {config.policy!r} returned bits={bits!r} for residual {info.name!r}; "
                     f"a policy must return one of {codec.SUPPORTED_BITS} or None.") from None
  if info.two_valued and bits != 32:
    bits = 1  # a mask: exact at 1 bit, so any narrower width than the policy's loses nothing
  return dataclasses.replace(info, bits=bits)


# --- forward and backward evaluation -------------------------------------------------------------

def _residual_seed(seed: jax.Array, index: int) -> jax.Array:
  """A distinct seed per residual; `quantize` scrambles it with a bijective hash."""
  return seed ^ np.uint32((index + 1) * 0x9E3779B9 % 2**32)


_LOOPS = frozenset({"scan", "while"})


def _loop_constants_made_late(jaxpr, constant: dict, eqn, invals: list[Any], env) -> list[Any]:
  """`invals` of a loop, with the constants it carries (the zeros a scan accumulates into)
  rebuilt so that XLA computes them only once the loop's other inputs exist.

  XLA schedules an instruction that reads no runtime value early, at the start of the step, and
  a loop needs its carry in a buffer of its own: the constant is materialised there and kept
  alive until the loop runs -- in a graph network, a node-sized buffer per message-passing layer,
  alive across the whole forward or backward pass. Passing the constant's literal inputs through
  a barrier with the loop's runtime inputs makes it wait for them.
  """
  if eqn.primitive.name not in _LOOPS:
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


def _run_forward(plan: _Plan, config: _Config, seed: jax.Array, inputs: Sequence[Any], compress: bool = True):
  """Outputs and the residuals it computes; with `compress=False` every residual is kept as it is.

  The stored list holds one entry per residual (None for those rebuilt in the backward pass), then
  the small values that rebuilding reads (`plan.rebuild_operands`).
  Inputs stored as they are (`plan.stored_inputs`) are left as None: `_hand_over` adds them
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

  def quantize_ready(index: int):
    for uid in ready.get(index, ()):
      r = plan.residuals[uid]
      pending.append((uid, codec.quantize(env.read(r.atom), r.info.bits, config.group_size,
                                          config.rounding, seed=_residual_seed(seed, uid), kernel=config.kernel)))

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
    invals = _loop_constants_made_late(jaxpr, constant, eqn, invals, env)
    for var, value in zip(eqn.outvars, _jaxpr.eval_eqn(eqn, invals)):
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


def _hand_over(plan: _Plan, outs: list[Any], stored: list[Any], inputs: Sequence[Any]):
  """`_run_forward`'s results completed with the inputs stored as they are and those that
  recomputations read: the residuals the backward pass receives."""
  stored = list(stored)
  for uid, i in plan.stored_inputs.items():
    stored[uid] = inputs[i]
  return outs, stored + [inputs[i] for i in plan.recompute_inputs]


def _recompute(plan: _Plan, parameters: Sequence[Any], recompute: tuple[Any, tuple[int, ...]]) -> Any:
  """A recomputed value (`_recomputation`), from the inputs the forward pass handed over."""
  jaxpr, inputs = recompute
  value_of = dict(zip(plan.recompute_inputs, parameters))
  (value,) = _jaxpr.eval_jaxpr(jaxpr, plan.fwd.consts, *[value_of[i] for i in inputs])
  return value


def _run_backward(plan: _Plan, config: _Config, stored: Sequence[Any], cts: Sequence[Any]):
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
    sources = [(None if plan.residuals[u].rebuild[0] is None else stored[plan.residuals[u].rebuild[0]])
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
      if plan.residuals[uid].recomputed:
        value = _recompute(plan, params, plan.residuals[uid].recompute)
      else:
        if isinstance(value, codec.QuantizedArray):
          value = codec.dequantize(value, kernel=config.kernel)
        if uid in rebuilding:
          _, representative, member = plan.residuals[uid].rebuild
          value = _affine.rebuild(plan.fwd.jaxpr, representative, member, value, small)
      restore(uid, value)
      waiting.discard(uid)

  for eqn in jaxpr.eqns:
    invals = [None if (not _jaxpr.is_literal(v) and uid_of.get(v) in waiting) else env.read(v)
              for v in eqn.invars]
    restore_for(eqn.invars, invals)
    invals = [env.read(v) if value is None else value for v, value in zip(eqn.invars, invals)]
    invals = _loop_constants_made_late(jaxpr, constant, eqn, invals, env)
    outs = _jaxpr.eval_eqn(eqn, invals)
    for var, value in zip(eqn.outvars, outs):
      env.write(var, value)
    previous[:] = [v for var, v in zip(eqn.outvars, outs)
                   if jnp.issubdtype(jnp.result_type(v), jnp.inexact) and var not in left_out]
  restore_for(jaxpr.outvars, None)
  return [env.read(v) for v in jaxpr.outvars]


@jax.tree_util.register_pytree_node_class
class _Stored:
  """The custom_vjp residuals: the stored arrays, with the plan that made them as static data."""

  def __init__(self, arrays, plan):
    self.arrays, self.plan = arrays, plan

  def tree_flatten(self):
    return (self.arrays,), self.plan

  @classmethod
  def tree_unflatten(cls, plan, children):
    return cls(children[0], plan)


# --- the public transform ------------------------------------------------------------------------

STORED_MARK = "jact:stored"  # checkpoint_name of what a compressed call stores (for enclosing ones)
EXPOSED_MARK = STORED_MARK + ":"  # + a residual's name: a loop body's residual that calibrate probes


def _marked(plan: _Plan, stored: Sequence[Any], by_reference: bool = True, exposing: bool = False) -> list[Any]:
  """A plan's handed-over residuals with what its forward rule made marked, so that an enclosing
  compressed call keeps it as it is (see _classify); with `exposing`, what the policy sizes is
  marked with its own name instead, for calibrate to probe. Inputs handed over as they are stay
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


class _Traced:
  """Everything shared by calls that trace to the same function: its jaxpr, chains and plans.

  The custom_vjp built here closes over no tracer (constants and closed-over values arrive as
  arguments), so an entry can serve every later call whose traced function has the same structure:
  the 16 identical layers of a deep network are analysed once.
  """

  def __init__(self, fun_jaxpr, num_consts: int, kinds, labels, scope: str, config: _Config):
    self.plans: dict[tuple, _Plan] = {}
    chains = _chains.find_chains(fun_jaxpr)
    # Loops whose residuals the loop itself would stack at full precision run with their body
    # compressed on its own (see _loop_with_compressed_body), once a plan has found such residuals.
    self.loop_rules: dict[int, Callable] = {}
    loop_rules = _loop_rules(fun_jaxpr, kinds, scope, config)
    # A function with such loops takes the call's seed as its first input, for the loops' bodies:
    # without it, calls with different `rng`s would round the bodies' residuals alike.
    self.takes_seed = bool(loop_rules)
    own_kinds = kinds
    if self.takes_seed:
      kinds, labels = [_INDEX, *kinds], ["seed", *labels]

    def pure(*inputs):
      seed, inputs = (inputs[0], inputs[1:]) if self.takes_seed else (None, inputs)
      # (While calibrate probes, every such loop runs with its body's residuals exposed by name.)
      active = loop_rules if _context.current().probe is not None else self.loop_rules
      rules = {i: functools.partial(rule, seed) for i, rule in active.items()}
      return _chains.eval_jaxpr(fun_jaxpr, chains, inputs[:num_consts], *inputs[num_consts:], rules=rules)

    def with_seed(seed, inputs) -> list[Any]:
      """The inputs of `pure` and of the plans."""
      return [seed, *inputs] if self.takes_seed else list(inputs)

    def own_gradients(grads):
      """Cotangents of the call's inputs, without the seed's."""
      return grads[1:] if self.takes_seed else grads

    self.last_plan: _Plan | None = None  # the last one built or served outside calibration

    def plan_for(inputs) -> _Plan:
      # (While calibrate probes, loops run with their bodies' residuals exposed: see `exposed`.)
      probing = _context.current().probe is not None
      key = (tuple(jax.typeof(x) for x in inputs), probing)
      if key not in self.plans:
        # Compressed calls nested in this one are traced here only to find this call's residuals.
        with _context.collecting_nothing():
          plan = _build_plan(pure, inputs, kinds, labels, scope, config)
          stacked = _stacked_by_loops(plan.infos)
          if not probing and loop_rules and not self.loop_rules and _stacked_activations(plan.infos):
            # Loops stack activations: run them with their bodies compressed on their own, and
            # keep that when nothing compressed is stacked any more, if something was (the
            # bodies may store less by rebuilding what they stacked) or the bodies compress
            # something (a policy from jact.calibrate names the bodies' residuals, not the
            # stacked ones).
            self.loop_rules = loop_rules
            rewritten = _build_plan(pure, inputs, kinds, labels, scope, config)
            if stacked and _bodies_unsized(loop_rules):
              # The policy names the residuals only as the loops stack them (written so by hand,
              # or calibrated by an older jact): the bodies get the finest width it gives those.
              width = max(r.bits for r in stacked)
              self.loop_rules = _loop_rules(fun_jaxpr, own_kinds, scope,
                                            dataclasses.replace(config, policy=_LoopBodyWidth(config.policy, width)))
              rewritten = _build_plan(pure, inputs, kinds, labels, scope, config)
            if _stacked_by_loops(rewritten.infos) or not (stacked or _bodies_compress(self.loop_rules)):
              self.loop_rules = {}  # the loops run as they are
            else:
              self.plans = {k: p for k, p in self.plans.items() if k[1]}  # traced without them
              plan = rewritten
        if not probing:
          _warn_of_loop_stacks(scope, _stacked_by_loops(plan.infos))
          if self.loop_rules:
            plan.table = _with_loop_bodies(plan, list(self.loop_rules.values()))
        self.plans[key] = plan
      if not probing:
        self.last_plan = self.plans[key]
      return self.plans[key]

    def primal(seed, *inputs):
      return pure(*with_seed(seed, inputs))

    core = jax.custom_vjp(primal)

    def core_fwd(seed, *inputs):
      inputs = with_seed(seed, inputs)
      plan = plan_for(inputs)
      regions = _context.current().regions
      outs, stored = plan.rule("forward", config)(seed, list(inputs))
      if regions is not None:
        regions.append(info_lib.ResidualTable(plan.infos if plan.table is None else plan.table))
      # (While jact.residuals collects, nothing is compiled: all is marked, as this call's.)
      return outs, _Stored(_marked(plan, stored, by_reference=regions is None), plan)

    def core_bwd(res, cts):
      grads = res.plan.rule("backward", config)(res.arrays, list(cts))
      return (np.zeros((), jax.dtypes.float0), *own_gradients(grads))

    core.defvjp(core_fwd, core_bwd)
    self.core = core
    self.plan_for, self.with_seed = plan_for, with_seed

    @jax.custom_vjp
    def probed(seed, deltas, *inputs):
      return pure(*with_seed(seed, inputs))

    def probed_fwd(seed, deltas, *inputs):
      inputs = with_seed(seed, inputs)
      plan = plan_for(inputs)
      state = _context.current()
      probe = state.probe
      if state.regions is not None:
        state.regions.append(info_lib.ResidualTable(plan.infos))
      outs, stored = _hand_over(plan, *_run_forward(plan, config, seed, inputs, compress=False), inputs)
      for r, value in zip(plan.residuals, stored):
        if r.info.sized_by_policy:
          probe.captured[probe.key(r.info.name)] = value
      return outs, (_Stored(stored, plan), deltas)

    def probed_bwd(res, cts):
      stored, deltas = res
      perturbed = [a if d is None else a + d.astype(a.dtype) for a, d in zip(stored.arrays, deltas)]
      perturbed += stored.arrays[len(deltas):]  # the parameters kept for recomputation
      grads = _run_backward(stored.plan, config, perturbed, list(cts))
      return (np.zeros((), jax.dtypes.float0), jax.tree.map(jnp.zeros_like, deltas), *own_gradients(grads))

    probed.defvjp(probed_fwd, probed_bwd)
    self.probed = probed

    exposed = jax.custom_vjp(primal)

    def exposed_fwd(seed, *inputs):
      # A loop's body while calibrate probes: every residual stored as it is; those calibrate
      # could compress marked with their names, so that the enclosing call probes them stacked.
      inputs = with_seed(seed, inputs)
      plan = plan_for(inputs)
      outs, stored = _hand_over(plan, *_run_forward(plan, config, seed, inputs, compress=False), inputs)
      return outs, _Stored(_marked(plan, stored, exposing=True), plan)

    exposed.defvjp(exposed_fwd, core_bwd)
    self.call_exposing = lambda seed, inputs: exposed(seed, *inputs)

  def call(self, seed, inputs):
    probe = _context.current().probe
    if probe is None:
      return self.core(seed, *inputs)
    # Probing: the sensitivity pass perturbs residuals in the backward pass by `deltas`.
    plan = self.plan_for(self.with_seed(seed, inputs))
    counts = dict(probe.counts)
    deltas = []
    for r in plan.residuals:
      eligible = r.info.sized_by_policy
      deltas.append(probe.deltas.get((r.info.name, counts.get(r.info.name, 0))) if eligible else None)
      if eligible:
        counts[r.info.name] = counts.get(r.info.name, 0) + 1
    return self.probed(seed, deltas, *inputs)


_TRACED: dict[tuple, _Traced] = {}
_TRACED_CAPACITY = 256


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


def _traced_for(fun_jaxpr, num_consts: int, kinds, labels, scope: str, config: _Config) -> _Traced:
  key = (_structure(fun_jaxpr), num_consts, tuple(kinds), tuple(labels), scope, config)
  try:
    entry = _TRACED.get(key)
  except TypeError:  # an unhashable policy: no sharing
    return _Traced(fun_jaxpr, num_consts, kinds, labels, scope, config)
  if entry is None:
    if len(_TRACED) >= _TRACED_CAPACITY:
      _TRACED.pop(next(iter(_TRACED)))
    entry = _TRACED[key] = _Traced(fun_jaxpr, num_consts, kinds, labels, scope, config)
  return entry


def _seed_from(rng) -> jax.Array:
  if rng is None:
    return jnp.uint32(0)
  if isinstance(rng, (int, np.integer)):
    return jnp.uint32(rng)
  rng = jnp.asarray(rng) if not hasattr(rng, "dtype") else rng
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  if not jnp.issubdtype(rng.dtype, jnp.integer):
    raise TypeError(f"rng must be a jax.random key, raw uint32 key data or an int; got dtype {rng.dtype}.")
  seed = jnp.uint32(0)
  for word in rng.astype(jnp.uint32).reshape(-1):
    seed = hashing.fmix32(seed ^ word)
  return seed


def _arg_names(fun: Callable, num_args: int) -> list[str]:
  try:
    params = list(inspect.signature(fun).parameters.values())
  except (TypeError, ValueError):
    params = []
  names = []
  for i in range(num_args):
    if i < len(params) and params[i].kind in (params[i].POSITIONAL_ONLY, params[i].POSITIONAL_OR_KEYWORD):
      names.append(params[i].name)
    else:
      names.append(f"arg{i}")
  return names


def _key_label(entry) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _check_argnums(argnums, what: str) -> tuple[int, ...]:
  argnums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
  for a in argnums:
    if isinstance(a, bool) or not isinstance(a, (int, np.integer)) or a < 0:
      raise ValueError(f"{what} must be non-negative ints, got {argnums!r}.")
  return tuple(int(a) for a in argnums)


def remat_compress(fun: Callable | None = None, bits: policies.BitsOrPolicy = 2, *,
                   keep_argnums: int | Sequence[int] = (), static_argnums: int | Sequence[int] = (),
                   group_size: int = DEFAULT_GROUP_SIZE, min_size: int = DEFAULT_MIN_SIZE,
                   rounding: str = "stochastic", kernel: str = "auto", recompute: bool = False,
                   name: str | None = None) -> Callable:
  """Makes `fun` store its autodiff residuals compressed, like `jax.checkpoint` makes it recompute them.

  `remat_compress(f)(*args)` computes the same value as `f(*args)`. When it is differentiated in
  reverse mode (`jax.grad`, `jax.vjp`, ...), every residual that the forward pass of `f` hands to
  its backward pass -- the values autodiff keeps alive between the two -- is stored quantised to
  `bits` per value (per-group scale, stochastic rounding by default, so gradients stay unbiased)
  and restored just before the backward pass needs it. There is no per-operation code: whatever
  primitives `f` uses, their residuals are covered.

  What is never compressed: arguments listed in `keep_argnums` (parameters: they are alive anyway),
  values `f` closes over, values computed from those alone, constants, non-float residuals,
  residuals with fewer than `min_size` elements, residuals the backward pass uses non-polynomially,
  and per-row statistics (residuals whose innermost axis has extent 1, such as a softmax's
  normaliser: a group would span rows of unrelated scales). Masks -- residuals that provably take
  two values which 1-bit codes represent exactly, such as a ReLU's derivative -- are stored at
  1 bit whatever `bits` says (unless 32), without error.

  Example::

    def layer(x, w):
      return jax.nn.gelu(x @ w)

    layer = jact.remat_compress(layer, bits=2, keep_argnums=(1,))
    loss = lambda w, x: jnp.sum(layer(x, w) ** 2)
    grads = jax.grad(loss)(w, x)          # residuals of `layer` stored at 2 bits
    print(jact.residuals(loss, w, x))     # which residuals, at which width, how many bytes

  Costs: one quantise pass over each residual in the forward pass and one dequantise pass in the
  backward pass, no recomputation. Memory: a residual at b bits takes b/32 of its float32 bytes
  plus 4 bytes per group. Wrap each layer (or block) separately: memory falls when the
  full-precision residuals of one wrapped call die before the next call runs.

  With `recompute=True` it makes jax.checkpoint's trade at a fraction of its memory: only the
  inputs are stored (compressed), and the backward pass recomputes `fun` from them, compressing
  the recomputed residuals too, so that neither the stored inputs nor the backward pass's working
  set is full precision. It costs one extra forward pass, like `jax.checkpoint`. The recomputed
  forward starts from the decoded inputs, so its gradient is the gradient at a point within the
  codec's error of the input: not unbiased, as the default mode is.

  Composes with `jit`, `grad`, `vmap`, `lax.scan` and `jax.checkpoint`. A `lax.scan` inside `fun`
  whose residuals would be compressed runs with its body compressed on its own, so that each step
  quantises its residuals (the loop would otherwise stack them at full precision first).
  Forward-mode differentiation (`jvp`, `jacfwd`, `hessian`) is not supported and raises a
  TypeError.

  Args:
    fun: the function to wrap; its arguments and outputs may be pytrees of arrays.
    bits: an int (1, 2, 4, 8, 16, 32; None means 32) or a policy (`jact.policies`), which chooses a
      width per residual from its `jact.ResidualInfo`.
    keep_argnums: positional arguments never compressed (parameters).
    static_argnums: positional arguments that are not arrays (flags, modules), passed as they are.
    group_size: elements sharing one scale; a positive multiple of 64.
    min_size: residuals with fewer elements are kept as they are (in a loop compressed step by
      step, a body's residual counts with all the steps the loop keeps it for).
    rounding: "stochastic" (unbiased) or "nearest".
    kernel: the codec's implementation: "auto" (fused Pallas kernels on GPU, jax.numpy elsewhere),
      "pallas" or "xla"; see `jact.quantize`.
    recompute: store only the (compressed) inputs and recompute `fun` in the backward pass.
    name: the scope of residual names (default: `fun.__name__`).

  Returns:
    A function with the signature of `fun` plus an optional keyword argument `rng` (a
    `jax.random` key or an int) that selects the rounding noise. Without `rng` the noise is a
    hash of each residual's own values: the same inputs give bitwise the same gradients, and new
    inputs get new noise.
  """
  options = dict(bits=bits, keep_argnums=keep_argnums, static_argnums=static_argnums,
                 group_size=group_size, min_size=min_size, rounding=rounding, kernel=kernel, name=name)
  if fun is None:
    return functools.partial(remat_compress, recompute=recompute, **options)
  if not callable(fun):
    raise TypeError(f"remat_compress expects a callable, got {type(fun).__name__}.")
  keep_argnums = _check_argnums(keep_argnums, "keep_argnums")
  static_argnums = _check_argnums(static_argnums, "static_argnums")
  if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
    raise ValueError(f"min_size={min_size!r} must be a non-negative int (a number of elements).")
  config = _Config(policies.resolve(bits), codec.check_group_size(group_size), int(min_size),
                   codec.check_rounding(rounding), codec.check_kernel(kernel))
  base_scope = name or getattr(fun, "__name__", type(fun).__name__)
  if recompute:
    # Store only the inputs of `fun`, compressed even though the recomputation uses them
    # nonlinearly; in the backward pass jax.checkpoint reruns the compressed `fun`.
    inner = functools.wraps(fun)(jax.checkpoint(remat_compress(fun, **{**options, "name": base_scope}),
                                                static_argnums=static_argnums))
    return _compress(inner, dataclasses.replace(config, compress_nonlinear=True), keep_argnums,
                     static_argnums, base_scope)
  return _compress(fun, config, keep_argnums, static_argnums, base_scope)


def _compress(fun: Callable, config: _Config, keep_argnums: tuple[int, ...],
              static_argnums: tuple[int, ...], base_scope: str) -> Callable:
  """`remat_compress` once its arguments are checked."""

  @functools.wraps(fun)
  def wrapped(*args, rng=None, **kwargs):
    for a in static_argnums + keep_argnums:
      if a >= len(args):
        raise ValueError(f"argnum {a} in keep_argnums/static_argnums of {base_scope!r}, but it was "
                         f"called with {len(args)} positional arguments.")
    names = _arg_names(fun, len(args))
    dynamic = [i for i in range(len(args)) if i not in static_argnums]
    path_leaves, in_tree = jax.tree_util.tree_flatten_with_path(
        ([args[i] for i in dynamic], kwargs))
    leaves = [leaf for _, leaf in path_leaves]
    kinds, labels = [], []
    for path, leaf in path_leaves:
      if not isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, complex)):
        raise TypeError(f"{base_scope}: argument {jax.tree_util.keystr(path)} is a "
                        f"{type(leaf).__name__}, not an array; pass non-array arguments through "
                        "static_argnums.")
      top = path[0].idx if hasattr(path[0], "idx") else 1
      if top == 0:  # a positional argument
        position = dynamic[path[1].idx]
        label = "/".join([names[position]] + [_key_label(p) for p in path[2:]])
        kinds.append(_kind(leaf, position in keep_argnums))
      else:
        label = "/".join(_key_label(p) for p in path[1:])
        kinds.append(_kind(leaf, False))
      labels.append(label)
    out_tree = []

    def flat_fun(*leaves):
      dyn, kw = jax.tree.unflatten(in_tree, leaves)
      full = list(args)
      for i, value in zip(dynamic, dyn):
        full[i] = value
      outs, tree = jax.tree.flatten(fun(*full, **kw))
      out_tree.append(tree)
      return outs

    fun_jaxpr = jax.make_jaxpr(flat_fun)(*leaves)
    consts = list(fun_jaxpr.consts)
    scope = "/".join(_jaxpr.current_scope() + [base_scope])
    override = _context.current().policy
    call_config = config if override is None else dataclasses.replace(config, policy=override)
    traced = _traced_for(fun_jaxpr.jaxpr, len(consts), [_KEEP] * len(consts) + kinds,
                         [f"closure{i}" for i in range(len(consts))] + labels, scope, call_config)
    try:
      outs = traced.call(_seed_from(rng), consts + leaves)
    except TypeError as e:
      if "forward-mode" in str(e):
        raise TypeError(
            f"{base_scope}: jact.remat_compress supports reverse-mode differentiation only (grad, "
            "vjp, value_and_grad). Forward mode (jvp, jacfwd, hessian, linearize) would need the "
            "full-precision residuals that jact does not keep; differentiate the uncompressed "
            "function in forward mode instead.") from e
      raise
    return jax.tree.unflatten(out_tree[0], outs)

  return wrapped
