"""The plan of one traced call: its forward and backward jaxprs and how each residual is stored.

`build_plan` differentiates the (rewritten) function once with `jax.vjp` and reads the residuals
off the VJP's leaves: the forward jaxpr returns them as extra outputs, the backward jaxpr takes
them with the cotangents. Each distinct residual is then classified (`jact._classify`) and given
its storage: quantised at its width, kept, recomputed in the backward pass from parameters and
index inputs, or rebuilt from an affine relative that is stored once (`jact.rewrites.affine`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
from jax.interpreters import partial_eval as pe

from jact import _jaxpr, info as info_lib
from jact._classify import (InputKind, Rebuild, Recomputation, Residual, classify, input_kind,
                            nonlinear)
from jact._options import Options
from jact.info import ResidualInfo
from jact.rewrites import affine


@dataclasses.dataclass(eq=False)
class Plan:
  """The forward and backward jaxprs of one traced call and what to do with each residual."""
  fwd: Any  # ClosedJaxpr: inputs -> outputs + residual leaves
  bwd: Any  # ClosedJaxpr: residual leaves + cotangents -> input cotangents
  num_outs: int
  residuals: list[Residual]  # distinct residuals
  leaf_ids: list[int]  # residual leaf position -> index into `residuals`
  recompute_inputs: tuple[int, ...] = ()  # forward inputs (parameters, index inputs) recomputing reads
  rebuild_operands: tuple[Any, ...] = ()  # small forward values that rebuilding needs
  # For each of those: how to recompute it from parameters, or None: stored.
  operand_recompute: tuple[Recomputation | None, ...] = ()
  compiled_rules: dict = dataclasses.field(default_factory=dict)  # see jact._schedule.rule
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


def full_precision_options() -> Options:
  """Options that keep every residual: for describing plain functions."""
  return Options.create(32, min_size=0)


def analyse(fun: Callable, leaves: Sequence[Any], kept: Sequence[bool], labels: Sequence[str],
            scope: str, options: Options) -> Plan:
  """The residual plan of `fun(*leaves)` without running anything; `kept` marks parameter leaves."""
  return build_plan(fun, leaves, [input_kind(leaf, k) for leaf, k in zip(leaves, kept)], labels, scope, options)


def build_plan(pure: Callable, inputs: Sequence[Any], kinds: Sequence[InputKind], labels: Sequence[str],
               scope: str, options: Options) -> Plan:
  """Differentiates `pure(*inputs)` once and decides how each residual is stored."""
  vjp_tree = []
  fixed = [k is InputKind.FIXED for k in kinds]

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
  residuals, leaf_ids = classify(fwd.jaxpr, num_outs, kinds, labels, scope, options,
                                 nonlinear(bwd.jaxpr, fwd.jaxpr.outvars[num_outs:]),
                                 _jaxpr.value_sets(fwd.jaxpr, fwd.consts))
  inputs_needed = _recompute_what_parameters_give(fwd.jaxpr, residuals, kinds)

  # Small operands of rebuilding computed from parameters alone (a LayerNorm scale's broadcast)
  # are recomputed too: parameters are alive anyway.
  def from_parameters(v) -> Recomputation | None:
    recompute = recomputation(fwd.jaxpr, v)
    if (all(kinds[i] is InputKind.KEPT for i in recompute.inputs)
        and not any(eqn.effects for eqn in recompute.jaxpr.eqns)):
      return recompute
    return None

  operands, operand_recompute = _store_affine_relatives_once(fwd.jaxpr, residuals, from_parameters)
  inputs_needed.update(i for r in operand_recompute if r is not None for i in r.inputs)
  return Plan(fwd, bwd, num_outs, residuals, leaf_ids, tuple(sorted(inputs_needed)), operands, operand_recompute)


def _recompute_what_parameters_give(jaxpr, residuals: list[Residual], kinds: Sequence[InputKind]) -> set[int]:
  """Gives each residual classed as recomputed its recomputation, or stores it instead; returns
  the forward inputs the recomputations read."""
  inputs_needed: set[int] = set()
  invar_index = {v: i for i, v in enumerate(jaxpr.invars)}
  alive = {invar_index[r.atom] for r in residuals if not _jaxpr.is_literal(r.atom) and r.atom in invar_index}
  for k, r in enumerate(residuals):
    if not r.recomputed:
      continue
    recompute = recomputation(jaxpr, r.atom)
    # Stored instead: what needs an activation (rebuilding would redo work on activations and
    # keep them alive), a value of index inputs that would keep more of their bytes alive than
    # it has, and work with effects (dead-code elimination keeps it; rebuilding would repeat it).
    index_bytes = sum(info_lib.aval_nbytes(jaxpr.invars[i].aval) for i in recompute.inputs
                      if not kinds[i].differentiated and i not in alive)
    if (any(kinds[i] is InputKind.COMPRESSIBLE for i in recompute.inputs) or index_bytes > r.info.nbytes
        or any(eqn.effects for eqn in recompute.jaxpr.eqns)):
      residuals[k] = dataclasses.replace(r, info=dataclasses.replace(r.info, recomputed=False))
      continue
    inputs_needed.update(recompute.inputs)
    alive.update(recompute.inputs)
    residuals[k] = dataclasses.replace(r, recompute=recompute)
  return inputs_needed


def recomputation(jaxpr, atom) -> Recomputation:
  """The part of `jaxpr` that computes `atom`, and the inputs it reads (for values of parameters,
  index inputs and constants).

  Such values -- a transposed weight, a dropout mask drawn from a key, a graph's edges cut into
  chunks -- cost little to rebuild from inputs that are alive anyway, while storing them would
  keep a buffer alive from the forward to the backward pass. Dead-code elimination looks into
  loops and calls, so a value that a loop computes from its index inputs alone is rebuilt by a
  loop that does only that.
  """
  pruned, used = pe.dce_jaxpr(jaxpr.replace(outvars=[atom]), [True])
  return Recomputation(pruned, tuple(i for i, u in enumerate(used) if u))


def _store_affine_relatives_once(jaxpr, residuals: list[Residual], from_parameters: Callable):
  """Marks compressed residuals that are affine functions of another one as rebuilt from it (see
  jact.rewrites.affine); returns the small values their rebuilding needs, and for each how it is
  recomputed (`from_parameters(value)`: a `Recomputation`, or None where it is stored)."""
  candidates = {uid: r.atom for uid, r in enumerate(residuals)
                if r.compressed and not r.recomputed and not r.info.two_valued}
  groups = affine.representatives(jaxpr, candidates)
  operands: list[Any] = []
  recompute: dict[Any, Any] = {}
  for uid, (rep, paths) in groups.items():
    # The group gets its finest width; values rebuilt from small values alone are exact.
    bits = 32 if rep is None else max(residuals[u].info.bits for u in paths)
    if uid != rep:
      representative = None if rep is None else paths[rep]
      needed = [v for v in affine.small_operands(jaxpr, [p for p in (representative, paths[uid]) if p])
                if v not in operands]
      operands.extend(needed)
      recompute.update((v, from_parameters(v)) for v in needed)
      extra = sum(info_lib.aval_nbytes(v.aval) for v in needed if recompute[v] is None)
      info = dataclasses.replace(residuals[uid].info, bits=bits, extra_nbytes=extra,
                                 rebuilt_from="small values" if rep is None else residuals[rep].info.name)
      residuals[uid] = dataclasses.replace(residuals[uid], info=info,
                                           rebuild=Rebuild(rep, representative, paths[uid]))
    else:
      residuals[uid] = dataclasses.replace(residuals[uid], info=dataclasses.replace(residuals[uid].info, bits=bits))
  return tuple(operands), tuple(recompute[v] for v in operands)
