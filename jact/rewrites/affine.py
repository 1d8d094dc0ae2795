"""Residuals that are affine functions of one another, stored once.

Autodiff of a normalisation layer saves several full-size residuals that are affine functions of
the same activation `x`: Flax's BatchNorm and LayerNorm compute the variance as
`mean(x**2) - mean(x)**2`, whose derivative saves `2 * x`; the normalisation saves `x - mean`;
the layer after it saves the output `(x - mean) * (rsqrt(var) * scale) + bias`. Given the small
`mean`, `rsqrt(var)`, `scale` and `bias`, any one determines the others. jact stores one of them
(the representative) and rebuilds the others from its decoded value in the backward pass. A
full-size residual made of small values alone (LayerNorm's `rsqrt(var)[:, None] * scale`) is
rebuilt exactly from them. A normalisation layer then stores one full-size residual, not two to four.

An affine path is a chain of equations from a full-size variable (the root) to a residual, each of
which adds, subtracts or negates, or multiplies or divides by a value that is small (a literal or a
per-channel/per-row array): residual = a * root + b elementwise. Residuals with the same root
form a group. The representative is a member whose path can be undone exactly in real arithmetic
(adding, subtracting and negating anything small; multiplying or dividing by a nonzero literal);
among those, one whose path subtracts or adds a value computed from the data is preferred: that is
a centring (`x - mean`), whose groups span a narrower range than `x`'s, so its codes are finer and
every member rebuilt from it inherits that precision.

Rebuilt members are affine in the representative's decoded value: stochastic rounding keeps them
unbiased, and the backward pass keeps the polynomial degree it had in the stored residuals.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jact import _jaxpr

_OFFSET = frozenset({"add", "add_any", "sub"})
_ARITHMETIC = _OFFSET | {"mul", "div", "neg"}
_EXPANDING = frozenset({"broadcast_in_dim", "reshape"})
# A value is "small" if it has at most 1/64 of the full-size elements: stored at full precision for
# the rebuild, it then costs at most half a bit per element of the residuals it helps rebuild.
_SMALL_FRACTION = 64
_MAX_DEPTH = 8  # how many equations deep a value made of small values is looked for


@dataclasses.dataclass(frozen=True)
class Path:
  """How a residual is computed from its root: equations in program order, and in each the
  position of the operand on the path (the others are made of small values). A residual made of
  small values alone has no root and no steps."""
  atom: Any  # the residual
  root: Any
  steps: tuple[tuple[int, int], ...]  # (equation index, operand position), root first

  def invertible(self, jaxpr) -> bool:
    return self.root is not None and all(_undoable(jaxpr.eqns[i], k) for i, k in self.steps)

  def centres(self, jaxpr) -> bool:
    """Adds or subtracts a (non-literal) value computed from the data somewhere on the path."""
    return any(jaxpr.eqns[i].primitive.name in _OFFSET and not _jaxpr.is_literal(jaxpr.eqns[i].invars[1 - k])
               for i, k in self.steps)


def _producers(jaxpr) -> dict:
  return {v: (i, eqn) for i, eqn in enumerate(jaxpr.eqns) for v in eqn.outvars}


def _small_leaves(atom, size: int, producers: dict, depth: int = 0) -> list[Any] | None:
  """The small variables `atom` is computed from by broadcasts, reshapes and arithmetic (its
  leaves: none for a literal), or None if it is not made of small values alone."""
  if _jaxpr.is_literal(atom):
    return []
  if int(np.prod(atom.aval.shape)) * _SMALL_FRACTION <= size:
    return [atom]
  if atom not in producers or depth >= _MAX_DEPTH:
    return None
  eqn = producers[atom][1]
  name = eqn.primitive.name
  if name not in _EXPANDING and not (name in _ARITHMETIC and len(eqn.outvars) == 1):
    return None
  leaves: list[Any] = []
  for v in eqn.invars[:1] if name in _EXPANDING else eqn.invars:
    found = _small_leaves(v, size, producers, depth + 1)
    if found is None:
      return None
    leaves.extend(u for u in found if u not in leaves)
  return leaves


def _step(eqn, size: int, producers: dict) -> int | None:
  """Position of the full-size operand if `eqn` is one affine step, else None."""
  name = eqn.primitive.name
  invars = eqn.invars
  if (name not in _ARITHMETIC or len(eqn.outvars) != 1
      or not jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.floating)):
    return None
  positions = [k for k, v in enumerate(invars) if _small_leaves(v, size, producers) is None]
  if len(positions) != 1:
    return None
  k = positions[0]
  if name == "div" and k != 0:  # c / x is not affine in x
    return None
  if invars[k].aval.shape != eqn.outvars[0].aval.shape or invars[k].aval.dtype != eqn.outvars[0].aval.dtype:
    return None
  return k


def path_of(jaxpr, atom, producers: dict) -> Path:
  """The longest affine path ending at `atom`: no root if `atom` is made of small values alone,
  no steps if its producer is not affine."""
  size = int(np.prod(atom.aval.shape))
  if _small_leaves(atom, size, producers) is not None:
    return Path(atom, None, ())
  steps = []
  current = atom
  while current in producers:
    eqn_index, eqn = producers[current]
    k = _step(eqn, size, producers)
    if k is None:
      break
    steps.append((eqn_index, k))
    current = eqn.invars[k]
  return Path(atom, current, tuple(reversed(steps)))


def _undoable(eqn, k: int) -> bool:
  """Adding, subtracting and negating anything small can be undone; scaling only by a nonzero literal."""
  name = eqn.primitive.name
  if name in _OFFSET or name == "neg":
    return True
  other = eqn.invars[1 - k]
  return _jaxpr.is_literal(other) and bool(np.all(np.asarray(other.val) != 0))


def small_operands(jaxpr, paths: Sequence[Path]) -> list[Any]:
  """The small values that rebuilding along `paths` reads besides the representative (what is
  computed from them by broadcasts and arithmetic is redone)."""
  producers = _producers(jaxpr)
  out: list[Any] = []
  for path in paths:
    size = int(np.prod(path.atom.aval.shape))
    operands = [path.atom] if path.root is None else [
        v for i, k in path.steps for position, v in enumerate(jaxpr.eqns[i].invars) if position != k]
    for v in operands:
      out.extend(u for u in _small_leaves(v, size, producers) if u not in out)
  return out


def rebuild(jaxpr, representative: Path | None, member: Path, value: jax.Array | None,
            smalls: dict) -> jax.Array:
  """`member`'s value from the value of `representative` (same root; None for a member made of
  small values alone) and the small values `small_operands` lists (variable -> value)."""
  producers = _producers(jaxpr)
  env = _jaxpr.Env()
  for var, v in smalls.items():
    env.write(var, v)

  # Literals enter as values that exist only once the decoded value (or a small value) does: as
  # constants, XLA would materialise `2.0` broadcast to full size at the start of the step for a
  # library fusion that cannot broadcast, and keep it alive throughout.
  anchor = value if value is not None else next(iter(smalls.values()), None)

  def read(atom):  # a small value, or one computed from small values: redone
    if _jaxpr.is_literal(atom):
      if anchor is None:
        return atom.val
      return jax.lax.optimization_barrier((anchor, jnp.asarray(atom.val, atom.aval.dtype)))[1]
    if atom not in known:
      eqn = producers[atom][1]
      env.write(atom, _jaxpr.eval_eqn(eqn, [read(v) for v in eqn.invars])[0])
      known.add(atom)
    return env.read(atom)

  known = set(smalls)
  if member.root is None:
    return read(member.atom)
  # Undo the representative's path back to the root, in float32 at least (a bfloat16 model's
  # `(x - mean) + mean` would round twice); the root is rounded once, to its own dtype.
  root_dtype = value.dtype
  value = value.astype(jnp.promote_types(root_dtype, jnp.float32))
  for i, k in reversed(representative.steps):
    eqn = jaxpr.eqns[i]
    name = eqn.primitive.name
    if name == "neg":
      value = -value
      continue
    other = jnp.broadcast_to(jnp.asarray(read(eqn.invars[1 - k])).astype(value.dtype), value.shape)
    if name in ("add", "add_any"):
      value = value - other
    elif name == "sub":
      value = value + other if k == 0 else other - value
    elif name == "mul":
      value = value / other
    else:  # div by a literal
      value = value * other
  value = value.astype(member.root.aval.dtype)
  for i, k in member.steps:  # then follow the member's path forward, as the forward pass did
    eqn = jaxpr.eqns[i]
    value = _jaxpr.eval_eqn(eqn, [value if position == k else read(v) for position, v in enumerate(eqn.invars)])[0]
  return value


def representatives(jaxpr, atoms: dict[int, Any]) -> dict[int, tuple[int | None, dict[int, Path]]]:
  """Which residuals of `atoms` (uid -> variable) to rebuild: member uid -> (representative uid,
  paths of its group's members by uid). Residuals with the same affine root form a group if it
  has two or more members, one of them invertible (the representative, mapped to itself);
  residuals made of small values alone have no representative (None)."""
  producers = _producers(jaxpr)
  by_root: dict[Any, dict[int, Path]] = {}
  out = {}
  for uid, atom in atoms.items():
    path = path_of(jaxpr, atom, producers)
    if path.root is None:
      out[uid] = (None, {uid: path})
    else:
      by_root.setdefault(path.root, {})[uid] = path
  for paths in by_root.values():
    if len(paths) < 2:
      continue
    invertible = [uid for uid, p in paths.items() if p.invertible(jaxpr)]
    if not invertible:
      continue
    # Prefer a centred member (finer codes), then the shortest path (fewest roundings to undo).
    rep = min(invertible, key=lambda uid: (not paths[uid].centres(jaxpr), len(paths[uid].steps), uid))
    for uid in paths:
      out[uid] = (rep, paths)
  return out
