"""What each residual of a traced call is, and the width it is stored at.

A compressed call's inputs are of an `InputKind`; a residual's `Source` (see `jact.info`) follows
from the inputs it depends on. `classify` names every residual of the forward jaxpr, finds where
it can be quantised and asks the policy for its width (`choose_bits`), unless a rule keeps it:
values of parameters and indices are recomputed, non-floats, small residuals, residuals the
backward pass uses nonlinearly and per-row statistics are kept as they are.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, NamedTuple, Sequence

import jax.numpy as jnp

from jact import _jaxpr, codec
from jact._options import Options
from jact.info import RECOMPUTABLE, Kept, ResidualInfo, Source
from jact.rewrites import chains

# checkpoint_name of what a compressed call stores, so that an enclosing compressed call keeps it
# as it is; + ":" + a residual's name: a loop body's residual that calibrate probes by that name.
STORED_MARK = "jact:stored"
EXPOSED_MARK = STORED_MARK + ":"


class InputKind(enum.Enum):
  """What an input of a compressed call is."""
  KEPT = "kept"                  # a parameter (keep_argnums), a closed-over value, a loop's constant
  INDEX = "index"                # integers or booleans, not differentiated (indices, masks)
  COMPRESSIBLE = "compressible"  # a float activation
  FIXED = "fixed"                # in a loop body compressed on its own: a float that carries no
                                 # gradient (a graph's edge weights)

  @property
  def differentiated(self) -> bool:
    return self not in (InputKind.INDEX, InputKind.FIXED)

  @property
  def source(self) -> Source:
    """The source of a residual that is this input itself."""
    return {InputKind.KEPT: Source.PARAMETER, InputKind.COMPRESSIBLE: Source.INPUT}.get(self, Source.INDEX)


def input_kind(leaf: Any, kept: bool) -> InputKind:
  """The kind of an argument leaf; `kept`: named in keep_argnums."""
  if kept:
    return InputKind.KEPT
  return InputKind.COMPRESSIBLE if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) else InputKind.INDEX


class Recomputation(NamedTuple):
  """The part of a forward jaxpr that computes one value, and the forward inputs it reads."""
  jaxpr: Any
  inputs: tuple[int, ...]


class Rebuild(NamedTuple):
  """How a residual is rebuilt from an affine relative (see jact.rewrites.affine)."""
  representative: int | None  # the stored relative's residual index (None: from small values alone)
  representative_path: Any
  path: Any


@dataclasses.dataclass(frozen=True)
class Residual:
  """One distinct residual of a traced call: where it lives in the forward jaxpr, how it is stored."""
  atom: Any  # a jaxpr Var or Literal of the forward jaxpr
  info: ResidualInfo
  ready_after: int  # forward equation index after which it can be quantised (-1: at the start)
  recompute: Recomputation | None = None
  rebuild: Rebuild | None = None

  @property
  def recomputed(self) -> bool:
    """Rebuilt in the backward pass from parameters, index inputs and constants."""
    return self.info.recomputed

  @property
  def compressed(self) -> bool:
    return self.info.bits != 32 and not _jaxpr.is_literal(self.atom)


class Classified(NamedTuple):
  residuals: list[Residual]  # distinct residuals
  leaf_ids: list[int]  # residual leaf position -> index into `residuals`


def classify(jaxpr, num_outs: int, kinds: Sequence[InputKind], labels: Sequence[str], scope: str,
             options: Options, nonlinear: set, value_sets: dict) -> Classified:
  """The residuals of a forward jaxpr (`inputs -> outputs + residual leaves`), named and sized."""
  deps = _jaxpr.dependence(jaxpr, [frozenset({k}) for k in kinds])
  producer_index = {v: i for i, eqn in enumerate(jaxpr.eqns) for v in eqn.outvars}
  producers = _jaxpr.producers(jaxpr)
  last_use = _jaxpr.last_uses(jaxpr)
  invar_index = {v: i for i, v in enumerate(jaxpr.invars)}
  counters: dict[str, int] = {}
  residuals: list[Residual] = []
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
      source, label = Source.CONSTANT, "literal"
    elif atom in invar_index:
      i = invar_index[atom]
      is_argument, label, source = True, labels[i], kinds[i].source
    else:
      primitive = producer.primitive.name if producer is not None else None
      label = _label(producer, primitive, nested, scope, counters)
      tags = deps.get(atom, frozenset())
      source = (Source.ACTIVATION if InputKind.COMPRESSIBLE in tags
                else Source.INDEX if any(not k.differentiated for k in tags)
                else Source.PARAMETER if tags else Source.CONSTANT)
    values = None if _jaxpr.is_literal(atom) else value_sets.get(atom)
    stacked = (producer is not None and producer.primitive.name == "scan"
               and producer.outvars.index(atom) >= len(_jaxpr.scan_carry_positions(producer)))
    info = ResidualInfo(name=exposed or f"{scope}/{label}", shape=tuple(aval.shape), dtype=aval.dtype,
                        source=source, is_argument=is_argument, primitive=primitive, stacked_by_loop=stacked,
                        group_size=options.group_size,
                        two_valued=(values is not None and jnp.issubdtype(aval.dtype, jnp.floating)
                                    and codec.exact_at_one_bit(values, aval.dtype)))
    info = choose_bits(info, options, used_nonlinearly=not options.compress_nonlinear
                       and not _jaxpr.is_literal(atom) and atom in nonlinear)
    if nested and source not in RECOMPUTABLE:
      # Stored by a compressed call nested in this one: its codes and bounds are kept as they are
      # (rounding a group's bounds would break its decoding).
      info = dataclasses.replace(info, bits=32, kept_because=Kept.NESTED)
    if _jaxpr.is_literal(atom):
      ready = -1
    else:
      ready = max(producer_index.get(atom, -1), last_use.get(atom, -1))
      seen[atom] = len(residuals)
    leaf_ids.append(len(residuals))
    recomputed = (source in RECOMPUTABLE and not is_argument and not _jaxpr.is_literal(atom))
    residuals.append(Residual(atom, dataclasses.replace(info, recomputed=recomputed), ready))
  return Classified(residuals, leaf_ids)


def _label(producer, primitive: str | None, nested: bool, scope: str, counters: dict[str, int]) -> str:
  """A computed residual's label: the named scopes inside the call, then its kind, numbered."""
  scopes = _jaxpr.scope_names(producer) if producer is not None else []
  chain = [name for name in scopes if chains.is_chain_scope(name)]
  inner = [name for name in scopes if not chains.is_chain_scope(name)]
  if inner and inner[0] == scope.rsplit("/", 1)[-1]:  # Flax re-enters the module's own scope
    inner = inner[1:]
  # A rewritten elementwise chain stores its derivative (see rewrites.chains); a nested
  # compressed call, its codes and bounds.
  kind = "derivative" if chain else "nested" if nested else primitive or "const"
  path = "/".join(inner + chain[-1:] + [kind])
  count = counters.get(path, 0)
  counters[path] = count + 1
  return f"{path}{count}"


def choose_bits(info: ResidualInfo, options: Options, used_nonlinearly: bool) -> ResidualInfo:
  """`info` with the width the policy gives it, or with why it is kept as it is."""
  if info.source in RECOMPUTABLE:
    return dataclasses.replace(info, kept_because=info.source)
  if not jnp.issubdtype(info.dtype, jnp.floating):
    return dataclasses.replace(info, kept_because=Kept.NOT_FLOATING)
  if info.size < options.min_size:
    return dataclasses.replace(info, kept_because=f"< min_size={options.min_size}")
  if used_nonlinearly:
    return dataclasses.replace(info, kept_because=Kept.NONLINEAR)
  if len(info.shape) >= 2 and info.shape[-1] == 1:
    # One value per row (a softmax's 1/s**2, a LayerNorm's 1/sigma, a node's degree): a group
    # would span rows of unrelated scales, and rounding the small ones scales whole rows'
    # gradients. At 1/(row length) of the row's bytes, keeping them costs little.
    return dataclasses.replace(info, kept_because=Kept.PER_ROW)
  bits = options.policy(info)
  try:
    bits = codec.check_bits(bits, what="bits")
  except ValueError:
    raise ValueError(f"the policy {options.policy!r} returned bits={bits!r} for residual {info.name!r}; "
                     f"a policy must return one of {codec.SUPPORTED_BITS} or None.") from None
  if info.two_valued and bits != 32:
    bits = 1  # a mask: exact at 1 bit, so any narrower width than the policy's loses nothing
  return dataclasses.replace(info, bits=bits)


def nonlinear(bwd_jaxpr, residual_atoms) -> set:
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
